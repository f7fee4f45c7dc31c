"""The anneal at the end of a run of known length: formula, engine, snapshots, config."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from lrpilot.schedules import anneal_factor, constant_segment, lrs_at, momentums_at

from monitor.config import ConfigError, parse_detector_blocks, parse_policy_block
from monitor.engine import CheckpointSaved, Decision, DecisionKind, JobEngine, JobSpec, Metrics
from monitor.engine.policies.anneal import Anneal, AnnealParams

PLATEAU = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 1, "factor": 0.5}
ANNEAL = {"fraction": 0.2, "final_factor": 0.0}


def engine(
    policy: dict[str, Any], detectors: dict[str, Any] | None = None, lrs: tuple[float, ...] = (0.1,)
) -> JobEngine:
    spec = JobSpec(parse_policy_block(policy), parse_detector_blocks(detectors or {}))
    return JobEngine(spec, lrs)


def decisions(out: list[Any]) -> list[Decision]:
    return [o for o in out if isinstance(o, Decision)]


def improving(step: int) -> dict[str, float]:
    """A loss that keeps improving: no plateau cut ever."""
    values = {"loss": 2.0 / (1 + step)}
    if step % 10 == 9:
        values["val_loss"] = 2.0 / (1 + step)
    return values


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("strategy", ["linear", "cos"])
def test_factor_runs_from_just_below_one_to_the_final_factor(strategy: str) -> None:
    n = 40
    factors = [anneal_factor(t, n, 0.1, strategy) for t in range(n + 5)]
    assert 0.9 < factors[0] < 1.0
    assert factors[n - 1] == pytest.approx(0.1, abs=1e-15)
    assert factors[n:] == [factors[n - 1]] * 5  # held after the last step
    assert all(a > b for a, b in itertools.pairwise(factors[:n]))


def test_linear_factor_is_a_straight_line() -> None:
    n = 10
    assert [anneal_factor(t, n, 0.0, "linear") for t in range(n)] == pytest.approx(
        [1 - (t + 1) / n for t in range(n)]
    )


def test_anneal_segment_keeps_the_wrapped_segments_own_clock() -> None:
    cyclic = {
        "kind": "cyclic",
        "origin_step": 0,
        "params": {
            "base_lr": [0.01],
            "max_lr": [0.1],
            "step_size_up": 7,
            "step_size_down": None,
            "mode": "triangular",
            "gamma": 1.0,
            "cycle_momentum": True,
            "base_momentum": [0.8],
            "max_momentum": [0.9],
        },
    }
    anneal = {
        "kind": "anneal",
        "origin_step": 80,
        "params": {"total_iters": 20, "final_factor": 0.0, "anneal_strategy": "linear"},
        "then": cyclic,
    }
    for step in range(80, 100):
        factor = anneal_factor(step - 80, 20, 0.0, "linear")
        assert lrs_at(anneal, step) == pytest.approx([factor * lrs_at(cyclic, step)[0]])
        assert momentums_at(anneal, step) == momentums_at(cyclic, step)
    assert lrs_at(anneal, 99) == [0.0]


# --------------------------------------------------------------------------- the engine


def run(job: JobEngine, steps: range) -> list[Decision]:
    out: list[Decision] = []
    for step in steps:
        out.extend(decisions(job.feed(Metrics(step, improving(step)))))
    return out


def test_without_a_length_the_anneal_does_nothing() -> None:
    plain, wrapped = engine(PLATEAU), engine({**PLATEAU, "anneal": ANNEAL})
    assert wrapped.total_steps is None
    flat = [Metrics(s, {"loss": 1.0, "val_loss": 1.0}) for s in range(0, 200, 10)]
    got = [[d.to_dict() for d in decisions(wrapped.feed(m))] for m in flat]
    want = [[d.to_dict() for d in decisions(plain.feed(m))] for m in flat]
    assert got == want
    assert any(got)  # the plateau cuts happened in both
    assert wrapped.lrs == plain.lrs


def test_the_anneal_starts_once_at_its_first_step_and_the_job_computes_the_rest() -> None:
    job = engine({**PLATEAU, "anneal": ANNEAL})
    job.plan(100)
    assert job.total_steps == 100
    before = run(job, range(0, 79))
    assert before == []
    started = run(job, range(79, 80))  # the record before step 80 sets step 80's LR
    assert len(started) == 1
    d = started[0]
    assert d.kind is DecisionKind.SCHEDULE and d.source == "anneal"
    assert "last 20 of the run's 100 planned steps, from step 80" in d.reason
    assert d.schedule is not None and d.schedule["kind"] == "anneal"
    assert d.schedule["then"] == constant_segment([0.1])
    assert run(job, range(80, 100)) == []  # the job evaluates the segment by itself
    # the engine and the job agree at every step of the anneal
    assert lrs_at(d.schedule, 99) == [0.0]
    assert list(job.lrs) == pytest.approx(lrs_at(d.schedule, 99))


def test_no_plateau_cut_and_no_raise_during_the_anneal() -> None:
    job = engine(
        {**PLATEAU, "anneal": ANNEAL},
        {"slow_progress": {"response": {"require_checkpoint": False}}},
    )
    job.plan(100)
    run(job, range(0, 85))
    segment = job.segment
    # flat evaluations would cut the LR twice with patience 1; a raise would double it
    for step in range(85, 100):
        values = {"loss": 0.5, "val_loss": 0.5} if step % 3 == 0 else {"loss": 0.5}
        assert decisions(job.feed(Metrics(step, values))) == []
    assert job.segment == segment
    assert job.policy.scale_by(3.0, job.min_lrs) is False


def test_a_cut_during_the_anneal_scales_what_is_annealed() -> None:
    job = engine({**PLATEAU, "anneal": ANNEAL})
    job.plan(100)
    run(job, range(0, 90))
    assert job.policy.scale_by(0.5, job.min_lrs) is True
    segment = job.segment
    assert segment is not None and segment["then"]["params"]["lrs"] == [0.05]
    assert lrs_at(segment, 90) == pytest.approx([0.05 * anneal_factor(10, 20, 0.0, "linear")])


def test_operator_set_lr_during_the_anneal_sets_the_current_lr() -> None:
    job = engine({**PLATEAU, "anneal": ANNEAL})
    job.plan(100)
    run(job, range(0, 90))
    d = job.manual_set_lr([0.02], "by hand", "ops")
    assert d.kind is DecisionKind.SCHEDULE and d.schedule is not None
    assert list(job.lrs) == pytest.approx([0.02])
    assert lrs_at(d.schedule, 90) == pytest.approx([0.02])  # the LR of the next step
    assert lrs_at(d.schedule, 99) == [0.0]


def test_a_rollback_to_before_the_anneal_leaves_it_and_it_starts_again() -> None:
    job = engine(
        {**PLATEAU, "anneal": ANNEAL},
        {"non_finite": {"response": {"action": "rollback", "factor": 0.5}}},
    )
    job.plan(100)
    job.feed(CheckpointSaved(70))
    run(job, range(0, 85))
    assert isinstance(job.policy, Anneal) and job.policy.active
    out = decisions(job.feed(Metrics(85, {"loss": math.nan})))
    assert [d.kind for d in out] == [DecisionKind.ROLLBACK]
    assert out[0].rollback_to_step == 70
    # the job restarts from step 71 after the rollback applies
    run(job, range(86, 86 + out[0].apply_at_step - 86))
    run(job, range(71, 79))
    assert not job.policy.active  # the rewind left the anneal ...
    again = run(job, range(79, 80))
    assert [d.source for d in again] == ["anneal"]  # ... and it began again at step 80
    assert again[0].schedule is not None
    assert again[0].schedule["then"]["params"]["lrs"] == [pytest.approx(0.05)]


def test_snapshot_mid_anneal_continues_exactly() -> None:
    spec_block = {**PLATEAU, "anneal": {**ANNEAL, "anneal_strategy": "cos"}}
    job = engine(spec_block)
    job.plan(100)
    run(job, range(0, 88))
    state = json.loads(json.dumps(job.state_dict()))
    copy = JobEngine.from_state(job.spec, state)
    assert copy.total_steps == 100
    assert copy.segment == job.segment and copy.lrs == job.lrs
    tail = [Metrics(s, {"loss": 0.3, "val_loss": 0.3}) for s in range(88, 100)]
    assert [decisions(copy.feed(m)) for m in tail] == [decisions(job.feed(m)) for m in tail]


def test_snapshots_survive_a_config_that_gains_or_drops_the_anneal() -> None:
    plain = engine(PLATEAU)
    run(plain, range(0, 50))
    wrapped_spec = engine({**PLATEAU, "anneal": ANNEAL}).spec
    gained = JobEngine.from_state(wrapped_spec, plain.state_dict())
    gained.plan(60)
    assert gained.lrs == plain.lrs
    assert [d.source for d in run(gained, range(50, 52))] == ["anneal"]  # 48 is past

    annealed = engine({**PLATEAU, "anneal": ANNEAL})
    annealed.plan(1000)
    run(annealed, range(0, 50))
    dropped = JobEngine.from_state(plain.spec, annealed.state_dict())
    assert dropped.lrs == annealed.lrs and dropped.total_steps is None


def test_the_block_length_wins_over_the_jobs() -> None:
    job = engine({**PLATEAU, "anneal": {**ANNEAL, "total_steps": 50}})
    job.plan(1000)
    assert job.total_steps == 50
    assert [d.source for d in run(job, range(0, 40))] == ["anneal"]


def test_a_step_driven_policy_is_annealed_on_its_own_clock() -> None:
    cyclic = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 7}
    job = engine({**cyclic, "anneal": ANNEAL})
    job.plan(50)
    start = job.start()
    assert [d.schedule["kind"] for d in start if d.schedule] == ["cyclic"]
    began = run(job, range(0, 40))
    assert [d.source for d in began] == ["anneal"]
    segment = began[0].schedule
    assert segment is not None and segment["then"]["kind"] == "cyclic"
    plain = engine(cyclic)
    for step in range(40, 49):
        job.feed(Metrics(step, {"loss": 1.0}))
        plain.feed(Metrics(step, {"loss": 1.0}))
        factor = anneal_factor(step + 1 - 40, 10, 0.0, "linear")
        assert job.lrs == pytest.approx(tuple(factor * x for x in plain.lrs))
        assert lrs_at(segment, step + 1) == pytest.approx(list(job.lrs))


# --------------------------------------------------------------------------- config


def test_policy_block_round_trips_with_its_anneal() -> None:
    spec = parse_policy_block({**PLATEAU, "anneal": {"fraction": 0.1, "anneal_strategy": "cos"}})
    assert spec.anneal == AnnealParams(fraction=0.1, anneal_strategy="cos")
    assert parse_policy_block(spec.to_block()) == spec


@pytest.mark.parametrize(
    ("anneal", "path"),
    [
        ({"fraction": 1.0}, "policy.anneal.fraction"),
        ({"final_factor": -0.1}, "policy.anneal.final_factor"),
        ({"anneal_strategy": "step"}, "policy.anneal.anneal_strategy"),
        ({"total_steps": 1}, "policy.anneal.total_steps"),
        ({"fractoin": 0.2}, "policy.anneal"),
        ("0.2", "policy.anneal"),
    ],
)
def test_bad_anneal_blocks_name_the_field(anneal: Any, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy_block({**PLATEAU, "anneal": anneal})
    assert path in str(err.value)


def test_plan_refuses_a_nonsense_length() -> None:
    job = engine({**PLATEAU, "anneal": ANNEAL})
    with pytest.raises(ValueError, match="total_steps"):
        job.plan(0)
