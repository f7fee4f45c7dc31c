"""The daemon's TensorBoard output and watch mode, wired into a running daemon."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from ._daemon import Client, make_config, running


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_streamed_job_gets_tensorboard_output_with_lr_and_reasons(tmp_path: Path) -> None:
    """With tensorboard.enabled, the LR the daemon commands and its decisions land in event files."""
    tb_dir = tmp_path / "tb"

    async def main() -> None:
        config = make_config(tmp_path, tensorboard={"enabled": True, "log_dir": str(tb_dir)})
        async with running(config, tick_seconds=0.05) as d:
            c = await Client.open(d.url)
            await c.hello("tb-job", lrs=[0.1])
            await c.metrics([0, 1, 2], val_loss=[1.0, 1.0, 1.0])
            decision = await c.recv()
            assert decision["type"] == "decision"
            await c.send({"type": "finished", "step": 2})
            await asyncio.sleep(0.2)
            await c.close()

    asyncio.run(main())
    acc = event_accumulator.EventAccumulator(str(tb_dir / "tb-job"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "lrpilot/lr/group0" in tags["scalars"]
    assert any(tag.startswith("lrpilot/decisions/") for tag in tags["scalars"])
    lr_values = [e.value for e in acc.Scalars("lrpilot/lr/group0")]
    assert lr_values[-1] == pytest.approx(0.025)  # both plateau cuts of the batch show up
    texts = [t for t in tags["tensors"] if "decisions" in t]
    assert texts, "the reasons are written as text"
    reason = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
    assert "val_loss" in reason


def test_watched_run_is_followed_decided_and_exported(tmp_path: Path) -> None:
    """A run that only writes JSONL under a watched directory gets decisions beside it and shows on /metrics."""
    root = tmp_path / "runs"
    run = root / "exp1"
    run.mkdir(parents=True)
    (run / "lrpilot.json").write_text(json.dumps({"initial_lr": [0.1]}))
    metrics = run / "metrics.jsonl"

    async def main() -> None:
        config = make_config(tmp_path, watch={"dirs": [str(root)], "poll_seconds": 0.1})
        async with running(config) as d:
            with metrics.open("a") as handle:
                for step in range(5):
                    handle.write(json.dumps({"step": step, "loss": 1.0, "val_loss": 1.0}) + "\n")
            decisions = run / "lrpilot-decisions.jsonl"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not decisions.exists():
                await asyncio.sleep(0.1)
            assert decisions.exists(), "the watcher wrote no decision"
            first = json.loads(decisions.read_text().splitlines()[0])
            assert first["kind"] == "set_lr" and first["lrs"] == [0.05]
            text = await asyncio.get_running_loop().run_in_executor(None, _scrape, d.port)
            assert 'lrpilot_job_learning_rate{training_job="exp1",param_group="0"}' in text

    asyncio.run(main())
