"""Integration tests: a real daemon on 127.0.0.1 port 0 and real websocket clients."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ._daemon import PLATEAU, Client, make_config, running


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def test_hello_gets_a_welcome_with_the_effective_policy(tmp_path: Path) -> None:
    """A hello is answered with a welcome naming the job, its LRs and its effective policy."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            w = await c.hello("mnist-a", lrs=[0.1, 0.01])
            assert w["type"] == "welcome" and w["job"] == "mnist-a"
            assert w["lrs"] == [0.1, 0.01]
            assert w["policy"]["kind"] == "reduce_on_plateau" and w["policy"]["patience"] == 0
            assert w["decisions"] == [] and w["session"]
            await c.close()

    run(main())


def test_a_step_driven_policy_sends_its_schedule_in_the_welcome(tmp_path: Path) -> None:
    """A job asking for a cosine_restarts policy gets its schedule decision in the welcome."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            w = await c.hello("cos", policy={"kind": "cosine_restarts", "T_0": 10})
            assert w["schedule"]["kind"] == "cosine_restarts"
            (dec,) = w["decisions"]
            assert dec["kind"] == "schedule" and dec["id"] == 1
            await c.close()

    run(main())


def test_plateau_decisions_are_pushed_to_the_job(tmp_path: Path) -> None:
    """A non-improving val_loss under patience 0 makes the daemon push halving set_lr decisions."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("p")
            await c.metrics([1, 2, 3], val_loss=[1.0, 1.0, 1.0])
            d1, d2 = await c.recv(), await c.recv()
            assert (d1["type"], d1["id"], d1["lrs"]) == ("decision", 1, [0.05])
            assert (d2["id"], d2["lrs"]) == (2, [0.025])
            assert d1["apply_at_step"] > 2 - 1
            assert await c.nothing()
            await c.close()
            assert d.stats.decisions_sent == 2
            assert d.stats.decision_latency.count == 1
            assert d.stats.points == 3

    run(main())


def test_messages_before_hello_are_refused_and_the_connection_continues(tmp_path: Path) -> None:
    """Metrics before hello get error not_hello; a hello afterwards still works."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.metrics([1], loss=[0.5])
            err = await c.recv()
            assert (err["type"], err["code"], err["ref"]) == ("error", "not_hello", "metrics")
            assert (await c.hello("x"))["type"] == "welcome"
            assert d.stats.frames_rejected == {"not_hello": 1}
            await c.close()

    run(main())


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('{"type": "bogus"}', "unknown_type"),
        ('{"no_type": 1}', "bad_message"),
        ('{"type": "metrics", "steps": [1], "values": {"loss": [1, 2]}}', "bad_message"),
        ('{"type": "hello", "protocol": 2, "job": "j", "lrs": [0.1]}', "protocol_version"),
        ('{"type": "welcome", "protocol": 1, "session": "s", "job": "j", "lrs": [1]}', "bad_message"),
    ],
)
def test_bad_frames_get_an_error_code_and_are_counted(tmp_path: Path, frame: str, code: str) -> None:
    """Each kind of bad frame gets its stable error code, is counted, and the connection lives on."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("j")
            await c.send(frame)
            err = await c.recv()
            assert err["type"] == "error" and err["code"] == code, err
            assert d.stats.frames_rejected.get(code) == 1
            await c.send({"type": "heartbeat", "step": 1})
            await c.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await c.recv())["type"] == "decision"
            await c.close()

    run(main())


def test_a_second_hello_on_one_connection_is_refused(tmp_path: Path) -> None:
    """A connection is one rank of one job: another hello gets bad_message."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("a")
            err = await c.hello("b")
            assert err["code"] == "bad_message" and "already" in err["message"]
            await c.close()

    run(main())


def test_multi_rank_decisions_reach_every_rank_with_the_same_apply_at_step(tmp_path: Path) -> None:
    """A decision of a 3-rank job goes to all three connections, applying at the same step."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            ranks = [await Client.open(d.url) for _ in range(3)]
            for r, c in enumerate(ranks):
                await c.hello("ddp", rank=r, world_size=3)
            await ranks[1].metrics([10, 11, 12], loss=[1.0, 1.0, 1.0])
            await ranks[2].metrics([10, 11, 12, 13, 14], loss=[1.0] * 5)
            await ranks[0].metrics([10, 11], val_loss=[1.0, 1.0])
            got = [await c.recv() for c in ranks]
            assert {g["id"] for g in got} == {1}
            steps = {g["apply_at_step"] for g in got}
            assert len(steps) == 1 and steps.pop() > 14
            for c in ranks:
                await c.close()

    run(main())


def test_reconnect_with_resume_gets_missed_decisions_exactly_once(tmp_path: Path) -> None:
    """A rank that was away gets the decisions it missed in its welcome, and never again."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            r0, r1 = await Client.open(d.url), await Client.open(d.url)
            await r0.hello("ddp", rank=0, world_size=2)
            await r1.hello("ddp", rank=1, world_size=2)
            await r0.metrics([1, 2], val_loss=[1.0, 1.0])
            first0, first1 = await r0.recv(), await r1.recv()
            assert first0["id"] == first1["id"] == 1
            await r1.close()
            await asyncio.sleep(0.05)
            await r0.metrics([3, 4], val_loss=[1.0, 1.0])
            assert [(await r0.recv())["id"], (await r0.recv())["id"]] == [2, 3]
            back = await Client.open(d.url)
            w = await back.hello(
                "ddp", rank=1, world_size=2, resume={"last_decision_id": 1, "last_step": 2}
            )
            assert [x["id"] for x in w["decisions"]] == [2, 3]
            await r0.metrics([5], val_loss=[1.0])
            assert (await back.recv())["id"] == 4
            assert (await r0.recv())["id"] == 4
            assert await back.nothing()
            await r0.close()
            await back.close()

    run(main())


def test_reconnect_without_resume_gets_all_decisions_of_the_run(tmp_path: Path) -> None:
    """A hello with no resume block for a known job gets every decision of the run."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("j")
            await c.metrics([1, 2, 3], val_loss=[1.0, 1.0, 1.0])
            await c.recv(), await c.recv()
            await c.close()
            again = await Client.open(d.url)
            w = await again.hello("j")
            assert [x["id"] for x in w["decisions"]] == [1, 2]
            assert w["lrs"] == [0.025]
            await again.close()

    run(main())


def test_a_new_run_id_starts_a_fresh_engine(tmp_path: Path) -> None:
    """The same job name with another run id is a new run: fresh LR, no old decisions."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("j")
            await c.metrics([1, 2], val_loss=[1.0, 1.0])
            await c.recv()
            await c.send({"type": "finished", "step": 2})
            await c.close()
            c2 = await Client.open(d.url)
            w = await c2.hello("j", run_id="r2", lrs=[0.3])
            assert w["lrs"] == [0.3] and w["decisions"] == []
            await c2.metrics([1, 2], val_loss=[1.0, 1.0])
            assert (await c2.recv())["id"] == 1
            await c2.close()

    run(main())


def test_many_jobs_each_get_their_own_decisions(tmp_path: Path) -> None:
    """Fifty concurrent jobs each receive exactly their own decision."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            clients = [await Client.open(d.url) for _ in range(50)]
            for i, c in enumerate(clients):
                await c.hello(f"job-{i}", lrs=[0.1 * (i + 1)])
            await asyncio.gather(*(c.metrics([1, 2], val_loss=[1.0, 1.0]) for c in clients))
            got = await asyncio.gather(*(c.recv() for c in clients))
            for i, g in enumerate(got):
                assert g["id"] == 1 and g["lrs"] == [pytest.approx(0.05 * (i + 1))]
            assert all(await asyncio.gather(*(c.nothing(0.1) for c in clients)))
            for c in clients:
                await c.close()
            assert len(d.registry.jobs) == 50  # type: ignore[union-attr]

    run(main())


def test_nan_loss_halts_the_job(tmp_path: Path) -> None:
    """A NaN loss (sent as the string "NaN") with no checkpoint makes a halt decision."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            await c.hello("nan")
            await c.metrics([1, 2], loss=[0.5, "NaN"])
            dec = await c.recv()
            assert dec["kind"] == "halt" and dec["source"] == "non_finite"
            assert d.registry.jobs["nan"].state.value == "halted"  # type: ignore[union-attr]
            await c.close()

    run(main())


def test_operator_set_lr_is_pushed_to_the_job_with_its_actor(tmp_path: Path) -> None:
    """An operator's set_lr command reaches the job as a decision naming the actor."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            job = await Client.open(d.url)
            await job.hello("j", lrs=[0.1])
            await job.metrics([5], loss=[1.0])
            op = await Client.open(d.url)
            await op.send({"type": "command", "command": "set_lr", "job": "j", "lrs": [0.02],
                           "reason": "too hot", "actor": "alice"})
            res = await op.recv()
            assert res["type"] == "result" and res["ok"] and res["data"]["decision"]["id"] == 1
            dec = await job.recv()
            assert (dec["lrs"], dec["actor"], dec["reason"], dec["source"]) == (
                [0.02], "alice", "too hot", "operator"
            )
            await op.send({"type": "command", "command": "show", "job": "nope"})
            assert (await op.recv())["code"] == "unknown_job"
            await op.send({"type": "command", "command": "show", "job": "j"})
            shown = (await op.recv())["data"]["job"]
            assert shown["recent_decisions"][-1]["actor"] == "alice"
            await op.close()
            await job.close()

    run(main())


def test_http_routes(tmp_path: Path) -> None:
    """/healthz, /readyz, /metrics and /api/jobs answer on the websocket port."""

    async def main() -> None:
        async with running(make_config(tmp_path, exporter={"cache_seconds": 0})) as d:
            c = await Client.open(d.url)
            await c.hello("web-job", labels={"team": "x"})
            await c.metrics([1, 2], val_loss=[1.0, 1.0], loss=[0.5, "NaN"])
            await c.recv()
            base = f"http://127.0.0.1:{d.port}"
            health, ready, metrics, jobs, one, missing, nowhere = await asyncio.gather(
                *(
                    asyncio.to_thread(http_get, base + p)
                    for p in ("/healthz", "/readyz", "/metrics", "/api/jobs",
                              "/api/jobs/web-job", "/api/jobs/nope", "/nowhere")
                )
            )
            assert health[0] == 200 and ready[0] == 200
            assert metrics[0] == 200 and metrics[1].startswith("text/plain")
            text = metrics[2].decode()
            assert 'lrpilot_job_learning_rate{training_job="web-job",param_group="0"}' in text
            assert 'lrpilot_job_metric_value{training_job="web-job",metric="loss"} NaN' in text
            assert 'lrpilot_messages_received_total{type="metrics"} 1' in text
            assert jobs[0] == 200 and json.loads(jobs[2])["jobs"][0]["job"] == "web-job"
            assert json.loads(one[2])["job"]["labels"] == {"team": "x"}
            assert missing[0] == 404 and json.loads(missing[2])["error"] == "unknown_job"
            assert nowhere[0] == 404
            await c.close()

    run(main())


def test_policy_request_errors_are_reported_with_the_field(tmp_path: Path) -> None:
    """An invalid policy in hello is refused with bad_message naming hello.policy."""

    async def main() -> None:
        async with running(make_config(tmp_path)) as d:
            c = await Client.open(d.url)
            err = await c.hello("bad", policy={**PLATEAU, "factor": 3.0})
            assert err["code"] == "bad_message" and "hello.policy" in err["message"]
            assert (await c.hello("good"))["type"] == "welcome"
            await c.close()

    run(main())
