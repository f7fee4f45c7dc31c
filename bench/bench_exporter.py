"""How long one /metrics render takes with many jobs, against prometheus_client.

Builds N jobs (default 1,000), each with 2 param groups, 5 metrics, 3 detectors and 2 decision
reasons, and times, in the same run:

* ``MetricsRenderer.render()`` with its cache disabled (our text writer, views built fresh
  each time as the daemon does at scrape time), in steady state: the renderer's memo reuses
  the lines of LRs and counters that did not change since the previous render;
* the same with the views built beforehand, when no job changed (the daemon hands out the
  same view objects again) and when every job's metric values, step and last-seen time
  changed (new views each time: only their numbers are formatted), without and with each
  job's ``steady`` token kept (the daemon's views: nothing but the numbers is compared);
* ``render_text()`` with an empty memo: every line formatted (a scrape right after every
  job's LR and counters changed);
* ``prometheus_client.generate_latest`` on a registry holding the same series as plain
  ``Gauge``/``Counter`` objects (the "copy into gauges on every update" design);
* ``generate_latest`` on a registry with our ``LrpilotCollector``;
* the daemon's scrape without its HTTP layer: a ``JobRegistry`` of N jobs (the daemon
  benchmark's policy, every default detector), each reporting one record of two metrics
  between scrapes, then ``views()`` and the render, as GET /metrics does. Timed in CPU time
  of the thread (the host may be busy), with the CPU caches flushed first by 32 MB of other
  memory traffic (the daemon scrapes a second after the jobs last reported), next to the
  time when no job changed.

Run: ``python bench/bench_exporter.py [--jobs 1000] [--repeat 20]``. Prints median times and
the ratio.

``python bench/bench_exporter.py --baseline DIR`` runs only the daemon's scrape, A/B: the same
views rendered by this checkout's exporter and by DIR's (another checkout, say a
``git worktree`` of an earlier commit), alternating scrape by scrape, in CPU time of the
thread; the two bodies must be equal.

``python bench/bench_exporter.py --daemon-scrape [--baseline DIR] [--rounds 4]`` times the
daemon's whole scrape in two parts, ``views()`` and the render, each in CPU time of the thread
with the caches evicted before the scrape, every job changed and none changed: views() and
the render share the scrape's cold memory, so that a change to one moves cost to the other.
With ``--baseline``, each round runs it once in a process on this checkout's code and once on
DIR's (``--code DIR``: the registry, engine and exporter are the checkout's own, the benchmark
the same), alternating which goes first, and prints the median ratios of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sized
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# the checkout whose code is measured: this one, or --code DIR's (read before any import)
sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv[:-1] else Path(__file__).parent.parent).resolve()))  # fmt: skip
sys.path.insert(0, str(Path(sys.path[0]) / "clients"))

from monitor import __version__
from monitor.exporter import (
    JOB_STATES,
    DaemonStatsView,
    JobView,
    LrpilotCollector,
    MetricsRenderer,
    render_text,
)

#: the checkout whose code is measured (see above)
CODE = Path(sys.path[1])
METRICS = ("loss", "val_loss", "accuracy", "val_accuracy", "grad_norm")
DETECTORS = ("plateau", "spike", "non_finite")
DECISIONS = (("set_lr", "reduce_on_plateau"), ("set_lr", "spike"))


def make_views(n_jobs: int, tick: int = 0, steady: list[object] | None = None) -> list[JobView]:
    """N jobs with 2 param groups, 5 metrics, 3 detectors and 2 decision reasons each;
    ``tick`` moves every job's metric values, step and last-seen time on; ``steady`` gives
    each job its token (JobView.steady), as the daemon does when only numbers changed."""
    return [
        JobView(
            name=f"job-{i:05d}",
            state=JOB_STATES[i % len(JOB_STATES)],
            lrs=(0.1 / (i + 1), 0.01 / (i + 1)),
            min_lrs=(1e-6, 1e-7),
            metric_values={m: 0.5 + i * 1e-3 + k + tick / 3 for k, m in enumerate(METRICS)},
            detections={d: i % (k + 2) for k, d in enumerate(DETECTORS)},
            decisions={key: i % 5 for key in DECISIONS},
            nonfinite={"loss": i % 3},
            plateau_bad_evaluations=i % 10,
            last_seen=1.7e9 + i + tick * 15.123,
            step=1000 * i + tick,
            steady=None if steady is None else steady[i],
        )
        for i in range(n_jobs)
    ]


def gauge_registry(views: list[JobView]) -> CollectorRegistry:
    """The same series, copied into plain prometheus_client metrics."""
    registry = CollectorRegistry()
    tj = "training_job"
    lr = Gauge("lrpilot_job_learning_rate", "lr", [tj, "param_group"], registry=registry)
    ratio = Gauge("lrpilot_job_min_lr_ratio", "ratio", [tj, "param_group"], registry=registry)
    value = Gauge("lrpilot_job_metric_value", "value", [tj, "metric"], registry=registry)
    nonfinite = Counter("lrpilot_job_nonfinite", "nf", [tj, "metric"], registry=registry)
    detections = Counter("lrpilot_job_detections", "d", [tj, "detector"], registry=registry)
    decisions = Counter("lrpilot_job_decisions", "d", [tj, "kind", "reason"], registry=registry)
    bad = Gauge("lrpilot_job_plateau_bad_evaluations", "b", [tj], registry=registry)
    seen = Gauge("lrpilot_job_last_seen_timestamp_seconds", "s", [tj], registry=registry)
    step = Gauge("lrpilot_job_step", "s", [tj], registry=registry)
    state = Gauge("lrpilot_job_state", "s", [tj, "state"], registry=registry)
    for v in views:
        for g, x in enumerate(v.lrs):
            lr.labels(v.name, str(g)).set(x)
            ratio.labels(v.name, str(g)).set(x / v.min_lrs[g])
        for m, x in v.metric_values.items():
            value.labels(v.name, m).set(x)
            nonfinite.labels(v.name, m).inc(v.nonfinite.get(m, 0))
        for d, n in v.detections.items():
            detections.labels(v.name, d).inc(n)
        for (kind, reason), n in v.decisions.items():
            decisions.labels(v.name, kind, reason).inc(n)
        bad.labels(v.name).set(v.plateau_bad_evaluations or 0)
        seen.labels(v.name).set(v.last_seen or 0)
        step.labels(v.name).set(v.step or 0)
        for s in JOB_STATES:
            state.labels(v.name, s).set(1 if s == v.state else 0)
    return registry


def median_seconds(fn: Callable[[], Sized], repeat: int) -> tuple[float, int]:
    """Median wall time of ``fn`` over ``repeat`` runs, and the length of its output."""
    size = len(fn())  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), size


class _Peer:
    """What the registry needs of a connection (never told to go away here)."""

    session_id = "bench"
    last_sent_id = 0

    def detach(self, reason: str) -> None:
        pass


@contextlib.contextmanager
def daemon_registry(n_jobs: int) -> Iterator[tuple[Any, Callable[[int], None]]]:
    """A ``JobRegistry`` of ``n_jobs`` jobs (the daemon benchmark's policy, every default
    detector) that each reported one record, and ``report(step)``: one more record of two
    metrics from every job, as the daemon benchmark's clients send between scrapes."""
    from lrpilot._protocol import Hello, MetricsBatch

    from monitor.config import Config
    from monitor.server.daemon_stats import DaemonStats
    from monitor.server.jobs import JobRegistry
    from monitor.server.store import Store

    plateau = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.model_validate(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "storage": {"state_dir": tmp},
                "limits": {"max_jobs": n_jobs + 1},
                "exporter": {"cache_seconds": 0},
                "defaults": {"policy": plateau},
            }
        )
        store = Store(Path(tmp))
        registry = JobRegistry(config, store, DaemonStats(), time.monotonic)
        jobs = [
            registry.attach(Hello(job=f"idle-{i}", lrs=(0.1,)), _Peer()).job for i in range(n_jobs)
        ]

        def report(step: int) -> None:
            batch = MetricsBatch(steps=[step], values={"loss": [0.5 / step], "acc": [0.9]})
            for job in jobs:
                registry.ingest(job, 0, batch)
            registry.snapshot_dirty(n_jobs)  # as the daemon's tick does before the next scrape

        report(1)
        try:
            yield registry, report
        finally:
            store.close()


_TRAFFIC: list[bytearray] = []


def _evict_caches() -> None:
    """32 MB of other memory traffic: the daemon scrapes a second after the jobs last
    reported, with their state long gone from the CPU caches."""
    if not _TRAFFIC:
        _TRAFFIC.append(bytearray(32 << 20))
    _TRAFFIC[0][:] = bytes(32 << 20)


def registry_scrapes(n_jobs: int, repeat: int) -> tuple[float, float, int]:
    """Median CPU time of the daemon's scrape (views() and the render) of ``n_jobs`` jobs,
    with no job changed and with every job changed since the previous scrape, and the
    body's size."""
    from monitor.exporter import expired

    with daemon_registry(n_jobs) as (registry, report):

        def views() -> list[JobView]:  # as the daemon's /metrics hands them to the renderer
            out = registry.views()
            if registry.ended_views:
                out = [v for v in out if not expired(v, time.time(), 3600.0)]
            return out

        renderer = MetricsRenderer(LrpilotCollector(views, DaemonStatsView), cache_seconds=0.0)

        def scrape() -> tuple[float, int]:
            _evict_caches()
            start = time.thread_time()
            body = renderer.render()
            return time.thread_time() - start, len(body)

        renderer.render()
        idle = [scrape()[0] for _ in range(repeat)]
        changed = []
        for step in range(2, repeat + 2):
            report(step)
            changed.append(scrape())
    return statistics.median(idle), statistics.median(t for t, _ in changed), changed[-1][1]


def load_exporter(checkout: Path) -> Any:
    """Another checkout's ``monitor/exporter.py``, loaded beside this one (as the module
    ``baseline_monitor.exporter``; only the package's ``__version__`` comes with it)."""
    package = types.ModuleType("baseline_monitor")
    package.__path__ = [str(checkout / "monitor")]
    package.__version__ = "baseline"  # type: ignore[attr-defined]
    sys.modules["baseline_monitor"] = package
    spec = importlib.util.spec_from_file_location(
        "baseline_monitor.exporter", checkout / "monitor" / "exporter.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def ab_scrapes(n_jobs: int, repeat: int, baseline: Path) -> None:
    """The daemon's scrape of ``n_jobs`` jobs rendered by this checkout's exporter and by
    ``baseline``'s, from the same views: per scrape, views() is timed once, then each
    renderer (its own memo, the CPU caches evicted before each) renders them, the order
    swapped every scrape. Thread CPU time; prints medians and the median per-scrape ratio."""
    other = load_exporter(baseline)
    with daemon_registry(n_jobs) as (registry, report):
        current: list[list[JobView]] = []
        ours = MetricsRenderer(LrpilotCollector(lambda: current[0], DaemonStatsView), 0.0)
        theirs = other.MetricsRenderer(
            other.LrpilotCollector(lambda: current[0], other.DaemonStatsView), 0.0
        )
        pair = [("this", ours), ("baseline", theirs)]
        for changed in (False, True):
            times: dict[str, list[float]] = {"views": [], "this": [], "baseline": []}
            for n in range(repeat + 1):
                if changed:
                    report(n + 2)
                _evict_caches()
                start = time.thread_time()
                current[:] = [registry.views()]
                times["views"].append(time.thread_time() - start)
                bodies = []
                for name, renderer in pair if n % 2 else pair[::-1]:
                    _evict_caches()
                    start = time.thread_time()
                    bodies.append(renderer.render())
                    times[name].append(time.thread_time() - start)
                assert bodies[0].replace(b'"baseline"', b'"' + __version__.encode() + b'"') == (
                    bodies[1].replace(b'"baseline"', b'"' + __version__.encode() + b'"')
                ), "the two renderers wrote different bodies"
            first = slice(1, None)  # the first scrape of each kind warms the memos
            ratios = [
                a / b for a, b in zip(times["this"][first], times["baseline"][first], strict=True)
            ]
            what = "every job reported since the last scrape" if changed else "no job changed"
            print(f"  A/B, daemon scrape, {what} (CPU, median of {repeat}):")
            print(
                f"    views():            {statistics.median(times['views'][first]) * 1e3:8.2f} ms"
            )
            for name in ("this", "baseline"):
                print(
                    f"    render, {name + ':':12s}{statistics.median(times[name][first]) * 1e3:8.2f} ms"
                )
            print(f"    ratio this/baseline: {statistics.median(ratios):.3f}")


def split_scrapes(n_jobs: int, repeat: int) -> dict[str, float]:
    """Medians of ``views()`` and of the render of the daemon's scrape, in CPU time of the
    thread with the caches evicted before each scrape, every job changed since the last
    scrape (one record each) and none changed."""
    out: dict[str, float] = {}
    with daemon_registry(n_jobs) as (registry, report):
        current: list[list[JobView]] = []
        renderer = MetricsRenderer(LrpilotCollector(lambda: current[0], DaemonStatsView), 0.0)
        current[:] = [registry.views()]
        renderer.render()
        for what in ("changed", "unchanged"):
            views, render = [], []
            for n in range(repeat):
                if what == "changed":
                    report(n + 2)
                _evict_caches()
                start = time.thread_time()
                current[:] = [registry.views()]
                middle = time.thread_time()
                renderer.render()
                views.append(middle - start)
                render.append(time.thread_time() - middle)
            out[f"{what}_views"] = statistics.median(views)
            out[f"{what}_render"] = statistics.median(render)
            out[f"{what}_total"] = statistics.median(map(sum, zip(views, render, strict=True)))
    return out


def ab_split_scrapes(n_jobs: int, repeat: int, rounds: int, baseline: Path | None) -> None:
    """:func:`split_scrapes` in a process on this checkout's code, and on ``baseline``'s in
    turn (which goes first alternates by round); prints each run and the median ratios."""
    import json
    import subprocess

    sides = [("this", CODE)] + ([("baseline", baseline.resolve())] if baseline else [])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
    for r in range(rounds):
        for name, code in sides if r % 2 == 0 else sides[::-1]:
            command = [sys.executable, __file__, "--split-json", "--code", str(code)]
            command += ["--jobs", str(n_jobs), "--repeat", str(repeat)]
            got = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
            runs[name].append(got)
            print(f"  round {r + 1}, {name:8s}" + "".join(
                f"  {key} {value * 1e3:.2f}" for key, value in got.items()
            ) + " ms", flush=True)  # fmt: skip
    print(f"jobs={n_jobs}, CPU ms, medians of {rounds} rounds (each a median of {repeat}):")
    for key in runs["this"][0]:
        line = f"  {key:18s}" + "".join(
            f"  {name} {statistics.median(x[key] for x in runs[name]) * 1e3:6.2f}"
            for name, _ in sides
        )
        if baseline:
            ratios = [a[key] / b[key] for a, b in zip(runs["this"], runs["baseline"], strict=True)]
            line += f"  ratio {statistics.median(ratios):.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="only the daemon scrape, rendered by this exporter and DIR's (another checkout)",
    )
    parser.add_argument(
        "--daemon-scrape",
        action="store_true",
        help="only the daemon's scrape, views() and render apart; with --baseline, A/B",
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of --daemon-scrape A/B")
    parser.add_argument("--code", type=Path, metavar="DIR", help="measure DIR's code")
    parser.add_argument("--split-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.split_json:
        import json

        print(json.dumps(split_scrapes(args.jobs, args.repeat)))
        return
    if args.daemon_scrape:
        ab_split_scrapes(args.jobs, args.repeat, args.rounds, args.baseline)
        return
    if args.baseline is not None:
        print(f"jobs={args.jobs} repeat={args.repeat}, against {args.baseline}")
        ab_scrapes(args.jobs, args.repeat, args.baseline)
        return

    views = make_views(args.jobs)

    def fresh_views() -> list[JobView]:
        # The daemon builds its views at scrape time; rebuild them so that cost is counted.
        return make_views(args.jobs)

    collector = LrpilotCollector(fresh_views, lambda: DaemonStatsView())
    renderer = MetricsRenderer(collector, cache_seconds=0.0)
    ours, ours_size = median_seconds(renderer.render, args.repeat)
    cold, _ = median_seconds(lambda: render_text(collector).encode(), args.repeat)
    prebuilt = LrpilotCollector(lambda: views, lambda: DaemonStatsView())
    warm_renderer = MetricsRenderer(prebuilt, cache_seconds=0.0)
    warm_only, _ = median_seconds(warm_renderer.render, args.repeat)
    # two sets of views whose numbers differ, handed out in turn: every job changed
    moved = [views, make_views(args.jobs, tick=1)]
    moving = LrpilotCollector(lambda: moved[0], lambda: DaemonStatsView())
    moving_renderer = MetricsRenderer(moving, cache_seconds=0.0)

    def render_moved() -> bytes:
        moved.reverse()
        return moving_renderer.render()

    all_changed, _ = median_seconds(render_moved, args.repeat)
    # the same, each job keeping its steady token (the daemon's views when nothing but the
    # numbers moved): the renderer compares nothing else
    tokens = [object() for _ in range(args.jobs)]
    steady_moved = [make_views(args.jobs, 0, tokens), make_views(args.jobs, 1, tokens)]
    steady_renderer = MetricsRenderer(
        LrpilotCollector(lambda: steady_moved[0], lambda: DaemonStatsView()), cache_seconds=0.0
    )

    def render_steady_moved() -> bytes:
        steady_moved.reverse()
        return steady_renderer.render()

    all_changed_steady, _ = median_seconds(render_steady_moved, args.repeat)

    on_collector = CollectorRegistry()
    on_collector.register(LrpilotCollector(lambda: views, lambda: DaemonStatsView()))
    via_client, _ = median_seconds(lambda: generate_latest(on_collector), args.repeat)

    gauges = gauge_registry(views)
    plain, plain_size = median_seconds(lambda: generate_latest(gauges), args.repeat)

    views_time, _ = median_seconds(fresh_views, args.repeat)
    daemon_idle, daemon_changed, daemon_size = registry_scrapes(args.jobs, args.repeat)
    n_series = sum(1 for line in renderer.render().decode().splitlines() if line[:1] != "#")
    print(f"jobs={args.jobs} series={n_series} repeat={args.repeat} (median)")
    print(f"  building the views alone:                     {views_time * 1e3:8.2f} ms")
    print(
        f"  MetricsRenderer.render (incl. building views): {ours * 1e3:8.2f} ms  {ours_size} bytes"
    )
    print(f"  MetricsRenderer.render (views prebuilt):       {warm_only * 1e3:8.2f} ms")
    print(f"  ... every job's numbers changed (prebuilt):    {all_changed * 1e3:8.2f} ms")
    print(f"  ... the same, each job's steady token kept:    {all_changed_steady * 1e3:8.2f} ms")
    print(f"  render_text, empty memo (incl. views):        {cold * 1e3:8.2f} ms")
    print(f"  generate_latest(LrpilotCollector):             {via_client * 1e3:8.2f} ms")
    print(
        f"  generate_latest(plain Gauges/Counters):        {plain * 1e3:8.2f} ms  {plain_size} bytes"
    )
    print(
        f"  daemon scrape, views() + render, CPU time:     {daemon_idle * 1e3:8.2f} ms  {daemon_size} bytes"
    )
    print(f"  ... every job reported since the last scrape:  {daemon_changed * 1e3:8.2f} ms")
    print(f"  ratio plain gauges / ours (steady state): {plain / ours:.1f}x")
    print(f"  ratio plain gauges / ours (empty memo):   {plain / cold:.1f}x")


if __name__ == "__main__":
    main()
