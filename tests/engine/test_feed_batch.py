"""``JobEngine.feed_batch`` (a whole metrics frame) against ``JobEngine.feed`` record by record."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import pytest

from monitor.engine import CheckpointSaved, Decision, DecisionKind, JobEngine, Metrics
from monitor.engine.job import Output

from .test_job import POLICIES, canonical, spec

DETECTORS: dict[str, Any] = {
    "non_finite": {},
    "spike": {"window": 32, "min_samples": 16, "z_threshold": 4.0},
    "oscillation": {"window": 30, "cooldown": 10},
    "divergence": {"window": 20, "cooldown": 10, "min_rise": 0.2},
    "overshoot": {"hold": 10, "cooldown": 10},
    "slow_progress": {"response": {"require_checkpoint": False}},
    "stalled": {"patience": 3, "max_detections": 50},
    "plateau": {"monitor": "val_loss", "patience": 3},
}

Frame = tuple[list[int], dict[str, list[float | None]], list[int | None], list[float | None]]


def run(seed: int, n: int = 1200, nan: bool = False) -> list[tuple[int, dict[str, float], float]]:
    """(step, values, time): descents, blow-ups, oscillation, spikes; val_loss every 10 steps."""
    rng = random.Random(seed)
    level = 2.0
    phase = "descend"
    records = []
    t = 1000.0
    for step in range(n):
        if step % 120 == 0:
            phase = rng.choice(["descend", "descend", "blowup", "oscillate", "flat"])
        level = level * {"descend": 0.993, "blowup": 1.06}.get(phase, 1.0)
        level = min(level, 1e4)
        loss = level * (1.0 + rng.gauss(0.0, 0.04))
        if phase == "oscillate":
            loss = level * (1.5 if (step // 4) % 2 else 0.6)
        if rng.random() < 0.02:
            loss *= 8.0
        if nan and rng.random() < 0.005:
            loss = math.nan
        values = {"loss": loss}
        if rng.random() < 0.8:
            values["grad_norm"] = 1.0 + rng.random()
        if step % 10 == 9:
            values["val_loss"] = level * 1.1 + rng.gauss(0.0, 0.005)
        t += 0.002 + rng.random() * 0.002
        records.append((step, values, t))
    return records


def frames(records: list[tuple[int, dict[str, float], float]], rng: random.Random) -> list[Frame]:
    out: list[Frame] = []
    i = 0
    while i < len(records):
        size = rng.choice([1, 2, 5, 40, 100, 100, 250])
        chunk = records[i : i + size]
        i += size
        names = sorted({k for _, values, _ in chunk for k in values})
        steps = [s for s, _, _ in chunk]
        columns = {k: [values.get(k) for _, values, _ in chunk] for k in names}
        epochs: list[int | None] = [s // 100 for s in steps]
        times: list[float | None] = [t for _, _, t in chunk]
        out.append((steps, columns, epochs, times))
    return out


def state(engine: JobEngine) -> str:
    return json.dumps(engine.state_dict(), sort_keys=True, default=str)


def both(
    policy: dict[str, Any], detectors: dict[str, Any], **kw: Any
) -> tuple[JobEngine, JobEngine]:
    job_spec = spec(policy, detectors, **kw)
    return JobEngine(job_spec, [0.1, 0.01]), JobEngine(job_spec, [0.1, 0.01])


def feed_frame(engine: JobEngine, frame: Frame, rank: int = 0) -> list[Output]:
    """The frame's records fed one by one, each decision's ``apply_at_step`` moved as
    ``feed_batch`` moves it: from the triggering record's step to the frame's last step."""
    steps, columns, epochs, times = frame
    out: list[Output] = []
    for i, step in enumerate(steps):
        values = {k: v for k, col in columns.items() if (v := col[i]) is not None}
        for o in engine.feed(Metrics(step, values, epochs[i], rank, times[i])):
            if isinstance(o, Decision):
                o = dataclasses.replace(o, apply_at_step=o.apply_at_step + steps[-1] - step)
            out.append(o)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(
    "policy", POLICIES, ids=[p["kind"] + str(i) for i, p in enumerate(POLICIES)]
)
def test_a_frame_gives_what_its_records_give_one_by_one(policy: dict[str, Any], seed: int) -> None:
    """No checkpoint: responses cut the LR (no rewinds), so the two paths must agree exactly."""
    by_record, by_frame = both(policy, DETECTORS, clock="records" if seed % 2 else "steps")
    rng = random.Random(seed)
    decisions = 0
    for frame in frames(run(seed), rng):
        if rng.random() < 0.05:  # an operator pauses or resumes the job between frames
            if by_record.paused:
                by_record.resume(), by_frame.resume()
            else:
                by_record.pause(), by_frame.pause()
        expected = canonical(feed_frame(by_record, frame))
        got = canonical(by_frame.feed_batch(*frame))
        assert got == expected, f"frame at step {frame[0][0]}"
        decisions += sum(1 for item in expected if item[0] == "decision")
    assert state(by_frame) == state(by_record)
    assert by_frame.last_values == by_record.last_values
    assert by_frame.apply_lead == by_record.apply_lead
    assert decisions > 0  # the comparison covered decisions, not only detections


@pytest.mark.parametrize("seed", [0, 1])
def test_a_halt_inside_a_frame_ends_the_frames_decisions(seed: int) -> None:
    """non_finite halts without a checkpoint; the frame's later records decide nothing."""
    policy = POLICIES[0]
    by_record, by_frame = both(policy, DETECTORS)
    rng = random.Random(seed)
    for frame in frames(run(seed, nan=True), rng):
        assert canonical(by_frame.feed_batch(*frame)) == canonical(feed_frame(by_record, frame))
    assert by_frame.halted and by_record.halted
    assert by_frame.lrs == by_record.lrs
    assert by_frame.last_step == by_record.last_step
    assert by_frame.last_values.keys() == by_record.last_values.keys()


def test_other_ranks_only_move_their_step() -> None:
    engine = JobEngine(spec(POLICIES[0], DETECTORS), [0.1], world_size=2)
    frame = frames(run(0, 300), random.Random(0))[0]
    blowup = ([5000, 5001], {"loss": [math.nan, 1e9]}, [None, None], [None, None])
    assert engine.feed_batch(*blowup, rank=1) == []
    assert engine.feed_batch(*frame, rank=1) == []
    assert engine.last_step == frame[0][-1]
    assert engine.detection_counts == {}


def test_a_rollback_decided_inside_a_frame_rewinds_from_the_next_frame() -> None:
    """The frame's records after the decision were sent before the job could apply it:
    record by record, the later ones pass the apply-at step and rewind at once; in a frame
    the step counts from the frame's end and the rewind waits for the next frame."""
    detectors = {"overshoot": {}, "divergence": {}}
    job_spec = spec(POLICIES[0], detectors, apply_lead_steps=2)
    engine, by_record = JobEngine(job_spec, [0.1]), JobEngine(job_spec, [0.1])
    steps = list(range(60))
    healthy = [2.0 * math.exp(-s / 20) + 0.5 for s in steps]
    engine.feed_batch(steps, {"loss": healthy})
    engine.feed(CheckpointSaved(59))
    blowup_steps = list(range(60, 100))
    blowup = [0.6 * 1.5 ** (s - 59) for s in blowup_steps]  # doubles every two steps
    out = engine.feed_batch(blowup_steps, {"loss": blowup})
    rollbacks = [o for o in out if getattr(o, "kind", None) is DecisionKind.ROLLBACK]
    assert len(rollbacks) == 1
    decision = rollbacks[0]
    assert decision.rollback_to_step == 59
    assert decision.apply_at_step == 99 + 2  # the lead counts from the frame's last step...
    overshoot = next(a.detector for a in engine._detectors if a.name == "overshoot")
    before = json.dumps(overshoot.state_dict(), sort_keys=True)
    assert engine._pending_rewind is not None  # ...and the rewind waits for the next frame

    # record by record, the same rollback applies two steps after its record, which the
    # frame's later records pass: they rewind the detectors at once
    for s, loss in zip(steps, healthy, strict=True):
        assert by_record.feed(Metrics(s, {"loss": loss})) == []
    by_record.feed(CheckpointSaved(59))
    one_by_one = [
        o
        for s, loss in zip(blowup_steps, blowup, strict=True)
        for o in by_record.feed(Metrics(s, {"loss": loss}))
    ]
    record_decision = next(o for o in one_by_one if isinstance(o, Decision))
    assert record_decision.apply_at_step < 99
    assert record_decision == dataclasses.replace(
        decision, apply_at_step=record_decision.apply_at_step
    )
    assert by_record._pending_rewind is None

    # the job applied the rollback and restored step 60: a healthy loss again
    engine.feed_batch([60, 61, 62], {"loss": [0.6, 0.59, 0.58]})
    assert engine._pending_rewind is None
    assert json.dumps(overshoot.state_dict(), sort_keys=True) != before
    assert engine.detection_counts.get("overshoot") == 1


def _nan_first(first_step: int, n: int) -> tuple[list[int], dict[str, list[float | None]]]:
    """A frame of ``n`` records whose first loss is NaN and the others finite."""
    steps = list(range(first_step, first_step + n))
    return steps, {"loss": [math.nan] + [1.0 - 0.001 * i for i in range(1, n)]}


@pytest.mark.parametrize("checkpoint", [True, False], ids=["rollback", "halt"])
def test_a_decision_on_a_frames_first_record_applies_after_its_last(checkpoint: bool) -> None:
    """A NaN at the first record of a 100-record frame: its rollback (or halt, without a
    checkpoint) applies the lead after the frame's last step, which the job has reported."""
    engine = JobEngine(spec(POLICIES[0], {"non_finite": {}}, apply_lead_steps=3), [0.1])
    engine.feed_batch(list(range(100)), {"loss": [1.0] * 100})
    if checkpoint:
        engine.feed(CheckpointSaved(50))
    steps, columns = _nan_first(100, 100)
    out = engine.feed_batch(steps, columns)
    decisions = [o for o in out if isinstance(o, Decision)]
    assert len(decisions) == 1
    decision = decisions[0]
    assert decision.kind is (DecisionKind.ROLLBACK if checkpoint else DecisionKind.HALT)
    assert decision.reason.startswith("loss")
    assert decision.apply_at_step > steps[-1]
    assert decision.apply_at_step == 199 + 3
    assert engine.last_step == 199


def test_the_lead_counts_from_a_further_rank_than_the_frames_end() -> None:
    """Another rank ahead of rank 0's frame: the apply-at step counts from that rank's step."""
    engine = JobEngine(spec(POLICIES[0], {"non_finite": {}}, apply_lead_steps=3), [0.1], 2)
    engine.feed(CheckpointSaved(10))
    engine.feed_batch([300], {"loss": [1.0]}, rank=1)
    steps, columns = _nan_first(100, 100)
    decision = next(o for o in engine.feed_batch(steps, columns) if isinstance(o, Decision))
    assert decision.apply_at_step == 300 + 3


def test_the_frames_end_is_forgotten_after_the_frame() -> None:
    """A decision after a frame (a record whose step went back, as after a restore) counts
    from the steps reported since, not from an earlier frame's end."""
    engine = JobEngine(spec(POLICIES[0], {"non_finite": {}}, apply_lead_steps=3), [0.1])
    engine.feed_batch(list(range(100)), {"loss": [1.0] * 100})
    (decision,) = [
        o for o in engine.feed(Metrics(40, {"loss": math.nan})) if isinstance(o, Decision)
    ]
    assert decision.apply_at_step == 40 + 3
