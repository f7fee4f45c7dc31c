"""Integration tests of limits, auth, handler crashes and fuzzed frames against a real daemon."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

from ._daemon import Client, make_config, running, threaded

ADMIN = "admin-secret-1"
TEAM_A = "team-a-secret"
TOKENS = {
    "auth": {
        "tokens": [
            {"token": ADMIN, "role": "admin", "name": "ops"},
            {"token": TEAM_A, "role": "job", "jobs": ["team-a-*"], "name": "team-a"},
        ]
    }
}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_oversized_frames_are_refused_and_the_connection_continues(tmp_path: Path) -> None:
    """A frame over max_frame_bytes gets frame_too_large; the same connection keeps working."""

    async def main() -> None:
        async with running(make_config(tmp_path, server={"max_frame_bytes": 2048})) as d:
            c = await Client.open(d.url)
            await c.hello("big")
            await c.metrics(list(range(300)), loss=[0.5] * 300)
            err = await c.recv()
            assert err["code"] == "frame_too_large" and "2048" in err["message"]
            await c.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await c.recv())["type"] == "decision"
            assert d.stats.frames_rejected == {"frame_too_large": 1}
            # far beyond the limit, websockets closes the connection itself (1009)
            await c.metrics(list(range(3000)), loss=[0.5] * 3000)
            with pytest.raises(ConnectionClosed) as info:
                await c.recv()
            assert info.value.sent is not None and info.value.sent.code == 1009
            await asyncio.sleep(0.05)
            assert d.stats.frames_rejected == {"frame_too_large": 2}

    run(main())


def test_too_many_metric_names_drops_the_frame(tmp_path: Path) -> None:
    """A frame that would exceed max_metric_names_per_job is refused whole, others still count."""

    async def main() -> None:
        async with running(make_config(tmp_path, limits={"max_metric_names_per_job": 3})) as d:
            c = await Client.open(d.url)
            await c.hello("m")
            await c.metrics([1], a=[1.0], b=[1.0])
            await c.metrics([2], c=[1.0], d=[1.0])
            err = await c.recv()
            assert err["code"] == "too_many_metrics"
            job = d.registry.jobs["m"]  # type: ignore[union-attr]
            assert job.metric_names == {"a", "b"} and job.engine.last_step == 1
            await c.metrics([3], c=[1.0])
            await c.send({"type": "heartbeat"})
            assert await c.nothing(0.1)
            assert job.metric_names == {"a", "b", "c"}
            await c.close()

    run(main())


def test_message_rate_is_limited_per_connection(tmp_path: Path) -> None:
    """Messages beyond the per-connection rate get rate_limited; another connection is unaffected."""

    async def main() -> None:
        cfg = make_config(tmp_path, limits={"max_messages_per_second": 5})
        async with running(cfg) as d:
            noisy, quiet = await Client.open(d.url), await Client.open(d.url)
            await noisy.hello("noisy")
            await quiet.hello("quiet")
            for i in range(10):
                await noisy.send({"type": "heartbeat", "step": i})
            errs = [await noisy.recv() for _ in range(5)]
            assert {e["code"] for e in errs} == {"rate_limited"}
            await quiet.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await quiet.recv())["type"] == "decision"
            assert d.stats.frames_rejected["rate_limited"] >= 5
            await noisy.close()
            await quiet.close()

    run(main())


def test_too_many_jobs_refuses_the_hello(tmp_path: Path) -> None:
    """Beyond max_jobs live jobs, a hello for a new job gets too_many_jobs; known jobs still connect."""

    async def main() -> None:
        async with running(make_config(tmp_path, limits={"max_jobs": 2})) as d:
            a, b, c = [await Client.open(d.url) for _ in range(3)]
            await a.hello("a")
            await b.hello("b")
            err = await c.hello("c")
            assert err["code"] == "too_many_jobs"
            await b.close()
            assert (await c.hello("b"))["type"] == "welcome"
            await a.close()
            await c.close()

    run(main())


def test_a_crashing_handler_closes_only_its_connection_with_1011(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while handling one message closes that connection (1011), logged; others go on."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            registry = d.registry
            assert registry is not None
            original = registry.checkpoint

            def broken(job: Any, rank: int, step: int) -> None:
                if job.name == "victim":
                    raise RuntimeError("boom")
                original(job, rank, step)

            registry.checkpoint = broken  # type: ignore[method-assign]
            victim, bystander = await Client.open(d.url), await Client.open(d.url)
            await victim.hello("victim")
            await bystander.hello("bystander")
            await victim.send({"type": "checkpoint", "step": 3})
            err = await victim.recv()
            assert err["code"] == "internal"
            with pytest.raises(ConnectionClosed) as info:
                await victim.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1011
            await bystander.send({"type": "checkpoint", "step": 3})
            await bystander.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await bystander.recv())["type"] == "decision"
            assert d.stats.handler_crashes == 1
            await bystander.close()

    run(main())
    assert any("boom" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_missing_or_wrong_token_is_refused_with_401(tmp_path: Path) -> None:
    """With tokens configured, a handshake without one or with an unknown one gets HTTP 401."""

    async def main() -> None:
        async with running(make_config(tmp_path, **TOKENS)) as d:
            for token in (None, "wrong-token-123"):
                with pytest.raises(InvalidStatus) as info:
                    await Client.open(d.url, token)
                assert info.value.response.status_code == 401
            c = await Client.open(d.url, TEAM_A)
            assert (await c.hello("team-a-1"))["type"] == "welcome"
            await c.close()

    run(main())


def test_job_token_scope_is_enforced(tmp_path: Path) -> None:
    """A job token may stream only its jobs and may not run operator commands."""

    async def main() -> None:
        async with running(make_config(tmp_path, **TOKENS)) as d:
            c = await Client.open(d.url, TEAM_A)
            err = await c.hello("team-b-1")
            assert err["code"] == "forbidden"
            await c.send({"type": "command", "command": "jobs"})
            assert (await c.recv())["code"] == "forbidden"
            assert (await c.hello("team-a-1"))["type"] == "welcome"
            await c.close()
            admin = await Client.open(d.url, ADMIN)
            await admin.send({"type": "command", "command": "jobs"})
            res = await admin.recv()
            assert [j["job"] for j in res["data"]["jobs"]] == ["team-a-1"]
            await admin.close()

    run(main())


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["hello", "metrics", "checkpoint", "ack", "heartbeat", "finished", "command",
             "decision", "welcome", "error", "result", "zzz"]
        ) | _json_values,
        "protocol": st.just(1) | _json_values,
        "job": st.just("fuzz") | _json_values,
        "lrs": st.just([0.1]) | _json_values,
        "steps": st.lists(st.integers(-2, 10**12), max_size=4) | _json_values,
        "values": st.dictionaries(
            st.text(max_size=4), st.lists(st.none() | st.floats() | st.text(max_size=3), max_size=4),
            max_size=3,
        ) | _json_values,
        "step": st.integers() | _json_values,
        "id": st.integers() | _json_values,
        "applied_at_step": st.integers() | _json_values,
        "command": st.sampled_from(["status", "jobs", "show", "set_lr", "pause", "x"]) | _json_values,
        "world_size": _json_values,
        "rank": _json_values,
        "resume": _json_values,
        "policy": _json_values,
    },
)
_frames = _fields.map(lambda d: json.dumps(d)) | st.text(max_size=40) | st.binary(max_size=40)


@pytest.mark.slow
def test_fuzzed_frames_never_break_the_daemon(tmp_path: Path) -> None:
    """Random frames get answers or silence, never a crash, and a bystander job keeps working."""
    with threaded(make_config(tmp_path)) as td:
        with sync_connect(td.url, compression=None) as fuzz, sync_connect(
            td.url, compression=None
        ) as bystander:
            bystander.send(json.dumps({"type": "hello", "protocol": 1, "job": "by", "lrs": [0.1]}))
            assert json.loads(bystander.recv(5))["type"] == "welcome"

            counter = iter(range(10**9))

            @settings(max_examples=300, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(frame=_frames)
            def one(frame: str | bytes) -> None:
                fuzz.send(frame)
                # a marker that is always answered, naming itself: everything the daemon said
                # about the fuzzed frame arrives before it
                marker = f"marker-{next(counter)}"
                fuzz.send(json.dumps({"type": "command", "command": "show", "job": marker}))
                while True:
                    reply = json.loads(fuzz.recv(5))
                    assert reply["type"] in ("error", "welcome", "result", "decision"), reply
                    if reply["type"] == "error":
                        assert reply["code"] != "internal", reply
                        if marker in reply["message"]:
                            break

            one()
            bystander.send(json.dumps({"type": "metrics", "steps": [1, 2], "values": {"val_loss": [1, 1]}}))
            assert json.loads(bystander.recv(5))["type"] == "decision"
        assert td.daemon is not None and td.daemon.stats.handler_crashes == 0


def test_without_tokens_remote_peers_get_health_probes_only(tmp_path: Path) -> None:
    """No token configured: a non-loopback peer (a kubelet probing the pod IP) may read
    /healthz and /readyz, and is refused (403) everything else; with a token, /metrics opens."""
    from types import SimpleNamespace

    from websockets.datastructures import Headers
    from websockets.http11 import Request

    remote: Any = SimpleNamespace(remote_address=("10.1.2.3", 5555))

    def status(daemon: Any, path: str) -> int:
        response = daemon._process_request(remote, Request(path, Headers()))
        return 0 if response is None else int(response.status_code)

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            assert [status(d, p) for p in ("/healthz", "/readyz")] == [200, 200]
            assert [status(d, p) for p in ("/metrics", "/api/jobs", "/ws")] == [403, 403, 403]
        async with running(make_config(tmp_path, **TOKENS)) as d:
            assert [status(d, p) for p in ("/healthz", "/metrics", "/api/jobs", "/ws")] == [200, 200, 401, 401]
        async with running(make_config(tmp_path, exporter={"public": True})) as d:
            assert [status(d, p) for p in ("/metrics", "/api/jobs", "/ws")] == [200, 403, 403]

    run(main())
