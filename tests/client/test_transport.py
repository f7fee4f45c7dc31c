"""The websocket transport against a real websockets server (port 0, in a thread)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lrpilot._transport import TransportClosed, WebSocketTransport
from websockets.sync.server import serve


@pytest.fixture
def server() -> Iterator[tuple[str, queue.Queue[Any], list[Any]]]:
    """A websockets server that queues every message it receives; its connections are listed."""
    received: queue.Queue[Any] = queue.Queue()
    connections: list[Any] = []

    def handler(ws: Any) -> None:
        connections.append(ws)
        for message in ws:
            received.put(message)

    with serve(handler, "127.0.0.1", 0, compression=None) as srv:
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        port = srv.socket.getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", received, connections
        srv.shutdown()
        thread.join(5)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 300_000])
def test_text_frames_of_every_length_encoding_arrive_intact(
    server: tuple[str, queue.Queue[Any], list[Any]], size: int
) -> None:
    """The client's own text frames (7-bit, 16-bit and 64-bit lengths, masked) are what a
    websockets server decodes, as text, byte for byte, in order."""
    url, received, _ = server
    conn = WebSocketTransport().connect(url, {}, 5.0)
    try:
        assert conn._apply_mask is not None  # type: ignore[attr-defined]  # the short path
        text = ("é" + "x" * size)[:size] if size else ""
        conn.send(text)
        conn.send("after")
        assert received.get(timeout=5) == text
        assert received.get(timeout=5) == "after"
    finally:
        conn.close()


def test_send_after_the_server_closed_raises_transport_closed(
    server: tuple[str, queue.Queue[Any], list[Any]],
) -> None:
    """Once the daemon closed the connection, send raises TransportClosed (websockets' send
    takes over when the protocol is no longer open)."""
    url, received, connections = server
    conn = WebSocketTransport().connect(url, {}, 5.0)
    try:
        conn.send("hello")
        assert received.get(timeout=5) == "hello"
        connections[0].close()
        deadline = time.monotonic() + 5
        with pytest.raises(TransportClosed):  # a send or two may go out before the close lands
            while time.monotonic() < deadline:
                conn.send("more")
                time.sleep(0.01)
    finally:
        conn.close()


def test_without_the_short_path_websockets_sends(
    server: tuple[str, queue.Queue[Any], list[Any]],
) -> None:
    """A connection without the attributes the short path needs sends with websockets' send."""
    url, received, _ = server
    conn = WebSocketTransport().connect(url, {}, 5.0)
    try:
        conn._apply_mask = None  # type: ignore[attr-defined]
        conn.send("via websockets")
        assert received.get(timeout=5) == "via websockets"
    finally:
        conn.close()


def test_masking_keys_come_from_the_csprng_fresh_for_every_frame(
    server: tuple[str, queue.Queue[Any], list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each frame is masked with the next 4 bytes of os.urandom, drawn 256 keys at a time (one
    system call per 256 frames, not per frame); none is used twice, and frames sent across a
    new draw arrive intact."""
    import os

    from lrpilot import _transport

    draws: list[bytes] = []
    system_urandom = os.urandom

    def urandom(n: int) -> bytes:
        draws.append(system_urandom(n))
        return draws[-1]

    url, received, _ = server
    conn = WebSocketTransport().connect(url, {}, 5.0)
    sent: list[bytes] = []
    sock = conn._socket  # type: ignore[attr-defined]

    class Recording:
        def sendall(self, data: bytes) -> None:
            sent.append(bytes(data))
            sock.sendall(data)

    try:
        monkeypatch.setattr(_transport.os, "urandom", urandom)
        conn._socket = Recording()  # type: ignore[attr-defined]
        texts = [f"frame {i}" for i in range(600)]
        for text in texts:
            conn.send(text)
        assert [received.get(timeout=5) for _ in texts] == texts
        assert [len(d) for d in draws] == [4 * _transport._MASKS_PER_DRAW] * 3
        keys = b"".join(draws)
        assert [frame[2:6] for frame in sent] == [keys[i * 4 : i * 4 + 4] for i in range(600)]
    finally:
        conn._socket = sock  # type: ignore[attr-defined]
        conn.close()


def test_closing_a_connection_ends_a_recv_waiting_on_it_at_once(
    server: tuple[str, queue.Queue[Any], list[Any]],
) -> None:
    """close() from another thread makes a recv that waits with a long timeout raise
    TransportClosed at once: the client's receiver thread relies on it to end when the sender
    drops its connection, and waits up to ``_RECEIVER_WAIT`` (10 s) otherwise."""
    url, _, _ = server
    conn = WebSocketTransport().connect(url, {}, 5.0)
    outcome: list[BaseException | str | None] = []

    def receive() -> None:
        try:
            outcome.append(conn.recv(30.0))
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=receive, daemon=True)
    waiter.start()
    time.sleep(0.2)  # let it wait in recv
    started = time.monotonic()
    conn.close()
    waiter.join(5.0)
    assert not waiter.is_alive() and time.monotonic() - started < 3.0
    assert len(outcome) == 1 and isinstance(outcome[0], TransportClosed)
