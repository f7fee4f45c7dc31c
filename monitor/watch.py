"""Watch mode: follow jobs that only write log files, and steer them through a decisions file.

The watcher is a shell around the pure engine, like the websocket server: it turns growing
files into :class:`~monitor.engine.events.Metrics` records, feeds one
:class:`~monitor.engine.job.JobEngine` per run and writes the decisions beside the run. The
user-facing description (formats, names, limits) is docs/watch-mode.md.

Runs and names
    Every directory under a watched root (``watch.dirs``, recursively) that holds a metric
    file is a *run*: ``*.jsonl`` (except our own ``lrpilot-decisions.jsonl``), ``*.csv`` or
    TensorBoard event files (``events.out.tfevents.*``). Its job name is its path relative to
    the root, with ``/`` separators (the root itself is named after its last component). When
    two roots give the same name, the later run's name is prefixed with its root's name.
    Directories named ``lrpilot`` (our TensorBoard output) and hidden ones are skipped.

Reading
    Line files are followed by byte offset; only complete lines are parsed, a partial last
    line waits for its newline. A file smaller than its offset was truncated: it is re-read
    from the start. A path whose inode changed was rotated: the rest of the old file is read
    from the handle still open, then the new file from the start. A deleted file is drained
    the same way and forgotten. TensorBoard files are read with tensorboard's resuming
    ``EventFileLoader``; scalars are grouped by step, and a step is fed once a later step
    appears or the file has had nothing new for one scan.

    Every malformed line is logged with file and line, counted, and skipped. Nothing read
    from a file stops the watcher.

Engine and output
    The spec is ``config.job_spec_for(name, {}, None)``. The initial LR comes from
    ``lrpilot.json`` in the run directory (``{"initial_lr": [0.1, 0.01]}`` or a number), else
    from the first record's ``lr``/``learning_rate`` metric (also ``train/lr`` style tags,
    any metric whose last ``/`` component is one of those), else ``watch.default_initial_lr``
    when the config has it, else :data:`DEFAULT_INITIAL_LR`. Decisions are appended to
    ``<run>/lrpilot-decisions.jsonl`` (``Decision.to_dict()`` plus ``"time"``, non-finite
    floats as strings), and TensorBoard output goes to ``<run>/lrpilot`` for every watched
    run (pass ``tensorboard=False`` to turn it off).

Restarts
    Each run's engine (``JobEngine.state_dict()``) and the position of each of its files are
    saved together in ``<storage.state_dir>/lrpilot-watch.sqlite3`` (``monitor.watchstate``):
    once per ``save_interval`` while the worker runs, after a synchronous :meth:`scan_once`,
    and at :meth:`stop`. A restarted watcher continues each run from there and feeds only what
    was written since: line files from their byte offset (with the CSV header saved), event
    files after the number of events already fed (tensorboard's reader cannot seek; the step
    still pending at the save is read again). A file whose inode, size or first bytes show it
    was replaced or truncated meanwhile is read again from the start (logged, counter
    ``changed``); a saved engine that does not fit the current policy is dropped and the run
    re-read. The engine is deterministic, so re-read records give the same decisions with the
    same ids: decisions whose id is already in the file are not written again, and TensorBoard
    points at or before the last step already in ``<run>/lrpilot`` are not rewritten.

Threads
    :meth:`Watcher.start` runs a worker thread that scans every ``watch.poll_seconds`` and
    sooner when the watchdog observer reports a change (inotify events can be missed, so the
    polling never stops). Engines are touched only by the worker, under :attr:`Watcher.lock`;
    :meth:`Watcher.jobs` and :meth:`Watcher.views` copy what other threads need under it.
    :meth:`Watcher.scan_once` does one synchronous pass, for tests and for callers that bring
    their own loop.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .config import Config, ConfigError
from .engine.events import CheckpointSaved, Decision, Metrics, Output
from .engine.job import JobEngine
from .readers import RecordError, _csv_row, record_from_mapping
from .replay import jsonable
from .tboutput import TensorBoardOutput
from .watchstate import STATE_FILE, SavedFile, SavedRun, WatchState

__all__ = [
    "DECISIONS_FILE",
    "DEFAULT_INITIAL_LR",
    "OUTPUT_DIR",
    "RUN_CONFIG_FILE",
    "RunInfo",
    "Watcher",
]

log = logging.getLogger("lrpilot.watch")

DECISIONS_FILE = "lrpilot-decisions.jsonl"
RUN_CONFIG_FILE = "lrpilot.json"
OUTPUT_DIR = "lrpilot"
DEFAULT_INITIAL_LR = 1e-3
TFEVENTS_PREFIX = "events.out.tfevents."

#: bytes of a line file read per pass before other files get their turn
READ_CHUNK_BYTES = 1 << 20
#: TensorBoard events read per pass before other files get their turn
READ_CHUNK_EVENTS = 5000
#: malformed-record messages kept per run (all are counted)
KEPT_ERRORS = 20
#: bytes at the start of a file whose hash tells, after a restart, whether it is the same file
HEAD_BYTES = 4096
#: seconds between saves of the watch state while the worker thread runs
SAVE_INTERVAL_SECONDS = 1.0

Item = tuple[int, Metrics | CheckpointSaved | RecordError]
Note = Literal["truncated", "rotated", "deleted", "changed"]


def _head_digest(fd: int, size: int) -> str:
    """The hash of the first ``size`` bytes of an open file (without moving its position)."""
    return hashlib.sha256(os.pread(fd, size, 0)).hexdigest()


def _change_since(saved: Mapping[str, Any], fd: int, read_to: int) -> str | None:
    """Why the open file ``fd`` is not the one a previous watcher read to ``read_to`` bytes
    (its position ``saved``), or None when it is the same file, grown or not."""
    st = os.fstat(fd)
    if st.st_ino != saved.get("inode"):
        return "another file now has its name"
    if st.st_size < read_to:
        return f"it has {st.st_size} bytes, {read_to} had been read"
    head = int(saved.get("head_bytes", 0))
    if head and _head_digest(fd, head) != saved.get("head"):
        return f"its first {head} bytes differ"
    return None


# --------------------------------------------------------------------------------------------
# Sources: one followed file each
# --------------------------------------------------------------------------------------------


class _LineFile:
    """A JSONL or CSV file followed by byte offset, complete lines only."""

    def __init__(self, path: Path, kind: Literal["jsonl", "csv"]) -> None:
        self.path = path
        self.kind = kind
        self._handle: BinaryIO | None = None
        self._inode: int | None = None
        self._resume: dict[str, Any] | None = None
        self.change_reason = ""
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.line = 0
        self._header: list[str] | None = None
        self._bad_header = False
        self._skipping_long_line = False

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def resume_from(self, position: Mapping[str, Any]) -> None:
        """Continue where a previous watcher stopped (checked against the file when opened)."""
        self._resume = dict(position)

    def position(self) -> dict[str, Any] | None:
        """Where reading resumes after a restart: offset, line, CSV header, file identity."""
        if self._resume is not None:  # not opened since the restart: still the saved one
            return dict(self._resume)
        if self._handle is None:
            return None
        head = min(self.offset, HEAD_BYTES)
        return {
            "inode": self._inode,
            "offset": self.offset,
            "line": self.line,
            "header": self._header,
            "bad_header": self._bad_header,
            "skipping_long_line": self._skipping_long_line,
            "head_bytes": head,
            "head": _head_digest(self._handle.fileno(), head),
        }

    def _apply_resume(self) -> list[Note]:
        assert self._handle is not None and self._resume is not None
        saved, self._resume = self._resume, None
        reason = _change_since(saved, self._handle.fileno(), int(saved["offset"]))
        if reason is not None:
            self.change_reason = reason
            return ["changed"]
        self.offset = int(saved["offset"])
        self.line = int(saved["line"])
        self._header = saved.get("header")
        self._bad_header = bool(saved.get("bad_header"))
        self._skipping_long_line = bool(saved.get("skipping_long_line"))
        return []

    def poll(self, max_bytes: int) -> tuple[list[Item], list[Note], bool]:
        """New records; what happened to the file; whether more data may be waiting."""
        notes: list[Note] = []
        items: list[Item] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._handle is not None:
                items = self._drain()
                self.close()
            notes.append("deleted")
            return items, notes, False
        if self._handle is not None and st.st_ino != self._inode:
            items = self._drain()
            self.close()
            self._reset()
            notes.append("rotated")
        if self._handle is None:
            self._handle = open(self.path, "rb")  # noqa: SIM115 (kept open to drain after a rotation)
            self._inode = os.fstat(self._handle.fileno()).st_ino
            if self._resume is not None:
                notes.extend(self._apply_resume())
        elif st.st_size < self.offset:
            self._reset()
            notes.append("truncated")
        if st.st_size == self.offset:
            return items, notes, False
        self._handle.seek(self.offset)
        data = self._handle.read(max_bytes)
        more = len(data) == max_bytes
        items.extend(self._consume(data, final=False, full_chunk=more))
        return items, notes, more

    def _drain(self) -> list[Item]:
        """Everything left in the open handle; a last line without newline counts as complete."""
        assert self._handle is not None
        self._handle.seek(self.offset)
        return self._consume(self._handle.read(), final=True, full_chunk=False)

    def _consume(self, data: bytes, final: bool, full_chunk: bool) -> list[Item]:
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: a partial line, or b""
        if final and tail:
            lines.append(tail)
            tail = b""
        items: list[Item] = []
        for raw in lines:
            self.offset += len(raw) + 1
            self.line += 1
            if self._skipping_long_line:
                self._skipping_long_line = False
                continue
            item = self._parse(raw)
            if item is not None:
                items.append(item)
        if final:
            self.offset += len(tail)
        elif full_chunk and not lines and tail:
            # one line longer than a whole chunk: report it once and skip to its newline
            self.offset += len(tail)
            if not self._skipping_long_line:
                self._skipping_long_line = True
                number = self.line + 1
                message = f"line longer than {len(tail)} bytes, skipped"
                items.append((number, RecordError(str(self.path), number, message)))
        return items

    def _error(self, message: str) -> RecordError:
        return RecordError(str(self.path), self.line, message)

    def _parse(self, raw: bytes) -> Item | None:
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            return self.line, self._error(f"not UTF-8 at byte {exc.start}")
        if not text.strip():
            return None
        if self.kind == "jsonl":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                return self.line, self._error(f"invalid JSON: {exc.msg} at column {exc.colno}")
        else:
            try:
                row = next(csv.reader([text]))
            except csv.Error as exc:
                return self.line, self._error(f"invalid CSV: {exc}")
            if self._header is None:
                if self._bad_header:
                    return None
                header = [h.strip() for h in row]
                if "step" not in header:
                    self._bad_header = True
                    return self.line, self._error(
                        f"header has no 'step' column: {header}; file ignored"
                    )
                self._header = header
                return None
            if self._bad_header:
                return None
            if len(row) != len(self._header):
                return self.line, self._error(f"expected {len(self._header)} cells, got {len(row)}")
            try:
                data = _csv_row(self._header, row)
            except ValueError as exc:
                return self.line, self._error(str(exc))
        try:
            return self.line, record_from_mapping(data)
        except ValueError as exc:
            return self.line, self._error(str(exc))


class _EventFile:
    """A TensorBoard event file read incrementally; scalars grouped into one record per step."""

    kind = "tensorboard"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loader: Any = None
        self._inode: int | None = None
        self._size = 0
        self.records = 0
        self._pending_step: int | None = None
        self._pending: dict[str, float] = {}
        self._pending_time: float | None = None
        # tensorboard's reader cannot start at a byte offset (its pure-Python reader refuses
        # start_offset), so a restart resumes by event count: the events a previous watcher
        # fed are read again but skipped, not fed
        self.events = 0  # events read since the loader was opened
        self._skip = 0  # events still to pass over when resuming
        self._pending_from: int | None = None  # index of the first event of the pending step
        self._resume: dict[str, Any] | None = None
        self.change_reason = ""

    def close(self) -> None:
        self._loader = None

    def resume_from(self, position: Mapping[str, Any]) -> None:
        """Continue where a previous watcher stopped (checked against the file when opened)."""
        self._resume = dict(position)

    def position(self) -> dict[str, Any] | None:
        """Where reading resumes after a restart: the events fed so far, file identity.

        The events of a step still pending (not fed yet) are not counted: a restarted
        watcher reads them again.
        """
        if self._resume is not None:
            return dict(self._resume)
        if self._loader is None:
            return None
        fed = self._pending_from if self._pending_from is not None else self.events + self._skip
        try:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_ino != self._inode:
                    return None  # replaced since the last read: start over next time
                head = min(self._size, HEAD_BYTES)
                digest = _head_digest(handle.fileno(), head)
        except OSError:
            return None
        return {
            "inode": self._inode,
            "size": self._size,
            "events": fed,
            "records": self.records,
            "head_bytes": head,
            "head": digest,
        }

    def _apply_resume(self) -> list[Note]:
        assert self._resume is not None
        saved, self._resume = self._resume, None
        try:
            with open(self.path, "rb") as handle:
                reason = _change_since(saved, handle.fileno(), int(saved["size"]))
        except OSError as exc:
            reason = f"cannot check it: {exc.strerror or exc}"
        if reason is not None:
            self.change_reason = reason
            return ["changed"]
        self._skip = int(saved["events"])
        self.records = int(saved["records"])
        return []

    def poll(self, max_events: int) -> tuple[list[Item], list[Note], bool]:
        notes: list[Note] = []
        items: list[Item] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            items.extend(self._flush())
            self.close()
            notes.append("deleted")
            return items, notes, False
        if self._loader is not None and st.st_ino != self._inode:
            notes.append("rotated")
        elif self._loader is not None and st.st_size < self._size:
            notes.append("truncated")
        if notes:
            items.extend(self._flush())
            self._loader = None
        if self._loader is None:
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

            self._loader = EventFileLoader(str(self.path))
            self._inode = st.st_ino
            self.events, self._skip, self._pending_from = 0, 0, None
            if self._resume is not None:
                notes.extend(self._apply_resume())
        self._size = st.st_size
        count = 0
        try:
            for event in itertools.islice(self._loader.Load(), max_events):
                count += 1
                self.events += 1
                if self._skip:
                    self._skip -= 1
                    continue
                items.extend(self._add(event))
        except Exception as exc:  # the reader raises several kinds on corrupt data
            self.records += 1
            items.append(
                (
                    self.records,
                    RecordError(
                        str(self.path), self.records, f"cannot read TensorBoard event: {exc}"
                    ),
                )
            )
            self._loader = None  # reopen from the start next time; already-fed steps repeat
            return items, notes, False
        if count == 0:
            items.extend(self._flush())  # idle for a whole scan: the pending step is complete
        return items, notes, count == max_events

    def _add(self, event: Any) -> list[Item]:
        values: dict[str, float] = {}
        for value in event.summary.value:
            number = _scalar_value(value)
            if number is not None:
                values[value.tag] = number
        if not values:
            return []
        out: list[Item] = []
        if self._pending_step is not None and event.step != self._pending_step:
            out.extend(self._flush())
        if self._pending_step is None:
            self._pending_from = self.events - 1
        self._pending_step = event.step
        self._pending.update(values)
        if self._pending_time is None:
            self._pending_time = float(event.wall_time)
        return out

    def _flush(self) -> list[Item]:
        if self._pending_step is None:
            return []
        self.records += 1
        record = Metrics(self._pending_step, dict(self._pending), time=self._pending_time)
        self._pending_step, self._pending, self._pending_time = None, {}, None
        self._pending_from = None
        return [(self.records, record)]


def _scalar_value(value: Any) -> float | None:
    """A summary value's number, if it is a scalar (simple_value or a one-element tensor)."""
    which = value.WhichOneof("value")
    if which == "simple_value":
        return float(value.simple_value)
    if which != "tensor":
        return None
    plugin = value.metadata.plugin_data.plugin_name
    if plugin not in ("", "scalars"):
        return None
    tensor = value.tensor
    if tensor.string_val or any(d.size != 1 for d in tensor.tensor_shape.dim):
        return None
    from tensorboard.util import tensor_util

    try:
        array = tensor_util.make_ndarray(tensor)
    except Exception:
        return None
    if array.size != 1 or array.dtype.kind not in "fiub":
        return None
    return float(array.reshape(-1)[0])


Source = _LineFile | _EventFile


def _source_kind(name: str) -> Literal["jsonl", "csv", "tensorboard"] | None:
    if name.startswith(TFEVENTS_PREFIX):
        return "tensorboard"
    lower = name.lower()
    if lower.endswith(".jsonl") and name != DECISIONS_FILE:
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    return None


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Run:
    name: str
    directory: Path
    root: Path
    sources: dict[Path, Source] = field(default_factory=dict)
    engine: JobEngine | None = None
    failed: str | None = None  # why no engine can be built (a config error)
    initial_lrs: tuple[float, ...] | None = None
    journaled_id: int = 0  # decisions up to this id are already in the decisions file
    last_seen: float | None = None
    records: int = 0
    malformed: int = 0
    decisions_written: int = 0
    errors: deque[str] = field(default_factory=lambda: deque(maxlen=KEPT_ERRORS))
    gone: bool = False
    key: str = ""  # the resolved directory: the run's identity in the watch state
    resume_files: dict[str, SavedFile] = field(default_factory=dict)  # by file name


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A copy of one watched run's state, safe to read from any thread.

    ``engine`` is the live engine (None until the first record): read it only while holding
    :attr:`Watcher.lock`. ``errors`` holds the latest malformed-record messages, each naming
    the file and line.
    """

    name: str
    directory: Path
    engine: JobEngine | None
    lrs: tuple[float, ...]
    last_values: Mapping[str, float]
    last_seen: float | None
    step: int | None
    state: str
    records: int
    malformed: int
    decisions_written: int
    files: tuple[Path, ...]
    errors: tuple[str, ...]


class Watcher:
    """Follows the runs under ``config.watch.dirs`` and steers them through decision files.

    ``on_update(job_name, outputs)`` is called from the scanning thread after every batch of
    records of a run (``outputs`` may be empty); an exception it raises is logged and counted.
    ``clock`` gives wall-clock seconds for last-seen times and the decisions' ``"time"``.

    ``state`` keeps each run's engine and file positions across restarts (default: the file
    :data:`~monitor.watchstate.STATE_FILE` in ``config.storage.state_dir``; ``persist=False``
    for none). It is saved every ``save_interval`` seconds while the worker thread runs, after
    every :meth:`scan_once` called without it, and by :meth:`stop`.
    """

    def __init__(
        self,
        config: Config,
        on_update: Callable[[str, list[Output]], None] | None = None,
        clock: Callable[[], float] = time.time,
        *,
        tensorboard: bool = True,
        min_scan_interval: float = 0.05,
        persist: bool = True,
        state: WatchState | None = None,
        save_interval: float = SAVE_INTERVAL_SECONDS,
    ) -> None:
        self.config = config
        self.on_update = on_update
        self.clock = clock
        self.min_scan_interval = min_scan_interval
        self.lock = threading.RLock()
        self.counters: dict[str, int] = {
            "runs": 0,
            "records": 0,
            "malformed": 0,
            "truncated": 0,
            "rotated": 0,
            "deleted": 0,
            "decisions": 0,
            "write_errors": 0,
            "read_errors": 0,
            "callback_errors": 0,
            "engine_errors": 0,
            "changed": 0,
            "resumed": 0,
            "state_errors": 0,
        }
        self.tb = TensorBoardOutput(Path(OUTPUT_DIR), clock=clock) if tensorboard else None
        self._runs: dict[Path, _Run] = {}
        self._names: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        if state is None and persist:
            state = WatchState(Path(config.storage.state_dir) / STATE_FILE)
        self.state = state
        self.save_interval = save_interval
        self._saved: dict[str, SavedRun] | None = None  # loaded at the first scan
        self._dirty: set[Path] = set()  # runs fed since the last save
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ views

    @property
    def roots(self) -> list[Path]:
        return [Path(d) for d in self.config.watch.dirs]

    def jobs(self) -> list[RunInfo]:
        """A copy of every run's state, in discovery order."""
        with self.lock:
            return [self._info(run) for run in self._runs.values()]

    def job(self, name: str) -> RunInfo | None:
        """One run's state by job name."""
        with self.lock:
            for run in self._runs.values():
                if run.name == name:
                    return self._info(run)
        return None

    def views(self) -> list[Any]:
        """One :class:`monitor.exporter.JobView` per run that has an engine (scrape time)."""
        from .exporter import JobView

        out = []
        with self.lock:
            for run in self._runs.values():
                eng = run.engine
                if eng is None:
                    continue
                decisions: dict[tuple[str, str], int] = {}
                for key, n in eng.decision_counts.items():
                    kind, _, source = key.partition(":")
                    decisions[(kind, source)] = n
                detections = {d.name: 0 for d in eng.spec.detectors}
                detections.update(eng.detection_counts)
                out.append(
                    JobView(
                        name=run.name,
                        state=self._state(run),
                        lrs=tuple(eng.lrs),
                        min_lrs=tuple(eng.min_lrs),
                        metric_values=dict(eng.last_values),
                        detections=detections,
                        decisions=decisions,
                        nonfinite=dict(eng.nonfinite_counts),
                        plateau_bad_evaluations=eng.plateau_bad_evaluations,
                        last_seen=run.last_seen,
                        step=eng.last_step,
                    )
                )
        return out

    def _state(self, run: _Run) -> str:
        if run.engine is not None and run.engine.halted:
            return "halted"
        if run.gone:
            return "finished"
        if (
            run.last_seen is not None
            and self.clock() - run.last_seen > self.config.server.stale_after_seconds
        ):
            return "stale"
        return "running"

    def _info(self, run: _Run) -> RunInfo:
        eng = run.engine
        return RunInfo(
            name=run.name,
            directory=run.directory,
            engine=eng,
            lrs=tuple(eng.lrs) if eng is not None else (),
            last_values=dict(eng.last_values) if eng is not None else {},
            last_seen=run.last_seen,
            step=eng.last_step if eng is not None else None,
            state=self._state(run),
            records=run.records,
            malformed=run.malformed,
            decisions_written=run.decisions_written,
            files=tuple(run.sources),
            errors=tuple(run.errors),
        )

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        """Scan now and then in a worker thread; also start the watchdog observer."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="lrpilot-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker and the observer; flush and close the TensorBoard files."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout=timeout)
            except Exception:
                log.exception("stopping the watchdog observer failed")
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        self.save()
        with self.lock:
            for run in self._runs.values():
                for source in run.sources.values():
                    source.close()
            if self.tb is not None:
                self.tb.close_all()
        if self.state is not None:
            self.state.close()

    def wake(self) -> None:
        """Scan soon (the observer calls this on every file event)."""
        self._wake.set()

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in ("opened", "closed_no_write"):
                    watcher.wake()

        observer = Observer()
        observer.daemon = True
        scheduled = 0
        for root in self.roots:
            try:
                observer.schedule(_Handler(), str(root), recursive=True)
                scheduled += 1
            except Exception as exc:  # a missing root: polling still finds it once it exists
                log.warning("watch: cannot watch %s for events (%s); polling it instead", root, exc)
        if scheduled:
            observer.start()
            self._observer = observer

    def _loop(self) -> None:
        poll = self.config.watch.poll_seconds
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.scan_once()
            except Exception:  # a bug, not bad input: log it and keep watching
                log.exception("watch: scan failed")
            if self.tb is not None:
                with self.lock:
                    self.tb.flush()
            self._wake.wait(poll)
            self._wake.clear()
            # events come in bursts (one per write): let them settle into one scan
            rest = self.min_scan_interval - (time.monotonic() - started)
            if rest > 0 and not self._stop.is_set():
                self._stop.wait(rest)

    # ------------------------------------------------------------------ scanning

    def scan_once(self) -> int:
        """Discover runs and read every file to its end; return the number of records fed."""
        self._discover()
        fed = 0
        pending = [(run, path) for run in list(self._runs.values()) for path in list(run.sources)]
        while pending and not (self._thread is not None and self._stop.is_set()):
            again = []
            for run, path in pending:
                n, more = self._read(run, path)
                fed += n
                if more:
                    again.append((run, path))
            pending = again
        if self.tb is not None and self._thread is None:
            with self.lock:
                self.tb.flush()
        self.save(force=self._thread is None)
        return fed

    def _discover(self) -> None:
        for root in self.roots:
            for directory, files in _walk(root):
                kinds = [(name, _source_kind(name)) for name in files]
                metric_files = [(name, kind) for name, kind in kinds if kind is not None]
                run = self._runs.get(directory)
                if run is None:
                    if not metric_files:
                        continue
                    run = self._new_run(root, directory)
                for name, kind in metric_files:
                    path = directory / name
                    if path in run.sources:
                        continue
                    source: Source = (
                        _EventFile(path) if kind == "tensorboard" else _LineFile(path, kind)
                    )
                    saved = run.resume_files.pop(name, None)
                    if saved is not None and saved.kind == source.kind:
                        source.resume_from(saved.position)
                    with self.lock:
                        run.sources[path] = source
                        run.gone = False
                    log.info("watch: %s: following %s", run.name, path)

    def _new_run(self, root: Path, directory: Path) -> _Run:
        name = _run_name(root, directory)
        if name in self._names:
            name = f"{root.resolve().name}/{name}"
        self._names.add(name)
        run = _Run(name, directory, root, key=str(directory.resolve()))
        run.journaled_id = _last_journaled_id(directory / DECISIONS_FILE)
        saved = self._saved_runs().pop(run.key, None)
        if saved is not None:
            self._restore(run, saved)
        if self.tb is not None:
            output = directory / OUTPUT_DIR
            with self.lock:
                self.tb.set_directory(name, output, skip_through_step=_last_step_in(output))
        with self.lock:
            self._runs[directory] = run
        self.counters["runs"] += 1
        log.info("watch: new run %r in %s", name, directory)
        return run

    def _restore(self, run: _Run, saved: SavedRun) -> None:
        """Continue ``run`` from its saved engine; its files resume from their positions."""
        try:
            spec = self.config.job_spec_for(run.name, {}, None)
            engine = JobEngine.from_state(spec, saved.engine)
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            self.counters["state_errors"] += 1
            log.warning(
                "watch: %s: cannot continue from the saved state (%s): reading its files from "
                "the start",
                run.name,
                exc,
            )
            return
        run.engine = engine
        run.records = saved.records
        run.malformed = saved.malformed
        run.last_seen = saved.last_seen
        run.resume_files = {f.name: f for f in saved.files}
        self.counters["resumed"] += 1
        log.info(
            "watch: %s: continuing from the saved state: %d records fed up to step %s; %d file(s) "
            "resume where they were read to",
            run.name,
            run.records,
            engine.last_step,
            len(saved.files),
        )

    def _saved_runs(self) -> dict[str, SavedRun]:
        """The saved runs not yet claimed by a discovered run (read at the first call)."""
        if self._saved is not None:
            return self._saved
        self._saved = {}
        if self.state is None:
            return self._saved
        try:
            self._saved = self.state.load()
        except (sqlite3.Error, OSError, ValueError) as exc:
            self.counters["state_errors"] += 1
            log.error(
                "watch: cannot read the watch state %s (%s): runs are read from the start",
                self.state.path,
                exc,
            )
            return self._saved
        # a run deleted while the watcher was stopped; a missing root may be an unmounted
        # filesystem, whose runs are kept
        roots = [r.resolve() for r in self.roots if r.is_dir()]
        deleted = [
            key
            for key in self._saved
            if not Path(key).exists() and any(Path(key).is_relative_to(r) for r in roots)
        ]
        for key in deleted:
            del self._saved[key]
        if deleted:
            self._write_state([], deleted)
        return self._saved

    def save(self, force: bool = True) -> None:
        """Save the runs fed since the last save (engines and file positions), in one
        transaction; unless ``force``, only when ``save_interval`` has passed."""
        if self.state is None:
            return
        now = time.monotonic()
        if not force and now - self._last_save < self.save_interval:
            return
        self._last_save = now
        with self.lock:
            dirty, self._dirty = self._dirty, set()
            runs: list[SavedRun] = []
            gone: list[str] = []
            for directory in dirty:
                run = self._runs.get(directory)
                if run is None:
                    continue
                if run.gone:
                    gone.append(run.key)
                elif run.engine is not None:  # no engine yet: nothing to continue from
                    runs.append(self._snapshot(run, run.engine))
        if (runs or gone) and not self._write_state(runs, gone):
            with self.lock:
                self._dirty |= dirty

    def _snapshot(self, run: _Run, engine: JobEngine) -> SavedRun:
        files = []
        for path, source in run.sources.items():
            position = source.position()
            if position is not None:  # unknown: that file is read from the start next time
                files.append(SavedFile(path.name, source.kind, position))
        return SavedRun(
            directory=run.key,
            name=run.name,
            engine=engine.state_dict(),
            records=run.records,
            malformed=run.malformed,
            last_seen=run.last_seen,
            files=tuple(files),
        )

    def _write_state(self, runs: list[SavedRun], gone: list[str]) -> bool:
        assert self.state is not None
        try:
            self.state.save(runs, gone)
        except (sqlite3.Error, OSError) as exc:
            self.counters["state_errors"] += 1
            log.error(
                "watch: cannot save the watch state to %s (%s); retrying at the next save",
                self.state.path,
                exc,
            )
            return False
        return True

    def _read(self, run: _Run, path: Path) -> tuple[int, bool]:
        source = run.sources[path]
        try:
            if isinstance(source, _LineFile):
                items, notes, more = source.poll(READ_CHUNK_BYTES)
            else:
                items, notes, more = source.poll(READ_CHUNK_EVENTS)
        except OSError as exc:
            self.counters["read_errors"] += 1
            log.warning("watch: %s: cannot read: %s", path, exc.strerror or exc)
            return 0, False
        for note in notes:
            self.counters[note] += 1
            message = {
                "truncated": "file shrank (truncated): reading it again from the start",
                "rotated": "file replaced (rotated): reading the new one from the start",
                "deleted": "file deleted: no longer followed",
                "changed": f"file changed while the watcher was stopped ({source.change_reason}): "
                "reading it again from the start",
            }[note]
            log.warning("watch: %s: %s", path, message)
        if items or notes:
            with self.lock:
                self._dirty.add(run.directory)
        if "deleted" in notes:
            source.close()
            with self.lock:
                del run.sources[path]
                if not run.sources and not run.directory.exists():
                    run.gone = True
        if not items:
            return 0, more
        with self.lock:
            fed, outputs = self._feed(run, items)
        if fed or outputs:
            self._notify(run.name, outputs)
        return fed, more

    def _feed(self, run: _Run, items: Sequence[Item]) -> tuple[int, list[Output]]:
        fed = 0
        all_outputs: list[Output] = []
        for _line, event in items:
            if isinstance(event, RecordError):
                run.malformed += 1
                self.counters["malformed"] += 1
                run.errors.append(str(event))
                log.warning("watch: %s: %s", run.name, event)
                continue
            if run.failed is not None:
                continue
            engine = run.engine or self._build_engine(run, event)
            if engine is None:
                continue
            try:
                outputs = engine.feed(event)
            except Exception:  # an engine bug must not stop the other runs
                self.counters["engine_errors"] += 1
                log.exception("watch: %s: the engine failed on a record", run.name)
                continue
            if run.engine is None:  # just built: the initial schedule comes first
                run.engine = engine
                outputs = [*engine.start(), *outputs]
            fed += 1
            run.records += 1
            self.counters["records"] += 1
            run.last_seen = self.clock()
            if outputs:
                self._write_decisions(run, [o for o in outputs if isinstance(o, Decision)])
                all_outputs.extend(outputs)
            if self.tb is not None and isinstance(event, Metrics) and event.rank == 0:
                self.tb.on_outputs(run.name, event.step, engine.lrs, outputs)
        return fed, all_outputs

    def _build_engine(self, run: _Run, first: Metrics | CheckpointSaved) -> JobEngine | None:
        lrs = _initial_lrs(run, first, self._default_lr())
        try:
            spec = self.config.job_spec_for(run.name, {}, None)
            return JobEngine(spec, lrs)
        except (ConfigError, ValueError) as exc:
            run.failed = str(exc)
            self.counters["engine_errors"] += 1
            log.error("watch: %s: cannot start an engine: %s", run.name, exc)
            return None

    def _default_lr(self) -> float:
        value = getattr(self.config.watch, "default_initial_lr", None)
        return DEFAULT_INITIAL_LR if value is None else float(value)

    def _write_decisions(self, run: _Run, decisions: list[Decision]) -> None:
        fresh = [d for d in decisions if d.id > run.journaled_id]
        if not fresh:
            return
        now = self.clock()
        text = "".join(
            json.dumps(jsonable({**d.to_dict(), "time": now}), allow_nan=False) + "\n"
            for d in fresh
        )
        try:
            with open(run.directory / DECISIONS_FILE, "a", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            self.counters["write_errors"] += 1
            log.error(
                "watch: %s: cannot write %s: %s", run.name, DECISIONS_FILE, exc.strerror or exc
            )
            return
        run.journaled_id = fresh[-1].id
        run.decisions_written += len(fresh)
        self.counters["decisions"] += len(fresh)
        for d in fresh:
            log.info("watch: %s: decision %d %s: %s", run.name, d.id, d.kind.value, d.reason)

    def _notify(self, name: str, outputs: list[Output]) -> None:
        if self.on_update is None:
            return
        try:
            self.on_update(name, outputs)
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("watch: on_update failed for %s", name)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Every directory under ``root`` with its file names, skipping hidden and output dirs."""

    def onerror(exc: OSError) -> None:
        log.debug("watch: cannot list %s: %s", exc.filename, exc.strerror)

    for directory, dirs, files in os.walk(root, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if d != OUTPUT_DIR and not d.startswith("."))
        yield Path(directory), sorted(files)


def _run_name(root: Path, directory: Path) -> str:
    relative = directory.relative_to(root)
    if relative == Path("."):
        return root.resolve().name or "run"
    return relative.as_posix()


def _initial_lrs(run: _Run, first: Metrics | CheckpointSaved, default: float) -> tuple[float, ...]:
    """From lrpilot.json, else the first record's lr metric, else ``default``."""
    path = run.directory / RUN_CONFIG_FILE
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            raw = data["initial_lr"]
            values = [raw] if isinstance(raw, (int, float)) else list(raw)
            lrs = tuple(float(x) for x in values)
            if lrs and all(math.isfinite(x) and x >= 0 for x in lrs):
                return lrs
            raise ValueError("expected non-negative finite numbers")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("watch: %s: ignoring %s: initial_lr: %s", run.name, path, exc)
    if isinstance(first, Metrics):
        for key, value in first.values.items():
            if (
                key.rsplit("/", 1)[-1] in ("lr", "learning_rate")
                and math.isfinite(value)
                and value >= 0
            ):
                return (value,)
    return (default,)


def _last_journaled_id(path: Path) -> int:
    """The largest decision id already in a decisions file (0 when none)."""
    last = 0
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    last = max(last, int(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("watch: cannot read %s: %s", path, exc.strerror or exc)
    return last


def _last_step_in(directory: Path) -> int | None:
    """The largest step in the event files of a previous run's TensorBoard output."""
    if not directory.is_dir():
        return None
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last: int | None = None
    for path in directory.glob(TFEVENTS_PREFIX + "*"):
        try:
            for event in EventFileLoader(str(path)).Load():
                if event.summary.value:
                    last = event.step if last is None else max(last, event.step)
        except Exception as exc:
            log.warning("watch: cannot read %s: %s", path, exc)
    return last
