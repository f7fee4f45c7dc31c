"""Durable daemon state in one SQLite file (stdlib ``sqlite3``, WAL mode) under ``state_dir``.

Three tables::

    jobs       one row per job: what it said in its hello (labels, requested policy,
               initial LRs, world size), its run id, its lifecycle state and the
               engine's latest ``state_dict()``
    decisions  the decision journal: (job, run_id, id) -> decision JSON
    acks       which rank applied which decision at which step

``decisions`` is a ``WITHOUT ROWID`` table (in files made since; older files keep their rowid
table and work the same): its rows live in the b-tree of its primary key, so journaling a
decision writes one page to the WAL instead of two (the table's and its key index's): 5.7
``pwrite`` calls per decision-causing frame instead of 6.5 (``strace -c``, 500 of them).

Two write paths, on purpose:

* **Decisions are committed before they are sent**, together with the snapshot of the engine
  that produced them, in one transaction on the caller's thread (:meth:`Store.commit_decisions`).
  A decision is rare, the commit is a WAL append without fsync (``synchronous=NORMAL`` survives
  a killed process, which is what we guard against), and doing it first means a daemon killed
  with ``kill -9`` never forgets a decision that a job already received, and never reissues an
  id with different content after a restart.

  Nothing of it can wait until after the send. The decision row, because a client may apply
  a decision as soon as it has it. The snapshot, because a daemon restarted from an older one
  next to a journal that holds the decision would rebuild an engine that had not made it:
  its next id is that decision's, and its policy (LRs, counters) stands before it. Only the
  two in one transaction keep the journal and the engine in step; what does move is the
  price of writing the snapshot (:class:`SnapshotText` writes again only what changed).
* **Everything else is batched** (snapshots between decisions, acks): callers enqueue, and a
  writer thread flushes every ``flush_interval`` seconds, so ingest never waits on the disk.
  Newer snapshots of a job replace older queued ones.

Both paths share one connection and its lock, so the event loop waits whenever the writer
holds it. The writer therefore keeps it short: snapshots are queued as rows already in JSON
(made by the caller, see :meth:`Store.enqueue_snapshot`), it writes at most
:data:`FLUSH_CHUNK` rows per transaction, and leaves WAL checkpoints
(which fsync) to a second connection of its own that never takes the lock
(``wal_autocheckpoint`` is off on the shared one, or a decision commit could run one).

An older snapshot must never overwrite a newer one committed directly. A queued snapshot of a
job is dropped when a decision commit (or the job's deletion) comes first; one that the
writer has already taken out of the queue is *cancelled* instead, and the writer skips
cancelled jobs when it takes the lock to write.

JSON: NaN and ±Inf are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
(strict JSON has no such numbers) and read back as floats.
"""

from __future__ import annotations

import json
import logging
import marshal
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lrpilot.store")

DB_NAME = "lrpilot.sqlite3"

#: most snapshot rows the writer commits per transaction (bounds how long it holds the lock)
FLUSH_CHUNK = 32

#: seconds between the writer's WAL checkpoints
CHECKPOINT_INTERVAL = 1.0

#: a job's :class:`SnapshotText` that wrote nothing for between one and two of these periods
#: forgets its parts (see :meth:`Store.forget_idle_texts`)
TEXT_CACHE_SECONDS = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    meta TEXT NOT NULL,
    state TEXT,
    status TEXT NOT NULL,
    last_seen REAL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    job TEXT NOT NULL,
    run_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    decision TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (job, run_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acks (
    job TEXT NOT NULL,
    run_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    applied_at_step INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (job, run_id, id, rank)
);
"""

_NONFINITE_OUT = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NONFINITE_IN = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_only(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by its string spelling."""
    t = type(obj)
    if t is float:
        if obj - obj == 0.0:  # finite (inf - inf and nan - nan are nan)
            return obj
        return "NaN" if obj != obj else _NONFINITE_OUT[obj]
    if t is dict:
        return {k: _finite_only(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return [_finite_only(v) for v in obj]
    if isinstance(obj, float):
        return _finite_only(float(obj))
    if isinstance(obj, Mapping):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def _restore_nonfinite(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE_IN.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_nonfinite(v) for v in obj]
    return obj


def _not_serializable(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _c_encoder() -> Callable[[Any], str] | None:
    """The C encoder of ``json`` made once, as ``JSONEncoder(separators=(",", ":"))``
    configures it, or None where there is none.

    ``JSONEncoder.encode`` builds a new one at every call, with a dict to detect cycles:
    ~3k instructions a call, and a decision's journaling makes a dozen calls. Without the
    dict a cycle ends in RecursionError instead of ValueError; the daemon's states and
    decisions are trees.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return None
    encoder = make(
        None, _not_serializable, json.encoder.encode_basestring_ascii, None, ":", ",",
        False, False, True,
    )
    join = "".join

    def encode(obj: Any) -> str:
        return join(encoder(obj, 0))

    return encode


#: compact JSON of one value, bare NaN/Infinity tokens included (see :func:`dumps`)
_encode: Callable[[Any], str] = _c_encoder() or json.JSONEncoder(separators=(",", ":")).encode


def dumps(obj: Any) -> str:
    """Strict JSON; non-finite floats become ``"NaN"``/``"Infinity"``/``"-Infinity"``."""
    # the C encoder writes bare NaN/Infinity tokens; only when one may be there (the words
    # can also occur inside strings) do we pay for the walk that spells them as strings
    text = _encode(obj)
    if _has_bare_token(text):
        return _dumps_spelled(obj)
    return text


def _has_bare_token(text: str) -> bool:
    """Whether compact JSON ``text`` holds a bare NaN/Infinity/-Infinity number token.

    A value is preceded by ``[``, ``,`` or ``:`` (or is the whole text); the same words
    inside a string, like a spelled ``"Infinity"``, are not tokens.
    """
    if "NaN" in text and (":NaN" in text or ",NaN" in text or "[NaN" in text or text[:3] == "NaN"):
        return True
    return "Infinity" in text and (
        ":Infinity" in text
        or ",Infinity" in text
        or "[Infinity" in text
        or ":-Infinity" in text
        or ",-Infinity" in text
        or "[-Infinity" in text
        or text.startswith(("Infinity", "-Infinity"))
    )


def _dumps_spelled(obj: Any) -> str:
    """:func:`dumps` of something whose plain encoding holds a ``NaN``/``Infinity`` token.

    Only the branches whose own encoding holds one are taken apart: a job's state is a few
    KB of windows with one ``inf`` in it (a plateau policy's best before its first
    evaluation), and walking all of it in Python cost 100 µs per decision journaled.
    """
    t = type(obj)
    if t is dict and all(type(k) is str for k in obj):
        parts = []
        for k, v in obj.items():
            text = _encode(v)
            if _has_bare_token(text):
                text = _dumps_spelled(v)
            parts.append(f"{_encode(k)}:{text}")
        return "{" + ",".join(parts) + "}"
    if t is list or t is tuple:
        parts = []
        for v in obj:
            text = _encode(v)
            if _has_bare_token(text):
                text = _dumps_spelled(v)
            parts.append(text)
        return "[" + ",".join(parts) + "]"
    return json.dumps(_finite_only(obj), allow_nan=False, separators=(",", ":"))


class SnapshotText:
    """:func:`dumps` of one job's successive states, writing again only the parts that changed.

    A decision is journaled with the whole state of the engine that made it (2-5 KB of JSON:
    every detector's windows and counters), yet between two decisions much of it stays the
    same: the detectors that watch metrics the job did not report since, the policy between
    its evaluations. Written whole with the C encoder it cost ~330k instructions, more than
    a third of a decision's round trip in the daemon (lists of ints and floats written one
    number at a time).

    The parts are the values of the state that are dicts or lists of :data:`PART_MIN_LEN`
    items or more, and each value of a dict of dicts of any size (a state's ``detectors``: one
    detector's whole state is one part). Each is compared with the same part of the
    previous state by the hash of its ``marshal`` bytes (format 2, which writes no
    back-references: a third of the cost of the current format, the same bytes for the
    same values), which tell values apart exactly (an int is not a float, -0.0 is not 0.0,
    a NaN keeps its bits: equal bytes load as equal values of the same types, whose JSON is
    the same) at ~10x less than writing the JSON. Equal hashes reuse the part's text;
    anything else is written again. The small values between parts (the state's counters)
    are written each time.

    A detector is one part, its scalars included: reusing only its lists (and writing its
    scalars at every snapshot) cost ~20k more instructions per decision round trip (828.6k
    against 809.2k in the daemon's main thread, callgrind), and holds ~110 characters less
    text per job: 0.3 KiB per idle connection in a fresh daemon (29.4 against 29.1 KiB,
    bench_daemon --memory-only), until the sweep below makes an idle job forget its parts.

    Only the 64-bit hash is kept, not the bytes: they were as large as the text, 2.7 KB of
    a job's 6 KB cache, for every idle job the daemon holds. And a part's text is kept only
    once the part was written twice in a row unchanged (the first time, only its hash): a
    part that changes at every snapshot (a detector of the metric reported every step) is
    never reused, and a job that wrote one snapshot and went idle (most of a daemon's jobs
    at any time) would keep ~3 KB of text that no snapshot reads. Reuse starts one
    snapshot later, the price of one more writing of each steady part. Two different values of a part
    written one after the other have the same hash with a probability of 2**-64 (the
    interpreter's keyed hash of bytes, seeded at random in every process); then the part's
    old text would be written again, until it changes.

    One per job, used on one thread (the event loop's, where snapshots are taken), except
    :meth:`forget`, which any thread may call.
    """

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        #: part path -> (hash of the marshal bytes, JSON text of its ``"key":value`` item,
        #: or None while that value was written only once) of the last value written there
        self._parts: dict[Any, tuple[int, str | None]] = {}

    def forget(self) -> None:
        """Drop every part's text: the next snapshot writes all of it again.

        Safe from another thread: a ``dumps`` running meanwhile keeps the old parts it
        already holds, and its additions to them are dropped with them."""
        self._parts = {}

    def dumps(self, state: Mapping[str, Any]) -> str:
        """The same text as ``dumps(state)``."""
        if type(state) is not dict:
            return dumps(state)
        out = []
        plain: dict[Any, Any] = {}  # consecutive small values, written in one call
        parts = self._parts
        for k, v in state.items():
            t = type(v)
            if t is dict and v and type(k) is str and _dict_of_dicts(v):
                if plain:
                    out.append(dumps(plain)[1:-1])
                    plain = {}
                items = [self._item(parts, k, name, sub) for name, sub in v.items()]
                out.append(f"{_encode_key(k)}:{{{','.join(items)}}}")
                continue
            if (t is not dict and t is not list) or len(v) < PART_MIN_LEN:
                plain[k] = v
                continue
            if plain:
                out.append(dumps(plain)[1:-1])
                plain = {}
            out.append(self._item(parts, None, k, v))
        if plain:
            out.append(dumps(plain)[1:-1])
        return "{" + ",".join(out) + "}"

    def part(self, key: Any, value: Any) -> str:
        """``dumps(value)``, reused while ``value`` is the same as at the last call with ``key``."""
        try:
            packed = hash(_marshal(value, 2))
        except ValueError:  # a type marshal does not write: no reuse
            return dumps(value)
        cached = self._parts.get(key)
        if cached is not None and cached[0] == packed:
            if cached[1] is not None:
                return cached[1]
            text = dumps(value)
            self._parts[key] = (packed, text)  # the same twice in a row: kept from now on
            return text
        self._parts[key] = (packed, None)
        return dumps(value)

    @staticmethod
    def _item(
        parts: dict[Any, tuple[int, str | None]], path: str | None, k: Any, v: Any
    ) -> str:
        """The ``"k":value`` item as dumps writes it in a dict (any key type; NaN spelled),
        reused while ``v`` is what it was at the last call with the same path and key."""
        try:
            packed = hash(_marshal(v, 2))
        except ValueError:  # a type marshal does not write: no reuse
            return dumps({k: v})[1:-1]
        key = (path, k)
        cached = parts.get(key)
        if cached is not None and cached[0] == packed:
            if cached[1] is not None:
                return cached[1]
            item = dumps({k: v})[1:-1]
            parts[key] = (packed, item)  # the same twice in a row: kept from now on
            return item
        parts[key if cached is not None else _shared_key(key)] = (packed, None)
        return dumps({k: v})[1:-1]


_marshal = marshal.dumps


#: fewest items of a list or dict in a state that :class:`SnapshotText` reuses on its own
PART_MIN_LEN = 4


#: one tuple for each part path, shared by the caches of all jobs (every job's state has the
#: same few dozen paths); bounded, in case states ever carry keys made of data
_SHARED_KEYS: dict[tuple[Any, Any], tuple[Any, Any]] = {}
_SHARED_KEYS_MAX = 4096


def _shared_key(key: tuple[Any, Any]) -> tuple[Any, Any]:
    shared = _SHARED_KEYS.get(key)
    if shared is not None:
        return shared
    if len(_SHARED_KEYS) < _SHARED_KEYS_MAX:
        _SHARED_KEYS[key] = key
    return key


def _dict_of_dicts(obj: dict[Any, Any]) -> bool:
    for k, v in obj.items():  # noqa: SIM110 - a loop is cheaper than all() of a generator
        if type(k) is not str or type(v) is not dict:
            return False
    return True


#: a str key as the C encoder writes it (ensure_ascii)
_encode_key = json.encoder.encode_basestring_ascii


def loads(text: str) -> Any:
    """Inverse of :func:`dumps`."""
    return _restore_nonfinite(json.loads(text))


_UPSERT_JOB = (
    "INSERT INTO jobs (job, run_id, meta, state, status, last_seen, updated) "
    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(job) DO UPDATE SET run_id=excluded.run_id, "
    "meta=excluded.meta, state=excluded.state, status=excluded.status, "
    "last_seen=excluded.last_seen, updated=excluded.updated"
)


_INSERT_DECISION = "INSERT INTO decisions VALUES (?,?,?,?,?)"


def _snapshot_row(s: Snapshot, now: float, used: set[SnapshotText]) -> tuple[Any, ...]:
    """The jobs-table row of a snapshot (job name first); notes its SnapshotText in ``used``."""
    if s.texts is not None:
        used.add(s.texts)
        state = s.texts.dumps(s.state) if s.state is not None else None
        meta = s.texts.part("meta", s.meta)
    else:
        state = dumps(s.state) if s.state is not None else None
        meta = dumps(s.meta)
    return (s.job, s.run_id, meta, state, s.status, s.last_seen, now)


@dataclass(frozen=True, slots=True)
class StoredJob:
    """One row of the jobs table, decoded."""

    job: str
    run_id: str
    meta: dict[str, Any]
    state: dict[str, Any] | None
    status: str
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the registry asks the store to remember about a job."""

    job: str
    run_id: str
    meta: Mapping[str, Any]
    state: Mapping[str, Any] | None
    status: str
    last_seen: float | None
    #: the job's :class:`SnapshotText`, which writes the JSON reusing unchanged parts
    #: (the row is made on the thread that took the snapshot, see enqueue_snapshot)
    texts: SnapshotText | None = None


class Store:
    """The SQLite state file plus its background writer thread."""

    def __init__(
        self,
        state_dir: Path,
        flush_interval: float = 0.05,
        on_flush: Callable[[int], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.flush_interval = flush_interval
        self._on_flush = on_flush
        self._on_error = on_error
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        #: the cursor of commit_decisions (``Connection.execute`` makes one per call)
        self._cursor = self._db.cursor()
        self._db_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time, or batches could reorder
        #: the jobs-table row of each job's latest queued snapshot, already in JSON
        self._pending_snapshots: dict[str, tuple[Any, ...]] = {}
        self._pending_acks: list[tuple[str, str, int, int, int | None, float]] = []
        #: jobs whose snapshot in the writer's current batch is outdated (see module doc)
        self._cancelled: set[str] = set()
        self._checkpointer: sqlite3.Connection | None = None
        self._last_checkpoint = time.monotonic()
        #: SnapshotTexts that wrote since the last sweep, and those that had by the one before
        self._texts_used: set[SnapshotText] = set()
        self._texts_kept: set[SnapshotText] = set()
        self._last_text_sweep = time.monotonic()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background writer."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrpilot-store", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Flush everything queued, stop the writer and close the file."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with self._db_lock:
            self._db.close()  # the last connection to close checkpoints the WAL

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
                if time.monotonic() - self._last_checkpoint >= CHECKPOINT_INTERVAL:
                    self.checkpoint()
                if time.monotonic() - self._last_text_sweep >= TEXT_CACHE_SECONDS:
                    self.forget_idle_texts()
            except Exception as exc:  # a full disk must not kill the writer; we retry
                log.exception("state writer failed; will retry")
                if self._on_error is not None:
                    self._on_error(exc)
                time.sleep(self.flush_interval)

    def checkpoint(self) -> None:
        """Copy committed WAL pages into the database file (a PASSIVE checkpoint).

        Runs on a connection of its own without the lock: a passive checkpoint never blocks
        writers, and its fsyncs release the GIL, so the event loop keeps committing.
        """
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self._last_checkpoint = time.monotonic()

    def forget_idle_texts(self) -> int:
        """Make the SnapshotTexts that wrote nothing since the previous call forget their
        parts; returns how many did.

        A job's cache (~3 KB) pays for itself while the job keeps writing snapshots (a
        training job: one a second, and one with every decision); an idle job's would sit
        unused for as long as the daemon holds the job. The writer thread calls this every
        :data:`TEXT_CACHE_SECONDS`, so a job that went idle loses its cache within two
        periods, and its next snapshot writes all of its text once, as without a cache.
        """
        # swapping the set is atomic: a snapshot taken meanwhile notes its texts in the new
        # set or in the one taken here, and either way is kept
        used, self._texts_used = self._texts_used, set()
        idle = self._texts_kept - used
        for texts in idle:
            texts.forget()
        self._texts_kept = used
        self._last_text_sweep = time.monotonic()
        return len(idle)

    # ------------------------------------------------------------------ batched writes

    def enqueue_snapshot(self, snapshot: Snapshot) -> None:
        """Remember ``snapshot`` at the next flush (replacing an older queued one of its job).

        The snapshot is turned into its row (JSON text) here, on the caller's thread: the
        writer thread would do the same work under the same GIL, and a queued state dict
        (a few dozen lists and dicts per job) outlives two young garbage collections, so
        1,000 jobs' snapshots per second kept the collector's oldest generation growing,
        and its full collections, 100 ms and more with 1,000 jobs, stalled the event loop.
        """
        row = _snapshot_row(snapshot, time.time(), self._texts_used)
        with self._pending_lock:
            self._pending_snapshots[snapshot.job] = row

    def enqueue_ack(
        self, job: str, run_id: str, decision_id: int, rank: int, applied_at_step: int | None
    ) -> None:
        """Remember that ``rank`` applied ``decision_id`` at the next flush."""
        with self._pending_lock:
            self._pending_acks.append(
                (job, run_id, decision_id, rank, applied_at_step, time.time())
            )

    def flush(self) -> int:
        """Write everything queued; returns how many rows it took (outdated ones skipped)."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        with self._pending_lock:
            snapshots = self._pending_snapshots
            acks = self._pending_acks
            self._pending_snapshots = {}
            self._pending_acks = []
            self._cancelled = set()
        if not snapshots and not acks:
            return 0
        n = len(snapshots) + len(acks)
        rows = list(snapshots.values())
        done = 0
        try:
            while done < len(rows) or acks:
                chunk = rows[done : done + FLUSH_CHUNK]
                with self._db_lock:
                    with self._pending_lock:
                        chunk = [r for r in chunk if r[0] not in self._cancelled]
                    self._db.execute("BEGIN")
                    try:
                        if chunk:
                            self._db.executemany(_UPSERT_JOB, chunk)
                        if acks:
                            self._db.executemany(
                                "INSERT OR REPLACE INTO acks VALUES (?,?,?,?,?,?)", acks
                            )
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                done += FLUSH_CHUNK
                acks = []
        except BaseException:
            # put back what was not written so nothing is lost; newer queued snapshots win,
            # and outdated (cancelled) ones are not put back at all
            with self._pending_lock:
                for row in rows[done:]:
                    if row[0] not in self._cancelled:
                        self._pending_snapshots.setdefault(row[0], row)
                self._pending_acks[:0] = acks
            raise
        if self._on_flush is not None:
            self._on_flush(n)
        return n

    # ------------------------------------------------------------------ direct writes

    def commit_decisions(
        self,
        decisions: Iterable[Mapping[str, Any]],
        snapshot: Snapshot,
        texts: Sequence[str] | None = None,
    ) -> None:
        """Journal ``decisions`` and the snapshot that produced them, atomically, now.

        ``texts``: ``dumps`` of each decision, when the caller has it already."""
        now = time.time()
        decisions = list(decisions)
        if texts is None:
            texts = [dumps(d) for d in decisions]
        job, run_id = snapshot.job, snapshot.run_id
        rows = [
            (job, run_id, int(d["id"]), text, now)
            for d, text in zip(decisions, texts, strict=True)
        ]
        job_row = _snapshot_row(snapshot, now, self._texts_used)
        with self._db_lock:
            with self._pending_lock:
                # a queued snapshot of this job is older than this one: drop it, and cancel
                # one the writer may be about to write
                self._pending_snapshots.pop(snapshot.job, None)
                self._cancelled.add(snapshot.job)
            cursor = self._cursor
            cursor.execute("BEGIN")
            try:
                if len(rows) == 1:
                    cursor.execute(_INSERT_DECISION, rows[0])
                elif rows:
                    cursor.executemany(_INSERT_DECISION, rows)
                cursor.execute(_UPSERT_JOB, job_row)
                cursor.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete_decisions(self, job: str, keep_run_id: str) -> None:
        """Forget journal entries of earlier runs of ``job`` (a new run started)."""
        with self._db_lock:
            self._db.execute(
                "DELETE FROM decisions WHERE job=? AND run_id<>?", (job, keep_run_id)
            )
            self._db.execute("DELETE FROM acks WHERE job=? AND run_id<>?", (job, keep_run_id))

    def delete_job(self, job: str) -> None:
        """Forget a job entirely (evicted after its TTL)."""
        with self._db_lock:
            with self._pending_lock:
                self._pending_snapshots.pop(job, None)
                self._cancelled.add(job)
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM jobs WHERE job=?", (job,))
            self._db.execute("DELETE FROM decisions WHERE job=?", (job,))
            self._db.execute("DELETE FROM acks WHERE job=?", (job,))
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reads

    def load_jobs(self) -> list[StoredJob]:
        """Every job row, decoded."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT job, run_id, meta, state, status, last_seen FROM jobs ORDER BY job"
            ).fetchall()
        return [
            StoredJob(
                job=r[0],
                run_id=r[1],
                meta=loads(r[2]),
                state=loads(r[3]) if r[3] is not None else None,
                status=r[4],
                last_seen=r[5],
            )
            for r in rows
        ]

    def decisions(
        self, job: str, run_id: str, after_id: int = -1, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Journaled decisions of one run with id > ``after_id``, oldest first.

        With ``limit`` only the newest ``limit`` of them (still oldest first).
        """
        sql = "SELECT decision FROM decisions WHERE job=? AND run_id=? AND id>? ORDER BY id"
        params: tuple[Any, ...] = (job, run_id, after_id)
        if limit is not None:
            sql = (
                "SELECT decision FROM (SELECT decision, id FROM decisions WHERE job=? AND "
                "run_id=? AND id>? ORDER BY id DESC LIMIT ?) ORDER BY id"
            )
            params = (job, run_id, after_id, limit)
        with self._db_lock:
            rows = self._db.execute(sql, params).fetchall()
        return [loads(r[0]) for r in rows]

    def acks(self, job: str, run_id: str) -> list[tuple[int, int, int | None]]:
        """``(decision id, rank, applied_at_step)`` rows of one run."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT id, rank, applied_at_step FROM acks WHERE job=? AND run_id=? "
                "ORDER BY id, rank",
                (job, run_id),
            ).fetchall()
        return [(int(r[0]), int(r[1]), r[2]) for r in rows]
