"""``cosine_restarts``: torch's ``CosineAnnealingWarmRestarts`` (SGDR, Loshchilov & Hutter 2017).

Rule at position ``t``, per param group, with ``base_lr`` the LR the job started with::

    T_i   = T_0 * T_mult ** k       # the length of the k-th period (k = 0, 1, ...)
    T_cur = t - (T_0 + T_0 * T_mult + ... + T_0 * T_mult ** (k - 1))   # steps into period k
    lr    = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

The LR starts each period at ``base_lr`` and anneals towards ``eta_min``, restarting at
``base_lr`` when ``T_cur`` reaches ``T_i`` (the LR never quite reaches ``eta_min``).

Comparison with torch: torch updates ``T_cur`` and ``T_i`` recursively on every ``step()``
(``T_cur += 1``; at ``T_i``: ``T_cur = 0``, ``T_i *= T_mult``). That recursion is integer-only,
so walking the periods in closed form (``lrpilot.schedules.cosine_restarts_position``) gives
the same ``T_cur`` and ``T_i``, and the cosine is evaluated with the same operations: LRs are
bit-identical. torch's ``step(epoch=...)`` path (a float epoch, logarithms) is not modelled:
positions are whole steps. Like torch, the base LR is the optimizer's LR (the job's initial
LRs); ``eta_min`` is one value for every group, as in torch.

Edge cases: ``T_0 = 1`` restarts at every step (the LR stays ``base_lr`` when ``T_mult = 1``);
``eta_min`` above a group's ``base_lr`` makes that group's LR rise within each period, as in
torch. ``scale_by``/``set_lrs`` multiply the whole schedule, ``eta_min`` included (see
``constant.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import ParamError
from .constant import ScheduledPolicy, check_initial_lrs, check_int, check_number

__all__ = ["CosineRestartsParams", "CosineRestartsPolicy"]


@dataclass(frozen=True, slots=True)
class CosineRestartsParams:
    """Parameters of ``cosine_restarts``; names and defaults are torch's."""

    T_0: int  # torch's names, hence the capitals
    T_mult: int = 1
    eta_min: float = 0.0

    def __post_init__(self) -> None:
        check_int("T_0", self.T_0, 1)
        check_int("T_mult", self.T_mult, 1)
        eta_min = check_number("eta_min", self.eta_min)
        if eta_min < 0:
            raise ParamError("eta_min", f"must be >= 0, got {self.eta_min!r}")
        object.__setattr__(self, "eta_min", eta_min)


class CosineRestartsPolicy(ScheduledPolicy):
    """torch's CosineAnnealingWarmRestarts as a schedule segment the job evaluates locally."""

    kind: ClassVar[str] = "cosine_restarts"

    def __init__(
        self, params: CosineRestartsParams, initial_lrs: Sequence[float], origin_step: int = 0
    ) -> None:
        self.params = params
        self.base_lrs = check_initial_lrs(initial_lrs)
        super().__init__(len(self.base_lrs), origin_step)

    def _segment_params(self) -> dict[str, Any]:
        p = self.params
        return {
            "base_lrs": list(self.base_lrs),
            "T_0": p.T_0,
            "T_mult": p.T_mult,
            "eta_min": p.eta_min,
        }
