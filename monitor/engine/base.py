"""The two kinds of small state machine the engine is made of.

A **detector** watches one or more metrics and fires :class:`Detection` s. A **policy** owns a
job's learning rates: it advances once per record and may change the LR by itself (the
plateau policies) or describe the LR as a schedule segment that the job evaluates locally
(the step-driven policies: cyclic, one-cycle, cosine restarts, constant, warmup).

Both expose ``state_dict()`` / ``load_state_dict()`` with plain JSON-ready values, so that the
daemon can persist a job exactly and a restored engine continues where it stopped.

Parameters of every detector and policy are frozen dataclasses (``...Params``) that validate
themselves in ``__post_init__`` with a message naming the field; the daemon's pydantic config
validates the same dataclasses, so parameter names, types and defaults are written once.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from itertools import compress
from math import hypot
from typing import Any, ClassVar

from .events import Detection, Metrics


class ParamError(ValueError):
    """A detector or policy parameter has an impossible value.

    ``field`` names the parameter, so that config errors can give a field path.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def present_indices(column: Sequence[float | None], start: int, stop: int) -> Sequence[int]:
    """The indices ``i`` in ``range(start, stop)`` where ``column[i]`` is not None.

    For the ``feed_columns`` of detectors whose metric most records lack (val_loss once per
    epoch). ``count(None)`` and ``compress`` run in C: a frame of 100 records without the
    metric costs about 0.1 µs, with one evaluation about 1 µs. ``compress`` also drops
    zeros; when there are any, every index is returned and the caller skips None entries.
    """
    values = column if start == 0 and stop == len(column) else column[start:stop]
    n = len(values)
    absent = values.count(None)
    if absent == n:
        return ()
    everything = range(start, stop)
    if absent * 2 < n:  # mostly present: the caller's loop is the cheaper filter
        return everything
    indices = list(compress(everything, values))
    return indices if len(indices) == n - absent else everything


#: the detectors that watch a loss ignore values of this magnitude or more (with NaN and ±Inf)
MAX_ABS_VALUE = 1e150

# hypot of a span below this: every value is finite and below MAX_ABS_VALUE in magnitude, with a
# margin for hypot's rounding (it may come out an ulp under the largest magnitude)
_ALL_TAKEN_BELOW = MAX_ABS_VALUE / 16


def finite_values(
    column: Sequence[Any], start: int, stop: int
) -> tuple[Sequence[Any], Sequence[int] | None]:
    """The values of ``column[start:stop]`` a loss detector takes, and where they are.

    Taken: not None, and ``-MAX_ABS_VALUE < x < MAX_ABS_VALUE`` (so neither NaN nor ±Inf).
    Returns ``(values, indices)`` with ``values[k]`` at ``indices[k]``, or ``indices`` None
    when every value of the span is taken: ``values[k]`` is then at ``start + k``. Values
    are as in the column (an int stays an int).

    For the ``feed_columns`` of detectors that watch a metric most records carry (the loss):
    their loops then need no test per value. The common case is one C call over the span:
    ``math.hypot`` refuses None (TypeError), and its result is at least the largest
    magnitude, NaN when a value is NaN and inf when one is infinite. Otherwise (a gap, a
    NaN, an int too large for a float) a comprehension picks the values one by one.
    """
    span = column[start:stop]
    try:
        if hypot(*span) < _ALL_TAKEN_BELOW:
            return span, None
    except (TypeError, OverflowError):
        pass
    high = MAX_ABS_VALUE
    low = -high
    indices = [i for i in range(start, stop) if (x := column[i]) is not None and low < x < high]
    return [column[i] for i in indices], indices


def optional_float(value: Any) -> float | None:
    """``None`` stays ``None``, anything else becomes a float (restoring a ``state_dict``)."""
    return None if value is None else float(value)


def optional_int(value: Any) -> int | None:
    """``None`` stays ``None``, anything else becomes an int (restoring a ``state_dict``)."""
    return None if value is None else int(value)


class Detector(abc.ABC):
    """Watches metrics in the records fed to it and fires detections."""

    #: the name used in config files, exports and decisions ("plateau", "spike", ...)
    name: ClassVar[str]

    @abc.abstractmethod
    def feed(self, record: Metrics) -> list[Detection]:
        """Advance on one record; return the detections it caused (often none)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as JSON-ready values."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def monitored(self) -> tuple[str, ...]:
        """The metric names this detector reads (for docs, exports and `lrpilot show`).

        A record that carries none of them must change nothing and fire nothing: the engine
        does not feed it to the detector at all (``tests/engine/test_columns.py`` checks
        every detector).
        """
        return ()

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """Advance on records ``start`` to ``stop - 1`` of a columnar batch.

        Record ``i`` has step ``steps[i]`` and value ``columns[name][i]`` for metric
        ``name``; ``None`` there, or a metric missing from ``columns``, means record ``i``
        does not carry that metric. Returns ``(i, detection)`` for every detection, in
        record order: exactly what :meth:`feed` returns for each record in turn, leaving
        exactly the same state (``tests/engine/test_columns.py`` holds every detector to
        that).

        This default builds each record and calls :meth:`feed`. Detectors on the hot path
        override it with one loop over their own column, their state in local variables:
        the daemon feeds whole frames (100 steps is common) this way.
        """
        out: list[tuple[int, Detection]] = []
        feed = self.feed
        cols = list(columns.items())
        for i in range(start, stop):
            values = {name: v for name, col in cols if (v := col[i]) is not None}
            for detection in feed(Metrics(steps[i], values)):
                out.append((i, detection))
        return out

    def rewind(self, to_step: int) -> None:
        """The job rolled back to the checkpoint of ``to_step``: values from before describe other weights.

        Called by the engine when a rollback it decided takes effect. Detectors whose
        statistic spans many values (a window, a moving average) start it again, so that the
        values of the abandoned weights neither fire them again nor hide what comes next.
        The default keeps everything.
        """
        return None


class Policy(abc.ABC):
    """Owns the learning rate of every param group of one job.

    The engine calls :meth:`step` once per record with the schedule *position* after that
    record and, when the record carries the policy's monitored metric, its value. Position
    counts like torch's ``last_epoch``: a policy at position ``t`` gives the LR that torch's
    scheduler gives after ``t`` calls of ``scheduler.step()``.
    """

    #: the ``kind:`` used in policy files ("reduce_on_plateau", "cyclic", ...)
    kind: ClassVar[str]

    #: the metric whose values drive the policy, or None for step-driven policies
    monitor: str | None = None

    @property
    @abc.abstractmethod
    def lrs(self) -> tuple[float, ...]:
        """The learning rate per param group in effect after the last step."""

    @property
    def momentums(self) -> tuple[float, ...] | None:
        """Momentum (or Adam's beta1) per param group when the policy cycles it, else None."""
        return None

    @abc.abstractmethod
    def step(self, position: int, metric: float | None) -> bool:
        """Advance to ``position``; ``metric`` is the monitored value if this record has it.

        Returns True when the policy changed the LR in a way the job cannot compute by
        itself (a plateau reduction): the engine then sends the job new LRs. Step-driven
        policies return False; the job evaluates their :meth:`segment` locally.
        """

    def segment(self) -> dict[str, Any] | None:
        """The schedule segment (see ``lrpilot.schedules``) the job should evaluate, if any."""
        return None

    @abc.abstractmethod
    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """Multiply the LR by ``factor`` (a response to a detection), not below ``min_lrs``.

        Step-driven policies scale their whole schedule from now on. Returns True if
        anything changed.
        """

    def rewind(self, position: int) -> None:
        """The job restored an earlier step with a rollback: go back to ``position``.

        Positions otherwise only go forward. Step-driven policies move their clock back, so
        that the LR the engine reports is the one the job computes at its restored step;
        plateau policies have no clock and keep everything.
        """
        return None

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Force the LRs (an operator's set-lr). Step-driven policies rescale to match."""
        raise NotImplementedError

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly, as JSON-ready values."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
