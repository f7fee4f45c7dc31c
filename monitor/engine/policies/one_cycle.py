"""``one_cycle``: torch's ``OneCycleLR`` (the 1cycle policy, Smith & Topin 2018), step for step.

Rule at position ``t``, per param group, with ``initial_lr = max_lr / div_factor`` and
``min_lr = initial_lr / final_div_factor``. The schedule is split into phases that end at
these positions (floats, as torch computes them)::

    two phases (default):  pct_start * total_steps - 1,  total_steps - 1
    three_phase:           pct_start * total_steps - 1,  2 * pct_start * total_steps - 2,
                           total_steps - 1

``t`` falls in the first phase whose end it does not pass (the last phase takes the rest);
``pct = (t - phase_start) / (phase_end - phase_start)`` and the value moves from the phase's
start to its end by ``anneal_strategy``::

    cos:     end + (start - end) / 2 * (cos(pi * pct) + 1)
    linear:  (end - start) * pct + start

    LR:        initial -> max -> min                  (two phases)
               initial -> max -> initial -> min       (three_phase)
    momentum:  max -> base -> max                     (two phases)
               max -> base -> max -> max              (three_phase)

Comparison with torch: the same float operations in the same order (torch computes
``OneCycleLR`` in closed form), so LRs and momentums are bit-identical at every position a
batch trains with, 0 .. ``total_steps - 1``; the parity tests run torch beside it. Like
torch, the LR comes from ``max_lr`` (torch overwrites the optimizer's LR with
``max_lr / div_factor``), so the job's initial LRs only give the number of param groups;
``total_steps`` may be given as ``epochs * steps_per_epoch`` instead.

Differences, on purpose:

* From position ``total_steps - 1`` on, the LR and momentum hold their final values. torch
  raises once stepped past ``total_steps``, and at exactly ``total_steps`` (after the last
  ``scheduler.step()``, a value no batch trains with) it extrapolates past the end of the
  anneal — with ``linear`` that value is usually negative.
* ``pct_start`` must lie strictly between 0 and 1 (torch accepts 0 and 1, which make a
  phase of zero length), and ``pct_start * total_steps == 1`` is refused because torch
  divides 0 by 0 at position 0 then.
* torch raises if ``cycle_momentum`` is on and the optimizer has no momentum; the daemon
  cannot see the optimizer, so the client applies momentums only where the optimizer has them.

``scale_by``/``set_lrs`` multiply the whole remaining cycle (see ``constant.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..base import ParamError
from .constant import (
    ScheduledPolicy,
    check_group_values,
    check_int,
    check_number,
    check_ordered,
    per_group,
)

__all__ = ["OneCycleParams", "OneCyclePolicy"]


@dataclass(frozen=True, slots=True)
class OneCycleParams:
    """Parameters of ``one_cycle``; names and defaults are torch's ``OneCycleLR``'s.

    Give ``total_steps``, or ``epochs`` and ``steps_per_epoch`` (``total_steps`` wins, as in
    torch). ``max_lr``, ``base_momentum`` and ``max_momentum`` are one value for every param
    group or a tuple with one value per group.
    """

    max_lr: tuple[float, ...] | float
    total_steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    pct_start: float = 0.3
    anneal_strategy: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: tuple[float, ...] | float = 0.85
    max_momentum: tuple[float, ...] | float = 0.95
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_lr", check_group_values("max_lr", self.max_lr))
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps, 1)
        elif self.epochs is not None and self.steps_per_epoch is not None:
            check_int("epochs", self.epochs, 1)
            check_int("steps_per_epoch", self.steps_per_epoch, 1)
        else:
            raise ParamError("total_steps", "give total_steps, or both epochs and steps_per_epoch")
        pct = check_number("pct_start", self.pct_start)
        if not 0.0 < pct < 1.0:
            raise ParamError("pct_start", f"must be > 0 and < 1, got {self.pct_start!r}")
        object.__setattr__(self, "pct_start", pct)
        if float(pct * self.steps) - 1 == 0.0:
            raise ParamError(
                "pct_start",
                f"pct_start * total_steps is exactly 1 ({pct!r} * {self.steps}): the warm-up "
                "phase would have length 0 (torch divides by zero there)",
            )
        if self.anneal_strategy not in ("cos", "linear"):
            raise ParamError(
                "anneal_strategy", f"must be cos or linear, got {self.anneal_strategy!r}"
            )
        for field in ("cycle_momentum", "three_phase"):
            if not isinstance(getattr(self, field), bool):
                raise ParamError(field, f"must be true or false, got {getattr(self, field)!r}")
        low = check_group_values("base_momentum", self.base_momentum)
        high = check_group_values("max_momentum", self.max_momentum)
        object.__setattr__(self, "base_momentum", low)
        object.__setattr__(self, "max_momentum", high)
        for field, value in (("base_momentum", low), ("max_momentum", high)):
            for x in value if isinstance(value, tuple) else (value,):
                if x > 1.0:
                    raise ParamError(field, f"a momentum (or beta1) must be <= 1, got {x!r}")
        check_ordered("base_momentum", low, "max_momentum", high)
        for field in ("div_factor", "final_div_factor"):
            value = check_number(field, getattr(self, field))
            if value <= 0:
                raise ParamError(field, f"must be > 0, got {getattr(self, field)!r}")
            object.__setattr__(self, field, value)

    @property
    def steps(self) -> int:
        """The cycle's length: ``total_steps``, or ``epochs * steps_per_epoch``."""
        if self.total_steps is not None:
            return self.total_steps
        assert self.epochs is not None and self.steps_per_epoch is not None
        return self.epochs * self.steps_per_epoch


class OneCyclePolicy(ScheduledPolicy):
    """torch's OneCycleLR as a schedule segment the job evaluates locally."""

    kind: ClassVar[str] = "one_cycle"

    def __init__(
        self, params: OneCycleParams, initial_lrs: Sequence[float], origin_step: int = 0
    ) -> None:
        self.params = params
        groups = len(initial_lrs)
        if groups < 1:
            raise ValueError("initial_lrs: need at least one param group")
        self.max_lrs = per_group("max_lr", params.max_lr, groups)
        self.base_momentums = per_group("base_momentum", params.base_momentum, groups)
        self.max_momentums = per_group("max_momentum", params.max_momentum, groups)
        for i, (lo, hi) in enumerate(zip(self.base_momentums, self.max_momentums, strict=True)):
            if hi < lo:
                raise ParamError(
                    "max_momentum", f"group {i}: max_momentum {hi!r} is below base_momentum {lo!r}"
                )
        super().__init__(groups, origin_step)

    def _segment_params(self) -> dict[str, Any]:
        p = self.params
        return {
            "max_lr": list(self.max_lrs),
            "total_steps": p.steps,
            "pct_start": p.pct_start,
            "anneal_strategy": p.anneal_strategy,
            "div_factor": p.div_factor,
            "final_div_factor": p.final_div_factor,
            "three_phase": p.three_phase,
            "cycle_momentum": p.cycle_momentum,
            "base_momentum": list(self.base_momentums),
            "max_momentum": list(self.max_momentums),
        }
