"""One websocket connection: the hello/welcome handshake, then one message at a time.

Two kinds of trouble, handled differently (as h11 does):

* **The peer sent something invalid** (bad JSON, a field of the wrong type, a message before
  its hello, a frame over the size limit, too many messages per second, a job its token may
  not use...): the daemon answers with an ``error`` message carrying a stable code, counts it
  under that code in :class:`DaemonStats`, and keeps reading. Nothing else is affected.
* **The daemon has a bug** (any other exception while handling a message): it is logged with
  its traceback, the peer gets ``error``/``internal``, and only that connection is closed with
  1011. Every other connection and job carries on.

The hot path (a metrics frame of a job that said hello) is: size check, token bucket, decode,
``registry.ingest`` (engine feed per record), send any decisions. Nothing is logged per message.
Messages come from the connection's inbox (:mod:`.connection`) without an ``await`` each, and
consecutive metrics frames that arrived together are fed to the engine as one batch. While the
session waits, the connection first offers each read's messages to :meth:`Session.take_now`,
which handles in the read's own callback what needs no waiting, so that a decision leaves in
the event-loop turn that read its frame; the session's task handles the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrpilot._protocol import (
    Ack,
    CheckpointNotice,
    Command,
    DecisionMsg,
    ErrorCode,
    ErrorMsg,
    Finished,
    Heartbeat,
    Hello,
    MetricsBatch,
    ProtocolError,
    Result,
    Welcome,
    decode,
    encode,
)
from websockets.exceptions import ConnectionClosed

from .auth import Principal
from .connection import JobConnection
from .daemon_stats import DaemonStats
from .jobs import Fanout, Job, JobRegistry
from .limits import TokenBucket

log = logging.getLogger("lrpilot.sessions")

#: longest a connection processes queued frames before letting the others run
FAIR_SLICE_SECONDS = 0.0005

#: most messages one read may bring for :meth:`Session.take_now` to handle them in the read's
#: callback; a larger backlog goes to the session's task, which yields every fair slice
TAKE_NOW_MAX = 64
#: longest :meth:`Session.take_now` takes messages in a read's callback (one fair slice)
TAKE_NOW_SECONDS = FAIR_SLICE_SECONDS

#: messages :meth:`Session.take_now` handles (the others need a reply or may need to wait)
_TAKEN_NOW = frozenset({"metrics", "ack", "heartbeat", "checkpoint"})


@dataclass(slots=True)
class Hub:
    """What every session shares: the registry, the counters, and the daemon's status."""

    registry: JobRegistry
    stats: DaemonStats
    status: Callable[[], dict[str, Any]]
    clock: Callable[[], float]


class Session:
    """The daemon's side of one connection (a job rank or an operator)."""

    def __init__(self, ws: JobConnection, hub: Hub, principal: Principal) -> None:
        self.ws = ws
        self.hub = hub
        self.principal = principal
        self.session_id = str(uuid.uuid4())
        self.job: Job | None = None
        self.rank = 0
        self.last_sent_id = 0
        limits = hub.registry.limits
        self._rate = limits.max_messages_per_second
        self.bucket = TokenBucket(self._rate, now=hub.clock())
        self._closing: asyncio.Task[None] | None = None
        #: metrics frames take_now() decoded but could not feed (a peer could not be written
        #: to at once), with the time the first was taken: run() feeds them first
        self._held: list[MetricsBatch] = []
        self._held_t0 = 0.0
        #: a bug take_now() met, raised again by run() (logged there, connection closed 1011)
        self._failure: Exception | None = None
        ws.on_messages = self.take_now

    # ------------------------------------------------------------------ registry callbacks

    def detach(self, reason: str) -> None:
        """The registry gave this rank to another connection: close this one (1000)."""
        self.job = None
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self.ws.close(1000, reason[:120])
            )

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Read messages until the peer goes away."""
        ws = self.ws
        try:
            while await ws.wait_messages():
                ws.pending = False
                failure = self._failure
                if failure is not None:
                    self._failure = None
                    raise failure
                await self._drain(ws.inbox)
                ws.taken()
        finally:
            ws.on_messages = None
            if self.job is not None:
                self.hub.registry.detach(self.job, self.rank, self)
                self.job = None

    async def _drain(self, inbox: deque[str | bytes]) -> None:
        """Handle the messages waiting in ``inbox``, in order, for one fair slice at most.

        Consecutive metrics frames of this connection's job whose metric names the job
        already has are held in ``held`` and fed to the engine in one batch, which gives the
        same outputs as feeding them one by one (``JobEngine.feed_batch``). They are fed
        before anything else is done (a reply, another message type, the end of the slice),
        so every reply and decision leaves in the order of the frames that caused it.
        """
        hub = self.hub
        stats = hub.stats
        registry = hub.registry
        clock = hub.clock
        perf = time.perf_counter
        held = self._held  # what take_now() left, fed before anything after it
        held_t0 = self._held_t0
        self._held = []
        slice_start = perf()
        # the daemon clock is read once per slice (<= FAIR_SLICE_SECONDS): the token bucket
        # then refills at the next slice, never allowing more than with a reading per frame
        now = clock()
        counts = stats.messages
        while inbox:
            t0 = perf()
            if t0 - slice_start > FAIR_SLICE_SECONDS:
                # a backlog of queued frames is read without ever suspending: give the
                # other connections their turn, or one busy job starves everyone else
                if held:
                    await self._feed(held, held_t0)
                await asyncio.sleep(0)
                slice_start = perf()
                now = clock()
                continue
            raw = inbox.popleft()
            limits = registry.limits
            if len(raw) > limits.max_frame_bytes:
                await self._refuse_after(
                    held,
                    held_t0,
                    ProtocolError(
                        ErrorCode.FRAME_TOO_LARGE,
                        f"frame has {len(raw)} bytes; the limit is {limits.max_frame_bytes}"
                        " (server.max_frame_bytes)",
                    ),
                )
                continue
            if limits.max_messages_per_second != self._rate:
                self._rate = limits.max_messages_per_second
                self.bucket.reconfigure(self._rate)
            if not self.bucket.allow(now):
                await self._refuse_after(
                    held,
                    held_t0,
                    ProtocolError(
                        ErrorCode.RATE_LIMITED,
                        f"more than {self._rate:g} messages per second "
                        "(limits.max_messages_per_second); message dropped",
                    ),
                )
                continue
            try:
                msg = decode(raw)
            except ProtocolError as exc:
                stats.count_message(None)
                await self._refuse_after(held, held_t0, exc)
                continue
            kind = msg.type
            job = self.job
            if kind == "metrics" and job is not None:
                counts["metrics"] = counts.get("metrics", 0) + 1  # stats.count_message, inlined
                assert isinstance(msg, MetricsBatch)
                if job.metric_names.issuperset(msg.values):
                    if not held:
                        held_t0 = t0
                    held.append(msg)
                    continue
            else:
                stats.count_message(kind)
            if held:
                await self._feed(held, held_t0)
            try:
                if kind == "metrics":
                    if self.job is None:
                        raise _not_hello(kind)
                    assert isinstance(msg, MetricsBatch)
                    fan = registry.ingest(self.job, self.rank, msg)
                    if fan is not None:
                        await self._send_fanout(fan, t0)
                else:
                    await self._dispatch(msg, t0)
            except ProtocolError as exc:
                await self._refuse(exc)
        if held:
            await self._feed(held, held_t0)

    def take_now(self) -> None:
        """Handle the messages at the head of the inbox that need no waiting, right away.

        Called by the connection from ``data_received`` while :meth:`run` waits for
        messages, for at most one fair slice (:data:`TAKE_NOW_SECONDS`). Takes metrics
        frames of this job whose metric names the job already has (fed as one batch, as
        :meth:`_drain` does), acks, heartbeats and checkpoints, and
        stops at the first other message, or one to refuse, which it leaves in the inbox
        for :meth:`_drain` (it decodes such a message twice; they are rare). Decisions go
        out through :meth:`JobConnection.write_text` when every peer of the job can be
        written to at once; otherwise the frames stay in :attr:`_held` and the task feeds
        them. Never raises: a bug is kept for :meth:`run` to raise.
        """
        try:
            self._take_now()
        except Exception as exc:
            self._failure = exc
            self.ws.pending = True

    def _take_now(self) -> None:
        ws = self.ws
        inbox = ws.inbox
        job = self.job
        if job is None or len(inbox) > TAKE_NOW_MAX:
            return
        hub = self.hub
        registry = hub.registry
        limits = registry.limits
        if limits.max_messages_per_second != self._rate:
            return  # _drain reconfigures the bucket
        stats = hub.stats
        counts = stats.messages
        bucket = self.bucket
        names = job.metric_names
        now = hub.clock()
        perf = time.perf_counter
        t0 = perf()
        held: list[MetricsBatch] = []
        while inbox:
            raw = inbox[0]
            if len(raw) > limits.max_frame_bytes or perf() - t0 > TAKE_NOW_SECONDS:
                break  # what is left of a long read goes to the task, which takes turns
            try:
                msg = decode(raw)
            except ProtocolError:
                break
            kind = msg.type
            if kind not in _TAKEN_NOW:
                break
            if isinstance(msg, MetricsBatch):
                if not names.issuperset(msg.values):
                    break
            elif held and not self._feed_now(held, t0):
                break  # the frames wait in _held for the task, and this message after them
            if not bucket.allow(now):
                break
            inbox.popleft()
            if isinstance(msg, MetricsBatch):
                counts["metrics"] = counts.get("metrics", 0) + 1
                held.append(msg)
                continue
            stats.count_message(kind)
            if isinstance(msg, Ack):
                registry.ack(job, self.rank, msg.id, msg.applied_at_step)
            elif isinstance(msg, Heartbeat):
                registry.heartbeat(job, self.rank, msg.step)
            else:
                assert isinstance(msg, CheckpointNotice)
                registry.checkpoint(job, self.rank, msg.step)
        if held:
            self._feed_now(held, t0)
        ws.taken()

    def _feed_now(self, held: list[MetricsBatch], t0: float) -> bool:
        """Feed ``held`` and send the decisions at once, if every peer can be written to at
        once; else keep the frames in :attr:`_held` for the task. True when fed."""
        job = self.job
        assert job is not None
        for peer in job.sessions():
            ws = getattr(peer, "ws", None)
            if ws is not None and not (type(ws) is JobConnection and ws.can_send_now()):
                self._held = held[:]
                self._held_t0 = t0
                self.ws.pending = True
                held.clear()
                return False
        batch = held[0] if len(held) == 1 else merge_batches(held)
        held.clear()
        fan = self.hub.registry.ingest(job, self.rank, batch)
        if fan is None or not fan.decisions:
            return True
        # no await since the check above: every peer can still take them (write_text)
        stats = self.hub.stats
        for peer, pending in _pending_by_peer(fan):
            ws = getattr(peer, "ws", None)
            if ws is None:
                continue
            assert type(ws) is JobConnection
            for text in pending:
                ws.write_text(text)
            stats.decisions_sent += len(pending)
        stats.decision_latency.observe(time.perf_counter() - t0)
        return True

    async def _refuse_after(
        self, held: list[MetricsBatch], t0: float, exc: ProtocolError
    ) -> None:
        """Refuse a frame, after feeding the frames held before it (answers keep frame order)."""
        if held:
            await self._feed(held, t0)
        await self._refuse(exc)

    async def _feed(self, held: list[MetricsBatch], t0: float) -> None:
        """Feed the held metrics frames to the job's engine as one batch (and empty ``held``)."""
        batch = held[0] if len(held) == 1 else merge_batches(held)
        held.clear()
        job = self.job
        assert job is not None  # only an await can detach the job, and none came between
        try:
            fan = self.hub.registry.ingest(job, self.rank, batch)
        except ProtocolError as exc:  # pragma: no cover - the names were checked when held
            await self._refuse(exc)
            return
        if fan is not None:
            await self._send_fanout(fan, t0)

    async def _refuse(self, exc: ProtocolError) -> None:
        code = exc.code.value if isinstance(exc.code, ErrorCode) else str(exc.code)
        self.hub.stats.reject(code)
        await self.ws.send(encode(ErrorMsg(code=code, message=exc.message, ref=exc.ref)))

    # ------------------------------------------------------------------ message types

    async def _dispatch(self, msg: Any, t0: float) -> None:
        registry = self.hub.registry
        if isinstance(msg, Hello):
            await self._hello(msg, t0)
            return
        if isinstance(msg, Command):
            await self._command(msg, t0)
            return
        job = self.job
        if isinstance(msg, (CheckpointNotice, Ack, Heartbeat, Finished)):
            if job is None:
                raise _not_hello(msg.type)
            if isinstance(msg, CheckpointNotice):
                registry.checkpoint(job, self.rank, msg.step)
            elif isinstance(msg, Ack):
                registry.ack(job, self.rank, msg.id, msg.applied_at_step)
            elif isinstance(msg, Heartbeat):
                registry.heartbeat(job, self.rank, msg.step)
            else:
                registry.finished(job, self.rank, msg.step)
            return
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{msg.type}: the daemon does not accept {msg.type!r} messages "
            "(it sends them)",
            msg.type,
        )

    async def _hello(self, hello: Hello, t0: float) -> None:
        if self.job is not None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"hello: this connection already said hello for job {self.job.name!r}",
                "hello",
            )
        if not self.principal.may_stream(hello.job):
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"hello.job: token {self.principal.name!r} may not stream job {hello.job!r}",
                "hello",
            )
        attached = self.hub.registry.attach(hello, self)
        job = attached.job
        self.job = job
        self.rank = hello.rank
        eng = job.engine
        welcome = Welcome(
            session=self.session_id,
            job=job.name,
            lrs=tuple(eng.lrs),
            policy=eng.policy_block,
            schedule=eng.segment,
            decisions=tuple(attached.decisions),
        )
        # no await between attach() and this send: a decision journaled after attach()
        # reaches this peer through fan-out, strictly after its welcome
        await self.ws.send(encode(welcome))
        if attached.decisions:
            self.hub.stats.decisions_sent += len(attached.decisions)

    async def _command(self, cmd: Command, t0: float) -> None:
        if not self.principal.is_admin:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"command.command: {cmd.command!r} needs an admin token",
                "command",
            )
        registry = self.hub.registry
        data: dict[str, Any]
        if cmd.command == "status":
            data = self.hub.status()
        elif cmd.command == "jobs":
            data = {"jobs": [j.summary() for j in registry.jobs.values()]}
        else:
            job = registry.get(cmd.job or "")
            if job is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_JOB, f"command.job: no job named {cmd.job!r}", "command"
                )
            if cmd.command == "show":
                data = {"job": job.detail()}
            else:
                actor = cmd.actor or self.principal.name
                try:
                    fan = registry.manual(job, cmd.command, cmd.lrs, cmd.reason or "", actor)
                except ValueError as exc:
                    raise ProtocolError(
                        ErrorCode.BAD_MESSAGE, f"command.{exc}", "command"
                    ) from None
                await self._send_fanout(fan, t0)
                data = {
                    "decision": fan.decisions[-1] if fan.decisions else None,
                    "job": job.summary(),
                }
        await self.ws.send(encode(Result(ok=True, data=data)))

    # ------------------------------------------------------------------ fan-out

    async def _send_fanout(self, fan: Fanout, t0: float) -> None:
        """Send journaled decisions to every peer of the job that has not had them yet."""
        if not fan.decisions:
            return
        stats = self.hub.stats
        for peer, pending in _pending_by_peer(fan):
            ws = getattr(peer, "ws", None)
            if ws is None:
                continue
            try:
                for text in pending:
                    # written at once when the connection can take it, else the full path
                    if not (type(ws) is JobConnection and ws.send_now(text)):
                        await ws.send(text)
            except ConnectionClosed:
                continue  # that rank gets them from the journal when it reconnects
            stats.decisions_sent += len(pending)
        stats.decision_latency.observe(time.perf_counter() - t0)


def _pending_by_peer(fan: Fanout) -> list[tuple[Any, list[str]]]:
    """Each peer of ``fan`` with the decision frames it has not had, which are marked sent
    (``last_sent_id``) for every peer before the caller's first await, so that no other
    path sends them again."""
    wire = fan.wire
    if len(wire) != len(fan.decisions):
        wire = [encode(DecisionMsg(d)) for d in fan.decisions]
    texts = [(int(d["id"]), text) for d, text in zip(fan.decisions, wire, strict=True)]
    last = texts[-1][0]
    out = []
    for peer in fan.peers:
        pending = [text for i, text in texts if i > peer.last_sent_id]
        if pending:
            peer.last_sent_id = max(peer.last_sent_id, last)
            out.append((peer, pending))
    return out


def merge_batches(batches: list[MetricsBatch]) -> MetricsBatch:
    """One batch with the records of ``batches`` in order.

    A metric (or the ``epochs`` / ``times`` column) that some of the batches lack is None at
    their records, which is what None means in a batch: not reported at that step.
    """
    steps: list[int] = []
    values: dict[str, list[float | None]] = {}
    epochs: list[int | None] | None = None
    times: list[float | None] | None = None
    for b in batches:
        done = len(steps)
        steps += b.steps
        for name, column in b.values.items():
            merged = values.get(name)
            if merged is None:
                merged = values[name] = [None] * done
            elif len(merged) < done:
                merged += [None] * (done - len(merged))
            merged += column
        if b.epochs is not None:
            if epochs is None:
                epochs = [None] * done
            elif len(epochs) < done:
                epochs += [None] * (done - len(epochs))
            epochs += b.epochs
        if b.times is not None:
            if times is None:
                times = [None] * done
            elif len(times) < done:
                times += [None] * (done - len(times))
            times += b.times
    n = len(steps)
    for merged in values.values():
        if len(merged) < n:
            merged += [None] * (n - len(merged))
    if epochs is not None and len(epochs) < n:
        epochs += [None] * (n - len(epochs))
    if times is not None and len(times) < n:
        times += [None] * (n - len(times))
    return MetricsBatch(steps=steps, values=values, epochs=epochs, times=times)


def _not_hello(kind: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.NOT_HELLO,
        f"{kind}: a job connection must send hello first",
        kind,
    )
