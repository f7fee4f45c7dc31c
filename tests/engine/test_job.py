"""JobEngine: policy + detectors + responses, snapshots, ranks, operator actions."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.config import parse_detector_blocks, parse_policy_block
from monitor.engine import (
    CheckpointSaved,
    Decision,
    DecisionKind,
    Detection,
    JobEngine,
    JobSpec,
    Metrics,
)
from monitor.engine.job import Output


def spec(policy: dict[str, Any], detectors: dict[str, Any] | None = None, **kw: Any) -> JobSpec:
    return JobSpec(parse_policy_block(policy), parse_detector_blocks(detectors or {}), **kw)


ALL_DETECTORS = {
    "non_finite": {},
    "spike": {"window": 32, "min_samples": 16},
    "oscillation": {},
    "divergence": {},
    "overshoot": {},
    "plateau": {"monitor": "val_loss", "patience": 3},
}

POLICIES = [
    {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 2, "factor": 0.5, "cooldown": 1},
    {"kind": "keras_reduce_on_plateau", "monitor": "val_loss", "patience": 2},
    {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 7},
    {"kind": "one_cycle", "max_lr": 0.1, "total_steps": 1000},
    {"kind": "cosine_restarts", "T_0": 10, "T_mult": 2},
    {"kind": "constant"},
    {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 1, "warmup": {"total_iters": 20}},
]


def stream(seed: int, n: int = 400) -> list[Metrics | CheckpointSaved]:
    """A noisy, descending run with spikes, a NaN, a plateau and checkpoints."""
    rng = random.Random(seed)
    events: list[Metrics | CheckpointSaved] = []
    for step in range(n):
        loss = 2.0 * math.exp(-step / 150) + 0.3 + rng.gauss(0, 0.02)
        if rng.random() < 0.02:
            loss *= 5  # spike
        if rng.random() < 0.01:
            loss = math.nan
        values = {"loss": loss, "grad_norm": abs(rng.gauss(1, 0.2))}
        if step % 10 == 9:
            values["val_loss"] = max(0.8, 2.0 * math.exp(-step / 100)) + rng.gauss(0, 0.01)
        events.append(Metrics(step, values))
        if step % 50 == 49:
            events.append(CheckpointSaved(step))
    return events


def canonical(outputs: list[Output]) -> list[Any]:
    """Outputs as comparable data (NaN-safe)."""
    result: list[Any] = []
    for o in outputs:
        if isinstance(o, Decision):
            result.append(("decision", json.dumps(o.to_dict(), sort_keys=True)))
        else:
            result.append(("detection", o.detector, o.metric, o.step, repr(o.value), o.reason))
    return result


@pytest.mark.parametrize("policy", POLICIES, ids=[p["kind"] + ("+warmup" if "warmup" in p else "") for p in POLICIES])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.floats(0.05, 0.95))
def test_restored_engine_continues_exactly(policy: dict[str, Any], seed: int, cut: float) -> None:
    """An engine restored from a JSON snapshot, fed the rest of a stream, decides exactly as one that never stopped."""
    job_spec = spec(policy, ALL_DETECTORS)
    events = stream(seed)
    split = int(len(events) * cut)
    whole = JobEngine(job_spec, [0.1, 0.01])
    expected = [canonical(whole.feed(e)) for e in events]

    first = JobEngine(job_spec, [0.1, 0.01])
    got = [canonical(first.feed(e)) for e in events[:split]]
    snapshot = json.loads(json.dumps(first.state_dict()))  # the daemon stores it as JSON
    second = JobEngine.from_state(job_spec, snapshot)
    got += [canonical(second.feed(e)) for e in events[split:]]
    assert got == expected
    assert second.lrs == whole.lrs


def test_nan_with_checkpoint_rolls_back_and_reduces() -> None:
    """A NaN loss after a checkpoint asks the job to roll back to it with a lower LR."""
    job = JobEngine(spec({"kind": "constant"}, {"non_finite": {"response": {"skip_batches": 5}}}), [0.1])
    job.feed(Metrics(0, {"loss": 1.0}))
    job.feed(CheckpointSaved(0))
    job.feed(Metrics(1, {"loss": 0.9}))
    out = job.feed(Metrics(2, {"loss": math.nan}))
    detections = [o for o in out if isinstance(o, Detection)]
    decisions = [o for o in out if isinstance(o, Decision)]
    assert [d.detector for d in detections] == ["non_finite"]
    assert len(decisions) == 1
    d = decisions[0]
    assert d.kind is DecisionKind.ROLLBACK
    assert d.rollback_to_step == 0 and d.skip_batches == 5
    assert d.apply_at_step == 3
    assert d.lrs == pytest.approx((0.03,))
    assert "rolling back" in d.reason and "NaN" in d.reason
    # the NaNs still in flight do not trigger a second rollback (cooldown)
    again = job.feed(Metrics(3, {"loss": math.nan}))
    assert not [o for o in again if isinstance(o, Decision)]


def test_nan_without_checkpoint_halts_and_stays_halted() -> None:
    """With no checkpoint to go back to, a NaN halts the job; a halted job decides nothing more."""
    job = JobEngine(spec({"kind": "constant"}, {"non_finite": {}}), [0.1])
    out = job.feed(Metrics(5, {"loss": math.inf}))
    decision = next(o for o in out if isinstance(o, Decision))
    assert decision.kind is DecisionKind.HALT
    assert "no checkpoint" in decision.reason
    assert job.halted
    assert job.feed(Metrics(6, {"loss": math.nan})) == []


def test_single_spike_is_not_counted_as_a_plateau_evaluation() -> None:
    """One outlier of the monitored metric does not advance the plateau count (pytorch issue 30873)."""
    policy = {"kind": "reduce_on_plateau", "monitor": "loss", "patience": 0, "threshold": 0.0}
    detectors = {"spike": {"monitor": "loss", "window": 20, "min_samples": 10, "z_threshold": 4}}
    with_spike = JobEngine(spec(policy, detectors), [0.1])
    without = JobEngine(spec(policy, {}), [0.1])
    for step in range(30):
        value = 1.0 - step * 0.01 + (0.001 if step % 2 else 0.0)
        with_spike.feed(Metrics(step, {"loss": value}))
        without.feed(Metrics(step, {"loss": value}))
    lr_before = with_spike.lrs
    spiked_with = with_spike.feed(Metrics(30, {"loss": 50.0}))
    spiked_without = without.feed(Metrics(30, {"loss": 50.0}))
    assert any(isinstance(o, Detection) and o.detector == "spike" for o in spiked_with)
    assert with_spike.lrs == lr_before  # the outlier was kept out of the policy
    assert any(isinstance(o, Decision) for o in spiked_without)  # torch semantics: a bad epoch


def test_multi_rank_decision_applies_ahead_of_every_rank() -> None:
    """A decision for a multi-rank job applies after the furthest rank's last step."""
    job = JobEngine(spec({"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0}), [0.1], world_size=3)
    job.feed(Metrics(10, {"val_loss": 1.0}, rank=1))
    job.feed(Metrics(14, {"val_loss": 1.0}, rank=2))
    job.feed(Metrics(7, {"val_loss": 1.0}, rank=0))
    out = job.feed(Metrics(8, {"val_loss": 1.0}, rank=0))
    decision = next(o for o in out if isinstance(o, Decision))
    assert decision.kind is DecisionKind.SET_LR
    assert decision.apply_at_step == 15


def test_manual_set_lr_keeps_ratios_between_param_groups() -> None:
    """An operator's single LR scales every group and keeps their ratios, and is journaled with the actor."""
    job = JobEngine(spec({"kind": "reduce_on_plateau"}), [0.1, 0.01])
    job.feed(Metrics(3, {"loss": 1.0}))
    decision = job.manual_set_lr([0.05], "too noisy", "alice")
    assert decision.kind is DecisionKind.SET_LR
    assert decision.lrs == pytest.approx((0.05, 0.005))
    assert decision.actor == "alice" and decision.source == "operator" and decision.reason == "too noisy"
    assert decision.apply_at_step == 4
    assert job.lrs == pytest.approx((0.05, 0.005))


def test_pause_freezes_a_schedule_and_stops_automatic_decisions() -> None:
    """A paused job holds its LR and makes no automatic decision; resume re-sends the schedule."""
    job = JobEngine(spec({"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4}, {"non_finite": {}}), [0.1])
    assert [d.kind for d in job.start()] == [DecisionKind.SCHEDULE]
    job.feed(Metrics(0, {"loss": 1.0}))
    frozen = job.pause("bob")
    assert frozen is not None and frozen.kind is DecisionKind.SET_LR
    assert job.segment is None
    out = job.feed(Metrics(1, {"loss": math.nan}))
    assert [o for o in out if isinstance(o, Decision)] == []
    assert [o.detector for o in out if isinstance(o, Detection)] == ["non_finite"]
    resumed = job.resume("bob")
    assert resumed is not None and resumed.kind is DecisionKind.SCHEDULE and resumed.schedule is not None


def test_divergence_reduction_scales_a_step_driven_schedule() -> None:
    """A reduce response on a cosine schedule sends the scaled schedule, and the engine's LR follows it."""
    from lrpilot.schedules import lrs_at

    job = JobEngine(spec({"kind": "cosine_restarts", "T_0": 1000}, {"divergence": {"window": 20}}), [0.1])
    decisions: list[Decision] = []
    for step in range(200):
        loss = 1.0 if step < 100 else 1.0 * math.exp((step - 100) / 15)
        decisions += [o for o in job.feed(Metrics(step, {"loss": loss})) if isinstance(o, Decision)]
    assert decisions, "divergence should have fired"
    first = decisions[0]
    assert first.kind is DecisionKind.SCHEDULE and first.source == "divergence"
    assert first.schedule is not None and first.schedule["scale"] == pytest.approx(0.3)
    # the job evaluating the segment at the next step agrees with the engine
    assert lrs_at(job.segment or {}, 200) == pytest.approx(list(job.lrs))


def test_checkpoint_then_halted_job_counts() -> None:
    """Counters of detections, decisions and non-finite values follow what happened."""
    job = JobEngine(spec({"kind": "constant"}, {"non_finite": {}}), [0.1])
    job.feed(Metrics(0, {"loss": math.nan, "grad_norm": math.inf}))
    assert job.detection_counts == {"non_finite": 2}
    assert job.nonfinite_counts == {"loss": 1, "grad_norm": 1}
    assert job.decision_counts == {"halt:non_finite": 1}


def test_apply_lead_grows_with_the_job_step_rate() -> None:
    """A fast job gets decisions far enough ahead to cover apply_lead_seconds of its steps."""
    policy = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0}
    job = JobEngine(spec(policy, apply_lead_steps=2, apply_lead_seconds=0.25), [0.1])
    decisions: list[Decision] = []
    for step in range(3000):  # 1000 steps per second
        values = {"loss": 1.0, "val_loss": 1.0} if step % 500 == 499 else {"loss": 1.0}
        out = job.feed(Metrics(step, values, time=100.0 + step / 1000))
        decisions += [o for o in out if isinstance(o, Decision)]
    assert job.apply_lead == 250
    assert decisions[-1].apply_at_step == 2999 + 250
    slow = JobEngine(spec(policy, apply_lead_steps=2, apply_lead_seconds=0.25), [0.1])
    for step in range(20):  # one step per second: the step floor wins
        slow.feed(Metrics(step, {"loss": 1.0}, time=float(step)))
    assert slow.apply_lead == 2


def _blow_up_job(**response: Any) -> JobEngine:
    detectors = {"overshoot": {"response": response}, "divergence": {"window": 10}}
    return JobEngine(spec({"kind": "reduce_on_plateau", "monitor": "val_loss"}, detectors), [1.0])


def _fall_then_climb(job: JobEngine) -> list[Decision]:
    """Loss falling until step 40, then climbing, a checkpoint every 25 steps: the first decisions."""
    decisions: list[Decision] = []
    for step in range(200):
        if step % 25 == 0:
            job.feed(CheckpointSaved(step))
        loss = 2.3 - 0.03 * step if step <= 40 else 1.1 + 0.05 * (step - 40)
        decisions += [o for o in job.feed(Metrics(step, {"loss": loss})) if isinstance(o, Decision)]
        if decisions:
            break
    return decisions


def test_overshoot_rolls_back_to_the_checkpoint_before_the_trouble_not_the_last_one() -> None:
    """The loss falls until step 40, then climbs back: the rollback skips the checkpoints saved on
    the way up, and by default one more (the margin), whose weights may be damaged already."""
    job = _blow_up_job()
    decisions = _fall_then_climb(job)
    assert len(decisions) == 1
    d = decisions[0]
    assert d.kind is DecisionKind.ROLLBACK and d.source == "overshoot"
    assert job.checkpoints[-1] > 25  # younger checkpoints exist...
    assert d.rollback_to_step == 0  # ...the last one at or before the best step (40) is 25; one more back: 0
    assert d.lrs == pytest.approx((0.1,))
    assert "rolling back to the checkpoint at step 0" in d.reason


@pytest.mark.parametrize(("margin", "expected"), [(0, 25), (1, 0), (5, 0)])
def test_the_rollback_margin_counts_checkpoints_back_from_the_good_step(margin: int, expected: int) -> None:
    decisions = _fall_then_climb(_blow_up_job(margin=margin))
    assert decisions[0].rollback_to_step == expected


def test_a_negative_margin_is_refused() -> None:
    with pytest.raises(Exception, match=r"overshoot\.response\.margin"):
        spec({"kind": "constant"}, {"overshoot": {"response": {"margin": -1}}})


def test_a_rollback_without_a_checkpoint_only_cuts_the_lr_unless_the_weights_may_be_nan() -> None:
    """overshoot with no checkpoint: LR x 0.1 and say so; non_finite still halts (see above)."""
    job = _blow_up_job()
    out = [o for step, loss in enumerate([2.0, 50.0, 100.0]) for o in job.feed(Metrics(step, {"loss": loss}))]
    decision = next(o for o in out if isinstance(o, Decision))
    assert decision.kind is DecisionKind.SET_LR
    assert decision.lrs == pytest.approx((0.1,))
    assert "no checkpoint reported to roll back to" in decision.reason
    assert not job.halted


@pytest.mark.parametrize("steps_restored", [False, True], ids=["steps-go-on", "steps-restored"])
def test_detectors_start_their_windows_again_once_the_rollback_reaches_the_job(steps_restored: bool) -> None:
    """Records still in flight keep the windows; the first record after the rollback applied resets them.

    A job either goes on counting steps (the rollback's apply_at_step is reached) or restores
    the checkpoint's step with its weights (steps go backwards); both count as applied.
    """
    job = _blow_up_job(cooldown=0)
    job.feed(CheckpointSaved(0))
    out: list[Output] = []
    for step in range(12):  # rising steadily: divergence warms up on its 10-value window
        out += job.feed(Metrics(step, {"loss": 1.0 + 0.01 * step}))
    out += job.feed(Metrics(12, {"loss": 40.0}))
    out += job.feed(Metrics(13, {"loss": 80.0}))
    decisions = [o for o in out if isinstance(o, Decision)]
    rollback = decisions[-1]
    assert rollback.kind is DecisionKind.ROLLBACK and rollback.apply_at_step == 14
    divergence = next(a.detector for a in job._detectors if a.name == "divergence")
    assert divergence.phase.value != "warm-up"
    if steps_restored:
        job.feed(Metrics(1, {"loss": 1.0}))  # the checkpoint's step, with its weights
    else:
        job.feed(Metrics(14, {"loss": 1.0}))
    assert divergence.phase.value == "warm-up"
    overshoot = next(a.detector for a in job._detectors if a.name == "overshoot")
    assert overshoot.phase.value != "tripped"


def test_a_checkpoint_after_a_rollback_replaces_the_abandoned_younger_ones() -> None:
    """Steps restored to 50: the checkpoints at 75 and 100 belonged to the abandoned weights."""
    job = _blow_up_job()
    for step in (0, 25, 50, 75, 100):
        job.feed(CheckpointSaved(step))
    job.feed(CheckpointSaved(75))
    assert job.checkpoints == (0, 25, 50, 75)
    state = job.state_dict()
    assert state["checkpoints"] == [0, 25, 50, 75]
    del state["checkpoints"]  # a snapshot written before the engine kept a list
    old = JobEngine.from_state(job.spec, state)
    assert old.checkpoints == (75,)


def test_a_step_driven_policy_follows_a_job_that_restored_its_step_with_a_rollback() -> None:
    """Cyclic LR: after going back from step 30 to the checkpoint of step 10, the engine's LR is the schedule's at 11 again."""
    policy = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 20}
    job = JobEngine(spec(policy, {"non_finite": {}}), [0.01])
    reference = JobEngine(spec(policy, {}), [0.01])
    for step in range(12):
        reference.feed(Metrics(step, {"loss": 1.0}))
    job.feed(CheckpointSaved(10))
    for step in range(31):
        job.feed(Metrics(step, {"loss": 1.0}))
    out = job.feed(Metrics(31, {"loss": math.nan}))
    assert any(isinstance(o, Decision) and o.kind is DecisionKind.ROLLBACK for o in out)
    before = job.lrs
    job.feed(Metrics(11, {"loss": 1.0}))  # the job is back at step 11
    assert job.lrs != before
    # the same position as a job that never left step 11, with the rollback's LR x 0.3
    assert job.lrs == pytest.approx(tuple(0.3 * x for x in reference.lrs))


def test_a_response_can_ask_for_the_last_checkpoint_always() -> None:
    """checkpoint: last, for a job that keeps only its newest checkpoint: overshoot then names that one."""
    job = _blow_up_job(checkpoint="last")
    decisions = _fall_then_climb(job)
    assert decisions[0].kind is DecisionKind.ROLLBACK
    assert decisions[0].rollback_to_step == job.checkpoints[-1] > 25


def test_a_bad_checkpoint_mode_names_the_field() -> None:
    with pytest.raises(Exception, match=r"overshoot\.response\.checkpoint"):
        spec({"kind": "constant"}, {"overshoot": {"response": {"action": "rollback", "checkpoint": "best"}}})


@pytest.mark.parametrize("steps_restored", [False, True], ids=["steps-go-on", "steps-restored"])
def test_checkpoints_of_the_abandoned_weights_are_forgotten_once_the_rollback_applies(
    steps_restored: bool,
) -> None:
    """A checkpoint saved after the rollback's target and before it applied holds the weights
    that were rolled back: no later rollback may return to it (with margin 1 it would)."""
    job = _blow_up_job(cooldown=0)
    job.feed(CheckpointSaved(0))
    for step in range(1, 20):
        if step == 10:
            job.feed(CheckpointSaved(10))  # the weights are already going bad here
        job.feed(Metrics(step, {"loss": 1.0 - 0.001 * step}))
    out = job.feed(Metrics(20, {"loss": 50.0})) + job.feed(Metrics(21, {"loss": 90.0}))
    rollback = next(o for o in out if isinstance(o, Decision))
    assert rollback.kind is DecisionKind.ROLLBACK and rollback.rollback_to_step == 0
    assert job.checkpoints == (0, 10)  # in flight: the job may not have applied it yet
    first = 1 if steps_restored else rollback.apply_at_step
    job.feed(Metrics(first, {"loss": 1.0}))
    assert job.checkpoints == (0,)
    assert job.checkpoint_step == 0


@pytest.mark.parametrize(
    ("checkpoint", "response", "raised"),
    [(False, {}, False), (True, {}, True), (False, {"require_checkpoint": False}, True)],
    ids=["no-checkpoint", "checkpoint", "no-checkpoint-allowed"],
)
def test_an_lr_increase_waits_for_a_checkpoint_unless_told_otherwise(
    checkpoint: bool, response: dict[str, Any], raised: bool
) -> None:
    """A raise that overshoots must have a way back: slow_progress raises only for a job that
    has reported a checkpoint (the detection is counted either way)."""
    job = JobEngine(
        spec(
            {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 50},
            {"slow_progress": {"response": response}},
        ),
        [0.01],
    )
    if checkpoint:
        job.feed(CheckpointSaved(0))
    decisions: list[Decision] = []
    for k, x in enumerate([2.0, 1.98, 1.96]):  # a straight line: the probe fires at the third
        for step in range(max(0, 50 * k - 49), 50 * k):
            job.feed(Metrics(step, {"loss": 1.0}))
        decisions += [o for o in job.feed(Metrics(50 * k, {"val_loss": x})) if isinstance(o, Decision)]
    assert job.detection_counts == {"slow_progress": 1}
    assert [d.lrs for d in decisions] == ([pytest.approx((0.03,))] if raised else [])


def test_require_checkpoint_must_be_a_bool() -> None:
    with pytest.raises(Exception, match=r"slow_progress\.response\.require_checkpoint"):
        spec({"kind": "constant"}, {"slow_progress": {"response": {"require_checkpoint": "maybe"}}})
