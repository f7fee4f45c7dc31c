"""The wire protocol: every message round-trips, non-finite floats travel as strings, every
decode error has its stable code and names the message type and field path."""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lrpilot._protocol import (
    PROTOCOL_VERSION,
    Ack,
    CheckpointNotice,
    Command,
    DecisionMsg,
    ErrorCode,
    ErrorMsg,
    Finished,
    Heartbeat,
    Hello,
    MetricsBatch,
    ProtocolError,
    Result,
    Resume,
    Welcome,
    decode,
    encode,
)

DECISION = {
    "id": 3,
    "kind": "set_lr",
    "apply_at_step": 1201,
    "source": "plateau",
    "reason": "val_loss stopped improving",
    "lrs": [0.01, 0.001],
}
SCHEDULE_DECISION = {
    "id": 4,
    "kind": "schedule",
    "apply_at_step": 0,
    "source": "cyclic",
    "reason": "policy start",
    "schedule": {"kind": "constant", "origin_step": 0, "params": {"lrs": [0.1]}},
}
ROLLBACK_DECISION = {
    "id": 5,
    "kind": "rollback",
    "apply_at_step": 900,
    "source": "divergence",
    "reason": "loss diverged",
    "lrs": [0.05],
    "rollback_to_step": 800,
    "skip_batches": 16,
    "actor": "alice",
}

MESSAGES = [
    Hello(
        job="mnist-a",
        lrs=(0.1, 0.01),
        run_id="r1",
        rank=1,
        world_size=2,
        momentums=(0.9, 0.9),
        policy={"kind": "reduce_on_plateau", "monitor": "val_loss"},
        labels={"team": "x"},
        client="lrpilot-py/0.1.0",
        resume=Resume(last_decision_id=3, last_step=1200),
    ),
    Hello(job="j", lrs=(0.1,)),
    Welcome(
        session="b1f3",
        job="mnist-a",
        lrs=(0.1, 0.01),
        policy={"kind": "reduce_on_plateau"},
        schedule={"kind": "constant", "origin_step": 0, "params": {"lrs": [0.1, 0.01]}},
        decisions=(DECISION, SCHEDULE_DECISION, ROLLBACK_DECISION),
    ),
    MetricsBatch(
        steps=[10, 11, 12],
        values={"loss": [0.5, 0.45, 0.4], "val_loss": [None, None, 0.6]},
        epochs=[0, 0, 1],
        times=[1.5, 1.6, None],
    ),
    MetricsBatch(steps=[], values={}),
    CheckpointNotice(step=1200),
    DecisionMsg(decision=DECISION),
    DecisionMsg(decision=SCHEDULE_DECISION),
    DecisionMsg(decision=ROLLBACK_DECISION),
    DecisionMsg(
        decision={"id": 6, "kind": "halt", "apply_at_step": 5, "source": "nan", "reason": ""}
    ),
    Ack(id=5, applied_at_step=1201),
    Heartbeat(step=1234),
    Heartbeat(),
    Finished(step=5000),
    ErrorMsg(code="bad_json", message="not valid JSON", ref=None),
    ErrorMsg(code="rate_limited", message="slow down", ref="metrics"),
    Command(command="status"),
    Command(command="set_lr", job="mnist-a", lrs=(0.01,), reason="manual", actor="alice"),
    Result(ok=True, data={"jobs": ["mnist-a"]}),
    Result(ok=False),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.type)
def test_round_trip(msg: object) -> None:
    """decode(encode(msg)) gives back an equal message for every message type."""
    text = encode(msg)  # type: ignore[arg-type]
    assert json.loads(text)["type"] == msg.type  # type: ignore[attr-defined]
    assert decode(text) == msg
    assert decode(text.encode()) == msg


def test_nonfinite_floats_are_sent_as_strings() -> None:
    """NaN and ±Inf leave encode as "NaN"/"Infinity"/"-Infinity", never as bare tokens."""
    text = encode(MetricsBatch(steps=[1, 2, 3], values={"loss": [math.nan, math.inf, -math.inf]}))
    assert json.loads(text)["values"]["loss"] == ["NaN", "Infinity", "-Infinity"]
    assert "NaN," not in text.replace('"NaN",', "")
    json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}"))


@pytest.mark.parametrize(
    "column",
    ['["NaN","Infinity","-Infinity"]', "[NaN,Infinity,-Infinity]", '[NaN,"Infinity",-Infinity]'],
)
def test_nonfinite_floats_are_decoded_from_strings_and_bare_tokens(column: str) -> None:
    """Both the string forms and the bare JSON-extension tokens decode to float NaN/±Inf."""
    msg = decode('{"type":"metrics","steps":[1,2,3],"values":{"loss":' + column + "}}")
    assert isinstance(msg, MetricsBatch)
    nan, pinf, ninf = msg.values["loss"]
    assert nan is not None and math.isnan(nan)
    assert pinf == math.inf and ninf == -math.inf


def test_nonfinite_in_times_column_and_hello_lrs() -> None:
    """Non-finite strings are accepted in the times column; a hello with a NaN LR is refused."""
    msg = decode('{"type":"metrics","steps":[1],"values":{},"times":["NaN"]}')
    assert isinstance(msg, MetricsBatch) and msg.times is not None
    assert math.isnan(msg.times[0])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=r"hello\.lrs\[0\]: expected a finite number"):
        decode('{"type":"hello","protocol":1,"job":"a","lrs":["NaN"]}')


def test_decision_message_round_trips_nonfinite_momentum_refusal() -> None:
    """A decision's LRs must be finite: a NaN LR is refused naming the field."""
    bad = dict(DECISION, lrs=["NaN"])
    with pytest.raises(ProtocolError, match=r"decision\.lrs\[0\]: expected a finite number"):
        decode(json.dumps({"type": "decision", **bad}))


def _code(text: str | bytes, **kwargs: int) -> tuple[str, str, str | None]:
    with pytest.raises(ProtocolError) as info:
        decode(text, **kwargs)
    err = info.value
    assert isinstance(err.code, ErrorCode)
    return err.code.value, err.message, err.ref


@pytest.mark.parametrize(
    ("text", "code", "message_part", "ref"),
    [
        ("{not json", "bad_json", "not valid JSON", None),
        (b"\xff\xfe", "bad_json", "not valid JSON", None),
        ("[1,2]", "bad_json", "expected a JSON object, got list", None),
        ('{"steps":[]}', "bad_message", 'no "type"', None),
        ('{"type":"nope"}', "unknown_type", "unknown message type 'nope'", "nope"),
        ('{"type":7}', "unknown_type", "unknown message type 7", None),
        (
            '{"type":"hello","protocol":2,"job":"a","lrs":[0.1]}',
            "protocol_version",
            "got 2",
            "hello",
        ),
        ('{"type":"hello","job":"a","lrs":[0.1]}', "protocol_version", "got None", "hello"),
        ('{"type":"welcome","protocol":"1"}', "protocol_version", "got '1'", "welcome"),
        (
            '{"type":"metrics","steps":[1,2,3,4],"values":{"loss":[1,2,3,"abc"]}}',
            "bad_message",
            "metrics.values.loss[3]: expected a number or null, got 'abc'",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1,2],"values":{"loss":[1]}}',
            "bad_message",
            "metrics.values.loss: has 1 entries but steps has 2",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1,2.5],"values":{}}',
            "bad_message",
            "metrics.steps[1]: expected an integer >= 0, got 2.5",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[true],"values":{}}',
            "bad_message",
            "metrics.steps[0]: expected an integer >= 0, got True",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[-1],"values":{}}',
            "bad_message",
            "metrics.steps[0]: expected an integer >= 0, got -1",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1]}',
            "bad_message",
            "metrics.values: expected an object",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1],"values":{"":[1]}}',
            "bad_message",
            "metrics.values: metric name '' must have",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1],"values":{},"epochs":[0.5]}',
            "bad_message",
            "metrics.epochs[0]: expected an integer or null, got 0.5",
            "metrics",
        ),
        (
            '{"type":"metrics","steps":[1],"values":{"a":[true]}}',
            "bad_message",
            "metrics.values.a[0]: expected a number or null, got True",
            "metrics",
        ),
        ('{"type":"checkpoint"}', "bad_message", "checkpoint.step: missing", "checkpoint"),
        ('{"type":"ack","id":0,"applied_at_step":3}', "bad_message", "ack.id: must be >= 1", "ack"),
        (
            '{"type":"heartbeat","step":"x"}',
            "bad_message",
            "heartbeat.step: expected an integer",
            "heartbeat",
        ),
        (
            '{"type":"finished","step":1.0}',
            "bad_message",
            "finished.step: expected an integer",
            "finished",
        ),
        ('{"type":"error","message":"m"}', "bad_message", "error.code: missing", "error"),
        (
            '{"type":"hello","protocol":1,"job":"../etc","lrs":[0.1]}',
            "bad_message",
            "hello.job: invalid job name",
            "hello",
        ),
        (
            '{"type":"hello","protocol":1,"job":"a","lrs":[0.1],"rank":2,"world_size":2}',
            "bad_message",
            "hello.rank: must be < world_size (2), got 2",
            "hello",
        ),
        (
            '{"type":"hello","protocol":1,"job":"a","lrs":[0.1],"momentums":[0.9,0.9]}',
            "bad_message",
            "hello.momentums: has 2 entries but lrs has 1",
            "hello",
        ),
        (
            '{"type":"hello","protocol":1,"job":"a","lrs":[]}',
            "bad_message",
            "hello.lrs: expected a non-empty list",
            "hello",
        ),
        (
            '{"type":"hello","protocol":1,"job":"a","lrs":[0.1],"labels":{"t":1}}',
            "bad_message",
            "hello.labels.t: expected a string, got 1",
            "hello",
        ),
        (
            '{"type":"hello","protocol":1,"job":"a","lrs":[0.1],"resume":{"last_step":"x"}}',
            "bad_message",
            "hello.resume.last_step: expected an integer, got 'x'",
            "hello",
        ),
        (
            '{"type":"welcome","protocol":1,"session":"s","job":"a","lrs":[0.1],"decisions":[{"id":1}]}',
            "bad_message",
            "welcome.decisions[0].kind: missing",
            "welcome",
        ),
        (
            '{"type":"decision","id":1,"kind":"warp","apply_at_step":1,"source":"x","reason":""}',
            "bad_message",
            "decision.kind: expected one of set_lr, schedule, halt, rollback, got 'warp'",
            "decision",
        ),
        (
            '{"type":"decision","id":1,"kind":"set_lr","apply_at_step":1,"source":"x","reason":""}',
            "bad_message",
            "decision.lrs: missing (a set_lr decision needs lrs)",
            "decision",
        ),
        (
            '{"type":"decision","id":1,"kind":"schedule","apply_at_step":1,"source":"x","reason":""}',
            "bad_message",
            "decision.schedule: missing",
            "decision",
        ),
        (
            '{"type":"decision","id":1,"kind":"rollback","apply_at_step":1,"source":"x","reason":""}',
            "bad_message",
            "decision.rollback_to_step: missing",
            "decision",
        ),
        (
            '{"type":"decision","id":1,"kind":"set_lr","apply_at_step":1,"source":"x","reason":"","lrs":[-1]}',
            "bad_message",
            "decision.lrs: learning rates must be >= 0",
            "decision",
        ),
        (
            '{"type":"command","command":"explode"}',
            "bad_message",
            "command.command: expected one of",
            "command",
        ),
        ('{"type":"command","command":"pause"}', "bad_message", "command.job: missing", "command"),
        (
            '{"type":"command","command":"set_lr","job":"a"}',
            "bad_message",
            "command.lrs: missing",
            "command",
        ),
        ('{"type":"result","ok":1}', "bad_message", "result.ok: expected true or false", "result"),
    ],
)
def test_decode_errors(text: str, code: str, message_part: str, ref: str | None) -> None:
    """Each malformed frame raises ProtocolError with the right code, field path and ref."""
    got_code, message, got_ref = _code(text)
    assert got_code == code
    assert message_part in message
    assert got_ref == ref


def test_frame_too_large() -> None:
    """decode refuses a frame larger than max_bytes with frame_too_large before parsing it."""
    code, message, _ = _code('{"type":"heartbeat"}' + " " * 100, max_bytes=64)
    assert code == "frame_too_large"
    assert "limit is 64" in message


def test_every_error_code_is_a_stable_string() -> None:
    """The error codes are exactly the ones the protocol documents."""
    assert {c.value for c in ErrorCode} == {
        "bad_json",
        "bad_message",
        "unknown_type",
        "protocol_version",
        "not_hello",
        "unauthorized",
        "forbidden",
        "frame_too_large",
        "too_many_jobs",
        "too_many_metrics",
        "rate_limited",
        "unknown_job",
        "internal",
    }
    err = ProtocolError(ErrorCode.TOO_MANY_JOBS, "limit 1000 reached", "hello")
    assert err.to_message() == ErrorMsg(
        code="too_many_jobs", message="limit 1000 reached", ref="hello"
    )
    assert decode(encode(err.to_message())).to_exception().code is ErrorCode.TOO_MANY_JOBS  # type: ignore[union-attr]
    assert ProtocolError("future_code", "m").code == "future_code"


def test_unknown_fields_are_ignored() -> None:
    """A newer peer's extra fields do not break decoding."""
    msg = decode('{"type":"ack","id":2,"applied_at_step":7,"extra":{"x":1}}')
    assert msg == Ack(id=2, applied_at_step=7)


def test_protocol_version_constant() -> None:
    """This module speaks protocol version 1 and says so in hello."""
    assert PROTOCOL_VERSION == 1
    assert json.loads(encode(Hello(job="a", lrs=(0.1,))))["protocol"] == 1


def test_decode_of_a_metrics_frame_does_no_per_point_python_work() -> None:
    """Validating a columnar frame checks whole columns at C level (``set(map(type, ...))``):
    a 1000-point frame makes exactly as many function calls as a 10-point one. (Its speed
    against ``json.loads`` is measured in bench/bench_daemon.py, not timed here.)"""

    def calls_to_decode(n: int) -> int:
        msg = MetricsBatch(
            steps=list(range(n)),
            values={"loss": [0.5 + i * 1e-4 for i in range(n)], "val_loss": [None] * n},
            times=[1.0e9 + i for i in range(n)],
        )
        text = encode(msg)
        count = 0

        def profile(frame: object, event: str, arg: object) -> None:
            nonlocal count
            if event in ("call", "c_call"):
                count += 1

        sys.setprofile(profile)
        try:
            decoded = decode(text)
        finally:
            sys.setprofile(None)
        assert isinstance(decoded, MetricsBatch) and len(decoded.steps) == n
        return count

    assert calls_to_decode(1000) == calls_to_decode(10)


# --------------------------------------------------------------------------- fuzzing

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_field_names = st.sampled_from(
    ["type", "steps", "values", "epochs", "times", "job", "lrs", "protocol", "id", "kind",
     "apply_at_step", "source", "reason", "schedule", "decisions", "session", "step", "rank",
     "world_size", "resume", "labels", "command", "ok", "data", "code", "message", "momentums",
     "rollback_to_step", "applied_at_step"]
)  # fmt: skip
_types = st.sampled_from(
    ["hello", "welcome", "metrics", "checkpoint", "decision", "ack", "heartbeat", "finished",
     "error", "command", "result"]
)  # fmt: skip


@st.composite
def _messages(draw: st.DrawFn) -> str:
    obj = draw(st.dictionaries(_field_names, _json, max_size=8))
    if draw(st.booleans()):
        obj["type"] = draw(_types)
    if draw(st.booleans()):
        obj["protocol"] = 1
    return json.dumps(obj)


@settings(max_examples=400, deadline=None)
@given(_messages())
def test_fuzz_structured_messages_only_raise_protocol_error(text: str) -> None:
    """decode of a random object with plausible field names returns a message or raises ProtocolError."""
    try:
        decode(text)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_fuzz_arbitrary_text_only_raises_protocol_error(text: str | bytes) -> None:
    """decode of arbitrary text or bytes never raises anything but ProtocolError."""
    try:
        decode(text)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**40), max_size=20).flatmap(
        lambda steps: st.tuples(
            st.just(steps),
            st.dictionaries(
                st.text(min_size=1, max_size=10),
                st.lists(st.none() | st.floats(), min_size=len(steps), max_size=len(steps)),
                max_size=3,
            ),
        )
    )
)
def test_fuzz_metrics_round_trip(data: tuple[list[int], dict[str, list[float | None]]]) -> None:
    """Any metrics batch with any floats (NaN included) survives encode then decode."""
    steps, values = data
    got = decode(encode(MetricsBatch(steps=steps, values=values)))
    assert isinstance(got, MetricsBatch)
    assert got.steps == steps
    assert set(got.values) == set(values)
    for name, column in values.items():
        for a, b in zip(column, got.values[name], strict=True):
            assert (a is None and b is None) or (
                a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
            )
