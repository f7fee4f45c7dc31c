"""keras_reduce_on_plateau against the real keras 3 ReduceLROnPlateau callback (torch backend)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.policies.keras_reduce_on_plateau import (
    KerasReduceOnPlateauParams,
    KerasReduceOnPlateauPolicy,
    float32,
    resolve_mode,
)

keras = pytest.importorskip("keras")

_MODELS: dict[str, Any] = {}


def model(with_accuracy: bool = False) -> Any:
    """One tiny compiled model per kind, shared by every example (building one costs time)."""
    key = "acc" if with_accuracy else "plain"
    if key not in _MODELS:
        m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        m.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.1),
            loss="mse",
            metrics=["accuracy"] if with_accuracy else None,
        )
        if with_accuracy:  # builds the metric objects keras reads the direction from
            import numpy as np

            m.evaluate(np.zeros((2, 2)), np.zeros((2, 1)), verbose=0)
        _MODELS[key] = m
    return _MODELS[key]


def keras_run(
    params: KerasReduceOnPlateauParams, lr: float, stream: Sequence[float | None], m: Any = None
) -> list[tuple[float, Any, int, int]]:
    """(learning rate read back, best, wait, cooldown_counter) after each keras epoch end."""
    m = m if m is not None else model()
    cb = keras.callbacks.ReduceLROnPlateau(
        monitor=params.monitor,
        factor=params.factor,
        patience=params.patience,
        mode=params.mode,
        min_delta=params.min_delta,
        cooldown=params.cooldown,
        min_lr=params.min_lr,
    )
    cb.set_model(m)
    m.optimizer.learning_rate = lr
    cb.on_train_begin()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing metric makes keras warn and skip the epoch
        for epoch, value in enumerate(stream):
            logs = {} if value is None else {params.monitor: value}
            cb.on_epoch_end(epoch, logs=logs)
            best = None if cb.best is None else float(cb.best)
            out.append((float(m.optimizer.learning_rate), best, cb.wait, cb.cooldown_counter))
    return out


def same(a: float | None, b: float | None) -> bool:
    """Equal, with NaN equal to NaN and None only equal to None."""
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


def run_both(
    params: KerasReduceOnPlateauParams, lr: float, stream: Sequence[float | None], m: Any = None
) -> list[float]:
    """Feed ``stream`` to keras and to our policy; assert equality after every epoch."""
    expected = keras_run(params, lr, stream, m)
    policy = KerasReduceOnPlateauPolicy(params, [lr])
    assert policy.lrs == (float(keras.ops.convert_to_numpy(keras.Variable(lr))),)
    seen = []
    for position, (value, (k_lr, k_best, k_wait, k_cool)) in enumerate(
        zip(stream, expected, strict=True), start=1
    ):
        before = policy.lrs
        changed = policy.step(position, value)
        assert policy.lrs == (k_lr,), (position, value)
        assert changed == (policy.lrs != before)
        assert same(policy.best, k_best)
        assert (policy.wait, policy.cooldown_counter) == (k_wait, k_cool)
        seen.append(policy.lrs[0])
    return seen


# --------------------------------------------------------------------------- strategies

metric_values = st.one_of(
    st.floats(min_value=-50.0, max_value=50.0, allow_nan=False),
    st.sampled_from(
        [0.0, 1.0, -1.0, 1.0 + 1e-9, 1.0 - 1e-9, 0.9999, 1e39, -1e39, math.nan, math.inf, -math.inf]
    ),
)


@st.composite
def streams(draw: st.DrawFn) -> list[float | None]:
    """Streams that plateau often: random values, repeats, slow trends, NaN/inf, gaps."""
    out: list[float | None] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["random", "flat", "trend", "gap"]))
        n = draw(st.integers(1, 12))
        if kind == "random":
            out.extend(draw(st.lists(metric_values, min_size=n, max_size=n)))
        elif kind == "flat":
            out.extend([draw(metric_values)] * n)
        elif kind == "trend":
            start = draw(st.floats(-10, 10))
            slope = draw(st.sampled_from([-1e-3, -1e-5, -1e-9, 0.0, 1e-5, 1e-3, 0.5, -0.5]))
            out.extend(start + slope * i for i in range(n))
        else:
            out.extend([None] * min(n, 2))
    return out


@st.composite
def setups(draw: st.DrawFn) -> tuple[KerasReduceOnPlateauParams, float]:
    params = KerasReduceOnPlateauParams(
        monitor=draw(st.sampled_from(["val_loss", "loss"])),
        factor=draw(st.one_of(st.sampled_from([0.1, 0.5, 0.2]), st.floats(0.01, 0.99))),
        patience=draw(st.integers(0, 4)),
        mode=draw(st.sampled_from(["auto", "min", "max"])),
        min_delta=draw(st.one_of(st.sampled_from([0.0, 1e-4, 0.01, 0.5]), st.floats(0.0, 1.0))),
        cooldown=draw(st.integers(0, 3)),
        min_lr=draw(st.one_of(st.sampled_from([0.0, 1e-4, 0.001, 0.01, 0.05]), st.floats(0, 0.1))),
    )
    lr = draw(st.one_of(st.sampled_from([0.1, 0.01, 1e-3, 0.3]), st.floats(1e-6, 2.0)))
    return params, lr


# --------------------------------------------------------------------------- parity


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups(), stream=streams())
def test_matches_keras_on_random_streams(
    setup: tuple[KerasReduceOnPlateauParams, float], stream: list[float | None]
) -> None:
    """The float32 LR read back from keras, best, wait and cooldown equal ours after every epoch."""
    params, lr = setup
    run_both(params, lr, stream)


def test_patience_zero_reduces_like_patience_one() -> None:
    """keras compares wait >= patience, so patience 0 and 1 both reduce on the first bad epoch."""
    stream = [1.0, 2.0, 2.0, 0.5, 3.0]
    zero = run_both(KerasReduceOnPlateauParams(patience=0, factor=0.5), 1.0, stream)
    one = run_both(KerasReduceOnPlateauParams(patience=1, factor=0.5), 1.0, stream)
    assert zero == one == [1.0, 0.5, 0.25, 0.25, 0.125]


def test_cooldown_is_counted_before_the_comparison() -> None:
    """The epoch that ends a cooldown already counts as bad (torch would ignore it)."""
    lrs = run_both(KerasReduceOnPlateauParams(patience=1, cooldown=2, factor=0.5), 1.0, [1.0] + [2.0] * 7)
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625]


def test_first_value_is_best_even_nan() -> None:
    """A NaN first evaluation becomes best and nothing ever improves on it, as in keras."""
    lrs = run_both(KerasReduceOnPlateauParams(patience=2, factor=0.5), 1.0, [math.nan, 0.1, 0.01, 0.001, 1e-4])
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_comparison_happens_in_float32() -> None:
    """A drop below float32 resolution is not an improvement, although it is one in float64."""
    params = KerasReduceOnPlateauParams(patience=1, min_delta=0.0, mode="min")
    lrs = run_both(params, 0.1, [1.0, 1.0 - 1e-9, 1.0 - 2e-9])
    once = float32(float32(0.1) * 0.1)
    assert lrs == [float32(0.1), once, float32(once * 0.1)]  # both drops were bad epochs


def test_learning_rate_is_the_float32_read_back() -> None:
    """LRs are float32 values, e.g. 0.3 reads back as 0.30000001192092896."""
    policy = KerasReduceOnPlateauPolicy(KerasReduceOnPlateauParams(patience=0, factor=0.5), [0.3])
    assert policy.lrs == (0.30000001192092896,)
    policy.step(1, 1.0)
    policy.step(2, 1.0)
    assert policy.lrs == (float32(0.30000001192092896 * 0.5),)


def test_min_lr_floor_compared_as_float32() -> None:
    """The LR stops at min_lr (as float32) and then wait keeps growing without a cooldown."""
    params = KerasReduceOnPlateauParams(patience=1, factor=0.5, min_lr=0.3, cooldown=3)
    lrs = run_both(params, 1.0, [1.0] + [2.0] * 6)
    assert lrs[-1] == float32(0.3)
    policy = KerasReduceOnPlateauPolicy(params, [1.0])
    for i, v in enumerate([1.0] + [2.0] * 12):
        policy.step(i, v)
    assert policy.wait > params.patience and policy.cooldown_counter == 0


@pytest.mark.parametrize(
    ("monitor", "direction"), [("val_loss", "min"), ("loss", "min"), ("val_accuracy", "max"), ("accuracy", "max")]
)
def test_auto_mode_direction_matches_keras(monitor: str, direction: str) -> None:
    """mode auto picks the direction keras picks for its built-in names (model with an accuracy metric)."""
    params = KerasReduceOnPlateauParams(monitor=monitor, mode="auto", patience=1, factor=0.5)
    assert KerasReduceOnPlateauPolicy(params, [0.1]).direction == direction
    stream = [0.5, 0.6, 0.7, 0.4, 0.3, 0.3, 0.8]
    run_both(params, 0.1, stream, model(with_accuracy=True))


def test_auto_mode_by_name() -> None:
    """Names keras cannot decide without its metric objects follow our name table or are refused."""
    assert resolve_mode("auto", "val_top_k_categorical_accuracy") == "max"
    assert resolve_mode("auto", "val_acc") == "max"
    assert resolve_mode("auto", "val_mse") == "min"
    assert resolve_mode("auto", "val_mean_absolute_error") == "min"
    assert resolve_mode("auto", "val_my_loss") == "min"
    with pytest.raises(ParamError) as info:
        KerasReduceOnPlateauParams(monitor="val_throughput")
    assert info.value.field == "mode"
    assert KerasReduceOnPlateauParams(monitor="val_throughput", mode="max").mode == "max"


# --------------------------------------------------------------------------- groups, snapshots


@settings(max_examples=60, deadline=None)
@given(
    setup=setups(),
    stream=streams(),
    extra=st.lists(st.floats(1e-6, 2.0), min_size=1, max_size=2),
)
def test_each_group_follows_the_single_group_rule(
    setup: tuple[KerasReduceOnPlateauParams, float], stream: list[float | None], extra: list[float]
) -> None:
    """With no floor every group's LR is what a single-group policy would give it."""
    params, lr = setup
    params = KerasReduceOnPlateauParams(
        monitor=params.monitor, factor=params.factor, patience=params.patience, mode=params.mode,
        min_delta=params.min_delta, cooldown=params.cooldown, min_lr=0.0,
    )
    lrs = [lr, *extra]
    multi = KerasReduceOnPlateauPolicy(params, lrs)
    singles = [KerasReduceOnPlateauPolicy(params, [x]) for x in lrs]
    for position, value in enumerate(stream, start=1):
        multi.step(position, value)
        for s in singles:
            s.step(position, value)
        assert multi.lrs == tuple(s.lrs[0] for s in singles)


@settings(max_examples=100, deadline=None)
@given(setup=setups(), stream=streams(), cut=st.integers(0, 60))
def test_snapshot_restore_continues_identically(
    setup: tuple[KerasReduceOnPlateauParams, float], stream: list[float | None], cut: int
) -> None:
    """A policy restored from a JSON round trip of state_dict() continues exactly like the original."""
    params, lr = setup
    cut = min(cut, len(stream))
    original = KerasReduceOnPlateauPolicy(params, [lr, lr / 3])
    for position, value in enumerate(stream[:cut], start=1):
        original.step(position, value)
    restored = KerasReduceOnPlateauPolicy(params, [lr, lr / 3])
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    for position, value in enumerate(stream[cut:], start=cut + 1):
        assert original.step(position, value) == restored.step(position, value)
        assert original.lrs == restored.lrs
        assert (original.wait, original.cooldown_counter) == (restored.wait, restored.cooldown_counter)
        assert same(original.best, restored.best)


def test_scale_by_and_set_lrs() -> None:
    """scale_by applies keras's floor rule per group without touching counters; set_lrs stores float32."""
    policy = KerasReduceOnPlateauPolicy(KerasReduceOnPlateauParams(patience=5), [0.1, 0.001])
    policy.step(1, 1.0)
    policy.step(2, 2.0)
    assert policy.scale_by(0.5, [0.0, 0.001]) is True
    assert policy.lrs == (float32(float32(0.1) * 0.5), float32(0.001))
    assert (policy.wait, policy.best) == (1, 1.0)
    policy.set_lrs([0.3, 0.2])
    assert policy.lrs == (float32(0.3), float32(0.2))
    with pytest.raises(ValueError, match="lrs"):
        policy.set_lrs([0.3])


def test_a_raise_restarts_the_wait() -> None:
    policy = KerasReduceOnPlateauPolicy(KerasReduceOnPlateauParams(patience=5), [0.1])
    for position, metric in enumerate([1.0, 2.0, 2.0], start=1):
        policy.step(position, metric)
    assert policy.wait == 2
    assert policy.scale_by(0.5, [0.0]) is True and policy.wait == 2
    assert policy.scale_by(3.0, [0.0]) is True and policy.wait == 0


def test_float32_rounding_and_overflow() -> None:
    """float32() rounds to nearest like a C cast and maps overflow to ±inf."""
    assert float32(0.1) == 0.10000000149011612
    assert float32(1e39) == math.inf and float32(-1e39) == -math.inf
    assert math.isnan(float32(math.nan))
    assert float32(3.4028235e38) == 3.4028234663852886e38


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"patience": -1}, "patience"),
        ({"cooldown": -2}, "cooldown"),
        ({"min_delta": -1e-4}, "min_delta"),
        ({"min_lr": -0.1}, "min_lr"),
        ({"min_lr": math.inf}, "min_lr"),
        ({"mode": "minimize"}, "mode"),
        ({"monitor": ""}, "monitor"),
    ],
)
def test_bad_params_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Each impossible parameter raises ParamError naming that parameter."""
    with pytest.raises(ParamError) as info:
        KerasReduceOnPlateauParams(**kwargs)
    assert info.value.field == field


def test_defaults_are_keras() -> None:
    """Defaults equal keras 3's ReduceLROnPlateau defaults."""
    d = KerasReduceOnPlateauParams()
    assert (d.monitor, d.factor, d.patience, d.mode, d.min_delta, d.cooldown, d.min_lr) == (
        "val_loss", 0.1, 10, "auto", 1e-4, 0, 0.0
    )
    assert KerasReduceOnPlateauPolicy.kind == "keras_reduce_on_plateau"
