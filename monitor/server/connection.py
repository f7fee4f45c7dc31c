"""A websockets server connection that hands received messages to its session in runs.

websockets' own connection queues every frame in an assembler, and ``recv()`` takes them out
one ``await`` at a time: a future, a task wake-up and an async generator step per message,
which on a stream of single-point metrics frames cost more than everything the daemon does
with the frame. :class:`JobConnection` overrides the hook that receives each parsed frame
(``process_event``, which websockets' own subclasses override for the handshake) and appends
whole messages to :attr:`JobConnection.inbox`, a plain deque. The session waits only when
the inbox is empty; otherwise it takes every message that one read of the socket delivered,
without suspending, and may feed consecutive metrics frames of its job to the engine at once.

While the session waits, the messages of a read are first offered to its
:attr:`JobConnection.on_messages` hook, called from ``data_received`` itself: the session
handles there what needs no waiting (metrics, acks, heartbeats, checkpoints, a decision that
can be written at once), and its task is woken only for what is left. A frame that causes a
decision is then answered in the event-loop turn that read it, not one turn later: no
future, task wake-up, second ``epoll_wait`` nor resumption of four coroutine frames (with the
frame written by :meth:`JobConnection.write_text`, ~30k of a decision's ~885k instructions).

Whole unfragmented data frames are also parsed here, not by websockets, while its parser
waits between two frames (:meth:`JobConnection._take_frames`): RFC 6455 framing of a masked
text or binary frame is a few lines, where websockets' generator-based parser costs a
single-point frame ~30k instructions (a resumed generator per header, mask and payload, a
``Frame`` object and its checks). Anything else (control frames, fragments, reserved bits,
an unmasked or oversized frame) goes to websockets' parser as before, with what follows it;
an incomplete frame at the end of a read waits in websockets' own read buffer, where the
parser finds it if the next bytes need it.

What the assembler did is kept: fragmented messages are joined (at most
:data:`MAX_FRAGMENTS` fragments, else the connection fails with 1009), text is decoded as
UTF-8 (invalid UTF-8 fails the connection with 1007), and reading from the socket pauses
while more than :data:`INBOX_HIGH` messages wait, resuming at :data:`INBOX_LOW`. Control
frames (ping, pong, close) go to websockets as before.

Memory. A daemon holds a connection per training process for hours, most of them idle, so
a connection keeps only what it uses: no websockets assembler (a shared stand-in whose
``recv()`` fails: the session reads the inbox), no deque while the inbox is empty (a shared
empty one stands in, see :meth:`JobConnection.release_idle_inbox`), a list for websockets'
drain waiters, and not the handshake's request and response with their headers, once the
handshake is over (the daemon reads the path and the token during it, in
``process_request``; nothing reads them after). With its own
attributes in slots, that is 5.8 KiB of RSS less per idle connection (29.0 -> 23.2 KiB in
``bench_daemon.py --memory-only``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

if TYPE_CHECKING:
    from .auth import Principal

#: messages waiting in the inbox above which the connection stops reading from its socket
INBOX_HIGH = 1024
#: ... and at or below which it reads again
INBOX_LOW = 256
#: most fragments of one message (websockets' assembler has the same default)
MAX_FRAGMENTS = 4096

log = logging.getLogger("lrpilot.daemon")

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OPEN = State.OPEN

# RFC 6455 5.2: the first byte of an unfragmented text or binary frame without reserved bits
_FIN_TEXT_IN, _FIN_BINARY_IN = 0x81, 0x82
#: websockets' parser waits here, at the top of its loop, for the first byte of a frame
_AT_EOF = StreamReader.at_eof.__code__


class _EmptyInbox(deque):
    """The inbox of every connection that holds no message: it is only read, and it refuses
    what would put a message in it (which would go to another connection's session)."""

    __slots__ = ()

    def _refuse(self, *_args: Any) -> None:
        raise TypeError("the shared empty inbox takes no message (JobConnection._deliver)")

    append = appendleft = extend = extendleft = insert = _refuse


class _NoAssembler:
    """Stands in for websockets' message assembler, which :class:`JobConnection` does not
    use (data frames go to its inbox): ``recv()`` fails at once instead of waiting forever,
    and closing the connection has nothing to close."""

    __slots__ = ()

    def close(self) -> None:
        pass

    def _no_recv(self, *_args: Any) -> Any:
        raise RuntimeError("a JobConnection's messages go to its inbox: use wait_messages()")

    get = get_iter = put = _no_recv


_NO_MESSAGES: deque[str | bytes] = _EmptyInbox()
_NO_ASSEMBLER = _NoAssembler()

# RFC 6455 5.2: the first byte of an unfragmented text frame (FIN + opcode 1), then the
# payload length in 7 bits, or 126 + 16 bits, or 127 + 64 bits; a server does not mask
_FIN_TEXT = 0x81
_HEAD_16 = struct.Struct("!BBH").pack
_HEAD_64 = struct.Struct("!BBQ").pack
_PING = struct.Struct("!I")  # a keepalive ping's payload: 4 random bytes, as websockets'


class JobConnection(ServerConnection):
    """A :class:`ServerConnection` whose data messages go to :attr:`inbox` (see module doc).

    Its own attributes are slots: on top of websockets' ~30, they would move every
    connection's ``__dict__`` to a table of twice the size (+1.3 KB). See "Memory" in the
    module doc for what else it does not keep.
    """

    __slots__ = (
        "_fragments",
        "_lost",
        "_reading_paused",
        "_waiter",
        "inbox",
        "on_messages",
        "pending",
        "principal",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: whole messages (``str`` for text, ``bytes`` for binary), oldest first; the shared
        #: :data:`_NO_MESSAGES` while there are none (never appended to: see :meth:`_deliver`)
        self.inbox: deque[str | bytes] = _NO_MESSAGES
        #: who authenticated this connection, set by the daemon during the handshake
        self.principal: Principal | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[Frame] | None = None
        self._reading_paused = False
        self._lost = False
        #: called from data_received while the session waits, with the new messages in the
        #: inbox (see module doc); it takes what it handles out of the inbox and must not raise
        self.on_messages: Callable[[], None] | None = None
        #: set by the session when it has work for its task besides the inbox
        self.pending = False
        # websockets' flow control only appends, removes and iterates its waiters: a list
        # does that, in 56 bytes instead of a deque's 600
        self.drain_waiters = []  # type: ignore[assignment]

    # ------------------------------------------------------------------ websockets hooks

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        # the daemon read what it needs in process_request (path, token); websockets reads
        # neither after the handshake (see "Memory" in the module doc). The request object
        # itself stays referenced by websockets' parser (a local of the generator that
        # parsed it, for the connection's life), so its headers are emptied too.
        if self.request is not None:
            self.request.headers.clear()
        self.request = None
        self.response = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages = _NO_ASSEMBLER  # type: ignore[assignment]

    def process_event(self, event: Any) -> None:
        if type(event) is not Frame:
            super().process_event(event)  # the handshake request
            return
        opcode = event.opcode
        if opcode is _TEXT or opcode is _BINARY:
            if event.fin:
                self._deliver(opcode, event.data)
            else:
                self._fragments = [event]
        elif opcode is _CONT:
            fragments = self._fragments
            if fragments is None:  # pragma: no cover - the protocol parser refuses it
                return
            fragments.append(event)
            if event.fin:
                self._fragments = None
                self._deliver(fragments[0].opcode, b"".join(f.data for f in fragments))
            elif len(fragments) >= MAX_FRAGMENTS:
                self._fragments = None
                self._fail(CloseCode.MESSAGE_TOO_BIG, "too many fragments")
        else:  # ping, pong, close: websockets' own handling, past ServerConnection's, which
            # takes an event for the handshake request while self.request is None
            Connection.process_event(self, event)

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        parked = waiter is not None and not waiter.done()
        try:
            rest = self._take_frames(data)
            if rest:
                super().data_received(rest)  # whole messages go to the inbox (_deliver)
        finally:
            if self.inbox or self.pending:
                handler = self.on_messages
                if parked and handler is not None:
                    handler()
                if self.inbox or self.pending:
                    self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost = True
        self._wake()

    # ------------------------------------------------------------------ the session's side

    async def wait_messages(self) -> bool:
        """Wait until the inbox holds a message (True) or the connection is closed and the
        inbox empty (False after a normal closure; raises ConnectionClosedError otherwise,
        as ``recv()`` does)."""
        while not self.inbox and not self.pending:
            if self._lost:
                await asyncio.shield(self.connection_lost_waiter)
                exc = self.close_exc
                if isinstance(exc, ConnectionClosedOK):
                    return False
                raise exc
            waiter = self._waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return True

    def can_send_now(self) -> bool:
        """Whether :meth:`send_now` would write at once: open, no other send in progress
        (websockets' ``send()`` of a fragmented message), not asked to pause writes."""
        protocol = self.protocol
        return (
            protocol.state is _OPEN
            and self.send_in_progress is None
            and not protocol.expect_continuation_frame
            and not protocol.extensions
            and not self.paused
            and not self.transport.is_closing()
        )

    def send_now(self, text: str) -> bool:
        """Write a text message at once, if the connection can take it without waiting
        (:meth:`can_send_now`). Returns False, having written nothing, otherwise; the caller
        then uses ``await send()``.

        It writes the frame ``send()`` writes, and ``send()`` would not have suspended either
        (its ``drain`` waits only while writing is paused); it only spares the asynchronous
        context manager, the coroutine and websockets' frame object per message (decisions
        are latency-bound: every microsecond between the frame in and the decision out
        counts).
        """
        if not self.can_send_now():
            return False
        self.write_text(text)
        return True

    def write_text(self, text: str) -> None:
        """Write ``text`` as one unfragmented text frame now, whether or not the transport
        asked to pause writing (it buffers). Only after :meth:`can_send_now` was True in the
        same event-loop turn: nothing else can have changed the connection since."""
        if self.protocol.writes:  # anything websockets queued (a pong) goes first
            self.send_data()
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes((_FIN_TEXT, n))
        elif n < 65536:
            head = _HEAD_16(_FIN_TEXT, 126, n)
        else:
            head = _HEAD_64(_FIN_TEXT, 127, n)
        self.transport.write(head + data)

    def ping_now(self) -> bytes | None:
        """Send a ping at once, as websockets' ``ping()`` does but without waiting (a control
        frame of 6 bytes: the transport buffers it if writing is paused). Returns its
        payload, which stays in websockets' ``pending_pings`` until the pong arrives (which
        also measures ``latency``), or None if the connection is not open."""
        if self.protocol.state is not _OPEN:
            return None
        pings = self.pending_pings
        data = _PING.pack(random.getrandbits(32))
        while data in pings:
            data = _PING.pack(random.getrandbits(32))
        pings[data] = (self.loop.create_future(), self.loop.time())
        self.protocol.send_ping(data)
        self.send_data()
        return data

    async def fail_keepalive(self) -> None:
        """Close the connection with 1011, as websockets' keepalive does when a ping's pong
        is late: send the close frame, wait for the peer to close up to ``close_timeout``,
        then drop the TCP connection."""
        try:
            async with self.send_context():
                self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        except ConnectionClosed:
            pass

    def release_idle_inbox(self) -> None:
        """Give back the inbox's deque if it is empty (~600 bytes); the next message makes
        a new one. The daemon calls it at its periodic tick, not after every read: a deque
        made and dropped per read would cost a stream of single-point frames ~0.3 us each."""
        if not self.inbox:
            self.inbox = _NO_MESSAGES

    def taken(self) -> None:
        """The session took messages out of the inbox: read from the socket again if paused."""
        if self._reading_paused and len(self.inbox) <= INBOX_LOW:
            self._reading_paused = False
            if not self._lost:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ internals

    def _take_frames(self, data: bytes) -> bytes:
        """Deliver the whole unfragmented data frames at the start of ``data`` (after what
        an earlier read left in websockets' buffer), while websockets' parser waits between
        frames; returns what is left for the parser (see module doc), ``b""`` if nothing.

        Frames are checked as websockets' parser checks them (RFC 6455 5.2, 5.3): FIN set,
        no reserved bit, opcode text or binary, masked (a client's frames are), at most
        ``max_size`` bytes. A frame that is anything else stops the loop there, and the
        parser gets it and what follows, so it answers as before (a pong, 1002, 1009...).
        """
        protocol = self.protocol
        try:
            if (
                protocol.state is not _OPEN
                or protocol.current_size is not None  # a fragmented message in progress
                or protocol.extensions
                or protocol.debug  # websockets logs each frame it parses
                or not _between_frames(protocol.parser)
            ):
                return data
            max_size = protocol.max_message_size
            if protocol.max_fragment_size is not None:
                max_size = min(max_size or protocol.max_fragment_size, protocol.max_fragment_size)
            buffer = protocol.reader.buffer
        except AttributeError:  # a websockets without these internals (< 16): its parser
            return data  # does all the parsing, as it did before this shortcut
        if buffer:  # the start of a frame an earlier read left
            buffer += data  # a large frame over many reads: appended, not copied each read
            if _frame_bounds(buffer, 0, len(buffer), max_size) is None:
                return b""
            data = bytes(buffer)
            buffer.clear()
        end = len(data)
        i = 0
        while i < end:
            bounds = _frame_bounds(data, i, end, max_size)
            if bounds is None:  # incomplete: kept where the parser, still waiting between
                buffer += data[i:]  # frames, reads it if the next bytes go to it
                return b""
            if not bounds:
                return data[i:]
            start, stop = bounds
            self._deliver(
                _TEXT if data[i] == _FIN_TEXT_IN else _BINARY,
                apply_mask(data[start:stop], data[start - 4 : start]),
            )
            i = stop
            if protocol.state is not _OPEN:  # invalid UTF-8 failed the connection (1007)
                return data[i:]
        return b""

    def _deliver(self, opcode: Any, data: Any) -> None:
        if opcode is _TEXT:
            try:
                message: str | bytes = bytes(data).decode()
            except UnicodeDecodeError as exc:
                self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
        else:
            message = bytes(data)
        inbox = self.inbox
        if inbox is _NO_MESSAGES:
            inbox = self.inbox = deque()
        inbox.append(message)
        if len(inbox) > INBOX_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        # the session is woken by data_received, after its hook has seen the whole read

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: CloseCode, reason: str) -> None:
        # as websockets' recv() does on the same errors; data_received() has already sent
        # what it had, so the close frame is written here
        self.protocol.fail(code, reason)
        self.send_data()


def _frame_bounds(
    data: bytes | bytearray, i: int, end: int, max_size: int | None
) -> tuple[int, int] | tuple[()] | None:
    """Where the payload of the frame at ``data[i]`` starts and stops (its 4 mask bytes
    precede it), for a whole unfragmented masked text or binary frame of at most
    ``max_size`` bytes ending by ``end``; None if that frame is not all there yet; ``()``
    for any other frame (RFC 6455 5.2)."""
    first = data[i]
    if first != _FIN_TEXT_IN and first != _FIN_BINARY_IN:
        return ()
    if end - i < 2:
        return None
    second = data[i + 1]
    if not second & 0x80:  # unmasked
        return ()
    length = second & 0x7F
    start = i + 6
    if length == 126:
        start += 2
        if start <= end:
            length = int.from_bytes(data[i + 2 : i + 4], "big")
    elif length == 127:
        start += 8
        if start <= end:
            length = int.from_bytes(data[i + 2 : i + 10], "big")
    if start > end:
        return None
    if max_size is not None and length > max_size:
        return ()
    stop = start + length
    return None if stop > end else (start, stop)


def _between_frames(parser: Any) -> bool:
    """Whether websockets' parser (a chain of generators) waits for the first byte of a
    frame: what its reader's buffer holds then starts a frame, and a frame parsed without
    it leaves it as it was (a frame changes its state only when fragmented, or a control
    frame)."""
    while True:
        inner = parser.gi_yieldfrom
        if inner is None:
            return parser.gi_code is _AT_EOF
        parser = inner


class Keepalive:
    """Pings every open connection each ``interval`` seconds from one task, and closes with
    1011 those whose pong has not come ``timeout`` seconds later.

    websockets does the same from a task per connection (``ping_interval`` of ``serve()``),
    which costs an idle connection 1.6 KiB: its task, its coroutine and its timer. The
    daemon serves with ``ping_interval=None`` and runs one of these instead. Pings of a
    round are sent in one event-loop turn; a connection whose earlier ping is still waiting
    for its pong gets a new one too (a pong answers every ping before it).
    """

    def __init__(
        self,
        connections: Callable[[], Iterable[object]],
        interval: float,
        timeout: float | None,
    ) -> None:
        self.connections = connections
        self.interval = interval
        self.timeout = timeout
        self._failing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Ping round after ping round, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                sent = self.ping_all()
            except Exception:  # a bug: the next round tries again
                log.exception("keepalive ping round failed")
                continue
            if sent and self.timeout is not None:
                loop.call_later(self.timeout, self.expire, sent)

    def ping_all(self) -> list[tuple[JobConnection, bytes]]:
        """Ping every open connection now; returns them with their pings' payloads."""
        sent = []
        for conn in self.connections():
            if isinstance(conn, JobConnection):
                data = conn.ping_now()
                if data is not None:
                    sent.append((conn, data))
        return sent

    def expire(self, sent: list[tuple[JobConnection, bytes]]) -> None:
        """Close the connections of ``sent`` still open whose ping has no pong yet."""
        for conn, data in sent:
            if data in conn.pending_pings and conn.protocol.state is _OPEN:
                task = conn.loop.create_task(conn.fail_keepalive())
                self._failing.add(task)
                task.add_done_callback(self._failing.discard)
