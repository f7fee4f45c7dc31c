"""``constant``: hold the job's initial learning rates; and the base of every scheduled policy.

Rule: the LR of every param group stays at the LR the job started with (``initial_lrs``),
times the policy's ``scale``. torch's counterpart is no scheduler at all (or
``LambdaLR(lr_lambda=lambda t: 1.0)``). The policy still describes itself as a ``constant``
schedule segment, so that a detector's response (``scale_by``) or an operator's set-lr reaches
the job as a new segment like for every other step-driven policy.

:class:`ScheduledPolicy` is what constant, cyclic, one_cycle and cosine_restarts share: a
position that only moves forward, a ``scale`` multiplying the whole schedule, an
``origin_step`` (the job step at which the position is 0, set by the engine), and the
segment that the job evaluates with the very functions (``lrpilot.schedules``) the policy
uses for its own ``lrs``, so that the job and the daemon agree to the bit.

Scaling (``scale_by(factor, min_lrs)``, a detector's response): ``scale`` is multiplied by
``factor``, except that a reduction stops where the LR *at the current position* would go
below ``min_lrs`` in any group: the effective factor is the largest of ``factor`` and
``min_lrs[i] / lr[i]`` over the groups (groups whose LR is 0 impose nothing). If that leaves
no reduction, nothing changes and ``scale_by`` returns False. The floor holds at the current
position only: later positions of a cycle may go lower, as the schedule's shape dictates.

``set_lrs(lrs)`` (an operator's set-lr) sets ``scale`` so that the first group's LR at the
current position equals ``lrs[0]`` (the other groups keep their ratios to it, as the schedule
defines them). It raises ValueError when the schedule's own LR of the first group is 0 here.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lrpilot.schedules import lrs_at_position, momentums_at_position

from ..base import ParamError, Policy

__all__ = [
    "ConstantParams",
    "ConstantPolicy",
    "ScheduledPolicy",
    "check_group_values",
    "check_initial_lrs",
    "check_int",
    "check_number",
    "check_ordered",
    "per_group",
    "set_lrs_through",
]


# ----------------------------------------------------------------------- validation helpers
# (shared with cyclic.py, one_cycle.py, cosine_restarts.py and warmup.py)


def check_number(field: str, value: object) -> float:
    """``value`` as a finite float, or a ParamError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(field, f"must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ParamError(field, f"must be a finite number, got {value!r}")
    return out


def check_int(field: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or a ParamError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ParamError(field, f"must be >= {minimum}, got {value}")
    return value


def check_group_values(
    field: str, value: object, minimum: float = 0.0
) -> tuple[float, ...] | float:
    """A per-group parameter: one finite number >= ``minimum`` or a non-empty tuple of them."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParamError(field, "a per-group list needs at least one value")
        out = tuple(check_number(f"{field}[{i}]", x) for i, x in enumerate(value))
        for i, x in enumerate(out):
            if x < minimum:
                raise ParamError(f"{field}[{i}]", f"must be >= {minimum:g}, got {x!r}")
        return out
    number = check_number(field, value)
    if number < minimum:
        raise ParamError(field, f"must be >= {minimum:g}, got {value!r}")
    return number


def check_ordered(
    low_field: str,
    low: tuple[float, ...] | float,
    high_field: str,
    high: tuple[float, ...] | float,
) -> None:
    """ParamError unless ``high >= low`` in every group that both values already determine."""
    lows = low if isinstance(low, tuple) else None
    highs = high if isinstance(high, tuple) else None
    groups = len(lows) if lows is not None else len(highs) if highs is not None else 1
    if lows is not None and highs is not None and len(lows) != len(highs):
        raise ParamError(
            high_field, f"has {len(highs)} values but {low_field} has {len(lows)} (one per param group)"
        )
    for i in range(groups):
        lo = lows[i] if lows is not None else float(low)  # type: ignore[arg-type]
        hi = highs[i] if highs is not None else float(high)  # type: ignore[arg-type]
        if hi < lo:
            where = f"{high_field}[{i}]" if groups > 1 else high_field
            raise ParamError(where, f"must be >= {low_field} ({lo!r}), got {hi!r}")


def per_group(field: str, value: tuple[float, ...] | float, groups: int) -> list[float]:
    """One value per param group (like torch's ``_format_param``): a scalar is repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ParamError(
                field, f"expected {groups} values (one per param group), got {len(value)}"
            )
        return [float(x) for x in value]
    return [float(value)] * groups


def set_lrs_through(inner: Policy, lrs: Sequence[float], factor: float) -> None:
    """A wrapper's set-lr: make ``factor`` times ``inner``'s LRs equal ``lrs`` (warmup and
    anneal scale the policy they wrap). A factor of 0 (an anneal's last step) sets ``lrs``."""
    if factor > 0.0 and math.isfinite(factor):
        inner.set_lrs([float(x) / factor for x in lrs])
    else:
        inner.set_lrs(lrs)


def check_initial_lrs(lrs: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(x) for x in lrs)
    if not out:
        raise ValueError("initial_lrs: need at least one param group")
    for i, lr in enumerate(out):
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"initial_lrs[{i}]: a learning rate must be finite and >= 0, got {lr!r}")
    return out


def _group_floors(floors: Sequence[float], groups: int) -> tuple[float, ...]:
    """One floor per group: none given means 0, one value applies to every group."""
    out = tuple(float(x) for x in floors)
    if not out:
        return (0.0,) * groups
    if len(out) == 1 and groups != 1:
        return out * groups
    if len(out) != groups:
        raise ValueError(f"min_lrs: expected {groups} values (one per param group), got {len(out)}")
    return out


# ----------------------------------------------------------------------- base


class ScheduledPolicy(Policy):
    """A step-driven policy: a pure function of the position, times ``scale``.

    Subclasses give ``kind`` and the segment ``params`` (:meth:`_segment_params`); the LR and
    momentum at a position come from ``lrpilot.schedules``, the same code the job runs.
    """

    def __init__(self, groups: int, origin_step: int = 0) -> None:
        #: the job step at which the position is 0 (the engine moves it when it re-anchors)
        self.origin_step = int(origin_step)
        #: multiplies every LR of the schedule (detector responses and set-lr change it)
        self.scale = 1.0
        self._groups = groups
        self._position = 0
        self._params: dict[str, Any] = self._segment_params()

    @abc.abstractmethod
    def _segment_params(self) -> dict[str, Any]:
        """The segment's ``params`` (JSON-ready; per-group values are lists)."""

    @property
    def position(self) -> int:
        """Number of ``scheduler.step()`` calls torch would have made."""
        return self._position

    def _segment(self, scale: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "origin_step": self.origin_step,
            "scale": scale,
            "params": self._params,
        }

    def _unscaled_lrs(self) -> list[float]:
        return lrs_at_position(self._segment(1.0), self._position)

    # -- Policy API

    @property
    def lrs(self) -> tuple[float, ...]:
        return tuple(lrs_at_position(self._segment(self.scale), self._position))

    @property
    def momentums(self) -> tuple[float, ...] | None:
        out = momentums_at_position(self._segment(self.scale), self._position)
        return None if out is None else tuple(out)

    def step(self, position: int, metric: float | None) -> bool:
        """Move to ``position`` (a smaller one is ignored: positions only go forward)."""
        if position > self._position:
            self._position = int(position)
        return False

    def rewind(self, position: int) -> None:
        """Back to ``position`` after a rollback that restored the job's step."""
        self._position = min(self._position, max(0, int(position)))

    def segment(self) -> dict[str, Any]:
        """A fresh segment dict (callers may keep or change it)."""
        seg = self._segment(self.scale)
        seg["params"] = {k: list(v) if isinstance(v, list) else v for k, v in self._params.items()}
        return seg

    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """Scale the schedule from now on; a reduction stops at ``min_lrs`` (module docstring)."""
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"factor: must be finite and > 0, got {factor!r}")
        unscaled = self._unscaled_lrs()
        floors = _group_floors(min_lrs, len(unscaled))
        effective = factor
        if factor < 1.0:
            for lr, floor in zip(unscaled, floors, strict=True):
                current = self.scale * lr
                if current > 0 and floor > 0:
                    effective = max(effective, floor / current)
            if effective >= 1.0:
                return False
            # floor / current may round a hair low: nudge up until no group ends below its floor
            while any(
                (self.scale * effective) * lr < floor
                for lr, floor in zip(unscaled, floors, strict=True)
                if self.scale * lr > 0 and floor > 0
            ):
                effective = math.nextafter(effective, math.inf)
        if effective == 1.0:
            return False
        self.scale *= effective
        return True

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Rescale so that the first group's LR here equals ``lrs[0]`` (module docstring)."""
        if not lrs:
            raise ValueError("lrs: need at least one value")
        target = float(lrs[0])
        if not math.isfinite(target) or target < 0:
            raise ValueError(f"lrs[0]: a learning rate must be finite and >= 0, got {target!r}")
        own = self._unscaled_lrs()[0]
        if own == 0:
            raise ValueError(
                f"lrs: the {self.kind} schedule's LR is 0 at position {self._position}, "
                "so no scale makes it equal the requested LR"
            )
        self.scale = target / own

    # -- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "position": self._position,
            "scale": self.scale,
            "origin_step": self.origin_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"kind: state is for {state.get('kind')!r}, not {self.kind!r}")
        scale = float(state["scale"])
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale: must be finite and >= 0, got {scale!r}")
        self._position = int(state["position"])
        self.scale = scale
        self.origin_step = int(state.get("origin_step", self.origin_step))


# ----------------------------------------------------------------------- constant


@dataclass(frozen=True, slots=True)
class ConstantParams:
    """``constant`` has no parameters: it holds the LRs the job started with."""


class ConstantPolicy(ScheduledPolicy):
    """Holds the job's initial LRs (times ``scale``)."""

    kind: ClassVar[str] = "constant"

    def __init__(
        self, params: ConstantParams, initial_lrs: Sequence[float], origin_step: int = 0
    ) -> None:
        self.params = params
        self._initial_lrs = check_initial_lrs(initial_lrs)
        super().__init__(len(self._initial_lrs), origin_step)

    def _segment_params(self) -> dict[str, Any]:
        return {"lrs": list(self._initial_lrs)}
