"""The daemon as a real process: kill -9 and restart loses or repeats no decision; SIGTERM is graceful."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests._serve import start_daemon

from ._daemon import config_dict

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


class DaemonProcess:
    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "config.yaml"
        # patience 0 and a huge start LR: every record of a flat val_loss makes a decision
        self.config.write_text(yaml.safe_dump(config_dict(tmp_path)))
        self.state = tmp_path / "state"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> DaemonProcess:
        self.proc, base = start_daemon(
            ["--config", str(self.config), "--port", "0", "--state", str(self.state)],
            log_path=self.config.with_name("daemon.log"),
            timeout=20,
        )
        self.url = base + "/ws"
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


def _hello(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    msg = {"type": "hello", "protocol": 1, "job": "k9", "run_id": "r1", "lrs": [1e6]}
    msg.update(fields)
    ws.send(json.dumps(msg))
    return json.loads(ws.recv(10))


def test_kill_9_and_restart_loses_and_repeats_no_decision(tmp_path: Path) -> None:
    """Decisions received before kill -9 are never sent again; later ones continue the ids and LR."""
    daemon = DaemonProcess(tmp_path).start()
    received: list[dict[str, Any]] = []
    try:
        with connect(daemon.url, compression=None) as ws:
            assert _hello(ws)["type"] == "welcome"
            step = 0
            # stream quickly and kill the daemon mid-stream, right after a decision
            while len(received) < 8:
                step += 1
                ws.send(json.dumps({"type": "metrics", "steps": [step], "values": {"val_loss": [1.0]}}))
                if step > 1:
                    received.append(json.loads(ws.recv(10)))
            for _ in range(20):
                step += 1
                ws.send(json.dumps({"type": "metrics", "steps": [step], "values": {"val_loss": [1.0]}}))
            daemon.kill9()
            try:
                while True:
                    received.append(json.loads(ws.recv(2)))
            except (ConnectionClosed, TimeoutError):
                pass
        ids = [d["id"] for d in received]
        assert ids == list(range(1, len(ids) + 1))
        daemon.start()
        with connect(daemon.url, compression=None) as ws:
            w = _hello(ws, resume={"last_decision_id": ids[-1], "last_step": step})
            assert w["type"] == "welcome"
            # the journal can only hold what was committed before the send: nothing new, or
            # decisions the client never saw — never one it already has
            later = [d["id"] for d in w["decisions"]]
            assert all(i > ids[-1] for i in later)
            last = (w["decisions"] or received)[-1]
            assert w["lrs"] == last["lrs"]
            step += 1
            ws.send(json.dumps({"type": "metrics", "steps": [step], "values": {"val_loss": [1.0]}}))
            nxt = json.loads(ws.recv(10))
            assert nxt["id"] == last["id"] + 1
            assert nxt["lrs"] == [pytest.approx(last["lrs"][0] * 0.5)]
        with connect(daemon.url, compression=None) as ws:
            # a client that lost its last two decisions gets exactly those two
            w = _hello(ws, resume={"last_decision_id": nxt["id"] - 2, "last_step": step})
            assert [d["id"] for d in w["decisions"]] == [nxt["id"] - 1, nxt["id"]]
    finally:
        daemon.stop()


def test_sigterm_closes_connections_with_1001_flushes_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: clients see close code 1001, the process exits 0, and the job's state is kept."""
    daemon = DaemonProcess(tmp_path).start()
    try:
        with connect(daemon.url, compression=None) as ws:
            _hello(ws, job="graceful")
            ws.send(json.dumps({"type": "metrics", "steps": [1, 2, 3], "values": {"loss": [1, 1, 1]}}))
            ws.send(json.dumps({"type": "heartbeat"}))
            time.sleep(0.2)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert daemon.proc.wait(15) == 0
        daemon.start()
        with connect(daemon.url, compression=None) as ws:
            ws.send(json.dumps({"type": "command", "command": "show", "job": "graceful"}))
            shown = json.loads(ws.recv(10))["data"]["job"]
            assert shown["step"] == 3 and shown["last_values"] == {"loss": 1.0}
    finally:
        daemon.stop()
