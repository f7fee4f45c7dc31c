"""feed_columns is feed record by record also for the values that take the slow way through
``finite_values`` (ints, values near the 1e150 limit, -0.0, gaps) and for long frames
(a merged batch of many metrics frames) that cross the spike window's recomputation."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from monitor.engine.base import Detector
from monitor.engine.events import Metrics
from monitor.engine.registry import detector_classes

LOSS_DETECTORS = ("spike", "oscillation", "divergence", "overshoot", "non_finite")


def _stream(seed: int, n: int, odd: bool) -> list[Any]:
    """A noisy descent with spikes and swings; ``odd``: ints, -0.0, huge values and gaps."""
    rng = random.Random(seed)
    level = 2.0
    out: list[Any] = []
    for step in range(n):
        level *= 0.999 if step % 600 < 450 else 1.03
        x: Any = level * (1.0 + rng.gauss(0.0, 0.05))
        if step % 500 > 470:
            x = level * (1.8 if step % 4 < 2 else 0.4)  # a swing
        r = rng.random()
        if r < 0.01:
            x = level * 30.0  # a spike
        elif odd and r < 0.06:
            x = rng.choice(
                [
                    round(level * 3),  # an int
                    2**60 + 1,  # an int a float cannot hold exactly
                    -0.0,
                    None,
                    1e150,
                    9.99e149,
                    -1e151,
                    float("nan"),
                ]
            )
        out.append(x)
    return out


def _state(det: Detector) -> str:
    return json.dumps(det.state_dict(), sort_keys=True, default=repr)


def _key(d: Any) -> str:
    return repr((d.detector, d.metric, d.step, repr(d.value), d.reason, sorted(d.detail.items())))


@pytest.mark.parametrize("odd", [False, True])
@pytest.mark.parametrize("name", LOSS_DETECTORS)
@pytest.mark.parametrize("seed", [0, 1])
def test_long_frames_and_odd_values_give_feeds_detections_and_state(
    name: str, seed: int, odd: bool
) -> None:
    """Frames of 1 to 1,300 records, default parameters, the same as feeding each record."""
    params_class, detector_class = detector_classes(name)
    by_record = detector_class(params_class())  # type: ignore[call-arg]
    by_columns = detector_class(params_class())  # type: ignore[call-arg]
    loss = _stream(seed, 4000, odd)
    steps = list(range(10, 10 + len(loss)))
    columns = {"loss": loss}
    rng = random.Random(seed)
    expected: list[tuple[int, str]] = []
    got: list[tuple[int, str]] = []
    start = 0
    while start < len(loss):
        stop = min(len(loss), start + rng.choice([1, 5, 100, 600, 1300]))
        for i in range(start, stop):
            record = Metrics(steps[i], {} if loss[i] is None else {"loss": loss[i]})
            expected.extend((i, _key(d)) for d in by_record.feed(record))
        got.extend((i, _key(d)) for i, d in by_columns.feed_columns(steps, columns, start, stop))
        assert _state(by_columns) == _state(by_record), f"records {start}..{stop - 1}"
        start = stop
    assert got == expected
    if not odd and name != "non_finite":
        assert got  # the plain stream makes the detector fire: the check above means something
    if odd and name == "non_finite":
        assert got
