"""Job lifecycle, persistence across daemon restarts, config reload, and the operator CLI."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from monitor import ops
from monitor.config import load_config
from monitor.server.jobs import JobState

from ._daemon import Client, FakeClock, config_dict, make_config, running, threaded


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_silent_job_goes_stale_and_comes_back(tmp_path: Path) -> None:
    """After stale_after_seconds of silence (daemon clock) a job is stale; metrics revive it."""
    clock = FakeClock()

    async def main() -> None:
        cfg = make_config(tmp_path, server={"stale_after_seconds": 30})
        async with running(cfg, clock=clock, tick_seconds=3600) as d:
            registry = d.registry
            assert registry is not None
            c = await Client.open(d.url)
            await c.hello("quiet")
            job = registry.jobs["quiet"]
            assert job.state is JobState.CONNECTED
            await c.metrics([1], loss=[1.0])
            await c.send({"type": "heartbeat"})
            await asyncio.sleep(0.05)
            assert job.state is JobState.RUNNING
            clock.now += 29
            assert registry.tick() == [] and job.state is JobState.RUNNING
            clock.now += 2
            assert registry.tick() == ["quiet"] and job.state is JobState.STALE
            await c.metrics([2], loss=[1.0])
            await c.send({"type": "heartbeat"})
            await asyncio.sleep(0.05)
            assert job.state is JobState.RUNNING
            await c.send({"type": "finished", "step": 2})
            await asyncio.sleep(0.05)
            assert job.state is JobState.FINISHED
            await c.close()

    run(main())


def test_a_multi_rank_job_finishes_when_every_rank_has(tmp_path: Path) -> None:
    """A 2-rank job stays running until both ranks sent finished."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            r0, r1 = await Client.open(d.url), await Client.open(d.url)
            await r0.hello("two", rank=0, world_size=2)
            await r1.hello("two", rank=1, world_size=2)
            await r0.metrics([1], loss=[1.0])
            await r0.send({"type": "finished", "step": 1})
            await asyncio.sleep(0.05)
            job = d.registry.jobs["two"]  # type: ignore[union-attr]
            assert job.state is JobState.RUNNING
            await r1.send({"type": "finished", "step": 1})
            await asyncio.sleep(0.05)
            assert job.state is JobState.FINISHED
            await r0.close()
            await r1.close()

    run(main())


def test_a_restarted_daemon_continues_every_job(tmp_path: Path) -> None:
    """After stop and start on the same state dir, jobs keep their LR, ids and journal."""
    cfg = make_config(tmp_path)

    async def first_plateau() -> None:
        async with running(cfg) as d:
            c = await Client.open(d.url)
            await c.hello("plateau", lrs=[0.4])
            await c.metrics([1, 2, 3], val_loss=[1.0, 1.0, 1.0])
            assert [(await c.recv())["id"] for _ in range(2)] == [1, 2]
            await c.send({"type": "ack", "id": 2, "applied_at_step": 4})
            await c.close()

    async def second() -> None:
        async with running(cfg) as d:
            job = d.registry.jobs["plateau"]  # type: ignore[union-attr]
            assert job.engine.lrs == (0.1,)
            c = await Client.open(d.url)
            w = await c.hello("plateau", lrs=[0.4], resume={"last_decision_id": 1, "last_step": 3})
            assert [x["id"] for x in w["decisions"]] == [2] and w["lrs"] == [0.1]
            await c.metrics([4], val_loss=[1.0])
            assert (await c.recv())["id"] == 3
            await c.close()
            assert d.store is not None
            assert d.store.acks("plateau", "r1") == [(2, 0, 4)]

    run(first_plateau())
    run(second())


def test_config_reload_good_and_broken(tmp_path: Path) -> None:
    """A valid edit applies to new jobs without dropping connections; a broken one is refused."""
    path = tmp_path / "config.yaml"
    raw = config_dict(tmp_path)
    path.write_text(yaml.safe_dump(raw))

    async def main() -> None:
        async with running(load_config(path), config_path=path) as d:
            old = await Client.open(d.url)
            await old.hello("before")
            raw2 = config_dict(tmp_path, defaults={"policy": {"patience": 3}})
            path.write_text(yaml.safe_dump(raw2))
            for _ in range(100):
                if d.stats.config_reloads["ok"]:
                    break
                await asyncio.sleep(0.05)
            assert d.stats.config_reloads == {"ok": 1, "error": 0}
            new = await Client.open(d.url)
            assert (await new.hello("after"))["policy"]["patience"] == 3
            await old.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await old.recv())["type"] == "decision"  # old job: old policy, still connected
            path.write_text("defaults:\n  policy:\n    factor: 7\n")
            for _ in range(100):
                if d.stats.config_reloads["error"]:
                    break
                await asyncio.sleep(0.05)
            assert d.stats.config_reloads == {"ok": 1, "error": 1}
            assert d.config.defaults.policy["patience"] == 3
            await old.close()
            await new.close()

    run(main())


def _args(**kw: Any) -> argparse.Namespace:
    base = {"url": None, "token": None, "json": False, "job": None, "lrs": None,
            "reason": None, "actor": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_ops_cli_lists_shows_and_sets_lr(tmp_path: Path) -> None:
    """The operator CLI prints tables, JSON, and its set-lr reaches the job with the actor."""
    from websockets.sync.client import connect

    with threaded(make_config(tmp_path)) as td, connect(td.url, compression=None) as job:
        job.send(json.dumps({"type": "hello", "protocol": 1, "job": "cli-job", "lrs": [0.1],
                             "total_steps": 1000}))  # fmt: skip
        json.loads(job.recv(5))
        job.send(json.dumps({"type": "metrics", "steps": [7], "values": {"loss": [0.5]}}))
        for step in (0, 5):
            job.send(json.dumps({"type": "checkpoint", "step": step}))
        time.sleep(0.1)
        out = io.StringIO()
        assert ops.run(_args(command="jobs", url=td.url), out=out) == 0
        assert "cli-job" in out.getvalue() and "STATE" in out.getvalue()
        out = io.StringIO()
        assert ops.run(_args(command="status", url=td.url, json=True), out=out) == 0
        assert json.loads(out.getvalue())["jobs"] == {"running": 1}
        out = io.StringIO()
        code = ops.run(
            _args(command="set-lr", url=td.url, job="cli-job", lrs="0.03", reason="manual",
                  actor="bob"),
            out=out,
        )
        assert code == 0 and "decision 1" in out.getvalue()
        dec = json.loads(job.recv(5))
        assert (dec["lrs"], dec["actor"], dec["reason"]) == ([0.03], "bob", "manual")
        out = io.StringIO()
        assert ops.run(_args(command="show", url=td.url, job="cli-job"), out=out) == 0
        assert "recent decisions" in out.getvalue() and "bob" in out.getvalue()
        assert re.search(r"^checkpoints +0, 5$", out.getvalue(), re.M), out.getvalue()
        # the test config's policy has no anneal block
        assert re.search(r"^planned steps +1000 \(the policy has no anneal\)$", out.getvalue(), re.M)
        err = io.StringIO()
        assert ops.run(_args(command="pause", url=td.url, job="nope"), err=err) == 1
        assert "unknown_job" in err.getvalue()
    err = io.StringIO()
    assert ops.run(_args(command="status", url=td.url), err=err) == 2


def test_show_tells_the_planned_length_and_where_the_anneal_begins(tmp_path: Path) -> None:
    from websockets.sync.client import connect

    policy = {"kind": "reduce_on_plateau", "monitor": "val_loss", "anneal": {"fraction": 0.25}}
    config = make_config(tmp_path, defaults={"policy": policy})
    with threaded(config) as td, connect(td.url, compression=None) as job:
        job.send(json.dumps({"type": "hello", "protocol": 1, "job": "planned", "lrs": [0.1],
                             "total_steps": 1000}))  # fmt: skip
        json.loads(job.recv(5))
        out = io.StringIO()
        assert ops.run(_args(command="show", url=td.url, job="planned"), out=out) == 0
        assert re.search(r"^planned steps +1000, annealed from step 750$", out.getvalue(), re.M)
        out = io.StringIO()
        assert ops.run(_args(command="show", url=td.url, job="planned", json=True), out=out) == 0
        shown = json.loads(out.getvalue())["job"]
        assert (shown["total_steps"], shown["anneal_from_step"]) == (1000, 750)
