"""``lrpilot demo``: a real daemon steering a real training run, end to end, in plain mode."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.demo import sparkline

ROOT = Path(__file__).resolve().parent.parent

ROLLBACK = re.compile(
    r"^decision #(?P<id>\d+) at step (?P<step>\d+): rollback \((?P<source>overshoot|non_finite)\): "
    r"loss (overshoots|is NaN|is \+Inf|is -Inf) at step \d+(:.*)?; "
    r"(the LR is too high; )?rolling back to the checkpoint at step 0, skipping 0 batches, LR 8 → 0\.8$"
)
PLATEAU_CUT = re.compile(
    r"^decision #(?P<id>\d+) at step (?P<step>\d+): set_lr \(reduce_on_plateau\): "
    r"val_loss has not improved for more than 2 evaluations \(best [0-9.e-]+\): "
    r"LR (?P<before>[0-9.e-]+) → (?P<after>[0-9.e-]+)$"
)
FINAL = re.compile(r"^  final +val_loss (?P<loss>[0-9.]+), val accuracy (?P<acc>[0-9.]+)%")


def _demo(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m monitor demo --plain ARGS`` with its temporary files under ``tmp_path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "clients")])
    env["TMPDIR"] = str(tmp_path)  # the demo's mkdtemp lands here
    return subprocess.run(
        [sys.executable, "-m", "monitor", "demo", "--plain", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=timeout,
    )  # fmt: skip


def _field(lines: list[str], label: str) -> str:
    """The text of the first ``  label  text`` row."""
    for line in lines:
        if line.startswith(f"  {label} "):
            return line[len(label) + 2 :].strip()
    raise AssertionError(f"no {label!r} row in the output")


@pytest.mark.slow
def test_demo_rolls_back_a_nan_loss_then_cuts_the_lr_on_a_plateau(tmp_path: Path) -> None:
    """The demo's loss blows up (overshoot, or a NaN), the daemon rolls it back to its checkpoint with LR × 0.1,
    training recovers, a later val_loss plateau halves the LR, and the summary says where to
    look next; the run exits 0 without waiting for input and leaves TensorBoard files."""
    result = _demo(tmp_path)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = out.splitlines()

    rollbacks = [(i, m) for i, line in enumerate(lines) if (m := ROLLBACK.match(line))]
    cuts = [(i, m) for i, line in enumerate(lines) if (m := PLATEAU_CUT.match(line))]
    assert rollbacks, out
    assert cuts, out
    first_rollback, rollback = rollbacks[0]
    first_cut, cut = cuts[0]
    assert first_rollback < first_cut
    assert int(rollback["id"]) == 1  # nothing else acted before the NaN
    assert int(rollback["step"]) < int(cut["step"])
    assert float(cut["after"]) == pytest.approx(float(cut["before"]) * 0.5)
    if rollback["source"] == "non_finite":  # the NaN is announced before the daemon's answer
        assert any(
            re.match(r"^step \d+: loss is (NaN|\+Inf|-Inf);", line) for line in lines[:first_rollback]
        )
    # after the rollback the job trains at the daemon's LR: later epochs show it and learn
    epochs = [line for line in lines[first_rollback:first_cut] if line.startswith("epoch ")]
    assert epochs and all(" lr 0.8 " in line + " " for line in epochs), out

    assert "summary" in lines and "where to look next" in lines
    decisions = _field(lines, "decisions")
    assert re.match(
        r"\d+ applied: 1 rollback \((overshoot|non_finite)\), \d+ set_lr \(reduce_on_plateau\)", decisions
    )
    n_applied = int(decisions.split()[0])
    assert f"; {n_applied} journaled by the daemon" in decisions  # the daemon's API agrees
    final = next(m for line in lines if (m := FINAL.match(line)))
    assert math.isfinite(float(final["loss"]))
    assert float(final["acc"]) >= 90.0  # the rollback really restored a trainable model

    metrics = _field(lines, "metrics")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", metrics)
    port = metrics.split(":")[2].split("/")[0]
    assert _field(lines, "jobs") == f"lrpilot jobs --url ws://127.0.0.1:{port}/ws"
    assert _field(lines, "one job") == f"lrpilot show demo-digits --url ws://127.0.0.1:{port}/ws"
    logdir = Path(_field(lines, "tensorboard").removeprefix("tensorboard --logdir "))
    assert logdir.is_relative_to(tmp_path)
    assert list((logdir / "demo-digits").glob("events.out.tfevents.*"))  # the daemon's output
    assert list((logdir / "demo-digits" / "training").glob("events.out.tfevents.*"))  # the job's


@pytest.mark.slow
def test_demo_reports_a_taken_port_and_exits_1(tmp_path: Path) -> None:
    """With --port on a port already listening, the demo says it cannot start the daemon and
    removes the files it had made."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _demo(tmp_path, "--port", str(port), "--steps", "5")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(
        rf"^lrpilot demo: cannot start the daemon on 127\.0\.0\.1:{port}: ", result.stderr, re.M
    )
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("lrpilot-demo-*"))  # nothing ran: no files left behind


def test_sparkline_spans_the_run_and_marks_non_finite_stretches() -> None:
    """The loss row has one cell per stretch of steps, fills from the left, × for NaN/Inf."""
    losses = [2.0, math.nan, *[1.0 / (i + 1) for i in range(98)]]
    row = sparkline(losses, total=200, width=20)
    assert len(row) == 10  # 100 of 200 steps done: half the row
    assert row[0] == "×"
    assert row[1] == "█" and row[-1] == "▁"  # log scale: high first, low last
    assert sparkline([], total=10, width=5) == ""
