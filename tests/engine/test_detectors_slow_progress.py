"""The slow-progress detector: a straight, slow descent is probed with LR increases; a bending curve is left alone."""

from __future__ import annotations

import json
import math

import pytest

from monitor.engine.base import ParamError
from monitor.engine.detectors.slow_progress import (
    SlowProgressDetector,
    SlowProgressParams,
    SlowProgressPhase,
)
from monitor.engine.events import Detection, Metrics
from monitor.engine.responses import ResponseParams, resolve


def feed_all(
    det: SlowProgressDetector, values: list[float | None], start: int = 0
) -> list[Detection]:
    out: list[Detection] = []
    for i, value in enumerate(values):
        record = {} if value is None else {"val_loss": value}
        out += det.feed(Metrics(step=(start + i) * 50, values=record))
    return out


def linear(n: int, start: float = 2.0, drop: float = 0.02) -> list[float]:
    """A loss losing ``drop`` (absolute) per evaluation: gains of about 1 %, nearly constant."""
    return [start - drop * i for i in range(n)]


def test_a_straight_slow_descent_fires_on_the_third_evaluation() -> None:
    """Two steady gains in a row are a detection; its detail gives both gains and the count."""
    det = SlowProgressDetector()
    out = feed_all(det, linear(3))
    assert [d.step for d in out] == [100]
    d = out[0]
    assert (d.detector, d.metric, d.value) == ("slow_progress", "val_loss", pytest.approx(1.96))
    assert d.detail["gain"] == pytest.approx(0.02 / 1.98)
    assert d.detail["previous_gain"] == pytest.approx(0.01)
    assert d.detail["increases"] == 1
    assert "straight, slow descent" in d.reason
    assert det.phase is SlowProgressPhase.CHECKING


def test_a_bending_curve_settles_without_firing() -> None:
    """A good LR's curve (each gain well under the one before) does not fire; with rearm_after=0 nothing later does."""
    det = SlowProgressDetector(SlowProgressParams(rearm_after=0))
    bending = [2.3, 1.0, 0.8, 0.72, 0.70]  # each gain under half the one before
    assert feed_all(det, bending) == []
    assert det.phase is SlowProgressPhase.SETTLED
    assert feed_all(det, linear(10, start=0.69, drop=0.003), start=5) == []


def test_probes_again_rearm_after_evaluations_after_settling() -> None:
    """Settled by a bend, the detector judges again after rearm_after evaluations, and a straight stretch fires."""
    det = SlowProgressDetector()  # rearm_after=3
    assert feed_all(det, [2.3, 1.0, 0.8]) == []
    assert det.phase is SlowProgressPhase.SETTLED
    out = feed_all(det, linear(6, start=0.79, drop=0.005), start=3)
    # settled through 0.79, 0.785 and 0.78; probing again at 0.775, whose gain is as steady
    # as 0.78's: fire; 0.77 then gains no faster (the LR increase "did nothing"): settled again
    assert [d.value for d in out] == [pytest.approx(0.775)]
    assert det.phase is SlowProgressPhase.SETTLED


def test_keeps_raising_while_each_raise_speeds_the_descent_up() -> None:
    """After a detection, a gain 1.2x the last one fires again; a smaller one ends the probe for good."""
    det = SlowProgressDetector()
    values = [2.0, 1.98, 1.96]  # steady: fire
    values += [1.92]  # gain doubled: fire again
    values += [1.84]  # doubled again: fire
    values += [1.80]  # gain halved: settled
    values += [1.79, 1.78]  # settled: nothing, even for steady gains
    out = feed_all(det, values)
    assert [d.step for d in out] == [100, 150, 200]
    assert [d.detail["increases"] for d in out] == [1, 2, 3]
    assert "sped it up" in out[1].reason
    assert det.phase is SlowProgressPhase.SETTLED


def test_a_fast_geometric_fall_is_not_slow_but_a_raise_may_speed_it_that_much() -> None:
    """Gains of 75 % then 58 % (a ratio of 0.77, the CNN from its best LR) are no slow descent;
    after a raise, a gain above max_gain is the raise's speedup and fires again."""
    fast = [2.14, 0.532, 0.223]
    assert feed_all(SlowProgressDetector(), fast) == []
    assert [
        d.step for d in feed_all(SlowProgressDetector(SlowProgressParams(max_gain=0.8)), fast)
    ] == [100]
    det = SlowProgressDetector()
    out = feed_all(det, [2.0, 1.7, 1.445, 0.65])  # steady 15 % gains: fire; then 55 %, 3.7x
    assert [d.step for d in out] == [100, 150]
    assert "sped it up" in out[1].reason


def test_a_gain_far_beyond_what_a_raise_explains_is_a_plateau_left_behind() -> None:
    """After a raise, a gain above max_gain that is more than max_speedup (5x) the one before is
    the loss leaving its first plateau (the CNN from a 10x too low LR: 3.8 % then 75 %, 20x), not
    the raise's doing: the probe settles instead of raising again. Either bound alone still fires."""
    det = SlowProgressDetector()
    out = feed_all(det, [2.0, 1.96, 1.92, 0.8])  # steady 2 % gains: fire; then 58 %, 28x
    assert [d.step for d in out] == [100]
    assert det.phase is SlowProgressPhase.SETTLED
    assert det.increases == 1
    # 28x, but a gain below max_gain: a speedup
    low = SlowProgressDetector(SlowProgressParams(max_gain=0.6))
    assert [d.step for d in feed_all(low, [2.0, 1.96, 1.92, 0.8])] == [100, 150]
    # above max_gain, but within max_speedup
    assert [
        d.step
        for d in feed_all(
            SlowProgressDetector(SlowProgressParams(max_speedup=30.0)), [2.0, 1.96, 1.92, 0.8]
        )
    ] == [100, 150]


def test_a_descent_that_speeds_up_by_itself_is_not_a_straight_line() -> None:
    """Gains growing by more than 1/steadiness (a loss leaving its first plateau) wait, then a straight stretch fires."""
    det = SlowProgressDetector(SlowProgressParams(near_start=0.0))
    assert feed_all(det, [2.3, 2.29, 2.25, 2.15]) == []  # gains 0.4 %, 1.7 %, 4.4 %
    assert det.phase is SlowProgressPhase.PROBING
    assert [d.step for d in feed_all(det, [2.06], start=4)] == [200]  # gain 4.2 %: steady


def test_a_descent_speeding_up_near_its_first_evaluation_fires() -> None:
    """Still within near_start (3 %) of the first evaluation after three of them: a too-low LR
    leaving its plateau slowly. Farther from the start, a descent speeding up waits."""
    near = feed_all(
        SlowProgressDetector(), [2.3, 2.295, 2.285]
    )  # gains 0.2 %, 0.4 %; 0.65 % below x_0
    assert [d.step for d in near] == [100]
    far = SlowProgressDetector()
    assert feed_all(far, [2.3, 2.2, 1.9]) == []  # gains 4.3 %, 13.6 %: 17 % below x_0
    assert far.phase is SlowProgressPhase.PROBING


def test_after_a_probe_on_an_accelerating_descent_its_acceleration_is_expected() -> None:
    """The check extrapolates the acceleration seen at the probe (ratio 2): a gain that merely
    keeps accelerating at that rate is no speedup, one 1.5x beyond it is."""

    def curve(gains: list[float]) -> list[float]:
        values = [2.3]
        for g in gains:
            values.append(values[-1] * (1 - g))
        return values

    probe = [0.002, 0.004]  # ratio 2, still near the first evaluation: fire
    assert len(feed_all(SlowProgressDetector(), curve([*probe, 0.008]))) == 1  # 2x again: settled
    assert len(feed_all(SlowProgressDetector(), curve([*probe, 0.012]))) == 2  # 3x: fire again


def test_no_measurable_progress_keeps_probing_without_firing() -> None:
    """A flat metric (gains under min_gain) neither fires nor settles; a later steady descent fires."""
    det = SlowProgressDetector()
    assert feed_all(det, [1.0, 1.000005, 0.999999, 1.000002]) == []
    assert det.phase is SlowProgressPhase.PROBING
    assert [d.step for d in feed_all(det, [0.98, 0.96], start=4)] == [250]


def test_a_rising_metric_stops_the_probe_for_good() -> None:
    """An evaluation worse than the last (the LR was too high once) stops it: a straight descent afterwards never fires."""
    det = SlowProgressDetector()
    assert feed_all(det, [2.0, 1.9, 2.1]) == []  # +10.5 %: more than max_rise (0.2 %)
    assert det.phase is SlowProgressPhase.STOPPED
    assert feed_all(det, linear(12, start=2.0, drop=0.02), start=3) == []
    assert det.phase is SlowProgressPhase.STOPPED


def test_a_rise_during_the_check_stops_it_too() -> None:
    """A raise that makes the metric worse ends the probe at once, whatever rearm_after says."""
    det = SlowProgressDetector()
    assert len(feed_all(det, [2.0, 1.98, 1.96])) == 1
    assert feed_all(det, [2.1, *linear(10, start=2.08, drop=0.02)], start=3) == []
    assert det.phase is SlowProgressPhase.STOPPED


def test_a_rollback_stops_the_probe_for_good() -> None:
    """The loss coming back down from a checkpoint falls in a straight line: never a reason to raise."""
    det = SlowProgressDetector()
    assert feed_all(det, [2.0, 1.9]) == []
    det.rewind(0)
    assert feed_all(det, linear(12, start=1.9, drop=0.02), start=2) == []
    assert det.phase is SlowProgressPhase.STOPPED


def test_the_speedup_is_judged_against_the_curves_own_bend() -> None:
    """A curve whose gains shrink by 0.85 per evaluation: after a raise, a gain as large as the
    last one is no speedup (expected 0.85x, needed 1.2x that), a gain 1.1x the last one is."""

    def curve(gains: list[float]) -> list[float]:
        values = [2.0]
        for g in gains:
            values.append(values[-1] * (1 - g))
        return values

    probe = [0.01, 0.0085]  # ratio 0.85: fire at the third evaluation
    assert len(feed_all(SlowProgressDetector(), curve([*probe, 0.0085 * 1.1]))) == 2
    assert len(feed_all(SlowProgressDetector(), curve([*probe, 0.0085]))) == 1


def test_min_ratio_sets_how_sharp_a_bend_settles_the_probe() -> None:
    """Gains shrinking by 0.63 per evaluation fire at the default min_ratio (0.5), settle at 0.8."""
    values = [2.0, 1.9, 1.84]  # gains 5 %, 3.2 %
    assert [d.step for d in feed_all(SlowProgressDetector(), values)] == [100]
    strict = SlowProgressDetector(SlowProgressParams(min_ratio=0.8))
    assert feed_all(strict, values) == []
    assert strict.phase is SlowProgressPhase.SETTLED


def test_a_small_bump_only_settles() -> None:
    """A rise under max_rise settles the probe (it re-arms later) instead of stopping it."""
    det = SlowProgressDetector(SlowProgressParams(max_rise=0.05))
    assert feed_all(det, [2.0, 1.9, 1.91]) == []  # +0.5 %
    assert det.phase is SlowProgressPhase.SETTLED


def test_max_increases_bounds_the_probe() -> None:
    """With max_increases=2, a descent that keeps speeding up is raised twice, then left alone."""
    det = SlowProgressDetector(SlowProgressParams(max_increases=2))
    values = [2.0, 1.98, 1.96, 1.92, 1.84, 1.68, 1.36, *linear(10, start=1.3, drop=0.01)]
    assert len(feed_all(det, values)) == 2
    assert det.increases == 2


def test_non_finite_and_absent_values_change_nothing() -> None:
    """NaN, ±Inf, huge values and records without the metric leave detections and state as without them."""
    clean, mixed = SlowProgressDetector(), SlowProgressDetector()
    values = linear(6)
    junk: list[float | None] = [math.nan, None, math.inf, -1e200]
    fired_clean = feed_all(clean, values)
    interleaved: list[float | None] = []
    for i, value in enumerate(values):
        interleaved += [junk[i % len(junk)], value]
    fired_mixed = feed_all(mixed, interleaved)
    assert [d.value for d in fired_clean] == [d.value for d in fired_mixed] != []
    assert clean.state_dict() == mixed.state_dict()


@pytest.mark.parametrize("cut", range(9))
def test_state_round_trip_at_any_cut(cut: int) -> None:
    """A detector restored from a JSON snapshot fires exactly like one that never stopped."""
    values = [2.0, 1.98, 1.96, 1.92, 1.84, 1.80, 1.78, 1.76, 1.74]
    whole = [d.step for d in feed_all(SlowProgressDetector(), values)]
    first = SlowProgressDetector()
    before = feed_all(first, values[:cut])
    second = SlowProgressDetector()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = feed_all(second, values[cut:], start=cut)
    assert [d.step for d in before + after] == whole


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"monitor": ""}, "monitor"),
        ({"min_gain": 0.0}, "min_gain"),
        ({"steadiness": -1.0}, "steadiness"),
        ({"steadiness": 1.0}, "steadiness"),
        ({"min_speedup": math.inf}, "min_speedup"),
        ({"max_increases": -1}, "max_increases"),
        ({"max_increases": 1.5}, "max_increases"),
        ({"rearm_after": -1}, "rearm_after"),
        ({"max_rise": 0.0}, "max_rise"),
        ({"min_ratio": 1.5}, "min_ratio"),
        ({"min_ratio": 0.0}, "min_ratio"),
        ({"near_start": 1.0}, "near_start"),
        ({"near_start": -0.1}, "near_start"),
        ({"max_gain": 0.0}, "max_gain"),
        ({"max_gain": "0.5"}, "max_gain"),
        ({"max_speedup": 0.0}, "max_speedup"),
        ({"max_speedup": float("inf")}, "max_speedup"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each impossible parameter raises a ParamError naming it."""
    with pytest.raises(ParamError) as info:
        SlowProgressParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_default_response_triples_the_lr() -> None:
    """slow_progress's auto response is an increase by 3, which the engine applies as a scaling."""
    resolved = resolve("slow_progress", ResponseParams())
    assert (resolved.action, resolved.factor) == ("reduce", 3.0)
    assert resolve("slow_progress", ResponseParams(action="increase", factor=2.0)).factor == 2.0
    assert resolve("slow_progress", ResponseParams(action="none")).action == "none"
    with pytest.raises(ParamError) as info:
        ResponseParams(action="increase", factor=0.5)
    assert info.value.field == "factor"
