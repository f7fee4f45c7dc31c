"""TensorBoardOutput: event files read back with tensorboard's own reader."""

from __future__ import annotations

import math
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator

from monitor.engine.events import Decision, DecisionKind, Detection
from monitor.tboutput import TensorBoardOutput, job_directory


def _load(directory: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(
        str(directory),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    return acc


def _scalars(acc: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _texts(acc: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def _nan_detection(step: int) -> Detection:
    return Detection("non_finite", "loss", step, math.nan, "loss is NaN at step 7")


def _decision(step: int) -> Decision:
    return Decision(
        id=3,
        kind=DecisionKind.SET_LR,
        apply_at_step=step + 1,
        source="non_finite",
        reason="loss is NaN; LR × 0.5: 0.1 → 0.05",
        lrs=(0.05, 0.005),
    )


def test_lr_written_on_change_and_periodically(tmp_path: Path) -> None:
    """LR points appear at the first step, at every change, and every lr_every_steps otherwise."""
    out = TensorBoardOutput(tmp_path, lr_every_steps=10, clock=lambda: 1000.0)
    for step in range(25):
        lrs = [0.1, 0.01] if step < 13 else [0.05, 0.005]
        out.on_outputs("job-a", step, lrs)
    out.flush()
    acc = _load(tmp_path / "job-a")
    group0 = _scalars(acc, "lrpilot/lr/group0")
    assert [s for s, _ in group0] == [0, 10, 13, 23]
    assert [round(v, 6) for _, v in group0] == [0.1, 0.1, 0.05, 0.05]
    assert [round(v, 6) for _, v in _scalars(acc, "lrpilot/lr/group1")] == [
        0.01,
        0.01,
        0.005,
        0.005,
    ]


def test_detections_and_decisions_as_scalars_and_text(tmp_path: Path) -> None:
    """A detection and a decision become 1-valued scalars and text with their reasons, at their step."""
    out = TensorBoardOutput(tmp_path)
    out.on_outputs("job-b", 6, [0.1, 0.01])
    out.on_outputs("job-b", 7, [0.05, 0.005], [_nan_detection(7), _decision(7)])
    out.close("job-b")
    acc = _load(tmp_path / "job-b")
    assert _scalars(acc, "lrpilot/detections/non_finite") == [(7, 1.0)]
    assert _scalars(acc, "lrpilot/decisions/set_lr") == [(7, 1.0)]
    [(step, text)] = _texts(acc, "lrpilot/detections")
    assert step == 7 and "**non_finite** on `loss` = nan: loss is NaN at step 7" in text
    [(step, text)] = _texts(acc, "lrpilot/decisions")
    assert step == 7
    assert "decision 3 **set_lr** by non_finite, from step 8, LR 0.05, 0.005" in text
    assert "LR × 0.5: 0.1 → 0.05" in text
    assert acc.summary_metadata["lrpilot/decisions"].plugin_data.plugin_name == "text"


def test_nothing_written_when_nothing_is_due(tmp_path: Path) -> None:
    """Steps with an unchanged LR and no outputs between periodic points write no event."""
    out = TensorBoardOutput(tmp_path, lr_every_steps=1000)
    for step in range(50):
        out.on_outputs("quiet", step, [0.1])
    assert out.events_written == 1


def test_errors_are_counted_not_raised(tmp_path: Path) -> None:
    """An unwritable log directory is logged and counted; the caller never sees an exception."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = TensorBoardOutput(blocker)
    out.on_outputs("job", 1, [0.1], [_nan_detection(1)])
    out.on_outputs("job", 2, [0.2])
    out.flush()
    out.close("job")
    assert out.errors == 2


def test_least_recently_written_file_is_closed_and_reopened(tmp_path: Path) -> None:
    """With max_open=2, a third job closes the oldest file; its later writes land in a new file of the same run."""
    out = TensorBoardOutput(tmp_path, max_open=2)
    out.on_outputs("a", 1, [0.1])
    out.on_outputs("b", 1, [0.1])
    out.on_outputs("c", 1, [0.1])
    out.on_outputs("a", 2, [0.2])
    out.close_all()
    assert len(list((tmp_path / "a").glob("events.out.tfevents.*"))) == 2
    assert _scalars(_load(tmp_path / "a"), "lrpilot/lr/group0") == [
        (1, 0.10000000149011612),
        (2, 0.20000000298023224),
    ]


def test_set_directory_and_skip_through_step(tmp_path: Path) -> None:
    """A job placed elsewhere writes there, and steps up to skip_through_step are not rewritten."""
    out = TensorBoardOutput(tmp_path / "root")
    out.set_directory("run/x", tmp_path / "run" / "lrpilot", skip_through_step=4)
    for step in range(8):
        out.on_outputs("run/x", step, [0.1 * (step + 1)])
    out.close("run/x")
    assert [s for s, _ in _scalars(_load(tmp_path / "run" / "lrpilot"), "lrpilot/lr/group0")] == [
        5,
        6,
        7,
    ]
    assert not (tmp_path / "root").exists()


def test_job_directory_is_safe_and_distinct() -> None:
    """Job names map to relative paths that never climb out, and different names never collide."""
    assert job_directory("mnist-a") == Path("mnist-a")
    assert job_directory("team/exp1") == Path("team/exp1")
    climbing = job_directory("../../etc")
    assert ".." not in climbing.parts and not climbing.is_absolute()
    assert job_directory("a b") != job_directory("a_b")
    assert job_directory("") != job_directory("job")
