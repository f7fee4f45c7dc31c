"""A metrics frame's columns are checked by C loops when its text cannot hold a bool; the
frames they accept and refuse, and the errors, are those of the checks one entry at a time."""

from __future__ import annotations

import json

import pytest
from lrpilot._protocol import MetricsBatch, ProtocolError, decode


def _frame(steps: object, values: object, **extra: object) -> str:
    return json.dumps({"type": "metrics", "steps": steps, "values": values, **extra})


@pytest.mark.parametrize(
    ("steps", "values", "message"),
    [
        ([1, 2.0], {}, "metrics.steps[1]: expected an integer >= 0, got 2.0"),
        ([1, None], {}, "metrics.steps[1]: expected an integer >= 0, got None"),
        ([1, -2], {}, "metrics.steps[1]: expected an integer >= 0, got -2"),
        ([0, "3"], {}, "metrics.steps[1]: expected an integer >= 0, got '3'"),
        ([0, [1]], {}, "metrics.steps[1]: expected an integer >= 0, got [1]"),
        ([0, 1], {"loss": [1.0, "abc"]}, "metrics.values.loss[1]: expected a number or null, got 'abc'"),
        ([0, 1], {"loss": [1.0, [2.0]]}, "metrics.values.loss[1]: expected a number or null, got [2.0]"),
        ([0, 1], {"loss": [{}, 2.0]}, "metrics.values.loss[0]: expected a number or null, got {}"),
    ],
)
def test_a_frame_without_bools_is_refused_as_before(
    steps: list[object], values: dict[str, object], message: str
) -> None:
    """Without true or false in its text, a frame takes the C checks: what they refuse
    still fails with the field path and the message type."""
    text = _frame(steps, values)
    assert "true" not in text and "false" not in text
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code.value == "bad_message"
    assert info.value.ref == "metrics"
    assert message in info.value.message


def test_bools_are_refused_whatever_else_the_text_holds() -> None:
    """A bool in the steps or a column is refused, also in a frame whose metric names or
    other values spell true or false (the C checks would take a bool for an int)."""
    for steps, values, message in (
        ([0, True], {"truely": [1.0, 2.0]}, "metrics.steps[1]: expected an integer >= 0, got True"),
        ([0, 1], {"false_alarm": [1.0, False]}, "metrics.values.false_alarm[1]: expected a number or null, got False"),
    ):
        with pytest.raises(ProtocolError) as info:
            decode(_frame(steps, values))
        assert message in info.value.message


def test_a_name_spelling_true_does_not_change_what_is_accepted() -> None:
    """A frame whose text has "true" only in a metric name decodes to the same batch."""
    a = decode(_frame([3, 4], {"loss": [0.5, None], "times": [1.0, "NaN"]}))
    b = decode(_frame([3, 4], {"true_loss": [0.5, None], "times": [1.0, "NaN"]}))
    assert isinstance(a, MetricsBatch) and isinstance(b, MetricsBatch)
    assert a.steps == b.steps == [3, 4]
    assert a.values["loss"] == b.values["true_loss"] == [0.5, None]


def test_ints_too_large_for_the_c_checks_are_still_accepted() -> None:
    """A step beyond 64 bits and a value beyond a float's range are accepted, as before."""
    msg = decode(_frame([2**70, 2**70 + 1], {"count": [2**1100, 3], "loss": [1, 2.5]}))
    assert isinstance(msg, MetricsBatch)
    assert msg.steps == [2**70, 2**70 + 1]
    assert msg.values["count"] == [2**1100, 3]
    assert msg.values["loss"] == [1, 2.5]


def test_non_finite_strings_and_gaps_are_converted_with_or_without_bools() -> None:
    """A column with a gap or a non-finite string takes the entry-by-entry path."""
    for extra in ({}, {"flag_true": [1.0, 1.0]}):
        msg = decode(_frame([0, 1], {"loss": ["Infinity", None], **extra}))
        assert isinstance(msg, MetricsBatch)
        assert msg.values["loss"] == [float("inf"), None]


def test_utf16_bytes_holding_a_bool_are_refused() -> None:
    """JSON bytes in UTF-16 spell true otherwise: bytes always take the full checks."""
    text = '{"type":"metrics","steps":[true],"values":{}}'
    with pytest.raises(ProtocolError, match=r"steps\[0\]"):
        decode(text.encode("utf-16"))
