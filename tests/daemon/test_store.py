"""The state file's write paths: the writer's batches never undo a newer commit."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from monitor.server.store import FLUSH_CHUNK, Snapshot, Store


def _snap(job: str, n: int) -> Snapshot:
    return Snapshot(job=job, run_id="r", meta={"labels": {}}, state={"n": n}, status="running",
                    last_seen=1.0)


def _interleave(store: Store, action: Any) -> None:
    """Run ``action`` when the writer, holding a batch it took out of the queue, is about to
    take the connection's lock for the first time."""
    real = store._db_lock

    class Hook:
        fired = False

        def __enter__(self) -> Any:
            if not Hook.fired:
                Hook.fired = True
                action()
            return real.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            return real.__exit__(*exc)

    store._db_lock = Hook()  # type: ignore[assignment]


def test_a_commit_during_a_flush_wins_over_the_batch(
    tmp_path: Path,
) -> None:
    """A decision committed after the writer took an older snapshot is not overwritten by it."""
    store = Store(tmp_path, flush_interval=10.0)
    store.enqueue_snapshot(_snap("j", 1))
    _interleave(store, lambda: store.commit_decisions([{"id": 1}], _snap("j", 2)))
    store.flush()
    assert store.load_jobs()[0].state == {"n": 2}
    store.close()


def test_a_job_deleted_during_a_flush_stays_deleted(
    tmp_path: Path,
) -> None:
    """Eviction while the writer holds the job's last snapshot does not bring the job back."""
    store = Store(tmp_path, flush_interval=10.0)
    store.commit_decisions([{"id": 1}], _snap("j", 1))
    store.enqueue_snapshot(_snap("j", 2))
    _interleave(store, lambda: store.delete_job("j"))
    store.flush()
    assert store.load_jobs() == []
    assert store.decisions("j", "r") == []
    store.close()


def test_a_snapshot_queued_after_the_commit_is_written(tmp_path: Path) -> None:
    """Cancelling applies to the batch in flight only: a later snapshot of the job is kept."""
    store = Store(tmp_path, flush_interval=10.0)
    store.commit_decisions([{"id": 1}], _snap("j", 1))
    store.enqueue_snapshot(_snap("j", 2))
    assert store.flush() == 1
    assert store.load_jobs()[0].state == {"n": 2}
    store.close()


def test_large_batches_are_written_in_chunks(tmp_path: Path) -> None:
    """More queued snapshots than one transaction takes are all written, acks too."""
    store = Store(tmp_path, flush_interval=10.0)
    n = FLUSH_CHUNK * 2 + 3
    for i in range(n):
        store.enqueue_snapshot(_snap(f"j{i}", i))
    store.enqueue_ack("j0", "r", 1, 0, 10)
    assert store.flush() == n + 1
    assert sorted(j.state["n"] for j in store.load_jobs() if j.state) == list(range(n))
    assert store.acks("j0", "r") == [(1, 0, 10)]
    store.close()


def test_checkpoint_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    """The writer's checkpoint copies committed pages; a plain reader sees every row."""
    store = Store(tmp_path, flush_interval=10.0)
    for i in range(1, 50):
        store.commit_decisions([{"id": i}], _snap("j", i))
    store.checkpoint()
    reader = sqlite3.connect(str(store.path))
    assert reader.execute("SELECT count(*) FROM decisions").fetchone() == (49,)
    reader.close()
    store.close()
    assert not Path(f"{store.path}-wal").exists() or Path(f"{store.path}-wal").stat().st_size == 0
