"""The spike detector: z-score against a window that spikes never enter, and bursts of spikes."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.detectors.spike import SpikeDetector, SpikeParams, SpikePhase
from monitor.engine.events import Detection, Metrics


def key(d: Detection) -> tuple[object, ...]:
    return (d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items()))


def noisy(n: int, seed: int = 0, level: float = 1.0, sigma: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sigma) for _ in range(n)]


def feed_all(
    det: SpikeDetector, values: list[float], start: int = 0, every: int = 1
) -> list[Detection]:
    out: list[Detection] = []
    for i, v in enumerate(values):
        out += det.feed(Metrics(step=start + i * every, values={"loss": v}))
    return out


def test_defaults_are_olmo_cores() -> None:
    """Defaults: 6σ over the last 128 values once 64 are in."""
    p = SpikeParams()
    assert (p.monitor, p.window, p.min_samples, p.z_threshold) == ("loss", 128, 64, 6.0)
    assert (p.burst_count, p.burst_window) == (3, 50)


def test_no_detection_during_warm_up() -> None:
    """Before min_samples values, even a huge value is only added to the window."""
    det = SpikeDetector(SpikeParams(window=16, min_samples=8))
    assert feed_all(det, [1.0, 1.01, 0.99, 1.0, 100.0]) == []
    assert det.phase is SpikePhase.WARM_UP and det.samples == 5


def test_fires_with_z_mean_std_and_a_readable_reason() -> None:
    """A value 20σ above the window's mean fires one detection carrying z, mean and std."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    mean, std = det.mean, det.std
    out = det.feed(Metrics(step=812, values={"loss": mean + 20 * std}))
    assert len(out) == 1
    d = out[0]
    assert (d.detector, d.metric, d.step) == ("spike", "loss", 812)
    assert d.detail["z"] == pytest.approx(20.0)
    assert d.detail["mean"] == mean and d.detail["std"] == std
    assert d.reason.startswith(f"loss spiked to {d.value:.4g} at step 812: 20.0σ above its mean")
    assert d.reason.endswith("over the last 128 values")
    assert not SpikeDetector.is_burst(d)


def test_spike_does_not_enter_the_window() -> None:
    """After a spike the window's mean, std and size are exactly what they were."""
    det = SpikeDetector()
    feed_all(det, noisy(100))
    before = (det.mean, det.std, det.samples)
    assert feed_all(det, [50.0], start=100)
    assert (det.mean, det.std, det.samples) == before


def test_below_threshold_and_downward_values_do_not_fire() -> None:
    """A 5σ rise (threshold 6) and a 50σ drop are both accepted as normal values."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    assert feed_all(det, [det.mean + 5 * det.std]) == []
    assert feed_all(det, [det.mean - 50 * det.std]) == []


def test_three_spikes_within_fifty_steps_make_a_burst() -> None:
    """The third spike within burst_window steps adds a burst detection after its own."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    out: list[Detection] = []
    for step in (200, 220, 249):
        out += det.feed(Metrics(step=step, values={"loss": 5.0}))
    assert [SpikeDetector.is_burst(d) for d in out] == [False, False, False, True]
    burst = out[-1]
    assert (burst.detector, burst.metric, burst.step) == ("spike", "loss", 249)
    assert burst.detail["burst"] == 1 and burst.detail["count"] == 3
    assert burst.detail["first_step"] == 200
    assert "burst of 3 loss spikes between steps 200 and 249" in burst.reason
    # the list was cleared: two more spikes are not yet a burst
    more = [d for s in (250, 251) for d in det.feed(Metrics(step=s, values={"loss": 5.0}))]
    assert not any(SpikeDetector.is_burst(d) for d in more)


def test_spikes_spread_out_are_no_burst() -> None:
    """Spikes 50 steps apart never fall within one burst window of 50 steps."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    out = [d for s in (200, 250, 300, 350) for d in det.feed(Metrics(step=s, values={"loss": 5.0}))]
    assert len(out) == 4 and not any(SpikeDetector.is_burst(d) for d in out)


def test_burst_count_zero_disables_bursts_and_one_makes_every_spike_a_burst() -> None:
    """burst_count=0 never emits bursts; burst_count=1 emits one after every spike."""
    off = SpikeDetector(SpikeParams(burst_count=0))
    feed_all(off, noisy(128))
    assert len(feed_all(off, [5.0] * 4, start=200)) == 4
    every = SpikeDetector(SpikeParams(burst_count=1))
    feed_all(every, noisy(128))
    out = feed_all(every, [5.0, 5.0], start=200)
    assert [SpikeDetector.is_burst(d) for d in out] == [False, True, False, True]


def test_steps_going_back_forget_future_spikes() -> None:
    """After a rollback to an earlier step, spikes remembered from later steps cannot join a burst."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    feed_all(det, [5.0, 5.0], start=300)  # spikes at 300 and 301
    out = [d for s in (290,) for d in det.feed(Metrics(step=s, values={"loss": 5.0}))]
    assert not any(SpikeDetector.is_burst(d) for d in out)


def test_burst_window_counts_steps_not_records() -> None:
    """With a metric reported every 20 steps, three spikes in a row span 40 steps: a burst; every 30: none."""
    for every, bursts in ((20, 1), (30, 0)):
        det = SpikeDetector()
        feed_all(det, noisy(128), every=every)
        out = feed_all(det, [5.0] * 3, start=128 * every, every=every)
        assert sum(SpikeDetector.is_burst(d) for d in out) == bursts


def test_level_shift_resets_after_reset_after_spikes() -> None:
    """A permanent jump fires reset_after spikes, then the detector warms up at the new level."""
    det = SpikeDetector(SpikeParams(window=32, min_samples=16, reset_after=5, burst_count=0))
    feed_all(det, noisy(32))
    out = feed_all(det, noisy(100, seed=1, level=3.0), start=32)
    assert [d.step for d in out] == [32, 33, 34, 35, 36]
    assert det.samples == 32 and det.phase is SpikePhase.WATCHING


def test_constant_metric_tolerates_rounding_but_not_jumps() -> None:
    """On a constant window, a 1-ulp change is no spike, a 1 % jump is."""
    det = SpikeDetector()
    feed_all(det, [2.0] * 128)
    assert feed_all(det, [math.nextafter(2.0, 3.0)]) == []
    assert len(feed_all(det, [2.02])) == 1


def test_non_finite_huge_and_absent_values_are_ignored() -> None:
    """NaN, ±Inf, |x| >= 1e150, None and absent metrics leave the window untouched."""
    det = SpikeDetector()
    feed_all(det, noisy(128))
    before = det.state_dict()
    for values in (
        {"loss": math.nan},
        {"loss": math.inf},
        {"loss": -math.inf},
        {"loss": 1e200},
        {"loss": None},
        {"val_loss": 9.0},
        {},
    ):
        assert det.feed(Metrics(step=500, values=values)) == []  # type: ignore[arg-type]
    assert det.state_dict() == before


def test_running_statistics_do_not_drift() -> None:
    """After 50k values at level 1e6, the running mean/std equal the exact ones of the window."""
    det = SpikeDetector(SpikeParams(z_threshold=1e6))  # never fires: every value is added
    values = noisy(50_000, seed=3, level=1e6, sigma=1.0)
    feed_all(det, values)
    window = values[-128:]
    assert det.mean == pytest.approx(statistics.fmean(window), rel=1e-15, abs=1e-9)
    assert det.std == pytest.approx(statistics.pstdev(window), rel=1e-6)


def test_finds_injected_spikes_in_a_noisy_descent_without_false_alarms() -> None:
    """On 50 noisy descending runs (5 % noise), every ×3 spike is found and nothing else fires."""
    for seed in range(50):
        rng = random.Random(seed)
        spike_steps = set(rng.sample(range(300, 3000), 5))
        det = SpikeDetector(SpikeParams(burst_count=0))
        fired = []
        for step in range(3000):
            loss = (0.2 + 2.0 * math.exp(-step / 800)) * (1 + rng.gauss(0.0, 0.05))
            if step in spike_steps:
                loss *= 3.0
            fired += [d.step for d in det.feed(Metrics(step=step, values={"loss": loss}))]
        assert set(fired) == spike_steps, seed


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"monitor": ""}, "monitor"),
        ({"window": 1}, "window"),
        ({"min_samples": 1}, "min_samples"),
        ({"window": 10, "min_samples": 11}, "min_samples"),
        ({"z_threshold": 0.0}, "z_threshold"),
        ({"z_threshold": math.inf}, "z_threshold"),
        ({"burst_count": -1}, "burst_count"),
        ({"burst_window": 0}, "burst_window"),
        ({"reset_after": 2.0}, "reset_after"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each impossible parameter raises a ParamError naming it."""
    with pytest.raises(ParamError) as info:
        SpikeParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_load_rejects_a_window_too_long() -> None:
    """A snapshot with more values than the window is refused with a clear error."""
    det = SpikeDetector(SpikeParams(window=4, min_samples=2))
    with pytest.raises(ValueError, match="more than window=4"):
        det.load_state_dict({"values": [1.0] * 5, "mean": 1.0, "m2": 0.0})


values = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf, 50.0, 1e200]),
    st.floats(0.0, 1.0),
)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(st.tuples(values, st.integers(0, 3)), max_size=120),
    cut=st.integers(0, 120),
)
def test_state_round_trip_at_any_cut(stream: list[tuple[float | None, int]], cut: int) -> None:
    """A detector restored from a JSON snapshot at any point fires exactly like one that never stopped."""
    params = SpikeParams(
        window=8, min_samples=4, z_threshold=2.0, burst_count=2, burst_window=5, reset_after=3
    )
    cut = min(cut, len(stream))
    records, step = [], 0
    for value, gap in stream:
        step += gap
        records.append(Metrics(step=step, values={} if value is None else {"loss": value}))
    whole = SpikeDetector(params)
    expected = [key(d) for r in records for d in whole.feed(r)]
    first = SpikeDetector(params)
    got = [key(d) for r in records[:cut] for d in first.feed(r)]
    second = SpikeDetector(params)
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += [key(d) for r in records[cut:] for d in second.feed(r)]
    assert got == expected
    assert second.state_dict() == whole.state_dict()


def test_window_holds_only_the_values_seen_until_full() -> None:
    """A detector that saw a few values keeps a few slots (idle jobs cost the daemon
    memory), fills up to ``window`` and then replaces the oldest, with the same statistics
    and state as a window of ``window`` slots from the start."""
    det = SpikeDetector(SpikeParams(window=8, min_samples=4))
    assert len(det._ring) == 0
    for step in range(3):
        det.feed(Metrics(step=step, values={"loss": 1.0 + step}))
    assert len(det._ring) == 3
    assert det.state_dict()["mean"] == 2.0
    for step in range(3, 20):
        det.feed(Metrics(step=step, values={"loss": 1.0 + step % 5}))
    assert len(det._ring) == 8
    restored = SpikeDetector(SpikeParams(window=8, min_samples=4))
    restored.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert restored.state_dict() == det.state_dict()
