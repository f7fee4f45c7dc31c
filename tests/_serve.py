"""Start ``python -m monitor serve`` as a real subprocess, as an operator would, for tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (wss?://\S+:\d+)")


def source_env(**extra: str) -> dict[str, str]:
    """This environment with the repository's ``monitor`` and ``lrpilot`` importable."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "clients"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


def start_daemon(
    args: Sequence[str],
    *,
    log_path: Path,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], str]:
    """``python -m monitor serve ARGS``; returns the process and its ``ws://HOST:PORT``.

    The daemon's log (stderr) goes to ``log_path``: a pipe nobody reads would block a
    daemon that logs a lot once the pipe is full. Its stdout carries only the listening
    line. If that line does not come within ``timeout`` the process is killed and the
    error shows the end of its log.
    """
    with log_path.open("a") as log:  # a restart appends to the same log
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "serve", *args],
            cwd=cwd, env=env if env is not None else source_env(),
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = _LISTENING.search(line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()
    raise AssertionError(f"the daemon did not start; its log ends with:\n{log_path.read_text()[-2000:]}")
