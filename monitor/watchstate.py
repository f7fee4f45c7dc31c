"""Durable state of watch mode: each run's engine and how far each of its files was read.

One SQLite file, ``<storage.state_dir>/lrpilot-watch.sqlite3`` (stdlib ``sqlite3``, WAL mode),
beside the daemon's ``lrpilot.sqlite3`` but apart from it: the websocket jobs' store has its own
schema, writer thread and life cycle, and a watched run is not a websocket job (no run id, no
ranks, no acks). Two tables::

    watch_runs   directory (resolved path) -> job name, the engine's state_dict(),
                 record and malformed-record counts, last-seen time
    watch_files  (directory, file name)    -> kind and position: where reading resumes

A file's *position* is whatever its reader needs to continue (``monitor.watch`` defines it): a
byte offset and line number for JSONL/CSV (with the CSV header), a count of events for
TensorBoard files, whose reader cannot start at a byte offset. Every position also records the
file's inode and a hash of its first bytes, so that a file replaced or rewritten while the
watcher was stopped is recognised and read again from the start.

Consistency: a run's engine snapshot and its files' positions are taken together, between two
batches of records, and written in one transaction. A restarted watcher therefore resumes with
an engine that has seen exactly the records before those positions.

Writes are batched: the watcher saves every run it fed since the last save, all in one
transaction, at most once per save interval and when it stops. Decisions are not kept here:
they are appended to ``<run>/lrpilot-decisions.jsonl`` as soon as they are made. After a
crash between a decision and the next save, the restarted engine re-reads the records since
the save and makes the same decision with the same id again; the watcher does not write an id
that is already in the file.

JSON columns use Python's ``json`` with ``NaN``/``Infinity`` tokens (an engine's "best so far"
starts at infinity); only this module reads them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["STATE_FILE", "SavedFile", "SavedRun", "WatchState"]

STATE_FILE = "lrpilot-watch.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS watch_runs (
    directory TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    engine TEXT NOT NULL,
    records INTEGER NOT NULL,
    malformed INTEGER NOT NULL,
    last_seen REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS watch_files (
    directory TEXT NOT NULL,
    file TEXT NOT NULL,
    kind TEXT NOT NULL,
    position TEXT NOT NULL,
    PRIMARY KEY (directory, file)
);
"""


@dataclass(frozen=True, slots=True)
class SavedFile:
    """Where reading one file of a run resumes. ``name`` is relative to the run directory."""

    name: str
    kind: str
    position: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SavedRun:
    """One run as the watcher saved it; ``directory`` is the resolved run directory."""

    directory: str
    name: str
    engine: Mapping[str, Any]
    records: int
    malformed: int
    last_seen: float | None
    files: tuple[SavedFile, ...]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class WatchState:
    """The watch-mode state file. Opened on first use; :meth:`load` never creates it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            db.execute("PRAGMA journal_mode=WAL")
            # a killed process loses nothing committed; only a power cut may lose the last
            # commits, and then the runs re-read a little more
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        """Close the file; a later call opens it again."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def load(self) -> dict[str, SavedRun]:
        """Every saved run by directory; empty when there is no state file yet."""
        if not self.path.exists():
            return {}
        with self._lock:
            db = self._connect()
            runs = db.execute(
                "SELECT directory, name, engine, records, malformed, last_seen FROM watch_runs"
            ).fetchall()
            files = db.execute(
                "SELECT directory, file, kind, position FROM watch_files ORDER BY directory, file"
            ).fetchall()
        by_dir: dict[str, list[SavedFile]] = {}
        for directory, name, kind, position in files:
            by_dir.setdefault(directory, []).append(SavedFile(name, kind, json.loads(position)))
        return {
            directory: SavedRun(
                directory=directory,
                name=name,
                engine=json.loads(engine),
                records=int(records),
                malformed=int(malformed),
                last_seen=last_seen,
                files=tuple(by_dir.get(directory, ())),
            )
            for directory, name, engine, records, malformed, last_seen in runs
        }

    def save(self, runs: Sequence[SavedRun], forget: Iterable[str] = ()) -> None:
        """Replace the saved state of ``runs`` and drop the ``forget`` directories, in one
        transaction (a run's files not in ``runs[i].files`` are no longer followed)."""
        gone = list(forget)
        if not runs and not gone:
            return
        now = time.time()
        directories = [(r.directory,) for r in runs] + [(d,) for d in gone]
        run_rows = [
            (r.directory, r.name, _dumps(r.engine), r.records, r.malformed, r.last_seen, now)
            for r in runs
        ]
        file_rows = [
            (r.directory, f.name, f.kind, _dumps(f.position)) for r in runs for f in r.files
        ]
        with self._lock:
            db = self._connect()
            db.execute("BEGIN")
            try:
                db.executemany("DELETE FROM watch_files WHERE directory=?", directories)
                db.executemany("DELETE FROM watch_runs WHERE directory=?", [(d,) for d in gone])
                db.executemany(
                    "INSERT INTO watch_runs VALUES (?,?,?,?,?,?,?) ON CONFLICT(directory) DO "
                    "UPDATE SET name=excluded.name, engine=excluded.engine, "
                    "records=excluded.records, malformed=excluded.malformed, "
                    "last_seen=excluded.last_seen, updated=excluded.updated",
                    run_rows,
                )
                db.executemany("INSERT INTO watch_files VALUES (?,?,?,?)", file_rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
