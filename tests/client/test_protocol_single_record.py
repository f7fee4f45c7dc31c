"""A one-record metrics frame (the daemon's commonest) takes its own short checks, and a frame's
text goes straight to the JSON scanner: what they accept and refuse, and the errors, are
those of the general path."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lrpilot._protocol import MetricsBatch, ProtocolError, decode

#: JSON values a peer may put where a step or a metric value goes
_ENTRIES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1.0", ""]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _outcome(text: str) -> tuple[str, Any]:
    try:
        return "ok", decode(text)
    except ProtocolError as exc:
        return "error", (exc.code, exc.message, exc.ref)


def _same_values(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> bool:
    def key(x: Any) -> Any:
        return ("nan",) if isinstance(x, float) and math.isnan(x) else (type(x), x)

    return a.keys() == b.keys() and all([key(x) for x in a[k]] == [key(x) for x in b[k]] for k in a)


@settings(max_examples=400, deadline=None)
@given(step=_ENTRIES, value=_ENTRIES, time=st.one_of(st.just(None), _ENTRIES))
def test_one_record_is_checked_as_the_same_record_twice(step: Any, value: Any, time: Any) -> None:
    """A one-record frame is accepted exactly when the frame holding that record twice is
    (which takes the general checks), with the same values, and refused with the same
    error (the first bad entry is at index 0 in both)."""
    one: dict[str, Any] = {"type": "metrics", "steps": [step], "values": {"loss": [value]}}
    two: dict[str, Any] = {
        "type": "metrics",
        "steps": [step, step],
        "values": {"loss": [value, value]},
    }
    if time is not None:
        one["times"], two["times"] = [time], [time, time]
    kind_one, got_one = _outcome(json.dumps(one))
    kind_two, got_two = _outcome(json.dumps(two))
    assert kind_one == kind_two
    if kind_one == "error":
        assert got_one == got_two
        return
    assert isinstance(got_one, MetricsBatch) and isinstance(got_two, MetricsBatch)
    assert got_one.steps == got_two.steps[:1]
    assert _same_values(got_one.values, {k: v[:1] for k, v in got_two.values.items()})
    if time is not None:
        assert got_one.times is not None and got_two.times is not None
        assert _same_values({"t": got_one.times}, {"t": got_two.times[:1]})


def test_a_one_record_frame_converts_non_finite_strings_and_keeps_ints_and_gaps() -> None:
    """The strings NaN/Infinity/-Infinity become floats; ints (even beyond a float's range)
    and null stay as they are."""
    batch = decode(
        '{"type":"metrics","steps":[3],"values":{"a":["NaN"],"b":["-Infinity"],'
        f'"c":[{10**400}],"d":[null],"e":[7]}}}}'
    )
    assert isinstance(batch, MetricsBatch)
    assert math.isnan(batch.values["a"][0]) and batch.values["b"] == [-math.inf]
    assert batch.values["c"] == [10**400] and batch.values["d"] == [None]
    assert batch.values["e"] == [7] and type(batch.values["e"][0]) is int
    assert batch.steps == [3] and batch.epochs is None and batch.times is None
    assert batch.type == "metrics"


def test_a_one_record_frame_refuses_bools_with_the_field_path() -> None:
    """true is not a step nor a value, even where a C check would take it for 1."""
    for text, path in [
        ('{"type":"metrics","steps":[true],"values":{}}', "metrics.steps[0]"),
        ('{"type":"metrics","steps":[1],"values":{"a":[false]}}', "metrics.values.a[0]"),
        ('{"type":"metrics","steps":[1],"values":{"a":[1.0]},"times":[true]}', "metrics.times[0]"),
    ]:
        kind, got = _outcome(text)
        assert kind == "error" and got[0].value == "bad_message" and got[1].startswith(path)


@given(
    frame=st.sampled_from(
        [
            '{"type":"metrics","steps":[1],"values":{"a":[0.5]}}',
            '{"type":"heartbeat","step":4}',
            '{"type":"ack","id":2,"applied_at_step":9}',
        ]
    ),
    before=st.sampled_from(["", " ", "\n", "\t \r\n"]),
    after=st.sampled_from(["", " ", "\n", "\t \r\n"]),
)
def test_whitespace_around_the_json_is_accepted(frame: str, before: str, after: str) -> None:
    """The text's JSON may have whitespace around it, as json.loads allows."""
    assert decode(before + frame + after) == decode(frame) == decode(frame.encode())


def test_what_is_not_one_json_object_is_refused_as_json_loads_says() -> None:
    """Trailing data, a byte order mark, a value that is not an object, an unterminated
    string: bad_json, with json's own explanation."""
    cases = {
        '{"type":"heartbeat"} {}': "Extra data",
        '\ufeff{"type":"heartbeat"}': "Unexpected UTF-8 BOM",
        '[{"type":"heartbeat"}]': "expected a JSON object, got list",
        '"heartbeat"': "expected a JSON object, got str",
        '{"type":"heartbeat': "Unterminated string",
        "": "Expecting value",
        "null": "expected a JSON object, got NoneType",
    }
    for text, reason in cases.items():
        kind, got = _outcome(text)
        assert kind == "error", text
        assert got[0].value == "bad_json" and reason in got[1], (text, got)


def test_a_decoded_batch_equals_one_built_by_its_constructor() -> None:
    """decode builds MetricsBatch through its slots; every field is set, as the constructor
    would set it (a field added to MetricsBatch and not to the decoder fails here)."""
    text = json.dumps(
        {
            "type": "metrics",
            "steps": [3, 4],
            "values": {"loss": [0.5, None]},
            "epochs": [0, 1],
            "times": [1.5, 2.5],
        }
    )
    built = MetricsBatch(
        steps=[3, 4], values={"loss": [0.5, None]}, epochs=[0, 1], times=[1.5, 2.5]
    )
    assert decode(text) == built
    assert repr(decode(text)) == repr(built)
    one = decode(json.dumps({"type": "metrics", "steps": [7], "values": {"loss": [1.0]}}))
    assert one == MetricsBatch(steps=[7], values={"loss": [1.0]})
    assert one.type == "metrics"
