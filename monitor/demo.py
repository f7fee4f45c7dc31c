"""``lrpilot demo``: a daemon steering a real training run, live, in one command.

What happens, in order:

1. A daemon starts in this process, on a background thread with its own event loop, bound to
   127.0.0.1 (``--port`` or any free port). Its config is written to a fresh temporary
   directory beside its state and TensorBoard output, so every file can be looked at (or the
   daemon restarted on it with ``lrpilot serve --config``) after the demo. The config has one
   job rule: ``reduce_on_plateau`` on ``val_loss``, and a loss that blows up or turns
   non-finite rolls back to the last good checkpoint.
2. A small MLP learns scikit-learn's 8×8 digits with plain SGD on the CPU, through
   ``lrpilot.torch.LRPilot`` like any user's loop: the loss of every step and ``val_loss`` of
   every epoch go to the daemon, an in-memory checkpoint is reported after every good epoch,
   and the daemon's decisions are applied at the step they name.
3. The initial LR is far too high on purpose. SGD at LR 8 without gradient clipping overflows
   this MLP to NaN within about ten steps (checked for seeds 0-9: the first non-finite loss
   comes at steps 7-10), while LR 0.8 trains it to ~98 % validation accuracy. Before that,
   by step 4, the loss is already dozens of times its first value, which the ``overshoot``
   detector calls a blow-up: the daemon's first decision is a rollback to the initial
   checkpoint with LR × 0.1 (had the loss turned NaN first, ``non_finite`` would have asked
   for the same). A few epochs later
   ``val_loss`` stops improving and the plateau policy halves the LR, and again every three
   epochs while it stays flat.

The display is a ``rich`` live view on a terminal, or one plain line per epoch and per
decision (``--plain``, when stdout is not a terminal, or when rich is not installed). The
demo needs torch and scikit-learn: ``pip install 'lrpilot-monitor[demo]'``.

Exit status: 0 when the run completed (or was stopped with Ctrl-C while the daemon was kept
up for a look), 1 when the demo could not run (missing packages, port taken, daemon
unreachable), 130 when Ctrl-C interrupted training.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import yaml
from lrpilot import Decision, DecisionKind, Halted

from .config import Config, ConfigError, load_config
from .server.app import Daemon

if TYPE_CHECKING:
    from lrpilot.torch import LRPilot
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.progress import Progress, TaskID

__all__ = ["main"]

JOB = "demo-digits"
SEED = 0
INITIAL_LR = 8.0  # SGD on this MLP overflows to NaN within ~10 steps (see the module docstring)
# 8 → 0.8, a rate that trains well; non_finite's default factor 0.3 gives 2.4, still too high
ROLLBACK_FACTOR = 0.1
BATCH_SIZE = 32
HIDDEN = 128
VAL_FRACTION = 0.2
DEFAULT_EPOCHS = 20
STEP_PAUSE_SECONDS = 0.022  # training takes ~0.5 ms a step; the pause makes it watchable
CONNECT_TIMEOUT_SECONDS = 15.0
EXIT_INTERRUPTED = 130

#: The one job rule of the demo's daemon:
#: - halve the LR once val_loss has not improved by 1 % for three epochs in a row;
#: - a blown-up loss (``overshoot``) or a NaN/Inf one (``non_finite``) rolls back (the
#:   detectors' default action) with LR × 0.1. The bad losses the job reports until the
#:   rollback reaches it get no second answer for 50 records (the default 10 is short on a
#:   busy machine, where the answer can take over 10 steps);
#: - the oscillation detector is off: once the model fits the training set, the minibatch
#:   loss is near 0 and swings by far more than 20 % from batch to batch, which it would
#:   answer by halving the LR every few epochs; the spike detector's answer to bursts of
#:   such swings is off for the same reason. Here the plateau policy steers.
JOB_RULE: dict[str, Any] = {
    "match": {"name": "demo-*"},
    "policy": {
        "kind": "reduce_on_plateau",
        "monitor": "val_loss",
        "factor": 0.5,
        "patience": 2,
        "threshold": 0.01,
        "min_lr": 0.01,
    },
    "detectors": {
        "non_finite": {
            "response": {"action": "rollback", "factor": ROLLBACK_FACTOR, "cooldown": 50}
        },
        "overshoot": {
            "response": {"action": "rollback", "factor": ROLLBACK_FACTOR, "cooldown": 50}
        },
        "oscillation": False,
        "spike": {"response": {"action": "none"}},
    },
}


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


# --------------------------------------------------------------------------- the daemon


def write_config(workdir: Path, port: int) -> Path:
    """Write the demo daemon's config.yaml under ``workdir``; return its path."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 1.0},
        "storage": {"state_dir": str(workdir / "state"), "flush_interval_seconds": 0.05},
        "exporter": {"enabled": True, "cache_seconds": 0.5},
        "tensorboard": {"enabled": True, "log_dir": str(workdir / "tensorboard")},
        # decisions apply ~0.1 s of steps ahead (default 0.25 s): the rollback lands a few
        # steps after the NaN rather than a dozen
        "defaults": {"apply_lead_seconds": 0.1},
        "jobs": [JOB_RULE],
    }
    path = workdir / "config.yaml"
    header = "# written by `lrpilot demo`; `lrpilot serve --config THIS_FILE` reopens its state\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


class DaemonThread:
    """A :class:`Daemon` on its own event loop in a background thread.

    The training loop stays on the main thread, where Ctrl-C lands; the daemon never sees a
    signal and is stopped by :meth:`stop` (which closes connections and flushes its state).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.daemon: Daemon | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lrpilot-demo-daemon", daemon=True)

    def start(self, timeout: float = 15.0) -> Daemon:
        """Start and wait until the daemon listens; raise :class:`DemoError` if it cannot."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise DemoError(f"the daemon did not start within {timeout:g} s")
        if self.error is not None or self.daemon is None:
            server = self.config.server
            raise DemoError(f"cannot start the daemon on {server.host}:{server.port}: {self.error}")
        return self.daemon

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the daemon and wait for its thread (bounded by ``timeout``)."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just finished
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the main thread by start()
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        daemon = Daemon(self.config, watch_config=False)
        try:
            await daemon.start()
        except BaseException as exc:
            self.error = exc
            with contextlib.suppress(Exception):
                await daemon.stop()
            self._ready.set()
            return
        self.daemon = daemon
        self._ready.set()
        await self._stop.wait()
        await daemon.stop()


def http_base(daemon: Daemon) -> str:
    """``http://host:port`` of the daemon's HTTP routes."""
    host = f"[{daemon.host}]" if ":" in daemon.host else daemon.host
    return f"http://{host}:{daemon.port}"


def journaled_decisions(daemon: Daemon, job: str, last_step: int) -> tuple[int, int] | None:
    """How many decisions the daemon holds for ``job``, and how many of them would apply
    after ``last_step`` (taken on the job's final records: nothing left to apply them to),
    read through its HTTP API."""
    try:
        with urllib.request.urlopen(f"{http_base(daemon)}/api/jobs/{job}", timeout=5) as response:
            body = json.loads(response.read())
        recent = body["job"].get("recent_decisions") or []
        late = sum(1 for d in recent if int(d.get("apply_at_step", 0)) > last_step)
        return int(body["job"]["decisions"]), late
    except Exception:
        return None


# --------------------------------------------------------------------------- the display


@dataclass(slots=True)
class Setup:
    """What the demo tells the user before training starts."""

    url: str
    workdir: Path
    config_path: Path
    tensorboard_dir: Path
    model: str
    data: str
    steps: int
    epochs: int
    initial_lr: float


@dataclass(slots=True)
class EpochResult:
    """One epoch's validation."""

    epoch: int
    step: int
    loss: float
    val_loss: float
    val_acc: float
    lr: float
    checkpoint: bool


@dataclass(slots=True)
class Outcome:
    """The result of the training run, for the summary."""

    steps: int
    seconds: float
    epochs: list[EpochResult]
    decisions: list[tuple[Decision, int]]
    non_finite_steps: int
    halted: str | None = None
    journaled: tuple[int, int] | None = None  # (all, those due after the last step)
    next_steps: list[tuple[str, str]] = field(default_factory=list)


class Reporter(Protocol):
    """Where the demo shows progress: a live view or plain lines."""

    def start(self, setup: Setup) -> None: ...
    def step(self, step: int, epoch: int, loss: float, lr: float) -> None: ...
    def epoch(self, result: EpochResult) -> None: ...
    def decision(self, decision: Decision, step: int) -> None: ...
    def note(self, step: int, text: str) -> None: ...
    def stop(self) -> None: ...
    def summary(self, outcome: Outcome) -> None: ...


def fmt(value: float, digits: int = 4) -> str:
    """A metric for display: NaN and ±Inf spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.{digits}f}"


def fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


def describe_decision(decision: Decision) -> str:
    """``set_lr (reduce_on_plateau)``: the kind and who decided."""
    return f"{decision.kind.value} ({decision.source})"


def setup_lines(setup: Setup) -> list[tuple[str, str]]:
    """What the demo runs, as (label, text) rows, shared by both displays."""
    policy = JOB_RULE["policy"]
    return [
        ("daemon", f"{setup.url}  (in this process; its files are under {setup.workdir})"),
        (
            "policy",
            f"{policy['kind']} on {policy['monitor']}: LR × {policy['factor']} after "
            f"{policy['patience'] + 1} epochs without a {policy['threshold']:.0%} improvement; "
            f"a blown-up or NaN/Inf loss rolls back to the last good checkpoint with LR × {ROLLBACK_FACTOR:g}",
        ),
        ("config", str(setup.config_path)),
        ("tensorboard", str(setup.tensorboard_dir)),
        ("job", f"{JOB}: {setup.model} on {setup.data}"),
        (
            "training",
            f"SGD, LR {fmt_lr(setup.initial_lr)} (too high on purpose), {setup.steps} steps, "
            f"{setup.epochs} epochs",
        ),
    ]


def summary_lines(outcome: Outcome) -> list[tuple[str, str]]:
    """The summary as (label, text) rows, shared by both displays."""
    by_kind: dict[str, int] = {}
    for decision, _ in outcome.decisions:
        key = describe_decision(decision)
        by_kind[key] = by_kind.get(key, 0) + 1
    counted = ", ".join(f"{n} {key}" for key, n in by_kind.items()) or "none"
    decisions = f"{len(outcome.decisions)} applied: {counted}"
    if outcome.journaled is not None:
        total, late = outcome.journaled
        decisions += f"; {total - late} journaled by the daemon"
        if late:
            decisions += f" (and {late} taken on the last records, due after the run's end)"
    rows = [("decisions", decisions)]
    if outcome.non_finite_steps:
        rows.append(("non-finite", f"{outcome.non_finite_steps} steps with a NaN/Inf loss"))
    if outcome.epochs:
        last = outcome.epochs[-1]
        best = min(
            outcome.epochs, key=lambda e: e.val_loss if math.isfinite(e.val_loss) else math.inf
        )
        rows.append(
            (
                "final",
                f"val_loss {fmt(last.val_loss)}, val accuracy {last.val_acc:.1%}, LR {fmt_lr(last.lr)} "
                f"after {outcome.steps} steps in {outcome.seconds:.1f} s "
                f"(best val_loss {fmt(best.val_loss)} at epoch {best.epoch})",
            )
        )
    if outcome.halted is not None:
        rows.append(("halted", outcome.halted))
    return rows


class PlainReporter:
    """One line per epoch, per decision and per note; flushed, so pipes see it at once."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._epochs = 0

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def start(self, setup: Setup) -> None:
        self._epochs = setup.epochs
        self._print("lrpilot demo: a daemon steering a real training run")
        for label, text in setup_lines(setup):
            self._print(f"  {label:<12}{text}")

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        pass

    def epoch(self, result: EpochResult) -> None:
        width = len(str(self._epochs))
        self._print(
            f"epoch {result.epoch:>{width}}/{self._epochs}  step {result.step:>4}  "
            f"loss {fmt(result.loss)}  val_loss {fmt(result.val_loss)}  "
            f"val_acc {result.val_acc:6.1%}  lr {fmt_lr(result.lr)}"
            + ("  [checkpoint]" if result.checkpoint else "")
        )

    def decision(self, decision: Decision, step: int) -> None:
        self._print(
            f"decision #{decision.id} at step {step}: {describe_decision(decision)}: {decision.reason}"
        )

    def note(self, step: int, text: str) -> None:
        self._print(f"step {step}: {text}")

    def stop(self) -> None:
        pass

    def summary(self, outcome: Outcome) -> None:
        self._print("summary")
        for label, text in summary_lines(outcome):
            self._print(f"  {label:<12}{text}")
        self._print("where to look next")
        for label, text in outcome.next_steps:
            self._print(f"  {label:<12}{text}")


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], total: int, width: int) -> str:
    """``values`` (one per step, of ``total`` steps) as a row of ``width`` block characters.

    The row spans the whole run and fills from the left as steps arrive. Each character is
    the mean of its steps on a log scale (loss falls over decades); ``×`` marks a stretch
    with a NaN/Inf value.
    """
    per_cell = max(1, math.ceil(total / width))
    cells: list[float] = []
    for start in range(0, len(values), per_cell):
        chunk = values[start : start + per_cell]
        if all(math.isfinite(v) for v in chunk):
            cells.append(math.log10(max(sum(chunk) / len(chunk), 1e-12)))
        else:
            cells.append(math.nan)
    finite = [c for c in cells if math.isfinite(c)]
    if not finite:
        return "×" * len(cells)
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    top = len(_SPARKS) - 1
    return "".join(
        _SPARKS[min(top, int((c - low) / span * len(_SPARKS)))] if math.isfinite(c) else "×"
        for c in cells
    )


class RichReporter:
    """A live terminal view: progress, current numbers, loss sparkline, epochs and decisions.

    The training thread only updates plain attributes; rich's refresh thread renders them
    (:meth:`_render`) a few times a second, so a fast loop pays nothing for the display.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console: Console = Console()
        self.progress: Progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            expand=True,
        )
        self._task: TaskID | None = None
        self._live: Live | None = None  # made in start(): Live renders at once
        self._setup: Setup | None = None
        self._epoch = 0
        self._loss = math.nan
        self._lr = math.nan
        self._losses: list[float] = []
        self._epochs: list[EpochResult] = []
        self._events: list[tuple[str, str, str]] = []  # (style, when, text)

    def start(self, setup: Setup) -> None:
        self._setup = setup
        self._lr = setup.initial_lr
        self._task = self.progress.add_task("training", total=setup.steps)
        self.console.print("[bold]lrpilot demo[/]: a daemon steering a real training run")
        self._print_rows(setup_lines(setup))
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=8)
        self._live.start()

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self._epoch, self._loss, self._lr = epoch, loss, lr
        self._losses.append(loss)
        if self._task is not None:
            self.progress.update(self._task, completed=step)

    def epoch(self, result: EpochResult) -> None:
        self._epochs.append(result)

    def decision(self, decision: Decision, step: int) -> None:
        style = (
            "bold red"
            if decision.kind in (DecisionKind.ROLLBACK, DecisionKind.HALT)
            else "bold yellow"
        )
        what = f"#{decision.id} {describe_decision(decision)}\n{decision.reason}"
        self._events.append((style, f"step {step}", what))

    def note(self, step: int, text: str) -> None:
        self._events.append(("red", f"step {step}", text))

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        setup = self._setup
        total_epochs = setup.epochs if setup is not None else 0
        loss_style = "bold red" if not math.isfinite(self._loss) else "bold"
        now = Text.assemble(
            ("epoch ", "dim"), (f"{self._epoch}/{total_epochs}", "bold"),
            ("   loss ", "dim"), (fmt(self._loss), loss_style),
            ("   LR ", "dim"), (fmt_lr(self._lr), "bold green"),
        )  # fmt: skip
        if self._epochs:
            last = self._epochs[-1]
            now.append_text(
                Text.assemble(
                    ("   val_loss ", "dim"),
                    (fmt(last.val_loss), "bold"),
                    ("   val_acc ", "dim"),
                    (f"{last.val_acc:.1%}", "bold"),
                )
            )
        width = max(20, min(100, self.console.width - 12))
        total_steps = setup.steps if setup is not None else len(self._losses)
        spark = Text.assemble(
            ("loss  ", "dim"), (sparkline(self._losses, total_steps, width), "magenta")
        )

        epochs = Table(expand=True, box=None, padding=(0, 1))
        for name in ("epoch", "step", "loss", "val_loss", "val_acc", "LR", ""):
            epochs.add_column(name, justify="right" if name else "left")
        finite = [e.val_loss for e in self._epochs if math.isfinite(e.val_loss)]
        best = min(finite) if finite else math.nan
        for e in self._epochs[-6:]:
            epochs.add_row(
                str(e.epoch), str(e.step), fmt(e.loss),
                Text(fmt(e.val_loss), "bold green" if e.val_loss == best else ""),
                f"{e.val_acc:.1%}", fmt_lr(e.lr), "checkpoint" if e.checkpoint else "",
            )  # fmt: skip
        events = Table.grid(padding=(0, 1))
        events.add_column(justify="right", style="dim")
        events.add_column()
        for style, when, text in self._events[-8:]:
            events.add_row(when, Text(text, style))
        if not self._events:
            events.add_row("", Text("none yet", "dim"))
        return Group(
            Panel(Group(self.progress, now, spark), title=f"[bold]{JOB}[/]", border_style="blue"),
            Panel(epochs, title="validation (one row per epoch)", border_style="blue"),
            Panel(events, title="decisions from the daemon", border_style="yellow"),
        )

    def summary(self, outcome: Outcome) -> None:
        self.console.print("[bold]summary[/]")
        self._print_rows(summary_lines(outcome))
        self.console.print("[bold]where to look next[/]")
        self._print_rows(outcome.next_steps)

    def _print_rows(self, rows: Sequence[tuple[str, str]]) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 1))
        table.add_column(style="cyan", no_wrap=True, min_width=13)
        table.add_column(overflow="fold")
        for label, text in rows:  # Text, not markup: paths and reasons may hold brackets
            table.add_row(f" {label}", Text(text))
        self.console.print(table)


# --------------------------------------------------------------------------- the training run


@dataclass(slots=True)
class Snapshot:
    """An in-memory checkpoint: model and optimizer state."""

    model: dict[str, Any]
    optimizer: dict[str, Any]


class DigitsRun:
    """An MLP on scikit-learn's digits, driven by an :class:`lrpilot.torch.LRPilot`.

    ``step`` counts optimizer steps from 1 and keeps counting after a rollback (a rollback
    restores weights, not the step counter), so the job's curves and the daemon's decisions
    share one monotonic x axis. A checkpoint is kept and reported after every epoch whose losses
    are finite, plus the initial weights as step 0.
    """

    def __init__(self, steps: int | None, pause: float, seed: int = SEED) -> None:
        import torch
        from sklearn.datasets import load_digits

        torch.manual_seed(seed)
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and noise)
        images, labels = load_digits(return_X_y=True)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(images), generator=generator)
        x = torch.tensor(images, dtype=torch.float32)[order] / 16.0  # pixels are 0..16
        y = torch.tensor(labels, dtype=torch.long)[order]
        n_val = int(len(x) * VAL_FRACTION)
        train_x, self.train_y = x[n_val:], y[n_val:]
        self.val_y = y[:n_val]
        # standardize per pixel; border pixels are almost always 0, and a floor on their
        # spread keeps a rare non-zero value from becoming a huge input
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(0.1)
        self.train_x = (train_x - mean) / std
        self.val_x = (x[:n_val] - mean) / std
        self.batches_per_epoch = math.ceil(len(self.train_x) / BATCH_SIZE)
        self.steps = steps if steps else DEFAULT_EPOCHS * self.batches_per_epoch
        self.epochs = math.ceil(self.steps / self.batches_per_epoch)
        self.pause = pause
        self.generator = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(64, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, 10),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=INITIAL_LR)
        self.checkpoints: dict[int, Snapshot] = {}
        self._skip = 0
        self.non_finite_steps = 0
        self.steps_done = 0
        self.results: list[EpochResult] = []

    @property
    def description(self) -> tuple[str, str]:
        model = f"MLP 64-{HIDDEN}-{HIDDEN}-10 (ReLU)"
        data = (
            f"scikit-learn digits ({len(self.train_x)} train / {len(self.val_x)} validation "
            f"images, batch {BATCH_SIZE})"
        )
        return model, data

    def save_checkpoint(self, step: int) -> None:
        self.checkpoints[step] = Snapshot(
            copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())
        )
        for old in sorted(self.checkpoints)[:-3]:  # the last three are plenty
            del self.checkpoints[old]

    def rollback(self, checkpoint_step: int, skip_batches: int) -> None:
        """The rollback hook: reload a kept checkpoint and skip ``skip_batches`` batches.

        The checkpoint's LR comes back with the optimizer state; lrpilot writes the
        decision's LR over it right after this hook returns.
        """
        snapshot = self.checkpoints.get(checkpoint_step)
        if snapshot is None:
            raise DemoError(
                f"the daemon asked for checkpoint {checkpoint_step}, which was never kept"
            )
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
        self._skip = skip_batches

    @property
    def lr(self) -> float:
        """The LR the optimizer will really use next (what lrpilot wrote, read back)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def evaluate(self) -> tuple[float, float]:
        import torch

        with torch.no_grad():
            logits = self.model(self.val_x)
            loss = torch.nn.functional.cross_entropy(logits, self.val_y).item()
            accuracy = (logits.argmax(1) == self.val_y).float().mean().item()
        return loss, accuracy

    def train(self, pilot: LRPilot, reporter: Reporter, curves: Curves | None = None) -> None:
        """Run every step, reporting to ``pilot``, ``reporter`` and ``curves``.

        Results accumulate in :attr:`results` and :attr:`steps_done`, so they are there even
        when a halt decision (:class:`lrpilot.Halted`) or Ctrl-C ends the run early.
        """
        import torch

        loss_fn = torch.nn.functional.cross_entropy
        self.save_checkpoint(0)
        pilot.checkpoint(0)
        step = 0
        loss_value = math.nan
        warned = False
        for epoch in range(1, self.epochs + 1):
            order = torch.randperm(len(self.train_x), generator=self.generator)
            for start in range(0, len(order), BATCH_SIZE):
                if step >= self.steps:
                    break
                if self._skip > 0:
                    self._skip -= 1
                    continue
                step += 1
                batch = order[start : start + BATCH_SIZE]
                loss = loss_fn(self.model(self.train_x[batch]), self.train_y[batch])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    self.non_finite_steps += 1
                    if not warned:
                        warned = True
                        reporter.note(
                            step,
                            f"loss is {fmt(loss_value)}; training goes on until the daemon's "
                            "decision arrives",
                        )
                else:
                    warned = False
                if curves is not None:
                    curves.add("train/loss", loss_value, step)
                    curves.add("train/lr", self.lr, step)
                pilot.step(step, loss=loss_value)  # may roll back; sets the LR of step + 1
                self.steps_done = step
                reporter.step(step, epoch, loss_value, self.lr)
                if self.pause:
                    time.sleep(self.pause)
            val_loss, val_acc = self.evaluate()
            pilot.report(step, epoch=epoch, val_loss=val_loss, val_acc=val_acc)
            if curves is not None:
                curves.add("val/loss", val_loss, step)
                curves.add("val/accuracy", val_acc, step)
            good = math.isfinite(val_loss) and math.isfinite(loss_value)
            if good:
                self.save_checkpoint(step)
                pilot.checkpoint(step)
            result = EpochResult(epoch, step, loss_value, val_loss, val_acc, self.lr, good)
            self.results.append(result)
            reporter.epoch(result)


class Curves:
    """The job's own TensorBoard curves, beside the daemon's output for the job.

    ``tensorboard --logdir`` on the daemon's root then shows the run ``demo-digits`` (the LR
    lrpilot set, its detections and decisions) and ``demo-digits/training`` (loss, val_loss,
    accuracy) on the same step axis.
    """

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, tag: str, value: float, step: int) -> None:
        self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------- entry point


def _missing_packages() -> list[str]:
    return [
        name
        for name, module in (("torch", "torch"), ("scikit-learn", "sklearn"))
        if importlib.util.find_spec(module) is None
    ]


def _use_rich(plain: bool) -> bool:
    return not plain and sys.stdout.isatty() and importlib.util.find_spec("rich") is not None


def _quiet_logging() -> None:
    """Keep the daemon's routine log lines out of the display; errors still reach stderr."""
    logging.getLogger("websockets").setLevel(logging.ERROR)
    logging.getLogger("lrpilot").setLevel(logging.ERROR)


def next_steps(daemon: Daemon, setup: Setup, interactive: bool) -> list[tuple[str, str]]:
    """Where to look after the run: metrics, the jobs commands, TensorBoard."""
    url = setup.url
    port = daemon.port
    rows = []
    if not interactive:
        rows.append(
            ("daemon", f"stopped with the demo; reopen its state with "
                       f"`lrpilot serve --config {setup.config_path} --port {port}`")
        )  # fmt: skip
    rows += [
        ("metrics", f"{http_base(daemon)}/metrics"),
        ("jobs", f"lrpilot jobs --url {url}"),
        ("one job", f"lrpilot show {JOB} --url {url}"),
        ("tensorboard", f"tensorboard --logdir {setup.tensorboard_dir}"),
    ]
    return rows


def run(args: argparse.Namespace) -> int:
    """The demo itself; :func:`main` turns its errors into messages and exit statuses."""
    missing = _missing_packages()
    if missing:
        raise DemoError(
            f"the demo needs {' and '.join(missing)}: pip install 'lrpilot-monitor[demo]'"
        )
    from lrpilot.torch import LRPilot

    port = int(getattr(args, "port", 0) or 0)
    steps = int(getattr(args, "steps", 0) or 0)
    if not 0 <= port <= 65535:
        raise DemoError(f"--port: must be in 0..65535, got {port}")
    if steps < 0:
        raise DemoError(f"--steps: must be >= 0 (0: the demo's own), got {steps}")
    reporter: Reporter = (
        RichReporter() if _use_rich(bool(getattr(args, "plain", False))) else PlainReporter()
    )
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    _quiet_logging()

    training = DigitsRun(steps or None, STEP_PAUSE_SECONDS)
    with contextlib.ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix="lrpilot-demo-"))
        keep_files = False  # once training starts, its files are worth a look

        def remove_files_unless_kept() -> None:
            if not keep_files:
                shutil.rmtree(workdir, ignore_errors=True)

        cleanup.callback(remove_files_unless_kept)  # last: after the daemon has stopped
        config_path = write_config(workdir, port)
        try:
            config = load_config(config_path, environ={})  # self-contained: no LRPILOT_*
        except ConfigError as exc:  # pragma: no cover - the demo's own config
            raise DemoError(f"the demo's config is invalid: {exc}") from None
        tensorboard_dir = Path(config.tensorboard.log_dir)
        daemon_thread = DaemonThread(config)
        cleanup.callback(daemon_thread.stop)
        daemon = daemon_thread.start()
        # the daemon applies decisions 0.1 s ahead (write_config): the client sends every
        # 20 ms, well inside that, rather than its default 0.1 s
        pilot = LRPilot(
            training.optimizer, daemon.url, JOB, run_id=workdir.name, close_timeout=5.0,
            flush_interval=0.02,
        )  # fmt: skip
        cleanup.callback(pilot.close)  # flushes, then tells the daemon the job finished
        if not pilot.client.wait_connected(CONNECT_TIMEOUT_SECONDS):
            raise DemoError(
                f"the training job could not connect to the daemon at {daemon.url} within "
                f"{CONNECT_TIMEOUT_SECONDS:g} s: {pilot.client.stats.last_error}"
            )
        pilot.on_rollback(training.rollback)
        pilot.client.add_decision_callback(reporter.decision)
        pilot.start(1, wait=None)  # the LR of step 1: the daemon's, should it differ
        curves = Curves(tensorboard_dir / JOB / "training")
        cleanup.callback(curves.close)

        model, data = training.description
        setup = Setup(
            url=daemon.url, workdir=workdir, config_path=config_path,
            tensorboard_dir=tensorboard_dir, model=model, data=data,
            steps=training.steps, epochs=training.epochs, initial_lr=INITIAL_LR,
        )  # fmt: skip
        keep_files = True
        reporter.start(setup)
        started = time.monotonic()
        halted: str | None = None
        try:
            training.train(pilot, reporter, curves)
        except Halted as exc:
            halted = exc.reason
        finally:
            reporter.stop()
        seconds = time.monotonic() - started
        pilot.client.flush(5.0)
        pilot.close()
        outcome = Outcome(
            steps=training.steps_done, seconds=seconds, epochs=training.results,
            decisions=pilot.client.decisions, non_finite_steps=training.non_finite_steps,
            halted=halted, journaled=journaled_decisions(daemon, JOB, training.steps_done),
            next_steps=next_steps(daemon, setup, interactive),
        )  # fmt: skip
        reporter.summary(outcome)
        if halted is not None:
            raise DemoError(f"the daemon halted the training job: {halted}")
        if interactive:
            _wait_for_enter(daemon)
    return 0


def _wait_for_enter(daemon: Daemon) -> None:
    print(
        f"\nThe daemon keeps running at {daemon.url} — press Enter or Ctrl-C to stop it.",
        flush=True,
    )
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        input()


def main(args: argparse.Namespace) -> int:
    """``lrpilot demo``: run the demo; return the exit status."""
    try:
        return run(args)
    except DemoError as exc:
        print(f"lrpilot demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nlrpilot demo: interrupted; the daemon was stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`lrpilot demo --plain | head`): no traceback, and none at exit
        # when Python flushes stdout once more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
