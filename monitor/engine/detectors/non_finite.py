"""``non_finite``: a monitored metric became NaN or ±Inf.

Rule
    On every record, each monitored metric that the record carries and whose value is NaN,
    +Inf or -Inf fires one detection. A record with two non-finite metrics fires two.

Statistic
    None beyond the value itself. The detector counts, per metric, non-finite values in a
    row (``consecutive``) and in total (``total``); both go into ``Detection.detail`` and the
    totals feed the ``lrpilot_job_nonfinite_total{metric}`` counter (see :attr:`totals`).

Parameters (:class:`NonFiniteParams`)
    ``metrics`` = ("loss", "val_loss", "grad_norm"): the metric names to watch.

Edge cases
    * A metric absent from a record (or sent as ``None``) is neither good nor bad: it does not
      fire and does not reset its ``consecutive`` count.
    * A finite value resets that metric's ``consecutive`` count to 0.
    * A metric reported less often than the step (val_loss once per epoch) is checked
      whenever it arrives; nothing depends on the step numbers.
    * A huge but finite value (1e30) is not this detector's business (see ``spike`` and
      ``divergence``).

Phases
    None: the detector has no warm-up and no cooldown. Every non-finite value fires, so that
    the engine sees each one; the engine's response cooldown keeps it from answering twice
    to the same burst.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Detector, ParamError
from ..events import Detection, Metrics

__all__ = ["NonFiniteDetector", "NonFiniteParams"]

_INF = float("inf")


@dataclass(frozen=True, slots=True)
class NonFiniteParams:
    """Parameters of ``non_finite``: which metrics to watch."""

    metrics: tuple[str, ...] = ("loss", "val_loss", "grad_norm")

    def __post_init__(self) -> None:
        if isinstance(self.metrics, str) or not isinstance(self.metrics, (list, tuple)):
            raise ParamError("metrics", f"must be a list of metric names, got {self.metrics!r}")
        if not self.metrics:
            raise ParamError("metrics", "must name at least one metric")
        for i, name in enumerate(self.metrics):
            if not isinstance(name, str) or not name:
                raise ParamError(f"metrics[{i}]", f"must be a non-empty metric name, got {name!r}")
        if len(set(self.metrics)) != len(self.metrics):
            raise ParamError("metrics", f"names a metric twice: {list(self.metrics)!r}")
        object.__setattr__(self, "metrics", tuple(self.metrics))


def _describe(value: float) -> str:
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _column_sum(values: Sequence[Any]) -> float:
    """The sum of a column's values (NaN or ±Inf when one of them is), or inf when it cannot
    be taken as floats (an int too large for one): the caller then walks the column."""
    try:
        return sum(values, 0.0)  # the common column: no gap, one C loop
    except TypeError:  # a gap: filter(None, ...) drops None (and zeros, finite anyway)
        pass
    except OverflowError:
        return _INF
    try:
        return sum(filter(None, values))
    except (OverflowError, TypeError):
        return _INF


class NonFiniteDetector(Detector):
    """Fires on every NaN or ±Inf value of a monitored metric."""

    name: ClassVar[str] = "non_finite"

    __slots__ = ("_consecutive", "_metrics", "_totals", "params")

    def __init__(self, params: NonFiniteParams | None = None) -> None:
        self.params = params if params is not None else NonFiniteParams()
        self._metrics = self.params.metrics
        self._consecutive: dict[str, int] = dict.fromkeys(self._metrics, 0)
        self._totals: dict[str, int] = dict.fromkeys(self._metrics, 0)

    @property
    def totals(self) -> Mapping[str, int]:
        """Non-finite values seen so far, per monitored metric."""
        return self._totals

    def feed(self, record: Metrics) -> list[Detection]:
        """Fire one detection per monitored metric of ``record`` that is NaN or ±Inf."""
        out: list[Detection] = []
        values = record.values
        for metric in self._metrics:
            value = values.get(metric)
            if value is None:
                continue
            # -inf < x < inf is False exactly for NaN and ±Inf (and cheaper than isfinite)
            if -_INF < value < _INF:
                if self._consecutive[metric]:
                    self._consecutive[metric] = 0
                continue
            consecutive = self._consecutive[metric] + 1
            self._consecutive[metric] = consecutive
            total = self._totals[metric] + 1
            self._totals[metric] = total
            out.append(self._detection(metric, record.step, float(value), consecutive, total))
        return out

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` on records ``start`` to ``stop - 1``, one monitored column at a time.

        A column whose values add up to a finite number holds no NaN or ±Inf (both carry
        through a sum), so it costs one C-level sum and fires nothing; only the rare column
        that fails that test (or whose sum overflows) is walked value by value. A metric's
        counts do not depend on the other metrics, so walking the columns one after the
        other and sorting the detections by record, then by the order of the monitored
        metrics, gives exactly :meth:`feed`'s detections in :meth:`feed`'s order.
        """
        found: list[tuple[int, int, Detection]] = []
        whole = start == 0
        for rank, metric in enumerate(self._metrics):
            col = columns.get(metric)
            if col is None:
                continue
            values = col if whole and stop == len(col) else col[start:stop]
            total = _column_sum(values)
            if -_INF < total < _INF:
                if self._consecutive[metric] and values.count(None) != len(values):
                    self._consecutive[metric] = 0  # a finite value
                continue
            self._walk(metric, rank, steps, col, start, stop, found)
        if not found:
            return []
        if len({rank for _, rank, _ in found}) > 1:
            found.sort(key=lambda f: (f[0], f[1]))
        return [(i, detection) for i, _, detection in found]

    def _walk(
        self,
        metric: str,
        rank: int,
        steps: Sequence[int],
        col: Sequence[float | None],
        start: int,
        stop: int,
        found: list[tuple[int, int, Detection]],
    ) -> None:
        """:meth:`feed` on one metric's column: append ``(record, rank, detection)`` to ``found``."""
        consecutive = self._consecutive[metric]
        total = self._totals[metric]
        for i in range(start, stop):
            value = col[i]
            if value is None:
                continue
            if -_INF < value < _INF:
                consecutive = 0
                continue
            consecutive += 1
            total += 1
            found.append(
                (i, rank, self._detection(metric, steps[i], float(value), consecutive, total))
            )
        self._consecutive[metric] = consecutive
        self._totals[metric] = total

    def _detection(
        self, metric: str, step: int, value: float, consecutive: int, total: int
    ) -> Detection:
        text = _describe(value)
        if consecutive == 1:
            reason = f"{metric} is {text} at step {step}"
        else:
            reason = (
                f"{metric} is {text} at step {step} "
                f"({_ordinal(consecutive)} non-finite value in a row)"
            )
        return Detection(
            detector=self.name,
            metric=metric,
            step=step,
            value=value,
            reason=reason,
            detail={"consecutive": float(consecutive), "total": float(total)},
        )

    def state_dict(self) -> dict[str, Any]:
        """Per-metric counts (JSON-ready)."""
        return {"consecutive": dict(self._consecutive), "totals": dict(self._totals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; metrics no longer monitored are dropped, new ones start at 0."""
        consecutive = state.get("consecutive", {})
        totals = state.get("totals", {})
        self._consecutive = {m: int(consecutive.get(m, 0)) for m in self._metrics}
        self._totals = {m: int(totals.get(m, 0)) for m in self._metrics}

    def monitored(self) -> tuple[str, ...]:
        """The watched metric names."""
        return self._metrics
