"""Does lrpilot improve training? Run the quality benchmark and regenerate its report.

::

    python bench/quality/run.py            # 4 tasks, 3 seeds, half-decade LR grid (5-10 min on 2 cores)
    python bench/quality/run.py --quick    # 1 seed, decade grid
    python bench/quality/run.py --config my.yaml --tag tuned   # lrpilot with another daemon config
    python bench/quality/run.py --only-lrpilot --tag tuned     # rerun lrpilot's runs only

For every task: (a) a grid of fixed LRs finds the best fixed LR (lowest mean final validation
loss); (b) torch's ReduceLROnPlateau and OneCycleLR run with their usual settings; (c) lrpilot
steers the job through a real daemon subprocess started with the repository's config.yaml.
(b) and (c) start from the best fixed LR times 1/100, 1/10, 1, 10 and 100.

Outputs: ``docs/quality/results.json`` (every run's summary), ``docs/quality/<task>.png``
(loss and LR over steps of lrpilot's runs, decisions marked; needs matplotlib), the results
section of ``docs/quality.md`` between its ``results`` markers, and its before/after table
between the ``comparison`` markers (this run against the ``results-*.json`` of
:data:`VARIANTS`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(ROOT / "clients"), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from daemon import Daemon  # noqa: E402
from tasks import SUITE, TASKS  # noqa: E402
from train import RunSpec, run_dict  # noqa: E402

MULTIPLIERS = (0.01, 0.1, 1.0, 10.0, 100.0)
BAD_STARTS = (0.01, 0.1, 10.0, 100.0)
CONTROLLERS = ("fixed", "plateau", "onecycle", "lrpilot")
OUT_DIR = ROOT / "docs" / "quality"
DOC = ROOT / "docs" / "quality.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
#: the before/after table in docs/quality.md: variant name -> results file (None: this run)
VARIANTS: tuple[tuple[str, str | None], ...] = (
    ("before", "results-baseline.json"),
    ("oscillation fix", "results-oscillation-fix.json"),
    ("+ patience 2", "results-patience2.json"),
    ("+ slow_progress", "results-proposed.json"),
    ("both", "results-before-overshoot.json"),
    ("+ overshoot", "results-overshoot.json"),
    ("+ stalled, min_gain 2e-5", "results-stalled.json"),
    ("(rejected: + undo)", "results-undo.json"),
    ("+ min_ratio 0.5", "results-ratio05.json"),
    ("+ margin 1, rule 2", "results-margin.json"),
    ("(rejected: + undo on a rise)", "results-undo-rise.json"),
    ("+ near_start", "results-near-start.json"),
    ("(rejected: plateau threshold 1 %)", "results-threshold.json"),
    ("+ threshold 1 %, a raise restarts the count", "results-margin-threshold.json"),
    # a later session's machine: chaotic runs (high LRs) end elsewhere than on the one above
    ("another machine: the same, rerun (--unknown-length)", "results-no-length.json"),
    ("+ anneal (the jobs give their length)", "results-anneal.json"),
    ("+ stalled rule 2: 4 of 5", "results-stalled-4of5.json"),
    ("+ max_gain 0.5, first raise", "results-first-gain.json"),
    ("now", None),
)


def grid(quick: bool) -> list[float]:
    """Fixed LRs: 1e-4 .. 10 by half decades (decades with --quick)."""
    step = 2 if quick else 1
    return [_round(10 ** (k / 2)) for k in range(-8, 3, step)]


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def label_of(mult: float) -> str:
    return {0.01: "/100", 0.1: "/10", 1.0: "x1", 10.0: "x10", 100.0: "x100"}[mult]


def _pool_map(specs: Sequence[RunSpec], workers: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    if workers <= 1:
        for i, spec in enumerate(specs):
            results.append(run_dict(spec))
            _progress(i + 1, len(specs))
        return results
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for i, result in enumerate(pool.imap(run_dict, specs)):
            results.append(result)
            _progress(i + 1, len(specs))
    return results


def _init_worker() -> None:
    for p in (str(HERE), str(ROOT / "clients"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def _progress(done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"  {done}/{total} runs", file=sys.stderr, flush=True)


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return math.inf if any(not math.isfinite(v) for v in vals) else statistics.fmean(vals)


def best_fixed(runs: list[dict[str, Any]], task: str) -> float:
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        if r["task"] == task and r["controller"] == "fixed":
            by_lr.setdefault(r["lr"], []).append(r["final_val_loss"])
    return min(by_lr, key=lambda lr: (mean(by_lr[lr]), lr))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and a decade LR grid")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3, 1 with --quick)")
    parser.add_argument(
        "--tasks",
        default=",".join(SUITE),
        help=f"comma-separated task names (default: the suite, {','.join(SUITE)}; "
        "<task>_adam: the same with Adam)",
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"), help="the daemon's config file")
    parser.add_argument("--tag", default="", help="suffix of the output files (results-TAG.json); no doc update")
    parser.add_argument("--only-lrpilot", action="store_true", help="rerun lrpilot only; reuse the other runs of --reuse")
    parser.add_argument("--reuse", default=str(OUT_DIR / "results.json"), help="results file for --only-lrpilot")
    parser.add_argument("--no-report", action="store_true", help="do not rewrite docs/quality.md and the plots")
    parser.add_argument(
        "--unknown-length",
        action="store_true",
        help="lrpilot's jobs do not tell the daemon their length (no total_steps: no cooldown)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite docs/quality.md's tables from results.json (no runs, no plots)"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        import report

        out = json.loads((OUT_DIR / "results.json").read_text())
        write_tables(report, out)
        return 0
    if not args.no_report and not args.tag:
        try:
            import matplotlib  # noqa: F401  # the plots; checked now rather than after the runs
        except ImportError:
            parser.error("the plots need matplotlib: pip install matplotlib, or pass --no-report")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            parser.error(f"--tasks: unknown task {t!r}; expected some of {', '.join(TASKS)}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    runs: list[dict[str, Any]] = []
    if args.only_lrpilot:
        previous = json.loads(Path(args.reuse).read_text())
        runs = [r for r in previous["runs"] if r["controller"] != "lrpilot" and r["task"] in tasks]
        best = {t: previous["best"][t] for t in tasks}
        if args.seeds is None:  # the same seeds as the runs reused
            seeds = list(previous["seeds"])
        args.quick = bool(previous["quick"])
    else:
        print("fixed-LR grid", file=sys.stderr)
        specs = [RunSpec(t, "fixed", lr, s) for t in tasks for lr in grid(args.quick) for s in seeds]
        runs = _pool_map(specs, args.workers)
        best = {t: best_fixed(runs, t) for t in tasks}
        print("torch schedulers and missing fixed starts", file=sys.stderr)
        specs = []
        for t in tasks:
            have = {r["lr"] for r in runs if r["task"] == t}
            for m in MULTIPLIERS:
                lr = _round(best[t] * m)
                for s in seeds:
                    if lr not in have:
                        specs.append(RunSpec(t, "fixed", lr, s, label=label_of(m)))
                    for c in ("plateau", "onecycle"):
                        specs.append(RunSpec(t, c, lr, s, label=label_of(m)))
        runs += _pool_map(specs, args.workers)
    print(f"lrpilot through a real daemon ({args.config})", file=sys.stderr)
    with Daemon(Path(args.config)) as daemon:
        specs = [
            RunSpec(
                t,
                "lrpilot",
                _round(best[t] * m),
                s,
                url=daemon.url,
                label=label_of(m),
                keep_history=(s == 0),
                tell_length=not args.unknown_length,
            )
            for t in tasks
            for m in MULTIPLIERS
            for s in seeds
        ]
        runs += _pool_map(specs, args.workers)
    for r in runs:  # label fixed runs that sit on a start multiple
        for m in MULTIPLIERS:
            if r["controller"] == "fixed" and r["lr"] == _round(best[r["task"]] * m):
                r["label"] = label_of(m)
    histories = {
        (r["task"], r["label"]): {"loss": r["loss"], "lrs": r["lrs"], "decisions": r["decision_log"], "eval_steps": r["eval_steps"], "eval_losses": r["eval_losses"]}
        for r in runs
        if r["controller"] == "lrpilot" and r["loss"]
    }
    for r in runs:
        r.pop("loss", None)
        r.pop("lrs", None)
        if r["controller"] != "lrpilot":
            r.pop("decision_log", None)
    out = {
        "quick": args.quick,
        "seeds": seeds,
        "config": args.config,
        "best": best,
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "runs": runs,
    }
    name = f"results-{args.tag}.json" if args.tag else "results.json"
    (OUT_DIR / name).write_text(json.dumps(out, indent=0, default=_json_default) + "\n")
    import report

    text = report.tables(out)
    print(text)
    if not args.no_report and not args.tag:
        write_tables(report, out)
        for t in tasks:
            ref = next(r for r in runs if r["task"] == t and r["controller"] == "fixed" and r["label"] == "x1" and r["seed"] == seeds[0])
            report.plot_task(t, best[t], histories, OUT_DIR / f"{t}.png", (ref["eval_steps"], ref["eval_losses"]))
    elif args.tag:
        (OUT_DIR / f"table-{args.tag}.md").write_text(text)
    print(f"done in {(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


def write_tables(report: Any, out: dict[str, Any]) -> None:
    """The results section and the before/after table of docs/quality.md."""
    report.write_doc(DOC, report.tables(out), BEGIN, END)
    named = [
        (name, out if file is None else json.loads((OUT_DIR / file).read_text()))
        for name, file in VARIANTS
        if file is None or (OUT_DIR / file).exists()
    ]
    report.write_doc(DOC, report.compare(named), "<!-- comparison:begin -->", "<!-- comparison:end -->")


def _json_default(x: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
