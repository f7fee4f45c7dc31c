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
    # What /metrics shows of the job (JobRegistry.views), kept together near the object's
    # start: a scrape of 1,000 jobs reads these and nothing else of a job that only reported
    # numbers, and one or two cache lines of each job are all it costs.
    #: bumped by everything that can change what the exporter shows of this job
    version: int = 0
    #: bumped by everything that can change what the exporter shows of this job other than
    #: its numbers (metric values, plateau count, step, last-seen time): its state, LRs,
    #: counters, metric names, and whether it has a step or last-seen time at all
    shape: int = 0
    #: the job's last view (a monitor.exporter.JobView), the shape it was built at, and
    #: whether it is of a finished or halted job (1) or not (0)
    view: Any = None
    view_shape: int = -1
    view_ended: int = 0
    #: the engine's plateau count and step (see JobEngine.exported) after the last ingest or
    #: the last view built from the engine, whichever came later
    export_bad: int | None = None
    export_step: int | None = None
    #: the LRs the job's shape was last bumped for (a schedule moves them without a decision)
    export_lrs: tuple[float, ...] = ()
    last_seen_wall: float | None = None  # Unix time, for exports
    state: JobState = S.CONNECTED
    last_seen: float = 0.0  # daemon clock
    ranks: dict[int, Rank] = field(default_factory=dict)
    metric_names: set[str] = field(default_factory=set)
    #: the last RECENT decisions and detections, for /api/jobs/NAME and `lrpilot show`: an
    #: empty tuple until the first one (see remember), as most jobs never have one and an
    #: empty deque costs ~620 bytes, a third of an idle job's own memory
    recent_decisions: deque[dict[str, Any]] | tuple[()] = ()
    recent_detections: deque[dict[str, Any]] | tuple[()] = ()
    records: int = 0
    points: int = 0
    records_since_snapshot: int = 0
    dirty: bool = False
    ingest_lag: float = 0.0
    #: writes this job's snapshots as JSON, reusing the text of parts that did not change
    texts: SnapshotText = field(default_factory=SnapshotText)

    def sessions(self) -> list[Peer]:
        return [r.session for r in self.ranks.values() if r.session is not None]

    def move(self, event: str) -> None:
        self.state = next_state(self.state, event)
        self.version += 1
        self.shape += 1

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


def remember(
    ring: deque[dict[str, Any]] | tuple[()], item: dict[str, Any]
) -> deque[dict[str, Any]]:
    """``ring`` with ``item`` appended, the oldest dropped past RECENT; made on first use."""
    if isinstance(ring, tuple):
        ring = deque(maxlen=RECENT)
    ring.append(item)
    return ring


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
        #: how many of the last views() are of finished or halted jobs
        self.ended_views = 0
        #: TensorBoard output of LRs, detections and decisions (monitor.tboutput), when enabled
        self.tensorboard: Any = None
        #: the jobs of the last tick's snapshot pass not yet taken, last first (see
        #: snapshot_dirty); None when no pass is open
        self._tick_pass: list[Job] | None = None

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
                job.recent_decisions = remember(job.recent_decisions, d)
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
            job.shape += 1
        steps = batch.steps
        n = len(steps)
        if n == 0:
            self._seen(job)
            return None
        times = batch.times
        engine = job.engine
        outputs = engine.feed_batch(steps, values, batch.epochs, times, rank)
        # The numbers the next scrape shows, read while the engine's state is in the cache.
        # The price, paid at every frame: ~4.2k instructions of ~55k for a one-record frame of
        # two metrics through ingest() (callgrind, 7.7 %). Read at the scrape instead, the
        # same call meets cold engines: ~2.5-2.8 ms for 1,000 jobs that all reported.
        lrs, _, _, job.export_bad, step, _, _ = engine.exported()
        if outputs or job.export_step is None or lrs is not job.export_lrs:
            # a detection (its counters) or a decision, the first step, or LRs that moved
            # without a decision (a schedule: a new tuple, maybe of the same LRs)
            if outputs or job.export_step is None or lrs != job.export_lrs:
                job.shape += 1
            job.export_lrs = lrs
        job.export_step = step
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
        job.shape += 1  # nothing exported moves today; a rare message, so no promise needed
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
        job.shape += 1
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
                job.recent_detections = remember(
                    job.recent_detections,
                    {
                        "detector": o.detector,
                        "metric": o.metric,
                        "step": o.step,
                        "value": o.value,
                        "reason": o.reason,
                    },
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
        job.shape += 1
        job.records_since_snapshot = 0
        job.dirty = False
        now = self.wall_clock()
        for d in decisions:
            job.recent_decisions = remember(job.recent_decisions, {**d, "created": now})
        # a decision's dict (Decision.to_dict) is never empty and has no "type" of its own
        return [_DECISION_HEAD + text[1:] for text in texts]

    def _seen(self, job: Job) -> None:
        # every message passes here, and only messages feed the engine: one version bump
        # covers new metric values, counters and steps
        if job.last_seen_wall is None:  # a job restored without one gains its series
            job.shape += 1
        job.last_seen = now = self.clock()
        job.last_seen_wall = now + self.wall_offset
        job.version += 1

    # ------------------------------------------------------------------ maintenance

    def tick(self, *, snapshot_dirty: bool = True) -> list[str]:
        """Periodic work: stale detection, TTL eviction, snapshots of dirty jobs.

        With ``snapshot_dirty=False`` the snapshots are left to :meth:`snapshot_dirty`, a
        slice at a time: this tick's pass is the jobs dirty now. Returns the names of jobs
        that went stale in this tick.
        """
        now = self.clock()
        self.wall_offset = self.wall_clock() - now
        stale_after = self.config.server.stale_after_seconds
        ttl = self.config.exporter.finished_job_ttl_seconds
        went_stale: list[str] = []
        evict: list[str] = []
        tick_pass: list[Job] = []
        for job in self.jobs.values():
            silent = now - job.last_seen
            if job.state in (S.CONNECTED, S.RUNNING) and silent > stale_after:
                job.move("silence")
                went_stale.append(job.name)
                job.dirty = True
            elif job.state in (S.FINISHED, S.HALTED) and not job.sessions() and silent > ttl:
                evict.append(job.name)
            if job.dirty:
                if snapshot_dirty:
                    self._snapshot(job)
                else:
                    tick_pass.append(job)
        for name in evict:
            del self.jobs[name]
            self.store.delete_job(name)
        if not snapshot_dirty:
            tick_pass.reverse()  # taken from the end, in the jobs' order
            self._tick_pass = tick_pass
        return went_stale

    def snapshot_dirty(self, limit: int) -> int:
        """Queue snapshots of at most ``limit`` jobs changed since their last one.

        Returns how many; the daemon calls it until 0, letting other work run in between,
        so that 1,000 busy jobs do not hold the event loop for tens of milliseconds at once.

        After ``tick(snapshot_dirty=False)`` it takes only that tick's pass: the jobs that
        were dirty at the tick, each once, and then returns 0, which ends the pass. Without
        the pass, jobs fed between two calls were dirty again at the next call: under steady
        load the daemon's loop (tick, then calls until 0) snapshotted its busy jobs at every
        event-loop turn instead of once a tick, ~70 us each, until the load stopped.
        """
        done = 0
        tick_pass = self._tick_pass
        if tick_pass is None:
            for job in self.jobs.values():
                if job.dirty:
                    self._snapshot(job)
                    done += 1
                    if done >= limit:
                        break
            return done
        jobs = self.jobs
        while tick_pass and done < limit:
            job = tick_pass.pop()
            # not a job evicted or replaced by a new run since the tick
            if job.dirty and jobs.get(job.name) is job:
                self._snapshot(job)
                done += 1
        if not done:
            self._tick_pass = None
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
        again. A job whose :attr:`Job.shape` is the same, that is, of which only numbers moved
        (metric values, plateau count, step, last-seen time), gets the same view object too,
        *renewed* (see :class:`~monitor.exporter.JobView`'s ``stamp``) with the numbers the
        last ingest left on the job: neither the engine nor the view's other parts are read,
        and no object is made. Only a job whose shape changed has its view built from its
        engine. :attr:`ended_views` tells afterwards how many of the views are of finished
        or halted jobs (the only ones an exporter TTL can drop).
        """
        out = []
        ended = 0
        for job in self.jobs.values():
            view = job.view
            if view is not None and job.view_shape is job.shape:
                # the same int objects: shapes and versions only grow, so a changed one is
                # another object (comparing the objects spares reading the ints)
                if view.stamp is not job.version:
                    view.plateau_bad_evaluations = job.export_bad
                    view.last_seen = job.last_seen_wall
                    view.step = job.export_step
                    view.stamp = job.version
                out.append(view)
                ended += job.view_ended
                continue
            view = self._view(job)
            out.append(view)
            ended += job.view_ended
        self.ended_views = ended
        return out

    def _view(self, job: Job) -> Any:
        """The job's view built from its engine (its shape changed, or it has none yet)."""
        from ..exporter import JobView

        # one call for everything that changes while a job trains (see JobEngine.exported)
        eng = job.engine
        lrs, values, nonfinite, bad, step, made, counts = eng.exported()
        lrs = tuple(lrs)
        job.export_lrs, job.export_bad, job.export_step = lrs, bad, step
        seen = job.last_seen_wall
        state = job.state
        # The steady token (see JobView.steady): the decision, detection and nonfinite
        # counts, the LRs, the state, the metric names and which optional series exist.
        # Counts start at 1 and only grow by one (a decision adds one to decisions_made), so
        # equal sums mean equal counts. The engine's dict of last values is the same object
        # for the engine's life and only gains names, at its end, so the same dict and size
        # mean the same names in the same order.
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
        job.view_shape = job.shape
        old = job.view
        if old is not None and old.steady == steady:
            # only numbers moved after all (a shape change that changed nothing exported):
            # the view renewed, with its token
            old.plateau_bad_evaluations = bad
            old.last_seen = seen
            old.step = step
            old.stamp = job.version
            return old
        # What rarely changes (the LR floors, the detection and decision counts) comes from
        # the job's previous view when it did not change.
        if old is not None and old.steady[:2] == steady[:2]:
            min_lrs, detections, decisions = old.min_lrs, old.detections, old.decisions
        else:
            min_lrs = tuple(eng.min_lrs)
            detections = _with_zero(counts, eng.detector_names)
            decisions = {}
            for kind_source, n in eng.decision_counts.items():
                kind, _, source = kind_source.partition(":")
                decisions[(kind, source)] = n
        job.view_ended = 1 if state is S.FINISHED or state is S.HALTED else 0
        job.view = view = JobView(
            job.name,
            _export_state(state),
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
            job.version,
        )
        return view


_STATE_OF = attrgetter("state")


def _export_state(state: JobState) -> str:
    # the exporter's catalogue has no "connected": a connected job is running, just quiet
    return "running" if state is S.CONNECTED else state.value


def _with_zero(counts: Mapping[str, int], names: Iterable[str]) -> dict[str, int]:
    out = {name: 0 for name in names}
    out.update(counts)
    return out
