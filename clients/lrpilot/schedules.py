"""Learning-rate schedule formulas, shared by the job and the daemon.

Every formula here is a pure function of a schedule *position* ``t`` (an int >= 0) that gives
exactly what the corresponding torch scheduler gives after ``t`` calls of
``scheduler.step()``: the daemon's engine imports these functions, and the job evaluates the
same functions locally at every step, so both sides compute the same numbers and a cyclic or
cosine schedule costs no message per step.

Segments
--------
The daemon describes a step-driven schedule to the job as a *segment*, a JSON object::

    {
      "kind": "cyclic",          # constant | cyclic | one_cycle | cosine_restarts | warmup
      "origin_step": 1200,       # the job step at which the position is 0
      "scale": 1.0,              # multiplies every LR the segment yields (optional, default 1)
      "params": {...},           # the kind's parameters; per-group values are lists
      "then": {...}              # warmup only: the segment that follows the warmup
    }

At job step ``s`` the position is ``t = s - origin_step`` (clamped at 0). A nested segment
(``then``) ignores its own ``origin_step``: its position is the warmup's position minus the
warmup's ``total_iters``.

Params per kind (per-group lists have one entry per param group):

- ``constant``: ``lrs``.
- ``cyclic``: ``base_lr``, ``max_lr`` (lists), ``step_size_up``, ``step_size_down`` (int or
  null), ``mode`` (triangular | triangular2 | exp_range), ``gamma``, ``scale_mode`` (cycle |
  iterations, as torch derives it from ``mode``), ``cycle_momentum``, ``base_momentum``,
  ``max_momentum`` (lists).
- ``one_cycle``: ``max_lr`` (list), ``total_steps``, ``pct_start``, ``anneal_strategy``
  (cos | linear), ``div_factor``, ``final_div_factor``, ``three_phase``, ``cycle_momentum``,
  ``base_momentum``, ``max_momentum`` (lists).
- ``cosine_restarts``: ``base_lrs`` (list), ``T_0``, ``T_mult``, ``eta_min``.
- ``warmup``: ``total_iters``, ``start_factor``. Before ``total_iters`` the LR rises linearly
  from ``start_factor`` times the following segment's LR at its position 0 to that LR
  (torch's LinearLR with end_factor 1); from then on the following segment runs, its clock
  starting at 0 (torch's SequentialLR with milestones=[total_iters]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SEGMENT_KINDS",
    "constant_segment",
    "cosine_restarts_lr",
    "cyclic_lr",
    "cyclic_momentum",
    "linear_warmup_factor",
    "lrs_at",
    "momentums_at",
    "one_cycle_lr",
    "one_cycle_momentum",
    "position_at",
]

SEGMENT_KINDS = ("constant", "cyclic", "one_cycle", "cosine_restarts", "warmup")


# --------------------------------------------------------------------------- formulas


def linear_warmup_factor(t: int, start_factor: float, total_iters: int) -> float:
    """The factor torch's LinearLR(start_factor, end_factor=1.0, total_iters) applies at ``t``."""
    if total_iters <= 0:
        return 1.0
    return start_factor + (1.0 - start_factor) * min(total_iters, t) / total_iters


def cyclic_lr(
    t: int,
    base_lr: float,
    max_lr: float,
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
) -> float:
    """torch.optim.lr_scheduler.CyclicLR's LR after ``t`` steps."""
    raise NotImplementedError


def cyclic_momentum(
    t: int,
    base_momentum: float,
    max_momentum: float,
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
) -> float:
    """CyclicLR's momentum after ``t`` steps (it moves opposite to the LR)."""
    raise NotImplementedError


def one_cycle_lr(
    t: int,
    max_lr: float,
    total_steps: int,
    pct_start: float,
    anneal_strategy: str,
    div_factor: float,
    final_div_factor: float,
    three_phase: bool,
) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's LR after ``t`` steps."""
    raise NotImplementedError


def one_cycle_momentum(
    t: int,
    base_momentum: float,
    max_momentum: float,
    total_steps: int,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
) -> float:
    """OneCycleLR's momentum after ``t`` steps."""
    raise NotImplementedError


def cosine_restarts_lr(t: int, base_lr: float, T_0: int, T_mult: int, eta_min: float) -> float:  # noqa: N803 (torch's names)
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts' LR after ``t`` steps."""
    raise NotImplementedError


# --------------------------------------------------------------------------- segments


def constant_segment(lrs: list[float], origin_step: int = 0) -> dict[str, Any]:
    """A segment that holds ``lrs``."""
    return {"kind": "constant", "origin_step": origin_step, "params": {"lrs": list(lrs)}}


def position_at(segment: Mapping[str, Any], step: int) -> int:
    """The segment's position at job step ``step``."""
    return max(0, step - int(segment.get("origin_step", 0)))


def lrs_at(segment: Mapping[str, Any], step: int) -> list[float]:
    """The LR per param group that ``segment`` gives at job step ``step``."""
    return _lrs_at_position(segment, position_at(segment, step))


def momentums_at(segment: Mapping[str, Any], step: int) -> list[float] | None:
    """The momentum per param group at job step ``step``, or None if the segment leaves it."""
    return _momentums_at_position(segment, position_at(segment, step))


def _lrs_at_position(segment: Mapping[str, Any], t: int) -> list[float]:
    kind = segment["kind"]
    p = segment.get("params", {})
    scale = float(segment.get("scale", 1.0))
    if kind == "constant":
        lrs = [float(x) for x in p["lrs"]]
    elif kind == "warmup":
        then = segment["then"]
        total = int(p["total_iters"])
        if t >= total:
            lrs = _lrs_at_position(then, t - total)
        else:
            factor = linear_warmup_factor(t, float(p["start_factor"]), total)
            lrs = [factor * x for x in _lrs_at_position(then, 0)]
    elif kind == "cyclic":
        lrs = [
            cyclic_lr(t, lo, hi, p["step_size_up"], p.get("step_size_down"), p["mode"], p["gamma"])
            for lo, hi in zip(p["base_lr"], p["max_lr"], strict=True)
        ]
    elif kind == "one_cycle":
        lrs = [
            one_cycle_lr(
                t,
                hi,
                p["total_steps"],
                p["pct_start"],
                p["anneal_strategy"],
                p["div_factor"],
                p["final_div_factor"],
                p["three_phase"],
            )
            for hi in p["max_lr"]
        ]
    elif kind == "cosine_restarts":
        lrs = [
            cosine_restarts_lr(t, base, p["T_0"], p["T_mult"], p["eta_min"])
            for base in p["base_lrs"]
        ]
    else:
        raise ValueError(f"unknown schedule segment kind {kind!r}; expected one of {SEGMENT_KINDS}")
    if scale != 1.0:
        lrs = [scale * x for x in lrs]
    return lrs


def _momentums_at_position(segment: Mapping[str, Any], t: int) -> list[float] | None:
    kind = segment["kind"]
    p = segment.get("params", {})
    if kind == "warmup":
        total = int(p["total_iters"])
        return _momentums_at_position(segment["then"], max(0, t - total))
    if kind == "cyclic" and p.get("cycle_momentum"):
        return [
            cyclic_momentum(t, lo, hi, p["step_size_up"], p.get("step_size_down"), p["mode"], p["gamma"])
            for lo, hi in zip(p["base_momentum"], p["max_momentum"], strict=True)
        ]
    if kind == "one_cycle" and p.get("cycle_momentum"):
        return [
            one_cycle_momentum(
                t, lo, hi, p["total_steps"], p["pct_start"], p["anneal_strategy"], p["three_phase"]
            )
            for lo, hi in zip(p["base_momentum"], p["max_momentum"], strict=True)
        ]
    return None


def _is_finite(x: float) -> bool:
    return math.isfinite(x)
