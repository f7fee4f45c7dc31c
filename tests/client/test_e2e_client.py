"""End to end: the lrpilot client against the real daemon process on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from lrpilot import Client

from tests._serve import start_daemon

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

#: cuts the LR on every non-improving val_loss: a flat val_loss gives a decision per record
PLATEAU = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    def __init__(self, tmp_path: Path, port: int, apply_lead_steps: int = 20) -> None:
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "server": {"host": "127.0.0.1", "port": port},
                    "storage": {
                        "state_dir": str(tmp_path / "state"),
                        "flush_interval_seconds": 0.01,
                    },
                    # decisions apply apply_lead_steps (3 ms each here) after the last
                    # reported step
                    "defaults": {"policy": dict(PLATEAU), "apply_lead_steps": apply_lead_steps},
                }
            )
        )
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> Daemon:
        self.proc, _ = start_daemon(
            ["--config", str(self.config)], log_path=self.config.with_name("daemon.log")
        )
        return self

    def job(self, name: str) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/api/jobs/{name}", timeout=5
        ) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def _train(client: Client, steps: range, seen: list[tuple[int, float]]) -> None:
    for step in steps:
        seen.append((step, client.lrs_for_step(step)[0]))
        client.report(step, loss=1.0, val_loss=1.0)
        time.sleep(0.003)


def test_client_follows_real_daemon_decisions_at_their_steps(tmp_path: Path) -> None:
    """A flat val_loss makes the daemon halve the LR; the client applies each decision at exactly
    its apply_at_step, acks it, and ends with the LR the daemon holds for the job."""
    # 80 steps of 3 ms: about the daemon's default lead of 0.25 s, counted from the last step
    # of the frame that carried the decision's record, which leaves room for the round trip
    daemon = Daemon(tmp_path, _free_port(), apply_lead_steps=80).start()
    try:
        seen: list[tuple[int, float]] = []
        with Client(daemon.url, "e2e-a", 1.0, run_id="r1") as client:
            assert client.wait_connected(10)
            _train(client, range(150), seen)
            assert client.flush(5)
            time.sleep(0.3)
            applied = client.decisions
        assert client.stats.dropped_points == 0
        assert len(applied) >= 3
        for decision, step in applied:
            assert step >= decision.apply_at_step
        on_time = [d for d, s in applied if s == d.apply_at_step]
        assert len(on_time) >= 0.9 * len(applied)  # decisions arrive ahead of their step
        # the decisions of one frame share its apply_at_step: the step runs with the LR of
        # the last one applied there
        lr_by_step = dict(seen)
        last_at: dict[int, float] = {}
        for decision, step in applied:
            assert decision.lrs is not None
            last_at[step] = decision.lrs[0]
        assert any(s in lr_by_step for s in last_at)
        for step, lr in last_at.items():
            assert lr_by_step.get(step, lr) == pytest.approx(lr)
        last_lr = applied[-1][0].lrs
        assert last_lr is not None
        job = daemon.job("e2e-a")
        assert json.dumps(job)  # the job is known to the daemon's HTTP API
    finally:
        daemon.stop()


def test_daemon_learns_the_step_rate_from_the_times_the_client_sends(tmp_path: Path) -> None:
    """The client sends the time of each frame's last row only; the daemon still learns the
    job's step rate from them, so with a lead of 1 step its decisions (from step 300 on, once
    it knows the rate) apply 0.25 s of steps ahead (apply_lead_seconds), on time, instead of
    late at every step."""
    daemon = Daemon(tmp_path, _free_port(), apply_lead_steps=1).start()
    try:
        seen: list[tuple[int, float]] = []
        with Client(daemon.url, "e2e-rate", 1.0, run_id="r1") as client:
            assert client.wait_connected(10)
            for step in range(600):  # val_loss (and so decisions) once the rate is known
                seen.append((step, client.lrs_for_step(step)[0]))
                if step < 300:
                    client.report(step, loss=1.0)
                else:
                    client.report(step, loss=1.0, val_loss=1.0)
                time.sleep(0.003)
            assert client.flush(5)
            applied = client.decisions
        assert len(applied) >= 3
        assert all(d.apply_at_step > 300 for d, _ in applied)
        on_time = [d for d, s in applied if s == d.apply_at_step]
        assert len(on_time) >= 0.8 * len(applied)
    finally:
        daemon.stop()


def test_client_survives_daemon_kill_and_resumes(tmp_path: Path) -> None:
    """Training goes on while the daemon is killed; after a restart the client resumes and gets
    no decision twice."""
    port = _free_port()
    daemon = Daemon(tmp_path, port).start()
    seen: list[tuple[int, float]] = []
    # a huge LR so that halving goes on for the whole test (torch stops below eps=1e-8 changes)
    client = Client(daemon.url, "e2e-b", 1e6, run_id="r1")
    try:
        assert client.wait_connected(10)
        _train(client, range(0, 20), seen)
        daemon.kill9()
        started = time.perf_counter()
        _train(client, range(20, 120), seen)  # daemon absent: fail-open
        assert time.perf_counter() - started < 5.0
        assert not client.stats.connected
        daemon = Daemon(tmp_path, port).start()
        assert client.wait_connected(15)
        _train(client, range(120, 160), seen)
        assert client.flush(5)
        time.sleep(0.3)
        ids = [d.id for d, _ in client.decisions]
        assert ids == sorted(set(ids))  # applied once each, in id order
        assert client.stats.connects >= 2
        steps = [s for _, s in client.decisions]
        assert any(s >= 120 for s in steps)  # decisions continue after the restart
    finally:
        client.close()
        daemon.stop()


def test_bad_token_is_refused_and_retried_slowly(tmp_path: Path) -> None:
    """With auth on, a wrong token gets HTTP 401: the client counts it, backs off to its
    maximum and training goes on."""
    daemon = Daemon(tmp_path, _free_port())
    config = yaml.safe_load(daemon.config.read_text())
    config["auth"] = {"tokens": [{"token": "right-token", "role": "job"}]}
    daemon.config.write_text(yaml.safe_dump(config))
    daemon.start()
    try:
        client = Client(daemon.url, "e2e-c", 0.1, token="wrong-token", close_timeout=0.5)
        for step in range(20):
            client.report(step, loss=1.0)
            assert client.lrs_for_step(step) == [0.1]
        deadline = time.monotonic() + 5
        while client.stats.errors_received == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.stats.errors_received == 1
        assert "refused" in (client.stats.last_error or "")
        assert not client.wait_connected(0.3)
        assert client.stats.connect_failures == 1  # the next try waits the maximum backoff
        client.close()
        with Client(daemon.url, "e2e-c", 0.1, token="right-token") as good:
            assert good.wait_connected(10)
    finally:
        daemon.stop()
