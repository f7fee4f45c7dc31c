"""Watch mode: real files growing under a watched directory, read by the Watcher."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from monitor.config import Config, DefaultsConfig, StorageConfig, WatchConfig
from monitor.engine.events import Output
from monitor.watch import DECISIONS_FILE, DEFAULT_INITIAL_LR, Watcher

# a plateau policy on "loss" reacts within a few records; the non_finite detector halts on NaN
POLICY = {"kind": "reduce_on_plateau", "monitor": "loss", "factor": 0.5, "patience": 1}


def _config(root: Path, poll: float = 1.0) -> Config:
    return Config(
        watch=WatchConfig(dirs=[root], poll_seconds=poll),
        defaults=DefaultsConfig(policy=POLICY, detectors={"non_finite": {}}),
        # inside the test's directory (hidden: the watcher skips it), not ./lrpilot-state
        storage=StorageConfig(state_dir=root / ".lrpilot-state"),
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def _lines(
    step_from: int, step_to: int, loss: Callable[[int], float] = lambda s: 1.0 / (s + 1)
) -> str:
    return "".join(
        json.dumps({"step": s, "loss": loss(s)}) + "\n" for s in range(step_from, step_to)
    )


def _decisions(run: Path) -> list[dict[str, object]]:
    path = run / DECISIONS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_jsonl_appended_in_chunks_waits_for_a_partial_line(tmp_path: Path) -> None:
    """Records are fed as complete lines arrive; a partial last line is read only once its newline is written."""
    run = tmp_path / "exp1"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    watcher = Watcher(_config(tmp_path), clock=FakeClock())
    _append(metrics, _lines(0, 3) + '{"step": 3, "lo')
    assert watcher.scan_once() == 3
    [info] = watcher.jobs()
    assert info.name == "exp1" and info.step == 2 and info.records == 3
    _append(metrics, 'ss": 0.2}\n' + _lines(4, 6))
    assert watcher.scan_once() == 3
    info = watcher.jobs()[0]
    assert info.step == 5 and info.records == 6 and info.malformed == 0
    assert info.last_values["loss"] == pytest.approx(1 / 6)
    assert watcher.scan_once() == 0  # nothing new: nothing fed twice


def test_csv_run_with_empty_cells_and_a_bad_row(tmp_path: Path) -> None:
    """A CSV run is read by header; empty cells are absent, and a row with a wrong cell count is reported by file and line."""
    run = tmp_path / "csvrun"
    run.mkdir()
    (run / "log.csv").write_text("step,loss,val_loss\n0,1.0,\n1,0.9,0.95\n2,0.8\n3,nan,\n")
    watcher = Watcher(_config(tmp_path), clock=FakeClock())
    assert watcher.scan_once() == 3
    info = watcher.jobs()[0]
    assert info.malformed == 1
    assert info.errors == (f"{run / 'log.csv'}: line 4: expected 3 cells, got 2",)
    assert info.last_values["val_loss"] == 0.95
    assert math.isnan(info.last_values["loss"])
    assert info.state == "halted"  # the NaN loss at step 3


def test_nan_loss_writes_a_decision_beside_the_run(tmp_path: Path) -> None:
    """A NaN loss leads to a halt decision appended to lrpilot-decisions.jsonl with its time."""
    run = tmp_path / "nanrun"
    run.mkdir()
    clock = FakeClock()
    watcher = Watcher(_config(tmp_path), clock=clock)
    _append(
        run / "metrics.jsonl",
        _lines(0, 4) + '{"step": 4, "loss": NaN}\n{"step": 5, "loss": "NaN"}\n',
    )
    watcher.scan_once()
    [decision] = _decisions(run)
    assert decision["id"] == 1 and decision["kind"] == "halt" and decision["source"] == "non_finite"
    assert decision["apply_at_step"] == 5 and decision["time"] == clock.now
    assert "loss is NaN at step 4" in str(decision["reason"])
    assert watcher.counters["decisions"] == 1


def test_plateau_decision_and_tensorboard_output_beside_the_run(tmp_path: Path) -> None:
    """A plateau halves the LR; the decision file and <run>/lrpilot event files show it at the record's step."""
    run = tmp_path / "plateau"
    run.mkdir()
    (run / "lrpilot.json").write_text(json.dumps({"initial_lr": [0.2, 0.02]}))
    watcher = Watcher(_config(tmp_path), clock=FakeClock())
    _append(run / "metrics.jsonl", _lines(0, 6, loss=lambda s: 1.0 if s >= 2 else 2.0 - s))
    watcher.scan_once()
    decisions = _decisions(run)
    assert decisions and decisions[0]["kind"] == "set_lr" and decisions[0]["lrs"] == [0.1, 0.01]
    info = watcher.jobs()[0]
    assert info.lrs[0] < 0.2 and info.state == "running"
    acc = event_accumulator.EventAccumulator(
        str(run / "lrpilot"),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
    )
    acc.Reload()
    lr = [(e.step, round(e.value, 6)) for e in acc.Scalars("lrpilot/lr/group0")]
    assert lr[0] == (0, 0.2) and (3, 0.1) in lr
    assert acc.Scalars("lrpilot/decisions/set_lr")[0].step == 3
    text = acc.Tensors("lrpilot/decisions")[0].tensor_proto.string_val[0].decode()
    assert "loss has not improved" in text
    assert [i.name for i in watcher.jobs()] == ["plateau"]  # its own output dir is not a run


def test_initial_lr_from_the_first_record_else_the_default(tmp_path: Path) -> None:
    """Without lrpilot.json, the first record's lr metric (or a train/lr tag) sets the initial LR, else the default."""
    for name, line in (
        ("a", {"step": 0, "lr": 0.05, "loss": 1}),
        ("b", {"step": 0, "train/learning_rate": 0.3}),
        ("c", {"step": 0, "loss": 1}),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.jsonl").write_text(json.dumps(line) + "\n")
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    watcher.scan_once()
    assert {i.name: i.lrs for i in watcher.jobs()} == {
        "a": (0.05,),
        "b": (0.3,),
        "c": (DEFAULT_INITIAL_LR,),
    }


def test_new_runs_are_found_with_relative_names(tmp_path: Path) -> None:
    """A run directory created later, at any depth, is picked up and named by its path relative to the root."""
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "metrics.jsonl").write_text(_lines(0, 2))
    watcher.scan_once()
    deep = tmp_path / "team" / "exp7"
    deep.mkdir(parents=True)
    (deep / "metrics.jsonl").write_text(_lines(0, 3))
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "metrics.jsonl").write_text(_lines(0, 3))
    assert watcher.scan_once() == 3
    assert sorted(i.name for i in watcher.jobs()) == ["first", "team/exp7"]
    assert watcher.counters["runs"] == 2


def test_truncated_file_is_read_again_from_the_start(tmp_path: Path) -> None:
    """A file that shrinks below the offset is reported as truncated and re-read from its start."""
    run = tmp_path / "r"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(_lines(0, 5))
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    assert watcher.scan_once() == 5
    metrics.write_text(_lines(0, 2))  # a restarted job rewrites its log
    assert watcher.scan_once() == 2
    assert watcher.counters["truncated"] == 1
    assert watcher.jobs()[0].records == 7


def test_rotated_file_is_drained_then_the_new_one_read(tmp_path: Path) -> None:
    """After a rename and a new file at the same path, the old file's unread tail and the new file are both fed."""
    run = tmp_path / "r"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text(_lines(0, 3))
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    assert watcher.scan_once() == 3
    # the last line has no newline: the rotation completes it
    _append(metrics, _lines(3, 5) + '{"step": 5, "loss": 0.1}')
    os.rename(metrics, run / "metrics.jsonl.1")
    metrics.write_text(_lines(6, 9))
    assert watcher.scan_once() == 6
    assert watcher.counters["rotated"] == 1
    assert watcher.jobs()[0].step == 8


def test_deleted_file_and_run_then_the_watcher_keeps_going(tmp_path: Path) -> None:
    """A deleted run is drained, counted and marked finished; the other runs keep being followed."""
    gone, kept = tmp_path / "gone", tmp_path / "kept"
    for run in (gone, kept):
        run.mkdir()
        (run / "metrics.jsonl").write_text(_lines(0, 2))
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    assert watcher.scan_once() == 4
    _append(gone / "metrics.jsonl", _lines(2, 3))
    handle_path = gone / "metrics.jsonl"
    handle_path.unlink()
    gone.rmdir()
    _append(kept / "metrics.jsonl", _lines(2, 4))
    # the deleted file's unread line (through the handle still open) and 2 new ones
    assert watcher.scan_once() == 3
    states = {i.name: (i.state, i.files) for i in watcher.jobs()}
    assert states["gone"] == ("finished", ())
    assert states["kept"][0] == "running"
    assert watcher.counters["deleted"] == 1


def test_malformed_lines_are_counted_with_file_and_line(tmp_path: Path) -> None:
    """Bad JSON, a missing step, a bad value and bad UTF-8 are each reported with file and line; good lines still count."""
    run = tmp_path / "bad"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(
        b'{"step": 0, "loss": 1}\n{"step": 1, "loss": \n{"loss": 2}\n{"step": 3, "loss": "high"}\n'
        b'\xff\xfe\n\n{"step": 5, "loss": 0.5}\n'
    )
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    assert watcher.scan_once() == 2
    info = watcher.jobs()[0]
    assert info.malformed == 4 and watcher.counters["malformed"] == 4
    where = [e.split(": ", 2)[:2] for e in info.errors]
    assert where == [[str(metrics), f"line {n}"] for n in (2, 3, 4, 5)]
    assert "step: missing" in info.errors[1] and "loss: expected a number" in info.errors[2]


def test_restart_does_not_write_decisions_twice(tmp_path: Path) -> None:
    """A second watcher re-reading the same run makes the same decisions but appends none already in the file."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_lines(0, 5, loss=lambda s: 1.0))
    Watcher(_config(tmp_path), clock=FakeClock()).scan_once()
    first = _decisions(run)
    assert first
    again = Watcher(_config(tmp_path), clock=FakeClock())
    again.scan_once()
    assert _decisions(run) == first
    _append(run / "metrics.jsonl", _lines(5, 9, loss=lambda s: 1.0))
    again.scan_once()
    ids = [int(str(d["id"])) for d in _decisions(run)]
    assert ids == sorted(set(ids)) and len(ids) > len(first)


def test_callback_errors_are_counted_and_views_are_exported(tmp_path: Path) -> None:
    """on_update sees each batch; a failing callback is counted; views() gives exporter JobViews."""
    seen: list[tuple[str, list[Output]]] = []

    def on_update(name: str, outputs: list[Output]) -> None:
        seen.append((name, outputs))
        raise RuntimeError("callback bug")

    run = tmp_path / "v"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_lines(0, 3) + '{"step": 3, "loss": "Infinity"}\n')
    clock = FakeClock()
    watcher = Watcher(_config(tmp_path), on_update=on_update, clock=clock, tensorboard=False)
    watcher.scan_once()
    assert seen and seen[0][0] == "v" and watcher.counters["callback_errors"] == 1
    [view] = watcher.views()
    assert view.name == "v" and view.state == "halted" and view.step == 3
    assert view.nonfinite == {"loss": 1} and view.detections == {"non_finite": 1}
    assert view.last_seen == clock.now


def test_stale_after_silence(tmp_path: Path) -> None:
    """A run silent for longer than server.stale_after_seconds is reported stale."""
    run = tmp_path / "s"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_lines(0, 2))
    clock = FakeClock()
    watcher = Watcher(_config(tmp_path), clock=clock, tensorboard=False)
    watcher.scan_once()
    clock.now += 121.0
    assert watcher.jobs()[0].state == "stale"


@pytest.mark.slow
# watchdog's inotify backend warns when a nested directory appears while it adds watches (its own race)
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_observer_thread_follows_a_summarywriter(tmp_path: Path) -> None:
    """With the watcher running in its thread, TensorBoard events written by torch's SummaryWriter reach the engine and a NaN halts the run."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "tb" / "run1"
    updates: list[str] = []
    watcher = Watcher(_config(tmp_path, poll=0.2), on_update=lambda name, _: updates.append(name))
    watcher.start()
    try:
        writer = SummaryWriter(str(run))
        for step in range(5):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
            writer.add_scalar("train/lr", 0.1, step)
        writer.flush()
        _wait_for(lambda: any(i.step == 4 for i in watcher.jobs()))
        [info] = watcher.jobs()
        assert info.name == "tb/run1" and info.lrs == pytest.approx((0.1,))
        assert info.last_values["loss"] == pytest.approx(0.2)
        writer.add_scalar("loss", math.nan, 5)
        writer.add_scalar("loss", 0.1, 6)
        writer.flush()
        _wait_for(lambda: bool(_decisions(run)))
        [decision] = _decisions(run)
        assert decision["kind"] == "halt" and "step 5" in str(decision["reason"])
        writer.close()
    finally:
        watcher.stop()
    assert updates and set(updates) == {"tb/run1"}
    assert list((run / "lrpilot").glob("events.out.tfevents.*"))
    assert [i.name for i in watcher.jobs()] == ["tb/run1"]


def test_line_longer_than_a_chunk_is_skipped_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line longer than the read chunk is reported once with its line number and skipped; the next lines are read."""
    import monitor.watch as watch

    monkeypatch.setattr(watch, "READ_CHUNK_BYTES", 64)
    run = tmp_path / "long"
    run.mkdir()
    huge = json.dumps({"step": 1, "note": "x" * 300})
    (run / "metrics.jsonl").write_text(_lines(0, 1) + huge + "\n" + _lines(2, 4))
    watcher = Watcher(_config(tmp_path), clock=FakeClock(), tensorboard=False)
    assert watcher.scan_once() == 3
    info = watcher.jobs()[0]
    assert info.malformed == 1 and "line 2: line longer than 64 bytes" in info.errors[0]
    assert info.step == 3


def test_restart_does_not_rewrite_tensorboard_points(tmp_path: Path) -> None:
    """A second watcher over the same run writes no TensorBoard point at a step the first one wrote."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_lines(0, 5, loss=lambda s: 1.0))
    first = Watcher(_config(tmp_path), clock=FakeClock())
    first.scan_once()
    first.stop()
    _append(run / "metrics.jsonl", _lines(5, 8, loss=lambda s: 1.0))
    second = Watcher(_config(tmp_path), clock=FakeClock())
    second.scan_once()
    second.stop()
    acc = event_accumulator.EventAccumulator(
        str(run / "lrpilot"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    steps = [e.step for e in acc.Scalars("lrpilot/lr/group0")]
    assert steps == sorted(set(steps)) and steps[-1] >= 5
