"""The job registry: one :class:`Job` per job name, each around a pure :class:`JobEngine`.

Lifecycle, as data (everything that moves a job between states is in :data:`TRANSITIONS`)::

                 metrics                      finished (all ranks)
    connected ------------> running ---------------------------------> finished
        |  ^                   |  ^                                        |
 silence|  |hello       silence|  |metrics / hello                  hello  |
        v  |                   v  |                               (new run)v
       stale <-----------------+--+                                   connected
    any state --halt decision--> halted      (a halted job stays halted until a new run)

*silence* is ``server.stale_after_seconds`` without any message from any rank, measured on
the daemon's clock (the event loop's, injected for tests). A job that reconnects — same name
and run id — is the same job: same engine, same decision ids, same journal. A hello with a
different run id for a job that has no live connection starts a new run.

Multi-rank jobs: every rank connects on its own. Decisions go to every connected rank with
the same ``apply_at_step`` (the engine picks it ahead of every rank's last step); a rank that
is disconnected at the time gets them in its next welcome (``resume.last_decision_id``).

The registry never waits: sending is the sessions' business. :meth:`JobRegistry.ingest`
returns the decisions to fan out together with the sessions to send them to, taken in the same
step as the journal commit, so a session that attaches later finds them in the journal instead.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

from lrpilot._protocol import ErrorCode, Hello, MetricsBatch, ProtocolError

from ..config import Config, ConfigError
from ..engine import CheckpointSaved, Decision, Detection, JobEngine
from .daemon_stats import DaemonStats
from .limits import Limits
from .store import Snapshot, SnapshotText, Store, dumps

log = logging.getLogger("lrpilot.jobs")

RECENT = 50  # decisions and detections kept in memory per job for `lrpilot show`


class JobState(str, enum.Enum):
    CONNECTED = "connected"
    RUNNING = "running"
    STALE = "stale"
    FINISHED = "finished"
    HALTED = "halted"


S = JobState

#: (state, event) -> next state. A pair that is not listed leaves the state unchanged.
TRANSITIONS: dict[tuple[JobState, str], JobState] = {
    (S.CONNECTED, "metrics"): S.RUNNING,
    (S.CONNECTED, "silence"): S.STALE,
    (S.CONNECTED, "finished"): S.FINISHED,
    (S.RUNNING, "silence"): S.STALE,
    (S.RUNNING, "finished"): S.FINISHED,
    (S.STALE, "hello"): S.CONNECTED,
    (S.STALE, "metrics"): S.RUNNING,
    (S.STALE, "finished"): S.FINISHED,
    (S.FINISHED, "hello"): S.CONNECTED,
    (S.CONNECTED, "halt"): S.HALTED,
    (S.RUNNING, "halt"): S.HALTED,
    (S.STALE, "halt"): S.HALTED,
    (S.FINISHED, "halt"): S.HALTED,
}

#: states a live job can be in (counted against limits.max_jobs)
LIVE_STATES = frozenset({S.CONNECTED, S.RUNNING, S.STALE})


def next_state(state: JobState, event: str) -> JobState:
    """The state after ``event`` ("hello", "metrics", "silence", "finished", "halt")."""
    return TRANSITIONS.get((state, event), state)


class Peer(Protocol):
    """What the registry needs of a connection: an id and a way to be told to go away."""

    session_id: str
    last_sent_id: int

    def detach(self, reason: str) -> None: ...


@dataclass(slots=True)
class Rank:
    """One rank of a job."""

    rank: int
    session: Peer | None = None
    last_step: int | None = None
    finished: bool = False
    last_ack: int | None = None


@dataclass(slots=True)
class Job:
    """A job the daemon knows: its engine and everything around it."""

    name: str
    run_id: str
    engine: JobEngine
    meta: dict[str, Any]
    state: JobState = S.CONNECTED
    last_seen: float = 0.0  # daemon clock
    last_seen_wall: float | None = None  # Unix time, for exports
    ranks: dict[int, Rank] = field(default_factory=dict)
    metric_names: set[str] = field(default_factory=set)
    recent_decisions: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_detections: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    records: int = 0
    points: int = 0
    records_since_snapshot: int = 0
    dirty: bool = False
    ingest_lag: float = 0.0
    #: bumped by everything that can change what the exporter shows of this job, so that
    #: :meth:`JobRegistry.views` hands out the previous view of a job whose version is the same
    version: int = 0
    #: writes this job's snapshots as JSON, reusing the text of parts that did not change
    texts: SnapshotText = field(default_factory=SnapshotText)

    def sessions(self) -> list[Peer]:
        return [r.session for r in self.ranks.values() if r.session is not None]

    def move(self, event: str) -> None:
        self.state = next_state(self.state, event)
        self.version += 1

    def snapshot(self) -> Snapshot:
        return Snapshot(
            job=self.name,
            run_id=self.run_id,
            meta=self.meta,
            state=self.engine.state_dict(),
            status=self.state.value,
            last_seen=self.last_seen_wall,
            texts=self.texts,
        )

    def summary(self) -> dict[str, Any]:
        """The one-line view used by ``lrpilot jobs`` and /api/jobs."""
        eng = self.engine
        return {
            "job": self.name,
            "run_id": self.run_id,
            "state": self.state.value,
            "step": eng.last_step,
            "lrs": list(eng.lrs),
            "policy": eng.spec.policy.kind,
            "paused": eng.paused,
            "halted": eng.halted,
            "ranks": len(self.ranks),
            "connected_ranks": len(self.sessions()),
            "world_size": eng.world_size,
            "records": self.records,
            "last_seen": self.last_seen_wall,
            "decisions": sum(eng.decision_counts.values()),
            "labels": dict(self.meta.get("labels") or {}),
        }

    def detail(self) -> dict[str, Any]:
        """Everything ``lrpilot show`` prints."""
        eng = self.engine
        out = self.summary()
        out.update(
            {
                "policy_block": eng.policy_block,
                "schedule": eng.segment,
                "min_lrs": list(eng.min_lrs),
                "plateau_bad_evaluations": eng.plateau_bad_evaluations,
                "checkpoint_step": eng.checkpoint_step,
                "checkpoints": list(eng.checkpoints),
                "monitored": list(eng.monitored),
                "last_values": dict(eng.last_values),
                "detection_counts": dict(eng.detection_counts),
                "decision_counts": dict(eng.decision_counts),
                "nonfinite_counts": dict(eng.nonfinite_counts),
                "rank_steps": {
                    str(r.rank): r.last_step for r in sorted(self.ranks.values(), key=_rank_key)
                },
                "recent_decisions": list(self.recent_decisions),
                "recent_detections": list(self.recent_detections),
                "initial_lrs": list(eng.initial_lrs),
                "total_steps": self.meta.get("total_steps"),
                "anneal_from_step": eng.anneal_start,
            }
        )
        return out


def _rank_key(r: Rank) -> int:
    return r.rank


@dataclass(frozen=True, slots=True)
class Attached:
    """The result of a hello: the job, the welcome's decisions, and the LR to start with."""

    job: Job
    decisions: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Fanout:
    """Decisions to send now, and to whom (taken when they were journaled)."""

    job: Job
    decisions: list[dict[str, Any]]
    peers: list[Peer]
    #: the decision frames' text (``encode(DecisionMsg(d))``), when made with the journal's
    wire: list[str] = field(default_factory=list)


NO_FANOUT: tuple[Fanout, ...] = ()

#: what a decision frame's JSON starts with, before the decision's own fields
_DECISION_HEAD = '{"type":"decision",'


class JobRegistry:
    """Every job by name; feeds engines, journals decisions, tracks ranks and states."""

    def __init__(
        self,
        config: Config,
        store: Store,
        stats: DaemonStats,
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.limits = Limits.from_config(config)
        self.store = store
        self.stats = stats
        self.clock = clock
        self.wall_clock = wall_clock
        # Unix time = daemon clock + offset: one clock read per message instead of two
        self.wall_offset = wall_clock() - clock()
        self.jobs: dict[str, Job] = {}
        #: the last JobView of each job, with what it was built from (see views())
        self._views: dict[str, _ViewSource] = {}
        #: how many of the last views() are of finished or halted jobs
        self.ended_views = 0
        #: TensorBoard output of LRs, detections and decisions (monitor.tboutput), when enabled
        self.tensorboard: Any = None

    # ------------------------------------------------------------------ config

    def set_config(self, config: Config) -> None:
        """Use ``config`` for new jobs and limits; existing jobs keep their engines."""
        self.config = config
        self.limits = Limits.from_config(config)

    # ------------------------------------------------------------------ restore

    def load(self) -> int:
        """Rebuild every job from the store's snapshots; returns how many were loaded."""
        now = self.clock()
        loaded = 0
        for stored in self.store.load_jobs():
            meta = stored.meta
            try:
                spec = self.config.job_spec_for(
                    stored.job, meta.get("labels") or {}, meta.get("policy")
                )
                if stored.state is not None:
                    engine = JobEngine.from_state(spec, stored.state)
                else:
                    engine = JobEngine(spec, meta["initial_lrs"], int(meta.get("world_size", 1)))
                if engine.total_steps is None:  # a config that gained an anneal since
                    engine.plan(meta.get("total_steps"))
            except Exception:
                log.exception("cannot restore job %r from the state file; skipping it", stored.job)
                continue
            try:
                state = JobState(stored.status)
            except ValueError:
                state = S.STALE
            job = Job(
                name=stored.job,
                run_id=stored.run_id,
                engine=engine,
                meta=meta,
                state=state,
                last_seen=now,  # give live jobs a full stale period to reconnect
                last_seen_wall=stored.last_seen,
            )
            for rank, step in (stored.state or {}).get("rank_steps", {}).items():
                job.ranks[int(rank)] = Rank(rank=int(rank), last_step=int(step))
            for name in engine.last_values:
                job.metric_names.add(name)
            for d in self.store.decisions(stored.job, stored.run_id, limit=RECENT):
                job.recent_decisions.append(d)
            self.jobs[stored.job] = job
            loaded += 1
        return loaded

    # ------------------------------------------------------------------ connections

    def attach(self, hello: Hello, peer: Peer) -> Attached:
        """Register ``peer`` as ``hello.rank`` of ``hello.job``; create or continue the job.

        Raises :class:`ProtocolError` (too_many_jobs, bad_message) when the hello is refused.
        """
        name = hello.job
        run_id = hello.run_id or ""
        job = self.jobs.get(name)
        if hello.world_size > self.limits.max_ranks:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"hello.world_size: {hello.world_size} ranks exceed the daemon's limit of "
                f"{self.limits.max_ranks}",
                "hello",
            )
        new_run = job is not None and job.run_id != run_id
        if job is not None and new_run and job.sessions():
            # a new run while the old one still has live connections: the old run is over
            for peer_old in job.sessions():
                peer_old.detach(f"job {name!r} restarted as run {run_id!r}")
        decisions: list[dict[str, Any]] = []
        if job is None or new_run:
            live = sum(1 for j in self.jobs.values() if j.state in LIVE_STATES)
            if job is None and live >= self.limits.max_jobs:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_JOBS,
                    f"the daemon already tracks {live} jobs (limits.max_jobs = "
                    f"{self.limits.max_jobs})",
                    "hello",
                )
            job = self._create(hello, run_id)
            if new_run:
                self.store.delete_decisions(name, run_id)
            initial = job.engine.start()
            decisions = [d.to_dict() for d in initial]
            self._journal(job, decisions)
            after = 0
        else:
            after = 0
            if hello.resume is not None and hello.resume.last_decision_id is not None:
                after = hello.resume.last_decision_id
            decisions = self.store.decisions(name, run_id, after_id=after)
        rank = job.ranks.get(hello.rank)
        if rank is None:
            rank = job.ranks[hello.rank] = Rank(rank=hello.rank)
        if rank.session is not None and rank.session is not peer:
            rank.session.detach(f"rank {hello.rank} of job {name!r} connected again")
        rank.session = peer
        rank.finished = False
        if hello.total_steps is not None and hello.total_steps != job.meta.get("total_steps"):
            job.meta["total_steps"] = hello.total_steps  # a resumed run that now knows its length
            job.engine.plan(hello.total_steps)
            job.dirty = True
        if hello.resume is not None and hello.resume.last_step is not None:
            rank.last_step = hello.resume.last_step
        peer.last_sent_id = max([after, *(int(d["id"]) for d in decisions)])
        job.move("hello")
        self._seen(job)
        return Attached(job=job, decisions=decisions)

    def detach(self, job: Job, rank: int, peer: Peer) -> None:
        """``peer`` went away; the job stays (it may reconnect) and goes stale on silence."""
        r = job.ranks.get(rank)
        if r is not None and r.session is peer:
            r.session = None
        job.dirty = True

    def _create(self, hello: Hello, run_id: str) -> Job:
        labels = dict(hello.labels)
        policy = dict(hello.policy) if hello.policy is not None else None
        try:
            spec = self.config.job_spec_for(hello.job, labels, policy)
        except ConfigError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc), "hello") from None
        try:
            engine = JobEngine(spec, hello.lrs, hello.world_size)
            engine.plan(hello.total_steps)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"hello: {exc}", "hello") from None
        meta = {
            "labels": labels,
            "policy": policy,
            "initial_lrs": list(hello.lrs),
            "momentums": list(hello.momentums) if hello.momentums is not None else None,
            "world_size": hello.world_size,
            "client": hello.client,
            "total_steps": hello.total_steps,
        }
        job = Job(name=hello.job, run_id=run_id, engine=engine, meta=meta)
        self.jobs[hello.job] = job
        return job

    # ------------------------------------------------------------------ ingest (hot path)

    def ingest(self, job: Job, rank: int, batch: MetricsBatch) -> Fanout | None:
        """Feed a metrics batch of one rank to the job's engine.

        Returns the decisions it caused (journaled already) with the peers to send them to.
        Raises :class:`ProtocolError` (too_many_metrics) without feeding anything when the
        batch would take the job over its metric-name limit.
        """
        values = batch.values
        names = job.metric_names
        if not names.issuperset(values):
            new = [n for n in values if n not in names]
            limit = self.limits.max_metric_names_per_job
            if len(names) + len(new) > limit:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_METRICS,
                    f"metrics.values: job {job.name!r} would have {len(names) + len(new)} "
                    f"metric names; the limit is {limit} (first new: {new[0]!r})",
                    "metrics",
                )
            names.update(new)
        steps = batch.steps
        n = len(steps)
        if n == 0:
            self._seen(job)
            return None
        times = batch.times
        outputs = job.engine.feed_batch(steps, values, batch.epochs, times, rank)
        points = 0
        for col in values.values():
            points += n - col.count(None)
        self.stats.points += points
        if self.tensorboard is not None:
            self.tensorboard.on_outputs(job.name, steps[-1], job.engine.lrs, outputs)
        job.points += points
        job.records += n
        job.records_since_snapshot += n
        r = job.ranks.get(rank)
        if r is not None:
            r.last_step = steps[-1]
        if times is not None and times[-1] is not None:
            job.ingest_lag = max(0.0, self.wall_clock() - float(times[-1]))
            self.stats.ingest_lag_seconds = job.ingest_lag
        if job.state is not S.RUNNING:
            job.move("metrics")
        self._seen(job)
        if outputs:
            return self._outputs(job, outputs)
        if job.records_since_snapshot >= self.config.storage.snapshot_every_records:
            self.store.enqueue_snapshot(job.snapshot())
            job.records_since_snapshot = 0
            job.dirty = False
        else:
            job.dirty = True
        return None

    def checkpoint(self, job: Job, rank: int, step: int) -> None:
        """The job saved a good checkpoint at ``step``."""
        job.engine.feed(CheckpointSaved(step=step, rank=rank))
        self._seen(job)
        job.dirty = True

    def heartbeat(self, job: Job, rank: int, step: int | None) -> None:
        """Refresh last-seen."""
        self._seen(job)

    def ack(self, job: Job, rank: int, decision_id: int, applied_at_step: int) -> None:
        """A rank applied a decision."""
        r = job.ranks.get(rank)
        if r is not None:
            r.last_ack = decision_id
        self.store.enqueue_ack(job.name, job.run_id, decision_id, rank, applied_at_step)
        self._seen(job)

    def finished(self, job: Job, rank: int, step: int | None) -> None:
        """A rank ended normally; the job is finished when every known rank has."""
        r = job.ranks.get(rank)
        if r is not None:
            r.finished = True
            if step is not None:
                r.last_step = step
        self._seen(job)
        if all(x.finished for x in job.ranks.values()):
            job.move("finished")
            if self.tensorboard is not None:
                self.tensorboard.close(job.name)
        self.store.enqueue_snapshot(job.snapshot())
        job.dirty = False

    # ------------------------------------------------------------------ operator

    def manual(
        self, job: Job, command: str, lrs: Sequence[float] | None, reason: str, actor: str
    ) -> Fanout:
        """An operator's set_lr / pause / resume; raises ValueError on bad lrs."""
        eng = job.engine
        decision: Decision | None
        if command == "set_lr":
            assert lrs is not None
            decision = eng.manual_set_lr(lrs, reason, actor)
        elif command == "pause":
            decision = eng.pause(actor)
        elif command == "resume":
            decision = eng.resume(actor)
        else:  # pragma: no cover - the protocol module checks command names
            raise ValueError(f"unknown command {command!r}")
        job.version += 1  # paused/resumed without a decision still counts as a change
        if decision is not None and self.tensorboard is not None:
            self.tensorboard.on_outputs(job.name, decision.apply_at_step, eng.lrs, [decision])
        fan = self._outputs(job, [decision] if decision is not None else [])
        if fan is None:
            self.store.enqueue_snapshot(job.snapshot())
            return Fanout(job, [], [])
        return fan

    # ------------------------------------------------------------------ internals

    def _outputs(self, job: Job, outputs: Iterable[Any]) -> Fanout | None:
        decisions: list[dict[str, Any]] = []
        for o in outputs:
            if isinstance(o, Decision):
                decisions.append(o.to_dict())
            elif isinstance(o, Detection):
                job.recent_detections.append(
                    {
                        "detector": o.detector,
                        "metric": o.metric,
                        "step": o.step,
                        "value": o.value,
                        "reason": o.reason,
                    }
                )
        if not decisions:
            if job.records_since_snapshot >= self.config.storage.snapshot_every_records:
                self.store.enqueue_snapshot(job.snapshot())
                job.records_since_snapshot = 0
                job.dirty = False
            else:
                job.dirty = True
            return None
        wire = self._journal(job, decisions)
        return Fanout(job, decisions, job.sessions(), wire)

    def _journal(self, job: Job, decisions: list[dict[str, Any]]) -> list[str]:
        """Commit decisions with the snapshot that produced them, before anyone sees them.

        Returns the decision frames' text, made from the journal's: a decision's frame is
        its journal JSON with the message type in front (both spell NaN and ±Inf as strings).
        """
        if job.engine.halted and job.state is not S.HALTED:
            job.move("halt")
        texts = [dumps(d) for d in decisions]
        self.store.commit_decisions(decisions, job.snapshot(), texts)
        job.version += 1
        job.records_since_snapshot = 0
        job.dirty = False
        now = self.wall_clock()
        for d in decisions:
            job.recent_decisions.append({**d, "created": now})
        # a decision's dict (Decision.to_dict) is never empty and has no "type" of its own
        return [_DECISION_HEAD + text[1:] for text in texts]

    def _seen(self, job: Job) -> None:
        # every message passes here, and only messages feed the engine: one version bump
        # covers new metric values, counters and steps
        job.last_seen = now = self.clock()
        job.last_seen_wall = now + self.wall_offset
        job.version += 1

    # ------------------------------------------------------------------ maintenance

    def tick(self, *, snapshot_dirty: bool = True) -> list[str]:
        """Periodic work: stale detection, TTL eviction, snapshots of dirty jobs.

        Returns the names of jobs that went stale in this tick.
        """
        now = self.clock()
        self.wall_offset = self.wall_clock() - now
        stale_after = self.config.server.stale_after_seconds
        ttl = self.config.exporter.finished_job_ttl_seconds
        went_stale: list[str] = []
        evict: list[str] = []
        for job in self.jobs.values():
            silent = now - job.last_seen
            if job.state in (S.CONNECTED, S.RUNNING) and silent > stale_after:
                job.move("silence")
                went_stale.append(job.name)
                job.dirty = True
            elif job.state in (S.FINISHED, S.HALTED) and not job.sessions() and silent > ttl:
                evict.append(job.name)
            if snapshot_dirty and job.dirty:
                self._snapshot(job)
        for name in evict:
            del self.jobs[name]
            self.store.delete_job(name)
        return went_stale

    def snapshot_dirty(self, limit: int) -> int:
        """Queue snapshots of at most ``limit`` jobs changed since their last one.

        Returns how many; the daemon calls it until 0, letting other work run in between,
        so that 1,000 busy jobs do not hold the event loop for tens of milliseconds at once.
        """
        done = 0
        for job in self.jobs.values():
            if job.dirty:
                self._snapshot(job)
                done += 1
                if done >= limit:
                    break
        return done

    def _snapshot(self, job: Job) -> None:
        self.store.enqueue_snapshot(job.snapshot())
        job.records_since_snapshot = 0
        job.dirty = False

    def snapshot_all(self) -> None:
        """Queue a snapshot of every job (at shutdown)."""
        for job in self.jobs.values():
            self.store.enqueue_snapshot(job.snapshot())
            job.dirty = False

    def counts_by_state(self) -> dict[str, int]:
        # counted in C: `lrpilot status` (and every benchmark client's sync) asks for this
        out: dict[str, int] = {}
        for state, n in Counter(map(_STATE_OF, self.jobs.values())).items():
            key = _export_state(state)
            out[key] = out.get(key, 0) + n
        return out

    def get(self, name: str) -> Job | None:
        return self.jobs.get(name)

    def views(self) -> list[Any]:
        """One :class:`monitor.exporter.JobView` per job (scrape time).

        A job that did not change since the previous call (same :attr:`Job.version`) gets the
        very same view object, which the exporter's renderer recognises and does not render
        again: a scrape of 1,000 mostly idle jobs costs little more than its idle jobs' lists.
        :attr:`ended_views` tells afterwards how many of the views are of finished or halted
        jobs (the only ones an exporter TTL can drop).
        """
        from ..exporter import JobView

        out = []
        previous = self._views
        sources: dict[str, _ViewSource] = {}
        ended = 0
        for name, job in self.jobs.items():
            src = previous.get(name)
            if src is not None and src.job is job:
                if src.version is job.version:
                    # the same int object: versions only grow, so a changed one is another
                    # object (comparing the objects spares reading two ints per job)
                    sources[name] = src
                    out.append(src.view)
                    ended += src.ended
                    continue
            else:
                src = None  # a new job, or a job of the same name that replaced it (a new run)
            # one call for everything that changes while a job trains (see JobEngine.exported)
            lrs, values, nonfinite, bad, step, made, counts = job.engine.exported()
            lrs = tuple(lrs)
            seen = job.last_seen_wall
            state = job.state
            # The steady token (see JobView.steady): the decision, detection and nonfinite
            # counts, the LRs, the state, the metric names and which optional series exist.
            # Counts start at 1 and only grow by one (a decision adds one to decisions_made),
            # so equal sums mean equal counts. The engine's dict of last values is the same
            # object for the engine's life and only gains names, at its end, so the same dict
            # and size mean the same names in the same order.
            steady = (
                made,
                sum(counts.values()),
                sum(nonfinite.values()),
                lrs,
                state,
                id(values),
                len(values),
                bad is None,
                step is None,
                seen is None,
            )
            if src is not None and src.steady == steady:
                # only the numbers moved: the same token promises the rest to the renderer
                old = src.view
                src.view = view = JobView(
                    name,
                    old.state,
                    old.lrs,
                    old.min_lrs,
                    values,
                    old.detections,
                    old.decisions,
                    old.nonfinite,
                    bad,
                    seen,
                    step,
                    src.steady,
                )
                src.version = job.version
                sources[name] = src
                out.append(view)
                ended += src.ended
                continue
            # What rarely changes (the LR floors, the detection and decision counts, the
            # exported state) comes from the job's previous view when it did not change.
            if src is not None and src.steady[:2] == steady[:2]:
                old = src.view
                min_lrs, detections, decisions = old.min_lrs, old.detections, old.decisions
            else:
                eng = job.engine
                min_lrs = tuple(eng.min_lrs)
                detections = _with_zero(counts, eng.detector_names)
                decisions = {}
                for kind_source, n in eng.decision_counts.items():
                    kind, _, source = kind_source.partition(":")
                    decisions[(kind, source)] = n
            if src is None or src.state is not state:
                exported = _export_state(state)
                is_ended = 1 if state is S.FINISHED or state is S.HALTED else 0
            else:
                exported, is_ended = src.view.state, src.ended
            view = JobView(
                name,
                exported,
                lrs,
                min_lrs,
                values,
                detections,
                decisions,
                nonfinite,
                bad,
                seen,
                step,
                steady,
            )
            out.append(view)
            ended += is_ended
            sources[name] = _ViewSource(job, job.version, view, state, is_ended, steady)
        self._views = sources
        self.ended_views = ended
        return out


class _ViewSource:
    """What :meth:`JobRegistry.views` keeps of a job's last view: the job, its version, the
    view, the job's state when the view was built, whether that state is finished or halted
    (1) or not (0), and the view's ``steady`` token (its first two items, the decision and
    detection counts, tell whether the LR floors, detections and decisions can be reused).
    Updated in place while only a job's numbers move."""

    __slots__ = ("ended", "job", "state", "steady", "version", "view")

    def __init__(
        self,
        job: Job,
        version: int,
        view: Any,
        state: JobState,
        ended: int,
        steady: tuple[Any, ...],
    ) -> None:
        self.job = job
        self.version = version
        self.view = view
        self.state = state
        self.ended = ended
        self.steady = steady


_STATE_OF = attrgetter("state")


def _export_state(state: JobState) -> str:
    # the exporter's catalogue has no "connected": a connected job is running, just quiet
    return "running" if state is S.CONNECTED else state.value


def _with_zero(counts: Mapping[str, int], names: Iterable[str]) -> dict[str, int]:
    out = {name: 0 for name in names}
    out.update(counts)
    return out
