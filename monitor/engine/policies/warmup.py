"""``warmup``: a linear LR warmup in front of any policy (torch's LinearLR, then SequentialLR).

Rule, with ``N = total_iters`` and ``inner`` the wrapped policy::

    position t < N:   lr = (start_factor + (1 - start_factor) * t / N) * inner_lr_at_0
    position t >= N:  lr = the inner policy's LR at its position t - N

so the LR rises linearly from ``start_factor`` times the inner policy's first LR towards that
LR, and at ``t = N`` the inner policy takes over with its clock starting at 0. This is torch's
``SequentialLR(optimizer, [LinearLR(optimizer, start_factor, end_factor=1.0, total_iters=N),
inner], milestones=[N])``. The momentum during warmup is the inner policy's momentum at its
position 0 (for cyclic/one_cycle: ``max_momentum``, as torch sets it when the inner scheduler
is built).

The wrapper works with every policy, step-driven or not:

* During warmup the inner policy is **not stepped**: a plateau policy ignores the metric
  evaluations that arrive during warmup (the LR is still rising, so "no improvement" means
  nothing yet), and a step-driven one stays at its position 0. From ``t >= N`` on, every
  ``step(t, metric)`` is passed on as ``inner.step(t - N, metric)`` and its return value is
  returned.
* ``segment()``: during warmup, a ``warmup`` segment whose ``then`` is the inner policy's
  segment, or a ``constant`` segment of the inner policy's LRs when it has none (a plateau
  policy). After warmup, the inner policy's segment (None for a plateau policy, whose LR
  changes then reach the job as set-lr decisions).
* ``origin_step`` set on the wrapper moves the inner policy's ``origin_step`` to
  ``origin_step + N``, so the inner segment sent after warmup lines up with job steps.
* ``scale_by(factor, min_lrs)`` is the inner policy's: during warmup the floor is checked
  against the LR the warmup rises to (the inner LR), not against the deliberately small
  warmup LRs, which may well lie below the floor.
* ``set_lrs(lrs)`` during warmup rescales the inner policy so that the warmup LR at the
  current position equals ``lrs`` (the warmup then goes on rising, to ``lrs / factor``);
  after warmup it is the inner policy's ``set_lrs``.

Comparison with torch: torch's LinearLR computes recursively (each step multiplies the LR
it set before by ``1 + (1 - start_factor) / (N * start_factor + (t - 1) * (1 - start_factor))``),
so its LRs drift from the closed form by about one rounding per step; ours is the closed form
(bit-identical to LinearLR's own ``_get_closed_form_lr``) and agrees with the recursive LRs to
well within 1e-12 relative. One corner differs: torch warms up towards the optimizer's LR
when SequentialLR is built (for OneCycleLR ``max_lr / div_factor``), we towards the inner
policy's LR at its position 0 — the same, except for a one-cycle whose rising phase is
shorter than one step (``pct_start * total_steps < 1``). ``total_iters = 0`` means no warmup, as with
``SequentialLR(milestones=[0])``. torch's ``end_factor`` is fixed at 1 (a warmup ends at the
inner policy's LR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lrpilot.schedules import constant_segment, linear_warmup_factor

from ..base import ParamError, Policy
from .constant import check_int, check_number, set_lrs_through

__all__ = ["Warmup", "WarmupParams"]


@dataclass(frozen=True, slots=True)
class WarmupParams:
    """Parameters of a warmup; names and defaults are torch's ``LinearLR``'s."""

    total_iters: int = 5
    start_factor: float = 1.0 / 3

    def __post_init__(self) -> None:
        check_int("total_iters", self.total_iters, 0)
        start = check_number("start_factor", self.start_factor)
        if not 0.0 < start <= 1.0:
            raise ParamError("start_factor", f"must be > 0 and <= 1, got {self.start_factor!r}")
        object.__setattr__(self, "start_factor", start)


class Warmup(Policy):
    """Linear warmup over ``total_iters`` positions, then the wrapped policy."""

    kind: ClassVar[str] = "warmup"

    def __init__(self, params: WarmupParams, inner: Policy, origin_step: int = 0) -> None:
        if not isinstance(inner, Policy):
            raise TypeError(f"inner: expected a Policy, got {type(inner).__name__}")
        self.params = params
        self.inner = inner
        self.monitor = inner.monitor
        self._position = 0
        self._origin_step = 0
        self.origin_step = origin_step

    @property
    def origin_step(self) -> int:
        """The job step at which the warmup's position is 0."""
        return self._origin_step

    @origin_step.setter
    def origin_step(self, value: int) -> None:
        self._origin_step = int(value)
        if hasattr(self.inner, "origin_step"):
            self.inner.origin_step = self._origin_step + self.params.total_iters

    @property
    def position(self) -> int:
        """The highest position seen so far."""
        return self._position

    @property
    def warming_up(self) -> bool:
        """True until the position reaches ``total_iters``."""
        return self._position < self.params.total_iters

    def _factor(self) -> float:
        p = self.params
        return linear_warmup_factor(self._position, p.start_factor, p.total_iters)

    # -- Policy API

    @property
    def lrs(self) -> tuple[float, ...]:
        if self.warming_up:
            factor = self._factor()
            return tuple(factor * x for x in self.inner.lrs)
        return self.inner.lrs

    @property
    def momentums(self) -> tuple[float, ...] | None:
        return self.inner.momentums

    def step(self, position: int, metric: float | None) -> bool:
        """Advance; from ``total_iters`` on, step the inner policy (module docstring)."""
        self._position = max(self._position, int(position))
        if self.warming_up:
            return False
        return self.inner.step(max(0, int(position) - self.params.total_iters), metric)

    def rewind(self, position: int) -> None:
        """Back to ``position`` (and the inner policy to its own) after a rollback."""
        self._position = min(self._position, max(0, int(position)))
        self.inner.rewind(max(0, int(position) - self.params.total_iters))

    def segment(self) -> dict[str, Any] | None:
        if not self.warming_up:
            return self.inner.segment()
        then = self.inner.segment()
        if then is None:
            then = constant_segment(list(self.inner.lrs))
        return {
            "kind": self.kind,
            "origin_step": self._origin_step,
            "scale": 1.0,
            "params": {
                "total_iters": self.params.total_iters,
                "start_factor": self.params.start_factor,
            },
            "then": then,
        }

    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """The inner policy's ``scale_by`` (during warmup, floors apply to the inner LR)."""
        return self.inner.scale_by(factor, min_lrs)

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Make the current LR ``lrs`` (during warmup by rescaling the inner policy)."""
        set_lrs_through(self.inner, lrs, self._factor() if self.warming_up else 1.0)

    # -- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "position": self._position,
            "origin_step": self._origin_step,
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"kind: state is for {state.get('kind')!r}, not {self.kind!r}")
        self._position = int(state["position"])
        self._origin_step = int(state.get("origin_step", self._origin_step))
        self.inner.load_state_dict(state["inner"])
