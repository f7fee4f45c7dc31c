"""``reduce_on_plateau``: torch's ``ReduceLROnPlateau``, evaluation for evaluation.

Rule (torch 2.x, ``torch.optim.lr_scheduler.ReduceLROnPlateau.step(metric)``), applied each time
the monitored metric arrives; records without it leave the policy untouched::

    better = is_better(metric, best)          # table below; any comparison with NaN is False
    if better:   best = metric; num_bad_epochs = 0
    else:        num_bad_epochs += 1
    if cooldown_counter > 0:                  # in cooldown: bad evaluations do not count
        cooldown_counter -= 1; num_bad_epochs = 0
    if num_bad_epochs > patience:             # strictly greater: patience=0 reduces on the
        for each group i:                     # first bad evaluation
            new = max(old * factor, min_lr[i])
            if old - new > eps: lr[i] = new   # a change smaller than eps is skipped
        cooldown_counter = cooldown; num_bad_epochs = 0

``is_better(a, best)`` with ``best`` starting at +inf (mode min) or -inf (mode max)::

    min, rel:  a < best * (1 - threshold)
    min, abs:  a < best - threshold
    max, rel:  a > best * (threshold + 1)
    max, abs:  a > best + threshold

The arithmetic is done in the same order as torch so that results are bit-identical. Two
consequences worth knowing, both reproduced on purpose: in ``rel`` mode with a negative
``best`` the threshold points the "wrong" way (``best * (1 - threshold)`` lies *above* a negative
``best`` in min mode, so a slightly worse value still counts as better); and a NaN metric is
always a bad evaluation (never becomes ``best``), while ``-inf`` (mode min) becomes ``best`` and
then nothing is better any more.

``scale_by(factor, min_lrs)`` (a reduction asked for by a detector's response) uses the same
per-group rule as a plateau reduction — ``new = max(old * factor, min_lrs[i])``, applied only
if ``old - new > eps`` — with the floors passed in; it leaves ``best``, ``num_bad_epochs`` and
``cooldown_counter`` as they are. A factor above 1 (an ``increase`` response) raises every
group's LR by it, applied where ``new - old > eps``; floors play no part; and it sets
``num_bad_epochs`` to 0: the raised LR is judged on evaluations of its own (otherwise a
slow, steady descent that ``slow_progress`` is speeding up counts as a plateau under a
``threshold`` above its pace, and the policy cuts what the probe just raised).
``set_lrs`` forces the LRs and leaves the counters alone too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..base import ParamError, Policy

__all__ = ["ReduceOnPlateauParams", "ReduceOnPlateauPolicy"]


# ----------------------------------------------------------------------- validation helpers
# (shared with keras_reduce_on_plateau.py)


def _check_number(field: str, value: object) -> float:
    """``value`` as a finite float, or a ParamError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(field, f"must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ParamError(field, f"must be a finite number, got {value!r}")
    return out


def _check_count(field: str, value: object) -> int:
    """``value`` as an int >= 0, or a ParamError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(field, f"must be an integer, got {value!r}")
    if value < 0:
        raise ParamError(field, f"must be >= 0, got {value}")
    return value


def _check_factor(value: object) -> float:
    factor = _check_number("factor", value)
    if not 0.0 < factor < 1.0:
        raise ParamError("factor", f"must be > 0 and < 1, got {value!r}")
    return factor


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ParamError(field, f"must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _check_monitor(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ParamError("monitor", f"must be a non-empty metric name, got {value!r}")
    return value


def _check_lrs(field: str, lrs: Sequence[float]) -> tuple[float, ...]:
    """Learning rates per group: at least one, each finite and >= 0 (ValueError otherwise)."""
    out = tuple(float(x) for x in lrs)
    if not out:
        raise ValueError(f"{field}: need at least one param group")
    for i, lr in enumerate(out):
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{field}[{i}]: a learning rate must be finite and >= 0, got {lr!r}")
    return out


def _group_floors(field: str, floors: Sequence[float], groups: int) -> tuple[float, ...]:
    """One floor per group from ``floors`` (one value for all groups, or one per group)."""
    out = tuple(float(x) for x in floors)
    if len(out) == 1 and groups != 1:
        out = out * groups
    if len(out) != groups:
        raise ValueError(f"{field}: expected {groups} values (one per param group), got {len(out)}")
    return out


# ----------------------------------------------------------------------- params


@dataclass(frozen=True, slots=True)
class ReduceOnPlateauParams:
    """Parameters of ``reduce_on_plateau``; names and defaults are torch's.

    ``min_lr`` is one floor for every param group or a tuple with one floor per group (its
    length is checked against the job's groups when the policy is built). ``monitor`` names
    the metric whose arrivals are the evaluations.
    """

    mode: Literal["min", "max"] = "min"
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = 0
    min_lr: tuple[float, ...] | float = 0.0
    eps: float = 1e-8
    monitor: str = "val_loss"

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, ("min", "max"))
        object.__setattr__(self, "factor", _check_factor(self.factor))
        _check_count("patience", self.patience)
        threshold = _check_number("threshold", self.threshold)
        if threshold < 0:
            raise ParamError("threshold", f"must be >= 0, got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)
        _check_choice("threshold_mode", self.threshold_mode, ("rel", "abs"))
        _check_count("cooldown", self.cooldown)
        if isinstance(self.min_lr, (list, tuple)):
            if not self.min_lr:
                raise ParamError("min_lr", "a per-group list needs at least one value")
            floors = tuple(_check_number(f"min_lr[{i}]", x) for i, x in enumerate(self.min_lr))
            for i, floor in enumerate(floors):
                if floor < 0:
                    raise ParamError(f"min_lr[{i}]", f"must be >= 0, got {floor!r}")
            object.__setattr__(self, "min_lr", floors)
        else:
            floor = _check_number("min_lr", self.min_lr)
            if floor < 0:
                raise ParamError("min_lr", f"must be >= 0, got {self.min_lr!r}")
            object.__setattr__(self, "min_lr", floor)
        eps = _check_number("eps", self.eps)
        if eps < 0:
            raise ParamError("eps", f"must be >= 0, got {self.eps!r}")
        object.__setattr__(self, "eps", eps)
        _check_monitor(self.monitor)

    def min_lrs_for(self, groups: int) -> tuple[float, ...]:
        """The floor of each of ``groups`` param groups (ParamError if a tuple has the wrong length)."""
        if isinstance(self.min_lr, tuple):
            if len(self.min_lr) != groups:
                raise ParamError(
                    "min_lr",
                    f"expected {groups} values (one per param group), got {len(self.min_lr)}",
                )
            return self.min_lr
        return (float(self.min_lr),) * groups


# ----------------------------------------------------------------------- policy


_SPELLED = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}


class ReduceOnPlateauPolicy(Policy):
    """Divides the LR by ``1/factor`` when ``monitor`` stops improving, exactly like torch."""

    kind: ClassVar[str] = "reduce_on_plateau"

    def __init__(self, params: ReduceOnPlateauParams, initial_lrs: Sequence[float]) -> None:
        self.params = params
        self.monitor = params.monitor
        self._lrs = _check_lrs("initial_lrs", initial_lrs)
        self.min_lrs: tuple[float, ...] = params.min_lrs_for(len(self._lrs))
        #: the best metric so far (+inf / -inf before the first good evaluation)
        self.best: float = math.inf if params.mode == "min" else -math.inf
        #: consecutive bad evaluations (what torch calls num_bad_epochs)
        self.num_bad_epochs: int = 0
        #: evaluations left in which bad evaluations are ignored
        self.cooldown_counter: int = 0
        #: number of evaluations so far (torch's last_epoch)
        self.evaluations: int = 0
        #: the last position the engine passed in
        self.position: int = 0

    # -- Policy API

    @property
    def lrs(self) -> tuple[float, ...]:
        return self._lrs

    def is_better(self, a: float, best: float) -> bool:
        """torch's ``_is_better``, operand for operand (see the module docstring)."""
        p = self.params
        if p.mode == "min":
            if p.threshold_mode == "rel":
                return a < best * (1.0 - p.threshold)
            return a < best - p.threshold
        if p.threshold_mode == "rel":
            return a > best * (p.threshold + 1.0)
        return a > best + p.threshold

    def step(self, position: int, metric: float | None) -> bool:
        """One record; an evaluation when ``metric`` is not None. True if the LRs changed."""
        self.position = position
        if metric is None:
            return False
        current = float(metric)
        self.evaluations += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.params.patience:
            changed = self._reduce(self.params.factor, self.min_lrs)
            self.cooldown_counter = self.params.cooldown
            self.num_bad_epochs = 0
            return changed
        return False

    def _reduce(self, factor: float, floors: Sequence[float]) -> bool:
        lrs = list(self._lrs)
        changed = False
        eps = self.params.eps
        for i, old in enumerate(lrs):
            new = old * factor
            if floors[i] > new:  # max(new, floor), keeping torch's choice on ties
                new = floors[i]
            if old - new > eps or (factor > 1.0 and new - old > eps):
                lrs[i] = new
                changed = True
        self._lrs = tuple(lrs)
        return changed

    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """Multiply every group's LR by ``factor`` with the plateau rule (floor, then eps); > 1 raises."""
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"factor: must be finite and >= 0, got {factor!r}")
        floors = _group_floors("min_lrs", min_lrs, len(self._lrs))
        changed = self._reduce(factor, floors)
        if changed and factor > 1.0:
            self.num_bad_epochs = 0  # a raised LR is judged on evaluations of its own
        return changed

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Force the LRs (operator set-lr); counters stay as they are."""
        new = _check_lrs("lrs", lrs)
        if len(new) != len(self._lrs):
            raise ValueError(f"lrs: expected {len(self._lrs)} values (one per param group), got {len(new)}")
        self._lrs = new

    # -- persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready; a non-finite ``best`` (±inf before the first evaluation, as torch's) is
        spelled as JSON spells it ("Infinity", "-Infinity", "NaN"), which float() reads back.

        The daemon writes a job's state many times a second, and a bare non-finite float
        anywhere in it sends the whole state's JSON encoding down a slower path.
        """
        best = float(self.best)
        return {
            "kind": self.kind,
            "lrs": list(self._lrs),
            "best": best if best - best == 0.0 else _SPELLED[repr(best)],
            "num_bad_epochs": self.num_bad_epochs,
            "cooldown_counter": self.cooldown_counter,
            "evaluations": self.evaluations,
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"kind: state is for {state.get('kind')!r}, not {self.kind!r}")
        lrs = _check_lrs("lrs", state["lrs"])
        if len(lrs) != len(self._lrs):
            raise ValueError(f"lrs: expected {len(self._lrs)} values, got {len(lrs)}")
        self._lrs = lrs
        self.best = float(state["best"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.evaluations = int(state.get("evaluations", 0))
        self.position = int(state.get("position", 0))
