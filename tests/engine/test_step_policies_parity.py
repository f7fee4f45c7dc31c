"""The step-driven policies beside real torch schedulers, and beside the segments they send.

For every position we check three things: the policy's ``lrs`` (and ``momentums``) equal
torch's after the same number of ``scheduler.step()`` calls; ``lrs_at`` of the policy's
current segment at the matching job step gives the same list (the daemon and the job agree);
and so does the very first segment the policy sent (the job needs no further message).
Comparisons with torch are exact for cyclic, one_cycle and cosine_restarts, and within 1e-12
relative for the warmup (torch's LinearLR is recursive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lrpilot.schedules import lrs_at, momentums_at
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    CyclicLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
)

from monitor.engine.base import Policy
from monitor.engine.policies.cosine_restarts import CosineRestartsParams, CosineRestartsPolicy
from monitor.engine.policies.cyclic import CyclicParams, CyclicPolicy
from monitor.engine.policies.one_cycle import OneCycleParams, OneCyclePolicy
from monitor.engine.policies.warmup import Warmup, WarmupParams
from tests.engine.test_schedules import (
    assert_close,
    cyclic_cases,
    lr_values,
    make_optimizer,
    one_cycle_cases,
    torch_run,
)


def per_group_or_scalar(values: list[float], scalar: bool) -> tuple[float, ...] | float:
    """The parameter as a config file may give it: one value for all groups, or one per group."""
    return values[0] if scalar else tuple(values)


def uniform(values: list[float], scalar: bool) -> list[float]:
    """What torch sees for the same parameter."""
    return [values[0]] * len(values) if scalar else values


def walk(
    policy: Policy, steps: int, origin: int
) -> tuple[list[list[float]], list[list[float] | None]]:
    """Step ``policy`` through positions 0..steps, checking that its segments agree with it."""
    first = policy.segment()
    assert first is not None
    lrs: list[list[float]] = []
    moms: list[list[float] | None] = []
    for t in range(steps + 1):
        if t:
            assert policy.step(t, None) is False
        now = list(policy.lrs)
        current = policy.segment()
        assert current is not None
        assert lrs_at(current, origin + t) == now, f"current segment at t={t}"
        assert lrs_at(first, origin + t) == now, f"first segment at t={t}"
        mom = policy.momentums
        assert momentums_at(first, origin + t) == (None if mom is None else list(mom))
        lrs.append(now)
        moms.append(None if mom is None else list(mom))
    return lrs, moms


@settings(max_examples=60, deadline=None)
@given(
    case=cyclic_cases(),
    scalar=st.booleans(),
    cycle_momentum=st.booleans(),
    origin=st.integers(0, 1000),
)
def test_cyclic_policy_matches_torch_exactly(
    case: dict[str, Any], scalar: bool, cycle_momentum: bool, origin: int
) -> None:
    """CyclicPolicy's LRs and momentums equal CyclicLR's exactly, and its segments agree with it."""
    groups = len(case["base_lr"])
    params = CyclicParams(
        base_lr=per_group_or_scalar(case["base_lr"], scalar),
        max_lr=per_group_or_scalar(case["max_lr"], scalar),
        step_size_up=case["step_size_up"],
        step_size_down=case["step_size_down"],
        mode=case["mode"],
        gamma=case["gamma"],
        cycle_momentum=cycle_momentum,
        base_momentum=per_group_or_scalar(case["base_momentum"], scalar),
        max_momentum=per_group_or_scalar(case["max_momentum"], scalar),
    )
    policy = CyclicPolicy(params, [0.5] * groups, origin_step=origin)
    steps = 60
    ours, ours_m = walk(policy, steps, origin)
    lrs, moms = torch_run(
        make_optimizer([0.5] * groups, case["optimizer"]),
        lambda opt: CyclicLR(
            opt,
            base_lr=uniform(case["base_lr"], scalar),
            max_lr=uniform(case["max_lr"], scalar),
            step_size_up=case["step_size_up"],
            step_size_down=case["step_size_down"],
            mode=case["mode"],
            gamma=case["gamma"],
            cycle_momentum=cycle_momentum,
            base_momentum=uniform(case["base_momentum"], scalar),  # type: ignore[arg-type]
            max_momentum=uniform(case["max_momentum"], scalar),  # type: ignore[arg-type]
        ),
        steps,
    )
    for t in range(steps + 1):
        assert_close(ours[t], lrs[t], 0, f"lr at t={t}")
        if cycle_momentum:
            mom = ours_m[t]
            assert mom is not None
            assert_close(mom, moms[t], 0, f"momentum at t={t}")
        else:
            assert ours_m[t] is None


@settings(max_examples=60, deadline=None)
@given(case=one_cycle_cases(), scalar=st.booleans(), origin=st.integers(0, 1000))
def test_one_cycle_policy_matches_torch_exactly(
    case: dict[str, Any], scalar: bool, origin: int
) -> None:
    """OneCyclePolicy equals OneCycleLR exactly at every trained position, and holds after."""
    groups = len(case["max_lr"])
    total = case["total_steps"]
    params = OneCycleParams(
        max_lr=per_group_or_scalar(case["max_lr"], scalar),
        total_steps=total,
        pct_start=case["pct_start"],
        anneal_strategy=case["anneal_strategy"],
        base_momentum=per_group_or_scalar(case["base_momentum"], scalar),
        max_momentum=per_group_or_scalar(case["max_momentum"], scalar),
        div_factor=case["div_factor"],
        final_div_factor=case["final_div_factor"],
        three_phase=case["three_phase"],
    )
    policy = OneCyclePolicy(params, [0.123] * groups, origin_step=origin)
    ours, ours_m = walk(policy, total + 2, origin)
    lrs, moms = torch_run(
        make_optimizer([0.123] * groups, case["optimizer"]),
        lambda opt: OneCycleLR(
            opt,
            max_lr=uniform(case["max_lr"], scalar),
            total_steps=total,
            pct_start=case["pct_start"],
            anneal_strategy=case["anneal_strategy"],
            base_momentum=uniform(case["base_momentum"], scalar),
            max_momentum=uniform(case["max_momentum"], scalar),
            div_factor=case["div_factor"],
            final_div_factor=case["final_div_factor"],
            three_phase=case["three_phase"],
        ),
        total - 1,
    )
    for t in range(total):
        assert_close(ours[t], lrs[t], 0, f"lr at t={t}")
        mom = ours_m[t]
        assert mom is not None
        assert_close(mom, moms[t], 0, f"momentum at t={t}")
    assert ours[total] == ours[total + 1] == ours[total + 2] == lrs[total - 1]


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(lr_values, min_size=1, max_size=3),
    t_0=st.integers(1, 12),
    t_mult=st.integers(1, 3),
    eta_min=st.sampled_from([0.0, 1e-6, 1e-3]),
    origin=st.integers(0, 1000),
)
def test_cosine_restarts_policy_matches_torch_exactly(
    base: list[float], t_0: int, t_mult: int, eta_min: float, origin: int
) -> None:
    """CosineRestartsPolicy, based on the job's initial LRs, equals CosineAnnealingWarmRestarts exactly."""
    policy = CosineRestartsPolicy(
        CosineRestartsParams(T_0=t_0, T_mult=t_mult, eta_min=eta_min), base, origin_step=origin
    )
    steps = 120
    ours, ours_m = walk(policy, steps, origin)
    lrs, _ = torch_run(
        make_optimizer(base),
        lambda opt: CosineAnnealingWarmRestarts(opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min),
        steps,
    )
    for t in range(steps + 1):
        assert_close(ours[t], lrs[t], 0, f"lr at t={t}")
        assert ours_m[t] is None


def _check_warmup(
    policy: Warmup, lrs: Sequence[Sequence[float]], steps: int, origin: int
) -> list[list[float] | None]:
    ours, ours_m = walk(policy, steps, origin)
    for t in range(steps + 1):
        assert_close(ours[t], lrs[t], 1e-12, f"lr at t={t}")
    return ours_m


@settings(max_examples=50, deadline=None)
@given(
    base=st.lists(lr_values, min_size=1, max_size=3),
    start_factor=st.floats(min_value=0.01, max_value=1.0),
    total_iters=st.integers(1, 40),
    t_0=st.integers(1, 10),
    t_mult=st.integers(1, 3),
    eta_min=st.sampled_from([0.0, 1e-5]),
    origin=st.integers(0, 1000),
)
def test_warmup_cosine_matches_torch_sequential_lr(
    base: list[float],
    start_factor: float,
    total_iters: int,
    t_0: int,
    t_mult: int,
    eta_min: float,
    origin: int,
) -> None:
    """Warmup(cosine_restarts) equals SequentialLR(LinearLR, CosineAnnealingWarmRestarts, milestones=[N]) within 1e-12 relative."""
    inner = CosineRestartsPolicy(CosineRestartsParams(T_0=t_0, T_mult=t_mult, eta_min=eta_min), base)
    policy = Warmup(WarmupParams(total_iters=total_iters, start_factor=start_factor), inner)
    policy.origin_step = origin
    assert inner.origin_step == origin + total_iters
    steps = total_iters + 50
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
    _check_warmup(policy, lrs, steps, origin)


@settings(max_examples=40, deadline=None)
@given(
    case=one_cycle_cases(),
    start_factor=st.floats(min_value=0.01, max_value=1.0),
    total_iters=st.integers(1, 30),
)
def test_warmup_one_cycle_matches_torch_sequential_lr(
    case: dict[str, Any], start_factor: float, total_iters: int
) -> None:
    """Warmup(one_cycle) equals SequentialLR(LinearLR, OneCycleLR) within 1e-12 relative, momentum exactly."""
    groups = len(case["max_lr"])
    total = case["total_steps"]
    # torch warms up towards max_lr / div_factor; we warm up towards one_cycle's LR at its
    # position 0, which is the same unless the rising phase is shorter than one step
    assume(case["pct_start"] * total > 1)
    inner = OneCyclePolicy(
        OneCycleParams(
            max_lr=tuple(case["max_lr"]),
            total_steps=total,
            pct_start=case["pct_start"],
            anneal_strategy=case["anneal_strategy"],
            base_momentum=tuple(case["base_momentum"]),
            max_momentum=tuple(case["max_momentum"]),
            div_factor=case["div_factor"],
            final_div_factor=case["final_div_factor"],
            three_phase=case["three_phase"],
        ),
        [0.3] * groups,
    )
    policy = Warmup(WarmupParams(total_iters=total_iters, start_factor=start_factor), inner)
    steps = total_iters + total - 1
    lrs, moms = torch_run(
        make_optimizer([0.3] * groups, case["optimizer"]),
        lambda opt: SequentialLR(
            opt,
            [
                LinearLR(opt, start_factor=start_factor, end_factor=1.0, total_iters=total_iters),
                OneCycleLR(
                    opt,
                    max_lr=case["max_lr"],
                    total_steps=total,
                    pct_start=case["pct_start"],
                    anneal_strategy=case["anneal_strategy"],
                    base_momentum=case["base_momentum"],
                    max_momentum=case["max_momentum"],
                    div_factor=case["div_factor"],
                    final_div_factor=case["final_div_factor"],
                    three_phase=case["three_phase"],
                ),
            ],
            milestones=[total_iters],
        ),
        steps,
    )
    ours_m = _check_warmup(policy, lrs, steps, 0)
    for t in range(steps + 1):
        mom = ours_m[t]
        assert mom is not None
        assert_close(mom, moms[t], 0, f"momentum at t={t}")
