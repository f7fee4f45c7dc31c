"""Start and stop a real lrpilot daemon subprocess for the benchmark."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"listening on (wss?)://(\S+):(\d+)")


class Daemon:
    """``python -m monitor serve --port 0`` with the repository's config.yaml, in a temp state dir."""

    def __init__(self, config: Path | None = ROOT / "config.yaml", timeout: float = 30.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="lrpilot-quality-")
        cmd = [sys.executable, "-m", "monitor", "serve", "--port", "0", "--state", self._tmp.name]
        if config is not None:
            cmd += ["--config", str(config)]
        self.log_path = Path(self._tmp.name) / "daemon.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ)
        paths = [str(ROOT / "clients"), str(ROOT), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1
        )
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            match = _LISTENING.search(line)
            if match:
                self.url = f"ws://{match.group(2)}:{match.group(3)}/ws"
                break
        if not self.url:
            self._log.flush()
            log = self.log_path.read_text()[-2000:]
            self.close()
            raise RuntimeError(f"the daemon did not start; its log ends with: {log}")

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
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
