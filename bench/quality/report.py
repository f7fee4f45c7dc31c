"""Markdown tables and PNG plots of the quality benchmark's results."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks import TASKS

STARTS = ("/100", "/10", "x1", "x10", "x100")
BAD = ("/100", "/10", "x10", "x100")
SHORT = {
    "non_finite": "nan",
    "oscillation": "osc",
    "spike": "spike",
    "divergence": "div",
    "reduce_on_plateau": "plateau",
    "keras_reduce_on_plateau": "plateau",
}
TOLERANCE = 1.05


def _runs(out: Mapping[str, Any], task: str, controller: str, label: str) -> list[dict[str, Any]]:
    return [r for r in out["runs"] if r["task"] == task and r["controller"] == controller and r["label"] == label]


def _mean(values: Sequence[float]) -> float:
    return math.inf if not values or any(not math.isfinite(v) for v in values) else statistics.fmean(values)


def _cell(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "—"
    losses = [r["final_val_loss"] for r in runs]
    lost = sum(1 for r in runs if r["lost"])
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        return f"lost {lost}/{len(runs)}"
    text = f"{statistics.fmean(finite):.3f}"
    if len(finite) > 1:
        text += f" ±{statistics.pstdev(finite):.3f}"
    if lost:
        text += f" (lost {lost}/{len(runs)})"
    return text


def target_of(out: Mapping[str, Any], task: str) -> float:
    """The validation loss to reach: 5 % above the best fixed LR's mean final loss."""
    return _mean([r["final_val_loss"] for r in _runs(out, task, "fixed", "x1")]) * TOLERANCE


def _steps_to(runs: list[dict[str, Any]], target: float) -> str:
    hits = []
    for r in runs:
        step = next((s for s, v in zip(r["eval_steps"], r["eval_losses"], strict=True) if v <= target), None)
        if step is not None:
            hits.append(step + 1)
    if not runs:
        return "—"
    if not hits:
        return "never"
    text = f"{int(statistics.median(hits))}"
    return text if len(hits) == len(runs) else f"{text} ({len(hits)}/{len(runs)})"


def _decisions(runs: list[dict[str, Any]]) -> str:
    totals: dict[str, int] = {}
    for r in runs:
        for key, n in (r.get("decisions") or {}).items():
            kind, source = key.split(":", 1)
            name = SHORT.get(source, source)
            if kind == "rollback":
                name = "rollback"
            totals[name] = totals.get(name, 0) + n
    if not totals:
        return "none"
    return ", ".join(f"{k} {v / len(runs):.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1]))


def tables(out: Mapping[str, Any]) -> str:
    """The results section: a summary and one table per task."""
    lines: list[str] = []
    seeds = len(out["seeds"])
    lines.append(
        f"Seeds per configuration: {seeds}; cells are the mean final validation loss ± its spread "
        "(population std over seeds); a lost run (NaN weights, halted) counts as lost, not as a number. "
        f"Daemon config: `{Path(out['config']).name}`. Wall time {out['minutes']} min."
    )
    lines.append("")
    lines.append("### Summary: lrpilot's final validation loss relative to the best fixed LR")
    lines.append("")
    lines.append("| task | best fixed LR | " + " | ".join(f"start {s}" for s in STARTS) + " |")
    lines.append("|---|---:|" + "---:|" * len(STARTS))
    met = total = 0
    for task in TASKS:
        if task not in out["best"]:
            continue
        ref = _mean([r["final_val_loss"] for r in _runs(out, task, "fixed", "x1")])
        cells = []
        for s in STARTS:
            runs = _runs(out, task, "lrpilot", s)
            lost = sum(1 for r in runs if r["lost"])
            value = _mean([r["final_val_loss"] for r in runs if not r["lost"]])
            ratio = value / ref if math.isfinite(value) else math.inf
            ok = lost == 0 and ratio <= TOLERANCE
            if s in BAD:
                total += 1
                met += ok
            mark = "✅" if ok else "❌"
            cells.append(f"{mark} {ratio:.2f}" + (f" (lost {lost})" if lost else ""))
        lines.append(f"| {task} | {out['best'][task]:g} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Target (final val loss ≤ {TOLERANCE:.2f} × the best fixed LR's, no run lost) met for {met} of {total} "
        "bad starts."
    )
    for task in TASKS:
        if task not in out["best"]:
            continue
        t = TASKS[task]
        target = target_of(out, task)
        lines.append("")
        lines.append(f"### {task}: {t.title}")
        lines.append("")
        lines.append(
            f"{t.optimizer_title()}, batch {t.batch_size}, {t.steps} steps, validation every {t.eval_every} steps. "
            f"Best fixed LR {out['best'][task]:g}; target val loss {target:.4f} (best fixed × {TOLERANCE})."
        )
        lines.append("")
        lines.append(
            "| start LR | fixed | torch plateau | torch one-cycle | lrpilot | lrpilot acc | steps to target "
            "(lrpilot / fixed) | NaN incidents survived | decisions per run |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for s in STARTS:
            pilot = _runs(out, task, "lrpilot", s)
            fixed = _runs(out, task, "fixed", s)
            lr = pilot[0]["lr"] if pilot else (fixed[0]["lr"] if fixed else math.nan)
            accs = [r["final_val_acc"] for r in pilot if r["final_val_acc"] is not None]
            acc = f"{statistics.fmean(accs):.3f}" if accs and t.classification else "—"
            survived = sum(r["nan_incidents"] for r in pilot if not r["lost"])
            incidents = sum(r["nan_incidents"] for r in pilot)
            lines.append(
                f"| {s} ({lr:g}) | {_cell(fixed)} | {_cell(_runs(out, task, 'plateau', s))} | "
                f"{_cell(_runs(out, task, 'onecycle', s))} | {_cell(pilot)} | {acc} | "
                f"{_steps_to(pilot, target)} / {_steps_to(fixed, target)} | {survived} of {incidents} | "
                f"{_decisions(pilot)} |"
            )
    return "\n".join(lines) + "\n"


def write_doc(doc: Path, text: str, begin: str, end: str) -> None:
    """Replace the text between the markers of ``doc`` (append the markers if missing)."""
    current = doc.read_text(encoding="utf-8") if doc.exists() else f"# Quality\n\n{begin}\n{end}\n"
    if begin not in current or end not in current:
        current = current.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = current.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{tail}", encoding="utf-8")


def plot_task(
    task: str,
    best: float,
    histories: Mapping[tuple[str, str], Any],
    path: Path,
    reference: tuple[Sequence[int], Sequence[float]] | None = None,
) -> None:
    """Loss (EMA of the training loss, and validation loss) and LR over steps, seed 0, lrpilot.

    ``reference``: the validation losses (steps, values) of the best fixed LR, drawn dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True, height_ratios=(3, 2))
    finite_vals: list[float] = list(reference[1]) if reference is not None else []
    colors = {"/100": "tab:blue", "/10": "tab:cyan", "x1": "black", "x10": "tab:orange", "x100": "tab:red"}
    for s in STARTS:
        h = histories.get((task, s))
        if h is None:
            continue
        color = colors[s]
        restarts = {d["step"] for d in h["decisions"] if d["kind"] == "rollback"}
        ema, smooth = math.nan, []
        for i, v in enumerate(h["loss"]):
            if i in restarts:  # the weights were reloaded: the average starts again
                ema = math.nan
            if math.isfinite(v):
                ema = v if not math.isfinite(ema) else 0.95 * ema + 0.05 * v
            smooth.append(ema if math.isfinite(v) else math.nan)
        finite_vals.extend(v for v in h["eval_losses"] if math.isfinite(v))
        ax_loss.plot(range(len(smooth)), smooth, color=color, lw=0.8, alpha=0.5)
        ax_loss.plot(h["eval_steps"], h["eval_losses"], color=color, lw=1.6, label=f"start {s}")
        ax_lr.plot(range(len(h["lrs"])), h["lrs"], color=color, lw=1.2)
        for d in h["decisions"]:
            step = d["step"]
            lr = h["lrs"][step] if step < len(h["lrs"]) else None
            if lr is None:
                continue
            marker = {"rollback": "X", "halt": "s"}.get(d["kind"], "o")
            size = 45 if d["kind"] != "set_lr" else 14
            ax_lr.scatter([step], [lr], marker=marker, color=color, s=size, zorder=3, edgecolor="k", linewidth=0.4)
            if d["kind"] == "rollback":
                ax_loss.axvline(step, color=color, lw=0.6, ls=":")
    if reference is not None:
        ax_loss.plot(reference[0], reference[1], color="grey", lw=1.2, ls="--", label="best fixed LR")
    ax_lr.axhline(best, color="grey", lw=0.8, ls="--", label=f"best fixed LR {best:g}")
    ax_loss.set_yscale("log")
    if finite_vals:  # blown-up training losses (1e20 before an Inf) would flatten everything else
        ax_loss.set_ylim(0.5 * min(finite_vals), 5 * max(finite_vals))
    ax_loss.set_ylabel("loss (thin: train EMA,\nthick: validation)")
    ax_loss.set_title(f"{task}: lrpilot from bad starting LRs (seed 0)", fontsize=10)
    ax_loss.legend(fontsize=7, ncol=3, loc="upper right")
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("LR (o set_lr, X rollback)")
    ax_lr.set_xlabel("optimizer step (rolled-back steps included)")
    ax_lr.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def ratios(out: Mapping[str, Any]) -> dict[str, dict[str, tuple[float, int]]]:
    """Per task and start: (lrpilot's mean final val loss / the best fixed LR's, runs lost)."""
    table: dict[str, dict[str, tuple[float, int]]] = {}
    for task in out["best"]:
        ref = _mean([r["final_val_loss"] for r in _runs(out, task, "fixed", "x1")])
        row: dict[str, tuple[float, int]] = {}
        for s in STARTS:
            runs = _runs(out, task, "lrpilot", s)
            if not runs:
                continue
            lost = sum(1 for r in runs if r["lost"])
            value = _mean([r["final_val_loss"] for r in runs if not r["lost"]])
            row[s] = (value / ref if math.isfinite(value) else math.inf, lost)
        table[task] = row
    return table


def compare(named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One row per task and variant: lrpilot's ratio to the best fixed LR from each start."""
    lines = [
        "| task | variant | " + " | ".join(f"start {s}" for s in STARTS) + " | bad starts met |",
        "|---|---|" + "---:|" * len(STARTS) + "---:|",
    ]
    tables = [(name, ratios(out)) for name, out in named]
    tasks = [t for t in TASKS if any(t in table for _, table in tables)]
    for task in tasks:
        for name, table in tables:
            row = table.get(task, {})
            cells, met = [], 0
            for s in STARTS:
                if s not in row:
                    cells.append("—")
                    continue
                ratio, lost = row[s]
                ok = lost == 0 and ratio <= TOLERANCE
                met += ok and s in BAD
                cells.append(f"{'**' if ok else ''}{ratio:.2f}{'**' if ok else ''}" + (f" (lost {lost})" if lost else ""))
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + f" | {met} of {len(BAD)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json
    import sys

    # python bench/quality/report.py NAME=results.json ...: the comparison table
    print(compare([(arg.split("=", 1)[0], json.loads(Path(arg.split("=", 1)[1]).read_text())) for arg in sys.argv[1:]]))
