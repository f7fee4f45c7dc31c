"""The schedule formulas of ``lrpilot.schedules`` beside real torch schedulers (CPU).

Every test runs torch's scheduler for some steps and compares the LR (and momentum) after
every ``scheduler.step()`` with our closed form at the same position. CyclicLR, OneCycleLR
and CosineAnnealingWarmRestarts are compared for exact equality (same float operations);
LinearLR (warmup), which torch computes recursively, within 1e-12 relative.

The torch helpers at the top are also used by ``test_step_policies_parity.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lrpilot.schedules import (
    constant_segment,
    cosine_restarts_lr,
    cosine_restarts_position,
    cyclic_lr,
    cyclic_momentum,
    linear_warmup_factor,
    lrs_at,
    momentums_at,
    one_cycle_lr,
    one_cycle_momentum,
    position_at,
)
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
)

# ----------------------------------------------------------------------- torch helpers


def make_optimizer(lrs: Sequence[float], kind: str = "sgd") -> torch.optim.Optimizer:
    """An optimizer with one single-parameter group per LR: SGD with momentum, or Adam."""
    groups: list[dict[str, Any]] = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": float(lr)} for lr in lrs
    ]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=float(lrs[0]), momentum=0.9)
    return torch.optim.Adam(groups, lr=float(lrs[0]), betas=(0.9, 0.999))


def group_momentums(optimizer: torch.optim.Optimizer) -> list[float]:
    """SGD's momentum or Adam's beta1, per param group."""
    return [
        float(g["betas"][0]) if "betas" in g else float(g["momentum"])
        for g in optimizer.param_groups
    ]


def torch_run(
    optimizer: torch.optim.Optimizer,
    make_scheduler: Callable[[torch.optim.Optimizer], Any],
    steps: int,
) -> tuple[list[list[float]], list[list[float]]]:
    """LRs and momentums per group at positions 0..steps (position = scheduler.step() calls)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make_scheduler(optimizer)
        lrs = [[float(g["lr"]) for g in optimizer.param_groups]]
        moms = [group_momentums(optimizer)]
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            lrs.append([float(g["lr"]) for g in optimizer.param_groups])
            moms.append(group_momentums(optimizer))
    return lrs, moms


def assert_close(ours: Sequence[float], theirs: Sequence[float], rel: float, where: str) -> None:
    """Equal within ``rel`` relative; ``rel=0`` means bit-identical."""
    assert len(ours) == len(theirs), where
    for a, b in zip(ours, theirs, strict=True):
        if rel == 0:
            assert a == b, f"{where}: ours {a!r} != torch {b!r}"
        else:
            assert abs(a - b) <= rel * max(abs(a), abs(b)), f"{where}: ours {a!r} vs torch {b!r}"


# ----------------------------------------------------------------------- strategies

lr_values = st.floats(min_value=1e-6, max_value=2.0, allow_nan=False)
momentum_values = st.floats(min_value=0.0, max_value=0.99, allow_nan=False)
group_counts = st.integers(min_value=1, max_value=3)


@st.composite
def cyclic_cases(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(group_counts)
    base = [draw(lr_values) for _ in range(groups)]
    top = [b + draw(st.floats(min_value=0.0, max_value=2.0)) for b in base]
    low = [draw(momentum_values) for _ in range(groups)]
    high = [m + draw(st.floats(min_value=0.0, max_value=0.99 - m)) for m in low]
    return {
        "base_lr": base,
        "max_lr": top,
        "step_size_up": draw(st.integers(1, 15)),
        "step_size_down": draw(st.none() | st.integers(1, 15)),
        "mode": draw(st.sampled_from(["triangular", "triangular2", "exp_range"])),
        "gamma": draw(st.floats(min_value=0.9, max_value=1.0)),
        "base_momentum": low,
        "max_momentum": high,
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
    }


@st.composite
def one_cycle_cases(draw: st.DrawFn) -> dict[str, Any]:
    groups = draw(group_counts)
    total = draw(st.integers(1, 120))
    pct = draw(st.floats(min_value=0.01, max_value=0.99))
    if float(pct * total) == 1.0:  # refused by OneCycleParams: torch divides 0 by 0 there
        pct = min(0.99, pct + 0.013)
    low = [draw(momentum_values) for _ in range(groups)]
    return {
        "max_lr": [draw(lr_values) for _ in range(groups)],
        "total_steps": total,
        "pct_start": pct,
        "anneal_strategy": draw(st.sampled_from(["cos", "linear"])),
        "div_factor": draw(st.floats(min_value=1.0, max_value=100.0)),
        "final_div_factor": draw(st.floats(min_value=1.0, max_value=1e5)),
        "three_phase": draw(st.booleans()),
        "base_momentum": low,
        "max_momentum": [m + draw(st.floats(min_value=0.0, max_value=0.99 - m)) for m in low],
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
    }


# ----------------------------------------------------------------------- CyclicLR


@settings(max_examples=60, deadline=None)
@given(case=cyclic_cases())
def test_cyclic_matches_torch_exactly(case: dict[str, Any]) -> None:
    """cyclic_lr and cyclic_momentum are bit-identical to CyclicLR in every mode, for ~3 cycles."""
    up, down = case["step_size_up"], case["step_size_down"]
    steps = min(3 * (up + (down if down is not None else up)), 90)
    lrs, moms = torch_run(
        make_optimizer(case["base_lr"], case["optimizer"]),
        lambda opt: CyclicLR(
            opt,
            base_lr=case["base_lr"],
            max_lr=case["max_lr"],
            step_size_up=up,
            step_size_down=down,
            mode=case["mode"],
            gamma=case["gamma"],
            cycle_momentum=True,
            base_momentum=case["base_momentum"],
            max_momentum=case["max_momentum"],
        ),
        steps,
    )
    for t in range(steps + 1):
        ours = [
            cyclic_lr(t, lo, hi, up, down, case["mode"], case["gamma"])
            for lo, hi in zip(case["base_lr"], case["max_lr"], strict=True)
        ]
        assert_close(ours, lrs[t], 0, f"lr at t={t}")
        ours_m = [
            cyclic_momentum(t, lo, hi, up, down, case["mode"], case["gamma"])
            for lo, hi in zip(case["base_momentum"], case["max_momentum"], strict=True)
        ]
        assert_close(ours_m, moms[t], 0, f"momentum at t={t}")


def test_cyclic_triangular2_halves_amplitude_each_cycle() -> None:
    """triangular2's peak is base + (max - base) / 2 ** (cycle - 1)."""
    peaks = [cyclic_lr(4 + 8 * k, 0.0, 1.0, 4, None, "triangular2", 1.0) for k in range(4)]
    assert peaks == [1.0, 0.5, 0.25, 0.125]


def test_cyclic_exp_range_decays_with_iterations() -> None:
    """exp_range's amplitude is gamma ** t, evaluated at the iteration, not the cycle."""
    assert cyclic_lr(3, 0.0, 1.0, 3, None, "exp_range", 0.5) == 0.5**3


def test_cyclic_unknown_mode_raises() -> None:
    """An unknown mode is a clear ValueError, not a silent triangular."""
    with pytest.raises(ValueError, match="unknown cyclic mode"):
        cyclic_lr(1, 0.1, 1.0, 2, None, "sawtooth", 1.0)


# ----------------------------------------------------------------------- OneCycleLR


@settings(max_examples=60, deadline=None)
@given(case=one_cycle_cases())
def test_one_cycle_matches_torch_exactly(case: dict[str, Any]) -> None:
    """one_cycle_lr/momentum are bit-identical to OneCycleLR at every trained position 0..total-1."""
    total = case["total_steps"]
    lrs, moms = torch_run(
        make_optimizer([0.5] * len(case["max_lr"]), case["optimizer"]),
        lambda opt: OneCycleLR(
            opt,
            max_lr=case["max_lr"],
            total_steps=total,
            pct_start=case["pct_start"],
            anneal_strategy=case["anneal_strategy"],
            cycle_momentum=True,
            base_momentum=case["base_momentum"],
            max_momentum=case["max_momentum"],
            div_factor=case["div_factor"],
            final_div_factor=case["final_div_factor"],
            three_phase=case["three_phase"],
        ),
        total - 1,
    )
    args = (case["pct_start"], case["anneal_strategy"])
    for t in range(total):
        ours = [
            one_cycle_lr(
                t,
                hi,
                total,
                *args,
                case["div_factor"],
                case["final_div_factor"],
                case["three_phase"],
            )
            for hi in case["max_lr"]
        ]
        assert_close(ours, lrs[t], 0, f"lr at t={t}")
        ours_m = [
            one_cycle_momentum(t, lo, hi, total, *args, case["three_phase"])
            for lo, hi in zip(case["base_momentum"], case["max_momentum"], strict=True)
        ]
        assert_close(ours_m, moms[t], 0, f"momentum at t={t}")


@pytest.mark.parametrize("strategy", ["cos", "linear"])
def test_one_cycle_holds_final_value_after_the_cycle(strategy: str) -> None:
    """From total_steps - 1 on, the LR stays at max_lr / div_factor / final_div_factor."""
    final = one_cycle_lr(99, 0.1, 100, 0.3, strategy, 25.0, 1e4, False)
    assert final == pytest.approx(0.1 / 25 / 1e4, rel=1e-12)
    for t in (100, 101, 10_000):
        assert one_cycle_lr(t, 0.1, 100, 0.3, strategy, 25.0, 1e4, False) == final
        assert one_cycle_momentum(t, 0.85, 0.95, 100, 0.3, strategy, False) == 0.95


# ----------------------------------------------------------------------- CosineAnnealingWarmRestarts


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(lr_values, min_size=1, max_size=3),
    t_0=st.integers(1, 12),
    t_mult=st.integers(1, 3),
    eta_min=st.sampled_from([0.0, 1e-6, 1e-3]),
)
def test_cosine_restarts_matches_torch_exactly(
    base: list[float], t_0: int, t_mult: int, eta_min: float
) -> None:
    """cosine_restarts_lr is bit-identical to CosineAnnealingWarmRestarts for 150 steps."""
    steps = 150
    lrs, _ = torch_run(
        make_optimizer(base),
        lambda opt: CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min),
        steps,
    )
    for t in range(steps + 1):
        ours = [cosine_restarts_lr(t, b, t_0, t_mult, eta_min) for b in base]
        assert_close(ours, lrs[t], 0, f"lr at t={t}")


def test_cosine_restarts_position_walks_growing_periods() -> None:
    """With T_0=2, T_mult=2 the restarts fall at 2, 6, 14, with periods 4, 8, 16."""
    assert cosine_restarts_position(1, 2, 2) == (1, 2)
    assert cosine_restarts_position(2, 2, 2) == (0, 4)
    assert cosine_restarts_position(5, 2, 2) == (3, 4)
    assert cosine_restarts_position(6, 2, 2) == (0, 8)
    assert cosine_restarts_position(14, 2, 2) == (0, 16)


def test_cosine_restarts_far_position_is_cheap_and_exact() -> None:
    """A position of 10**15 with T_mult=2 needs only ~50 period walks and stays integer-exact."""
    t_cur, t_i = cosine_restarts_position(10**15, 3, 2)
    assert 0 <= t_cur < t_i
    assert 3 * (t_i // 3 - 1) + t_cur == 10**15  # periods 3, 6, ..., t_i/2 sum to 3*(t_i/3 - 1)


# ----------------------------------------------------------------------- LinearLR warmup


@settings(max_examples=40, deadline=None)
@given(
    start_factor=st.floats(min_value=0.001, max_value=1.0),
    total_iters=st.integers(1, 300),
    lr=lr_values,
)
def test_linear_warmup_factor_matches_torch_linear_lr(
    start_factor: float, total_iters: int, lr: float
) -> None:
    """lr * linear_warmup_factor matches LinearLR(end_factor=1) within 1e-12 relative (torch is recursive)."""
    steps = total_iters + 3
    lrs, _ = torch_run(
        make_optimizer([lr]),
        lambda opt: LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=total_iters),
        steps,
    )
    for t in range(steps + 1):
        ours = [linear_warmup_factor(t, start_factor, total_iters) * lr]
        assert_close(ours, lrs[t], 1e-12, f"lr at t={t}")


@settings(max_examples=40, deadline=None)
@given(
    base=st.lists(lr_values, min_size=1, max_size=3),
    start_factor=st.floats(min_value=0.01, max_value=1.0),
    total_iters=st.integers(0, 40),
    t_0=st.integers(1, 10),
    t_mult=st.integers(1, 3),
    eta_min=st.sampled_from([0.0, 1e-5]),
)
def test_warmup_segment_matches_torch_sequential_lr(
    base: list[float],
    start_factor: float,
    total_iters: int,
    t_0: int,
    t_mult: int,
    eta_min: float,
) -> None:
    """A warmup segment over cosine_restarts matches SequentialLR(LinearLR, CosineAnnealingWarmRestarts) within 1e-12 relative."""
    steps = total_iters + 60
    lrs, _ = torch_run(
        make_optimizer(base),
        lambda opt: SequentialLR(
            opt,
            [
                LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=total_iters),
                CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min),
            ],
            milestones=[total_iters],
        ),
        steps,
    )
    segment = {
        "kind": "warmup",
        "origin_step": 7,
        "params": {"total_iters": total_iters, "start_factor": start_factor},
        "then": {
            "kind": "cosine_restarts",
            "origin_step": 12345,  # ignored when nested
            "params": {"base_lrs": base, "T_0": t_0, "T_mult": t_mult, "eta_min": eta_min},
        },
    }
    for t in range(steps + 1):
        assert_close(lrs_at(segment, 7 + t), lrs[t], 1e-12, f"lr at t={t}")


# ----------------------------------------------------------------------- segments


def test_position_is_step_minus_origin_clamped_at_zero() -> None:
    """A step before the origin is position 0: the schedule does not run backwards."""
    seg = {"kind": "constant", "origin_step": 100, "params": {"lrs": [0.1]}}
    assert position_at(seg, 150) == 50
    assert position_at(seg, 20) == 0


def test_scale_multiplies_every_lr_but_not_momentum() -> None:
    """A segment's scale multiplies the LRs it yields and leaves momentums alone."""
    params = {
        "base_lr": [0.1, 0.2],
        "max_lr": [1.0, 2.0],
        "step_size_up": 4,
        "step_size_down": None,
        "mode": "triangular",
        "gamma": 1.0,
        "cycle_momentum": True,
        "base_momentum": [0.8, 0.8],
        "max_momentum": [0.9, 0.9],
    }
    plain = {"kind": "cyclic", "origin_step": 0, "params": params}
    scaled = {**plain, "scale": 0.5}
    for step in range(10):
        assert lrs_at(scaled, step) == [0.5 * x for x in lrs_at(plain, step)]
        assert momentums_at(scaled, step) == momentums_at(plain, step)


def test_warmup_momentum_is_the_inner_momentum_at_zero() -> None:
    """During warmup the momentum is the following segment's momentum at its position 0."""
    then = {
        "kind": "one_cycle",
        "params": {
            "max_lr": [1.0],
            "total_steps": 50,
            "pct_start": 0.3,
            "anneal_strategy": "cos",
            "div_factor": 25.0,
            "final_div_factor": 1e4,
            "three_phase": False,
            "cycle_momentum": True,
            "base_momentum": [0.85],
            "max_momentum": [0.95],
        },
    }
    seg = {"kind": "warmup", "params": {"total_iters": 10, "start_factor": 0.1}, "then": then}
    assert momentums_at(seg, 0) == momentums_at(seg, 9) == [0.95]
    assert momentums_at(seg, 15) == momentums_at(then, 5)
    assert lrs_at(seg, 0) == [0.1 * lrs_at(then, 0)[0]]


def test_constant_segment_has_no_momentum() -> None:
    """A constant segment holds its LRs at every step and leaves the momentum to the job."""
    seg = constant_segment([0.1, 0.01], origin_step=5)
    assert lrs_at(seg, 0) == lrs_at(seg, 10**9) == [0.1, 0.01]
    assert momentums_at(seg, 3) is None


def test_unknown_segment_kind_is_a_clear_error() -> None:
    """An unknown segment kind names the kind and the known kinds."""
    with pytest.raises(ValueError, match="unknown schedule segment kind 'polynomial'"):
        lrs_at({"kind": "polynomial", "params": {}}, 3)


def test_formulas_are_finite_for_extreme_positions() -> None:
    """Very late positions give finite LRs for every kind (no overflow in the closed forms)."""
    t = 10**12
    assert math.isfinite(cyclic_lr(t, 0.1, 1.0, 7, 3, "exp_range", 0.999))
    assert math.isfinite(cyclic_lr(t, 0.1, 1.0, 7, 3, "triangular2", 1.0))
    assert math.isfinite(cosine_restarts_lr(t, 0.1, 5, 3, 0.0))
    assert math.isfinite(one_cycle_lr(t, 0.1, 100, 0.3, "cos", 25.0, 1e4, True))
