"""The daemon's connection parses whole data frames itself and leaves every other frame, and
what follows it, to websockets: the same messages and answers however the bytes are cut."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from monitor.server import connection

from ._daemon import make_config, running


def _frame(payload: bytes, opcode: int = 1, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame (RFC 6455 5.2), masked with a random key unless told otherwise."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _hello(job: str) -> bytes:
    return _frame(json.dumps({"type": "hello", "protocol": 1, "job": job, "lrs": [0.1]}).encode())


def _metrics(first: int, n: int) -> bytes:
    steps = list(range(first, first + n))
    return json.dumps(
        {"type": "metrics", "steps": steps, "values": {"loss": [1.0 / (s + 1) for s in steps]}}
    ).encode()


class _Raw:
    """A client on a plain TCP stream: writes bytes as given, reads the daemon's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n", 1)[0]
        return cls(reader, writer)

    async def write(self, data: bytes, chunk: int) -> None:
        """``data`` in writes of ``chunk`` bytes, each read by the daemon on its own."""
        for i in range(0, len(data), chunk):
            self.writer.write(data[i : i + chunk])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def next_frame(self) -> tuple[int, bytes]:
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 10)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return first & 0x0F, await self.reader.readexactly(n)

    async def until(self, kind: str) -> list[tuple[int, bytes]]:
        """Every frame up to the first text message of type ``kind``, included."""
        out = []
        while True:
            opcode, payload = await self.next_frame()
            out.append((opcode, payload))
            if opcode == 1 and json.loads(payload)["type"] == kind:
                return out

    def close(self) -> None:
        self.writer.close()


@pytest.mark.parametrize("chunk", [1, 5, 97, 100_000])
def test_frames_cut_anywhere_give_the_same_messages_and_answers(tmp_path: Path, chunk: int) -> None:
    """Single-point frames, frames with 16- and 64-bit lengths, a ping between them and a
    fragmented message, written ``chunk`` bytes at a time: every record reaches the job in
    order, the ping is answered with its payload, and the status after them counts them."""
    _mixed_frames_reach_the_job(tmp_path, chunk)


@pytest.mark.parametrize("chunk", [5, 100_000])
def test_without_the_parser_internals_websockets_parses_every_frame(
    tmp_path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A websockets release without the parser internals the shortcut reads (an attribute
    error there) leaves every frame to websockets' own parser, with the same results."""
    taken: list[bytes] = []

    def missing(parser: object) -> bool:
        taken.append(b"")
        raise AttributeError("gi_yieldfrom")

    monkeypatch.setattr(connection, "_between_frames", missing)
    _mixed_frames_reach_the_job(tmp_path, chunk)
    assert taken  # the shortcut was tried, and gave way


def _mixed_frames_reach_the_job(tmp_path: Path, chunk: int) -> None:
    frames = [_frame(_metrics(s, 1)) for s in range(0, 40)]
    frames.append(_frame(_metrics(40, 10)))  # 16-bit length
    frames.append(_frame(_metrics(50, 4000)))  # 64-bit length
    frames.append(_frame(b"ping-1", opcode=9))
    frames += [_frame(_metrics(s, 1)) for s in range(4050, 4060)]
    text = _metrics(4060, 5)
    frames += [  # one message in three fragments
        _frame(text[:7], opcode=1, fin=False),
        _frame(text[7:20], opcode=0, fin=False),
        _frame(text[20:], opcode=0),
    ]
    frames += [_frame(_metrics(s, 1)) for s in range(4065, 4070)]
    frames.append(_frame(json.dumps({"type": "command", "command": "status"}).encode()))

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await _Raw.open(d.port)
            await c.write(_hello("j"), 9)
            await c.until("welcome")
            await c.write(b"".join(frames), chunk)
            got = await c.until("result")
            assert (10, b"ping-1") in got
            status = json.loads(got[-1][1])["data"]["stats"]
            assert status["messages"]["metrics"] == 40 + 2 + 10 + 1 + 5
            assert d.registry is not None
            job = d.registry.jobs["j"]
            assert job.records == job.points == 4070
            assert job.engine.last_step == 4069
            c.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (_frame(_metrics(1, 1), masked=False), 1002),  # a client's frames are masked
        (_frame(_metrics(1, 1), opcode=0x41), 1002),  # a reserved bit
        (_frame(b"\xff\xfe{}"), 1007),  # text that is not UTF-8
        (struct.pack("!BBQ", 0x81, 0xFF, 2**40) + b"\0\0\0\0", 1009),  # over the limit
    ],
)
def test_a_frame_websockets_refuses_closes_the_connection_as_before(
    tmp_path: Path, data: bytes, code: int
) -> None:
    """After good frames in the same write: the good ones are taken, then the connection
    closes with websockets' code for the bad frame, and the daemon serves others."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await _Raw.open(d.port)
            await c.write(_hello("j"), 99)
            await c.until("welcome")
            await c.write(_frame(_metrics(0, 1)) + _frame(_metrics(1, 1)) + data, 100_000)
            frames: list[tuple[int, bytes]] = []
            while not frames or frames[-1][0] != 8:
                frames.append(await c.next_frame())
            assert struct.unpack("!H", frames[-1][1][:2])[0] == code
            assert d.registry is not None
            assert d.registry.jobs["j"].records == 2
            c.close()
            other = await _Raw.open(d.port)
            await other.write(_hello("k"), 99)
            assert json.loads((await other.until("welcome"))[-1][1])["job"] == "k"
            other.close()

    asyncio.run(main())
