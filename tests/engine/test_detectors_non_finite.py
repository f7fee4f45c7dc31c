"""The non_finite detector: every NaN/±Inf of a watched metric fires, nothing else does."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.detectors.non_finite import NonFiniteDetector, NonFiniteParams
from monitor.engine.events import Detection, Metrics


def key(d: Detection) -> tuple[object, ...]:
    return (d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items()))


def test_defaults_watch_loss_val_loss_and_grad_norm() -> None:
    """The default watch list is loss, val_loss and grad_norm."""
    assert NonFiniteDetector().monitored() == ("loss", "val_loss", "grad_norm")
    assert NonFiniteDetector.name == "non_finite"


def test_fires_once_per_non_finite_metric() -> None:
    """A record with NaN loss and -Inf grad_norm fires two detections, in watch-list order."""
    det = NonFiniteDetector()
    out = det.feed(
        Metrics(step=7, values={"loss": math.nan, "grad_norm": -math.inf, "val_loss": 0.3})
    )
    assert [(d.metric, d.step) for d in out] == [("loss", 7), ("grad_norm", 7)]
    assert all(d.detector == "non_finite" for d in out)
    assert out[0].reason == "loss is NaN at step 7"
    assert out[1].reason == "grad_norm is -Inf at step 7"
    assert math.isnan(out[0].value) and out[1].value == -math.inf


def test_finite_absent_and_unwatched_values_are_quiet() -> None:
    """Finite values, absent or None metrics and unwatched NaN metrics fire nothing."""
    det = NonFiniteDetector()
    assert det.feed(Metrics(step=1, values={"loss": 1e30, "val_loss": -2.0})) == []
    assert det.feed(Metrics(step=2, values={})) == []
    assert det.feed(Metrics(step=3, values={"loss": None})) == []  # type: ignore[dict-item]
    assert det.feed(Metrics(step=4, values={"accuracy": math.nan})) == []


def test_counts_consecutive_and_total() -> None:
    """Consecutive counts survive absent records, reset on a finite value; totals only grow."""
    det = NonFiniteDetector(NonFiniteParams(metrics=("loss",)))
    det.feed(Metrics(step=1, values={"loss": math.inf}))
    det.feed(Metrics(step=2, values={}))
    second = det.feed(Metrics(step=3, values={"loss": math.nan}))[0]
    assert second.detail == {"consecutive": 2.0, "total": 2.0}
    assert "2nd non-finite value in a row" in second.reason
    det.feed(Metrics(step=4, values={"loss": 0.5}))
    third = det.feed(Metrics(step=5, values={"loss": math.nan}))[0]
    assert third.detail == {"consecutive": 1.0, "total": 3.0}
    assert det.totals == {"loss": 3}


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ((), "metrics"),
        (("loss", ""), "metrics[1]"),
        (("loss", "loss"), "metrics"),
        ("loss", "metrics"),
    ],
)
def test_bad_params_name_the_field(metrics: object, field: str) -> None:
    """An empty list, an empty name, a duplicate or a bare string is a ParamError naming the field."""
    with pytest.raises(ParamError) as info:
        NonFiniteParams(metrics=metrics)  # type: ignore[arg-type]
    assert info.value.field == field


def test_list_of_metrics_becomes_a_tuple() -> None:
    """A list (as YAML gives it) is accepted and stored as a tuple."""
    assert NonFiniteParams(metrics=["loss"]).metrics == ("loss",)  # type: ignore[arg-type]


values = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(-10.0, 10.0),
)
records = st.lists(
    st.fixed_dictionaries({}, optional={"loss": values, "grad_norm": values}), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(stream=records, cut=st.integers(0, 60))
def test_state_round_trip_at_any_cut(stream: list[dict[str, float | None]], cut: int) -> None:
    """A detector restored from a JSON snapshot at any point fires exactly like one that never stopped."""
    cut = min(cut, len(stream))
    feed = [
        Metrics(step=i, values={k: v for k, v in r.items() if v is not None})
        for i, r in enumerate(stream)
    ]
    whole = NonFiniteDetector()
    expected = [key(d) for rec in feed for d in whole.feed(rec)]
    first = NonFiniteDetector()
    got = [key(d) for rec in feed[:cut] for d in first.feed(rec)]
    snapshot = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    second = NonFiniteDetector()
    second.load_state_dict(snapshot)
    got += [key(d) for rec in feed[cut:] for d in second.feed(rec)]
    assert got == expected
    assert second.state_dict() == whole.state_dict()
