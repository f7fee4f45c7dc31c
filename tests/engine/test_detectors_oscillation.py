"""The oscillation detector: large swings that keep reversing, told apart from noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.detectors.oscillation import (
    OscillationDetector,
    OscillationParams,
    OscillationPhase,
)
from monitor.engine.events import Detection, Metrics

SERIES = 200  # generated series per family


def key(d: Detection) -> tuple[object, ...]:
    return (d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items()))


def run(
    series: np.ndarray | list[float], params: OscillationParams | None = None
) -> list[Detection]:
    det = OscillationDetector(params)
    out: list[Detection] = []
    for step, value in enumerate(series):
        out += det.feed(Metrics(step=step, values={"loss": float(value)}))
    return out


# ---------------------------------------------------------------- generated series


def wave(shape: str, t: np.ndarray, period: float, phase: float) -> np.ndarray:
    """A unit-amplitude wave; square and triangle are sampled on whole steps (period >= 2)."""
    if shape == "sine":
        return np.sin(2 * np.pi * t / period + phase)
    frac = ((t + int(phase / (2 * np.pi) * period)) % period) / period
    if shape == "square":
        return np.where(frac < 0.5, 1.0, -1.0)
    return 1 - 4 * np.abs(frac - 0.5)  # triangle


def oscillating(seed: int, shape: str, n: int = 600) -> np.ndarray:
    """A loss bouncing ±30 % with period 2-10 around a flat or slowly descending level, 3 % noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    period = rng.uniform(3, 10) if shape == "sine" else float(rng.integers(2, 11))
    level = rng.uniform(0.3, 3.0) * np.ones(n)
    if rng.random() < 0.5:
        level *= np.exp(-t / rng.uniform(2000, 20000))
    swing = 0.3 * wave(shape, t, period, rng.uniform(0, 2 * np.pi))
    return level * (1 + swing + rng.normal(0, 0.03, n))


def noisy_descent(seed: int, n: int = 1500) -> np.ndarray:
    """Exponential decay to a floor, times (1 + 5-10 % gaussian noise)."""
    rng = np.random.default_rng(10_000 + seed)
    t = np.arange(n)
    sigma = rng.uniform(0.05, 0.10)
    floor, start, tau = rng.uniform(0.02, 0.5), rng.uniform(0.5, 3.0), rng.uniform(30, 600)
    return (floor + start * np.exp(-t / tau)) * (1 + rng.normal(0, sigma, n))


def fraction_firing(make: object, count: int = SERIES) -> float:
    return sum(bool(run(make(seed))) for seed in range(count)) / count  # type: ignore[operator]


@pytest.mark.parametrize("shape", ["sine", "square", "triangle"])
def test_fires_on_oscillating_runs(shape: str) -> None:
    """At least 95 % of 200 runs bouncing ±30 % (period 2-10) are flagged, for each wave shape."""
    assert fraction_firing(lambda seed: oscillating(seed, shape)) >= 0.95


def test_quiet_on_noisy_descents() -> None:
    """At most 2 % of 200 exponentially decaying runs with 5-10 % noise are flagged."""
    assert fraction_firing(noisy_descent) <= 0.02


def minibatch_noise(seed: int, n: int = 1000) -> np.ndarray:
    """A slowly descending level times i.i.d. chi-square noise: a batch mean squared error, ±18-50 %."""
    rng = np.random.default_rng(20_000 + seed)
    level = rng.uniform(0.05, 2.0) * np.exp(-np.arange(n) / rng.uniform(300, 3000))
    dof = int(rng.integers(8, 64))  # relative std sqrt(2 / dof)
    return level * rng.chisquare(dof, n) / dof


def test_quiet_on_large_minibatch_noise() -> None:
    """At most 2 % of 200 runs whose loss swings ±18-50 % at random (no period) are flagged.

    Such noise passes the excursion, reversal and trend rules all the time; only the
    periodicity rule tells it from a bounce (without it, every one of these runs is flagged).
    """
    assert fraction_firing(minibatch_noise) <= 0.02


def test_quiet_on_noisy_descents_with_single_spikes() -> None:
    """Isolated ×5 spikes in a noisy descent are not an oscillation (each is one excursion)."""

    def spiky(seed: int) -> np.ndarray:
        series = noisy_descent(seed)
        series[np.random.default_rng(seed).choice(len(series), 8, replace=False)] *= 5.0
        return series

    assert fraction_firing(spiky, 100) <= 0.02


def test_quiet_when_it_bounces_but_falls_fast() -> None:
    """A loss that swings ±30 % but halves every 40 values is making progress: the trend rule holds it back."""
    t = np.arange(400)
    falling = 2.0 * np.exp(-t * math.log(2) / 40) * (1 + 0.3 * np.where(t % 2 == 0, 1.0, -1.0))
    assert run(falling) == []
    flat = 2.0 * (1 + 0.3 * np.where(t % 2 == 0, 1.0, -1.0))
    assert run(flat) != []


# ---------------------------------------------------------------- rules and edge cases


def bounce(n: int, level: float = 1.0, swing: float = 0.3) -> list[float]:
    return [level * (1 + swing * (1 if i % 2 == 0 else -1)) for i in range(n)]


def test_fires_when_the_window_fills_then_cools_down() -> None:
    """A period-2 bounce fires once `window` residuals are in, then again after `cooldown` more values."""
    params = OscillationParams(window=20, cooldown=10)
    det = OscillationDetector(params)
    steps = []
    for step, value in enumerate(bounce(60)):
        if step < 20:
            assert det.phase is OscillationPhase.WARM_UP
        steps += [d.step for d in det.feed(Metrics(step=step, values={"loss": value}))]
    # the first check at step 20 still sees the smoother settling from the first value (its
    # residuals drift), which keeps the periodicity just under 0.5; one value later it fires
    assert steps == [21, 32, 43, 54]


def test_detection_detail_and_reason() -> None:
    """The detection carries the window's statistics and says what swung and how often."""
    out = run(bounce(60))
    d = out[0]
    assert (d.detector, d.metric, d.step) == ("oscillation", "loss", 50)
    assert set(d.detail) == {
        "excursion_fraction",
        "flip_rate",
        "amplitude",
        "trend",
        "level",
        "periodicity",
        "period",
    }
    assert d.detail["period"] == 2 and d.detail["periodicity"] >= 0.9
    assert d.detail["excursion_fraction"] >= 0.9 and d.detail["flip_rate"] >= 0.8
    assert d.detail["amplitude"] == pytest.approx(0.3, rel=0.15)
    excursions = round(d.detail["excursion_fraction"] * 50)
    assert d.reason.startswith(
        f"loss is oscillating at step 50: {excursions} of the last 50 values swung"
    )


def test_small_swings_level_shifts_and_blow_ups_are_quiet() -> None:
    """±10 % bounces, a one-off level drop and an exponential blow-up do not fire."""
    assert run(bounce(300, swing=0.1)) == []
    assert run([1.0] * 100 + [0.4] * 200) == []
    assert run([math.exp(i / 20) for i in range(300)]) == []


def test_non_finite_and_absent_values_change_nothing() -> None:
    """NaN, ±Inf, huge and absent values interleaved in a bounce leave detections and state as without them."""
    clean = OscillationDetector()
    mixed = OscillationDetector()
    fired_clean, fired_mixed = 0, 0
    junk: list[dict[str, float]] = [
        {"loss": math.nan},
        {"loss": math.inf},
        {"loss": -1e200},
        {},
        {"val_loss": 1.0},
    ]
    for i, value in enumerate(bounce(200)):
        fired_clean += len(clean.feed(Metrics(step=i, values={"loss": value})))
        fired_mixed += len(mixed.feed(Metrics(step=i, values=junk[i % len(junk)])))
        fired_mixed += len(mixed.feed(Metrics(step=i, values={"loss": value})))
    assert fired_clean == fired_mixed > 0
    assert clean.state_dict() == mixed.state_dict()


def test_zero_level_counts_no_excursions() -> None:
    """A metric at 0 gives no relative residuals, never fires, and the smoother still follows it later."""
    det = OscillationDetector()
    for step, value in enumerate([0.0, 1e-14, -1e-14] * 100 + [1.0] * 200):
        assert det.feed(Metrics(step=step, values={"loss": value})) == []
    assert det.level == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"monitor": ""}, "monitor"),
        ({"alpha": 0.0}, "alpha"),
        ({"beta": 1.5}, "beta"),
        ({"window": 1}, "window"),
        ({"min_relative_amplitude": 0.0}, "min_relative_amplitude"),
        ({"min_excursion_fraction": 1.2}, "min_excursion_fraction"),
        ({"min_flip_rate": -0.1}, "min_flip_rate"),
        ({"max_trend_ratio": math.inf}, "max_trend_ratio"),
        ({"cooldown": -1}, "cooldown"),
        ({"clip": 0.0}, "clip"),
        ({"min_periodicity": 1.5}, "min_periodicity"),
        ({"alpha": "0.1"}, "alpha"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each impossible parameter raises a ParamError naming it."""
    with pytest.raises(ParamError) as info:
        OscillationParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_load_rejects_a_window_of_the_wrong_size() -> None:
    """A snapshot taken with another window is refused with a clear error."""
    state = OscillationDetector(OscillationParams(window=10)).state_dict()
    with pytest.raises(ValueError, match="expected 50"):
        OscillationDetector().load_state_dict(state)


values = st.one_of(
    st.none(),
    st.sampled_from([math.nan, -math.inf, 0.0]),
    st.floats(0.5, 1.5),
)


@settings(max_examples=200, deadline=None)
@given(stream=st.lists(values, max_size=120), cut=st.integers(0, 120))
def test_state_round_trip_at_any_cut(stream: list[float | None], cut: int) -> None:
    """A detector restored from a JSON snapshot at any point fires exactly like one that never stopped."""
    params = OscillationParams(window=6, cooldown=3, min_flip_rate=0.3, min_excursion_fraction=0.3)
    cut = min(cut, len(stream))
    records = [
        Metrics(step=i, values={} if v is None else {"loss": v}) for i, v in enumerate(stream)
    ]
    whole = OscillationDetector(params)
    expected = [key(d) for r in records for d in whole.feed(r)]
    first = OscillationDetector(params)
    got = [key(d) for r in records[:cut] for d in first.feed(r)]
    second = OscillationDetector(params)
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += [key(d) for r in records[cut:] for d in second.feed(r)]
    assert got == expected
    assert second.state_dict() == whole.state_dict()


def test_no_window_is_held_until_a_second_value() -> None:
    """The first value only seeds the smoother, so a detector that saw one value holds no
    window (idle jobs cost the daemon memory); its state still spells the empty window, and
    the second value, fed record by record or in a column, continues as with a window from
    the start."""
    one, columns = OscillationDetector(), OscillationDetector()
    one.feed(Metrics(step=0, values={"loss": 1.0}))
    columns.feed_columns([0], {"loss": [1.0]}, 0, 1)
    allocated = OscillationDetector()
    allocated._allocate()
    assert OscillationDetector().state_dict() == allocated.state_dict()
    for det in (one, columns):
        assert det._code_ring == [] and det._amp_ring == [] and det._res_ring == []
        assert det.state_dict()["n"] == 1
    one.feed(Metrics(step=1, values={"loss": 2.0}))
    columns.feed_columns([1], {"loss": [2.0]}, 0, 1)
    assert len(one._code_ring) == OscillationParams().window
    assert one.state_dict() == columns.state_dict()
