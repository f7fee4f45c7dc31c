"""``cyclic``: torch's ``CyclicLR`` (cyclical learning rates, Smith 2017), step for step.

Rule at position ``t`` (torch's ``last_epoch``), per param group::

    total  = step_size_up + step_size_down          # step_size_down defaults to step_size_up
    cycle  = floor(1 + t / total)                   # 1, 2, 3, ...
    x      = 1 + t / total - cycle                  # where in the cycle, 0 <= x < 1
    frac   = x / ratio if x <= ratio else (x - 1) / (ratio - 1)   # ratio = step_size_up / total
    lr     = base_lr + (max_lr - base_lr) * frac * amplitude
    amplitude = 1                       (triangular)
              = 1 / 2 ** (cycle - 1)    (triangular2: halves every cycle)
              = gamma ** t              (exp_range: decays every step)

With ``cycle_momentum`` the momentum (SGD's ``momentum``, or Adam's ``beta1``) moves the
other way: ``max_momentum - (max_momentum - base_momentum) * frac * amplitude``.

Comparison with torch: the same float operations in the same order (torch computes
``CyclicLR`` in closed form), so LRs and momentums are bit-identical; the parity tests run
torch beside it. Like torch, ``base_lr`` is a parameter (torch writes it into the optimizer),
so the job's initial LRs only give the number of param groups. torch's ``scale_fn`` /
``scale_mode`` (a custom Python callable) are not offered: a config file cannot carry a
function. torch raises if ``cycle_momentum`` is on and the optimizer has no momentum; the
daemon cannot see the optimizer, so the client applies momentums only where the optimizer
has them.

Also on purpose: ``gamma`` must lie in (0, 1] (above 1, ``gamma ** t`` grows without bound and
overflows), and triangular2 keeps working past cycle 1024, where torch's ``2.0 ** (cycle - 1)``
overflows and raises (the amplitude is then below 1e-308 anyway).

Edge cases: ``max_lr == base_lr`` gives a constant LR; ``step_size_down`` may differ from
``step_size_up`` (asymmetric cycles); ``exp_range`` with ``gamma == 1`` is ``triangular``.
``scale_by``/``set_lrs`` multiply the whole cycle (see ``constant.py``), so a reduction lowers
``base_lr`` too.
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

__all__ = ["CyclicParams", "CyclicPolicy"]

_MODES = ("triangular", "triangular2", "exp_range")


@dataclass(frozen=True, slots=True)
class CyclicParams:
    """Parameters of ``cyclic``; names and defaults are torch's ``CyclicLR``'s.

    ``base_lr``, ``max_lr``, ``base_momentum`` and ``max_momentum`` are one value for every
    param group or a tuple with one value per group (its length is checked against the job's
    groups when the policy is built).
    """

    base_lr: tuple[float, ...] | float
    max_lr: tuple[float, ...] | float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    gamma: float = 1.0
    cycle_momentum: bool = True
    base_momentum: tuple[float, ...] | float = 0.8
    max_momentum: tuple[float, ...] | float = 0.9

    def __post_init__(self) -> None:
        base = check_group_values("base_lr", self.base_lr)
        top = check_group_values("max_lr", self.max_lr)
        object.__setattr__(self, "base_lr", base)
        object.__setattr__(self, "max_lr", top)
        check_ordered("base_lr", base, "max_lr", top)
        check_int("step_size_up", self.step_size_up, 1)
        if self.step_size_down is not None:
            check_int("step_size_down", self.step_size_down, 1)
        if self.mode not in _MODES:
            raise ParamError("mode", f"must be one of {', '.join(_MODES)}; got {self.mode!r}")
        gamma = check_number("gamma", self.gamma)
        if not 0.0 < gamma <= 1.0:
            raise ParamError(
                "gamma", f"must be > 0 and <= 1 (gamma ** t grows without bound), got {self.gamma!r}"
            )
        object.__setattr__(self, "gamma", gamma)
        if not isinstance(self.cycle_momentum, bool):
            raise ParamError("cycle_momentum", f"must be true or false, got {self.cycle_momentum!r}")
        low = check_group_values("base_momentum", self.base_momentum)
        high = check_group_values("max_momentum", self.max_momentum)
        object.__setattr__(self, "base_momentum", low)
        object.__setattr__(self, "max_momentum", high)
        for field, value in (("base_momentum", low), ("max_momentum", high)):
            values = value if isinstance(value, tuple) else (value,)
            for x in values:
                if x > 1.0:
                    raise ParamError(field, f"a momentum (or beta1) must be <= 1, got {x!r}")
        check_ordered("base_momentum", low, "max_momentum", high)


class CyclicPolicy(ScheduledPolicy):
    """torch's CyclicLR as a schedule segment the job evaluates locally."""

    kind: ClassVar[str] = "cyclic"

    def __init__(
        self, params: CyclicParams, initial_lrs: Sequence[float], origin_step: int = 0
    ) -> None:
        self.params = params
        groups = len(initial_lrs)
        if groups < 1:
            raise ValueError("initial_lrs: need at least one param group")
        self.base_lrs = per_group("base_lr", params.base_lr, groups)
        self.max_lrs = per_group("max_lr", params.max_lr, groups)
        for i, (lo, hi) in enumerate(zip(self.base_lrs, self.max_lrs, strict=True)):
            if hi < lo:
                raise ParamError("max_lr", f"group {i}: max_lr {hi!r} is below base_lr {lo!r}")
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
            "base_lr": list(self.base_lrs),
            "max_lr": list(self.max_lrs),
            "step_size_up": p.step_size_up,
            "step_size_down": p.step_size_down,
            "mode": p.mode,
            "gamma": p.gamma,
            "cycle_momentum": p.cycle_momentum,
            "base_momentum": list(self.base_momentums),
            "max_momentum": list(self.max_momentums),
        }
