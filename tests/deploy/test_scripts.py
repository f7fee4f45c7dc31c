"""deploy/healthcheck.py and deploy/example-train.py against a real daemon process, no Docker.

The health check must find the daemon where its config and environment put it, say healthy
only when /healthz answers, and give a reason otherwise; the example job must train, stream
to the daemon, and follow its decisions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests._serve import source_env, start_daemon

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load("lrpilot_deploy_healthcheck", DEPLOY / "healthcheck.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return {k: v for k, v in source_env().items() if not k.startswith("LRPILOT_")}


def _write_config(path: Path, **server: Any) -> Path:
    path.write_text(yaml.safe_dump({"server": server}), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ healthz_url


def test_healthz_url_follows_config_file_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The port comes from the file, LRPILOT_SERVER__PORT overrides it, 0.0.0.0 becomes loopback."""
    for key in [k for k in os.environ if k.startswith("LRPILOT_")]:
        monkeypatch.delenv(key)
    config = _write_config(tmp_path / "config.yaml", host="0.0.0.0", port=9123)
    assert healthcheck.healthz_url(config) == "http://127.0.0.1:9123/healthz"
    monkeypatch.setenv("LRPILOT_SERVER__PORT", "9555")
    assert healthcheck.healthz_url(config) == "http://127.0.0.1:9555/healthz"
    assert healthcheck.healthz_url(None) == "http://127.0.0.1:9555/healthz"


def test_healthz_url_uses_https_with_tls_and_a_specific_bind_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS switches to https; a daemon bound to one address is asked there (IPv6 in brackets)."""
    for key in [k for k in os.environ if k.startswith("LRPILOT_")]:
        monkeypatch.delenv(key)
    tls = _write_config(tmp_path / "tls.yaml", host="::", port=8443, tls_cert="/c.pem", tls_key="/k.pem")
    assert healthcheck.healthz_url(tls) == "https://127.0.0.1:8443/healthz"
    v6 = _write_config(tmp_path / "v6.yaml", host="fd00::5", port=8765)
    assert healthcheck.healthz_url(v6) == "http://[fd00::5]:8765/healthz"


# ------------------------------------------------------------------------------ a real daemon


class DaemonProcess:
    """`python -m monitor serve` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = _free_port()
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "server": {"host": "0.0.0.0", "port": self.port},
                    "storage": {"state_dir": str(tmp_path / "state"), "flush_interval_seconds": 0.01},
                }
            ),
            encoding="utf-8",
        )
        self.proc, _ = start_daemon(
            ["--config", str(self.config)],
            log_path=tmp_path / "daemon.log",
            cwd=tmp_path,
            env=_env(),
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def job(self, name: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/jobs/{name}", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())["job"]
            return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)


@pytest.fixture()
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()


def _run_healthcheck(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), str(config)],
        capture_output=True, text=True, timeout=60, env={**_env(), **env},
    )  # fmt: skip


@pytest.mark.slow
def test_healthcheck_exits_0_while_the_daemon_runs_and_1_with_a_reason_after(daemon: DaemonProcess) -> None:
    """Healthy (0, silent) against the live daemon; unhealthy (1, the URL and why) once it stopped."""
    ok = _run_healthcheck(daemon.config)
    assert (ok.returncode, ok.stderr) == (0, "")
    daemon.stop()
    down = _run_healthcheck(daemon.config)
    assert down.returncode == 1
    assert f"http://127.0.0.1:{daemon.port}/healthz" in down.stderr


@pytest.mark.slow
def test_healthcheck_reports_a_broken_config_as_unhealthy(tmp_path: Path) -> None:
    """An invalid config makes the check fail with the config error, not a traceback."""
    config = _write_config(tmp_path / "bad.yaml", port="not-a-port")
    result = _run_healthcheck(config)
    assert result.returncode == 1
    assert "server.port" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_example_training_job_streams_to_the_daemon_and_follows_it(daemon: DaemonProcess) -> None:
    """deploy/example-train.py trains, reports loss and val_loss, and ends on the daemon's LR."""
    pytest.importorskip("torch")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "example-train.py"), "--steps", "400", "--step-delay", "0",
         "--eval-every", "20", "--job", "deploy-example"],
        capture_output=True, text=True, timeout=240, env={**_env(), "LRPILOT_URL": daemon.url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"done: (\d+) decision\(s\) applied, final lr (\S+)", result.stderr)
    assert done is not None, result.stderr[-3000:]
    job = daemon.job("deploy-example")
    assert job["step"] == 399
    assert job["labels"] == {"example": "regression"}
    assert job["last_values"]["val_loss"] > 0
    assert job["last_values"]["loss"] < 0.5  # it learned: the untrained model's loss is about 1.7
    assert int(done.group(1)) == sum(job["decision_counts"].values())
    assert float(done.group(2)) == pytest.approx(job["lrs"][0], rel=1e-2)
