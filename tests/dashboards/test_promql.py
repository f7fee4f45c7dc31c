"""Every dashboard query returns data from a real Prometheus scraping a real daemon.

Set-up, all on 127.0.0.1: the daemon runs as a subprocess (``python -m monitor serve --port 0``);
two real ``lrpilot.Client`` s stream metrics to it — ``mnist-a`` with a flat val_loss (plateau
reductions), loss spikes and periodic NaNs after a checkpoint (rollbacks), ``mnist-b`` with
one NaN and no checkpoint (halted) — and a raw websocket sends one malformed frame (a rejected
frame). ``/usr/bin/prometheus`` scrapes the daemon every second.

Then every panel query, template variable and annotation of every dashboard is run through
``/api/v1/query`` with Grafana's variables substituted, and each must return at least one
series. ``label_values(metric, label)`` variables are Grafana functions, not PromQL: they are
checked as ``count by (label) (metric)``.

To point the test at another metrics endpoint, replace the ``scrape_target`` fixture: it only
has to yield ``host:port`` serving ``/metrics``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus is not installed"),
]

#: Grafana's interval variables, as Grafana would set them for a 1 s scrape interval
INTERVALS = {
    "__rate_interval": "10s",
    "__interval": "30s",
    "__range": "5m",
    "__interval_ms": "30000",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_line(path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text(errors="replace"))
        if match:
            return match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {path.name}:\n{path.read_text(errors='replace')}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ the scraped daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real daemon process; yields its ws://host:port URL."""
    tmp = tmp_path_factory.mktemp("daemon")
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"state_dir": str(tmp / "state"), "flush_interval_seconds": 0.05},
        "exporter": {"cache_seconds": 0.5},
        "defaults": {
            "policy": {
                "kind": "reduce_on_plateau",
                "monitor": "val_loss",
                "patience": 2,
                "factor": 0.8,
                "min_lr": 1e-7,
            },
            "detectors": {
                "non_finite": {},
                "spike": {"window": 32, "min_samples": 16},
                "plateau": {"monitor": "val_loss", "patience": 3},
            },
        },
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp / "daemon.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients")])}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "serve", "--config", str(tmp / "config.yaml"),
             "--port", "0", "--state", str(tmp / "state")],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env,
        )  # fmt: skip
    try:
        yield wait_for_line(log, r"listening on (ws://127\.0\.0\.1:\d+)", proc, timeout=30)
    finally:
        stop(proc)


class Trainer(threading.Thread):
    """A fake training loop driving a real lrpilot.Client until stopped."""

    def __init__(self, url: str, job: str, nan_every: int | None, checkpoint: bool) -> None:
        super().__init__(name=f"trainer-{job}", daemon=True)
        import lrpilot

        self.client = lrpilot.Client(f"{url}/ws", job=job, initial_lr=[0.1, 0.01])
        self.nan_every = nan_every
        self.checkpoint = checkpoint
        self.stopped = threading.Event()

    def run(self) -> None:
        step = 0
        while not self.stopped.is_set() and not self.client.halted:
            self.client.lrs_for_step(step)
            loss = 1.0 + 0.01 * math.sin(step * 0.7)
            if step % 40 == 39:
                loss = 25.0  # a spike well above 6 sigma
            if self.nan_every and step > 60 and step % self.nan_every == 0:
                loss = math.nan
            metrics: dict[str, Any] = {"loss": loss, "accuracy": 0.5}
            if step % 5 == 4:
                metrics["val_loss"] = 1.0  # never improves: plateaus
            self.client.report(step, **metrics)
            if self.checkpoint and step == 20:
                self.client.checkpoint(step)
            step += 1
            time.sleep(0.02)

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.client.close()


@pytest.fixture(scope="module")
def scrape_target(daemon: str) -> Iterator[str]:
    """host:port serving /metrics, with jobs producing decisions, NaNs, spikes and plateaus."""
    from websockets.sync.client import connect

    trainers = [
        Trainer(daemon, "mnist-a", nan_every=100, checkpoint=True),
        Trainer(daemon, "mnist-b", nan_every=150, checkpoint=False),
    ]
    for t in trainers:
        t.start()
    with connect(f"{daemon}/ws") as ws:  # one rejected frame, for the daemon dashboard
        ws.send("this is not json")
        with contextlib.suppress(Exception):
            ws.recv(2)
    try:
        yield daemon.removeprefix("ws://")
    finally:
        for t in trainers:
            t.close()


# ------------------------------------------------------------------ Prometheus


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query; the error body as a dict when Prometheus refuses the expression."""
        try:
            return dict(self.get("/api/v1/query", query=expr))
        except urllib.error.HTTPError as err:
            return dict(json.loads(err.read()))


@pytest.fixture(scope="module")
def prometheus(
    scrape_target: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A real Prometheus scraping scrape_target every second, with the target up."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "lrpilot", "static_configs": [{"targets": [scrape_target]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        health = ""
        while time.monotonic() < deadline and health != "up":
            time.sleep(0.3)
            assert proc.poll() is None, log.read_text(errors="replace")
            with contextlib.suppress(OSError, ValueError):
                targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
                health = targets[0]["health"] if targets else ""
        assert health == "up", f"target never came up:\n{log.read_text(errors='replace')}"
        yield prom
    finally:
        stop(proc)


# ------------------------------------------------------------------ expressions


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def label_values_as_promql(query: str) -> tuple[str, str]:
    """label_values(selector, label) -> (count by (label) (selector), label)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert match, f"unsupported variable query {query!r}"
    return f"count by ({match.group(2)}) ({match.group(1)})", match.group(2)


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def expressions(dashboard: dict[str, Any], prom: Prometheus) -> list[tuple[str, str]]:
    """(where, PromQL) for every variable, panel target and annotation, variables resolved.

    A variable takes its saved value ("All" becomes its allValue), else the first value its
    query returns, as Grafana does on load.
    """
    values = dict(INTERVALS)
    out = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        promql, label = label_values_as_promql(substitute(variable_query(variable), values))
        out.append((f"variable {variable['name']}", promql))
        current = variable.get("current", {}).get("value")
        if current in ("$__all", ["$__all"]):
            values[variable["name"]] = variable["allValue"]
        elif current:
            values[variable["name"]] = current if isinstance(current, str) else current[0]
        else:
            found = sorted(r["metric"][label] for r in prom.query(promql)["data"]["result"])
            values[variable["name"]] = found[0] if found else "<no value>"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            out.append((where, substitute(target["expr"], values)))
    for annotation in dashboard["annotations"]["list"]:
        out.append(
            (f"annotation {annotation['name']!r}", substitute(annotation["target"]["expr"], values))
        )
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_returns_data(path: Path, prometheus: Prometheus) -> None:
    """Each panel, variable and annotation query of the dashboard returns at least one series."""
    dashboard = json.loads(path.read_text())
    deadline = time.monotonic() + 60
    while True:
        problems = []
        for where, expr in expressions(dashboard, prometheus):
            answer = prometheus.query(expr)
            if answer.get("status") != "success":
                problems.append(f"{where}: {expr}\n    error: {answer.get('error')}")
            elif not answer["data"]["result"]:
                problems.append(f"{where}: {expr}\n    no data")
        # Counters need a few scrapes before increase() and changes() see them move.
        if not problems or time.monotonic() > deadline or any("error:" in p for p in problems):
            break
        time.sleep(1)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_substitution_names_unknown_variables() -> None:
    """A query using a variable the dashboard does not define is reported, not sent as is."""
    with pytest.raises(AssertionError, match=r"\$nope"):
        substitute('up{x="$nope"}', {"a": "b"})
