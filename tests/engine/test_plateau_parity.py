"""reduce_on_plateau against the real torch.optim.lr_scheduler.ReduceLROnPlateau."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.policies.reduce_on_plateau import ReduceOnPlateauParams, ReduceOnPlateauPolicy

# --------------------------------------------------------------------------- helpers


def make_torch(params: ReduceOnPlateauParams, lrs: list[float]) -> tuple[Any, Any]:
    """An SGD optimizer with one param group per LR and torch's scheduler on it."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    opt = torch.optim.SGD(groups, lr=lrs[0])
    min_lr: Any = list(params.min_lr) if isinstance(params.min_lr, tuple) else params.min_lr
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode=params.mode,
        factor=params.factor,
        patience=params.patience,
        threshold=params.threshold,
        threshold_mode=params.threshold_mode,
        cooldown=params.cooldown,
        min_lr=min_lr,
        eps=params.eps,
    )
    return opt, sched


def torch_lrs(opt: Any) -> tuple[float, ...]:
    return tuple(float(g["lr"]) for g in opt.param_groups)


def same(a: float, b: float) -> bool:
    """Bit-for-bit equal floats, NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == b


def json_round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's JSON layer does to a state (non-finite floats survive)."""
    result: dict[str, Any] = json.loads(json.dumps(state))
    return result


# --------------------------------------------------------------------------- strategies

metric_values = st.one_of(
    st.floats(min_value=-50.0, max_value=50.0, allow_nan=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.0001, 0.9999, math.nan, math.inf, -math.inf]),
)


@st.composite
def streams(draw: st.DrawFn) -> list[float | None]:
    """Metric streams that plateau often: random values, repeats, slow trends, NaN/inf, gaps."""
    out: list[float | None] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["random", "flat", "trend", "gap"]))
        n = draw(st.integers(1, 12))
        if kind == "random":
            out.extend(draw(st.lists(metric_values, min_size=n, max_size=n)))
        elif kind == "flat":
            out.extend([draw(metric_values)] * n)
        elif kind == "trend":
            start = draw(st.floats(-10, 10))
            slope = draw(st.sampled_from([-1e-3, -1e-5, 0.0, 1e-5, 1e-3, 0.5, -0.5]))
            out.extend(start + slope * i for i in range(n))
        else:
            out.extend([None] * n)
    return out


@st.composite
def setups(draw: st.DrawFn) -> tuple[ReduceOnPlateauParams, list[float]]:
    groups = draw(st.integers(1, 3))
    lrs = draw(
        st.lists(
            st.one_of(st.floats(1e-6, 2.0), st.sampled_from([0.1, 0.01, 1e-3])),
            min_size=groups,
            max_size=groups,
        )
    )
    floor = st.one_of(st.sampled_from([0.0, 1e-5, 1e-3, 0.01, 0.05]), st.floats(0.0, 0.1))
    min_lr: Any = (
        tuple(draw(st.lists(floor, min_size=groups, max_size=groups)))
        if draw(st.booleans())
        else draw(floor)
    )
    params = ReduceOnPlateauParams(
        mode=draw(st.sampled_from(["min", "max"])),
        factor=draw(st.one_of(st.sampled_from([0.1, 0.5, 0.9]), st.floats(0.01, 0.99))),
        patience=draw(st.integers(0, 4)),
        threshold=draw(
            st.one_of(st.sampled_from([0.0, 1e-4, 0.01, 0.1, 1.0, 2.0]), st.floats(0.0, 0.5))
        ),
        threshold_mode=draw(st.sampled_from(["rel", "abs"])),
        cooldown=draw(st.integers(0, 3)),
        min_lr=min_lr,
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-4, 1e-2])),
    )
    return params, lrs


def run_both(
    params: ReduceOnPlateauParams, lrs: list[float], stream: Sequence[float | None]
) -> list[tuple[float, ...]]:
    """Feed ``stream`` to torch and to our policy, asserting equality after every evaluation."""
    opt, sched = make_torch(params, lrs)
    policy = ReduceOnPlateauPolicy(params, lrs)
    assert policy.lrs == torch_lrs(opt)
    seen = []
    for position, value in enumerate(stream, start=1):
        before = policy.lrs
        changed = policy.step(position, value)
        if value is not None:
            sched.step(value)
        assert policy.lrs == torch_lrs(opt), (position, value)
        assert changed == (policy.lrs != before)
        assert policy.num_bad_epochs == sched.num_bad_epochs
        assert policy.cooldown_counter == sched.cooldown_counter
        assert same(policy.best, sched.best)
        seen.append(policy.lrs)
    return seen


# --------------------------------------------------------------------------- parity


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), stream=streams())
def test_matches_torch_on_random_streams(
    setup: tuple[ReduceOnPlateauParams, list[float]], stream: list[float | None]
) -> None:
    """Every LR, bad-evaluation count, cooldown counter and best equals torch's after each evaluation."""
    params, lrs = setup
    run_both(params, lrs, stream)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
def test_negative_metrics_follow_torch_arithmetic(mode: str, threshold_mode: str) -> None:
    """With negative metrics the rel threshold is applied as torch does (sign quirk included)."""
    params = ReduceOnPlateauParams(
        mode=mode,  # type: ignore[arg-type]
        threshold_mode=threshold_mode,  # type: ignore[arg-type]
        threshold=0.05,
        patience=1,
        factor=0.5,
    )
    stream: list[float | None] = [-10.0, -10.2, -10.1, -9.8, -9.9, -10.5, -10.4, -10.6, -10.3]
    final = run_both(params, [0.1], stream)[-1]
    # rel/min: every value within 5% above a negative best counts as better, so no reduction
    expected = {("min", "rel"): 0.1, ("min", "abs"): 0.05, ("max", "rel"): 0.05, ("max", "abs"): 0.0125}
    assert final == (expected[mode, threshold_mode],)


def test_rel_min_accepts_slightly_worse_negative_values() -> None:
    """In rel/min mode a negative best times (1 - threshold) is larger, so -9.6 beats -10.0."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(threshold=0.05, patience=0), [0.1])
    policy.step(1, -10.0)
    policy.step(2, -9.6)
    assert policy.best == -9.6
    assert policy.lrs == (0.1,)


def test_patience_zero_reduces_on_first_bad_evaluation() -> None:
    """patience=0: the second evaluation, if not better, reduces at once (torch's documented example)."""
    params = ReduceOnPlateauParams(patience=0, factor=0.5)
    assert run_both(params, [1.0], [1.0, 2.0, 2.0, 0.5]) == [(1.0,), (0.5,), (0.25,), (0.25,)]


def test_nan_counts_as_bad_and_never_becomes_best() -> None:
    """NaN compares false with everything, so it is a bad evaluation and best stays as it was."""
    params = ReduceOnPlateauParams(patience=1, factor=0.5)
    run_both(params, [1.0], [1.0, math.nan, math.nan, 0.5, math.nan])
    policy = ReduceOnPlateauPolicy(params, [1.0])
    for i, v in enumerate([1.0, math.nan, math.nan]):
        policy.step(i, v)
    assert policy.best == 1.0
    assert policy.lrs == (0.5,)


def test_min_lr_floor_and_eps_per_group() -> None:
    """Each group stops at its own floor, and a step smaller than eps is skipped."""
    params = ReduceOnPlateauParams(patience=0, factor=0.5, min_lr=(0.2, 0.0), eps=1e-3)
    lrs = run_both(params, [1.0, 0.01], [1.0] * 10)
    assert lrs[-1][0] == 0.2
    assert lrs[-1][1] < 0.01 and lrs[-1][1] > 1e-3  # stopped once old - new <= eps


def test_cooldown_ignores_bad_evaluations() -> None:
    """After a reduction, `cooldown` evaluations do not count towards patience."""
    params = ReduceOnPlateauParams(patience=0, cooldown=2, factor=0.5)
    assert run_both(params, [1.0], [1.0] + [2.0] * 7) == [
        (1.0,), (0.5,), (0.5,), (0.5,), (0.25,), (0.25,), (0.25,), (0.125,)
    ]


def test_records_without_metric_change_nothing() -> None:
    """step(position, None) is not an evaluation."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(patience=0), [0.1])
    policy.step(1, 1.0)
    for i in range(2, 50):
        assert policy.step(i, None) is False
    assert (policy.num_bad_epochs, policy.evaluations, policy.lrs) == (0, 1, (0.1,))


# --------------------------------------------------------------------------- snapshots


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), stream=streams(), cut=st.integers(0, 80))
def test_snapshot_restore_continues_identically(
    setup: tuple[ReduceOnPlateauParams, list[float]], stream: list[float | None], cut: int
) -> None:
    """A policy restored from a JSON round trip of state_dict() at any point continues like the original."""
    params, lrs = setup
    cut = min(cut, len(stream))
    original = ReduceOnPlateauPolicy(params, lrs)
    for position, value in enumerate(stream[:cut], start=1):
        original.step(position, value)
    restored = ReduceOnPlateauPolicy(params, lrs)
    restored.load_state_dict(json_round_trip(original.state_dict()))
    assert restored.state_dict() == original.state_dict() or same(restored.best, original.best)
    for position, value in enumerate(stream[cut:], start=cut + 1):
        assert original.step(position, value) == restored.step(position, value)
        assert original.lrs == restored.lrs
        assert original.num_bad_epochs == restored.num_bad_epochs
        assert original.cooldown_counter == restored.cooldown_counter
        assert same(original.best, restored.best)


def test_state_dict_is_json_ready_with_infinite_best() -> None:
    """Before any good evaluation best is +inf: spelled "Infinity" in the state, plain JSON,
    and a float again once loaded."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(), [0.1, 0.2])
    state = json_round_trip(policy.state_dict())
    assert state["best"] == "Infinity"  # spelled: bare Infinity is not JSON
    assert float(state["best"]) == math.inf
    assert state["kind"] == "reduce_on_plateau"
    other = ReduceOnPlateauPolicy(ReduceOnPlateauParams(), [0.1, 0.2])
    other.load_state_dict(state)
    assert other.best == math.inf and other.lrs == (0.1, 0.2)


def test_load_state_rejects_wrong_group_count() -> None:
    """A state for a different number of param groups is refused with a message naming lrs."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(), [0.1, 0.2])
    state = policy.state_dict()
    with pytest.raises(ValueError, match="lrs"):
        ReduceOnPlateauPolicy(ReduceOnPlateauParams(), [0.1]).load_state_dict(state)


# --------------------------------------------------------------------------- responses


def test_scale_by_uses_floor_and_eps_rule() -> None:
    """scale_by multiplies each group, stops at the given floors, skips changes <= eps, keeps counters."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(eps=1e-3, patience=5), [1.0, 0.1, 0.0015])
    policy.step(1, 1.0)
    policy.step(2, 2.0)
    assert policy.scale_by(0.5, [0.6, 0.0, 0.0]) is True
    assert policy.lrs == (0.6, 0.05, 0.0015)  # floor; halved; 0.00075 step is below eps
    assert (policy.num_bad_epochs, policy.best) == (1, 1.0)
    assert policy.scale_by(0.5, [0.01]) is True  # one floor broadcasts to every group
    assert policy.lrs == (0.3, 0.025, 0.0015)  # the floor above an LR never raises it
    assert policy.scale_by(0.99, [0.3, 0.025, 0.0]) is False
    with pytest.raises(ValueError, match="min_lrs"):
        policy.scale_by(0.5, [0.1, 0.1])


def test_a_raise_restarts_the_count_of_bad_evaluations_a_cut_does_not() -> None:
    """An increase response gives the raised LR evaluations of its own; best stays."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(patience=2), [0.1])
    for position, metric in enumerate([1.0, 1.5, 1.5], start=1):
        policy.step(position, metric)
    assert policy.num_bad_epochs == 2
    assert policy.scale_by(0.5, [0.0]) is True
    assert policy.num_bad_epochs == 2  # a cut keeps the count, as before
    assert policy.scale_by(3.0, [0.0]) is True
    assert (policy.num_bad_epochs, policy.best) == (0, 1.0)
    assert policy.step(4, 1.5) is False  # one bad evaluation of the raised LR: no cut yet


def test_set_lrs_forces_values() -> None:
    """set_lrs replaces the LRs; a wrong group count or a negative LR is refused."""
    policy = ReduceOnPlateauPolicy(ReduceOnPlateauParams(), [0.1, 0.2])
    policy.set_lrs([0.3, 0.4])
    assert policy.lrs == (0.3, 0.4)
    with pytest.raises(ValueError, match="lrs"):
        policy.set_lrs([0.3])
    with pytest.raises(ValueError, match=r"lrs\[1\]"):
        policy.set_lrs([0.3, -1.0])


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": 1.5}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"factor": -0.1}, "factor"),
        ({"factor": math.nan}, "factor"),
        ({"patience": -1}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"patience": True}, "patience"),
        ({"cooldown": -1}, "cooldown"),
        ({"threshold": -1e-4}, "threshold"),
        ({"threshold": math.inf}, "threshold"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"min_lr": (0.1, -0.1)}, "min_lr[1]"),
        ({"min_lr": ()}, "min_lr"),
        ({"min_lr": "0.1"}, "min_lr"),
        ({"eps": -1.0}, "eps"),
        ({"mode": "minimum"}, "mode"),
        ({"threshold_mode": "relative"}, "threshold_mode"),
        ({"monitor": ""}, "monitor"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Each impossible parameter raises ParamError naming that parameter."""
    with pytest.raises(ParamError) as info:
        ReduceOnPlateauParams(**kwargs)
    assert info.value.field == field


def test_min_lr_tuple_length_checked_against_groups() -> None:
    """A per-group min_lr with the wrong length is a ParamError when the policy is built."""
    params = ReduceOnPlateauParams(min_lr=(0.1, 0.2))
    with pytest.raises(ParamError) as info:
        ReduceOnPlateauPolicy(params, [0.5, 0.5, 0.5])
    assert info.value.field == "min_lr"
    assert ReduceOnPlateauPolicy(params, [0.5, 0.5]).min_lrs == (0.1, 0.2)


def test_defaults_are_torchs() -> None:
    """Defaults equal torch's ReduceLROnPlateau defaults; lists become tuples and ints floats."""
    p = ReduceOnPlateauParams(min_lr=[0, 1e-3])  # type: ignore[arg-type]
    assert p.min_lr == (0.0, 1e-3)
    d = ReduceOnPlateauParams()
    assert (d.mode, d.factor, d.patience, d.threshold, d.threshold_mode) == ("min", 0.1, 10, 1e-4, "rel")
    assert (d.cooldown, d.min_lr, d.eps, d.monitor) == (0, 0.0, 1e-8, "val_loss")
    assert ReduceOnPlateauPolicy.kind == "reduce_on_plateau"
