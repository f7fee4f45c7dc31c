"""Every detector's ``feed_columns`` is its ``feed``, one record at a time, in another form.

The daemon feeds a whole metrics frame at once (``JobEngine.feed_batch``); detectors on the
hot path override ``Detector.feed_columns`` with a loop over their own column. These tests
hold each detector, with its default parameters and with sensitive ones, to the same
detections (step, value, reason, detail, in record order) and the same ``state_dict()`` as
per-record feeding, over streams that make it fire (blow-ups, oscillation, spikes, NaN and
Inf, plateaus, slow descents), split into frames at random, with rewinds between frames.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from monitor.engine.base import Detector
from monitor.engine.events import Detection, Metrics
from monitor.engine.registry import DETECTOR_NAMES, detector_classes

NAN = float("nan")
INF = float("inf")

Stream = tuple[list[int], dict[str, list[float | None]]]

#: parameters that make each detector fire often on short streams
SENSITIVE: dict[str, dict[str, Any]] = {
    "non_finite": {"metrics": ("loss", "val_loss")},
    "spike": {
        "window": 16,
        "min_samples": 8,
        "z_threshold": 3.0,
        "burst_count": 2,
        "burst_window": 20,
        "reset_after": 4,
    },
    "oscillation": {
        "window": 20,
        "cooldown": 5,
        "min_relative_amplitude": 0.05,
        "min_flip_rate": 0.05,
    },
    "divergence": {"window": 12, "cooldown": 5, "min_rise": 0.1, "min_acceleration": 0.0},
    "plateau": {"patience": 2, "cooldown": 1},
    "slow_progress": {"rearm_after": 1, "max_increases": 100},
    "overshoot": {"hold": 5, "cooldown": 5, "reference_values": 3},
    "stalled": {"patience": 3, "max_detections": 100, "start_values": 2},
}

#: a metric each detector reads, for the streams that move one metric only
MONITOR = {
    "non_finite": "loss",
    "spike": "loss",
    "oscillation": "loss",
    "divergence": "loss",
    "plateau": "val_loss",
    "slow_progress": "val_loss",
    "overshoot": "loss",
    "stalled": "val_loss",
}


def _mixed(seed: int, n: int = 1500) -> Stream:
    """Loss every step (descents, blow-ups, oscillation, spikes, NaN/Inf, gaps), val_loss every 10."""
    rng = random.Random(seed)
    steps: list[int] = []
    loss: list[float | None] = []
    val: list[float | None] = []
    grad: list[float | None] = []
    level = 2.0
    phase = "descend"
    for step in range(n):
        if step % 150 == 0:
            phase = rng.choice(["descend", "descend", "blowup", "oscillate", "flat", "climb"])
        if phase == "descend":
            level *= 0.995
        elif phase == "blowup":
            level *= 1.08
        elif phase == "climb":
            level *= 1.004
        if level > 1e6:
            level = 2.0
        x: float | None = level * (1.0 + rng.gauss(0.0, 0.05))
        if phase == "oscillate":
            x = level * (1.6 if (step // 3) % 2 else 0.5)
        r = rng.random()
        if r < 0.01:
            x = level * 20.0  # a spike
        elif r < 0.015:
            x = rng.choice([NAN, INF, -INF])
        elif r < 0.03:
            x = None  # a record without loss
        steps.append(step)
        loss.append(x)
        val.append(level * 1.1 + rng.gauss(0.0, 0.01) if step % 10 == 9 else None)
        grad.append(1.0 + rng.random() if rng.random() < 0.9 else None)
    return steps, {"loss": loss, "val_loss": val, "grad_norm": grad}


def _evaluations(seed: int, n: int = 400) -> Stream:
    """val_loss at every record: slow straight descents, bends, plateaus and rises."""
    rng = random.Random(seed)
    steps, val = [], []
    level = 3.0
    slope = 0.01
    for step in range(n):
        if step % 40 == 0:
            slope = rng.choice([0.0, 0.002, 0.01, 0.03, -0.01])
        level = max(0.01, level - slope * (1.0 + rng.gauss(0.0, 0.1)))
        steps.append(step * 50)
        val.append(level if rng.random() > 0.02 else rng.choice([NAN, None]))
    return steps, {"val_loss": val}


def _backwards(seed: int) -> Stream:
    """Steps that go back (a job that restored its step with a checkpoint)."""
    steps, cols = _mixed(seed, 600)
    steps = steps[:300] + [s - 200 for s in steps[300:]]
    return steps, cols


STREAMS: dict[str, Callable[[int], Stream]] = {
    "mixed": _mixed,
    "evaluations": _evaluations,
    "backwards": _backwards,
}


def _key(d: Detection) -> tuple[Any, ...]:
    value = "nan" if d.value != d.value else d.value
    return (
        d.detector,
        d.metric,
        d.step,
        value,
        d.reason,
        json.dumps(dict(d.detail), sort_keys=True),
    )


def _state(det: Detector) -> str:
    return json.dumps(det.state_dict(), sort_keys=True, default=str)


def _build(name: str, variant: str) -> Detector:
    params_class, detector_class = detector_classes(name)
    kwargs = SENSITIVE[name] if variant == "sensitive" else {}
    return detector_class(params_class(**kwargs))  # type: ignore[call-arg]


def _splits(rng: random.Random, n: int) -> list[tuple[int, int]]:
    bounds, i = [], 0
    while i < n:
        size = rng.choice([1, 1, 2, 3, 7, 64, 100, 257])
        bounds.append((i, min(n, i + size)))
        i += size
    return bounds


@pytest.mark.parametrize("variant", ["default", "sensitive"])
@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("name", DETECTOR_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feed_columns_is_feed_record_by_record(
    name: str, stream: str, variant: str, seed: int
) -> None:
    steps, columns = STREAMS[stream](seed)
    rng = random.Random(1000 + seed)
    by_record = _build(name, variant)
    by_columns = _build(name, variant)
    expected: list[tuple[int, tuple[Any, ...]]] = []
    got: list[tuple[int, tuple[Any, ...]]] = []
    names = list(columns)
    for start, stop in _splits(rng, len(steps)):
        for i in range(start, stop):
            values = {m: v for m in names if (v := columns[m][i]) is not None}
            expected.extend((i, _key(d)) for d in by_record.feed(Metrics(steps[i], values)))
        got.extend((i, _key(d)) for i, d in by_columns.feed_columns(steps, columns, start, stop))
        assert _state(by_columns) == _state(by_record), (
            f"state differs after records {start}..{stop - 1}"
        )
        if rng.random() < 0.03:  # a rollback reached the job between two frames
            to = steps[max(0, start - 20)]
            by_record.rewind(to)
            by_columns.rewind(to)
    assert got == expected


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_the_streams_make_every_detector_fire(name: str) -> None:
    """Without detections the equivalence above would hold for any feed_columns."""
    fired = {}
    for stream, make in sorted(STREAMS.items()):
        steps, columns = make(0)
        det = _build(name, "sensitive")
        fired[stream] = len(det.feed_columns(steps, columns, 0, len(steps)))
    assert max(fired.values()) >= 3, fired
    assert sum(fired.values()) >= 6, fired


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_a_frame_without_the_detectors_metric_is_records_without_it(name: str) -> None:
    steps, columns = _mixed(3, 300)
    by_record = _build(name, "sensitive")
    by_columns = _build(name, "sensitive")
    by_columns.feed_columns(steps, columns, 0, 300)
    for i in range(300):
        by_record.feed(
            Metrics(steps[i], {m: v for m, c in columns.items() if (v := c[i]) is not None})
        )
    later = list(range(300, 350))
    assert by_columns.feed_columns(later, {"accuracy": [0.5] * 50}, 0, 50) == []
    assert by_columns.feed_columns(later, {MONITOR[name]: [None] * 50}, 0, 50) == []
    for step in later:
        assert by_record.feed(Metrics(step, {"accuracy": 0.5})) == []
        assert by_record.feed(Metrics(step, {})) == []
    assert _state(by_columns) == _state(by_record)


def test_the_default_matches_math_on_a_non_finite_burst() -> None:
    det = _build("non_finite", "default")
    steps = [0, 1, 2, 3]
    cols: dict[str, list[float | None]] = {
        "loss": [1.0, NAN, INF, 0.5],
        "val_loss": [None, None, -INF, None],
    }
    fired = det.feed_columns(steps, cols, 0, 4)
    assert [(i, d.metric, d.detail["consecutive"]) for i, d in fired] == [
        (1, "loss", 1.0),
        (2, "loss", 2.0),
        (2, "val_loss", 1.0),
    ]
    assert math.isinf(fired[1][1].value)


def _frames_against_feed(
    name: str, steps: list[int], columns: dict[str, list[Any]], bounds: list[tuple[int, int]]
) -> list[tuple[int, tuple[Any, ...]]]:
    """feed_columns over ``bounds`` and feed record by record agree; returns the detections."""
    by_record = _build(name, "default")
    by_columns = _build(name, "default")
    expected: list[tuple[int, tuple[Any, ...]]] = []
    got: list[tuple[int, tuple[Any, ...]]] = []
    for start, stop in bounds:
        for i in range(start, stop):
            values = {m: v for m, c in columns.items() if (v := c[i]) is not None}
            expected.extend((i, _key(d)) for d in by_record.feed(Metrics(steps[i], values)))
        got.extend((i, _key(d)) for i, d in by_columns.feed_columns(steps, columns, start, stop))
        assert _state(by_columns) == _state(by_record)
    assert got == expected
    return got


def test_non_finite_columns_keep_record_order_across_metrics_and_odd_sums() -> None:
    """Several metrics non-finite in one frame, finite sums that overflow, ints and huge ints."""
    steps = list(range(10))
    columns: dict[str, list[Any]] = {
        "grad_norm": [INF, None, 1.0, NAN, None, 2, 1e308, None, 3, NAN],
        "val_loss": [None, NAN, -INF, 1e308, 1e308, None, None, 10**400, NAN, 1],
        "loss": [1.0, 1e308, NAN, NAN, 1e308, 2.0, NAN, 0.0, 1e308, 1e308],
    }
    n = len(steps)
    for bounds in ([(0, n)], [(i, i + 1) for i in range(n)], [(0, 3), (3, 7), (7, n)]):
        got = _frames_against_feed("non_finite", steps, columns, bounds)
        assert len(got) == 9
    # the walk of a later metric starts before the first detection of an earlier one
    assert [(i, key[1]) for i, key in got[:3]] == [(0, "grad_norm"), (1, "val_loss"), (2, "loss")]


def _around_zero(seed: int, n: int = 1000) -> Stream:
    """Loss through zero: exact zeros, |x| < 1e-12, swings about 0, ints, blow-ups.

    Odd seeds start below zero, so that overshoot's first value and reference are <= 0.
    """
    rng = random.Random(seed)
    steps: list[int] = []
    loss: list[Any] = []
    level = -0.5 if seed % 2 else 1.0
    for step in range(n):
        phase = (step // 100) % 5
        x: Any
        if phase == 0:  # a descent through zero
            level -= 0.02
            x = level * (1.0 + rng.gauss(0.0, 0.05))
        elif phase == 1:  # a level too small for relative residuals
            x = rng.choice([0.0, -0.0, 1e-13, -1e-13, 0.0])
        elif phase == 2:  # a period-4 swing about zero
            x = (0.5 if (step // 2) % 2 else -0.5) + rng.gauss(0.0, 0.01)
        elif phase == 3:  # a blow-up
            level = abs(level) * 1.06 + 0.01
            x = level * (1.0 + rng.gauss(0.0, 0.05))
        else:  # integer values, as JSON may bring them
            x = rng.choice([3, 1, 4, 1, 5, -2, 0])
        if rng.random() < 0.02:
            x = rng.choice([None, NAN, -INF])
        steps.append(step)
        loss.append(x)
    return steps, {"loss": loss}


@pytest.mark.parametrize("variant", ["default", "sensitive"])
@pytest.mark.parametrize("name", ["divergence", "oscillation", "overshoot"])
def test_feed_columns_around_zero_with_restored_states(name: str, variant: str) -> None:
    """Values near, at and below zero and ints, with states restored between frames, as feed."""
    fired = 0
    for seed in range(4):
        steps, columns = _around_zero(seed)
        rng = random.Random(2000 + seed)
        by_record = _build(name, variant)
        by_columns = _build(name, variant)
        expected: list[tuple[int, tuple[Any, ...]]] = []
        got: list[tuple[int, tuple[Any, ...]]] = []
        loss = columns["loss"]
        for start, stop in _splits(rng, len(steps)):
            for i in range(start, stop):
                x = loss[i]
                values = {} if x is None else {"loss": x}
                expected.extend((i, _key(d)) for d in by_record.feed(Metrics(steps[i], values)))
            got.extend(
                (i, _key(d)) for i, d in by_columns.feed_columns(steps, columns, start, stop)
            )
            assert _state(by_columns) == _state(by_record), f"after records {start}..{stop - 1}"
            draw = rng.random()
            if draw < 0.1:  # the daemon restarted: both continue from their snapshot
                for det in (by_record, by_columns):
                    det.load_state_dict(json.loads(json.dumps(det.state_dict())))
            elif draw < 0.15:
                to = steps[max(0, start - 20)]
                by_record.rewind(to)
                by_columns.rewind(to)
        assert got == expected
        fired += len(got)
    assert fired >= 3


def _sparse_with_zeros(seed: int, n: int = 700) -> Stream:
    """val_loss at one record in 7: a steady descent, then exact zeros (and -0.0); some NaN."""
    rng = random.Random(seed)
    steps = list(range(n))
    val: list[float | None] = [None] * n
    for k, i in enumerate(range(3, n, 7)):
        x = 0.99**k * (1.0 + rng.gauss(0.0, 0.0005)) if k < 60 else rng.choice([0.0, -0.0])
        val[i] = NAN if rng.random() < 0.05 else x
    return steps, {"loss": [1.0] * n, "val_loss": val}


@pytest.mark.parametrize("name", ["plateau", "slow_progress"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_columns_with_zero_values_and_skipped_evaluations(name: str, seed: int) -> None:
    """Zero values count as evaluations in sparse frames; skip_next_evaluation between frames."""
    steps, columns = _sparse_with_zeros(seed)
    rng = random.Random(3000 + seed)
    by_record = _build(name, "sensitive")
    by_columns = _build(name, "sensitive")
    expected: list[tuple[int, tuple[Any, ...]]] = []
    got: list[tuple[int, tuple[Any, ...]]] = []
    for start, stop in _splits(rng, len(steps)):
        for i in range(start, stop):
            values = {m: v for m, c in columns.items() if (v := c[i]) is not None}
            expected.extend((i, _key(d)) for d in by_record.feed(Metrics(steps[i], values)))
        got.extend((i, _key(d)) for i, d in by_columns.feed_columns(steps, columns, start, stop))
        assert _state(by_columns) == _state(by_record), f"after records {start}..{stop - 1}"
        if name == "plateau" and rng.random() < 0.2:  # the engine saw a spike of val_loss
            for det in (by_record, by_columns):
                det.skip_next_evaluation()  # type: ignore[attr-defined]
    assert got == expected
    assert len(got) >= 3


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_a_record_without_the_detectors_metrics_changes_nothing(name: str) -> None:
    """The engine skips a detector for a record without any metric it monitors: the record
    must fire nothing and leave the state exactly as it was."""
    det = _build(name, "sensitive")
    steps, columns = _mixed(4, 400)
    for i in range(400):
        det.feed(Metrics(steps[i], {m: v for m, c in columns.items() if (v := c[i]) is not None}))
        if i % 37 == 0:
            before = _state(det)
            for other in ({}, {"accuracy": 0.5}, {"lr": math.nan}):
                assert det.feed(Metrics(steps[i] + 1, other)) == []
            assert _state(det) == before
