"""Watch mode across restarts: real JSONL, CSV and TensorBoard files, a watcher stopped and started again.

A restarted watcher continues each run from its saved engine and file positions: it feeds only
the records written since (counted), its decisions are exactly those of one uninterrupted
watcher over the whole file (ids continue, none written twice), and a file replaced or
truncated while it was stopped is read again from the start, saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from monitor.config import Config, DefaultsConfig, StorageConfig, WatchConfig
from monitor.server.app import Daemon
from monitor.watch import DECISIONS_FILE, Watcher
from monitor.watchstate import STATE_FILE, SavedRun, WatchState

# flat losses give a plateau decision every second record after the first: how far the
# plateau count got before a restart decides every later decision
POLICY = {"kind": "reduce_on_plateau", "monitor": "loss", "factor": 0.5, "patience": 1}


def _config(root: Path, state: Path, policy: dict[str, Any] | None = None, poll: float = 1.0) -> Config:
    return Config(
        watch=WatchConfig(dirs=[root], poll_seconds=poll),
        storage=StorageConfig(state_dir=state),
        defaults=DefaultsConfig(policy=policy or POLICY, detectors={"non_finite": {}}),
    )


def _jsonl(steps: range, loss: Callable[[int], float] = lambda s: 1.0) -> str:
    return "".join(json.dumps({"step": s, "loss": loss(s), "lr": 0.1}) + "\n" for s in steps)


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def _decisions(run: Path) -> list[dict[str, Any]]:
    """The run's decisions file without the write times."""
    path = run / DECISIONS_FILE
    if not path.exists():
        return []
    return [
        {k: v for k, v in json.loads(line).items() if k != "time"}
        for line in path.read_text().splitlines()
    ]


def _ids(run: Path) -> list[int]:
    return [int(d["id"]) for d in _decisions(run)]


def _reference(
    tmp_path: Path, files: dict[str, str | bytes]
) -> tuple[list[dict[str, Any]], int | None]:
    """Decisions and plateau count of one uninterrupted, unpersisted watcher over ``files``."""
    run = tmp_path / "reference" / "exp"
    run.mkdir(parents=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (run / name).write_bytes(data)
    watcher = Watcher(
        _config(run.parent, tmp_path / "unused"), persist=False, tensorboard=False
    )
    while watcher.scan_once():
        pass
    [info] = watcher.jobs()
    assert info.engine is not None
    return _decisions(run), info.engine.plateau_bad_evaluations


def _watcher(root: Path, state_dir: Path, **kwargs: Any) -> Watcher:
    return Watcher(_config(root, state_dir), tensorboard=False, **kwargs)


def _live_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "live"
    run = root / "exp"
    run.mkdir(parents=True)
    return root, run, tmp_path / "state"


# ------------------------------------------------------------------------------ line files


def test_jsonl_run_continues_from_its_saved_engine(tmp_path: Path) -> None:
    """After a restart only the appended records are fed, and the decisions equal an uninterrupted watcher's."""
    root, run, state = _live_run(tmp_path)
    (run / "metrics.jsonl").write_text(_jsonl(range(0, 7)))
    first = _watcher(root, state)
    assert first.scan_once() == 7
    before = _ids(run)
    assert before == [1, 2, 3]
    first.stop()
    assert (state / STATE_FILE).is_file()

    _append(run / "metrics.jsonl", _jsonl(range(7, 20)))
    second = _watcher(root, state)
    assert second.scan_once() == 13  # the first 7 records are not fed again
    assert second.counters["resumed"] == 1 and second.counters["records"] == 13
    [info] = second.jobs()
    assert info.records == 20 and info.step == 19
    expected, plateau = _reference(tmp_path, {"metrics.jsonl": _jsonl(range(0, 20))})
    assert _decisions(run) == expected
    assert _ids(run) == list(range(1, len(expected) + 1))
    assert info.engine is not None and info.engine.plateau_bad_evaluations == plateau
    second.stop()


def test_without_persistence_a_restart_reads_everything_again(tmp_path: Path) -> None:
    """The control: with persist=False the second watcher feeds the whole file again (and writes no decision twice)."""
    root, run, state = _live_run(tmp_path)
    (run / "metrics.jsonl").write_text(_jsonl(range(0, 7)))
    _watcher(root, state, persist=False).scan_once()
    _append(run / "metrics.jsonl", _jsonl(range(7, 20)))
    again = _watcher(root, state, persist=False)
    assert again.scan_once() == 20
    assert again.counters["resumed"] == 0 and not (state / STATE_FILE).exists()
    assert _ids(run) == sorted(set(_ids(run)))


def test_csv_run_resumes_after_its_header(tmp_path: Path) -> None:
    """A CSV file resumes mid-file with the header read before the restart."""
    root, run, state = _live_run(tmp_path)
    header = "step,loss,acc\n"
    rows = [f"{s},1.0,{s / 100}\n" for s in range(12)]
    (run / "log.csv").write_text(header + "".join(rows[:5]))
    first = _watcher(root, state)
    assert first.scan_once() == 5
    first.stop()
    _append(run / "log.csv", "".join(rows[5:]))
    second = _watcher(root, state)
    assert second.scan_once() == 7
    [info] = second.jobs()
    assert info.malformed == 0 and info.last_values == {"loss": 1.0, "acc": 0.11}
    expected, _ = _reference(tmp_path, {"log.csv": header + "".join(rows)})
    assert _decisions(run) == expected
    second.stop()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("truncate", "it has 144 bytes, 360 had been read"),
        ("replace", "another file now has its name"),
        ("rewrite", "its first 360 bytes differ"),
    ],
)
def test_a_file_changed_while_stopped_is_read_again_from_the_start(
    tmp_path: Path, change: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A file truncated, replaced (new inode) or rewritten in place while the watcher was stopped is re-read from the start, logged; the engine and decision ids continue."""
    root, run, state = _live_run(tmp_path)
    metrics = run / "metrics.jsonl"
    metrics.write_text(_jsonl(range(0, 10)))
    assert len(metrics.read_bytes()) == 360
    first = _watcher(root, state)
    assert first.scan_once() == 10
    first.stop()
    written = _ids(run)

    if change == "truncate":
        metrics.write_text(_jsonl(range(0, 4)))
        new_records = 4
    elif change == "replace":
        other = run / "metrics.tmp"
        other.write_text(_jsonl(range(100, 115)))
        os.replace(other, metrics)
        new_records = 15
    else:  # same inode, longer, other content
        inode = metrics.stat().st_ino
        metrics.write_text(_jsonl(range(100, 115), loss=lambda s: 2.0))
        assert metrics.stat().st_ino == inode
        new_records = 15

    caplog.set_level(logging.INFO, logger="lrpilot.watch")
    second = _watcher(root, state)
    assert second.scan_once() == new_records
    assert second.counters["changed"] == 1 and second.counters["resumed"] == 1
    assert (
        f"{metrics}: file changed while the watcher was stopped ({reason}): "
        "reading it again from the start"
    ) in caplog.text
    [info] = second.jobs()
    assert info.records == 10 + new_records
    ids = _ids(run)
    assert ids[: len(written)] == written and ids == list(range(1, len(ids) + 1))
    second.stop()


def test_one_transaction_per_scan(tmp_path: Path) -> None:
    """A scan of 1000 records of three runs saves once, every run in the same write."""
    root = tmp_path / "live"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        (root / name / "m.jsonl").write_text(_jsonl(range(0, 1000 if name == "a" else 10)))
    saves: list[list[str]] = []

    class CountingState(WatchState):
        def save(self, runs: Sequence[SavedRun], forget: Any = ()) -> None:
            saves.append(sorted(r.name for r in runs))
            super().save(runs, forget)

    watcher = _watcher(root, tmp_path / "state", state=CountingState(tmp_path / "state" / STATE_FILE))
    assert watcher.scan_once() == 1020
    assert saves == [["a", "b", "c"]]
    assert watcher.scan_once() == 0 and len(saves) == 1  # nothing new: nothing written
    watcher.stop()
    saved = WatchState(tmp_path / "state" / STATE_FILE).load()
    assert sorted(r.name for r in saved.values()) == ["a", "b", "c"]
    [a] = [r for r in saved.values() if r.name == "a"]
    assert a.records == 1000 and [f.name for f in a.files] == ["m.jsonl"]
    assert a.files[0].position["line"] == 1000


def test_unusable_saved_engine_means_reading_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the saved engine does not fit the current policy, the run is read from the start and no decision id is written twice."""
    root, run, state = _live_run(tmp_path)
    (run / "metrics.jsonl").write_text(_jsonl(range(0, 7)))
    first = _watcher(root, state)
    first.scan_once()
    first.stop()
    other = {"kind": "keras_reduce_on_plateau", "monitor": "loss", "patience": 1}
    caplog.set_level(logging.WARNING, logger="lrpilot.watch")
    second = Watcher(_config(root, state, policy=other), tensorboard=False)
    assert second.scan_once() == 7
    assert "cannot continue from the saved state" in caplog.text
    assert second.counters["resumed"] == 0
    assert _ids(run) == sorted(set(_ids(run)))
    second.stop()


def test_a_run_deleted_while_stopped_is_forgotten(tmp_path: Path) -> None:
    """The state of a run whose directory was deleted (its watched root still there) is dropped at the next start."""
    root = tmp_path / "live"
    for name in ("keep", "gone"):
        (root / name).mkdir(parents=True)
        (root / name / "m.jsonl").write_text(_jsonl(range(0, 3)))
    state = tmp_path / "state"
    first = _watcher(root, state)
    first.scan_once()
    first.stop()
    shutil.rmtree(root / "gone")
    second = _watcher(root, state)
    assert second.scan_once() == 0
    second.stop()
    assert [r.name for r in WatchState(state / STATE_FILE).load().values()] == ["keep"]


# ------------------------------------------------------------------------------ TensorBoard


def _write_steps(writer: Any, steps: range) -> None:
    for step in steps:
        writer.add_scalar("loss", 1.0, step)
        writer.add_scalar("train/lr", 0.1, step)
    writer.flush()


@pytest.mark.slow
def test_tensorboard_run_resumes_by_event_count(tmp_path: Path) -> None:
    """A SummaryWriter's event file, still being written, resumes after the events already fed; the step pending at the stop is fed once."""
    from torch.utils.tensorboard import SummaryWriter

    root, run, state = _live_run(tmp_path)
    writer = SummaryWriter(str(run))
    try:
        _write_steps(writer, range(0, 7))
        first = _watcher(root, state)
        assert first.scan_once() == 6  # step 6 waits for a later step or an idle scan
        first.stop()
        _write_steps(writer, range(7, 14))
        second = _watcher(root, state)
        assert second.scan_once() == 7  # steps 6..12, none of 0..5 again
        assert second.scan_once() == 1  # step 13, after an idle scan
        assert second.counters["resumed"] == 1 and second.counters["changed"] == 0
        [info] = second.jobs()
        assert info.records == 14 and info.step == 13
        second.stop()
    finally:
        writer.close()
    [event_file] = [p for p in run.iterdir() if p.name.startswith("events.out.tfevents.")]
    expected, _ = _reference(tmp_path, {event_file.name: event_file.read_bytes()})
    assert _decisions(run) == expected and len(expected) == 6


# ------------------------------------------------------------------------------ the daemon


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
def test_daemon_restart_with_the_same_state_dir_continues_watched_runs(tmp_path: Path) -> None:
    """A daemon restarted on the same storage.state_dir continues a watched run: 13 records fed after the restart, not 20, and the same decisions as one uninterrupted run."""
    root, run, state = _live_run(tmp_path)
    config = _config(root, state, poll=0.1).model_copy(
        update={"server": Config().server.model_copy(update={"port": 0})}
    )
    (run / "metrics.jsonl").write_text(_jsonl(range(0, 7)))

    async def serve_until(records: int) -> dict[str, int]:
        daemon = Daemon(config, watch_config=False)
        await daemon.start()
        try:
            watcher = daemon.file_watcher
            assert watcher is not None
            for _ in range(1000):
                jobs = watcher.jobs()
                if jobs and jobs[0].records == records:
                    break
                await asyncio.sleep(0.02)
            counters = dict(watcher.counters)
        finally:
            await daemon.stop()
        return counters

    first = asyncio.run(serve_until(7))
    assert first["records"] == 7 and first["resumed"] == 0
    _append(run / "metrics.jsonl", _jsonl(range(7, 20)))
    second = asyncio.run(serve_until(20))
    assert second["records"] == 13 and second["resumed"] == 1
    assert (state / STATE_FILE).is_file() and (state / "lrpilot.sqlite3").is_file()
    expected, _ = _reference(tmp_path, {"metrics.jsonl": _jsonl(range(0, 20))})
    assert _decisions(run) == expected
