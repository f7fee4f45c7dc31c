"""The daemon's tick snapshots each job that changed once, however busy the jobs keep it."""

from __future__ import annotations

from pathlib import Path

from lrpilot._protocol import Hello, MetricsBatch

from monitor.server.daemon_stats import DaemonStats
from monitor.server.jobs import Job, JobRegistry
from monitor.server.store import Snapshot, Store

from ._daemon import FakeClock, FakePeer, make_config


class _CountingStore(Store):
    """A store that records which jobs' snapshots were queued, in order."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.queued: list[str] = []

    def enqueue_snapshot(self, snapshot: Snapshot) -> None:
        self.queued.append(snapshot.job)
        super().enqueue_snapshot(snapshot)


def _registry(tmp_path: Path) -> tuple[JobRegistry, _CountingStore]:
    config = make_config(tmp_path, server={"stale_after_seconds": 10})
    store = _CountingStore(tmp_path / "state")
    return JobRegistry(config, store, DaemonStats(), FakeClock()), store


def _feed(registry: JobRegistry, jobs: list[Job], step: int) -> None:
    for job in jobs:
        registry.ingest(job, 0, MetricsBatch(steps=[step], values={"loss": [0.5]}))


def test_a_tick_pass_snapshots_each_changed_job_once_while_jobs_keep_changing(
    tmp_path: Path,
) -> None:
    """After tick(snapshot_dirty=False), snapshot_dirty takes the jobs dirty at the tick, a
    slice per call, then returns 0, although every job was fed again between the calls (as
    a busy daemon's jobs are between two event-loop turns, and the daemon calls it until 0);
    the next tick starts a new pass."""
    registry, store = _registry(tmp_path)
    jobs = [registry.attach(Hello(job=f"j{i}", lrs=(0.1,)), FakePeer()).job for i in range(10)]
    _feed(registry, jobs, 1)
    registry.tick(snapshot_dirty=False)
    counts = []
    for step in range(2, 6):
        counts.append(registry.snapshot_dirty(4))
        _feed(registry, jobs, step)
    assert counts == [4, 4, 2, 0]
    assert store.queued == [f"j{i}" for i in range(10)]
    assert all(job.dirty for job in jobs)  # fed since: the next pass takes them
    store.queued.clear()
    registry.tick(snapshot_dirty=False)
    assert [registry.snapshot_dirty(4) for _ in range(4)] == [4, 4, 2, 0]
    assert sorted(store.queued) == sorted(f"j{i}" for i in range(10))
    store.close()


def test_a_tick_pass_skips_jobs_snapshotted_or_replaced_since_the_tick(tmp_path: Path) -> None:
    """A job of the pass that a decision commit (or another snapshot) made clean is not
    snapshotted again, nor the old job object of a job that started a new run since."""
    registry, store = _registry(tmp_path)
    jobs = [registry.attach(Hello(job=f"j{i}", lrs=(0.1,)), FakePeer()).job for i in range(3)]
    _feed(registry, jobs, 1)
    registry.tick(snapshot_dirty=False)
    jobs[0].dirty = False  # as after a decision's commit
    registry.attach(Hello(job="j1", run_id="second", lrs=(0.1,)), FakePeer())  # a new run
    store.queued.clear()
    assert registry.snapshot_dirty(10) == 1
    assert store.queued == ["j2"]
    assert registry.snapshot_dirty(10) == 0
    store.close()


def test_without_a_tick_pass_snapshot_dirty_takes_any_changed_job(tmp_path: Path) -> None:
    """Called without a tick before it (a benchmark, a test), snapshot_dirty takes the jobs
    that are dirty at the call, a slice at a time, as before."""
    registry, store = _registry(tmp_path)
    jobs = [registry.attach(Hello(job=f"j{i}", lrs=(0.1,)), FakePeer()).job for i in range(5)]
    _feed(registry, jobs, 1)
    assert [registry.snapshot_dirty(2) for _ in range(4)] == [2, 2, 1, 0]
    _feed(registry, jobs, 2)
    assert registry.snapshot_dirty(10) == 5
    store.close()
