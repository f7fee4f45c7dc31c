"""Unit tests of the daemon shell's parts that need no event loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.server.auth import Authenticator, Principal, is_loopback
from monitor.server.daemon_stats import DaemonStats, LatencyHistogram
from monitor.server.jobs import RECENT, TRANSITIONS, JobState, next_state, remember
from monitor.server.limits import TokenBucket
from monitor.server.store import Snapshot, Store, _finite_only, dumps, loads


def _snap(job: str, n: int) -> Snapshot:
    return Snapshot(job=job, run_id="r", meta={"labels": {}}, state={"n": n}, status="running",
                    last_seen=1.0)


def test_json_round_trips_non_finite_floats_as_strings() -> None:
    """NaN and ±Inf are written as strings (strict JSON) and read back as floats."""
    text = dumps({"a": [math.nan, math.inf, -math.inf, 1.5], "b": {"c": math.nan}})
    assert "NaN" in text and "Infinity" in text
    back = loads(text)
    assert math.isnan(back["a"][0]) and back["a"][1] == math.inf and back["a"][2] == -math.inf
    assert back["a"][3] == 1.5 and math.isnan(back["b"]["c"])


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", ':NaN,"', "a\\\"NaN"])
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(["NaN", "Infinity"]), children, max_size=5),
    max_leaves=30,
)


@given(_json_values)
@settings(max_examples=300, deadline=None)
def test_dumps_is_strict_json_and_spells_only_non_finite_floats(value: object) -> None:
    """dumps takes apart only the branches that hold a NaN or ±Inf: the text is the full
    walk's, strict JSON with no bare token, strings that read "NaN" left as they are."""
    text = dumps(value)
    json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token} in {text}"))
    expected = json.dumps(_finite_only(value), allow_nan=False, separators=(",", ":"))
    assert text == expected


def test_store_commits_decisions_with_their_snapshot(tmp_path: Path) -> None:
    """commit_decisions writes journal and snapshot at once; a new Store reads both back."""
    store = Store(tmp_path)
    store.commit_decisions([{"id": 1, "kind": "set_lr", "lrs": [math.nan]}], _snap("j", 7))
    store.close()
    again = Store(tmp_path)
    (job,) = again.load_jobs()
    assert job.state == {"n": 7}
    (d,) = again.decisions("j", "r")
    assert d["id"] == 1 and math.isnan(d["lrs"][0])
    assert again.decisions("j", "r", after_id=1) == []
    again.close()


def test_store_batches_snapshots_and_keeps_the_newest(tmp_path: Path) -> None:
    """Queued snapshots are written at flush time, the latest per job winning."""
    store = Store(tmp_path, flush_interval=10.0)
    store.enqueue_snapshot(_snap("j", 1))
    store.enqueue_snapshot(_snap("j", 2))
    assert store.load_jobs() == []
    assert store.flush() == 1
    assert store.load_jobs()[0].state == {"n": 2}
    store.close()


def test_queued_snapshot_never_overwrites_a_newer_committed_one(tmp_path: Path) -> None:
    """A snapshot queued before a decision commit is dropped, not written over it later."""
    store = Store(tmp_path, flush_interval=10.0)
    store.enqueue_snapshot(_snap("j", 1))
    store.commit_decisions([{"id": 1}], _snap("j", 2))
    store.flush()
    assert store.load_jobs()[0].state == {"n": 2}
    store.close()


def test_store_decisions_limit_returns_newest_oldest_first(tmp_path: Path) -> None:
    """decisions(limit=n) gives the newest n decisions in ascending id order."""
    store = Store(tmp_path)
    for i in range(1, 6):
        store.commit_decisions([{"id": i}], _snap("j", i))
    assert [d["id"] for d in store.decisions("j", "r", limit=2)] == [4, 5]
    store.close()


def test_token_bucket_allows_a_burst_then_refills_with_time() -> None:
    """The bucket allows `burst` events at once, then `rate` per second."""
    bucket = TokenBucket(rate=10.0, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(10))
    assert not bucket.allow(0.0)
    assert bucket.allow(0.1)
    assert not bucket.allow(0.1)


def test_authenticator_checks_bearer_tokens_and_scopes() -> None:
    """A known token yields its principal; a missing or unknown one yields None."""
    auth = Authenticator([("job", ("team-a-*",), "jobsecret1", "a"), ("admin", ("*",), "adminsecret", None)])
    p = auth.authenticate({"Authorization": "Bearer jobsecret1"}, "10.0.0.1")
    assert p is not None and not p.is_admin
    assert p.may_stream("team-a-x") and not p.may_stream("team-b-x")
    admin = auth.authenticate({"Authorization": "Bearer adminsecret"}, "10.0.0.1")
    assert admin is not None and admin.is_admin and admin.may_stream("anything")
    assert auth.authenticate({"Authorization": "Bearer nope"}, "127.0.0.1") is None
    assert auth.authenticate({}, "127.0.0.1") is None


def test_without_tokens_only_loopback_peers_are_admitted() -> None:
    """With no token configured, loopback peers are admin and others are refused."""
    auth = Authenticator([])
    assert auth.authenticate({}, "127.0.0.1") == Principal(role="admin", name="loopback")
    assert auth.authenticate({}, "::1") is not None
    assert auth.authenticate({}, "192.168.1.4") is None
    assert is_loopback("::ffff:127.0.0.1") and not is_loopback("example.org")


def test_recent_decisions_are_made_on_first_use_and_keep_the_newest() -> None:
    ring = remember((), {"id": 0})  # a job starts with an empty tuple: no deque to hold
    assert list(ring) == [{"id": 0}]
    for i in range(1, RECENT + 5):
        assert remember(ring, {"id": i}) is ring
    assert [d["id"] for d in ring] == list(range(5, RECENT + 5))


def test_job_state_table() -> None:
    """The lifecycle table moves jobs as documented and ignores unlisted pairs."""
    assert next_state(JobState.CONNECTED, "metrics") is JobState.RUNNING
    assert next_state(JobState.RUNNING, "silence") is JobState.STALE
    assert next_state(JobState.STALE, "metrics") is JobState.RUNNING
    assert next_state(JobState.RUNNING, "finished") is JobState.FINISHED
    assert next_state(JobState.RUNNING, "halt") is JobState.HALTED
    assert next_state(JobState.HALTED, "metrics") is JobState.HALTED
    assert next_state(JobState.HALTED, "hello") is JobState.HALTED
    assert all(state is not JobState.HALTED for (state, _e) in TRANSITIONS)


def test_latency_histogram_buckets_and_quantiles() -> None:
    """Samples land in the right bucket; quantiles are bucket upper bounds."""
    h = LatencyHistogram()
    for _ in range(9):
        h.observe(0.00005)
    h.observe(0.3)
    cum = dict(h.cumulative())
    assert cum[0.0001] == 9 and cum[1.0] == 10 and cum[math.inf] == 10
    assert h.quantile(0.5) == 0.0001 and h.quantile(1.0) == 1.0


def test_stats_count_unknown_message_types_under_one_key() -> None:
    """A hostile client cannot grow the per-type counters with made-up types."""
    stats = DaemonStats()
    for t in ("metrics", "x1", "x2", None):
        stats.count_message(t)
    assert stats.messages == {"metrics": 1, "unknown": 3}
