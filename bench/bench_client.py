"""What lrpilot costs the training thread.

1. ``Client.report()`` median ns per call, next to TensorBoard's ``SummaryWriter.add_scalar``
   in the same process.
2. The wall time of a small torch MLP training step on CPU (about 1 ms) without lrpilot, with
   a client whose daemon is absent (the fail-open path) and with a client streaming to a local
   websockets sink server; each step reports the loss and asks lrpilot for the LR. As A/B
   pairs of short segments, the median of the per-pair ratios.
3. What lrpilot costs in CPU time per training step, from the threads' own CPU clocks,
   which a busy machine does not distort the way it distorts wall time: the training
   thread's time inside ``LRPilot.step`` (median wall time over the steps) plus the CPU time of
   lrpilot's background threads (the sender, lrpilot's receiver, and the websockets
   connection's reader and keepalive threads) divided by the steps, with the model of the
   A/B pairs. The background figure is mostly a fixed cost per wake-up of the sender (see
   ``Client``), so per step it is about that cost times step time / flush_interval, plus a
   cost per point. Both hold the GIL while they run, so their sum bounds what lrpilot can
   take from the training thread when every other thread waits for the GIL. Given several
   ``--flush-interval`` values, segments of each alternate in one run (medians over them).
   The time of the loss's ``.item()`` is shown apart (it is inside the LRPilot.step figure:
   the training loop calls it for lrpilot). With ``--baseline DIR`` (another checkout's
   ``clients/lrpilot``), that client and this one run in one loop instead, step by step on
   two copies of the model (``bench_cpu_interleaved``), and the median of the per-segment
   ratios of their shares is printed: the step time drifts on a busy machine, the ratio
   much less. ``--baseline-loss`` hands the baseline's loop the loss another way than this
   one's (``--loss tensor --baseline-loss item``: what leaving the conversion to lrpilot
   costs against the documented call); each model's own torch step (forward, backward,
   optimizer step; median) is shown too, since what a client does with the loss can slow
   the step itself, which the share does not count.

4. With ``--wake-cost``: the sender's CPU for one wake-up's sending (encoding the frame of the
   points reported since the last one and sending it to a local sink), with the caches as a
   training loop leaves them: each sample reports ``--wake-points`` points, each right after a
   real training step, then evicts the caches and times ``_send_pending`` on the thread's
   CPU clock. With ``--baseline DIR`` (another checkout's ``clients/lrpilot``), the same for
   that client in the same process, the two alternating sample by sample: on a shared, busy
   machine the ratio of each pair is far steadier than runs of part 3 compared across runs.

5. With ``--latency``: how long the daemon's decisions take to reach the training loop, with
   a real daemon (``python -m monitor serve``, its default apply lead of 0.25 s, the plateau
   policy cutting the LR at every flat ``val_loss`` and no detectors) and the same model,
   for each ``--flush-interval`` in alternating segments. Per decision: ``margin``, the
   steps left between its arrival and its ``apply_at_step`` (negative: it applied late),
   and ``reaction``, the time from the ``val_loss`` report that caused it to the step that
   first used it. ``--daemon-root DIR`` runs another checkout's daemon (its ``monitor``).

Run: ``python bench/bench_client.py`` (add ``--quick`` for a short run, ``--cpu-only`` for
part 3 alone, ``--flush-interval 0.02 0.1`` to compare intervals in the same run,
``--cpu-only --baseline /tmp/old/clients/lrpilot`` to compare with another checkout's client,
``--wake-cost [--baseline /tmp/old/clients/lrpilot]`` for part 4 alone, ``--latency
--flush-interval 0.1 0.2`` for part 5 alone). Targets: report()
median <= 3 µs and <= 0.06x add_scalar; step slowdown < 1 %.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: how the training loop hands lrpilot the loss: "item" as the README and the examples do
#: (``loss.item()``, inside the timed call), "tensor" (``loss`` itself: lrpilot calls
#: ``.item()`` on a CPU tensor, so the conversion is inside ``LRPilot.step``), or "detach" (a
#: detached tensor, which lrpilot converts; the figures before 2026-12-02's last round used it)
LOSS_AS = "item"
#: with ``--baseline``: how the baseline client's loop hands it the loss (default: as LOSS_AS)
BASELINE_LOSS_AS: str | None = None
LOSS_SHOWN = {"item": "loss.item()", "tensor": "the tensor loss", "detach": "loss.detach()"}
sys.path.insert(0, str(ROOT / "clients"))

import torch  # noqa: E402
from lrpilot import Client  # noqa: E402
from lrpilot.torch import LRPilot  # noqa: E402


def train_step(model: Any, optimizer: Any, x: Any, y: Any) -> Any:
    """One training step of the benchmark's model on its batch; returns the loss tensor."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def loss_value(loss: Any, how: str | None = None) -> Any:
    """What the training loop passes lrpilot for ``loss``, as ``how`` (default ``LOSS_AS``)
    says."""
    how = how or LOSS_AS
    if how == "item":
        return loss.item()
    return loss if how == "tensor" else loss.detach()


def median_ns(fn: Any, n: int) -> float:
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        samples.append(clock() - t0)
    return statistics.median(samples)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SINK = """
import json, sys
from websockets.sync.server import serve

def handler(ws):
    for text in ws:
        msg = json.loads(text)
        if msg.get("type") == "hello":
            ws.send(json.dumps({"type": "welcome", "protocol": 1, "session": "bench",
                                "job": msg["job"], "lrs": msg["lrs"], "decisions": []}))

with serve(handler, "127.0.0.1", 0, compression=None) as server:
    print(server.socket.getsockname()[1], flush=True)
    server.serve_forever()
"""


def start_sink() -> tuple[str, subprocess.Popen[str]]:
    """A websockets server in its own process (as the daemon would be) that answers hello with
    welcome and swallows everything else."""
    proc = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return f"ws://127.0.0.1:{port}/ws", proc


def bench_report(n: int) -> tuple[float, float]:
    from torch.utils.tensorboard import SummaryWriter

    client = Client(f"ws://127.0.0.1:{closed_port()}/ws", "bench", 0.1, max_buffer=10 * n)
    report_ns = median_ns(lambda i: client.report(i, loss=0.5), n)
    client.close(timeout=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        scalar_ns = median_ns(lambda i: writer.add_scalar("loss", 0.5, i), n)
        writer.close()
    return report_ns, scalar_ns


def make_mlp() -> tuple[Any, Any, Any, Any]:
    """The model, optimizer and batch of the training steps measured (about 0.85 ms a step)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, torch.randn(64, 64), torch.randint(0, 10, (64,))


def bench_steps(steps: int, pairs: int, flush_interval: float) -> dict[str, list[float]]:
    """Per-pair ratios of the step time with lrpilot to the step time without.

    Each pair runs ``steps`` steps without lrpilot and ``steps`` with it, back to back, in
    alternating order (ABBA...), so that the machine's drift (other processes, frequency
    changes) hits both sides of a pair alike; the ratio of a pair is free of what changed
    between pairs. The client of a segment is created before its clock starts and closed
    after it stops: connecting and closing are not part of a training step, and a segment
    without lrpilot has no sender thread at all.
    """
    model, optimizer, x, y = make_mlp()

    def train(pilot: LRPilot | None) -> float:
        t0 = time.perf_counter()
        for step in range(steps):
            loss = train_step(model, optimizer, x, y)
            if pilot is not None:
                pilot.step(step, loss=loss_value(loss))
        return (time.perf_counter() - t0) / steps

    def with_client(url: str, connect: bool) -> float:
        client = Client(
            url,
            "bench",
            0.1,
            initial_momentum=0.9,
            close_timeout=1.0,
            flush_interval=flush_interval,
        )
        if connect:
            client.wait_connected(5)
        try:
            return train(LRPilot(optimizer, client))
        finally:
            client.close()
            optimizer.param_groups[0]["lr"] = 0.1

    sink_url, sink = start_sink()
    absent_url = f"ws://127.0.0.1:{closed_port()}/ws"
    out: dict[str, list[float]] = {"base_us": [], "daemon absent": [], "local sink": []}
    train(None)  # warm up
    with_client(sink_url, True)
    try:
        for i in range(pairs):
            for name, url in (("daemon absent", absent_url), ("local sink", sink_url)):
                if i % 2 == 0:
                    base = train(None)
                    other = with_client(url, name == "local sink")
                else:
                    other = with_client(url, name == "local sink")
                    base = train(None)
                out[name].append(other / base)
                out["base_us"].append(base * 1e6)
    finally:
        sink.terminate()
        sink.wait(5)
    return out


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds the thread has used so far (0 once it has exited)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    except (OSError, ProcessLookupError):
        return 0.0


def bench_cpu(steps: int, flush_interval: float) -> dict[str, float]:
    """Per step: µs of LRPilot.step on the training thread, µs of lrpilot's background threads.

    The same model as the A/B pairs: the background threads' CPU per step is their CPU per
    wake-up divided by the steps made between two wake-ups, so it depends on the step time.
    """
    model, optimizer, x, y = make_mlp()
    sink_url, sink = start_sink()
    try:
        return cpu_segment(model, optimizer, x, y, sink_url, steps, flush_interval)
    finally:
        sink.terminate()
        sink.wait(5)


def cpu_segment(
    model: Any, optimizer: Any, x: Any, y: Any, url: str, steps: int, flush_interval: float
) -> dict[str, float]:
    """bench_cpu's figures for one client streaming ``steps`` steps to ``url``."""
    before = set(threading.enumerate())
    client = Client(
        url, "bench", 0.1, initial_momentum=0.9, close_timeout=1.0, flush_interval=flush_interval
    )
    client.wait_connected(5)
    pilot = LRPilot(optimizer, client)
    background = [t for t in threading.enumerate() if t not in before]
    inside: list[int] = []
    items: list[int] = []
    clock = time.perf_counter_ns  # the thread CPU clock costs 4x more to read here
    try:
        cpu0 = sum(thread_cpu(t) for t in background)
        wall0 = time.perf_counter()
        for step in range(steps):
            loss = train_step(model, optimizer, x, y)
            t0 = clock()
            value = loss_value(loss)
            t1 = clock()
            pilot.step(step, loss=value)
            inside.append(clock() - t0)
            items.append(t1 - t0)
        wall = time.perf_counter() - wall0
        cpu = sum(thread_cpu(t) for t in background) - cpu0
        sent = client.stats.sent_points
        frames = client.stats.sent_frames
    finally:
        client.close()
        optimizer.param_groups[0]["lr"] = 0.1
    return {
        "step_us": statistics.median(inside) / 1e3,
        "item_us": statistics.median(items) / 1e3,
        "background_us": cpu / steps * 1e6,
        "threads": float(len(background)),
        "sent": float(sent),
        "frames": float(frames),
        "wall_us": wall / steps * 1e6,
    }


def bench_cpu_alternating(
    segments: int, steps: int, flush_intervals: list[float]
) -> dict[float, dict[str, float]]:
    """bench_cpu for each flush interval, segments of each in turn (the order reversed every
    round), one sink; the median of each figure over an interval's segments."""
    model, optimizer, x, y = make_mlp()
    sink_url, sink = start_sink()
    runs: dict[float, list[dict[str, float]]] = {f: [] for f in flush_intervals}
    try:
        cpu_segment(model, optimizer, x, y, sink_url, steps, flush_intervals[0])  # warm up
        for i in range(segments):
            for f in flush_intervals if i % 2 == 0 else flush_intervals[::-1]:
                runs[f].append(cpu_segment(model, optimizer, x, y, sink_url, steps, f))
    finally:
        sink.terminate()
        sink.wait(5)
    return {
        f: {k: statistics.median(r[k] for r in rs) for k in rs[0]} | {"segments": len(rs)}
        for f, rs in runs.items()
    }


def bench_cpu_interleaved(
    segments: int, steps: int, flush_interval: float, baseline: str
) -> dict[str, dict[str, float]]:
    """Part 3 for this client and the ``baseline`` checkout's, interleaved step by step.

    Two copies of the model, each with its optimizer and its client (both streaming to one
    sink), train in turn: a step of one, then a step of the other, the order swapped at every
    step. Each LRPilot.step then runs right after a torch step of the same size, with the
    caches in the same state, and the machine's drift hits both clients alike, which
    separate segments on a busy host cannot promise. Per segment of ``steps`` steps each:
    the median of each client's LRPilot.step (and of its ``.item()``), each client's
    background CPU (its own threads) per step of the loop, and the step time without lrpilot
    (the wall time per step less the median LRPilot.step costs of the two); figures are the
    medians over the segments, and ``share_ratio`` the median of the per-segment ratios of
    the shares.
    """
    import lrpilot

    packages = {"this": lrpilot, "baseline": load_client_package(baseline)}
    loss_as = {"this": LOSS_AS, "baseline": BASELINE_LOSS_AS or LOSS_AS}
    sink_url, sink = start_sink()
    per_segment: dict[str, list[dict[str, float]]] = {name: [] for name in packages}
    ratios: list[float] = []
    clock = time.perf_counter_ns
    try:
        setups = {}
        for name, package in packages.items():
            model, optimizer, x, y = make_mlp()
            pilot_class = importlib.import_module(package.__name__ + ".torch").LRPilot
            setups[name] = (model, optimizer, x, y, package.Client, pilot_class)
        names = list(packages)
        for segment in range(segments + 1):  # the first one warms up
            clients, pilots, threads = {}, {}, {}
            for name in names:
                model, optimizer, x, y, client_class, pilot_class = setups[name]
                before = set(threading.enumerate())
                client = client_class(
                    sink_url, f"bench-{name}", 0.1, initial_momentum=0.9, close_timeout=1.0,
                    flush_interval=flush_interval,
                )  # fmt: skip
                client.wait_connected(5)
                clients[name] = client
                pilots[name] = pilot_class(optimizer, client)
                threads[name] = [t for t in threading.enumerate() if t not in before]
            inside: dict[str, list[int]] = {name: [] for name in names}
            items: dict[str, list[int]] = {name: [] for name in names}
            torch_steps: dict[str, list[int]] = {name: [] for name in names}
            try:
                cpu0 = {n: sum(thread_cpu(t) for t in threads[n]) for n in names}
                wall0 = time.perf_counter()
                for step in range(steps):
                    for name in names if step % 2 == 0 else names[::-1]:
                        model, optimizer, x, y, _, _ = setups[name]
                        t_torch = clock()
                        loss = train_step(model, optimizer, x, y)
                        t0 = clock()
                        value = loss_value(loss, loss_as[name])
                        t1 = clock()
                        pilots[name].step(step, loss=value)
                        inside[name].append(clock() - t0)
                        items[name].append(t1 - t0)
                        torch_steps[name].append(t0 - t_torch)
                wall = (time.perf_counter() - wall0) / (2 * steps) * 1e6
                cpu = {
                    n: sum(thread_cpu(t) for t in threads[n]) - cpu0[n] for n in names
                }  # fmt: skip
                sent = {
                    n: clients[n].stats.sent_points / max(clients[n].stats.sent_frames, 1)
                    for n in names
                }
            finally:
                for name in names:
                    clients[name].close()
                    setups[name][1].param_groups[0]["lr"] = 0.1
            if segment == 0:
                continue
            figures = {
                n: {
                    "step_us": statistics.median(inside[n]) / 1e3,
                    "item_us": statistics.median(items[n]) / 1e3,
                    "torch_us": statistics.median(torch_steps[n]) / 1e3,
                    # per step of the loop: each client's threads run beside both models'
                    # steps, as one client's beside one model's (its frames carry half the
                    # points a loop of one model gives them, so the per-point part is low)
                    "background_us": cpu[n] / (2 * steps) * 1e6,
                    "points_per_frame": sent[n],
                    "threads": float(len(threads[n])),
                }
                for n in names
            }
            base = wall - sum(f["step_us"] for f in figures.values()) / 2
            for n in names:
                f = figures[n]
                f["base_us"] = base
                f["share"] = (f["step_us"] + f["background_us"]) / base
                per_segment[n].append(f)
            ratios.append(figures["this"]["share"] / figures["baseline"]["share"])
    finally:
        sink.terminate()
        sink.wait(5)
    out = {
        n: {k: statistics.median(f[k] for f in fs) for k in fs[0]} for n, fs in per_segment.items()
    }
    q1, med, q3 = quartiles(ratios) if len(ratios) > 1 else (ratios[0],) * 3
    out["this"] |= {"share_ratio": med, "share_ratio_q1": q1, "share_ratio_q3": q3}
    return out


def print_cpu_interleaved(segments: int, steps: int, flush_interval: float, baseline: str) -> None:
    results = bench_cpu_interleaved(segments, steps, flush_interval, baseline)
    print(
        f"lrpilot CPU per training step, this client and {baseline}'s interleaved step by step "
        f"(flush_interval {flush_interval * 1e3:g} ms; medians of {segments} segments of "
        f"{steps} steps each; the loss passed as {LOSS_SHOWN[LOSS_AS]}"
        + (
            f", to the baseline as {LOSS_SHOWN[BASELINE_LOSS_AS]})"
            if BASELINE_LOSS_AS not in (None, LOSS_AS)
            else ")"
        )
    )
    print(
        f"  {'client':>8s} {'LRPilot.step()':>15s} {'of it .item()':>14s} {'background':>11s} "
        f"{'sum':>8s} {'step':>9s} {'share':>7s} {'points/frame':>13s} {'threads':>8s} "
        f"{'torch step':>11s}"
    )
    for name, f in results.items():
        total = f["step_us"] + f["background_us"]
        print(
            f"  {name:>8s} {f['step_us']:12.2f} µs {f['item_us']:11.2f} µs "
            f"{f['background_us']:8.2f} µs {total:5.2f} µs {f['base_us']:6.0f} µs "
            f"{f['share']:7.2%} {f['points_per_frame']:13.1f} {f['threads']:8.0f} "
            f"{f['torch_us']:8.0f} µs"
        )
    f = results["this"]
    print(
        f"  share this/baseline, per segment: median {f['share_ratio']:.3f} "
        f"(q1 {f['share_ratio_q1']:.3f}, q3 {f['share_ratio_q3']:.3f}); target: share < 1 %"
    )


def load_client_package(path: str) -> Any:
    """The lrpilot package in directory ``path`` (another checkout's ``clients/lrpilot``),
    imported as ``lrpilot_baseline`` beside this one (its modules import each other relatively)."""
    init = Path(path) / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "lrpilot_baseline", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None, f"no package at {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench_wake_cost(points: int, samples: int, baseline: str | None) -> dict[str, list[float]]:
    """Part 4: µs of sender thread CPU per wake-up's sending, per sample, for this client (and
    the baseline's, alternating with it)."""
    import lrpilot

    packages = {"this": lrpilot}
    if baseline is not None:
        packages["baseline"] = load_client_package(baseline)
    model, optimizer, x, y = make_mlp()
    sink_url, sink = start_sink()
    clients = {}
    junk = bytearray(16 << 20)  # written over to evict the caches, as the steps between wakes do
    out: dict[str, list[float]] = {name: [] for name in packages}
    try:
        for name, package in packages.items():
            client = package.Client(sink_url, f"wake-{name}", 0.1, start=False)
            client._sender.run_once()  # connect
            assert client._sender.conn is not None, "the sink did not answer"
            clients[name] = client
        step = 0
        names = list(packages)
        for i in range(samples):
            for name in names if i % 2 == 0 else names[::-1]:
                client = clients[name]
                for _ in range(points):
                    loss = train_step(model, optimizer, x, y)
                    client.report(step, loss=loss.item())
                    step += 1
                junk[::64] = bytes(len(junk) // 64)
                t0 = time.thread_time_ns()
                client._sender._send_pending()
                out[name].append((time.thread_time_ns() - t0) / 1e3)
    finally:
        for client in clients.values():
            client.close(timeout=0.5)
        sink.terminate()
        sink.wait(5)
    return out


def print_wake_cost(points: int, samples: int, baseline: str | None) -> None:
    costs = bench_wake_cost(points, samples, baseline)
    print(
        f"sender CPU per wake-up's sending, {points} points reported after real steps, caches "
        f"evicted, median of {samples} samples"
    )
    for name, values in costs.items():
        print(f"  {name:32s} {statistics.median(values):10.1f} µs")
    if baseline is not None:
        ratios = [a / b for a, b in zip(costs["this"], costs["baseline"], strict=True)]
        q1, med, q3 = quartiles(ratios)
        print(f"  {'ratio this/baseline (pairs)':32s} {med:10.3f}    (q1 {q1:.3f}, q3 {q3:.3f})")


#: part 5's daemon: every flat val_loss after the first cuts the LR, nothing else decides
LATENCY_CONFIG = """
server: {host: 127.0.0.1, port: 0}
storage: {flush_interval_seconds: 0.05}
defaults:
  apply_lead_steps: 1
  apply_lead_seconds: 0.25
  policy: {kind: reduce_on_plateau, monitor: val_loss, patience: 0, factor: 0.98, min_lr: 0.0}
  detectors: {non_finite: false, spike: false, divergence: false, oscillation: false,
              overshoot: false, stalled: false, slow_progress: false}
"""


def start_daemon(root: Path, state_dir: str) -> tuple[str, subprocess.Popen[str]]:
    """``python -m monitor serve`` of the checkout at ``root`` with LATENCY_CONFIG."""
    config = Path(state_dir) / "config.yaml"
    config.write_text(LATENCY_CONFIG)
    log = (Path(state_dir) / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--config", str(config), "--state", state_dir],
        cwd=root, stdout=subprocess.PIPE, stderr=log, text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )  # fmt: skip
    log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            host_port = line.split("listening on ", 1)[1].split()[0].split("://", 1)[1]
            return f"ws://{host_port.rstrip('/')}/ws", proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the daemon did not start; see {state_dir}/daemon.log")


def latency_segment(
    url: str, job: str, steps: int, val_every: int, flush_interval: float
) -> list[dict[str, float]]:
    """Part 5 for one job: per decision, its margin (steps) and reaction time (ms)."""
    model, optimizer, x, y = make_mlp()
    client = Client(url, job, 0.1, close_timeout=1.0, flush_interval=flush_interval)
    client.wait_connected(5)
    pilot = LRPilot(optimizer, client)
    applied: dict[int, tuple[int, float]] = {}  # id -> (step that first used it, when)

    def on_applied(decision: Any, at: int) -> None:
        applied.setdefault(decision.id, (at, time.monotonic()))

    client.add_decision_callback(on_applied)
    arrived: dict[int, int] = {}  # id -> the last step run before it was seen received
    vals: list[tuple[int, float]] = []  # (step, when) of each val_loss report
    decisions: dict[int, Any] = {}
    warm = 1500  # the daemon learns the job's pace from its first half second or so
    received = 0
    try:
        for step in range(steps):
            loss = train_step(model, optimizer, x, y)
            pilot.step(step, loss=loss.item())
            if step >= warm and (step - warm) % val_every == 0:
                pilot.report(step, val_loss=1.0)
                vals.append((step, time.monotonic()))
            if client.stats.decisions_received != received:
                received = client.stats.decisions_received
                for d in client.pending_decisions:
                    arrived.setdefault(d.id, step)
                    decisions[d.id] = d
        client.flush(2)
    finally:
        client.close()
    out = []
    for did, d in sorted(decisions.items()):
        if did not in applied or did >= len(vals):
            continue  # not applied before the segment ended
        at, when = applied[did]
        trigger_step, trigger_time = vals[did]  # the first val_loss sets the best: no cut
        # on time if received before pilot.step(apply_at_step - 1) begins, which is after
        # step apply_at_step - 2 (a decision that came during a pilot.step call and applied
        # there was never seen pending: it came after step at - 2)
        out.append(
            {
                "margin": float(d.apply_at_step - 2 - arrived.get(did, at - 2)),
                "late": float(at > d.apply_at_step),
                "reaction_ms": (when - trigger_time) * 1e3,
                "reaction_steps": float(at - trigger_step),
            }
        )
    return out


def print_latency(
    segments: int, steps: int, val_every: int, flush_intervals: list[float], root: Path
) -> None:
    runs: dict[float, list[dict[str, float]]] = {f: [] for f in flush_intervals}
    with tempfile.TemporaryDirectory(prefix="lrpilot-latency-") as state_dir:
        url, proc = start_daemon(root, state_dir)
        try:
            for i in range(segments):
                for f in flush_intervals if i % 2 == 0 else flush_intervals[::-1]:
                    runs[f] += latency_segment(url, f"lat-{i}-{f:g}", steps, val_every, f)
        finally:
            proc.terminate()
            proc.wait(10)
    print(
        f"decisions through a real daemon ({root}), apply lead 0.25 s, {segments} segments of "
        f"{steps} steps per flush_interval, a flat val_loss (a cut) every {val_every} steps"
    )
    print(
        f"  {'flush_interval':>14s} {'decisions':>10s} {'late':>5s} {'margin min':>11s} "
        f"{'margin p50':>11s} {'reaction p50':>13s} {'reaction max':>13s}"
    )
    for f, rs in runs.items():
        if not rs:
            print(f"  {f * 1e3:11g} ms  no decision applied")
            continue
        margins = [r["margin"] for r in rs]
        reactions = [r["reaction_ms"] for r in rs]
        print(
            f"  {f * 1e3:11g} ms {len(rs):10d} {int(sum(r['late'] for r in rs)):5d} "
            f"{min(margins):7.0f} st {statistics.median(margins):7.0f} st "
            f"{statistics.median(reactions):10.0f} ms {max(reactions):10.0f} ms"
        )
    print(
        "  (margin: steps between a decision's arrival and its apply_at_step, < 0 is late; "
        "reaction: from the val_loss report that caused it to the step that used it)"
    )


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and steps")
    parser.add_argument(
        "--pairs", type=int, help="A/B pairs of training segments (default 40, quick 6)"
    )
    parser.add_argument("--steps", type=int, default=300, help="steps per segment (default 300)")
    parser.add_argument(
        "--flush-interval", type=float, nargs="+", default=[Client.DEFAULT_FLUSH_INTERVAL],
        help="the client's flush_interval in seconds (default: the client's default); with "
        "several, the CPU figures of each from alternating segments, the A/B pairs use the first",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-segments",
        type=int,
        help="CPU part: segments per flush interval (default 6, quick 2)",
    )
    parser.add_argument(
        "--cpu-steps", type=int, default=2000, help="CPU part: steps per segment (default 2000)"
    )
    parser.add_argument(
        "--cpu-only", action="store_true", help="only the CPU per step from thread clocks"
    )
    parser.add_argument(
        "--loss", choices=("item", "tensor", "detach"), default="item",
        help="pass the loss as loss.item() (the documented call, default), the loss tensor "
        "itself (lrpilot calls .item() on it) or loss.detach(); parts 2 and 3",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-loss", choices=("item", "tensor", "detach"),
        help="part 3 with --baseline: how the baseline client gets the loss (default: as --loss)",
    )  # fmt: skip
    parser.add_argument(
        "--wake-cost", action="store_true", help="only part 4: the sender's CPU per wake-up"
    )
    parser.add_argument(
        "--wake-points", type=int, default=100, help="part 4: points per wake-up (default 100)"
    )
    parser.add_argument(
        "--wake-samples", type=int, help="part 4: samples per client (default 60, quick 20)"
    )
    parser.add_argument(
        "--latency", action="store_true",
        help="only part 5: decisions' margin and reaction time through a real daemon",
    )  # fmt: skip
    parser.add_argument(
        "--latency-steps", type=int, default=6000, help="part 5: steps per segment (default 6000)"
    )
    parser.add_argument(
        "--daemon-root", metavar="DIR", default=str(ROOT),
        help="part 5: the checkout whose daemon runs (default: this one)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="DIR",
        help="parts 3 (with --cpu-only) and 4: another checkout's clients/lrpilot to compare "
        "with, in the same process, alternating with this one",
    )  # fmt: skip
    args = parser.parse_args()
    global LOSS_AS, BASELINE_LOSS_AS
    LOSS_AS = args.loss
    BASELINE_LOSS_AS = args.baseline_loss
    n = 20_000 if args.quick else 200_000
    pairs = args.pairs or (6 if args.quick else 40)
    segments = args.cpu_segments or (2 if args.quick else 6)
    if args.cpu_only and args.baseline is not None:
        print_cpu_interleaved(segments, args.cpu_steps, args.flush_interval[0], args.baseline)
        return
    if args.cpu_only:
        print_cpu(segments, args.cpu_steps, args.flush_interval, None)
        return
    if args.latency:
        print_latency(
            segments, args.latency_steps, 500, args.flush_interval, Path(args.daemon_root)
        )
        return
    if args.wake_cost:
        samples = args.wake_samples or (20 if args.quick else 60)
        print_wake_cost(args.wake_points, samples, args.baseline)
        return

    report_ns, scalar_ns = bench_report(n)
    print(f"report() vs add_scalar, median over {n} calls")
    print(f"  {'lrpilot Client.report()':32s} {report_ns:10.0f} ns")
    print(f"  {'SummaryWriter.add_scalar()':32s} {scalar_ns:10.0f} ns")
    print(f"  {'ratio report/add_scalar':32s} {report_ns / scalar_ns:10.3f} x   (target <= 0.06)")
    print()
    flush_interval = args.flush_interval[0]
    ratios = bench_steps(args.steps, pairs, flush_interval)
    base = statistics.median(ratios.pop("base_us"))
    print(
        f"MLP training step on CPU ({base:.0f} µs without lrpilot), flush_interval "
        f"{flush_interval * 1e3:g} ms: step time with / without lrpilot over {pairs} "
        f"A/B pairs of {args.steps} steps"
    )
    print(f"  {'':32s} {'q1':>8s} {'median':>8s} {'q3':>8s}")
    for name, values in ratios.items():
        q1, med, q3 = quartiles(values)
        print(f"  {name:32s} {q1 - 1:+8.2%} {med - 1:+8.2%} {q3 - 1:+8.2%}")
    print("  (target: median slowdown < 1 %)")
    print()
    print_cpu(segments, args.cpu_steps, args.flush_interval, base)


def print_cpu(segments: int, steps: int, flush_intervals: list[float], base: float | None) -> None:
    """bench_cpu's figures per flush interval; ``base`` is the step time without lrpilot (µs),
    if measured (else each segment's step time with lrpilot, less LRPilot.step)."""
    results = bench_cpu_alternating(segments, steps, flush_intervals)
    print(
        f"lrpilot CPU per training step, from thread CPU clocks (medians of {segments} "
        f"segments of {steps} steps per flush_interval, alternating; the loss passed as "
        f"{LOSS_SHOWN[LOSS_AS]})"
    )
    print(
        f"  {'flush_interval':>14s} {'LRPilot.step()':>15s} {'of it .item()':>14s} "
        f"{'background':>11s} {'sum':>8s} {'share':>7s} {'points/frame':>13s} {'threads':>8s}"
    )
    for flush_interval, cpu in results.items():
        step_base = base if base is not None else cpu["wall_us"] - cpu["step_us"]
        total = cpu["step_us"] + cpu["background_us"]
        print(
            f"  {flush_interval * 1e3:11g} ms {cpu['step_us']:12.2f} µs {cpu['item_us']:11.2f} µs "
            f"{cpu['background_us']:8.2f} µs {total:5.2f} µs {total / step_base:7.2%} "
            f"{cpu['sent'] / max(cpu['frames'], 1):13.1f} {cpu['threads']:8.0f}"
        )
    shown = f"{base:.0f} µs" if base is not None else "each segment's, less LRPilot.step"
    print(
        "  (LRPilot.step: median on the training thread, with the loss's conversion, the column "
        "after it (.item() or .detach() in the loop; with the tensor loss, lrpilot's own "
        ".item() is inside LRPilot.step); background: "
        f"lrpilot's other threads' CPU per step; share: of the step without lrpilot, {shown}; "
        "target < 1 %)"
    )


if __name__ == "__main__":
    main()
