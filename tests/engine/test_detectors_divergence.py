"""The divergence detector: a steady, large rise of the smoothed metric."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine._packing import unpack_ints
from monitor.engine.base import ParamError
from monitor.engine.detectors.divergence import (
    DivergenceDetector,
    DivergenceParams,
    DivergencePhase,
)
from monitor.engine.events import Detection, Metrics

SERIES = 200


def key(d: Detection) -> tuple[object, ...]:
    return (d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items()))


def run(
    series: np.ndarray | list[float], params: DivergenceParams | None = None
) -> list[Detection]:
    det = DivergenceDetector(params)
    out: list[Detection] = []
    for step, value in enumerate(series):
        out += det.feed(Metrics(step=step, values={"loss": float(value)}))
    return out


# ---------------------------------------------------------------- generated series


def noisy_descent(seed: int, n: int = 1500) -> np.ndarray:
    """Exponential decay to a floor, times (1 + 5-10 % gaussian noise)."""
    rng = np.random.default_rng(20_000 + seed)
    t = np.arange(n)
    sigma = rng.uniform(0.05, 0.10)
    floor, start, tau = rng.uniform(0.02, 0.5), rng.uniform(0.5, 3.0), rng.uniform(30, 600)
    return (floor + start * np.exp(-t / tau)) * (1 + rng.normal(0, sigma, n))


def blow_up(seed: int) -> tuple[np.ndarray, int]:
    """A noisy descent that starts growing exponentially (×e every 5-40 steps) at a random step."""
    rng = np.random.default_rng(30_000 + seed)
    series = noisy_descent(seed, n=1000)
    start = int(rng.integers(200, 700))
    tau = rng.uniform(5, 40)
    t = np.arange(len(series)) - start
    growth = np.exp(np.clip(t, 0, None) / tau)
    return np.minimum(series * growth, 1e100), start


def test_fires_on_exponential_blow_ups() -> None:
    """At least 95 % of 200 blow-ups are flagged, never before the blow-up starts."""
    found = 0
    for seed in range(SERIES):
        series, start = blow_up(seed)
        out = run(series)
        assert all(d.step >= start for d in out), seed
        found += bool(out)
    assert found / SERIES >= 0.95


def test_quiet_on_noisy_descents() -> None:
    """At most 2 % of 200 noisy descending runs are flagged."""
    fired = sum(bool(run(noisy_descent(seed))) for seed in range(SERIES))
    assert fired / SERIES <= 0.02


def test_quiet_on_single_spikes() -> None:
    """A ×10 spike in a noisy descent lifts the average for a moment but is no divergence."""
    fired = 0
    for seed in range(100):
        series = noisy_descent(seed)
        series[np.random.default_rng(seed).integers(100, 1400)] *= 10.0
        fired += bool(run(series))
    assert fired == 0


# ---------------------------------------------------------------- rules and edge cases


def test_fires_on_a_steady_doubling_with_a_readable_reason() -> None:
    """Growth ×1.02 per value (×2.7 per 50) fires once the window is full, with rise and fraction."""
    det = DivergenceDetector()
    fired: list[Detection] = []
    for step in range(52):
        if step <= 50:
            assert det.phase is DivergencePhase.WARM_UP
        fired += det.feed(Metrics(step=step, values={"loss": 1.02**step}))
    assert [d.step for d in fired] == [51]
    d = fired[0]
    assert (d.detector, d.metric) == ("divergence", "loss")
    assert d.detail["rising_fraction"] == 1.0
    assert d.detail["rise"] > 1.0
    assert (
        d.detail["rise"]
        == (d.detail["smoothed"] - d.detail["smoothed_before"]) / d.detail["smoothed_before"]
    )
    assert d.detail["second_half_rise"] > d.detail["first_half_rise"] > 0
    assert d.reason.startswith("loss is diverging at step 51: its moving average rose +")
    assert det.phase is DivergencePhase.COOLDOWN


def test_cooldown_then_fires_again() -> None:
    """A divergence that goes on fires again after `cooldown` more values."""
    params = DivergenceParams(window=10, cooldown=5)
    steps = [d.step for d in run([1.1**i for i in range(40)], params)]
    assert steps == [11, 17, 23, 29, 35]


def test_slow_growth_below_min_rise_never_fires() -> None:
    """Growth ×1.2 per window stays below min_rise=0.5 however long it lasts (a rate, not a level)."""
    assert run([1.2 ** (i / 50) for i in range(1000)]) == []


def test_a_jump_to_a_higher_level_is_no_divergence() -> None:
    """A loss that triples once and stays there lifts the EMA ever more slowly: the third rule holds it back."""
    jump = [1.0] * 100 + [3.0] * 200
    assert run(jump) == []
    assert (
        run(jump, DivergenceParams(min_acceleration=0.0)) != []
    )  # the rule is what keeps it quiet


def test_non_finite_and_absent_values_change_nothing() -> None:
    """NaN, ±Inf, huge and absent values interleaved in a blow-up leave detections and state unchanged."""
    clean, mixed = DivergenceDetector(), DivergenceDetector()
    junk: list[dict[str, float]] = [{"loss": math.nan}, {"loss": -math.inf}, {"loss": 1e200}, {}]
    a, b = [], []
    for i in range(200):
        value = 1.03**i
        a += [d.step for d in clean.feed(Metrics(step=i, values={"loss": value}))]
        b += [d.step for d in mixed.feed(Metrics(step=i, values=junk[i % 4]))]
        b += [d.step for d in mixed.feed(Metrics(step=i, values={"loss": value}))]
    assert a == b and a
    assert clean.state_dict() == mixed.state_dict()


def test_near_zero_base_does_not_crash() -> None:
    """A smoothed value of 0 a window ago gives a huge but finite rise, not a division error."""
    out = run([0.0] * 60 + [i * 1e-3 for i in range(100)])
    assert out and all(math.isfinite(d.detail["rise"]) for d in out)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"monitor": ""}, "monitor"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"window": 1}, "window"),
        ({"min_rise": 0.0}, "min_rise"),
        ({"min_rise": math.nan}, "min_rise"),
        ({"min_rising_fraction": 0.0}, "min_rising_fraction"),
        ({"min_rising_fraction": 1.1}, "min_rising_fraction"),
        ({"min_acceleration": -1.0}, "min_acceleration"),
        ({"cooldown": -1}, "cooldown"),
        ({"cooldown": 2.5}, "cooldown"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each impossible parameter raises a ParamError naming it."""
    with pytest.raises(ParamError) as info:
        DivergenceParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_load_rejects_a_window_of_the_wrong_size() -> None:
    """A snapshot taken with another window is refused with a clear error."""
    state = DivergenceDetector(DivergenceParams(window=10)).state_dict()
    with pytest.raises(ValueError, match="expected 50"):
        DivergenceDetector().load_state_dict(state)


values = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf, 0.0]),
    st.floats(0.0, 10.0),
)


@settings(max_examples=200, deadline=None)
@given(stream=st.lists(values, max_size=100), cut=st.integers(0, 100))
def test_state_round_trip_at_any_cut(stream: list[float | None], cut: int) -> None:
    """A detector restored from a JSON snapshot at any point fires exactly like one that never stopped."""
    params = DivergenceParams(
        window=4, alpha=0.5, min_rise=0.2, min_rising_fraction=0.5, cooldown=2
    )
    cut = min(cut, len(stream))
    records = [
        Metrics(step=i, values={} if v is None else {"loss": v}) for i, v in enumerate(stream)
    ]
    whole = DivergenceDetector(params)
    expected = [key(d) for r in records for d in whole.feed(r)]
    first = DivergenceDetector(params)
    got = [key(d) for r in records[:cut] for d in first.feed(r)]
    second = DivergenceDetector(params)
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += [key(d) for r in records[cut:] for d in second.feed(r)]
    assert got == expected
    assert second.state_dict() == whole.state_dict()


def test_no_window_is_held_until_a_second_value() -> None:
    """The first value only seeds the EMA, so a detector that saw one value holds no window
    (idle jobs cost the daemon memory); its state still spells the window of zeros, and the
    second value, fed record by record or in a column, continues as with a window from the
    start."""
    window = DivergenceParams().window
    one, columns = DivergenceDetector(), DivergenceDetector()
    one.feed(Metrics(step=0, values={"loss": 1.0}))
    columns.feed_columns([0], {"loss": [1.0]}, 0, 1)
    for det in (one, columns):
        assert det._ring == [] and det._up_ring == []
        state = det.state_dict()
        assert unpack_ints(state["ups"]) == [0] * window and state["n"] == 1
    zeros = DivergenceDetector()
    zeros._allocate()
    assert DivergenceDetector().state_dict() == zeros.state_dict()
    one.feed(Metrics(step=1, values={"loss": 2.0}))
    columns.feed_columns([1], {"loss": [2.0]}, 0, 1)
    assert len(one._ring) == window and one.state_dict() == columns.state_dict()
