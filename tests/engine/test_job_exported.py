"""JobEngine.exported(): the exporter's one-call read equals the properties it stands for."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from monitor.engine import JobEngine, Metrics

from .test_job import ALL_DETECTORS, POLICIES, spec, stream


def _properties(engine: JobEngine) -> tuple[Any, ...]:
    return (
        engine.lrs,
        engine.last_values,
        engine.nonfinite_counts,
        engine.plateau_bad_evaluations,
        engine.last_step,
        engine.decisions_made,
        engine.detection_counts,
    )


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal, with NaN equal to NaN (a metric's last value may be NaN)."""
    return json.dumps(a, default=str) == json.dumps(b, default=str)


DETECTOR_SETS = [
    {},
    ALL_DETECTORS,
    {"plateau": {"monitor": "val_loss", "patience": 2}},
]


@pytest.mark.parametrize("detectors", DETECTOR_SETS, ids=["none", "all", "plateau"])
@pytest.mark.parametrize(
    "policy", POLICIES, ids=[p["kind"] + ("+warmup" if "warmup" in p else "") for p in POLICIES]
)
def test_exported_equals_the_properties_through_a_run(
    policy: dict[str, Any], detectors: dict[str, Any]
) -> None:
    """At every record of a noisy run (spikes, NaN, plateaus, rollbacks), on two ranks, and
    after a restore from a snapshot, exported() returns what the properties return."""
    engine = JobEngine(spec(policy, detectors), [0.1, 0.01], world_size=2)
    assert _same(engine.exported(), _properties(engine))
    moving = 0
    for i, event in enumerate(stream(7, 300)):
        engine.feed(event)
        if isinstance(event, Metrics) and i % 7 == 0:
            engine.feed(Metrics(event.step + 1, {"loss": 1.0}, rank=1))
        assert _same(engine.exported(), _properties(engine))
        moving += engine.exported()[3] not in (None, 0)
    restored = JobEngine.from_state(engine.spec, json.loads(json.dumps(engine.state_dict())))
    assert _same(restored.exported(), _properties(restored))
    assert _same(restored.exported(), engine.exported())
    has_plateau = "plateau" in policy["kind"] or "plateau" in detectors
    assert (engine.exported()[3] is not None) == has_plateau
    if has_plateau:
        assert moving > 0  # the counter was read live, not once


def test_exported_hands_out_the_engine_s_current_dicts() -> None:
    """The dicts are read at call time: a restore that replaces them is seen."""
    engine = JobEngine(spec(POLICIES[0], ALL_DETECTORS), [0.1])
    engine.feed(Metrics(1, {"loss": math.nan}))
    _, values, nonfinite, *_ = engine.exported()
    assert values is engine.last_values and nonfinite is engine.nonfinite_counts
    assert nonfinite == {"loss": 1}
    engine.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    assert engine.exported()[2] is engine.nonfinite_counts
