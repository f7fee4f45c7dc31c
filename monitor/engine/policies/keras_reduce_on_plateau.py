"""``keras_reduce_on_plateau``: keras 3's ``ReduceLROnPlateau`` callback, epoch for epoch.

For jobs ported from keras, whose users expect keras's counting rather than torch's. Rule
(``keras.callbacks.ReduceLROnPlateau.on_epoch_end``, keras 3), applied each time the monitored
metric arrives::

    if cooldown_counter > 0:                 # cooldown is checked BEFORE the comparison
        cooldown_counter -= 1; wait = 0
    if best is None or improves(metric, best):
        best = metric; wait = 0
    elif cooldown_counter == 0:              # the evaluation that ends a cooldown counts
        wait += 1
        if wait >= patience:                 # >=, so patience=0 behaves like patience=1
            reduced = False
            for each group: if lr > float32(min_lr):
                lr = float32(max(lr * factor, min_lr)); reduced = True
            if reduced: cooldown_counter = cooldown; wait = 0
            # not reduced (every LR already at the floor): wait keeps growing

``improves(a, best)`` is keras's ``monitor_op(a - min_delta, best)`` where ``min_delta`` is
negated in min mode, i.e. ``float32(a + min_delta) < float32(best)`` (min) or
``float32(a - min_delta) > float32(best)`` (max): keras's ``ops.less`` / ``ops.greater`` turn
Python floats into float32 tensors before comparing, and we reproduce that rounding. The first
evaluation always becomes ``best`` — even NaN, after which nothing ever improves again (every
comparison with NaN is false), exactly as in keras.

Keras keeps the learning rate in a float32 variable: ``lrs`` are the float32 values (as Python
floats) that ``float(model.optimizer.learning_rate)`` gives back, including the initial LR.
Float32 rounding is emulated with :mod:`struct`, so the engine needs no numpy.

Differences from torch's counting (``reduce_on_plateau``): torch reduces when the bad count
*exceeds* patience (keras: reaches it), torch starts from ``best = ±inf`` (keras: the first value),
torch compares in float64 with a relative or absolute threshold (keras: absolute ``min_delta``
in float32), torch counts the cooldown after the comparison (keras: before), and torch skips a
change smaller than ``eps`` (keras: skips only when the LR is already at ``min_lr``).

Several param groups: keras has one LR per optimizer. With several groups the rule is applied
to each group, like keras does for the optimizers of a multi-optimizer: the cooldown starts if
any group was reduced.

``mode="auto"``: keras looks at the compiled model's metric objects; the daemon only sees the
name. ``loss`` (after an optional ``val_`` prefix) means min, like keras; keras's built-in metric
names whose direction is "up" (accuracy, auc, precision, recall, f1_score, r2_score, ...) and
any name containing ``acc`` mean max; names ending in ``loss``, ``error`` or ``crossentropy``
and keras's other built-in names mean min. Anything else is a ParamError asking for ``min`` or
``max`` (keras raises a ValueError in the same situation).

``scale_by(factor, min_lrs)`` applies the same per-group rule with the given floors (only groups
above ``float32(floor)`` move) and leaves ``best``, ``wait`` and ``cooldown_counter`` alone;
``set_lrs`` stores the float32 of each value.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..base import ParamError, Policy, optional_float
from .reduce_on_plateau import (
    _check_choice,
    _check_count,
    _check_factor,
    _check_lrs,
    _check_monitor,
    _check_number,
    _group_floors,
)

__all__ = ["KerasReduceOnPlateauParams", "KerasReduceOnPlateauPolicy", "float32", "resolve_mode"]

_PACK = struct.Struct("<f")


def float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), returned as a Python float.

    Values beyond the float32 range become ±inf, as a C cast (and numpy, and torch) does.
    """
    try:
        return float(_PACK.unpack(_PACK.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


# keras 3 built-in metrics whose ``_direction`` is "up" (their default names)
_UP_NAMES = frozenset(
    {
        "accuracy",
        "binary_accuracy",
        "categorical_accuracy",
        "sparse_categorical_accuracy",
        "top_k_categorical_accuracy",
        "sparse_top_k_categorical_accuracy",
        "auc",
        "precision",
        "recall",
        "precision_at_recall",
        "recall_at_precision",
        "sensitivity_at_specificity",
        "specificity_at_sensitivity",
        "f1_score",
        "fbeta_score",
        "r2_score",
        "cosine_similarity",
        "pearson_correlation",
        "concordance_correlation",
        "iou",
        "mean_iou",
        "binary_iou",
        "one_hot_iou",
        "one_hot_mean_iou",
    }
)
# keras 3 built-in metrics whose direction is "down" and whose names do not say so
_DOWN_NAMES = frozenset(
    {
        "mse",
        "mae",
        "mape",
        "msle",
        "logcosh",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
        "kl_divergence",
        "kld",
        "poisson",
    }
)


def resolve_mode(mode: str, monitor: str) -> Literal["min", "max"]:
    """The direction keras would use for ``monitor`` (see the module docstring for "auto")."""
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    name = monitor.removeprefix("val_")
    if name == "loss":
        return "min"
    if name in _UP_NAMES or "acc" in name:
        return "max"
    if name in _DOWN_NAMES or name.endswith(("loss", "error", "crossentropy")):
        return "min"
    raise ParamError(
        "mode",
        f"cannot tell from the name whether {monitor!r} should go up or down; "
        "set mode to 'min' or 'max'",
    )


@dataclass(frozen=True, slots=True)
class KerasReduceOnPlateauParams:
    """Parameters of ``keras_reduce_on_plateau``; names and defaults are keras 3's.

    ``min_delta`` must be >= 0 (keras silently takes its absolute value). ``min_lr`` is one
    floor for every group.
    """

    monitor: str = "val_loss"
    factor: float = 0.1
    patience: int = 10
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_monitor(self.monitor)
        object.__setattr__(self, "factor", _check_factor(self.factor))
        _check_count("patience", self.patience)
        _check_choice("mode", self.mode, ("auto", "min", "max"))
        min_delta = _check_number("min_delta", self.min_delta)
        if min_delta < 0:
            raise ParamError("min_delta", f"must be >= 0, got {self.min_delta!r}")
        object.__setattr__(self, "min_delta", min_delta)
        _check_count("cooldown", self.cooldown)
        min_lr = _check_number("min_lr", self.min_lr)
        if min_lr < 0:
            raise ParamError("min_lr", f"must be >= 0, got {self.min_lr!r}")
        object.__setattr__(self, "min_lr", min_lr)
        resolve_mode(self.mode, self.monitor)  # an undecidable "auto" is a parameter error


class KerasReduceOnPlateauPolicy(Policy):
    """Reduces the LR when ``monitor`` stops improving, counting exactly like keras 3."""

    kind: ClassVar[str] = "keras_reduce_on_plateau"

    def __init__(self, params: KerasReduceOnPlateauParams, initial_lrs: Sequence[float]) -> None:
        self.params = params
        self.monitor = params.monitor
        #: "min" or "max", after resolving mode "auto"
        self.direction: Literal["min", "max"] = resolve_mode(params.mode, params.monitor)
        # keras flips min_delta's sign in min mode and then compares ``value - min_delta``
        self._delta = -params.min_delta if self.direction == "min" else params.min_delta
        self._lrs = tuple(float32(x) for x in _check_lrs("initial_lrs", initial_lrs))
        self.min_lrs: tuple[float, ...] = (params.min_lr,) * len(self._lrs)
        #: the best metric so far; None before the first evaluation
        self.best: float | None = None
        #: consecutive bad evaluations outside cooldown (keras's ``wait``)
        self.wait: int = 0
        self.cooldown_counter: int = 0
        self.evaluations: int = 0
        self.position: int = 0

    @property
    def num_bad_epochs(self) -> int:
        """Same as :attr:`wait`; the name the exporter reads for both plateau policies."""
        return self.wait

    @property
    def lrs(self) -> tuple[float, ...]:
        return self._lrs

    def improves(self, current: float, best: float | None) -> bool:
        """keras's ``_is_improvement`` with its float32 comparison."""
        if best is None:
            return True
        shifted = float32(current - self._delta)
        if self.direction == "min":
            return shifted < float32(best)
        return shifted > float32(best)

    def step(self, position: int, metric: float | None) -> bool:
        """One record; an evaluation (keras's epoch end) when ``metric`` is not None."""
        self.position = position
        if metric is None:
            return False
        current = float(metric)
        self.evaluations += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self.improves(current, self.best):
            self.best = current
            self.wait = 0
            return False
        if self.cooldown_counter > 0:
            return False
        self.wait += 1
        if self.wait < self.params.patience:
            return False
        reduced, changed = self._reduce(self.params.factor, self.min_lrs)
        if reduced:
            self.cooldown_counter = self.params.cooldown
            self.wait = 0
        return changed

    def _reduce(self, factor: float, floors: Sequence[float]) -> tuple[bool, bool]:
        """(keras's ``reduced``, whether any float32 value actually changed)."""
        lrs = list(self._lrs)
        reduced = changed = False
        for i, old in enumerate(lrs):
            if old > float32(floors[i]):
                new = old * factor
                if floors[i] > new:  # max(new, min_lr), keeping keras's choice on ties
                    new = floors[i]
                lrs[i] = float32(new)
                reduced = True
                changed = changed or lrs[i] != old
        self._lrs = tuple(lrs)
        return reduced, changed

    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """Multiply each group's LR by ``factor`` with keras's floor rule; counters unchanged,
        except that a raise (``factor`` > 1) restarts the wait, as in ``reduce_on_plateau``."""
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"factor: must be finite and >= 0, got {factor!r}")
        floors = _group_floors("min_lrs", min_lrs, len(self._lrs))
        changed = self._reduce(factor, floors)[1]
        if changed and factor > 1.0:
            self.wait = 0
        return changed

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Force the LRs (stored as float32, as keras's variable would)."""
        new = _check_lrs("lrs", lrs)
        if len(new) != len(self._lrs):
            raise ValueError(f"lrs: expected {len(self._lrs)} values (one per param group), got {len(new)}")
        self._lrs = tuple(float32(x) for x in new)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready; ``best`` is None before the first evaluation and may be NaN or ±inf."""
        return {
            "kind": self.kind,
            "lrs": list(self._lrs),
            "best": self.best,
            "wait": self.wait,
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
        self._lrs = tuple(float32(x) for x in lrs)
        best = state["best"]
        self.best = optional_float(best)
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.evaluations = int(state.get("evaluations", 0))
        self.position = int(state.get("position", 0))
