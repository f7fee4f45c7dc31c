"""What a daemon connection does not keep once it is open, and that it works without it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from websockets.server import ServerProtocol

from monitor.server import connection as connection_module
from monitor.server.app import Daemon
from monitor.server.connection import JobConnection

from ._daemon import Client, make_config, running

STATUS = {"type": "command", "command": "status"}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def only_connection(daemon: Any) -> JobConnection:
    (conn,) = daemon.server.connections
    assert isinstance(conn, JobConnection)
    return conn


def test_an_open_idle_connection_holds_no_handshake_assembler_or_inbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the handshake and a drained inbox, the connection holds neither the request and
    response nor a deque of its own (the request object, which websockets' parser keeps, has
    no headers left); its own attributes are slots, not __dict__ entries."""
    requests: list[Any] = []
    process_request = Daemon._process_request

    def keeping(self: Daemon, connection: Any, request: Any) -> Any:
        requests.append(request)
        return process_request(self, connection, request)

    monkeypatch.setattr(Daemon, "_process_request", keeping)

    async def main() -> None:
        async with running(make_config(tmp_path), tick_seconds=0.05) as d:
            c = await Client.open(d.url)
            assert (await c.hello("idle"))["type"] == "welcome"
            await c.metrics([1], loss=[0.5])
            await c.send(STATUS)
            assert (await c.recv())["type"] == "result"
            conn = only_connection(d)
            for _ in range(100):  # the daemon's tick gives an empty inbox's deque back
                if conn.inbox is connection_module._NO_MESSAGES:
                    break
                await asyncio.sleep(0.02)
            assert conn.request is None and conn.response is None
            assert len(requests) == 1 and not list(requests[0].headers.raw_items())
            assert conn.inbox is connection_module._NO_MESSAGES
            assert conn.recv_messages is connection_module._NO_ASSEMBLER
            assert conn.principal is not None
            assert not {"inbox", "principal", "pending", "on_messages"} & set(vars(conn))
            # and it still takes messages: the session reads what arrives next
            await c.metrics([2], loss=[0.4])
            await c.send(STATUS)
            result = await c.recv()
            assert result["type"] == "result"
            assert d.registry is not None and d.registry.get("idle") is not None
            assert d.registry.get("idle").engine.last_step == 2  # type: ignore[union-attr]
            await c.close()

    run(main())


def test_pings_and_pongs_still_reach_websockets_after_the_handshake(tmp_path: Path) -> None:
    """Control frames take websockets' own path with the request dropped: the daemon's
    keepalive pings are answered (its latency is measured) and the client's pings too."""

    async def main() -> None:
        config = make_config(tmp_path, server={"ping_interval_seconds": 0.05})
        async with running(config) as d:
            c = await Client.open(d.url)
            assert (await c.hello("pinged"))["type"] == "welcome"
            conn = only_connection(d)
            for _ in range(100):
                if conn.latency > 0:
                    break
                await asyncio.sleep(0.02)
            assert conn.latency > 0  # the server's ping came back as a pong
            pong = await c.ws.ping()
            assert await asyncio.wait_for(pong, 5) >= 0  # the server answered the client's
            await c.close()
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.close_code == 1000

    run(main())


def test_recv_on_a_job_connection_fails_at_once(tmp_path: Path) -> None:
    """Messages go to the inbox: recv() raises instead of waiting for ever."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            assert (await c.hello("recv"))["type"] == "welcome"
            with pytest.raises(RuntimeError, match="wait_messages"):
                await only_connection(d).recv()
            await c.close()

    run(main())


def test_the_shared_empty_inbox_takes_no_message() -> None:
    """Every idle connection shares one empty inbox: putting a message in it raises."""
    empty = connection_module._NO_MESSAGES
    for put in (empty.append, empty.appendleft):
        with pytest.raises(TypeError):
            put("x")
    with pytest.raises(TypeError):
        empty.extend(["x"])
    assert len(empty) == 0 and not empty


class _Transport:
    def __init__(self) -> None:
        self.limits: tuple[int, int | None] | None = None

    def set_write_buffer_limits(self, high: int, low: int | None) -> None:
        self.limits = (high, low)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Server:
    def __init__(self) -> None:
        self.handler_tasks: set[Any] = set()

    async def handler(self, _conn: Any) -> None:
        pass


def test_drain_waits_while_writing_is_paused_and_resumes() -> None:
    """websockets' flow control works with the connection's list of drain waiters."""

    async def main() -> None:
        conn = JobConnection(ServerProtocol(), _Server())  # type: ignore[arg-type]
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        await conn.drain()  # not paused: returns at once
        conn.pause_writing()
        waiting = [asyncio.ensure_future(conn.drain()) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(conn.drain_waiters) == 3 and not any(w.done() for w in waiting)
        conn.resume_writing()
        await asyncio.wait_for(asyncio.gather(*waiting), 1)
        assert list(conn.drain_waiters) == []

    run(main())


async def _raw_websocket(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket opened by hand: it answers nothing, pings included."""
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: " + host_port.encode() + b"\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _server_frames(reader: asyncio.StreamReader, until: int) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames the server sends, up to the first ``until``."""
    frames = []
    while True:
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
        n = b1 & 0x7F  # control frames and these tests' frames are short
        frames.append((b0 & 0x0F, await reader.readexactly(n)))
        if b0 & 0x0F == until:
            return frames


def test_the_daemon_pings_every_connection_and_closes_one_that_never_answers(
    tmp_path: Path,
) -> None:
    """One keepalive for all connections: a peer that answers pings stays, one that does not
    gets a close frame with 1011 "keepalive ping timeout" after a ping and the timeout."""

    async def main() -> None:
        config = make_config(tmp_path, server={"ping_interval_seconds": 0.1})
        async with running(config) as d:
            answering = await Client.open(d.url)
            assert (await answering.hello("answers"))["type"] == "welcome"
            reader, writer = await _raw_websocket(d.url)
            t0 = asyncio.get_running_loop().time()
            frames = await _server_frames(reader, until=0x8)  # up to the close frame
            elapsed = asyncio.get_running_loop().time() - t0
            opcodes = [op for op, _ in frames]
            assert opcodes[0] == 0x9 and opcodes[-1] == 0x8  # pings, then the close
            close = frames[-1][1]
            assert int.from_bytes(close[:2], "big") == 1011
            assert close[2:] == b"keepalive ping timeout"
            assert 0.15 <= elapsed < 3
            writer.close()
            # the peer that answers is still served, its pings measured
            await answering.send(STATUS)
            assert (await answering.recv())["type"] == "result"
            assert [c.latency > 0 for c in d.server.connections] == [True]  # type: ignore[union-attr]
            await answering.close()

    run(main())


def test_the_daemon_starts_no_keepalive_task_per_connection(tmp_path: Path) -> None:
    """websockets' keepalive task per connection is off: the daemon's one pings them all."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            assert (await c.hello("one"))["type"] == "welcome"
            conn = only_connection(d)
            assert conn.keepalive_task is None
            assert conn.ping_now() is not None and len(conn.pending_pings) == 1
            await c.close()
            await asyncio.wait_for(conn.wait_closed(), 5)
            assert conn.ping_now() is None  # a closed connection is not pinged

    run(main())


def test_a_connection_keeps_its_inbox_deque_between_reads_until_the_tick(tmp_path: Path) -> None:
    """One deque serves read after read (not one made per read); release_idle_inbox, which
    the tick calls, gives it back only while it is empty."""

    async def main() -> None:
        async with running(make_config(tmp_path), tick_seconds=3600) as d:
            c = await Client.open(d.url)
            assert (await c.hello("busy"))["type"] == "welcome"
            conn = only_connection(d)
            inbox = conn.inbox
            assert inbox is not connection_module._NO_MESSAGES and not inbox
            for step in range(1, 4):
                await c.metrics([step], loss=[1.0 / step])
                await c.send(STATUS)
                assert (await c.recv())["type"] == "result"
                assert conn.inbox is inbox
            inbox.append("kept")  # as if a message waited: it is not dropped
            conn.release_idle_inbox()
            assert conn.inbox is inbox
            inbox.clear()
            conn.release_idle_inbox()
            assert conn.inbox is connection_module._NO_MESSAGES
            await c.metrics([4], loss=[0.2])  # the next message makes a new deque
            await c.send(STATUS)
            assert (await c.recv())["type"] == "result"
            assert d.registry is not None
            assert d.registry.get("busy").engine.last_step == 4  # type: ignore[union-attr]
            await c.close()

    run(main())


def test_a_failing_ping_round_is_logged_and_the_next_one_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in one round of the keepalive does not end it: it logs and pings again."""
    rounds: list[int] = []

    def connections() -> list[Any]:
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("boom")
        return []

    async def main() -> None:
        task = asyncio.ensure_future(connection_module.Keepalive(connections, 0.01, 0.01).run())
        for _ in range(200):
            if len(rounds) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert len(rounds) >= 3
    assert "keepalive ping round failed" in caplog.text
