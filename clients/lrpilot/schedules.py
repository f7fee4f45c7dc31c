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
                                 # | anneal
      "origin_step": 1200,       # the job step at which the position is 0
      "scale": 1.0,              # multiplies every LR the segment yields (optional, default 1)
      "params": {...},           # the kind's parameters; per-group values are lists
      "then": {...}              # warmup and anneal: the segment they wrap
    }

At job step ``s`` the position is ``t = s - origin_step`` (clamped at 0). A warmup's nested
segment (``then``) ignores its own ``origin_step``: its position is the warmup's position
minus the warmup's ``total_iters``. An anneal's nested segment keeps its own clock: at job
step ``s`` its position is ``s - then.origin_step``, as if there were no anneal.

Params per kind (per-group lists have one entry per param group):

- ``constant``: ``lrs``.
- ``cyclic``: ``base_lr``, ``max_lr`` (lists), ``step_size_up``, ``step_size_down`` (int or
  null), ``mode`` (triangular | triangular2 | exp_range), ``gamma``, ``cycle_momentum``,
  ``base_momentum``, ``max_momentum`` (lists). As in torch, triangular halves the amplitude
  per cycle (``1 / 2 ** (cycle - 1)``, evaluated on the cycle number) and exp_range scales it
  by ``gamma ** t`` (evaluated on the iteration count); torch's ``scale_mode`` follows from
  ``mode``, so the segment does not carry it.
- ``one_cycle``: ``max_lr`` (list), ``total_steps``, ``pct_start``, ``anneal_strategy``
  (cos | linear), ``div_factor``, ``final_div_factor``, ``three_phase``, ``cycle_momentum``,
  ``base_momentum``, ``max_momentum`` (lists). From position ``total_steps - 1`` on, the LR
  and momentum hold their final values (torch raises past ``total_steps``).
- ``cosine_restarts``: ``base_lrs`` (list), ``T_0``, ``T_mult``, ``eta_min``.
- ``warmup``: ``total_iters``, ``start_factor``. Before ``total_iters`` the LR rises linearly
  from ``start_factor`` times the following segment's LR at its position 0 to that LR
  (torch's LinearLR with end_factor 1); from then on the following segment runs, its clock
  starting at 0 (torch's SequentialLR with milestones=[total_iters]). The momentum during
  the warmup is the following segment's momentum at its position 0.
- ``anneal``: ``total_iters``, ``final_factor``, ``anneal_strategy`` (linear | cos). The
  wrapped segment's LR times a factor that falls from 1 to ``final_factor`` over
  ``total_iters`` steps: at position ``t`` the factor is the interpolation at
  ``pct = min(t + 1, total_iters) / total_iters``, so the first step of the anneal already
  trains a little below the wrapped LR and its last step, ``total_iters - 1``, at
  ``final_factor`` times it (a warmup-stable-decay schedule's decay phase). The momentum is
  the wrapped segment's.

``scale`` applies on top of the nested segment's own ``scale``.

Every formula is bit-identical to torch's arithmetic where torch computes in closed form
(CyclicLR, OneCycleLR, and CosineAnnealingWarmRestarts, whose recursion is integer-only).
torch's LinearLR computes recursively (each step multiplies the previous LR), so the warmup
agrees with it to about ``total_iters`` ulps, and exactly with its closed form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SEGMENT_KINDS",
    "anneal_factor",
    "constant_segment",
    "cosine_restarts_lr",
    "cosine_restarts_position",
    "cyclic_lr",
    "cyclic_momentum",
    "linear_warmup_factor",
    "lrs_at",
    "lrs_at_position",
    "momentums_at",
    "momentums_at_position",
    "one_cycle_lr",
    "one_cycle_momentum",
    "position_at",
]

SEGMENT_KINDS = ("constant", "cyclic", "one_cycle", "cosine_restarts", "warmup", "anneal")


# --------------------------------------------------------------------------- formulas


def linear_warmup_factor(t: int, start_factor: float, total_iters: int) -> float:
    """The factor torch's LinearLR(start_factor, end_factor=1.0, total_iters) applies at ``t``."""
    if total_iters <= 0:
        return 1.0
    return start_factor + (1.0 - start_factor) * min(total_iters, t) / total_iters


def anneal_factor(t: int, total_iters: int, final_factor: float, anneal_strategy: str) -> float:
    """The factor an anneal of ``total_iters`` steps applies at its position ``t``.

    ``pct = min(t + 1, total_iters) / total_iters``: position 0 is the anneal's first step
    (already below 1) and position ``total_iters - 1`` its last (exactly ``final_factor``).
    """
    if total_iters <= 0:
        return final_factor
    pct = min(t + 1, total_iters) / total_iters
    return _anneal(1.0, final_factor, pct, anneal_strategy)


def _cyclic_phase(t: int, step_size_up: int, step_size_down: int | None) -> tuple[int, float]:
    """CyclicLR's cycle number (1-based) and the fraction of the amplitude reached at ``t``.

    Same float operations, in the same order, as torch's ``CyclicLR.get_lr``: the cycle length
    is a float, so the results are bit-identical to torch's.
    """
    up = float(step_size_up)
    down = float(step_size_down) if step_size_down is not None else up
    total_size = up + down
    step_ratio = up / total_size
    cycle = math.floor(1 + t / total_size)
    x = 1.0 + t / total_size - cycle
    fraction = x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1)
    return cycle, fraction


def _cyclic_amplitude_scale(t: int, cycle: int, mode: str, gamma: float) -> float:
    """The amplitude multiplier of CyclicLR's built-in modes.

    torch evaluates triangular and triangular2 on the cycle number (scale_mode "cycle") and
    exp_range on the iteration count (scale_mode "iterations"): ``gamma ** t``.
    """
    if mode == "triangular":
        return 1.0
    if mode == "triangular2":
        if cycle > 1024:  # 2.0 ** 1024 overflows (torch raises there); 2 ** -k is exact anyway
            return math.ldexp(1.0, -(cycle - 1))
        return 1 / (2.0 ** (cycle - 1))
    if mode == "exp_range":
        return gamma**t
    raise ValueError(f"unknown cyclic mode {mode!r}; expected triangular, triangular2 or exp_range")


def cyclic_lr(
    t: int,
    base_lr: float,
    max_lr: float,
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
) -> float:
    """torch.optim.lr_scheduler.CyclicLR's LR after ``t`` steps (closed form in torch too)."""
    cycle, fraction = _cyclic_phase(t, step_size_up, step_size_down)
    height = (max_lr - base_lr) * fraction
    return base_lr + height * _cyclic_amplitude_scale(t, cycle, mode, gamma)


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
    cycle, fraction = _cyclic_phase(t, step_size_up, step_size_down)
    height = (max_momentum - base_momentum) * fraction
    return max_momentum - height * _cyclic_amplitude_scale(t, cycle, mode, gamma)


def _anneal(start: float, end: float, pct: float, anneal_strategy: str) -> float:
    """OneCycleLR's interpolation from ``start`` (pct 0) to ``end`` (pct 1)."""
    if anneal_strategy == "cos":
        cos_out = math.cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out
    if anneal_strategy == "linear":
        return (end - start) * pct + start
    raise ValueError(f"unknown anneal_strategy {anneal_strategy!r}; expected cos or linear")


def _one_cycle_phase(
    t: int, total_steps: int, pct_start: float, three_phase: bool
) -> tuple[int, float]:
    """Which OneCycleLR phase ``t`` falls in (0, 1 or 2) and the fraction of it done.

    Positions past the last trained step (``total_steps - 1``) hold the final value: torch
    raises beyond ``total_steps`` and, at exactly ``total_steps`` (after the scheduler's last
    ``step()``, a value no batch trains with), extrapolates past the end of the anneal.
    """
    n = min(t, total_steps - 1)
    first_end = float(pct_start * total_steps) - 1
    ends: tuple[float, ...]
    if three_phase:
        ends = (first_end, float(2 * pct_start * total_steps) - 2, float(total_steps - 1))
    else:
        ends = (first_end, float(total_steps - 1))
    start = 0.0
    for i, end in enumerate(ends):
        if n <= end or i == len(ends) - 1:
            return i, (n - start) / (end - start)
        start = end
    raise AssertionError("unreachable: the last phase always matches")


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
    """torch.optim.lr_scheduler.OneCycleLR's LR after ``t`` steps (held after the last step)."""
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    phase, pct = _one_cycle_phase(t, total_steps, pct_start, three_phase)
    if three_phase:
        start, end = ((initial_lr, max_lr), (max_lr, initial_lr), (initial_lr, min_lr))[phase]
    else:
        start, end = ((initial_lr, max_lr), (max_lr, min_lr))[phase]
    return _anneal(start, end, pct, anneal_strategy)


def one_cycle_momentum(
    t: int,
    base_momentum: float,
    max_momentum: float,
    total_steps: int,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
) -> float:
    """OneCycleLR's momentum after ``t`` steps (held after the last step)."""
    phase, pct = _one_cycle_phase(t, total_steps, pct_start, three_phase)
    if three_phase:
        start, end = (
            (max_momentum, base_momentum),
            (base_momentum, max_momentum),
            (max_momentum, max_momentum),
        )[phase]
    else:
        start, end = ((max_momentum, base_momentum), (base_momentum, max_momentum))[phase]
    return _anneal(start, end, pct, anneal_strategy)


def cosine_restarts_position(t: int, T_0: int, T_mult: int) -> tuple[int, int]:
    """``(T_cur, T_i)`` after ``t`` steps: steps since the last restart and the current period.

    torch updates both recursively (``T_cur += 1``; on reaching ``T_i`` it restarts and
    multiplies ``T_i`` by ``T_mult``); this walks the periods with the same integer
    arithmetic, so the result is exact. Periods grow geometrically when ``T_mult > 1``, so
    the walk takes O(log t) iterations.
    """
    if T_mult == 1:
        return t % T_0, T_0
    t_cur, t_i = t, T_0
    while t_cur >= t_i:
        t_cur -= t_i
        t_i *= T_mult
    return t_cur, t_i


def cosine_restarts_lr(t: int, base_lr: float, T_0: int, T_mult: int, eta_min: float) -> float:
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts' LR after ``t`` steps."""
    t_cur, t_i = cosine_restarts_position(t, T_0, T_mult)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


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


def lrs_at_position(segment: Mapping[str, Any], position: int) -> list[float]:
    """The LR per param group at schedule position ``position`` (``origin_step`` ignored)."""
    return _lrs_at_position(segment, max(0, position))


def momentums_at_position(segment: Mapping[str, Any], position: int) -> list[float] | None:
    """The momentum per param group at schedule position ``position``, or None."""
    return _momentums_at_position(segment, max(0, position))


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
    elif kind == "anneal":
        then = segment["then"]
        factor = anneal_factor(
            t, int(p["total_iters"]), float(p["final_factor"]), str(p["anneal_strategy"])
        )
        lrs = [factor * x for x in _lrs_at_position(then, _nested_position(segment, then, t))]
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
    if kind == "anneal":
        then = segment["then"]
        return _momentums_at_position(then, _nested_position(segment, then, t))
    if kind == "cyclic" and p.get("cycle_momentum"):
        return [
            cyclic_momentum(
                t, lo, hi, p["step_size_up"], p.get("step_size_down"), p["mode"], p["gamma"]
            )
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


def _nested_position(outer: Mapping[str, Any], then: Mapping[str, Any], t: int) -> int:
    """An anneal's wrapped segment at the anneal's position ``t``: on its own clock."""
    shift = int(outer.get("origin_step", 0)) - int(then.get("origin_step", 0))
    return max(0, t + shift)


def _is_finite(x: float) -> bool:
    return math.isfinite(x)
