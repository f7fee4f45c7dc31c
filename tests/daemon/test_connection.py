"""The connection's inbox and the session's batching of frames that arrived together."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from lrpilot._protocol import MetricsBatch
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from monitor.server import sessions
from monitor.server.connection import JobConnection
from monitor.server.sessions import merge_batches

from ._daemon import Client, make_config, running


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_merge_batches_pads_missing_columns_with_none_in_record_order() -> None:
    """Merged batches keep record order; a column a batch lacks is None at its records."""
    a = MetricsBatch(steps=[1, 2], values={"loss": [1.0, 0.9]})
    b = MetricsBatch(steps=[3], values={"val_loss": [2.0]}, epochs=[0], times=[5.0])
    c = MetricsBatch(steps=[4], values={"loss": [None]})
    merged = merge_batches([a, b, c])
    assert merged.steps == [1, 2, 3, 4]
    assert merged.values == {"loss": [1.0, 0.9, None, None], "val_loss": [None, None, 2.0, None]}
    assert merged.epochs == [None, None, 0, None]
    assert merged.times == [None, None, 5.0, None]
    assert a.values == {"loss": [1.0, 0.9]} and a.steps == [1, 2]  # inputs untouched


def _frame(step: int, **values: float) -> str:
    return json.dumps({"type": "metrics", "steps": [step], "values": {k: [v] for k, v in values.items()}})


def test_pipelined_frames_get_the_decisions_of_frames_sent_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames written back to back (batched by the daemon) cause the very decisions that the same
    frames cause one at a time, with a reply between each; only a decision's apply_at_step may
    come later: it counts from the last step the daemon has read with it (JobEngine.feed_batch)."""
    rng = random.Random(7)
    frames = [
        _frame(s, **({"loss": rng.uniform(0.5, 1.5)} if s % 3 else {"val_loss": rng.choice([1.0, 0.9, 1.1])}))
        for s in range(1, 301)
    ]
    status = json.dumps({"type": "command", "command": "status"})
    merged: list[int] = []

    def counting_merge(batches: list[MetricsBatch]) -> MetricsBatch:
        merged.append(len(batches))
        return merge_batches(batches)

    monkeypatch.setattr(sessions, "merge_batches", counting_merge)

    async def decisions_of(c: Client) -> list[dict[str, Any]]:
        out = []
        while True:
            msg = await c.recv()
            if msg["type"] == "result":
                return out
            assert msg["type"] == "decision", msg
            out.append({k: msg[k] for k in ("id", "kind", "apply_at_step", "lrs")})

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            one, piped = await Client.open(d.url), await Client.open(d.url)
            await one.hello("one")
            await piped.hello("piped")
            slow: list[dict[str, Any]] = []
            for text in frames:
                await one.send(text)
                await one.send(status)
                slow += await decisions_of(one)
            # everything in one go: the daemon reads many frames per socket read
            await piped.ws.send(frames[0])
            await piped.send(status)
            fast = await decisions_of(piped)
            await asyncio.gather(*(piped.ws.send(t) for t in frames[1:]))
            await piped.send(status)
            fast += await decisions_of(piped)
            assert len(slow) >= 5
            assert merged and sum(merged) > 100  # the piped frames were batched
            def without_step(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [{k: v for k, v in d.items() if k != "apply_at_step"} for d in ds]

            assert without_step(fast) == without_step(slow)
            # one at a time, a decision applies one step (apply_lead_steps) after its record
            for f, s in zip(fast, slow, strict=True):
                assert s["apply_at_step"] <= f["apply_at_step"] <= 300 + 1
            assert d.registry is not None
            a, b = d.registry.jobs["one"], d.registry.jobs["piped"]
            assert (a.records, a.points) == (b.records, b.points) == (300, 300)
            assert a.engine.lrs == b.engine.lrs
            await one.close()
            await piped.close()

    run(main())


def test_a_fragmented_message_is_joined(tmp_path: Path) -> None:
    """A text message sent in fragments is handled as one message."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("frag")
            text = json.dumps({"type": "metrics", "steps": [1, 2], "values": {"val_loss": [1.0, 1.0]}})
            await c.ws.send([text[:10], text[10:30], text[30:]])
            assert (await c.recv())["type"] == "decision"
            await c.close()

    run(main())


def test_invalid_utf8_text_closes_the_connection_with_1007(tmp_path: Path) -> None:
    """A text frame that is not UTF-8 fails the connection (1007), as websockets itself does."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("utf")
            c.ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe{}"))
            c.ws.send_data()
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1007
            other = await Client.open(d.url)
            assert (await other.hello("other"))["type"] == "welcome"
            await other.close()

    run(main())


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_write_text_writes_the_frame_websockets_writes(size: int) -> None:
    """write_text's bytes are websockets' own unmasked text frame for every length encoding."""
    fake: Any = type("Fake", (), {})()
    fake.protocol = type("P", (), {"writes": []})()
    fake.transport = _Transport()
    text = ("é" * size)[: size // 2] + "x" * (size - size // 2)
    JobConnection.write_text(fake, text)
    assert b"".join(fake.transport.written) == Frame(Opcode.TEXT, text.encode()).serialize(
        mask=False, extensions=[]
    )


def count_drains(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the inbox length every time a session's task drains its inbox."""
    drains: list[int] = []
    drain = sessions.Session._drain

    async def counting_drain(self: sessions.Session, inbox: Any) -> None:
        drains.append(len(inbox))
        await drain(self, inbox)

    monkeypatch.setattr(sessions.Session, "_drain", counting_drain)
    return drains


def test_a_decision_leaves_in_the_read_that_brought_its_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics of known names, acks and heartbeats of a waiting session are handled from the
    read's callback: the session's task runs for the hello, a metric's first frame and a
    command, not for them."""
    drains = count_drains(monkeypatch)
    # a slow host can spend a whole slice on one decision: then the rest of the read goes to
    # the task (the next test); here the slice never ends
    monkeypatch.setattr(sessions, "TAKE_NOW_SECONDS", 60.0)

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("now")
            await c.metrics([0], val_loss=[1.0])  # a new metric name: registered by the task
            await c.send({"type": "command", "command": "status"})
            assert (await c.recv())["type"] == "result"
            before = len(drains)
            ids = []
            for step in range(1, 6):
                await c.metrics([step], val_loss=[1.0])
                decision = await c.recv()
                assert decision["type"] == "decision"
                ids.append(decision["id"])
                await c.send({"type": "ack", "id": decision["id"], "applied_at_step": step + 1})
                await c.send({"type": "heartbeat", "step": step})
            assert ids == sorted(ids) and len(ids) == 5
            await c.send({"type": "command", "command": "status"})
            assert (await c.recv())["type"] == "result"
            assert len(drains) == before + 1  # the status command only
            assert d.stats.messages["ack"] == 5 and d.stats.messages["heartbeat"] == 5
            assert d.registry is not None
            assert d.registry.jobs["now"].ranks[0].last_ack == ids[-1]
            await c.close()

    run(main())


def test_frames_wait_for_the_task_when_a_peer_cannot_be_written_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a peer cannot take a frame at once, the frames go to the session's task, which
    sends the same decisions in the same order as when every peer can."""

    async def decisions(state: str) -> list[tuple[int, Any]]:
        async with running(make_config(tmp_path / state)) as d:
            c = await Client.open(d.url)
            await c.hello("job")
            out = []
            for step in range(0, 8):
                await c.metrics([step], val_loss=[1.0 if step % 3 else 0.5])
                await c.send({"type": "command", "command": "status"})
                while (msg := await c.recv())["type"] != "result":
                    out.append((msg["id"], msg["lrs"]))
            await c.close()
            return out

    direct = run(decisions("a"))
    monkeypatch.setattr(JobConnection, "can_send_now", lambda self: False)
    waited = run(decisions("b"))
    assert len(direct) >= 4
    assert waited == direct


def test_a_bug_met_while_taking_messages_closes_that_connection_with_1011(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in the read-callback path is raised in the session's task: logged with its
    traceback, the peer gets error/internal and close 1011, the other connections carry on."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            assert d.registry is not None
            registry = d.registry
            ingest = registry.ingest

            def failing(job: Any, rank: int, batch: Any) -> Any:
                if job.name == "bad":
                    raise RuntimeError("boom")
                return ingest(job, rank, batch)

            registry.ingest = failing  # type: ignore[method-assign]
            bad, good = await Client.open(d.url), await Client.open(d.url)
            await bad.hello("bad")
            await good.hello("good")
            await bad.metrics([0], val_loss=[1.0])
            err = await bad.recv()
            assert err["type"] == "error" and err["code"] == "internal"
            with pytest.raises(ConnectionClosed) as info:
                await bad.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
            await good.metrics([0], val_loss=[1.0])
            await good.metrics([1], val_loss=[1.0])
            assert (await good.recv())["type"] == "decision"
            assert d.stats.handler_crashes == 1
            await good.close()

    with caplog.at_level("ERROR"):
        run(main())
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_the_read_callback_takes_messages_for_one_fair_slice_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the fair slice the read callback stops and the session's task (which takes turns
    with the other connections) handles the rest, with the same decisions."""
    drains = count_drains(monkeypatch)
    monkeypatch.setattr(sessions, "TAKE_NOW_SECONDS", -1.0)  # the slice is over at once

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("slice")
            await c.metrics([0], val_loss=[1.0])
            ids = []
            for step in range(1, 4):
                await c.metrics([step], val_loss=[1.0])
                ids.append((await c.recv())["id"])
            assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
            assert sum(drains) == 5  # the hello and every frame went through the task
            await c.close()

    run(main())
