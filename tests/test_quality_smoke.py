"""The quality benchmark, small: one task, two bad starting LRs, lrpilot steering through a real daemon.

The full benchmark (``python bench/quality/run.py``) runs four tasks from five starting LRs
each; this keeps its most important claim under test: a learning rate that makes training
produce NaN within a few steps does not lose the run when lrpilot steers it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from daemon import Daemon  # noqa: E402
from train import RunSpec, run  # noqa: E402

TASK = "friedman_reg"
NAN_LR = 3.0  # 300x the task's best fixed LR (0.01): +Inf within 5 steps at a fixed LR
LOW_LR = 0.0001  # 100x too low


@pytest.fixture(scope="module")
def daemon() -> Iterator[Any]:
    with Daemon() as d:
        yield d


@pytest.mark.slow
def test_a_fixed_nan_lr_is_lost() -> None:
    """The NaN-producing LR really is one: without lrpilot the weights become non-finite and the run is lost."""
    result = run(RunSpec(TASK, "fixed", NAN_LR, seed=0))
    assert result.lost
    assert result.nan_incidents >= 1
    assert "non-finite" in result.lost_reason


@pytest.mark.slow
def test_lrpilot_recovers_from_a_nan_producing_lr(daemon: Any) -> None:
    """From the NaN-producing LR lrpilot rolls back, cuts the LR, and the run ends with a good model.

    The rollback comes from ``overshoot`` when it sees the loss blow up before the first
    NaN (it does here: the loss doubles within 3 steps), else from ``non_finite``.
    """
    result = run(RunSpec(TASK, "lrpilot", NAN_LR, seed=0, url=daemon.url, label="nan-lr"))
    assert not result.lost, result.lost_reason
    rollbacks = result.decisions.get("rollback:overshoot", 0) + result.decisions.get("rollback:non_finite", 0)
    assert rollbacks >= 1, result.decisions
    assert result.decision_log[0]["kind"] == "rollback"
    assert result.decision_log[0]["step"] <= 10  # before the fixed-LR run's weights are lost
    assert result.final_lr < NAN_LR
    # the target is standardized: predicting its mean scores 1.0, a network killed by the
    # LR about 2.4, the best fixed LR 0.057; lrpilot ends at 0.047 (0.17 before the
    # overshoot detector, when the rollback waited for the NaN)
    assert math.isfinite(result.final_val_loss)
    assert result.final_val_loss < 0.1


@pytest.mark.slow
def test_lrpilot_from_a_too_low_lr_is_not_lost(daemon: Any) -> None:
    """From an LR 100x too low the run is not lost, lrpilot never lowers the LR further in
    response to anything, and the run's last 20 % is annealed to 0 (it told its length)."""
    result = run(RunSpec(TASK, "lrpilot", LOW_LR, seed=0, url=daemon.url, label="/100"))
    assert not result.lost, result.lost_reason
    assert result.nan_incidents == 0
    responses = [d for d in result.decision_log if d["source"] != "anneal"]
    assert all(min(d["lrs"]) >= LOW_LR for d in responses if d["lrs"])
    assert [d["source"] for d in result.decision_log[len(responses) :]] == ["anneal"]
    assert result.final_lr == 0.0
    assert math.isfinite(result.final_val_loss)


def test_the_adam_variants_train_with_adam_outside_the_suite() -> None:
    """``<task>_adam`` is the same task with torch's Adam; the suite (the target's tasks, and
    run.py's default) is the four SGD tasks."""
    import torch
    from tasks import SUITE, TASKS

    assert SUITE == ("digits_mlp", "digits_cnn", "friedman_reg", "char_lm")
    for name in SUITE:
        sgd, adam = TASKS[name], TASKS[f"{name}_adam"]
        assert (adam.steps, adam.batch_size, adam.eval_every) == (sgd.steps, sgd.batch_size, sgd.eval_every)
        params = [torch.nn.Parameter(torch.zeros(2))]
        opt = adam.make_optimizer(params, 0.003)
        assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.003
        assert type(sgd.make_optimizer(params, 0.1)) is torch.optim.SGD


@pytest.mark.slow
def test_a_steered_run_is_repeatable(daemon: Any) -> None:
    """The benchmark's runs are deterministic on one machine: the client's clock is virtual
    during a run (every clock read it makes, report()'s short paths included), so the same
    run twice gets the same decisions at the same steps and ends on the same loss."""
    spec = RunSpec(TASK, "lrpilot", NAN_LR, seed=1, url=daemon.url, label="repeat")
    first, second = run(spec), run(spec)

    def log(result: Any) -> list[tuple[Any, ...]]:
        return [(d["step"], d["kind"], d["source"], d["lrs"]) for d in result.decision_log]

    assert log(first) == log(second)
    assert first.final_val_loss == second.final_val_loss
