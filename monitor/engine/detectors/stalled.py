"""``stalled``: the validation loss never got below where training started, or gave its progress back.

A learning rate 10-100x too high can kill a ReLU network in its first few dozen steps
without any NaN and without a loss that stays high: every unit of a layer stops firing,
the network predicts a constant, and the loss sits at chance (ln 10 for ten classes), which
is where it started. Or it half-kills it: the loss falls, then climbs back to a level far
above its best and stays there. No LR cut revives such a network; going back to weights
from before the damage with a much lower LR does. The training loss does not always show
it (``overshoot`` watches that); the validation loss, computed on a fixed set, does.

Rule
    The *start* is the lowest of the first ``start_values`` finite values of ``start_metric``
    (the training loss; its first values are the loss of the weights the run began with:
    the lowest, because from a 100x too high LR the second value is often already a
    blow-up). Without ``start_metric`` the first evaluation is the start.

    At each finite evaluation of ``monitor`` (``val_loss``), fire when, within the current
    *segment* (the run, then what follows each detection or rollback):

    1. **no progress**: over the last ``patience`` evaluations, the best one is above
       ``start - min_progress * |start|``, and at least one of them rose above the one
       before it by more than ``max_rise`` (relative): not even a slow descent. A 100x too
       low LR creeps down without a single rise: that is ``slow_progress``'s case, and it
       must not be rolled back. ``detail["good_step"]`` is the start's step: the
       checkpoint saved before training moved the weights.
    2. **progress given back**: the segment's best evaluation ``b`` is below the start by
       at least ``min_progress * |start|``, at least ``patience`` evaluations came after
       it, and of the last ``patience`` of them all but one at most, the last one included,
       are at or above ``b + max_lost_progress * (start - b)``: one lucky evaluation in
       between does not hide damaged weights whose loss bounces around far above its best.
       ``detail["good_step"]`` is the best evaluation's step.

    The engine's default response is a rollback with LR x 0.1 to the checkpoint at or
    before the good step (and, by the response's ``margin``, one more back). After a
    detection a new segment starts: ``patience`` more evaluations, at most
    ``max_detections`` detections in all.

    On the quality benchmark's runs (four tasks, three seeds, fixed LRs from 1/300 to 300x
    the best one, torch's schedulers and lrpilot; docs/quality.md) neither rule fires from a
    LR at or below 3x the best one.

Statistic
    ``detail``: ``rule`` (1 or 2), ``start``, ``best`` (the best of the last ``patience``
    evaluations for rule 1, of the segment for rule 2), ``good_step``, ``detections``.

Parameters (:class:`StalledParams`)
    ``monitor="val_loss"``, ``start_metric="loss"``, ``start_values=5``, ``patience=5``,
    ``min_progress=0.05``, ``max_rise=0.002``, ``max_lost_progress=0.25``,
    ``max_detections=3``.

Edge cases
    * A record with neither metric changes nothing. NaN, ±Inf and ``|x| >= 1e150`` are
      ignored (``non_finite`` reports them).
    * :meth:`rewind` (the job rolled back) starts a new segment; the start stays: the
      checkpoint's weights are judged against the level training began at.
    * Meant for losses (mode min). A validation loss that legitimately ends far above its
      best (heavy overfitting, 25 % of the progress given back for ``patience``
      evaluations) fires rule 2: raise ``max_lost_progress`` or switch the detector off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

from ..base import Detector, ParamError, optional_float, optional_int, present_indices
from ..events import Detection, Metrics

__all__ = ["StalledDetector", "StalledParams"]

MAX_ABS_VALUE = 1e150


def _check_count(field: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ParamError(field, f"must be an integer >= {low}, got {value!r}")
    return value


def _check_fraction(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ParamError(field, f"must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class StalledParams:
    """Parameters of ``stalled``."""

    monitor: str = "val_loss"
    start_metric: str = "loss"
    start_values: int = 5
    patience: int = 5
    min_progress: float = 0.05
    max_rise: float = 0.002
    max_lost_progress: float = 0.25
    max_detections: int = 3

    def __post_init__(self) -> None:
        for field in ("monitor", "start_metric"):
            name = getattr(self, field)
            if not isinstance(name, str) or not name:
                raise ParamError(field, f"must be a non-empty metric name, got {name!r}")
        if self.start_metric == self.monitor:
            raise ParamError("start_metric", f"must differ from monitor ({self.monitor!r})")
        _check_count("start_values", self.start_values, 1)
        _check_count("patience", self.patience, 2)
        _check_count("max_detections", self.max_detections, 0)
        object.__setattr__(self, "min_progress", _check_fraction("min_progress", self.min_progress))
        object.__setattr__(self, "max_rise", _check_fraction("max_rise", self.max_rise))
        lost = self.max_lost_progress
        if (
            isinstance(lost, bool)
            or not isinstance(lost, (int, float))
            or not 0.0 < lost < math.inf
        ):
            raise ParamError("max_lost_progress", f"must be a finite number > 0, got {lost!r}")
        object.__setattr__(self, "max_lost_progress", float(lost))


class StalledDetector(Detector):
    """Fires when the evaluations never got below the start and do not even fall slowly."""

    name: ClassVar[str] = "stalled"

    __slots__ = (
        "_best",
        "_best_step",
        "_fired",
        "_held",
        "_recent",
        "_seen",
        "_start",
        "_start_step",
        "params",
    )

    def __init__(self, params: StalledParams | None = None) -> None:
        self.params = params if params is not None else StalledParams()
        self._seen = 0  # finite start_metric values counted into the start
        self._start: float | None = None  # the lowest of them
        self._start_step: int | None = None  # the step of the first record seen
        self._recent: list[float] = []  # the segment's last `patience` evaluations
        self._best: float | None = None  # the segment's best evaluation...
        self._best_step: int | None = None  # ...and its step
        # since the best: 1 for an evaluation that gave back max_lost_progress of the
        # progress, 0 for one that did not (the last `patience` of them)
        self._held: list[int] = []
        self._fired = 0

    @property
    def start(self) -> float | None:
        """The start level (None until known)."""
        return self._start

    def feed(self, record: Metrics) -> list[Detection]:
        """Take the start from ``start_metric``; judge each evaluation of ``monitor``."""
        p = self.params
        values = record.values
        if self._start_step is None:
            self._start_step = record.step
        if self._seen < p.start_values:
            y = values.get(p.start_metric)
            if y is not None and -MAX_ABS_VALUE < y < MAX_ABS_VALUE:
                self._take_start(float(y))
        x = values.get(p.monitor)
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        return self._evaluate(record.step, float(x))

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` on records ``start`` to ``stop - 1``, visiting only what it reads.

        Once the start is known (its first ``start_values`` values), only the records that
        carry ``monitor`` matter (once per epoch); until then the records in order.
        """
        p = self.params
        col = columns.get(p.monitor)
        start_col = columns.get(p.start_metric)
        if col is None and start_col is None:
            return []
        out: list[tuple[int, Detection]] = []
        i = start
        while i < stop and (self._seen < p.start_values or self._start_step is None):
            x = col[i] if col is not None else None
            y = start_col[i] if start_col is not None else None
            if x is not None or y is not None:
                values = {p.monitor: x} if x is not None else {}
                if y is not None:
                    values[p.start_metric] = y
                for detection in self.feed(Metrics(steps[i], values)):
                    out.append((i, detection))
            i += 1
        if col is None or i >= stop:
            return out
        evaluate = self._evaluate
        for j in present_indices(col, i, stop):
            x = col[j]
            if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
                continue
            for detection in evaluate(steps[j], float(x)):
                out.append((j, detection))
        return out

    def _take_start(self, y: float) -> None:
        self._seen += 1
        if self._start is None or y < self._start:
            self._start = y

    def _evaluate(self, step: int, x: float) -> list[Detection]:
        p = self.params
        if self._start is None:  # no start_metric reported: the first evaluation is the start
            self._start = x
            self._seen = p.start_values
        start = self._start
        recent = self._recent
        recent.append(x)
        if len(recent) > p.patience:
            del recent[0]
        best = self._best
        if best is None or x < best:
            self._best, self._best_step = x, step
            self._held = []
        else:
            held = self._held
            held.append(
                start - best >= p.min_progress * abs(start)
                and x - best >= p.max_lost_progress * (start - best)
            )
            if len(held) > p.patience:
                del held[0]
        if self._fired >= p.max_detections:
            return []
        held = self._held
        if len(held) >= p.patience and held[-1] and sum(held) >= p.patience - 1:  # rule 2
            assert best is not None and self._best_step is not None
            lost = (x - best) / (start - best)
            reason = (
                f"{p.monitor} has given back {lost:.0%} of its progress in {sum(held)} of "
                f"{p.patience} evaluations up to step {step}: now {x:.4g}, best {best:.4g} at step "
                f"{self._best_step}, start {start:.4g} ({p.start_metric}): damaged weights"
            )
            return self._fire(step, x, reason, 2, best, self._best_step)
        if len(recent) < p.patience:
            return []
        best_recent = min(recent)
        if best_recent <= start - p.min_progress * abs(start):
            return []
        rises = [(b - a) / abs(a) for a, b in pairwise(recent) if b - a > p.max_rise * abs(a)]
        if not rises:
            return []
        reason = (
            f"{p.monitor} has made no progress from the start in {p.patience} evaluations up to "
            f"step {step}: best {best_recent:.4g}, start {start:.4g} ({p.start_metric}), "
            f"and it is not falling (it rose by {max(rises):.2%}): a stalled or dead network"
        )
        good = self._start_step if self._start_step is not None else step
        return self._fire(step, x, reason, 1, best_recent, good)

    def _fire(
        self, step: int, x: float, reason: str, rule: int, best: float, good_step: int
    ) -> list[Detection]:
        self._fired += 1
        self._new_segment()
        assert self._start is not None  # set by the evaluation being judged, at the latest
        detail: dict[str, float] = {
            "rule": rule,
            "start": self._start,
            "best": best,
            "good_step": good_step,
            "detections": self._fired,
        }
        return [
            Detection(
                detector=self.name,
                metric=self.params.monitor,
                step=step,
                value=x,
                reason=reason,
                detail=detail,
            )
        ]

    def _new_segment(self) -> None:
        self._recent = []
        self._best = None
        self._best_step = None
        self._held = []

    def rewind(self, to_step: int) -> None:
        """The job went back to a checkpoint: a new segment, judged against the same start."""
        self._new_segment()

    def state_dict(self) -> dict[str, Any]:
        """The start, the segment's evaluations and the count (JSON-ready)."""
        return {
            "seen": self._seen,
            "start": self._start,
            "start_step": self._start_step,
            "recent": list(self._recent),
            "best": self._best,
            "best_step": self._best_step,
            "held": [int(bool(h)) for h in self._held],
            "fired": self._fired,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._seen = int(state["seen"])
        start, start_step = state["start"], state["start_step"]
        self._start = optional_float(start)
        self._start_step = optional_int(start_step)
        self._recent = [float(v) for v in state["recent"]]
        best, best_step = state.get("best"), state.get("best_step")
        self._best = optional_float(best)
        self._best_step = optional_int(best_step)
        held = state.get("held", [])
        # a snapshot from before the history: the count of evaluations in a row
        self._held = (
            [1] * min(int(held), self.params.patience)
            if isinstance(held, int)
            else [int(h) for h in held]
        )
        self._fired = int(state["fired"])

    def monitored(self) -> tuple[str, ...]:
        """The evaluated metric and the one the start is taken from."""
        return (self.params.monitor, self.params.start_metric)
