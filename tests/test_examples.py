"""The scripts in examples/ against a real daemon process: each shows the decision it promises.

One daemon (``python -m monitor serve --port 0``, built-in defaults, a temporary state
directory) serves every test; each test runs one example as a subprocess with ``--url``,
checks its exit status, the decisions it printed and the daemon's own record of the job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._serve import source_env, start_daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
_DECISION = re.compile(
    r">>> decision (?P<id>\d+) at step (?P<step>\d+): (?P<kind>\w+) by (?P<source>\w+), "
    r"LR now (?P<lr>\S+)"
)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = source_env(KERAS_BACKEND="torch", PYTHONUNBUFFERED="1")
    env.pop("LRPILOT_RUN_ID", None)  # each example picks a fresh run id
    return env


class _Daemon:
    """A ``python -m monitor serve`` subprocess on an ephemeral port of 127.0.0.1."""

    def __init__(self, state_dir: Path) -> None:
        # cwd is the state dir: no ./config.yaml there, so the built-in defaults apply
        self.proc, base = start_daemon(
            ["--port", "0", "--state", str(state_dir)],
            log_path=state_dir / "daemon.log",
            cwd=state_dir,
            env=_env(),
        )
        self.host_port = base.removeprefix("ws://")

    @property
    def url(self) -> str:
        return f"ws://{self.host_port}/ws"

    def job(self, name: str) -> dict[str, Any]:
        """The daemon's view of a job (GET /api/jobs/NAME)."""
        with urllib.request.urlopen(f"http://{self.host_port}/api/jobs/{name}", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
        return dict(data["job"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Daemon]:
    d = _Daemon(tmp_path_factory.mktemp("examples-daemon"))
    try:
        yield d
    finally:
        d.close()


def _run(daemon: _Daemon, script: str, job: str, *args: str) -> str:
    """Run ``examples/SCRIPT --url ... --job JOB``; its output, after asserting exit status 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--url", daemon.url, "--job", job, *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _decisions(output: str) -> list[dict[str, str]]:
    return [m.groupdict() for m in _DECISION.finditer(output)]


def test_nan_rollback(daemon: _Daemon) -> None:
    """A non-finite loss is answered by a rollback to step 0 with LR 8 → 0.8; training recovers."""
    out = _run(daemon, "nan_rollback.py", "t-nan-rollback")
    first_bad = re.search(r"step (\d+): loss is (nan|inf|-inf) \(reported", out)
    assert first_bad, out
    rollbacks = [d for d in _decisions(out) if d["kind"] == "rollback"]
    assert rollbacks, out
    rollback = rollbacks[0]
    assert rollback["source"] == "non_finite"
    assert int(rollback["step"]) > int(first_bad.group(1))
    assert float(rollback["lr"]) == pytest.approx(0.8)
    assert "reloaded the checkpoint of step 0; skipping 5 batches" in out
    summary = re.search(r"final val_loss (\S+), val accuracy ([\d.]+)%", out)
    assert summary, out
    assert float(summary.group(1)) < 0.3  # finite and far below the untrained 2.3
    assert float(summary.group(2)) >= 90.0
    job = daemon.job("t-nan-rollback")
    assert job["state"] == "finished"
    assert job["decision_counts"].get("rollback:non_finite") == 1
    assert job["lrs"] == [pytest.approx(0.8)]


def test_plateau_cut(daemon: _Daemon) -> None:
    """val_loss stops improving: reduce_on_plateau halves the LR, and the optimizer uses it."""
    out = _run(daemon, "plateau_cut.py", "t-plateau-cut")
    cuts = [d for d in _decisions(out) if d["source"] == "reduce_on_plateau"]
    assert cuts, out
    assert cuts[0]["kind"] == "set_lr"
    assert float(cuts[0]["lr"]) == pytest.approx(0.05)
    assert "has not improved for more than 2 evaluations" in out
    # each epoch line: "lr FIRST" or "lr FIRST → LAST" (the LR at its first and last step)
    epochs = [
        (float(a), float(b or a)) for a, b in re.findall(r"epoch +\d+  lr (\S+)(?: → (\S+))?", out)
    ]
    assert epochs[0] == (0.1, 0.1)
    assert epochs[-1][1] <= 0.05, out  # the optimizer really ran with the cut LR
    job = daemon.job("t-plateau-cut")
    assert job["decision_counts"].get("set_lr:reduce_on_plateau", 0) >= 1
    assert job["lrs"][0] <= 0.05


def test_cyclic_keras(daemon: _Daemon) -> None:
    """Keras fit under a cyclic schedule: the LR climbs for two epochs and falls for two, twice."""
    out = _run(daemon, "cyclic_keras.py", "t-cyclic-keras", "--epochs", "8")
    decisions = _decisions(out)
    assert decisions and decisions[0]["kind"] == "schedule" and decisions[0]["source"] == "cyclic"
    assert decisions[0]["step"] == "0"  # the script waits for the welcome that carries it
    epochs = re.findall(r"epoch +\d+  lr (\S+) → (\S+)  (\w+)", out)
    trends = [trend for _, _, trend in epochs]
    assert trends == ["rising", "rising", "falling", "falling"] * 2, out
    lrs = [float(x) for first, last, _ in epochs for x in (first, last)]
    assert max(lrs) == pytest.approx(0.05, rel=0.02)  # max_lr at the top of each cycle
    assert min(lrs) == pytest.approx(0.005, rel=0.15)  # base_lr at the bottom
    job = daemon.job("t-cyclic-keras")
    assert job["policy"] == "cyclic"
    assert job["state"] == "finished"


def test_warmup_then_plateau(daemon: _Daemon) -> None:
    """The LR rises 0.01 → 0.1 over the three warmup epochs; later a plateau halves it."""
    out = _run(daemon, "warmup_plateau.py", "t-warmup-plateau")
    decisions = _decisions(out)
    assert decisions[0]["kind"] == "schedule" and decisions[0]["source"] == "warmup"
    assert decisions[0]["step"] == "0" and float(decisions[0]["lr"]) == pytest.approx(0.01)
    epochs = re.findall(r"epoch +(\d+)  (warmup|plateau policy) +lr (\S+) → (\S+)", out)
    warmup = [(float(a), float(b)) for _, phase, a, b in epochs if phase == "warmup"]
    assert len(warmup) == 3, out
    assert warmup[0][0] == pytest.approx(0.01)
    assert all(a < b for a, b in warmup)  # rising within each epoch
    assert all(warmup[i][1] < warmup[i + 1][0] for i in range(2))  # and from epoch to epoch
    assert float(epochs[3][2]) == pytest.approx(0.1)  # the peak, after the warmup
    cuts = [d for d in decisions if d["source"] == "reduce_on_plateau"]
    assert cuts, out
    warmup_steps = re.search(r"warmup over (\d+) steps", out)
    assert warmup_steps, out
    assert int(cuts[0]["step"]) > int(warmup_steps.group(1))
    assert float(cuts[0]["lr"]) == pytest.approx(0.05)
    job = daemon.job("t-warmup-plateau")
    assert job["decision_counts"].get("set_lr:reduce_on_plateau", 0) >= 1
