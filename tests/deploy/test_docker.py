"""The daemon's image, built and run with a real Docker engine.

Builds the repository's Dockerfile under a unique tag, runs it with ``--network host`` on a
free port, waits for Docker to call it healthy, streams a job into it with the real
``lrpilot.Client``, reads the job's series from /metrics, stops it with ``docker stop``
(SIGTERM) and expects exit status 0 within seconds; a second container on the same state
volume restores the job from the journal the first one flushed. Skipped when no Docker
engine answers. Every container, volume and image it makes is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lrpilot import Client

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 900.0
JOB = "docker-e2e"
JOB_TOKEN = "docker-e2e-job-token"
STEPS = 200

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _docker_env() -> dict[str, str] | None:
    """The environment for `docker` (DOCKER_HOST and all), or None when no engine answers."""
    if shutil.which("docker") is None:
        return None
    env = dict(os.environ)
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20, env=env)
    except subprocess.TimeoutExpired:
        return None
    return env if probe.returncode == 0 else None


class Docker:
    """`docker` commands against one engine."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def inspect(self, container: str, template: str) -> str:
        return self.run("inspect", "-f", template, container).stdout.strip()


@pytest.fixture(scope="module")
def docker() -> Docker:
    env = _docker_env()
    if env is None:
        pytest.skip("no Docker engine reachable (`docker` missing or `docker info` failed)")
    return Docker(env)


@pytest.fixture(scope="module")
def image(docker: Docker) -> Iterator[str]:
    tag = f"lrpilot-test:{uuid.uuid4().hex[:12]}"
    before = _dangling_images(docker)
    try:
        docker.run("build", "--network", "host", "-t", tag, str(ROOT), timeout=BUILD_TIMEOUT)
        yield tag
    finally:
        docker.run("rmi", "-f", tag, check=False)
        # the classic builder leaves the untagged image of the `wheels` stage behind
        for leftover in _dangling_images(docker) - before:
            docker.run("rmi", leftover, check=False)


def _dangling_images(docker: Docker) -> set[str]:
    listed = docker.run("image", "ls", "--quiet", "--no-trunc", "--filter", "dangling=true")
    return set(listed.stdout.split())


@pytest.fixture()
def volume(docker: Docker) -> Iterator[str]:
    name = f"lrpilot-test-{uuid.uuid4().hex[:12]}"
    docker.run("volume", "create", name)
    try:
        yield name
    finally:
        docker.run("volume", "rm", "-f", name, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class Container:
    """One daemon container on the host network; removed (with its anonymous volumes) on exit."""

    def __init__(self, docker: Docker, image: str, port: int, volume: str, *env: str) -> None:
        self.docker = docker
        self.name = f"lrpilot-test-{uuid.uuid4().hex[:12]}"
        self.port = port
        settings = [f"LRPILOT_SERVER__PORT={port}", "LRPILOT_STORAGE__FLUSH_INTERVAL_SECONDS=0.01", *env]
        docker.run(
            "run", "-d", "--name", self.name, "--network", "host",
            "--health-interval", "1s", "--health-retries", "30",
            "-v", f"{volume}:/var/lib/lrpilot",
            *[arg for setting in settings for arg in ("-e", setting)],
            image,
        )  # fmt: skip

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.docker.run("rm", "-f", "-v", self.name, check=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = self.docker.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.docker.inspect(self.name, "{{.State.Status}} {{.State.Health.Status}}")
            if status == "running healthy":
                return
            if not status.startswith("running"):
                break
            time.sleep(0.5)
        raise AssertionError(f"container not healthy ({status}); logs:\n{self.logs()}")


def _wait_for_series(url: str, pattern: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        status, body = _get(url)
        if status == 200 and re.search(pattern, body, re.MULTILINE):
            return body
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} never appeared at {url}:\n{body[-3000:]}")


def test_image_runs_healthy_streams_exports_and_stops_cleanly_on_sigterm(
    docker: Docker, image: str, volume: str
) -> None:
    """Healthy under Docker's own check, a real client's job on /metrics, `docker stop` exits 0 fast."""
    config = json.loads(docker.run("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"].split(":")[0] not in ("", "root", "0")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    port = _free_port()
    # tokens from the environment, as in deploy/docker-compose.yml
    with Container(docker, image, port, volume, f"LRPILOT_JOB_TOKEN={JOB_TOKEN}") as container:
        container.wait_healthy()
        assert _get(f"{container.http}/healthz") == (200, "ok\n")
        assert _get(f"{container.http}/api/jobs")[0] == 401  # auth is on
        # exec form: the daemon itself is PID 1 and receives docker stop's SIGTERM
        cmdline = docker.run("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert "serve" in cmdline and any(part.endswith("lrpilot") for part in cmdline), cmdline

        with Client(f"ws://127.0.0.1:{port}/ws", JOB, 0.1, run_id="r1", token=JOB_TOKEN) as client:
            assert client.wait_connected(15), container.logs()
            for step in range(STEPS):
                client.report(step, loss=1.0 / (step + 1), val_loss=1.0)
            assert client.flush(10)
        body = _wait_for_series(
            f"{container.http}/metrics", rf'^lrpilot_job_step{{training_job="{JOB}"}} {STEPS - 1}(\.0)?$'
        )
        lr_line = re.search(rf'^lrpilot_job_learning_rate{{training_job="{JOB}",param_group="0"}} (\S+)$', body, re.M)
        assert lr_line is not None
        lr = float(lr_line.group(1))
        assert lr < 0.1  # the flat val_loss made the default plateau policy cut it
        assert re.search(rf'^lrpilot_job_metric_value{{training_job="{JOB}",metric="val_loss"}} 1(\.0)?$', body, re.M)
        assert re.search(rf'^lrpilot_job_decisions_total{{training_job="{JOB}",', body, re.M)

        started = time.monotonic()
        docker.run("stop", "--time", "10", container.name, timeout=30)
        elapsed = time.monotonic() - started
        state = docker.inspect(container.name, "{{.State.ExitCode}} {{.State.OOMKilled}}")
        assert state == "0 false", container.logs()
        assert elapsed < 6.0, f"docker stop took {elapsed:.1f} s: SIGTERM was not handled"
        assert "shutting down" in container.logs()

    # the journal flushed on SIGTERM is on the volume: a new container (the image's default
    # config, no token: loopback peers only) restores the job
    with Container(docker, image, _free_port(), volume) as second:
        second.wait_healthy()
        status, body = _get(f"{second.http}/api/jobs/{JOB}")
        assert status == 200, second.logs()
        job: dict[str, Any] = json.loads(body)["job"]
        assert (job["job"], job["step"]) == (JOB, STEPS - 1)
        assert job["lrs"] == [lr]
        assert "restored 1 job(s)" in second.logs()
