"""The training-side client: buffer metrics, stream them in the background, apply decisions.

Two threads share a :class:`Client`:

- the **training thread** calls :meth:`Client.report` (append a tuple to a deque; a few
  microseconds, never blocks, never raises) and :meth:`Client.lrs_for_step` (apply the
  decisions due at this step; see ``lrpilot._decisions``);
- a daemon **sender thread** wakes every ``flush_interval`` seconds (0.2 s by default) while
  points keep coming, drains the deque into one columnar ``metrics`` frame and sends it with
  the acks of applied decisions. It sleeps while nothing is reported, and the training thread
  wakes it for a point or an ack after such a pause; a NaN or ±Inf value, a checkpoint notice
  and :meth:`Client.flush` wake it at once in any case. When the daemon is absent, slow or
  restarting it reconnects with jittered exponential backoff and resumes with
  ``{last_decision_id, last_step}``;
- while connected, a daemon **receiver thread** waits for what the daemon sends and queues
  decisions as they arrive (it wakes every ten seconds when nothing does).

Fail-open: nothing the daemon does (or fails to do) stops training. Without a daemon the job
keeps its last learning rate; the buffer is bounded and drops its oldest points, counted in
``client.stats.dropped_points``; :meth:`Client.close` gives up after ``close_timeout``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import operator
import os
import random
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import repeat, starmap
from typing import TYPE_CHECKING, Any

from . import _protocol as proto
from ._decisions import Decision, LRState
from ._transport import (
    Connection,
    Transport,
    TransportClosed,
    TransportRefused,
    WebSocketTransport,
)

if TYPE_CHECKING:
    import ssl as ssl_module

__all__ = ["Backoff", "Client", "ClientStats"]

log = logging.getLogger("lrpilot")

CLIENT_NAME = "lrpilot-py/0.1.0"
EXTERNAL_LR_METRIC = "lrpilot_external_lr_changes"

# a buffer entry is (step, epoch, wall time, metrics); a checkpoint notice uses this marker
_CHECKPOINT: Mapping[str, Any] = {}

# how long the receiver thread waits in conn.recv at a time (it wakes this often when idle).
# Dropping a connection closes it, which ends the wait at once: the timeout is only a
# safety net, and each one costs ~140 µs of CPU (websockets' timeout path), which at one a
# second was 0.2 µs per 1.2 ms training step
_RECEIVER_WAIT = 10.0

# what report()'s short path reads as module globals rather than the builtin ``float`` and
# ``time.time``: one dictionary fewer to look in, with the caches a training step leaves. It
# checks ``type(value)``, which the interpreter specializes to a pointer read, where
# ``value.__class__`` is a descriptor lookup (0.2-0.8 µs less per step measured in a loop)
_FLOAT = float
_now = time.time

# refusals that will not go away by retrying quickly
_PERMANENT_REFUSALS = frozenset(
    {"unauthorized", "forbidden", "protocol_version", "bad_message", "too_many_jobs"}
)


@dataclass(slots=True)
class ClientStats:
    """Counters of one client. Read them any time; they only grow (``connected`` aside)."""

    reported_points: int = 0
    dropped_points: int = 0  # oldest points dropped because the buffer was full
    report_errors: int = 0  # report() calls that failed (swallowed)
    bad_values: int = 0  # metric values that were not numbers (sent as null)
    sent_points: int = 0
    sent_frames: int = 0
    connects: int = 0  # successful handshakes
    connect_failures: int = 0
    disconnects: int = 0
    decisions_received: int = 0
    decisions_applied: int = 0
    decision_errors: int = 0  # decisions or segments the client could not follow
    acks_sent: int = 0
    errors_received: int = 0  # error messages from the daemon
    sender_errors: int = 0  # unexpected exceptions in the sender thread
    external_lr_changes: int = 0
    connected: bool = False
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backoff:
    """Jittered exponential backoff: ``initial * factor**n`` capped at ``maximum``, times a
    random factor in ``[1 - jitter, 1]`` so that many clients do not retry in lock step."""

    def __init__(
        self,
        initial: float = 0.05,
        maximum: float = 5.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.rng = rng
        self.attempts = 0

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the base delay."""
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return base * (1.0 - self.jitter * self.rng())

    def reset(self) -> None:
        self.attempts = 0


class _Refused(Exception):
    def __init__(self, msg: proto.ErrorMsg) -> None:
        super().__init__(f"{msg.code}: {msg.message}")
        self.msg = msg


class Client:
    """Stream metrics to the lrpilot daemon and follow its learning-rate decisions.

    ``initial_lr`` is one float or one per param group. ``token`` defaults to the
    ``LRPILOT_TOKEN`` environment variable, ``run_id`` to ``LRPILOT_RUN_ID``. For a ``wss://``
    URL, ``ssl`` is the TLS context (e.g. ``ssl.create_default_context(cafile="ca.pem")`` for
    a daemon with a private certificate); without one, the CA file named by
    ``LRPILOT_CACERT`` is trusted when that is set, else the system's CAs. In a multi-rank
    (DDP) job every rank makes its own client with its ``rank`` and ``world_size``; the daemon
    picks ``apply_at_step`` ahead of every rank so that all ranks switch at the same step.
    ``total_steps``, if the job knows how many steps it will train, lets the daemon's policy
    anneal the LR over the end of the run (the default policy's ``anneal``).

    ``flush_interval`` is how often the sender thread wakes to send what was reported while
    points keep coming, and so the longest a point waits in the buffer; decisions are
    received as soon as they arrive, whatever it is. The batching adapts to the job's pace:
    when steps come fast, each wake-up sends one frame with every point of the interval; when
    they come slower than ``flush_interval`` the sender goes idle after a wake-up with nothing
    to send, and the next report wakes it and is sent at once. Some points do not wait: a
    report with a NaN or ±Inf value (a CPU tensor's too, once converted) and a checkpoint
    notice wake the sender at once, so that batching does not delay a NaN's rollback; at
    most one early wake-up per ``flush_interval`` for each of the two, so a metric that is
    NaN at every step at most doubles the wake-ups. :meth:`flush` also sends at once.

    Why 0.2 s: every wake-up costs the process CPU time, most of it fixed whatever the frame
    carries. Inside a training loop of ~2 ms steps on the 2-core VM we measure on, a wake-up
    took 400-500 µs of thread CPU with 50-80 points (2026-12-02): the timed wait 50-60 µs,
    the websocket send 100-110 µs (most of it the kernel's loopback), the draining and
    encoding about 200 µs plus 2-3.5 µs per point (``float.__repr__`` of each value is half
    of that); code that ran long ago runs several times slower than in a loop
    (``bench/bench_client.py --wake-cost`` measures a wake-up's sending). The fixed part
    divided by ``flush_interval`` is 0.25-0.3 % of a core at 0.1 s, 1.3-1.5 % at 20 ms. Per
    2.3 ms step on a busy host (2026-12-03, ``python bench/bench_client.py --cpu-only
    --flush-interval 0.1 0.15 0.2``), the background threads took 10.5 µs at 0.1 s, 8.2 at
    0.15 s and 6.3 at 0.2 s, and lrpilot's whole share of the step was 1.36, 1.15 and
    1.08 %; beyond that the cost per point dominates. That CPU is also
    what a wake-up costs the training thread's wall time: torch releases the GIL inside
    every operation, so the sender takes it at the training thread's next operation, which
    then waits for it until the sender lets go (``sys.setswitchinterval`` changes nothing
    here: 0.5, 5 and 50 ms measured the same within noise). A wake-up takes the GIL twice,
    after its wait and after the socket write (and a masking key costs no system call, see
    ``_transport._MASKS_PER_DRAW``): each hand-off makes the training thread sleep and
    wake, and on a host with more runnable threads than cores it may then wait for a core.
    A point that waits does not eat into the daemon's apply lead: a decision that a point
    causes applies ``apply_lead_seconds`` (0.25 s by default) of the job's steps after the
    last step of the frame that carried it (or ``apply_lead_steps`` after it while the
    daemon does not know the job's pace yet), which left the job a moment before the frame
    did; the send and the daemon's answer need less than that (under load its decision
    round trip reaches tens of milliseconds at the median, and more at the tail), so
    decisions arrive before their step and the ranks of a DDP job switch together. What
    the wait costs is reaction time: a decision applies up to ``flush_interval`` later
    after the point that caused it (a NaN's does not wait). Through a real daemon on that
    busy host (``bench/bench_client.py --latency --flush-interval 0.1 0.2``), 48 plateau
    cuts all arrived ahead of their step, 65 steps (~150 ms) at the least, at 0.1 s and at
    0.2 s alike, and applied a median 286 and 360 ms after the report that caused them.
    Before the lead counted from a frame's last step, the least margin was 3-4 steps.

    ``transport``, ``backoff``, ``clock`` and ``sleep`` are seams for tests; ``start=False``
    leaves the sender thread unstarted (tests then drive ``client._sender.run_once()``, which
    then also receives).
    """

    #: seconds between the sender thread's wake-ups (see ``bench/bench_client.py``)
    DEFAULT_FLUSH_INTERVAL = 0.2

    def __init__(
        self,
        url: str,
        job: str,
        initial_lr: float | Sequence[float],
        *,
        token: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        run_id: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        labels: Mapping[str, str] | None = None,
        policy: Mapping[str, Any] | None = None,
        total_steps: int | None = None,
        initial_momentum: float | Sequence[float] | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_buffer: int = 100_000,
        max_points_per_frame: int = 2_000,
        connect_timeout: float = 5.0,
        close_timeout: float = 2.0,
        heartbeat_interval: float = 5.0,
        on_decision: Callable[[Decision, int], None] | None = None,
        transport: Transport | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        start: bool = True,
    ) -> None:
        if proto.JOB_NAME_PATTERN.fullmatch(job) is None:
            raise ValueError(
                f"job: invalid job name {job!r}: use 1-128 of A-Z a-z 0-9 _ . - (not starting with . or -)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        lrs = (
            [float(initial_lr)]
            if isinstance(initial_lr, (int, float))
            else [float(x) for x in initial_lr]
        )
        if not lrs or not all(math.isfinite(x) and x >= 0 for x in lrs):
            raise ValueError(f"initial_lr: need finite learning rates >= 0, got {initial_lr!r}")
        momentums: list[float] | None
        if initial_momentum is None:
            momentums = None
        elif isinstance(initial_momentum, (int, float)):
            momentums = [float(initial_momentum)] * len(lrs)
        else:
            momentums = [float(m) for m in initial_momentum]
            if len(momentums) != len(lrs):
                raise ValueError(
                    f"initial_momentum: has {len(momentums)} entries but initial_lr has {len(lrs)}"
                )
        if max_buffer < 1:
            raise ValueError(f"max_buffer: must be >= 1, got {max_buffer}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"total_steps: need an integer >= 1 or None, got {total_steps!r}")
        if ssl is not None and not url.startswith("wss://"):
            raise ValueError(f"ssl: a TLS context needs a wss:// URL, got {url!r}")
        self.url = url
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id if run_id is not None else os.environ.get("LRPILOT_RUN_ID")
        self.labels = dict(labels or {})
        self.policy = None if policy is None else dict(policy)
        #: the run's planned length in steps, sent in the hello (None: unknown)
        self.total_steps = total_steps
        self.stats = ClientStats()
        self.flush_interval = flush_interval
        self.close_timeout = close_timeout
        self._max_buffer = max_buffer
        self._buffer: deque[tuple[Any, Any, float, Mapping[str, Any]]] = deque(maxlen=max_buffer)
        self._last_step: int | None = None
        self._callbacks: list[Callable[[Decision, int], None]] = []
        if on_decision is not None:
            self._callbacks.append(on_decision)
        self._state = LRState(lrs, momentums, on_apply=self._on_apply, on_error=self._on_error)
        self._external_warned = False
        self._closed = False
        # True while the sender thread sleeps until something is reported (set by it)
        self._sender_idle = False
        # time.time() of the last early wake-up for a non-finite value, for a checkpoint
        self._nonfinite_woke_at = self._checkpoint_woke_at = -math.inf
        token = token if token is not None else os.environ.get("LRPILOT_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if transport is None:
            transport = WebSocketTransport(ssl=ssl if ssl is not None else _env_ssl_context(url))
        self._sender = _Sender(
            self,
            transport,
            headers,
            backoff if backoff is not None else Backoff(),
            clock,
            sleep,
            max_points_per_frame=max_points_per_frame,
            connect_timeout=connect_timeout,
            heartbeat_interval=heartbeat_interval,
        )
        self._thread: threading.Thread | None = None
        self._atexit = self._close_at_exit
        atexit.register(self._atexit)
        if start:
            self._thread = threading.Thread(
                target=self._sender.run, name=f"lrpilot-sender-{job}", daemon=True
            )
            self._thread.start()

    # ------------------------------------------------------------------ training thread

    def report(self, step: int, epoch: int | None = None, **metrics: Any) -> None:
        """Queue the metrics of ``step``; returns at once and never raises.

        Values are numbers or 0-d tensors. NaN and ±Inf are fine: they are signals for the
        daemon. ``epoch`` is a reserved name. A CPU tensor is converted here with ``.item()``
        (no ``.detach()`` needed). Leaving it to the sender thread does not pay (2026-12-03,
        ``bench/bench_client.py --cpu-only --loss tensor --baseline-loss item --baseline
        DIR``, with that change in this checkout): the training thread saves the ``.item()``
        (~10 of ~33 µs on a busy host, cold after a torch step), and the sender spends as much.
        After ``backward()`` the loss still holds its graph's nodes (~8 KB), and whichever
        thread drops it last pays ~9 µs (a detached tensor ~1 µs): held, that moves from the
        next step's ``loss = ...`` to the sender, with the conversion (``.item()`` per value,
        or ``torch.stack`` and ``tolist`` at ~7 µs a value, cold). The torch step of the model
        whose losses were held also ran 10-13 % slower (3 % in 2026-12-02's whole-process A/B
        pairs, when it was first tried). The
        share of the step came out 0.99 and 1.12 times the ``.item()`` client's. Detaching to
        hold costs the training thread nearly what ``.item()`` does (8 against 11 µs, cold).
        A GPU tensor is detached and converted on the sender thread, so that the
        training thread never waits for the device. Plain floats (``loss.item()``) take the
        shortest path.
        """
        self._report(step, epoch, metrics)

    def _report(self, step: Any, epoch: Any, metrics: dict[str, Any]) -> None:
        """:meth:`report` with the metrics as a dict the client keeps (and may change);
        integrations pass a dict of their own that nothing else changes afterwards (the
        torch integration its ``**metrics`` dict), which spares a copy on every step.

        The common report, finite floats only, takes the short path below; anything else
        (a tensor to convert, an int, NaN or ±Inf) :meth:`_report_other`. It runs on every
        training step right after the framework's own work, with the CPU caches refilled by
        it, where every bytecode and object touched counts (``bench/bench_client.py``).
        """
        try:
            for value in metrics.values():
                if type(value) is not _FLOAT or value - value:  # x - x is 0 if x is finite
                    break
            else:
                buffer = self._buffer
                if len(buffer) >= self._max_buffer:
                    self.stats.dropped_points += 1  # the deque drops the oldest on append
                buffer.append((step, epoch, _now(), metrics))
                self._last_step = step
                if self._sender_idle:
                    self._sender.wake()
                self.stats.reported_points += 1
                return
            self._report_other(step, epoch, metrics)
        except Exception:
            with contextlib.suppress(Exception):
                self.stats.report_errors += 1

    def _report_other(self, step: Any, epoch: Any, metrics: dict[str, Any]) -> None:
        """:meth:`_report` when some value is not a finite float.

        A CPU tensor is converted with ``.item()`` here (see :meth:`report`); a GPU tensor is
        kept for the sender thread, detached from its autograd graph when it has one (``loss``
        itself rather than ``loss.detach()``: the graph of every step would otherwise stay
        alive until the sender converts it); ints are kept as they are. A NaN or ±Inf value
        wakes the sender early.
        """
        urgent = False
        for name, value in metrics.items():
            if value.__class__ is not float:
                if getattr(value, "is_cuda", True) is False:  # a CPU tensor
                    try:
                        value = metrics[name] = value.item()
                    except Exception:  # the sender counts a bad value
                        continue
                else:  # an int, a GPU tensor: not looked at
                    if getattr(value, "requires_grad", False) is True:
                        with contextlib.suppress(Exception):
                            metrics[name] = value.detach()
                    if not isinstance(value, float):
                        continue
            if value - value:  # NaN or ±Inf: x - x is 0 for every finite number
                urgent = True
        now = time.time()
        buffer = self._buffer
        if len(buffer) >= self._max_buffer:
            self.stats.dropped_points += 1  # the deque drops the oldest on append
        buffer.append((step, epoch, now, metrics))
        self._last_step = step
        if urgent:
            self._nonfinite_woke_at = self._wake_early(now, self._nonfinite_woke_at)
        elif self._sender_idle:
            self._sender.wake()
        self.stats.reported_points += 1

    def _wake_early(self, now: float, last: float) -> float:
        """Wake the sender now, not at its next wake-up, unless the last early wake-up of this
        kind (at ``last``) is less than ``flush_interval`` ago; the time to remember.

        ``now`` is the training thread's ``time.time()``; a clock set back re-arms it. Non-finite
        values and checkpoint notices keep their own times: a checkpoint does not delay the NaN
        that follows it.
        """
        if now - last >= self.flush_interval or now < last:
            self._sender.wake()
            return now
        if self._sender_idle:
            self._sender.wake()
        return last

    def checkpoint(self, step: int) -> None:
        """Tell the daemon a good checkpoint exists at ``step`` (rollback target); the notice
        is sent at once, not with the next frame."""
        try:
            now = time.time()
            buffer = self._buffer
            if len(buffer) >= self._max_buffer:
                self.stats.dropped_points += 1  # the deque drops the oldest on append
            buffer.append((step, None, now, _CHECKPOINT))
            self._checkpoint_woke_at = self._wake_early(now, self._checkpoint_woke_at)
        except Exception:
            self.stats.report_errors += 1

    def lrs_for_step(self, step: int) -> list[float]:
        """Apply the decisions due at ``step``; the LR per param group to use for it."""
        return self._state.lrs_for_step(step)

    @property
    def lrs(self) -> list[float]:
        """The LR per param group at the current (last asked) step."""
        return self._state.lrs

    @property
    def lr(self) -> float:
        """The LR of the first param group at the current step."""
        return self._state.lrs[0]

    @property
    def momentums(self) -> list[float] | None:
        """The momentum (or Adam beta1) per group, if a decision or segment sets it."""
        return self._state.momentums

    @property
    def halted(self) -> bool:
        """True once a halt decision has been applied."""
        return self._state.halted

    @property
    def halt_reason(self) -> str | None:
        return self._state.halt_reason

    @property
    def decisions(self) -> list[tuple[Decision, int]]:
        """Applied decisions with the step each was applied at, oldest first."""
        return list(self._state.applied)

    @property
    def pending_decisions(self) -> list[Decision]:
        """Received decisions waiting for their apply step."""
        return self._state.pending

    @property
    def n_groups(self) -> int:
        return self._state.n_groups

    def add_decision_callback(self, callback: Callable[[Decision, int], None]) -> None:
        """Call ``callback(decision, step)`` on the training thread when a decision applies."""
        self._callbacks.append(callback)

    def _on_apply(self, decision: Decision, step: int) -> None:
        self.stats.decisions_applied += 1
        if self._sender_idle:  # the ack is queued: send it now
            self._sender.wake()
        log.info(
            "lrpilot: applied decision %s (%s by %s: %s) at step %s; lrs=%s",
            decision.id,
            decision.kind.value,
            decision.source,
            decision.reason,
            step,
            self._state.lrs,
        )
        for callback in self._callbacks:
            callback(decision, step)

    def _on_error(self) -> None:
        self.stats.decision_errors += 1

    def external_lr_change(self, step: int, group: int, expected: float, found: float) -> None:
        """Record that something else changed the LR of ``group`` behind lrpilot's back.

        Integrations call this when the optimizer's LR differs from what they set last. It
        warns once, counts, and reports the count as the metric ``lrpilot_external_lr_changes``
        so the daemon sees it. lrpilot's LR is set again at the next step.
        """
        self.stats.external_lr_changes += 1
        if not self._external_warned:
            self._external_warned = True
            warnings.warn(
                f"lrpilot: the learning rate of param group {group} was changed outside lrpilot "
                f"(expected {expected:g}, found {found:g} at step {step}); another scheduler or "
                "code is setting it. lrpilot sets its own value again at every step.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._report(step, None, {EXTERNAL_LR_METRIC: float(self.stats.external_lr_changes)})

    # ------------------------------------------------------------------ lifecycle

    def wait_connected(self, timeout: float) -> bool:
        """Block until the handshake succeeded (True) or ``timeout`` passed (False)."""
        return self._sender.connected_event.wait(timeout)

    def flush(self, timeout: float = 2.0) -> bool:
        """Send what was reported now, and block until it has been sent (True) or ``timeout``
        passed (False)."""
        deadline = time.monotonic() + timeout
        self._sender.wake()
        while time.monotonic() < deadline:
            idle = not self._buffer and not self._sender.unsent and not self._state.acks
            if idle and self._sender.connected_event.is_set():
                return True
            time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
        return False

    def close(self, timeout: float | None = None) -> None:
        """Flush (bounded by ``timeout``, default ``close_timeout``), send finished, stop.

        Never hangs: after the timeout the sender thread (a daemon thread) is abandoned.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        budget = self.close_timeout if timeout is None else timeout
        self._sender.begin_close(budget)
        if self._thread is not None:
            self._thread.join(budget + 0.2)
            if self._thread.is_alive():
                log.warning("lrpilot: sender did not finish within %.1fs; abandoning it", budget)

    def _close_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close(timeout=min(self.close_timeout, 1.0))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Client(url={self.url!r}, job={self.job!r}, rank={self.rank}, "
            f"connected={self.stats.connected}, lrs={self.lrs})"
        )


class _Sender:
    """The sender thread's work, one iteration per :meth:`run_once` (tests call it directly)."""

    def __init__(
        self,
        client: Client,
        transport: Transport,
        headers: Mapping[str, str],
        backoff: Backoff,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        *,
        max_points_per_frame: int,
        connect_timeout: float,
        heartbeat_interval: float,
    ) -> None:
        self.client = client
        self.transport = transport
        self.headers = dict(headers)
        self.backoff = backoff
        self.clock = clock
        self._stop = threading.Event()
        self.sleep = sleep if sleep is not None else self._stop.wait
        # The sender thread's wait between wake-ups: a lock it holds, released to wake it early
        # (close, connection lost). A timed acquire is a C call; waiting in conn.recv(timeout)
        # instead cost ~40 us more per wake-up (the timeout is an exception through websockets'
        # Python layers), 50 times a second.
        self._wake = threading.Lock()
        self._wake.acquire()
        self.receiver: threading.Thread | None = None  # receives decisions, with a thread
        self._lost: BaseException | None = None  # set by the receiver when the connection died
        self.max_points_per_frame = max_points_per_frame
        self.max_frames_per_wake = 16  # then receive, so decisions are not starved by a flood
        self.connect_timeout = connect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.conn: Connection | None = None
        self.session: str | None = None
        self.welcome: proto.Welcome | None = None
        self.unsent: deque[str] = deque()  # encoded frames whose send failed; resent first
        self.last_sent_step: int | None = None
        self.next_attempt = 0.0
        self.last_send = 0.0
        self.connected_event = threading.Event()
        self.closing = False
        self.close_deadline = math.inf
        self.done = threading.Event()
        self._warned_codes: set[str] = set()
        self._warned_unreachable = False

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        try:
            while not self.done.is_set():
                try:
                    self.run_once()
                except Exception as exc:  # a bug here must not kill the thread
                    self.client.stats.sender_errors += 1
                    self.client.stats.last_error = repr(exc)
                    log.exception("lrpilot: sender error; reconnecting")
                    self._drop_connection()
                    self.sleep(self.backoff.next())
        finally:
            self._drop_connection()
            self.done.set()

    def begin_close(self, budget: float) -> None:
        self.close_deadline = self.clock() + budget
        self.closing = True
        self._stop.set()  # interrupts a backoff wait
        self._interrupt()  # and the wait between two wake-ups
        if self.client._thread is None:  # no thread: finish inline (tests, start=False)
            while not self.done.is_set():
                try:
                    self.run_once()
                except Exception:
                    log.exception("lrpilot: error while closing")
                    self._finish()

    def run_once(self) -> None:
        """Connect if needed, send what is buffered, receive what arrived."""
        stats = self.client.stats
        if self.closing and self.clock() >= self.close_deadline:
            self._finish()
            return
        if self.conn is None:
            now = self.clock()
            if self.closing:
                remaining = self.close_deadline - now
                if self._connect(min(self.connect_timeout, remaining)):
                    return
                lost = sum(1 for e in self.client._buffer if e[3] is not _CHECKPOINT)
                stats.dropped_points += lost
                self.client._buffer.clear()
                self._finish()
                return
            if now < self.next_attempt:
                self.sleep(self.next_attempt - now)
                return
            self._connect(self.connect_timeout)
            return
        try:
            sent = self._send_pending()
            if self.closing:
                if not self.client._buffer:
                    self._send(proto.encode(proto.Finished(step=self._last_step())))
                    self._finish()
                return
            # a wake-up that sent something just set last_send: no clock to read
            if not sent and self.clock() - self.last_send >= self.heartbeat_interval:
                self._send(proto.encode(proto.Heartbeat(step=self._last_step())))
            if self.receiver is None:  # no threads (tests): receive here
                self._receive(self.client.flush_interval)
            else:
                self._wait(sent)
            failure = self._lost
            if failure is not None:
                raise failure
        except (TransportClosed, OSError) as exc:
            stats.disconnects += 1
            stats.last_error = f"connection lost: {exc}"
            log.warning("lrpilot: connection to %s lost (%s); reconnecting", self.client.url, exc)
            self._drop_connection()
            self.next_attempt = self.clock() + self.backoff.next()

    def _last_step(self) -> int | None:
        step = self.client._last_step
        return step if type(step) is int and step >= 0 else self.last_sent_step

    def _finish(self) -> None:
        self._drop_connection()
        self.done.set()

    # ------------------------------------------------------------------ connection

    def _connect(self, timeout: float) -> bool:
        client = self.client
        stats = client.stats
        state = client._state
        if timeout <= 0:
            return False
        try:
            conn = self.transport.connect(client.url, self.headers, timeout)
        except TransportRefused as exc:  # HTTP 401/403: a bad token will not fix itself
            stats.errors_received += 1
            if "refused" not in self._warned_codes:
                self._warned_codes.add("refused")
                log.error("lrpilot: daemon at %s refused the connection: %s", client.url, exc)
            self._connect_failed(f"refused: {exc}", permanent=True)
            return False
        except Exception as exc:  # OSError, TimeoutError, TransportClosed, bad URL
            self._connect_failed(f"cannot connect: {exc}")
            return False
        resume = None
        if stats.connects or state.last_received_id is not None or self.last_sent_step is not None:
            resume = proto.Resume(
                last_decision_id=state.last_received_id, last_step=self.last_sent_step
            )
        hello = proto.Hello(
            job=client.job,
            lrs=tuple(state.initial_lrs),
            run_id=client.run_id,
            rank=client.rank,
            world_size=client.world_size,
            momentums=None if state.momentums is None else tuple(state.momentums),
            policy=client.policy,
            labels=client.labels,
            client=CLIENT_NAME,
            resume=resume,
            total_steps=client.total_steps,
        )
        try:
            conn.send(proto.encode(hello))
            deadline = self.clock() + timeout
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise TimeoutError(f"no welcome within {timeout:.1f}s")
                text = conn.recv(remaining)
                if text is None:
                    continue
                msg = proto.decode(text)
                if isinstance(msg, proto.Welcome):
                    welcome = msg
                    break
                if isinstance(msg, proto.ErrorMsg):
                    raise _Refused(msg)
                self._handle(msg)
        except _Refused as exc:
            conn.close()
            stats.errors_received += 1
            code = exc.msg.code
            if code not in self._warned_codes:
                self._warned_codes.add(code)
                log.error("lrpilot: daemon at %s refused job %r: %s", client.url, client.job, exc)
            self._connect_failed(str(exc), permanent=code in _PERMANENT_REFUSALS)
            return False
        except Exception as exc:
            conn.close()
            self._connect_failed(f"handshake failed: {exc}")
            return False
        self.conn = conn
        self.welcome = welcome
        self.session = welcome.session
        self._lost = None
        if client._thread is not None:
            self.receiver = threading.Thread(
                target=self._receive_loop,
                args=(conn,),
                name=f"lrpilot-receiver-{client.job}",
                daemon=True,
            )
            self.receiver.start()
        self.backoff.reset()
        self._warned_unreachable = False
        stats.connects += 1
        stats.connected = True
        self.last_send = self.clock()
        for data in welcome.decisions:
            self._receive_decision(data)
        self.connected_event.set()
        log.info(
            "lrpilot: connected to %s as job %r (session %s)",
            client.url,
            client.job,
            welcome.session,
        )
        return True

    def _connect_failed(self, reason: str, permanent: bool = False) -> None:
        stats = self.client.stats
        stats.connect_failures += 1
        stats.last_error = reason
        if not self._warned_unreachable and not permanent:
            self._warned_unreachable = True
            log.warning(
                "lrpilot: daemon at %s unreachable (%s); training continues with its current "
                "learning rate, retrying in the background",
                self.client.url,
                reason,
            )
        delay = self.backoff.maximum if permanent else self.backoff.next()
        self.next_attempt = self.clock() + delay

    def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        self.receiver = None  # it sees self.conn change, or its recv fails, and ends
        self.connected_event.clear()
        self.client.stats.connected = False
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ sending

    def _send(self, text: str) -> None:
        assert self.conn is not None
        self.conn.send(text)
        self.last_send = self.clock()

    def _send_pending(self) -> bool:
        """Send the frames a failed send left, the buffer and the acks; True if anything.

        The common wake-up (nothing left unsent, no ack, at most ``max_points_per_frame``
        metric rows of one shape) sends its one frame here, without the general loop's
        layers: the sender runs with cold caches, where each Python call and each object
        built costs several times what it costs warm (8-9 % of the sending's CPU, ``python
        bench/bench_client.py --wake-cost --baseline DIR``). Anything else, or entries this
        path does not take, goes the general way (:meth:`_frames_general`).
        """
        client = self.client
        stats = client.stats
        before = stats.sent_frames + stats.acks_sent
        buffer = client._buffer
        unsent = self.unsent
        count = len(buffer)
        if count and not unsent and not client._state.acks and count <= self.max_points_per_frame:
            # only this thread pops; starmap calls popleft() in a C loop (no bytecode per point)
            entries = list(starmap(buffer.popleft, repeat((), count)))
            fast = _uniform_frame(entries)
            if fast is not None:
                frame, highest = fast
                conn = self.conn
                assert conn is not None
                unsent.append(frame)
                conn.send(frame)
                unsent.pop()
                self.last_send = self.clock()
                stats.sent_frames += 1
                stats.sent_points += count
                last = self.last_sent_step
                if last is None or highest > last:
                    self.last_sent_step = highest
                return True
            # the points reported meanwhile wait for the next wake-up, as below
            for text, n_points, max_step in self._frames_general(entries):
                self._send_frame(text, n_points, max_step)
            return stats.sent_frames != before
        while unsent:
            self._send(unsent[0])
            unsent.popleft()
            stats.sent_frames += 1
        for _ in range(self.max_frames_per_wake):
            if not buffer:
                break
            # Drain again only when this drain is cut at max_points_per_frame: the points
            # reported while a frame is being sent wait for the next wake-up, else nearly every
            # wake-up sent a second frame of one or two points (a send costs as much CPU as
            # encoding a 2000-point frame).
            more = len(buffer) > self.max_points_per_frame
            for text, n_points, max_step in self._frames(buffer):
                self._send_frame(text, n_points, max_step)
            if not more:
                break
        acks = client._state.acks
        while acks:
            decision_id, step = acks[0]
            self._send(proto.encode(proto.Ack(id=decision_id, applied_at_step=step)))
            acks.popleft()
            stats.acks_sent += 1
        return stats.sent_frames + stats.acks_sent != before

    def _send_frame(self, text: str, n_points: int, max_step: int | None) -> None:
        """Send one encoded frame of the buffer (kept in ``unsent`` until it is sent)."""
        unsent = self.unsent
        stats = self.client.stats
        unsent.append(text)
        self._send(text)
        unsent.popleft()
        stats.sent_frames += 1
        stats.sent_points += n_points
        if max_step is not None and (self.last_sent_step is None or max_step > self.last_sent_step):
            self.last_sent_step = max_step

    def _frames(self, buffer: deque[Any]) -> list[tuple[str, int, int | None]]:
        """Drain up to max_points_per_frame entries into encoded frames (metrics and checkpoint)."""
        # only this thread pops; report() appending to a full deque drops one and adds one.
        # starmap calls popleft() in a C loop (no bytecode per point).
        count = min(len(buffer), self.max_points_per_frame)
        entries = list(starmap(buffer.popleft, repeat((), count)))
        if not entries:
            return []
        fast = _uniform_frame(entries)
        if fast is not None:
            return [(fast[0], len(entries), fast[1])]
        return self._frames_general(entries)

    def _frames_general(self, entries: list[Any]) -> list[tuple[str, int, int | None]]:
        """Any mix of entries: checkpoints, epochs, rows to merge, bad steps, names or values."""
        out: list[tuple[str, int, int | None]] = []
        stats = self.client.stats
        steps: list[int] = []
        epochs: list[int | None] = []
        whens: list[float] = []
        columns: dict[str, list[float | None]] = {}
        any_epoch = False

        def emit() -> None:
            nonlocal steps, epochs, whens, columns, any_epoch
            if not steps:
                return
            n = len(steps)
            for column in columns.values():
                if len(column) < n:
                    column.extend([None] * (n - len(column)))
            # the last row's time only, as _uniform_frame sends
            times: list[float | None] = [None] * (n - 1)
            times.append(_millisecond(whens[-1]))
            batch = proto.MetricsBatch(
                steps=steps, values=columns, epochs=epochs if any_epoch else None, times=times
            )
            out.append((proto.encode(batch), n, max(steps)))
            steps, epochs, whens, columns, any_epoch = [], [], [], {}, False

        for step, epoch, when, metrics in entries:
            if type(step) is not int or step < 0:
                try:
                    step = int(step)
                    if step < 0:
                        raise ValueError
                except Exception:
                    stats.report_errors += 1
                    continue
            if metrics is _CHECKPOINT:
                emit()
                out.append((proto.encode(proto.CheckpointNotice(step=step)), 0, None))
                continue
            if epoch is not None and type(epoch) is not int:
                try:
                    epoch = int(epoch)
                except Exception:
                    epoch = None
            n = len(steps)
            # merge with the previous row when it is the same step and the names do not clash
            merge = (
                n > 0
                and steps[-1] == step
                and epochs[-1] == epoch
                and all(len(columns.get(k, ())) < n for k in metrics)
            )
            if not merge:
                steps.append(step)
                epochs.append(epoch)
                whens.append(when)
                any_epoch = any_epoch or epoch is not None
                n += 1
            for name, value in metrics.items():
                if type(value) is not float:
                    try:
                        value = float(value)
                    except Exception:
                        stats.bad_values += 1
                        value = None
                column = columns.get(name)
                if column is None:
                    if not _valid_name(name):
                        stats.bad_values += 1
                        continue
                    column = columns[name] = []
                if len(column) < n - 1:
                    column.extend([None] * (n - 1 - len(column)))
                column.append(value)
        emit()
        return out

    # ------------------------------------------------------------------ receiving

    def _wait(self, sent: bool) -> None:
        """Wait until the next wake-up (sender thread).

        After a wake-up that had something to send, that is ``flush_interval``. After one
        that had nothing (a whole interval without a report: slow steps, evaluation, a
        stalled loader), the sender sleeps until the next heartbeat is due and the training
        thread wakes it when it reports, checkpoints or applies a decision: a job whose step
        takes 200 ms then costs two wake-ups a step, not ten.
        """
        client = self.client
        timeout = client.flush_interval
        if not sent:
            client._sender_idle = True
            if client._buffer or client._state.acks:  # arrived before the flag was set
                client._sender_idle = False
            else:
                timeout = max(timeout, self.last_send + self.heartbeat_interval - self.clock())
        self._wake.acquire(timeout=timeout)
        client._sender_idle = False

    def wake(self) -> None:
        """Wake the idle sender thread (training thread: something to send)."""
        self.client._sender_idle = False
        self._interrupt()

    def _interrupt(self) -> None:
        """Wake the sender thread now if it waits between two wake-ups."""
        with contextlib.suppress(RuntimeError):  # not waiting: the next wait returns at once
            self._wake.release()

    def _receive_loop(self, conn: Connection) -> None:
        """The receiver thread of one connection: handle what the daemon sends as it arrives.

        It waits in ``conn.recv`` (a wake-up every ``_RECEIVER_WAIT`` seconds when nothing
        arrives), so the sender thread does not wait there between its wake-ups. When the
        connection fails, it tells the sender, which reconnects; it ends when the sender
        drops (and so closes) the connection.
        """
        try:
            while self.conn is conn:
                self._receive(_RECEIVER_WAIT, conn)
        except Exception as exc:  # TransportClosed, OSError, or a bug: reconnect either way
            if self.conn is conn:
                if not isinstance(exc, (TransportClosed, OSError)):
                    self.client.stats.sender_errors += 1
                    log.exception("lrpilot: receiver error; reconnecting")
                    exc = TransportClosed(f"receiver error: {exc!r}")
                self._lost = exc
                self._interrupt()

    def _receive(self, timeout: float, conn: Connection | None = None) -> None:
        conn = conn if conn is not None else self.conn
        assert conn is not None
        text = conn.recv(timeout)
        handled = 0
        while text is not None:
            try:
                msg = proto.decode(text)
            except proto.ProtocolError as exc:
                self.client.stats.errors_received += 1
                log.warning("lrpilot: ignoring a bad frame from the daemon: %s", exc)
            else:
                self._handle(msg)
            handled += 1
            if handled >= 100:
                return
            text = conn.recv(0)

    def _handle(self, msg: proto.Message) -> None:
        stats = self.client.stats
        if isinstance(msg, proto.DecisionMsg):
            self._receive_decision(msg.decision)
        elif isinstance(msg, proto.ErrorMsg):
            stats.errors_received += 1
            stats.last_error = f"{msg.code}: {msg.message}"
            if msg.code not in self._warned_codes:
                self._warned_codes.add(msg.code)
                log.warning(
                    "lrpilot: daemon reported %s: %s (ref %s)", msg.code, msg.message, msg.ref
                )
        # heartbeat, welcome, result: nothing to do

    def _receive_decision(self, data: Mapping[str, Any]) -> None:
        stats = self.client.stats
        try:
            decision = Decision.from_dict(data)
        except Exception as exc:
            stats.decision_errors += 1
            log.warning("lrpilot: ignoring a decision I cannot read: %s", exc)
            return
        if self.client._state.receive(decision):
            stats.decisions_received += 1


def _env_ssl_context(url: str) -> ssl_module.SSLContext | None:
    """A context trusting ``$LRPILOT_CACERT`` for a ``wss://`` URL, else None (system CAs).

    Read here rather than left to ``SSL_CERT_FILE`` so that the daemon's private CA is trusted
    by lrpilot only, not by every TLS connection of the training process. A file that cannot
    be loaded is logged as an error and the system's CAs are used: like an absent daemon, a
    wrong path must not stop training (the handshakes then fail, and say why).
    """
    cafile = os.environ.get("LRPILOT_CACERT")
    if not cafile or not url.startswith("wss://"):
        return None
    import ssl

    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        log.error(
            "lrpilot: cannot load LRPILOT_CACERT=%s (%s); using the system's CAs", cafile, exc
        )
        return None


def _millisecond(when: float) -> float:
    """A wall time rounded to the millisecond, shorter to write: ``round(when, 3)`` makes a
    decimal conversion and costs three times as much."""
    return round(when * 1000.0) / 1000


def _valid_name(name: str) -> bool:
    return isinstance(name, str) and 0 < len(name) <= proto.MAX_METRIC_NAME_LENGTH


def _uniform_frame(entries: list[Any]) -> tuple[str, int] | None:
    """The metrics frame of ``entries`` and their highest step, when they are the common case,
    else None.

    The common case: every entry is a metrics row (no checkpoint) with an int step >= 0, no
    epoch, and the same non-empty set of valid metric names with values ``float()`` takes.
    Rows then never merge (a row merges into the previous one only when none of its names is
    in it), so the frame is the one ``_frames_general`` makes, built with C loops (``zip``,
    ``map``, ``join``) instead of a Python loop per point: the sender thread wakes with cold
    caches and every bytecode it runs costs several times what it costs in a tight loop.

    Only the last row carries its time, the others ``null`` (docs/protocol.md allows it per
    row): the daemon reads the times for two things, the job's step rate, which it samples
    at most twice a second (every frame's last row is plenty), and the ingest lag, from the
    frame's last row; writing the time of every row was about half of the sender's cost
    per point (a 13-digit decimal each): 1.03 against 0.65 µs a point in 100-point frames,
    warm, and a quarter fewer bytes.
    """
    steps, epochs, whens, rows = zip(*entries, strict=True)
    first = rows[0]
    width = len(first)
    try:
        # every row has every name of the first (itemgetter below) and as many names: the same
        if (
            not width
            or epochs.count(None) != len(epochs)
            or min(steps) < 0
            or sum(map(len, rows)) != width * len(rows)
        ):
            return None
    except TypeError:  # steps that do not compare with ints
        return None
    columns: dict[str, Sequence[float]] = {}
    for name in first:
        if not _valid_name(name):
            return None
        try:
            columns[name] = list(map(operator.itemgetter(name), rows))
        except KeyError:  # another name
            return None
    last_time = _millisecond(whens[-1])
    try:
        try:
            text = proto.encode_metrics(steps, columns, last_time)
        except TypeError:  # ints, tensors (or a step that is not an int: TypeError again)
            for name, column in columns.items():
                columns[name] = list(map(float, column))
            text = proto.encode_metrics(steps, columns, last_time)
    except Exception:  # a value float() does not take: the general loop counts it
        return None
    return text, max(steps)
