"""The stalled detector: a validation loss that never got below where training started."""

from __future__ import annotations

import json
import random

import pytest

from monitor.config import parse_detector_blocks, parse_policy_block
from monitor.engine import CheckpointSaved, Decision, DecisionKind, JobEngine, JobSpec, Metrics
from monitor.engine.base import ParamError
from monitor.engine.detectors.stalled import StalledDetector, StalledParams
from monitor.engine.events import Detection
from monitor.engine.responses import ResponseParams, resolve

CHANCE = 2.3026  # ln 10: a ten-class network's loss at initialisation, and a dead one's


def run(det: StalledDetector, starts: list[float], evals: list[float], first_step: int = 0) -> list[Detection]:
    """The training losses ``starts`` at the first steps, then one evaluation every 45 steps."""
    out: list[Detection] = []
    for i, loss in enumerate(starts):
        out += det.feed(Metrics(first_step + i, {"loss": loss}))
    for k, x in enumerate(evals):
        out += det.feed(Metrics(first_step + 45 * (k + 1), {"val_loss": x, "loss": x}))
    return out


def dead(seed: int, n: int) -> list[float]:
    """A dead network's evaluations: chance level, noise of a few tenths of a percent up and down."""
    rng = random.Random(seed)
    return [CHANCE * (1 + rng.uniform(-0.004, 0.012)) for _ in range(n)]


def test_a_dead_network_fires_after_patience_evaluations_and_names_the_start() -> None:
    det = StalledDetector()
    out = run(det, [2.29, 2.31, 40.0, 300.0, 2.30], dead(0, 12), first_step=7)
    assert len(out) == 2  # the 5th evaluation, then the 10th (a new segment after each detection)
    first = out[0]
    assert first.detector == "stalled" and first.metric == "val_loss"
    assert first.step == 7 + 45 * 5
    assert first.detail["good_step"] == 7  # the checkpoint from before training moved the weights
    assert first.detail["start"] == 2.29  # the lowest of the first five: a blow-up is not the start
    assert "no progress from the start" in first.reason and "dead network" in first.reason


@pytest.mark.parametrize("per_eval", [0.0002, 0.001, 0.01])
def test_a_slow_monotone_descent_at_chance_never_fires(per_eval: float) -> None:
    """A 100x too low LR: val_loss creeps down without a single rise (slow_progress's case)."""
    det = StalledDetector()
    evals = [CHANCE * (1 - per_eval) ** (k + 1) for k in range(20)]
    assert run(det, [CHANCE] * 5, evals) == []


def test_progress_below_the_start_never_fires_however_noisy_later() -> None:
    rng = random.Random(1)
    evals = [1.2, 0.6, 0.4] + [0.35 * (1 + rng.uniform(-0.2, 0.2)) for _ in range(30)]
    assert run(StalledDetector(), [CHANCE] * 5, evals) == []


def test_the_progress_threshold_is_relative_to_the_start() -> None:
    """Best 4 % below the start is no progress (min_progress 5 %); 6 % below is progress."""
    wobble = [1.0, 1.004, 1.0, 1.004, 1.0]
    assert len(run(StalledDetector(), [CHANCE] * 5, [CHANCE * 0.96 * w for w in wobble])) == 1
    assert run(StalledDetector(), [CHANCE] * 5, [CHANCE * 0.94 * w for w in wobble]) == []


def test_without_the_start_metric_the_first_evaluation_is_the_start() -> None:
    det = StalledDetector()
    out: list[Detection] = []
    for k, x in enumerate([3.0, 3.01, 2.99, 3.02, 3.0]):
        out += det.feed(Metrics(100 + k, {"val_loss": x}))
    assert len(out) == 1 and out[0].detail["start"] == 3.0 and out[0].detail["good_step"] == 100


def test_at_most_max_detections_and_rewind_starts_a_new_segment() -> None:
    det = StalledDetector(StalledParams(max_detections=2))
    assert len(run(det, [CHANCE] * 5, dead(2, 5))) == 1
    for x in dead(3, 3):
        assert det.feed(Metrics(1000, {"val_loss": x})) == []
    det.rewind(0)  # the rollback landed: the three evaluations above were the old weights'
    fired = []
    for k, x in enumerate(dead(4, 20)):
        fired += [(k, d) for d in det.feed(Metrics(2000 + k, {"val_loss": x}))]
    assert [k for k, _ in fired] == [4]  # five evaluations of the new segment, then the limit
    assert fired[0][1].detail["detections"] == 2


def test_non_finite_values_are_ignored() -> None:
    evals = dead(5, 8)
    noisy = [x for e in evals for x in (e, float("nan"), float("inf"), 1e200)]
    with_noise = run(StalledDetector(), [float("nan"), CHANCE, float("inf")] * 3, noisy)
    plain = run(StalledDetector(), [CHANCE] * 5, evals)
    assert len(plain) == 1
    assert [d.detail for d in with_noise] == [d.detail | {"good_step": 0} for d in plain]


def test_state_dict_round_trip_continues_exactly() -> None:
    evals = dead(6, 14)
    whole = StalledDetector()
    expected = run(whole, [CHANCE] * 5, evals)
    first = StalledDetector()
    out = run(first, [CHANCE] * 5, evals[:3])
    restored = StalledDetector()
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for k, x in enumerate(evals[3:], start=3):
        out += restored.feed(Metrics(45 * (k + 1), {"val_loss": x, "loss": x}))
    assert [(d.step, d.reason, d.detail) for d in out] == [(d.step, d.reason, d.detail) for d in expected]
    assert len(expected) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("patience", 1),
        ("start_values", 0),
        ("min_progress", 1.0),
        ("max_rise", -0.1),
        ("max_detections", -1),
        ("monitor", ""),
        ("start_metric", "val_loss"),
    ],
)
def test_bad_parameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ParamError) as info:
        StalledParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_default_response_is_a_rollback_with_a_tenfold_cut() -> None:
    resolved = resolve("stalled", ResponseParams())
    assert (resolved.action, resolved.factor) == ("rollback", 0.1)


def test_the_engine_rolls_a_dead_job_back_to_its_first_checkpoint_with_a_tenth_of_the_lr() -> None:
    """The default config: checkpoints every 45 steps, a network dead from its first steps."""
    job = JobEngine(
        JobSpec(
            parse_policy_block({"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 2}),
            parse_detector_blocks({"stalled": {}, "slow_progress": {}, "overshoot": {}}),
        ),
        [0.3],
    )
    rng = random.Random(7)
    decisions: list[Decision] = []
    evals = iter(dead(8, 40))
    for step in range(400):
        if step % 45 == 0:
            job.feed(CheckpointSaved(step))
        values = {"loss": CHANCE * (1 + rng.uniform(-0.05, 0.05))}
        if step % 45 == 44:
            values["val_loss"] = next(evals)
        decisions += [o for o in job.feed(Metrics(step, values)) if isinstance(o, Decision)]
        if any(d.kind is DecisionKind.ROLLBACK for d in decisions):
            break
    rollback = decisions[-1]
    assert rollback.kind is DecisionKind.ROLLBACK and rollback.source == "stalled"
    assert rollback.rollback_to_step == 0
    assert rollback.lrs == pytest.approx((0.03,))
    assert "rolling back to the checkpoint at step 0" in rollback.reason


def test_progress_given_back_fires_rule_2_and_names_the_best_evaluation() -> None:
    """A half-dead network: down to 0.9, then back up to 1.4 (a third of the progress) and flat."""
    det = StalledDetector()
    out = run(det, [CHANCE] * 5, [1.2, 0.9, *[1.4, 1.41, 1.39, 1.4, 1.42, 1.4]])
    assert len(out) == 1
    d = out[0]
    assert d.detail["rule"] == 2 and d.detail["best"] == 0.9
    assert d.detail["good_step"] == 45 * 2  # the step of the 0.9 evaluation
    assert d.step == 45 * 7  # the 5th evaluation in a row above 0.9 + 0.25 * (2.3026 - 0.9)
    assert "given back 37% of its progress" in d.reason  # (1.42 - 0.9) / (2.3026 - 0.9)


def test_overfitting_does_not_fire_and_one_dip_under_the_threshold_does_not_hide_damage() -> None:
    rising = [1.2, 0.5, 0.45, 0.48, 0.5, 0.52, 0.55, 0.58, 0.6, 0.62]  # gives back < 10 %
    assert run(StalledDetector(), [CHANCE] * 5, rising) == []
    # after the best (0.9): four evaluations far above it, one dip, and the next one above
    # again: 4 of the last 5 gave back a quarter of the progress
    dipping = [1.2, 0.9, 1.4, 1.4, 1.4, 1.4, 1.1, 1.4]
    out = run(StalledDetector(), [CHANCE] * 5, dipping)
    assert [d.step for d in out] == [45 * 8]
    assert "in 4 of 5 evaluations" in out[0].reason
    # nothing on the dip itself, and two dips among five are not damage
    assert run(StalledDetector(), [CHANCE] * 5, dipping[:-1]) == []
    bouncing = [1.2, 0.9, 1.4, 1.1, 1.4, 1.1, 1.4, 1.1, 1.4]
    assert run(StalledDetector(), [CHANCE] * 5, bouncing) == []


def test_a_snapshot_from_before_the_history_restores_its_count() -> None:
    det = StalledDetector()
    run(det, [CHANCE] * 5, [1.2, 0.9, 1.4, 1.4])
    state = det.state_dict()
    assert state["held"] == [1, 1]
    old = StalledDetector()
    old.load_state_dict({**state, "held": 2})  # the count of evaluations in a row
    later = [Metrics(45 * (k + 5), {"val_loss": 1.4, "loss": 1.4}) for k in range(3)]
    assert [len(old.feed(m)) for m in later] == [len(det.feed(m)) for m in later] == [0, 0, 1]
