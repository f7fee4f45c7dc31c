"""The plateau detector: torch's ReduceLROnPlateau improvement rule, as a detector."""

from __future__ import annotations

import json
import math
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.detectors.plateau import PlateauDetector, PlateauParams, PlateauPhase
from monitor.engine.events import Detection, Metrics


def key(d: Detection) -> tuple[object, ...]:
    return (d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items()))


def feed_values(det: PlateauDetector, values: list[float], metric: str = "val_loss") -> list[int]:
    """Feed one value per step; return the steps that fired."""
    fired = []
    for step, value in enumerate(values):
        if det.feed(Metrics(step=step, values={metric: value})):
            fired.append(step)
    return fired


def test_fires_on_the_evaluation_after_patience_bad_ones() -> None:
    """With patience 2 the third bad evaluation in a row fires, then counting restarts."""
    det = PlateauDetector(PlateauParams(patience=2))
    assert feed_values(det, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == [3, 6]
    assert det.bad_evaluations == 0


def test_detection_names_best_and_count() -> None:
    """The detection carries the best value and the bad-evaluation count in reason and detail."""
    det = PlateauDetector(PlateauParams(patience=1))
    out = [d for v in (0.5, 0.6, 0.7) for d in det.feed(Metrics(step=10, values={"val_loss": v}))]
    assert len(out) == 1
    d = out[0]
    assert (d.detector, d.metric, d.value) == ("plateau", "val_loss", 0.7)
    assert d.detail == {"bad_evaluations": 2.0, "best": 0.5, "patience": 1.0}
    assert "best 0.5" in d.reason and "for 2 evaluations" in d.reason


def test_improvement_resets_the_count() -> None:
    """A value better than best by more than the threshold resets bad_evaluations to 0."""
    det = PlateauDetector(PlateauParams(patience=5))
    feed_values(det, [1.0, 1.0, 1.0])
    assert det.bad_evaluations == 2
    det.feed(Metrics(step=9, values={"val_loss": 0.5}))
    assert det.bad_evaluations == 0 and det.best == 0.5


def test_relative_threshold_requires_a_real_improvement() -> None:
    """In rel mode, 0.99995 is not better than 1.0 with threshold 1e-4, but 0.9998 is."""
    det = PlateauDetector()
    det.feed(Metrics(step=0, values={"val_loss": 1.0}))
    det.feed(Metrics(step=1, values={"val_loss": 0.99995}))
    assert det.bad_evaluations == 1 and det.best == 1.0
    det.feed(Metrics(step=2, values={"val_loss": 0.9998}))
    assert det.bad_evaluations == 0 and det.best == 0.9998


def test_max_mode_abs_threshold() -> None:
    """In max/abs mode a value must beat best + threshold to count as better."""
    det = PlateauDetector(
        PlateauParams(monitor="acc", mode="max", threshold=0.1, threshold_mode="abs")
    )
    feed_values(det, [0.5, 0.55, 0.61], metric="acc")
    assert det.best == 0.61 and det.bad_evaluations == 0
    feed_values(det, [0.7], metric="acc")
    assert det.bad_evaluations == 1


def test_cooldown_ignores_bad_evaluations() -> None:
    """After firing, cooldown evaluations do not count; the phase goes cooldown -> watching."""
    det = PlateauDetector(PlateauParams(patience=0, cooldown=2))
    assert det.phase is PlateauPhase.WARM_UP
    assert feed_values(det, [1.0, 1.0]) == [1]
    assert det.phase is PlateauPhase.COOLDOWN
    assert feed_values(det, [1.0, 1.0]) == []
    assert det.phase is PlateauPhase.WATCHING
    assert feed_values(det, [1.0]) == [0]


def test_absent_and_non_finite_values_are_not_evaluations() -> None:
    """Records without the metric, and NaN/±Inf values, leave best and the count untouched."""
    det = PlateauDetector(PlateauParams(patience=1))
    det.feed(Metrics(step=0, values={"val_loss": 1.0}))
    for step, values in enumerate(
        [{}, {"loss": 0.1}, {"val_loss": math.nan}, {"val_loss": -math.inf}, {"val_loss": None}],
        start=1,
    ):
        assert det.feed(Metrics(step=step, values=values)) == []  # type: ignore[arg-type]
    assert det.best == 1.0 and det.bad_evaluations == 0 and det.evaluations == 1


def test_skip_next_evaluation_keeps_an_outlier_out() -> None:
    """A skipped evaluation neither becomes best nor counts as bad; absent records don't consume it."""
    det = PlateauDetector(PlateauParams(patience=1))
    feed_values(det, [1.0, 1.0])  # one bad evaluation
    det.skip_next_evaluation()
    assert det.evaluations_to_skip == 1
    det.feed(Metrics(step=5, values={"loss": 3.0}))  # not an evaluation of val_loss
    assert det.evaluations_to_skip == 1
    assert det.feed(Metrics(step=6, values={"val_loss": 9.0})) == []  # the outlier: ignored
    assert det.bad_evaluations == 1 and det.evaluations_to_skip == 0
    det.skip_next_evaluation(2)
    feed_values(det, [0.1, 0.1])
    assert det.best == 1.0
    with pytest.raises(ValueError, match="count"):
        det.skip_next_evaluation(-1)


def test_skipping_the_spike_avoids_a_false_plateau() -> None:
    """pytorch#30873: without skipping, one outlier uses up patience; skipped, it does not."""
    series = [1.0, 0.9, 5.0, 0.85, 0.8]  # 5.0 is the outlier; 0.85 and 0.8 improve again
    plain = PlateauDetector(PlateauParams(patience=0))
    assert feed_values(plain, series) == [2]
    told = PlateauDetector(PlateauParams(patience=0))
    fired = []
    for step, value in enumerate(series):
        if step == 2:
            told.skip_next_evaluation()
        fired += told.feed(Metrics(step=step, values={"val_loss": value}))
    assert fired == []


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 2.0).map(lambda v: round(v, 2)), min_size=1, max_size=80),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.05]),
)
def test_matches_torch_reduce_lr_on_plateau(
    values: list[float],
    patience: int,
    cooldown: int,
    mode: Literal["min", "max"],
    threshold_mode: Literal["rel", "abs"],
    threshold: float,
) -> None:
    """The detector fires exactly where torch's ReduceLROnPlateau reduces, with the same counter."""
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode=mode,
        factor=0.5,
        patience=patience,
        threshold=threshold,
        threshold_mode=threshold_mode,
        cooldown=cooldown,
        eps=0.0,
    )
    det = PlateauDetector(
        PlateauParams(
            mode=mode,
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
        )
    )
    for step, value in enumerate(values):
        before = opt.param_groups[0]["lr"]
        sched.step(value)
        reduced = opt.param_groups[0]["lr"] < before
        fired = bool(det.feed(Metrics(step=step, values={"val_loss": value})))
        assert fired == reduced, step
        assert det.bad_evaluations == sched.num_bad_epochs
        assert det.cooldown_left == sched.cooldown_counter


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"monitor": ""}, "monitor"),
        ({"mode": "up"}, "mode"),
        ({"threshold_mode": "pct"}, "threshold_mode"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"threshold": "0.1"}, "threshold"),
        ({"patience": -1}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"cooldown": True}, "cooldown"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    """Each impossible parameter raises a ParamError naming it."""
    with pytest.raises(ParamError) as info:
        PlateauParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


values = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf]),
    st.floats(0.0, 1.0).map(lambda v: round(v, 1)),
)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(st.tuples(values, st.booleans()), max_size=60),
    cut=st.integers(0, 60),
)
def test_state_round_trip_at_any_cut(stream: list[tuple[float | None, bool]], cut: int) -> None:
    """A detector restored from a JSON snapshot at any point fires exactly like one that never stopped."""
    params = PlateauParams(patience=2, cooldown=1)
    cut = min(cut, len(stream))

    def run(
        det: PlateauDetector, part: list[tuple[float | None, bool]], offset: int
    ) -> list[object]:
        out: list[object] = []
        for i, (value, skip) in enumerate(part):
            if skip:
                det.skip_next_evaluation()
            rec = Metrics(step=offset + i, values={} if value is None else {"val_loss": value})
            out += [key(d) for d in det.feed(rec)]
        return out

    whole = PlateauDetector(params)
    expected = run(whole, stream, 0)
    first = PlateauDetector(params)
    got = run(first, stream[:cut], 0)
    second = PlateauDetector(params)
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    got += run(second, stream[cut:], cut)
    assert got == expected
    assert second.state_dict() == whole.state_dict()
