"""The lrpilot wire protocol, version 1: message types, ``encode`` and ``decode``.

Both sides import this module: the training-side client (``lrpilot``) and the daemon
(``monitor``). It is sans-I/O: text goes in through :func:`decode`, which returns one
immutable message object or raises :class:`ProtocolError`; message objects go out through
:func:`encode`, which returns the JSON text of one websocket frame. The full specification
for writers of other clients is ``docs/protocol.md``.

Messages and direction (c = training client, d = daemon, o = operator)::

    hello       c -> d   first message of a job connection (may carry ``resume``)
    welcome     d -> c   answer to hello: session, effective policy, missed decisions
    metrics     c -> d   columnar batch of many steps
    checkpoint  c -> d   the job saved a good checkpoint
    decision    d -> c   one LR decision (set_lr | schedule | halt | rollback)
    ack         c -> d   the job applied a decision at ``applied_at_step``
    heartbeat   c <-> d  liveness; never answered
    finished    c -> d   the job ended normally
    error       d -> c   something the peer sent was refused (stable ``code``)
    command     o -> d   operator command (status, jobs, show, set_lr, pause, resume)
    result      d -> o   answer to a command

Non-finite floats travel as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``;
:func:`decode` also accepts the bare ``NaN``/``Infinity`` tokens some JSON writers emit.
Unknown fields are ignored (a newer peer may add optional fields without a version bump).

``decode`` of a ``metrics`` frame is the daemon's hot path: the text goes straight to the C
JSON scanner (``json.loads`` only for what it does not take whole), columns are checked by C
loops (the steps by one unsigned 64-bit ``array``, a metric column by one ``sum``, when the
frame's text has no ``true``/``false``; else, or when those refuse it, by
``set(map(type, column))``), a frame of one record by one type test per entry, and only
walked element by element in Python when they hold a non-finite string or something invalid,
to build the error message.
"""

from __future__ import annotations

import enum
import json
import math
import re
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMANDS",
    "DECISION_KINDS",
    "JOB_NAME_PATTERN",
    "MAX_METRIC_NAME_LENGTH",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Ack",
    "CheckpointNotice",
    "Command",
    "DecisionMsg",
    "ErrorCode",
    "ErrorMsg",
    "Finished",
    "Heartbeat",
    "Hello",
    "Message",
    "MetricsBatch",
    "ProtocolError",
    "Result",
    "Resume",
    "Welcome",
    "decode",
    "encode",
    "encode_metrics",
    "validate_decision",
]

PROTOCOL_VERSION = 1

#: job names are used in file names, URLs and Prometheus labels, so they are restricted
JOB_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
MAX_METRIC_NAME_LENGTH = 128
DECISION_KINDS = ("set_lr", "schedule", "halt", "rollback")
COMMANDS = ("status", "jobs", "show", "set_lr", "pause", "resume")
_COMMANDS_NEEDING_JOB = frozenset({"show", "set_lr", "pause", "resume"})


class ErrorCode(str, enum.Enum):
    """The stable ``code`` of an ``error`` message. Clients may branch on these values."""

    BAD_JSON = "bad_json"  # the frame is not UTF-8 JSON text holding an object
    BAD_MESSAGE = "bad_message"  # a field is missing or has the wrong type or value
    UNKNOWN_TYPE = "unknown_type"  # "type" names no message of this protocol version
    PROTOCOL_VERSION = "protocol_version"  # hello asked for a protocol version we do not speak
    NOT_HELLO = "not_hello"  # a job connection sent something before its hello
    UNAUTHORIZED = "unauthorized"  # missing or unknown bearer token
    FORBIDDEN = "forbidden"  # the token may not act on this job / run this command
    FRAME_TOO_LARGE = "frame_too_large"  # the frame exceeds the daemon's max_frame_bytes
    TOO_MANY_JOBS = "too_many_jobs"  # the daemon's max_jobs limit is reached
    TOO_MANY_METRICS = "too_many_metrics"  # a job reports more metric names than allowed
    RATE_LIMITED = "rate_limited"  # more messages per second than allowed
    UNKNOWN_JOB = "unknown_job"  # an operator command names a job the daemon does not know
    INTERNAL = "internal"  # a bug in the daemon; the message was not processed


class ProtocolError(Exception):
    """A frame could not be decoded, or a peer reported an error.

    ``code`` is an :class:`ErrorCode` value, ``message`` a sentence naming the message type
    and field path, ``ref`` the offending message's ``type`` (or None if it had none).
    """

    def __init__(self, code: ErrorCode | str, message: str, ref: str | None = None) -> None:
        self.code = ErrorCode(code) if code in _CODE_VALUES else code
        self.message = message
        self.ref = ref
        super().__init__(f"{_code_str(self.code)}: {message}")

    def to_message(self) -> ErrorMsg:
        """The ``error`` message a daemon sends back for this error."""
        return ErrorMsg(code=_code_str(self.code), message=self.message, ref=self.ref)


_CODE_VALUES = frozenset(c.value for c in ErrorCode) | frozenset(ErrorCode)


def _code_str(code: ErrorCode | str) -> str:
    return code.value if isinstance(code, ErrorCode) else str(code)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Resume:
    """What a reconnecting client already has: decisions up to ``last_decision_id`` (None:
    none yet) and metrics up to ``last_step`` (None: none yet)."""

    last_decision_id: int | None = None
    last_step: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"last_decision_id": self.last_decision_id, "last_step": self.last_step}


@dataclass(frozen=True, slots=True)
class Hello:
    """First message of a job connection."""

    job: str
    lrs: tuple[float, ...]
    run_id: str | None = None
    rank: int = 0
    world_size: int = 1
    momentums: tuple[float, ...] | None = None
    policy: Mapping[str, Any] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    client: str | None = None
    resume: Resume | None = None
    total_steps: int | None = None
    protocol: int = PROTOCOL_VERSION
    type: str = field(default="hello", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "protocol": self.protocol,
            "job": self.job,
            "run_id": self.run_id,
            "rank": self.rank,
            "world_size": self.world_size,
            "lrs": list(self.lrs),
            "momentums": None if self.momentums is None else list(self.momentums),
            "policy": None if self.policy is None else dict(self.policy),
            "labels": dict(self.labels),
            "client": self.client,
            "resume": None if self.resume is None else self.resume.to_wire(),
            "total_steps": self.total_steps,
        }


@dataclass(frozen=True, slots=True)
class Welcome:
    """The daemon accepted a hello. ``decisions`` are those after the client's
    ``resume.last_decision_id`` (or all of the job's decisions on a first hello), oldest first."""

    session: str
    job: str
    lrs: tuple[float, ...]
    policy: Mapping[str, Any] | None = None
    schedule: Mapping[str, Any] | None = None
    decisions: tuple[Mapping[str, Any], ...] = ()
    protocol: int = PROTOCOL_VERSION
    type: str = field(default="welcome", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "welcome",
            "protocol": self.protocol,
            "session": self.session,
            "job": self.job,
            "policy": None if self.policy is None else dict(self.policy),
            "lrs": list(self.lrs),
            "schedule": None if self.schedule is None else dict(self.schedule),
            "decisions": [dict(d) for d in self.decisions],
        }


@dataclass(frozen=True, slots=True)
class MetricsBatch:
    """Metrics of many steps, one column per metric name.

    Every column has ``len(steps)`` entries; None means "not reported at that step".
    ``epochs`` and ``times`` are optional columns of the same length.
    """

    steps: list[int]
    values: dict[str, list[float | None]]
    epochs: list[int | None] | None = None
    times: list[float | None] | None = None
    type: str = field(default="metrics", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "metrics", "steps": self.steps, "values": self.values}
        if self.epochs is not None:
            out["epochs"] = self.epochs
        if self.times is not None:
            out["times"] = self.times
        return out


@dataclass(frozen=True, slots=True)
class CheckpointNotice:
    """The job saved a good checkpoint at ``step``."""

    step: int
    type: str = field(default="checkpoint", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "checkpoint", "step": self.step}


@dataclass(frozen=True, slots=True)
class DecisionMsg:
    """One decision, as the validated dict of ``Decision.to_dict()`` fields (no ``type``)."""

    decision: Mapping[str, Any]
    type: str = field(default="decision", init=False, repr=False)

    @property
    def id(self) -> int:
        return int(self.decision["id"])

    def to_wire(self) -> dict[str, Any]:
        return {"type": "decision", **self.decision}


@dataclass(frozen=True, slots=True)
class Ack:
    """The job applied decision ``id`` at ``applied_at_step``."""

    id: int
    applied_at_step: int
    type: str = field(default="ack", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "ack", "id": self.id, "applied_at_step": self.applied_at_step}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness. ``step`` is the sender's last step, if it has one."""

    step: int | None = None
    type: str = field(default="heartbeat", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "heartbeat", "step": self.step}


@dataclass(frozen=True, slots=True)
class Finished:
    """The job ended normally at ``step``."""

    step: int | None = None
    type: str = field(default="finished", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "finished", "step": self.step}


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """The daemon refused something. ``ref`` is the ``type`` of the refused message."""

    code: str
    message: str
    ref: str | None = None
    type: str = field(default="error", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message, "ref": self.ref}

    def to_exception(self) -> ProtocolError:
        return ProtocolError(self.code, self.message, self.ref)


@dataclass(frozen=True, slots=True)
class Command:
    """An operator command. ``job`` is required for show/set_lr/pause/resume, ``lrs`` for set_lr."""

    command: str
    job: str | None = None
    lrs: tuple[float, ...] | None = None
    reason: str | None = None
    actor: str | None = None
    type: str = field(default="command", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "command", "command": self.command}
        if self.job is not None:
            out["job"] = self.job
        if self.lrs is not None:
            out["lrs"] = list(self.lrs)
        if self.reason is not None:
            out["reason"] = self.reason
        if self.actor is not None:
            out["actor"] = self.actor
        return out


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to a command."""

    ok: bool
    data: Mapping[str, Any] | None = None
    type: str = field(default="result", init=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "result",
            "ok": self.ok,
            "data": None if self.data is None else dict(self.data),
        }


Message = (
    Hello
    | Welcome
    | MetricsBatch
    | CheckpointNotice
    | DecisionMsg
    | Ack
    | Heartbeat
    | Finished
    | ErrorMsg
    | Command
    | Result
)


# --------------------------------------------------------------------------- encode

_NONFINITE_STR = {math.inf: "Infinity", -math.inf: "-Infinity"}


def _wire_float(x: float) -> float | str:
    if x != x:
        return "NaN"
    return _NONFINITE_STR.get(x, x)


def _sanitize(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by its string form."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _wire_float(obj)
    if isinstance(obj, Mapping):
        return {k: _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


# What json.dumps(obj, allow_nan=False, separators=(",", ":")) builds on every call; made once,
# the same text comes out without building an encoder per frame (the client's sender thread
# encodes one frame per wake-up, with cold caches, where every Python call layer counts).
# JSONEncoder keeps no state between calls, so threads can share it.
_encode_json = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def encode(msg: Message) -> str:
    """The JSON text of one frame carrying ``msg``. Never emits bare NaN/Infinity."""
    wire = msg.to_wire()
    try:
        # fast path: nearly every frame is all finite; allow_nan=False tells us when it is not
        return _encode_json(wire)
    except ValueError:
        return json.dumps(_sanitize(wire), allow_nan=False, separators=(",", ":"))


_encode_name = json.encoder.encode_basestring_ascii  # what encode() writes a key with


def encode_metrics(
    steps: Sequence[int], values: Mapping[str, Sequence[float]], last_time: float
) -> str:
    """``encode(MetricsBatch(steps=steps, values=values, times=[None, ..., None, last_time]))``,
    the same text, written directly: the time of the last row only (docs/protocol.md).

    ``steps`` must be ints and the columns floats (float subclasses too), else TypeError
    (the caller converts, or takes the general path). The client's sender thread encodes one
    such frame per wake-up with cold caches, where every object built and every Python layer
    counts: this builds no message, dict or lists, and turns each column into text with one
    C join of ``float.__repr__`` (what the json module writes for a finite float). A frame
    with a NaN or ±Inf goes through :func:`encode`, which writes those as strings.
    """
    steps_text = ",".join(map(int.__repr__, steps))
    columns = []
    finite = True
    for name, column in values.items():
        text = ",".join(map(float.__repr__, column))
        if "n" in text:  # nan, inf, -inf: the only reprs of a float with an "n"
            finite = False
        columns.append(_encode_name(name) + ":[" + text + "]")
    if not finite:
        times: list[float | None] = [None] * (len(steps) - 1)
        times.append(last_time)
        wire: dict[str, list[float | None]] = {k: list(v) for k, v in values.items()}
        return encode(MetricsBatch(steps=list(map(int, steps)), values=wire, times=times))
    return "".join(
        [
            '{"type":"metrics","steps":[',
            steps_text,
            '],"values":{',
            ",".join(columns),
            '},"times":[',
            "null," * (len(steps) - 1),
            float.__repr__(last_time),
            "]}",
        ]
    )


# --------------------------------------------------------------------------- decode

_NONFINITE_FROM_STR = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NUM_TYPES = frozenset({int, float})
_NUM_OR_NONE = frozenset({int, float, type(None)})
_INT_OR_NONE = frozenset({int, type(None)})


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed access to the fields of one message object, with errors naming the path."""

    __slots__ = ("obj", "prefix", "type")

    def __init__(self, obj: dict[str, Any], type_: str, prefix: str = "") -> None:
        self.obj = obj
        self.type = type_
        self.prefix = prefix  # the path of obj inside the message, ending in "."

    def fail(self, path: str, message: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{self.type}.{self.prefix}{path}: {message}", self.type
        )

    def get_int(self, name: str, *, optional: bool = False, minimum: int | None = 0) -> Any:
        value = self.obj.get(name)
        if value is None:
            if optional:
                return None
            raise self.fail(name, "missing (expected an integer)")
        if type(value) is not int:
            raise self.fail(name, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(name, f"must be >= {minimum}, got {value}")
        return value

    def get_str(self, name: str, *, optional: bool = False, nonempty: bool = True) -> Any:
        value = self.obj.get(name)
        if value is None:
            if optional:
                return None
            raise self.fail(name, "missing (expected a string)")
        if type(value) is not str:
            raise self.fail(name, f"expected a string, got {_show(value)}")
        if nonempty and not value:
            raise self.fail(name, "must not be empty")
        return value

    def job(self, name: str = "job", *, optional: bool = False) -> Any:
        value = self.get_str(name, optional=optional)
        if value is not None and JOB_NAME_PATTERN.fullmatch(value) is None:
            raise self.fail(
                name,
                f"invalid job name {_show(value)}: use 1-128 of A-Z a-z 0-9 _ . - "
                "(not starting with . or -)",
            )
        return value

    def obj_or_none(self, name: str) -> dict[str, Any] | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if type(value) is not dict:
            raise self.fail(name, f"expected an object or null, got {_show(value)}")
        return value

    def floats(
        self, name: str, *, optional: bool = False, finite: bool = True
    ) -> tuple[float, ...] | None:
        value = self.obj.get(name)
        if value is None:
            if optional:
                return None
            raise self.fail(name, "missing (expected a list of numbers)")
        return _float_list(self, name, value, finite=finite)


def _float_list(f: _Fields, path: str, value: Any, *, finite: bool = True) -> tuple[float, ...]:
    if type(value) is not list or not value:
        raise f.fail(path, f"expected a non-empty list of numbers, got {_show(value)}")
    out: list[float] = []
    for i, x in enumerate(value):
        t = type(x)
        if t is str and x in _NONFINITE_FROM_STR:
            x = _NONFINITE_FROM_STR[x]
        elif t is not float and t is not int:
            raise f.fail(f"{path}[{i}]", f"expected a number, got {_show(x)}")
        x = float(x)
        if finite and not math.isfinite(x):
            raise f.fail(f"{path}[{i}]", f"expected a finite number, got {_show(x)}")
        out.append(x)
    return tuple(out)


def _number_column(
    f: _Fields, path: str, column: Any, n: int, bools: bool = True
) -> list[float | None]:
    """Check a metric column in place; converts non-finite strings to floats.

    ``bools``: whether the frame may hold true or false (see :func:`_decode_metrics`).
    """
    if type(column) is not list:
        raise f.fail(path, f"expected a list, got {_show(column)}")
    if len(column) != n:
        raise f.fail(path, f"has {len(column)} entries but steps has {n}")
    if not bools:
        # a C loop that adds ints and floats and refuses anything else but bools (None, a
        # string, a list...); a column with a gap, a non-finite string or an int too large
        # for a float takes the checks below
        try:
            sum(column, 0.0)
            return column
        except (TypeError, OverflowError):
            pass
    types = set(map(type, column))
    if types <= _NUM_OR_NONE:
        return column
    if types - _NUM_OR_NONE == {str}:
        try:
            return [_NONFINITE_FROM_STR[x] if type(x) is str else x for x in column]
        except KeyError:
            pass
    for i, x in enumerate(column):
        t = type(x)
        if t not in _NUM_OR_NONE and not (t is str and x in _NONFINITE_FROM_STR):
            raise f.fail(f"{path}[{i}]", f"expected a number or null, got {_show(x)}")
    raise AssertionError("unreachable")  # pragma: no cover


def _naturals(values: list[Any]) -> bool:
    """Whether every entry is an int >= 0 or a bool, as one C loop: an unsigned 64-bit array
    refuses floats, None, strings, lists and negative or larger ints (False: the caller
    checks them one by one, and accepts a larger int)."""
    try:
        array("Q", values)
        return True
    except (TypeError, OverflowError):
        return False


def _decode_metrics(f: _Fields, text: str | bytes) -> MetricsBatch:
    """A metrics frame's message, from its object (``f``) and its ``text``.

    The columns of a frame of several records are checked by C loops when the text has
    neither true nor false (:func:`_may_hold_bools`: such loops cannot tell a bool from an
    int). A frame of one record, the commonest, takes one type test per entry instead."""
    obj = f.obj
    steps = obj.get("steps")
    if type(steps) is not list:
        raise f.fail("steps", f"expected a list of integers, got {_show(steps)}")
    n = len(steps)
    # a frame of one record takes type tests, as one that may hold bools (see doc)
    bools = n == 1 or _may_hold_bools(text)
    if n == 1:
        if type(steps[0]) is not int or steps[0] < 0:
            raise f.fail("steps[0]", f"expected an integer >= 0, got {_show(steps[0])}")
    elif n and (bools or not _naturals(steps)) and (set(map(type, steps)) != {int} or min(steps) < 0):
        for i, s in enumerate(steps):
            if type(s) is not int or s < 0:
                raise f.fail(f"steps[{i}]", f"expected an integer >= 0, got {_show(s)}")
    values = obj.get("values")
    if type(values) is not dict:
        raise f.fail("values", f"expected an object of metric columns, got {_show(values)}")
    for name, column in values.items():
        if not name or len(name) > MAX_METRIC_NAME_LENGTH:
            raise f.fail(
                "values",
                f"metric name {_show(name)} must have 1-{MAX_METRIC_NAME_LENGTH} characters",
            )
        if n == 1 and type(column) is list and len(column) == 1 and type(column[0]) in _NUM_OR_NONE:
            continue  # what _number_column returns unchanged
        checked = _number_column(f, f"values.{name}", column, n, bools)
        if checked is not column:
            values[name] = checked
    epochs = obj.get("epochs")
    if epochs is not None:
        if type(epochs) is not list:
            raise f.fail("epochs", f"expected a list, got {_show(epochs)}")
        if len(epochs) != n:
            raise f.fail("epochs", f"has {len(epochs)} entries but steps has {n}")
        if not set(map(type, epochs)) <= _INT_OR_NONE:
            for i, e in enumerate(epochs):
                if type(e) not in _INT_OR_NONE:
                    raise f.fail(f"epochs[{i}]", f"expected an integer or null, got {_show(e)}")
    times = obj.get("times")
    if times is not None:
        times = _number_column(f, "times", times, n, bools)
    return _metrics_batch(steps, values, epochs, times)


_new = object.__new__
_set_steps, _set_values, _set_epochs, _set_times, _set_type = (
    MetricsBatch.__dict__[name].__set__ for name in ("steps", "values", "epochs", "times", "type")
)


def _metrics_batch(
    steps: list[int],
    values: dict[str, list[float | None]],
    epochs: list[int | None] | None,
    times: list[float | None] | None,
) -> MetricsBatch:
    """``MetricsBatch(steps, values, epochs, times)`` made through its slots: a frozen
    dataclass's ``__init__`` sets each field with ``object.__setattr__``, which cost the
    daemon ~10k instructions per metrics frame, more than parsing its JSON."""
    batch: MetricsBatch = _new(MetricsBatch)
    _set_steps(batch, steps)
    _set_values(batch, values)
    _set_epochs(batch, epochs)
    _set_times(batch, times)
    _set_type(batch, "metrics")
    return batch


def validate_decision(obj: Any, path: str = "decision", type_: str = "decision") -> dict[str, Any]:
    """Check one decision object (``Decision.to_dict()`` shape) and return it normalized.

    Raises :class:`ProtocolError` (bad_message) naming ``path`` and the field.
    """
    if type(obj) is not dict:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{path}: expected a decision object, got {_show(obj)}", type_
        )
    prefix = path[len(type_) + 1 :] + "." if path != type_ else ""
    f = _Fields(obj, type_, prefix)
    out: dict[str, Any] = {
        "id": f.get_int("id", minimum=1),
        "kind": f.get_str("kind"),
        "apply_at_step": f.get_int("apply_at_step"),
        "source": f.get_str("source"),
        "reason": f.get_str("reason", nonempty=False),
    }
    if out["kind"] not in DECISION_KINDS:
        raise f.fail(
            "kind", f"expected one of {', '.join(DECISION_KINDS)}, got {_show(out['kind'])}"
        )
    lrs = f.floats("lrs", optional=True)
    if lrs is not None:
        if any(x < 0 for x in lrs):
            raise f.fail("lrs", "learning rates must be >= 0")
        out["lrs"] = list(lrs)
    momentums = f.floats("momentums", optional=True)
    if momentums is not None:
        out["momentums"] = list(momentums)
    schedule = f.obj_or_none("schedule")
    if schedule is not None:
        if type(schedule.get("kind")) is not str:
            raise f.fail("schedule.kind", f"expected a string, got {_show(schedule.get('kind'))}")
        out["schedule"] = schedule
    rollback_to = f.get_int("rollback_to_step", optional=True)
    if rollback_to is not None:
        out["rollback_to_step"] = rollback_to
        out["skip_batches"] = f.get_int("skip_batches", optional=True) or 0
    actor = f.get_str("actor", optional=True, nonempty=False)
    if actor is not None:
        out["actor"] = actor
    kind = out["kind"]
    if kind == "set_lr" and lrs is None:
        raise f.fail("lrs", "missing (a set_lr decision needs lrs)")
    if kind == "schedule" and schedule is None:
        raise f.fail("schedule", "missing (a schedule decision needs a schedule segment)")
    if kind == "rollback" and rollback_to is None:
        raise f.fail("rollback_to_step", "missing (a rollback decision needs it)")
    return out


def _decode_hello(f: _Fields) -> Hello:
    protocol = f.obj.get("protocol")
    if protocol != PROTOCOL_VERSION or type(protocol) is not int:
        raise ProtocolError(
            ErrorCode.PROTOCOL_VERSION,
            f"hello.protocol: this peer speaks protocol {PROTOCOL_VERSION}, got {_show(protocol)}",
            "hello",
        )
    rank = f.get_int("rank", optional=True)
    world_size = f.get_int("world_size", optional=True, minimum=1)
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if rank >= world_size:
        raise f.fail("rank", f"must be < world_size ({world_size}), got {rank}")
    lrs = f.floats("lrs")
    assert lrs is not None
    if any(x < 0 for x in lrs):
        raise f.fail("lrs", "learning rates must be >= 0")
    momentums = f.floats("momentums", optional=True)
    if momentums is not None and len(momentums) != len(lrs):
        raise f.fail("momentums", f"has {len(momentums)} entries but lrs has {len(lrs)}")
    labels = f.obj_or_none("labels") or {}
    for k, v in labels.items():
        if type(v) is not str:
            raise f.fail(f"labels.{k}", f"expected a string, got {_show(v)}")
    resume_obj = f.obj_or_none("resume")
    resume = None
    if resume_obj is not None:
        r = _Fields(resume_obj, "hello", "resume.")
        resume = Resume(
            last_decision_id=r.get_int("last_decision_id", optional=True),
            last_step=r.get_int("last_step", optional=True),
        )
    return Hello(
        job=f.job(),
        lrs=lrs,
        run_id=f.get_str("run_id", optional=True),
        rank=rank,
        world_size=world_size,
        momentums=momentums,
        policy=f.obj_or_none("policy"),
        labels=labels,
        client=f.get_str("client", optional=True, nonempty=False),
        resume=resume,
        total_steps=f.get_int("total_steps", optional=True, minimum=1),
        protocol=protocol,
    )


def _decode_welcome(f: _Fields) -> Welcome:
    protocol = f.obj.get("protocol")
    if protocol != PROTOCOL_VERSION or type(protocol) is not int:
        raise ProtocolError(
            ErrorCode.PROTOCOL_VERSION,
            f"welcome.protocol: this peer speaks protocol {PROTOCOL_VERSION}, got {_show(protocol)}",
            "welcome",
        )
    decisions = f.obj.get("decisions")
    if decisions is None:
        decisions = []
    if type(decisions) is not list:
        raise f.fail("decisions", f"expected a list of decision objects, got {_show(decisions)}")
    lrs = f.floats("lrs")
    assert lrs is not None
    schedule = f.obj_or_none("schedule")
    if schedule is not None and type(schedule.get("kind")) is not str:
        raise f.fail("schedule.kind", f"expected a string, got {_show(schedule.get('kind'))}")
    return Welcome(
        session=f.get_str("session"),
        job=f.job(),
        lrs=lrs,
        policy=f.obj_or_none("policy"),
        schedule=schedule,
        decisions=tuple(
            validate_decision(d, f"welcome.decisions[{i}]", "welcome")
            for i, d in enumerate(decisions)
        ),
        protocol=protocol,
    )


def _decode_command(f: _Fields) -> Command:
    command = f.get_str("command")
    if command not in COMMANDS:
        raise f.fail("command", f"expected one of {', '.join(COMMANDS)}, got {_show(command)}")
    job = f.job(optional=command not in _COMMANDS_NEEDING_JOB)
    lrs = f.floats("lrs", optional=command != "set_lr")
    if lrs is not None and any(x < 0 for x in lrs):
        raise f.fail("lrs", "learning rates must be >= 0")
    return Command(
        command=command,
        job=job,
        lrs=lrs,
        reason=f.get_str("reason", optional=True, nonempty=False),
        actor=f.get_str("actor", optional=True, nonempty=False),
    )


def _decode_result(f: _Fields) -> Result:
    ok = f.obj.get("ok")
    if type(ok) is not bool:
        raise f.fail("ok", f"expected true or false, got {_show(ok)}")
    return Result(ok=ok, data=f.obj_or_none("data"))


_DECODERS: dict[str, Any] = {
    "metrics": _decode_metrics,
    "hello": _decode_hello,
    "welcome": _decode_welcome,
    "checkpoint": lambda f: CheckpointNotice(step=f.get_int("step")),
    "decision": lambda f: DecisionMsg(
        decision=validate_decision({k: v for k, v in f.obj.items() if k != "type"})
    ),
    "ack": lambda f: Ack(
        id=f.get_int("id", minimum=1), applied_at_step=f.get_int("applied_at_step")
    ),
    "heartbeat": lambda f: Heartbeat(step=f.get_int("step", optional=True)),
    "finished": lambda f: Finished(step=f.get_int("step", optional=True)),
    "error": lambda f: ErrorMsg(
        code=f.get_str("code"),
        message=f.get_str("message", nonempty=False),
        ref=f.get_str("ref", optional=True, nonempty=False),
    ),
    "command": _decode_command,
    "result": _decode_result,
}

MESSAGE_TYPES = tuple(_DECODERS)


#: the C scanner that json.loads calls in the end (that of a decoder with json.loads' defaults)
_scan_once: Callable[[str, int], tuple[Any, int]]
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _scan_object(text: str) -> dict[str, Any] | None:
    """``json.loads(text)`` when ``text`` is one JSON object with nothing around it, else None.

    One call of the C scanner instead of loads' three Python calls and two whitespace
    regex matches around it (~5k of its ~17k instructions for a single-point frame). Text
    that it does not take (whitespace around the value, a value that is not an object,
    invalid JSON) goes to ``json.loads``, which accepts it or says what is wrong. The
    scanner runs without releasing the GIL and clears its key memo after each call, as in
    ``json.loads``, whose module-wide decoder every thread shares the same way.
    """
    try:
        obj, end = _scan_once(text, 0)
    except (StopIteration, ValueError, RecursionError):
        return None
    return obj if end == len(text) and type(obj) is dict else None


def _may_hold_bools(text: str | bytes) -> bool:
    """Whether JSON ``text`` may hold true or false: it has one of the two words (a string
    may have them too: then the answer is a needless yes). Bytes may be UTF-16 or UTF-32
    JSON, where the words are spelled otherwise: always yes."""
    return not isinstance(text, str) or "true" in text or "false" in text


def decode(text: str | bytes, *, max_bytes: int | None = None) -> Message:
    """Parse and validate one frame.

    Raises :class:`ProtocolError` with code ``frame_too_large`` (only when ``max_bytes`` is
    given), ``bad_json``, ``unknown_type``, ``protocol_version`` or ``bad_message``; never
    any other exception.
    """
    if max_bytes is not None and len(text) > max_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame has {len(text)} bytes; the limit is {max_bytes}"
        )
    obj = _scan_object(text) if type(text) is str else None
    if obj is None:
        try:
            obj = json.loads(text)
        # JSONDecodeError, UnicodeDecodeError, int limits
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError(ErrorCode.BAD_JSON, f"expected a JSON object, got {type(obj).__name__}")
    type_ = obj.get("type")
    decoder = _DECODERS.get(type_) if type(type_) is str else None
    if decoder is None:
        if type_ is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, 'the message has no "type" field')
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {_show(type_)}; expected one of {', '.join(MESSAGE_TYPES)}",
            type_ if type(type_) is str else None,
        )
    try:
        if decoder is _decode_metrics:
            msg: Message = _decode_metrics(_Fields(obj, "metrics"), text)
        else:
            msg = decoder(_Fields(obj, str(type_)))
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        # a shape the checks above did not foresee: still the peer's fault, never a crash
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{type_}: {exc}", type_) from None
    return msg
