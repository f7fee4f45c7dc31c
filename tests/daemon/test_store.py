"""The state file's write paths: the writer's batches never undo a newer commit."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lrpilot._protocol import DecisionMsg, Hello, MetricsBatch, encode

from monitor.config import Config
from monitor.server.daemon_stats import DaemonStats
from monitor.server.jobs import _DECISION_HEAD, JobRegistry
from monitor.server.store import FLUSH_CHUNK, Snapshot, SnapshotText, Store, dumps


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


# --------------------------------------------------------------------------- SnapshotText

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf, "NaN", "a:NaN"])
)
_part = st.recursive(
    _leaf,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.sampled_from(["a", "b", "NaN", 1, 2.5]), children, max_size=5),
    max_leaves=12,
)
#: a state like an engine's: small values, parts, and a dict of dicts (its "detectors")
_state = st.fixed_dictionaries(
    {
        "n": _leaf,
        "counts": _part,
        3: _part,
        "policy": _part,
        "detectors": st.dictionaries(
            st.sampled_from(["spike", "plateau", "stalled"]),
            st.dictionaries(st.sampled_from(["w", "x"]), _part, max_size=2),
            max_size=3,
        ),
        "last": _leaf,
    }
)


@given(st.lists(_state, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_snapshot_text_is_dumps_of_every_state_in_turn(states: list[dict[str, Any]]) -> None:
    """A job's SnapshotText writes each of its successive states as dumps does, whatever
    changed between them (1, 1.0 and True; 0.0 and -0.0; NaN; a part appearing or leaving)."""
    texts = SnapshotText()
    for state in states:
        assert texts.dumps(state) == dumps(state)


def test_snapshot_text_sees_a_part_changed_in_place() -> None:
    """The same list object with a changed item, or an int turned float of equal value, is
    written again; an unchanged part is the very text of last time."""
    window = [0, 0, 0, 0, 0]
    policy: dict[str, Any] = {"a": 1, "b": 2, "c": 3, "d": 4}
    state = {"v": 1, "detectors": {"d": {"window": window, "n": 1}}, "policy": policy}
    texts = SnapshotText()
    first = texts.dumps(state)
    window[2] = 1
    assert texts.dumps(state) == dumps(state) != first
    policy["a"] = 1.0
    assert texts.dumps(state) == dumps(state)
    assert '"window":[0,0,1,0,0]' in dumps(state) and '"a":1.0,' in dumps(state)
    policy["a"] = True
    assert texts.dumps(state) == dumps(state)


def test_snapshot_text_keeps_about_one_copy_of_the_text() -> None:
    """What a job's SnapshotText keeps between snapshots is its parts' text and a hash of
    each, not their marshal bytes too (a second copy as large, for every idle job)."""
    window = [0.125 * i for i in range(128)]
    state = {"v": 1, "detectors": {"d": {"window": window, "n": 1}, "e": {"codes": list(range(64))}}}
    texts = SnapshotText()
    texts.dumps(state)
    assert all(type(h) is int and t is None for h, t in texts._parts.values())
    text = texts.dumps(state)
    kept = texts._parts.values()
    assert all(type(h) is int and t is not None for h, t in kept)
    assert sum(len(t or "") for _, t in kept) <= len(text)


def test_snapshot_text_keeps_the_text_of_a_part_written_twice_unchanged() -> None:
    """A part's text is kept once the part was written twice in a row unchanged, and reused
    from the next snapshot on; a part that changes every time keeps only its hash (an idle
    job that wrote one snapshot keeps no text at all)."""
    steady = [0.5] * 16
    moving = [0.0] * 16
    state = {"v": 1, "detectors": {"steady": {"w": steady}, "moving": {"w": moving}}}
    texts = SnapshotText()

    def kept() -> dict[str, bool]:
        return {k[1]: t is not None for k, (_, t) in texts._parts.items() if k[0] == "detectors"}

    for i in range(4):
        moving[0] = float(i)
        assert texts.dumps(state) == dumps(state)
        assert kept() == {"steady": i >= 1, "moving": False}


def test_snapshot_texts_of_idle_jobs_forget_their_parts(tmp_path: Path) -> None:
    """A sweep makes the caches of jobs that wrote no snapshot since the previous sweep
    forget their parts, keeps those of jobs that wrote one, and a forgotten cache writes
    the next snapshot as dumps does."""
    store = Store(tmp_path)
    state = {"v": 1, "window": [0.5] * 8}
    busy, idle = SnapshotText(), SnapshotText()
    for name, texts in (("busy", busy), ("idle", idle)):
        store.enqueue_snapshot(Snapshot(name, "r", {}, state, "running", None, texts))
    store.commit_decisions([], Snapshot("busy", "r", {}, state, "running", None, busy))
    assert store.forget_idle_texts() == 0  # both wrote since the start
    store.enqueue_snapshot(Snapshot("busy", "r", {}, state, "running", None, busy))
    assert store.forget_idle_texts() == 1
    assert idle._parts == {} and busy._parts != {}
    assert store.forget_idle_texts() == 1  # now busy was idle for a period too
    assert busy._parts == {}
    assert idle.dumps(state) == dumps(state) and idle._parts != {}
    store.close()


def test_a_restored_registry_continues_as_one_never_stopped(tmp_path: Path) -> None:
    """Snapshots written with reused parts restore an engine that decides exactly as the one
    that wrote them: a registry reloaded from the state file after every few frames (as after a
    kill -9 right after a decision commit) gives the same decisions and the same state as one
    that ran through, while only some detectors' metrics change."""
    policy = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 1, "factor": 0.5}
    config = Config.model_validate(
        {"storage": {"state_dir": str(tmp_path / "a")}, "defaults": {"policy": policy}}
    )

    class Peer:
        session_id = "p"
        last_sent_id = 0

        def detach(self, reason: str) -> None:
            pass

    def registry(path: Path) -> JobRegistry:
        reg = JobRegistry(config, Store(path), DaemonStats(), lambda: 0.0, lambda: 0.0)
        reg.load()
        return reg

    hello = Hello(job="j", run_id="r", lrs=(0.1,))
    through = registry(tmp_path / "a")
    through.attach(hello, Peer())
    restarted = registry(tmp_path / "b")
    restarted.attach(hello, Peer())
    rng = random.Random(7)
    made = 0
    for step in range(1, 400):
        values: dict[str, list[float | None]] = {"loss": [1.0 / step + rng.random() * 0.01]}
        if step % 3 == 0:
            values["val_loss"] = [1.0 + rng.choice([0.0, 0.1, -0.1])]
        if step % 50 == 0:
            values["grad_norm"] = [rng.random()]
        batch = MetricsBatch(steps=[step], values=values)
        a = through.ingest(through.jobs["j"], 0, batch)
        b = restarted.ingest(restarted.jobs["j"], 0, batch)
        assert (a and a.decisions) == (b and b.decisions)
        if a is not None and a.decisions:
            made += 1
            # what was committed with the decision is the whole current state
            stored = {s.job: s for s in restarted.store.load_jobs()}["j"]
            assert stored.state == _nan_safe(restarted.jobs["j"].engine.state_dict())
            restarted.store.close()
            restarted = registry(tmp_path / "b")
        assert _nan_safe(restarted.jobs["j"].engine.state_dict()) == _nan_safe(
            through.jobs["j"].engine.state_dict()
        )
    assert made >= 5
    through.store.close()
    restarted.store.close()


def _nan_safe(state: Any) -> Any:
    """``state`` with NaN as a string, so that states compare equal."""
    return json.loads(dumps(state))


@given(
    st.fixed_dictionaries(
        {"id": st.integers(1, 10**6), "kind": st.sampled_from(["set_lr", "schedule"])},
        optional={
            "lrs": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
            "reason": st.text(max_size=10),
            "schedule": st.dictionaries(st.text(max_size=4), st.floats() | st.integers(), max_size=3),
        },
    )
)
@settings(max_examples=200, deadline=None)
def test_a_decision_frame_is_its_journal_text_with_the_type_in_front(decision: dict[str, Any]) -> None:
    """The frame made from a decision's journal JSON is what encode(DecisionMsg) writes,
    non-finite LRs included."""
    assert _DECISION_HEAD + dumps(decision)[1:] == encode(DecisionMsg(decision))


def test_the_registry_hands_out_the_frames_of_the_decisions_it_journaled(tmp_path: Path) -> None:
    """A decision's Fanout carries the decision frame that encode(DecisionMsg) would write."""
    policy = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}
    config = Config.model_validate(
        {"storage": {"state_dir": str(tmp_path)}, "defaults": {"policy": policy}}
    )
    reg = JobRegistry(config, Store(tmp_path), DaemonStats(), lambda: 0.0)

    class Peer:
        session_id = "p"
        last_sent_id = 0

        def detach(self, reason: str) -> None:
            pass

    job = reg.attach(Hello(job="j", run_id="r", lrs=(0.1, 0.2)), Peer()).job
    reg.ingest(job, 0, MetricsBatch(steps=[1], values={"val_loss": [1.0]}))
    fan = reg.ingest(job, 0, MetricsBatch(steps=[2], values={"val_loss": [1.0]}))
    assert fan is not None and fan.decisions
    assert fan.wire == [encode(DecisionMsg(d)) for d in fan.decisions]
    assert reg.store.decisions("j", "r")[-1] == fan.decisions[-1]
    reg.store.close()
