"""``plateau``: the monitored metric stopped improving.

Rule (the improvement rule of torch's ``ReduceLROnPlateau``), applied each time a record
carries a finite value of ``monitor`` — one *evaluation*::

    if is_better(value, best):  best = value; bad_evaluations = 0
    else:                       bad_evaluations += 1
    if cooldown_left > 0:       cooldown_left -= 1; bad_evaluations = 0
    if bad_evaluations > patience:
        fire; cooldown_left = cooldown; bad_evaluations = 0

``is_better(a, best)``; the first evaluation is always better (there is no best yet)::

    min, rel:  a < best * (1 - threshold)
    min, abs:  a < best - threshold
    max, rel:  a > best * (threshold + 1)
    max, abs:  a > best + threshold

So with ``patience=10`` the detector fires on the 11th evaluation in a row without a better
value, exactly where torch would reduce the LR. After firing it counts again from 0, and for
``cooldown`` evaluations bad evaluations do not count (torch's cooldown).

Statistic
    ``bad_evaluations`` (torch's ``num_bad_epochs``), exported as the gauge
    ``lrpilot_job_plateau_bad_evaluations``; and ``best``.

Parameters (:class:`PlateauParams`, torch's names and defaults)
    ``monitor="val_loss"``, ``mode="min"`` (or "max"), ``threshold=1e-4``,
    ``threshold_mode="rel"`` (or "abs"), ``patience=10``, ``cooldown=0``.

Skipping an outlier evaluation (for the engine)
    One outlier must not be mistaken for a plateau (pytorch issue 30873: after a loss spike,
    torch counts every evaluation of the recovery as bad, because none beats the pre-spike
    best, and it keeps cutting the LR). The engine feeds detectors in the order
    ``spike`` before ``plateau``; when the spike detector flags a single outlier of the
    plateau's metric, the engine calls :meth:`PlateauDetector.skip_next_evaluation` *before*
    feeding the same record to this detector. The next ``count`` evaluations (default 1, so
    usually the outlier itself) are then ignored entirely: they neither become ``best`` nor
    count as bad, nor advance the cooldown. Calls add up; :attr:`evaluations_to_skip` tells how
    many are pending, and the number is part of the state dict. Records without a finite value
    of ``monitor`` do not consume a pending skip.

Edge cases
    * A record without ``monitor`` (or with ``None``) is not an evaluation: nothing changes.
      This is the usual case for val_loss, reported once per epoch while the step advances.
    * NaN and ±Inf values are ignored like absent ones (torch would count NaN as bad and let
      -Inf become an unbeatable best); the ``non_finite`` detector reports them.
    * In ``rel`` mode with a negative best, the threshold points the "wrong" way, as in torch.

Phases (h11 style: every transition is in this table)::

    phase       on a finite evaluation                         next phase
    ----------  ---------------------------------------------  ----------------------------
    warm-up     becomes best                                   watching
    watching    better: best = value, bad = 0                  watching
    watching    not better, bad <= patience                    watching
    watching    not better, bad > patience: FIRE, bad = 0      cooldown (if cooldown > 0)
    cooldown    better: best = value; bad = 0; left -= 1       cooldown, watching at left=0
    cooldown    not better: bad = 0; left -= 1                 cooldown, watching at left=0

With ``cooldown=0`` the detector goes straight back to watching after firing and fires again
after another ``patience + 1`` bad evaluations, as torch reduces again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..base import Detector, ParamError, optional_float, present_indices
from ..events import Detection, Metrics

__all__ = ["PlateauDetector", "PlateauParams", "PlateauPhase"]

_INF = float("inf")


class PlateauPhase(str, enum.Enum):
    """Where the plateau detector is in its cycle (see the module docstring)."""

    WARM_UP = "warm-up"  # no evaluation yet
    WATCHING = "watching"
    COOLDOWN = "cooldown"


@dataclass(frozen=True, slots=True)
class PlateauParams:
    """Parameters of ``plateau``; names and defaults are those of torch's ReduceLROnPlateau."""

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    patience: int = 10
    cooldown: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        if self.mode not in ("min", "max"):
            raise ParamError("mode", f"must be one of min, max; got {self.mode!r}")
        if self.threshold_mode not in ("rel", "abs"):
            raise ParamError(
                "threshold_mode", f"must be one of rel, abs; got {self.threshold_mode!r}"
            )
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ParamError("threshold", f"must be a number, got {threshold!r}")
        if not 0.0 <= threshold < _INF:
            raise ParamError("threshold", f"must be finite and >= 0, got {threshold!r}")
        object.__setattr__(self, "threshold", float(threshold))
        for field in ("patience", "cooldown"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamError(field, f"must be an integer, got {value!r}")
            if value < 0:
                raise ParamError(field, f"must be >= 0, got {value}")


class PlateauDetector(Detector):
    """Fires once when ``monitor`` has not improved for more than ``patience`` evaluations."""

    name: ClassVar[str] = "plateau"

    __slots__ = (
        "_better_factor",
        "_better_offset",
        "_evaluations",
        "_sign",
        "_skip",
        "bad_evaluations",
        "best",
        "cooldown_left",
        "params",
    )

    def __init__(self, params: PlateauParams | None = None) -> None:
        self.params = p = params if params is not None else PlateauParams()
        # is_better(a, best) is  sign*a < sign*(best*factor - offset)  for all four cases:
        #   min rel: a < best*(1-t)       min abs: a < best - t
        #   max rel: -a < -(best*(1+t))   max abs: -a < -(best + t)
        self._sign = 1.0 if p.mode == "min" else -1.0
        if p.threshold_mode == "rel":
            self._better_factor = 1.0 - p.threshold if p.mode == "min" else 1.0 + p.threshold
            self._better_offset = 0.0
        else:
            self._better_factor = 1.0
            self._better_offset = p.threshold if p.mode == "min" else -p.threshold
        #: the best value so far, None before the first evaluation
        self.best: float | None = None
        #: evaluations in a row without a better value (torch's num_bad_epochs)
        self.bad_evaluations: int = 0
        #: evaluations left in which bad evaluations do not count
        self.cooldown_left: int = 0
        self._evaluations = 0
        self._skip = 0

    # -- engine interface

    def skip_next_evaluation(self, count: int = 1) -> None:
        """Ignore the next ``count`` finite values of ``monitor`` (an outlier, not a plateau).

        Call it before feeding the record whose value should be ignored. See the module
        docstring for the exact semantics.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._skip += count

    @property
    def evaluations_to_skip(self) -> int:
        """How many upcoming evaluations :meth:`skip_next_evaluation` asked to ignore."""
        return self._skip

    @property
    def evaluations(self) -> int:
        """Finite evaluations seen so far, skipped ones included."""
        return self._evaluations

    @property
    def phase(self) -> PlateauPhase:
        """The current phase (see the module docstring's table)."""
        if self.best is None:
            return PlateauPhase.WARM_UP
        if self.cooldown_left > 0:
            return PlateauPhase.COOLDOWN
        return PlateauPhase.WATCHING

    def is_better(self, value: float, best: float) -> bool:
        """torch's improvement rule for this detector's mode and threshold."""
        sign = self._sign
        return sign * value < sign * (best * self._better_factor - self._better_offset)

    # -- Detector API

    def feed(self, record: Metrics) -> list[Detection]:
        """Count one evaluation if ``record`` carries a finite ``monitor`` value."""
        value = record.values.get(self.params.monitor)
        if value is None or not -_INF < value < _INF:
            return []
        self._evaluations += 1
        if self._skip:
            self._skip -= 1
            return []
        best = self.best
        if best is None or self._sign * value < self._sign * (
            best * self._better_factor - self._better_offset
        ):
            self.best = float(value)
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evaluations = 0
        if self.bad_evaluations <= self.params.patience:
            return []
        bad = self.bad_evaluations
        self.bad_evaluations = 0
        self.cooldown_left = self.params.cooldown
        return [self._detection(record.step, float(value), bad)]

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` on records ``start`` to ``stop - 1``: only the records with ``monitor``.

        A record without ``monitor`` changes nothing, so only the records that carry it are
        visited (:func:`present_indices`), in one loop with the counters in local variables.
        """
        col = columns.get(self.params.monitor)
        if col is None:
            return []
        indices = present_indices(col, start, stop)
        if not indices:
            return []
        p = self.params
        patience = p.patience
        sign = self._sign
        factor = self._better_factor
        offset = self._better_offset
        best = self.best
        bad = self.bad_evaluations
        cooldown_left = self.cooldown_left
        evaluations = self._evaluations
        skip = self._skip
        out: list[tuple[int, Detection]] = []
        for i in indices:
            value = col[i]
            if value is None or not -_INF < value < _INF:
                continue
            evaluations += 1
            if skip:
                skip -= 1
                continue
            if best is None or sign * value < sign * (best * factor - offset):
                best = float(value)
                bad = 0
            else:
                bad += 1
            if cooldown_left > 0:
                cooldown_left -= 1
                bad = 0
            if bad > patience:
                self.best = best
                out.append((i, self._detection(steps[i], float(value), bad)))
                bad = 0
                cooldown_left = p.cooldown
        self.best = best
        self.bad_evaluations = bad
        self.cooldown_left = cooldown_left
        self._evaluations = evaluations
        self._skip = skip
        return out

    def _detection(self, step: int, value: float, bad: int) -> Detection:
        p = self.params
        best = self.best if self.best is not None else value
        direction = "improved" if p.mode == "min" else "increased"
        kind = "relative " if p.threshold_mode == "rel" else ""
        return Detection(
            detector=self.name,
            metric=p.monitor,
            step=step,
            value=value,
            reason=(
                f"{p.monitor} has not {direction} on its best {best:.6g} "
                f"(by a {kind}threshold of {p.threshold:g}) for {bad} evaluations "
                f"(patience {p.patience}); now {value:.6g} at step {step}"
            ),
            detail={"bad_evaluations": float(bad), "best": best, "patience": float(p.patience)},
        )

    def state_dict(self) -> dict[str, Any]:
        """Best, counters and pending skips (JSON-ready)."""
        return {
            "best": self.best,
            "bad_evaluations": self.bad_evaluations,
            "cooldown_left": self.cooldown_left,
            "evaluations": self._evaluations,
            "skip": self._skip,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        best = state.get("best")
        self.best = optional_float(best)
        self.bad_evaluations = int(state["bad_evaluations"])
        self.cooldown_left = int(state["cooldown_left"])
        self._evaluations = int(state.get("evaluations", 0))
        self._skip = int(state.get("skip", 0))

    def monitored(self) -> tuple[str, ...]:
        """The metric whose arrivals are the evaluations."""
        return (self.params.monitor,)
