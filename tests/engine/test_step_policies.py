"""Behaviour of the step-driven policies and the warmup wrapper beyond torch parity.

Parameter validation, ``scale_by`` / ``set_lrs``, state round trips, and the warmup's
handling of plateau (metric-driven) inner policies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lrpilot.schedules import lrs_at

from monitor.engine.base import ParamError, Policy
from monitor.engine.policies.constant import ConstantParams, ConstantPolicy
from monitor.engine.policies.cosine_restarts import CosineRestartsParams, CosineRestartsPolicy
from monitor.engine.policies.cyclic import CyclicParams, CyclicPolicy
from monitor.engine.policies.one_cycle import OneCycleParams, OneCyclePolicy
from monitor.engine.policies.reduce_on_plateau import ReduceOnPlateauParams, ReduceOnPlateauPolicy
from monitor.engine.policies.warmup import Warmup, WarmupParams

# ----------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: CyclicParams(base_lr=0.1, max_lr=0.01), "max_lr"),
        (lambda: CyclicParams(base_lr=(0.1, 0.2), max_lr=(1.0, 0.1)), "max_lr[1]"),
        (lambda: CyclicParams(base_lr=(0.1, 0.2), max_lr=(1.0, 1.0, 1.0)), "max_lr"),
        (lambda: CyclicParams(base_lr=-0.1, max_lr=1.0), "base_lr"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=math.nan), "max_lr"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, step_size_up=0), "step_size_up"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, step_size_down=0), "step_size_down"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, mode="sawtooth"), "mode"),  # type: ignore[arg-type]
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, gamma=0.0), "gamma"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, gamma=1.5), "gamma"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, base_momentum=0.95), "max_momentum"),
        (lambda: CyclicParams(base_lr=0.1, max_lr=1.0, max_momentum=1.5), "max_momentum"),
        (lambda: OneCycleParams(max_lr=0.1), "total_steps"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=0), "total_steps"),
        (lambda: OneCycleParams(max_lr=0.1, epochs=0, steps_per_epoch=10), "epochs"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=100, pct_start=0.0), "pct_start"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=100, pct_start=1.0), "pct_start"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=4, pct_start=0.25), "pct_start"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=100, anneal_strategy="exp"), "anneal_strategy"),  # type: ignore[arg-type]
        (lambda: OneCycleParams(max_lr=0.1, total_steps=100, div_factor=0.0), "div_factor"),
        (lambda: OneCycleParams(max_lr=0.1, total_steps=100, final_div_factor=-1.0), "final_div_factor"),
        (lambda: OneCycleParams(max_lr=-0.1, total_steps=100), "max_lr"),
        (lambda: CosineRestartsParams(T_0=0), "T_0"),
        (lambda: CosineRestartsParams(T_0=10, T_mult=0), "T_mult"),
        (lambda: CosineRestartsParams(T_0=10, eta_min=-1e-3), "eta_min"),
        (lambda: CosineRestartsParams(T_0=2.5), "T_0"),  # type: ignore[arg-type]
        (lambda: WarmupParams(total_iters=-1), "total_iters"),
        (lambda: WarmupParams(total_iters=10, start_factor=0.0), "start_factor"),
        (lambda: WarmupParams(total_iters=10, start_factor=1.5), "start_factor"),
    ],
)
def test_impossible_params_raise_param_error_naming_the_field(
    make: Callable[[], Any], field: str
) -> None:
    """Each impossible value raises ParamError with the offending field's name."""
    with pytest.raises(ParamError) as info:
        make()
    assert info.value.field == field


def test_params_defaults_are_torchs() -> None:
    """Defaults follow torch's CyclicLR, OneCycleLR, CosineAnnealingWarmRestarts and LinearLR."""
    cyc = CyclicParams(base_lr=0.1, max_lr=1.0)
    assert (cyc.step_size_up, cyc.step_size_down, cyc.mode, cyc.gamma) == (2000, None, "triangular", 1.0)
    assert (cyc.cycle_momentum, cyc.base_momentum, cyc.max_momentum) == (True, 0.8, 0.9)
    one = OneCycleParams(max_lr=0.1, epochs=3, steps_per_epoch=7)
    assert one.steps == 21
    assert (one.pct_start, one.anneal_strategy, one.div_factor, one.final_div_factor) == (0.3, "cos", 25.0, 1e4)
    assert (one.base_momentum, one.max_momentum, one.three_phase) == (0.85, 0.95, False)
    cos = CosineRestartsParams(T_0=10)
    assert (cos.T_mult, cos.eta_min) == (1, 0.0)
    warm = WarmupParams()
    assert (warm.total_iters, warm.start_factor) == (5, 1.0 / 3)


def test_params_lists_become_tuples() -> None:
    """A per-group list (as from YAML) is stored as a tuple, so the params stay hashable."""
    params = CyclicParams(base_lr=[0.1, 0.2], max_lr=[1.0, 2.0])  # type: ignore[arg-type]
    assert params.base_lr == (0.1, 0.2)
    hash(params)


def test_per_group_length_must_match_the_jobs_groups() -> None:
    """A per-group tuple with the wrong number of values fails when the policy is built."""
    with pytest.raises(ParamError) as info:
        OneCyclePolicy(OneCycleParams(max_lr=(0.1, 0.2), total_steps=10), [0.01, 0.01, 0.01])
    assert info.value.field == "max_lr"


def test_policy_kinds() -> None:
    """Each policy class carries the kind config files use."""
    assert ConstantPolicy.kind == "constant"
    assert CyclicPolicy.kind == "cyclic"
    assert OneCyclePolicy.kind == "one_cycle"
    assert CosineRestartsPolicy.kind == "cosine_restarts"
    assert Warmup.kind == "warmup"


# ----------------------------------------------------------------------- building blocks


def cosine(lrs: tuple[float, ...] = (0.1, 0.01), origin: int = 0) -> CosineRestartsPolicy:
    return CosineRestartsPolicy(CosineRestartsParams(T_0=10, T_mult=2, eta_min=1e-4), lrs, origin)


def plateau(lrs: tuple[float, ...] = (0.1,)) -> ReduceOnPlateauPolicy:
    return ReduceOnPlateauPolicy(ReduceOnPlateauParams(patience=1, factor=0.5), lrs)


FACTORIES: dict[str, Callable[[], Policy]] = {
    "constant": lambda: ConstantPolicy(ConstantParams(), [0.1, 0.02]),
    "cyclic": lambda: CyclicPolicy(
        CyclicParams(base_lr=(0.01, 0.001), max_lr=(0.1, 0.02), step_size_up=5, step_size_down=3, mode="exp_range", gamma=0.99),
        [0.5, 0.5],
    ),
    "one_cycle": lambda: OneCyclePolicy(
        OneCycleParams(max_lr=(0.1, 0.05), total_steps=40, three_phase=True), [0.5, 0.5]
    ),
    "cosine_restarts": lambda: cosine(),
    "warmup_cosine": lambda: Warmup(WarmupParams(total_iters=8, start_factor=0.1), cosine()),
    "warmup_plateau": lambda: Warmup(WarmupParams(total_iters=8, start_factor=0.1), plateau((0.1, 0.02))),
}


# ----------------------------------------------------------------------- scale_by / set_lrs


def test_scale_by_scales_the_whole_schedule_from_now_on() -> None:
    """After scale_by(0.5) every later position gives half the LR, and the segment says so."""
    reference, scaled = cosine(), cosine()
    for t in range(1, 6):
        reference.step(t, None)
        scaled.step(t, None)
    assert scaled.scale_by(0.5, [0.0, 0.0]) is True
    for t in range(6, 40):
        reference.step(t, None)
        scaled.step(t, None)
        assert scaled.lrs == tuple(0.5 * x for x in reference.lrs)
        assert lrs_at(scaled.segment(), t) == list(scaled.lrs)


def test_scale_by_stops_at_the_floor() -> None:
    """A reduction stops where any group would go below its floor at the current position."""
    policy = ConstantPolicy(ConstantParams(), [0.1, 0.02])
    assert policy.scale_by(0.1, [0.0, 0.01]) is True
    assert policy.lrs[1] >= 0.01
    assert policy.lrs[1] == pytest.approx(0.01, rel=1e-15)
    assert policy.lrs[0] == pytest.approx(0.05, rel=1e-15)
    assert policy.scale_by(0.1, [0.0, 0.01]) is False  # already at the floor: nothing changes
    assert policy.scale_by(2.0, [0.0, 0.01]) is True  # an increase is never floored
    assert policy.lrs[0] == pytest.approx(0.1, rel=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    lr=st.floats(min_value=1e-8, max_value=10.0),
    factor=st.floats(min_value=1e-3, max_value=0.999),
    floor_ratio=st.floats(min_value=0.0, max_value=1.5),
)
def test_scale_by_never_goes_below_the_floor(lr: float, factor: float, floor_ratio: float) -> None:
    """Whatever the factor, the LR after a reduction is >= the floor, unless it already was below."""
    policy = ConstantPolicy(ConstantParams(), [lr])
    floor = lr * floor_ratio
    changed = policy.scale_by(factor, [floor])
    if floor >= lr:
        assert not changed and policy.lrs == (lr,)
    else:
        assert changed
        assert policy.lrs[0] >= floor
        assert policy.lrs[0] >= lr * factor * (1 - 1e-15)


def test_scale_by_rejects_bad_factors() -> None:
    """A factor that is not a finite positive number is a ValueError."""
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="factor"):
            cosine().scale_by(bad, [])


def test_set_lrs_rescales_to_the_first_groups_lr() -> None:
    """set_lrs makes the current first-group LR the requested one; other groups keep their ratio."""
    policy = cosine()
    for t in range(1, 4):
        policy.step(t, None)
    before = policy.lrs
    policy.set_lrs([0.05, 123.0])
    assert policy.lrs[0] == pytest.approx(0.05, rel=1e-15)
    assert policy.lrs[1] / policy.lrs[0] == pytest.approx(before[1] / before[0], rel=1e-14)


def test_set_lrs_on_a_zero_lr_is_a_clear_error() -> None:
    """A schedule whose own LR is 0 here cannot be rescaled to a non-zero LR."""
    policy = CyclicPolicy(CyclicParams(base_lr=0.0, max_lr=1.0, step_size_up=4), [0.1])
    with pytest.raises(ValueError, match="LR is 0"):
        policy.set_lrs([0.1])


def test_positions_only_go_forward() -> None:
    """A smaller position than the current one leaves a step-driven policy where it is."""
    policy = cosine()
    policy.step(7, None)
    lrs = policy.lrs
    assert policy.step(3, None) is False
    assert policy.lrs == lrs


# ----------------------------------------------------------------------- state round trips


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(FACTORIES)),
    cut=st.integers(0, 60),
    scale_at=st.none() | st.integers(0, 60),
    metrics=st.lists(st.sampled_from([None, 1.0, 2.0, 0.5]), min_size=80, max_size=80),
)
def test_state_round_trip_continues_identically(
    name: str, cut: int, scale_at: int | None, metrics: list[float | None]
) -> None:
    """A policy restored from its JSON state at any point continues with identical LRs and segments."""
    original = FACTORIES[name]()

    def advance(policy: Policy, t: int) -> bool:
        changed = policy.step(t, metrics[t])
        if t == scale_at:
            changed = policy.scale_by(0.3, [1e-4]) or changed
        return changed

    for t in range(1, cut + 1):
        advance(original, t)
    # a plateau policy's best may be ±inf, which the daemon's JSON layer encodes as strings
    state = json.loads(json.dumps(original.state_dict()))
    restored = FACTORIES[name]()
    restored.load_state_dict(state)
    assert restored.lrs == original.lrs
    assert restored.segment() == original.segment()
    for t in range(cut + 1, 80):
        assert advance(restored, t) == advance(original, t)
        assert restored.lrs == original.lrs
        assert restored.momentums == original.momentums
        assert restored.segment() == original.segment()


def test_load_state_dict_rejects_another_kinds_state() -> None:
    """Loading a cyclic policy's state into a cosine policy is a clear error."""
    state = FACTORIES["cyclic"]().state_dict()
    with pytest.raises(ValueError, match="kind"):
        cosine().load_state_dict(state)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_segments_are_strict_json(name: str) -> None:
    """Every segment survives json.dumps(allow_nan=False) and gives the same LRs after the trip."""
    policy = FACTORIES[name]()
    segment = policy.segment()
    assert segment is not None
    again = json.loads(json.dumps(segment, allow_nan=False))
    for step in range(0, 100, 7):
        assert lrs_at(again, step) == lrs_at(segment, step)
    if name != "warmup_plateau":  # a plateau policy's best starts at inf
        json.dumps(policy.state_dict(), allow_nan=False)


# ----------------------------------------------------------------------- warmup


def test_warmup_over_plateau_ignores_metrics_during_warmup() -> None:
    """During warmup the plateau policy sees no evaluation; afterwards it is stepped at position t - N."""
    inner = plateau()
    warm = Warmup(WarmupParams(total_iters=5, start_factor=0.2), inner)
    assert warm.monitor == inner.monitor == "val_loss"
    for t in range(1, 5):
        assert warm.step(t, 10.0 + t) is False  # worse and worse, but still warming up
    assert inner.evaluations == 0
    assert warm.lrs[0] == pytest.approx(0.2 * 0.1 + 0.8 * 0.1 * 4 / 5, rel=1e-15)
    assert warm.step(5, 1.0) is False  # first evaluation: becomes best
    assert inner.position == 0 and inner.evaluations == 1
    assert warm.step(6, 2.0) is False  # bad 1 (patience 1)
    assert warm.step(7, 2.0) is True  # bad 2 > patience: halved
    assert warm.lrs == (0.05,)
    assert inner.position == 2


def test_warmup_over_plateau_segment_is_warmup_then_constant_then_none() -> None:
    """A plateau inner gives a warmup segment towards a constant LR, and no segment after warmup."""
    warm = Warmup(WarmupParams(total_iters=4, start_factor=0.5), plateau((0.1, 0.02)))
    warm.origin_step = 100
    seg = warm.segment()
    assert seg is not None and seg["kind"] == "warmup" and seg["origin_step"] == 100
    assert seg["then"] == {"kind": "constant", "origin_step": 0, "params": {"lrs": [0.1, 0.02]}}
    for t in range(4):
        assert lrs_at(seg, 100 + t) == list(warm.lrs)
        warm.step(t + 1, None)
    assert warm.segment() is None
    assert warm.lrs == (0.1, 0.02)
    assert lrs_at(seg, 104) == [0.1, 0.02]


def test_warmup_segment_after_warmup_is_the_inner_segment_anchored_after_the_warmup() -> None:
    """Once warmup is over, the segment is the inner policy's, with origin moved by total_iters."""
    warm = Warmup(WarmupParams(total_iters=6, start_factor=0.1), cosine(), origin_step=50)
    first = warm.segment()
    assert first is not None
    for t in range(1, 30):
        warm.step(t, None)
        seg = warm.segment()
        assert seg is not None
        assert seg["kind"] == ("warmup" if t < 6 else "cosine_restarts")
        assert lrs_at(seg, 50 + t) == lrs_at(first, 50 + t) == list(warm.lrs)
    seg = warm.segment()
    assert seg is not None and seg["origin_step"] == 56


def test_warmup_scale_by_floors_against_the_target_lr() -> None:
    """During warmup a reduction is floored against the LR the warmup rises to, not the small warmup LR."""
    warm = Warmup(WarmupParams(total_iters=10, start_factor=0.01), cosine((0.1,)))
    assert warm.lrs[0] == pytest.approx(0.001)
    assert warm.scale_by(0.5, [0.01]) is True  # 0.1 -> 0.05 is above the floor 0.01
    for t in range(1, 11):
        warm.step(t, None)
    assert warm.lrs[0] == pytest.approx(0.05, rel=1e-15)


def test_warmup_set_lrs_during_warmup_sets_the_current_lr() -> None:
    """set_lrs during warmup makes the current LR the requested one; the warmup keeps rising."""
    warm = Warmup(WarmupParams(total_iters=10, start_factor=0.1), cosine((0.1,)))
    for t in range(1, 5):
        warm.step(t, None)
    warm.set_lrs([0.02])
    assert warm.lrs[0] == pytest.approx(0.02, rel=1e-14)
    warm.step(5, None)
    assert warm.lrs[0] > 0.02


def test_zero_warmup_is_the_inner_policy() -> None:
    """total_iters=0 hands over at once: the LRs and segment are the inner policy's."""
    inner = cosine()
    warm = Warmup(WarmupParams(total_iters=0), inner)
    assert warm.lrs == inner.lrs
    assert warm.segment() == inner.segment()
