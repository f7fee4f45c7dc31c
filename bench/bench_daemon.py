"""Benchmark the daemon against a plain websockets server that only parses frames.

    python bench/bench_daemon.py            # full run (about a minute on 2 cores)
    python bench/bench_daemon.py --quick    # smaller counts, for a smoke test
    python bench/bench_daemon.py --metrics-only   # only the GET /metrics phase (seconds)
    python bench/bench_daemon.py --ingest-only    # only single-point ingest, with CPU per message
    python bench/bench_daemon.py --latency-only   # only decision latency, idle and paced load
    python bench/bench_daemon.py --latency-only --baseline DIR  # ... and another checkout's daemon
    python bench/bench_daemon.py --idle-latency-only [--baseline DIR]  # ... idle only (minutes)
    python bench/bench_daemon.py --loaded-latency-only [--baseline DIR]  # ... paced load only
    python bench/bench_daemon.py --memory-only    # only memory per idle connection, fresh servers
    python bench/bench_daemon.py --memory-only --baseline DIR   # ... and another checkout's daemon
    python bench/bench_daemon.py --memory-breakdown   # where that memory goes (tracemalloc)

Both servers run as separate processes on 127.0.0.1; clients run in their own processes
(multiprocessing) and write pre-built websocket frames to raw sockets, so that client-side
framing and JSON cost does not distort the figures. The reference server does
``json.loads`` per frame, answers a frame carrying ``val_loss`` with a fixed decision and a
``command`` with a fixed result, and nothing else: it is the floor of what any Python
websockets daemon costs on this machine.

Measured, side by side with ratios (lrpilot / reference):

* ingest: single-point metrics messages per second, and points per second in 100-step
  batched frames, with 1 client and with 100 clients;
* decision latency: round trip of a frame that causes a decision (client-side, p50/p99),
  idle, under a paced background load of 30,000 single-point messages/s from 100 clients,
  and saturated (100 clients streaming batched frames as fast as they can: queueing); plus
  the daemon's own frame-in → decision-sent histogram;
* memory per idle connection (RSS growth over 1,000 connections that said hello and sent
  a record, on a fresh server process after 100 warm-up connections);
* GET /metrics time with 1,000 jobs: unchanged since the previous scrape, and all changed
  (each reported a record in between, as 1,000 training jobs do between two scrapes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLATEAU = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}

# --------------------------------------------------------------------------- raw client side


def ws_frame(payload: bytes) -> bytes:
    """One masked text frame; the all-zero mask key keeps the payload as is."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def frame(obj: Any) -> bytes:
    return ws_frame(json.dumps(obj, separators=(",", ":")).encode())


def open_ws(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("handshake refused")
        buf += chunk
    if b" 101 " not in buf.split(b"\r\n", 1)[0]:
        raise ConnectionError(buf.split(b"\r\n", 1)[0].decode())
    return sock


def read_until(sock: socket.socket, marker: bytes, buf: bytes = b"") -> bytes:
    """Read until ``marker`` appears; returns what follows it."""
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            # the tail holds the server's close frame (code and reason), if it sent one
            raise ConnectionError(f"closed by the server; last bytes received: {buf[-120:]!r}")
        buf += chunk
    return buf[buf.index(marker) + len(marker):]


def hello(sock: socket.socket, job: str, lrs: float = 0.1) -> None:
    sock.sendall(frame({"type": "hello", "protocol": 1, "job": job, "run_id": "b", "lrs": [lrs]}))


SYNC = frame({"type": "command", "command": "status"})
RESULT = b'"type":"result"'


def ingest_client(port: int, n_conns: int, first_job: int, frames_per_conn: int,
                  steps_per_frame: int, lrpilot: bool, out: Any) -> None:
    """Open connections, send pre-built metrics frames, wait until the server read them all."""
    socks = [open_ws(port) for _ in range(n_conns)]
    if lrpilot:
        for i, s in enumerate(socks):
            hello(s, f"ingest-{first_job + i}")
            read_until(s, b'"welcome"')
    payloads = []
    step = 0
    for _ in range(frames_per_conn):
        steps = list(range(step, step + steps_per_frame))
        step += steps_per_frame
        payloads.append(frame({"type": "metrics", "steps": steps,
                               "values": {"loss": [1.0 - 1e-7 * s for s in steps]}}))
    blob = b"".join(payloads)
    chunk = 256 * 1024
    t0 = time.monotonic()
    for off in range(0, len(blob), chunk):
        for s in socks:
            s.sendall(blob[off:off + chunk])
    for s in socks:
        s.sendall(SYNC)
    for s in socks:
        read_until(s, RESULT)
    t1 = time.monotonic()
    for s in socks:
        s.close()
    out.put((t0, t1, n_conns * frames_per_conn, n_conns * frames_per_conn * steps_per_frame))


def paced_client(port: int, n_conns: int, first_job: int, rate: float, lrpilot: bool,
                 stop: Any, out: Any) -> None:
    """Single-point metrics frames at ``rate`` messages/s in all, spread over ``n_conns``
    connections, until ``stop`` is set; puts the rate actually sent."""
    socks = [open_ws(port) for _ in range(n_conns)]
    if lrpilot:
        for i, s in enumerate(socks):
            hello(s, f"paced-{first_job + i}")
            read_until(s, b'"welcome"')
    tick = 0.01
    per_tick = rate * tick
    owed = 0.0
    sent = 0
    step = 0
    t0 = time.monotonic()
    next_tick = t0
    while not stop.is_set():
        owed += per_tick
        while owed >= 1.0:
            sock = socks[sent % n_conns]
            if sent % n_conns == 0:
                step += 1
            sock.sendall(frame({"type": "metrics", "steps": [step], "values": {"loss": [1.0]}}))
            sent += 1
            owed -= 1.0
        next_tick += tick
        delay = next_tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - t0
    for s in socks:
        s.sendall(SYNC)
    for s in socks:
        read_until(s, RESULT)
        s.close()
    out.put(sent / elapsed)


def latency_client(port: int, samples: int, lrpilot: bool, out: Any) -> None:
    """Round trips of frames that each cause a decision."""
    rtts: list[float] = []
    job = 0
    sock: socket.socket | None = None
    step = 0
    per_job = 900  # 1e300 halves ~1000 times before the LR floor stops the decisions
    for i in range(samples):
        if i % per_job == 0:
            if sock is not None:
                sock.close()
            sock = open_ws(port)
            hello(sock, f"latency-{os.getpid()}-{job}", lrs=1e300)
            job += 1
            if lrpilot:
                read_until(sock, b'"welcome"')
            sock.sendall(frame({"type": "metrics", "steps": [0], "values": {"val_loss": [1.0]}}))
            if not lrpilot:
                read_until(sock, b'"decision"')
            step = 0
        assert sock is not None
        step += 1
        data = frame({"type": "metrics", "steps": [step], "values": {"val_loss": [1.0]}})
        t0 = time.perf_counter()
        sock.sendall(data)
        read_until(sock, b'"decision"')
        rtts.append(time.perf_counter() - t0)
    if sock is not None:
        sock.close()
    out.put(rtts)


def idle_client(port: int, n: int, lrpilot: bool, conn: Any, prefix: str = "idle") -> None:
    """Hold ``n`` connections that said hello (and sent one record) until told to close."""
    socks = []
    for i in range(n):
        s = open_ws(port)
        hello(s, f"{prefix}-{i}")
        if lrpilot:
            read_until(s, b'"welcome"')
        s.sendall(frame({"type": "metrics", "steps": [1], "values": {"loss": [0.5], "acc": [0.9]}}))
        socks.append(s)
    for s in socks:
        s.sendall(SYNC)
        read_until(s, RESULT)
    conn.send("ready")
    step = 1
    while conn.recv() == "tick":  # every job reports one more record, then "ticked"
        step += 1
        for s in socks:
            s.sendall(frame({"type": "metrics", "steps": [step],
                             "values": {"loss": [0.5 / step], "acc": [0.9]}}))
        for s in socks:
            s.sendall(SYNC)
            read_until(s, RESULT)
        conn.send("ticked")
    for s in socks:
        s.close()


# --------------------------------------------------------------------------- servers


def reference_server() -> None:
    """A websockets server that only parses frames (the baseline)."""
    from websockets.asyncio.server import serve

    decision = json.dumps({"type": "decision", "id": 1, "kind": "set_lr", "apply_at_step": 1,
                           "source": "reference", "reason": "", "lrs": [0.1]},
                          separators=(",", ":"))
    result = json.dumps({"type": "result", "ok": True, "data": {}}, separators=(",", ":"))

    async def handler(ws: Any) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "metrics" and "val_loss" in msg.get("values", {}):
                await ws.send(decision)
            elif kind == "command":
                await ws.send(result)

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=4 * 2**20,
                         ping_interval=None) as srv:
            port = srv.sockets[0].getsockname()[1]
            print(f"listening on ws://127.0.0.1:{port}", flush=True)
            await asyncio.Future()

    asyncio.run(main())


#: runs ``python -m monitor ARGS`` with tracemalloc on; each SIGUSR1 writes a snapshot of
#: the traced allocations to the file named by $BENCH_TRACEMALLOC_DUMP (a diagnostic only:
#: tracing slows every allocation)
TRACED_DAEMON = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))
def dump(signum, frame):
    path = os.environ["BENCH_TRACEMALLOC_DUMP"]
    tracemalloc.take_snapshot().dump(path + ".tmp")
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["monitor", *sys.argv[1:]]
runpy.run_module("monitor", run_name="__main__", alter_sys=True)
"""


class Server:
    def __init__(self, kind: str, workdir: Path, root: Path = ROOT,
                 traced: Path | None = None) -> None:
        """Start ``kind`` ("lrpilot" or "reference"); ``root`` is the checkout whose daemon
        runs (another one for an A/B comparison in the same run). ``traced``: run the daemon
        with tracemalloc on; :meth:`traced_snapshot` then reads its allocations."""
        self.kind = kind
        self.traced = traced
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "clients")])
        if traced is not None:
            env["BENCH_TRACEMALLOC_DUMP"] = str(traced)
        if kind == "lrpilot":
            config = workdir / "bench-config.yaml"
            config.write_text(json.dumps({
                # the raw clients never answer pings: keepalive would close a connection
                # that lives over 2 x 20 s (a slow run on a busy machine), so it is off on
                # both servers
                "server": {"host": "127.0.0.1", "port": 0, "max_frame_bytes": 4 * 2**20,
                           "ping_interval_seconds": 86400},
                "storage": {"state_dir": str(workdir / "state")},
                "limits": {"max_jobs": 5000, "max_messages_per_second": 1e9},
                "exporter": {"cache_seconds": 0},
                "defaults": {"policy": PLATEAU},
            }))
            args = ["serve", "--config", str(config)]
            if traced is not None:
                cmd = [sys.executable, "-c", TRACED_DAEMON, *args]
            else:
                cmd = [sys.executable, "-m", "monitor", *args]
        else:
            cmd = [sys.executable, __file__, "--reference-server"]
        # the server's log goes to a file: a pipe nobody reads would stall it, and when a
        # measurement fails the log says why (printed by ``log_tail``)
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env, cwd=root)
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            m = re.search(r"listening on ws://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
            if not line:
                raise RuntimeError(f"{kind} server did not start")

    def rss_bytes(self) -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]

    def traced_snapshot(self) -> Any:
        """The daemon's traced allocations now (a ``tracemalloc.Snapshot``)."""
        import tracemalloc

        assert self.traced is not None
        self.traced.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not self.traced.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the traced daemon wrote no snapshot")
            time.sleep(0.1)
        return tracemalloc.Snapshot.load(str(self.traced))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


# --------------------------------------------------------------------------- measurements


def run_ingest(port: int, lrpilot: bool, clients: int, frames: int, steps: int,
               first_job: int) -> tuple[float, float]:
    """(frames/s, points/s) with ``clients`` connections spread over two processes."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs_n = 1 if clients == 1 else 2
    per_proc = clients // procs_n
    procs = [
        ctx.Process(target=ingest_client,
                    args=(port, per_proc, first_job + p * per_proc, frames // clients, steps,
                          lrpilot, out))
        for p in range(procs_n)
    ]
    for p in procs:
        p.start()
    results = collect(out, procs, len(procs))
    for p in procs:
        p.join()
    t0 = min(r[0] for r in results)
    t1 = max(r[1] for r in results)
    return sum(r[2] for r in results) / (t1 - t0), sum(r[3] for r in results) / (t1 - t0)


def collect(out: Any, procs: list[Any], n: int, timeout: float = 600.0) -> list[Any]:
    """``n`` results from ``out``; raises as soon as a client process died without one
    (instead of waiting out the timeout)."""
    results: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(results) < n:
        try:
            results.append(out.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n - len(results)} client(s) gave no result in {timeout:.0f} s")
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"client process exited with code {dead[0].exitcode}")
    return results


PACED_RATE = 30_000.0  # background single-point messages/s for "under load"


def run_latency(port: int, lrpilot: bool, samples: int, background: str = "") -> tuple[float, float, float]:
    """(p50, p99, background msgs/s actually sent) of decision round trips.

    ``background``: "" idle; "paced": 100 connections sending PACED_RATE single-point
    messages/s in all; "saturating": 100 connections streaming batched frames as fast as
    they can (the daemon's queue grows: this shows queueing, not service time)."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    bg: list[Any] = []
    bg_out = ctx.Queue()
    stop = ctx.Event()
    if background == "saturating":
        for p in range(2):
            bg.append(ctx.Process(target=ingest_client,
                                  args=(port, 50, 100_000 + p * 50, 400, 100, lrpilot, bg_out)))
    elif background == "paced":
        for p in range(2):
            bg.append(ctx.Process(target=paced_client,
                                  args=(port, 50, 200_000 + p * 50, PACED_RATE / 2, lrpilot,
                                        stop, bg_out)))
    for p in bg:
        p.start()
    if bg:
        time.sleep(1.0)
    proc = ctx.Process(target=latency_client, args=(port, samples, lrpilot, out))
    proc.start()
    try:
        rtts = collect(out, [proc, *bg], 1)[0]
    finally:
        stop.set()
    proc.join()
    rates = collect(bg_out, bg, len(bg))
    for p in bg:
        p.join()
    rtts.sort()
    rate = sum(rates) if background == "paced" else float("nan")
    return statistics.median(rtts), rtts[int(len(rtts) * 0.99) - 1], rate


def expect(conn: Any, proc: Any, want: str, timeout: float = 300.0) -> None:
    """Wait for the client process's next message, which must be ``want``. Fails instead of
    hanging when the process died (say, the daemon refused its connections) or said nothing
    for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.5):
        if not proc.is_alive():
            raise RuntimeError(
                f"the client process exited (code {proc.exitcode}) before sending {want!r}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"no {want!r} from the client process within {timeout:.0f} s")
    got = conn.recv()
    if got != want:
        raise RuntimeError(f"the client process sent {got!r}, expected {want!r}")


def run_idle_memory(server: Server, lrpilot: bool, n: int) -> float:
    """RSS growth per connection over ``n`` idle connections on ``server`` as it is, and
    (lrpilot) the /metrics timings with them in ``run_idle_memory.metrics``. After other
    phases on the same server the growth flatters: see :func:`fresh_idle_memory`."""
    ctx = mp.get_context("fork")
    before = server.rss_bytes()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=idle_client, args=(server.port, n, lrpilot, child))
    proc.start()
    expect(parent, proc, "ready")
    time.sleep(0.3)
    after = server.rss_bytes()
    nan = float("nan")
    run_idle_memory.metrics = {  # type: ignore[attr-defined]
        "wall": nan, "changed_wall": nan, "cpu": nan, "changed_cpu": nan}
    if lrpilot:
        run_idle_memory.metrics = time_scrapes(server, parent, proc, n)  # type: ignore[attr-defined]
    parent.send("close")
    proc.join()
    return (after - before) / n


#: connections opened on a fresh server before its memory is first read: they pay for what
#: the first connections and jobs cost once (lazy imports, caches, the allocator's arenas)
MEMORY_WARMUP = 100

#: seconds to let a server settle before reading its memory: more than the daemon's periodic
#: tick (1 s), so that the new jobs' snapshots were taken and written
MEMORY_SETTLE = 2.5


class IdleClients:
    """A client process holding ``n`` idle connections (see :func:`idle_client`)."""

    def __init__(self, server: Server, n: int, prefix: str) -> None:
        ctx = mp.get_context("fork")
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=idle_client,
                                args=(server.port, n, server.kind == "lrpilot", child, prefix))
        self.proc.start()
        expect(self.parent, self.proc, "ready")

    def close(self) -> None:
        self.parent.send("close")
        self.proc.join()


def fresh_idle_memory(kind: str, workdir: Path, n: int, root: Path = ROOT,
                      traced: Path | None = None) -> dict[str, Any]:
    """Memory per idle connection, on a server process started for this alone.

    The server first takes :data:`MEMORY_WARMUP` idle connections, then ``n`` more; the
    figure is the RSS growth over the ``n`` divided by ``n``. A server that ran other phases
    before would reuse the heap they freed and look cheaper than it is; the warm-up keeps
    one-time costs out of the slope. Returns ``per_conn`` (bytes), ``start`` and ``base``
    (RSS fresh and after the warm-up) and, with ``traced``, the tracemalloc snapshots taken
    after the warm-up and at the end (``snapshots``)."""
    server = Server(kind, workdir, root, traced=traced)
    held: list[IdleClients] = []
    try:
        start = server.rss_bytes()
        held.append(IdleClients(server, MEMORY_WARMUP, "warm"))
        time.sleep(MEMORY_SETTLE)
        base = server.rss_bytes()
        snaps = [server.traced_snapshot()] if traced is not None else []
        held.append(IdleClients(server, n, "idle"))
        time.sleep(MEMORY_SETTLE)
        end = server.rss_bytes()
        if traced is not None:
            snaps.append(server.traced_snapshot())
        for clients in held:
            clients.close()
    except Exception:
        print(f"{kind} memory measurement failed (server exit status {server.proc.poll()}); "
              f"the server's log ends with:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
    return {"per_conn": (end - base) / n, "start": start, "base": base, "snapshots": snaps}


def memory_only(rounds: int, n: int, baseline: Path | None) -> int:
    """Memory per idle connection alone: each round starts a fresh daemon, reference and
    (with ``baseline``) daemon of another checkout, one after the other."""
    kinds: list[tuple[str, str, Path]] = [("lrpilot", "lrpilot", ROOT)]
    if baseline is not None:
        kinds.append(("baseline", "lrpilot", baseline.resolve()))
    kinds.append(("reference", "reference", ROOT))
    per_conn: dict[str, list[float]] = {name: [] for name, _, _ in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, kind, root in kinds:
                got = fresh_idle_memory(kind, Path(tmp) / f"{name}-{r}", n, root)
                per_conn[name].append(got["per_conn"])
                print(f"  round {r + 1}: {name} {got['per_conn'] / 1024:.1f} KiB per connection "
                      f"(RSS fresh {got['start'] / 2**20:.1f} MiB, after {MEMORY_WARMUP} "
                      f"connections {got['base'] / 2**20:.1f} MiB)", file=sys.stderr, flush=True)
    ref = statistics.median(per_conn["reference"])
    for name, _, _ in kinds:
        med = statistics.median(per_conn[name])
        runs = ", ".join(f"{x / 1024:.1f}" for x in per_conn[name])
        print(f"{name:<10} {med / 1024:6.1f} KiB per idle connection (runs: {runs}); "
              f"ratio to the reference {med / ref:.2f}")
    print(f"fresh server each run: RSS growth over {n} idle connections (hello and one record "
          f"each) after {MEMORY_WARMUP} warm-up ones; medians of {rounds} rounds")
    return 0


def memory_breakdown(n: int, top: int = 25) -> int:
    """Where a fresh daemon's memory per idle connection goes, by tracemalloc (a diagnostic:
    tracing slows the daemon, and the figures count Python allocations only)."""
    import tracemalloc

    with tempfile.TemporaryDirectory() as tmp:
        got = fresh_idle_memory("lrpilot", Path(tmp) / "lrpilot", n,
                                traced=Path(tmp) / "trace.bin")
    before, after = got["snapshots"]
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(ignore), after.filter_traces(ignore)
    total = sum(d.size_diff for d in after.compare_to(before, "filename"))
    print(f"RSS: {got['per_conn'] / 1024:.1f} KiB per connection (tracing on); traced Python "
          f"allocations: {total / n / 1024:.1f} KiB per connection")
    for key in ("filename", "lineno"):
        print(f"\nby {key}, bytes per connection (count of blocks per connection):")
        for d in after.compare_to(before, key)[:top]:
            where = d.traceback[0]
            name = where.filename
            for prefix in (str(ROOT) + os.sep, os.path.dirname(os.__file__) + os.sep):
                name = name.removeprefix(prefix)
            at = f"{name}:{where.lineno}" if key == "lineno" else name
            print(f"  {d.size_diff / n:9.0f} B  {d.count_diff / n:6.1f}  {at}")
    return 0


def main_thread_cpu_ns(pid: int) -> int:
    """CPU time of a process's main thread (the daemon's event loop), from the scheduler."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def time_scrapes(
    server: Server, parent: Any, proc: Any, n: int, scrapes: int = 10
) -> dict[str, float]:
    """Medians of GET /metrics with ``n`` jobs: wall time at the client, and the CPU time of
    the daemon's event-loop thread over the request (Linux ``/proc/PID/schedstat``), first
    with no job changed since the previous scrape, then with every job changed.

    Before each scrape of changed jobs the daemon gets 1.2 s, a periodic tick, to queue the
    snapshots of the jobs that changed: the CPU figure is then the scrape's alone.
    """
    url = f"http://127.0.0.1:{server.port}/metrics"

    def scrape() -> tuple[float, float, bytes]:
        cpu0 = main_thread_cpu_ns(server.proc.pid)
        t0 = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            body = r.read()
        wall = time.perf_counter() - t0
        return wall, (main_thread_cpu_ns(server.proc.pid) - cpu0) / 1e9, body

    idle = [scrape() for _ in range(scrapes)]
    assert idle[-1][2].count(b"lrpilot_job_step{") >= n
    # the same with every job's values, step and last-seen changed since the last scrape
    # (1,000 jobs that all train: nothing can be reused but the rarely changing lines)
    changed = []
    for _ in range(scrapes):
        parent.send("tick")
        expect(parent, proc, "ticked")
        time.sleep(1.2)
        changed.append(scrape())
    return {
        "wall": statistics.median(x[0] for x in idle),
        "cpu": statistics.median(x[1] for x in idle),
        "changed_wall": statistics.median(x[0] for x in changed),
        "changed_cpu": statistics.median(x[1] for x in changed),
    }


def daemon_histogram(port: int) -> dict[str, Any]:
    """The daemon's own counters (``status`` command)."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws", compression=None) as ws:
        ws.send(json.dumps({"type": "command", "command": "status"}))
        return json.loads(ws.recv(10))["data"]["stats"]


def metrics_only(idle: int) -> int:
    """The /metrics phase alone, against the daemon only (no reference server)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server("lrpilot", Path(tmp) / "lrpilot")
        try:
            run_idle_memory(server, True, idle)
        finally:
            server.stop()
    m = run_idle_memory.metrics  # type: ignore[attr-defined]
    print(f"GET /metrics with {idle} jobs, medians of 10: "
          f"{m['wall'] * 1e3:.1f} ms, daemon loop CPU {m['cpu'] * 1e3:.1f} ms")
    print(f"GET /metrics, all {idle} jobs changed, medians of 10: "
          f"{m['changed_wall'] * 1e3:.1f} ms, daemon loop CPU {m['changed_cpu'] * 1e3:.1f} ms")
    return 0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a whole process (all its threads), from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ingest_only(rounds: int, messages: int) -> int:
    """Single-point ingest alone, both servers: medians over ``rounds`` of messages/s and of the
    server process's CPU time per message. On a shared, busy host the wall-clock rates move
    with the load; the CPU per message, and both ratios to the reference measured in the same
    run, move much less."""
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("lrpilot", "reference"):
            lr = kind == "lrpilot"
            server = Server(kind, Path(tmp) / kind)
            f: dict[str, list[float]] = {"rate_1": [], "cpu_1": [], "rate_100": [], "cpu_100": []}
            try:
                for clients in (1, 100):
                    for r in range(rounds):
                        cpu0 = process_cpu_seconds(server.proc.pid)
                        rate = run_ingest(server.port, lr, clients, messages, 1,
                                          clients * 1000 + r * clients)[0]
                        cpu = process_cpu_seconds(server.proc.pid) - cpu0
                        f[f"rate_{clients}"].append(rate)
                        f[f"cpu_{clients}"].append(cpu / messages)
            finally:
                server.stop()
            figures[kind] = {k: statistics.median(v) for k, v in f.items()}
    a, b = figures["lrpilot"], figures["reference"]
    for clients in (1, 100):
        ra, rb = a[f"rate_{clients}"], b[f"rate_{clients}"]
        ca, cb = a[f"cpu_{clients}"] * 1e6, b[f"cpu_{clients}"] * 1e6
        print(f"single-point, {clients:3d} client(s): lrpilot {ra:8.0f} msg/s {ca:5.1f} µs CPU/msg | "
              f"reference {rb:8.0f} msg/s {cb:5.1f} µs CPU/msg | rate ratio {ra / rb:.2f}, "
              f"CPU ratio {ca / cb:.2f}")
    print(f"medians of {rounds} rounds of {messages} messages; {os.cpu_count()} CPUs")
    return 0


def latency_only(rounds: int, samples: int, baseline: Path | None, idle_only: bool = False,
                 loaded_only: bool = False) -> int:
    """Decision round trips alone, idle and under the paced load, against the daemon, the
    reference and (with ``baseline``) the daemon of another checkout, all running at once:
    each round measures every server in turn, the order rotating from round to round, so
    that a change in the host's load touches all of them alike. Prints the medians over the
    rounds of each round's p50 and p99, and the ratios to the reference.

    ``idle_only``: no paced phase (which can take a quarter of an hour on a busy host).
    ``loaded_only``: the paced phase alone; it also gives the share of a core the server's
    event-loop thread was busy during it (CPU time over wall time, the background clients'
    connections and the latency client's included), which tells how close the load brings
    the loop to saturation."""
    assert not (idle_only and loaded_only)
    kinds: list[tuple[str, str, Path]] = [("lrpilot", "lrpilot", ROOT)]
    if baseline is not None:
        kinds.append(("baseline", "lrpilot", baseline.resolve()))
    kinds.append(("reference", "reference", ROOT))
    figures: dict[str, dict[str, list[float]]] = {
        name: {"idle_p50": [], "idle_p99": [], "load_p50": [], "load_p99": [], "idle_cpu": [],
               "load_busy": [], "load_rate": []}
        for name, _, _ in kinds
    }
    daemon: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: Server(kind, Path(tmp) / name, root) for name, kind, root in kinds}
        try:
            for r in range(rounds):
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
                for name, kind, _ in order:
                    port, lr = servers[name].port, kind == "lrpilot"
                    f = figures[name]
                    pid = servers[name].proc.pid
                    if not loaded_only:
                        cpu0 = main_thread_cpu_ns(pid)
                        p50, p99, _ = run_latency(port, lr, samples)
                        f["idle_cpu"].append((main_thread_cpu_ns(pid) - cpu0) / 1e9 / samples)
                        f["idle_p50"].append(p50)
                        f["idle_p99"].append(p99)
                        print(f"  {name}: idle p50 {p50 * 1e6:.0f} µs", file=sys.stderr, flush=True)
                    if idle_only:
                        continue
                    cpu0, t0 = main_thread_cpu_ns(pid), time.monotonic()
                    p50, p99, rate = run_latency(port, lr, samples, "paced")
                    busy = (main_thread_cpu_ns(pid) - cpu0) / 1e9 / (time.monotonic() - t0)
                    print(f"  {name}: paced p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs, "
                          f"loop busy {busy:.2f}, {rate:.0f} msg/s sent",
                          file=sys.stderr, flush=True)
                    f["load_p50"].append(p50)
                    f["load_p99"].append(p99)
                    f["load_busy"].append(busy)
                    f["load_rate"].append(rate)
                print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            for name, kind, _ in kinds:
                if kind == "lrpilot":
                    stats = daemon_histogram(servers[name].port)
                    daemon[name] = (stats["decision_latency_p50_seconds"] or float("nan"),
                                    stats["decision_latency_p99_seconds"] or float("nan"))
        finally:
            for server in servers.values():
                server.stop()
    ref = {k: statistics.median(v) for k, v in figures["reference"].items() if v}
    cols: tuple[str, ...] = ("idle_p50", "idle_p99", "load_p50", "load_p99", "idle_cpu")
    if idle_only:
        cols = ("idle_p50", "idle_p99", "idle_cpu")
    if loaded_only:
        cols = ("load_p50", "load_p99")
    heads = {"idle_p50": "idle p50", "idle_p99": "idle p99", "load_p50": "load p50",
             "load_p99": "load p99", "idle_cpu": "idle CPU"}
    print(f"{'server':<10} " + " ".join(f"{heads[k]:>9}" for k in cols)
          + "   (µs; ratios to the reference)")
    for name, _, _ in kinds:
        med = {k: statistics.median(v) for k, v in figures[name].items() if v}
        cells = " ".join(f"{med[k] * 1e6:9.0f}" for k in cols)
        ratios = " ".join(f"{med[k] / ref[k]:5.2f}" for k in cols)
        print(f"{name:<10} {cells}   {ratios}")
    if not loaded_only:
        print("idle CPU: the server's event-loop thread CPU time per idle round trip (client "
              "connects and hellos included), from /proc/PID/schedstat: steadier than wall "
              "time on a busy host")
    if not idle_only:
        for name, _, _ in kinds:
            f = figures[name]
            print(f"{name}: event-loop thread busy {statistics.median(f['load_busy']):.2f} of a "
                  f"core during the paced phase (median of rounds), background "
                  f"{statistics.median(f['load_rate']):.0f} msg/s sent")
    if baseline is not None:
        # the same round's figures side by side: the host's load moves both alike
        heads["load_busy"] = "loop busy under load"
        for k in (*cols, "load_busy") if not idle_only else cols:
            pairs = sorted(x / y for x, y in zip(figures["lrpilot"][k], figures["baseline"][k], strict=True))
            print(f"lrpilot/baseline {heads[k]}, per round: median {statistics.median(pairs):.2f} "
                  f"(min {pairs[0]:.2f}, max {pairs[-1]:.2f})")
    for name, (p50, p99) in daemon.items():
        print(f"{name}: daemon's own frame-in→decision-sent histogram over all rounds: "
              f"p50 ≤ {p50 * 1e6:.0f} µs, p99 ≤ {p99 * 1e6:.0f} µs")
    print(f"medians of {rounds} rounds of {samples} round trips each; {os.cpu_count()} CPUs")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--metrics-only", action="store_true",
                        help="only the GET /metrics phase (1,000 jobs; lrpilot alone)")
    parser.add_argument("--ingest-only", action="store_true",
                        help="only single-point ingest (1 and 100 clients), with server CPU per message")
    parser.add_argument("--latency-only", action="store_true",
                        help="only decision latency (idle and under paced load), in rounds")
    parser.add_argument("--idle-latency-only", action="store_true",
                        help="only idle decision latency (no paced load), in rounds")
    parser.add_argument("--loaded-latency-only", action="store_true",
                        help="only decision latency under the paced load, in rounds")
    parser.add_argument("--memory-only", action="store_true",
                        help="only memory per idle connection, fresh servers, in rounds")
    parser.add_argument("--memory-breakdown", action="store_true",
                        help="where the daemon's memory per idle connection goes (tracemalloc)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of --latency-only / --idle-latency-only / "
                             "--loaded-latency-only (default 5) or --memory-only (default 3)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                        help="with --latency-only, --idle-latency-only, --loaded-latency-only "
                             "or --memory-only: also measure the daemon of the checkout DIR")
    parser.add_argument("--reference-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_server:
        reference_server()
        return 0
    scale = 0.1 if args.quick else 1.0
    single = int(100_000 * scale)
    batched_frames = int(5_000 * scale)
    lat_samples = int(2_000 * scale)
    idle = int(1_000 * (0.2 if args.quick else 1.0))
    if args.metrics_only:
        return metrics_only(idle)
    if args.latency_only or args.idle_latency_only or args.loaded_latency_only:
        return latency_only(args.rounds or 5, lat_samples, args.baseline,
                            idle_only=args.idle_latency_only,
                            loaded_only=args.loaded_latency_only)
    if args.memory_only:
        return memory_only(args.rounds or 3, idle, args.baseline)
    if args.memory_breakdown:
        return memory_breakdown(idle)
    if args.ingest_only:
        return ingest_only(3, int(60_000 * (0.5 if args.quick else 1.0)))

    rows: list[tuple[str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        figures: dict[str, dict[str, float]] = {}
        for kind in ("lrpilot", "reference"):
            lr = kind == "lrpilot"
            server = Server(kind, Path(tmp) / kind)
            f: dict[str, float] = {}
            print(f"measuring {kind}...", file=sys.stderr, flush=True)
            try:
                f["single_1"] = run_ingest(server.port, lr, 1, single, 1, 0)[0]
                f["batched_1"] = run_ingest(server.port, lr, 1, batched_frames, 100, 10)[1]
                f["single_100"] = run_ingest(server.port, lr, 100, single, 1, 20)[0]
                f["batched_100"] = run_ingest(server.port, lr, 100, batched_frames, 100, 200)[1]
                f["lat_idle_p50"], f["lat_idle_p99"], _ = run_latency(server.port, lr, lat_samples)
                f["lat_load_p50"], f["lat_load_p99"], f["paced_rate"] = run_latency(
                    server.port, lr, lat_samples, "paced")
                f["lat_sat_p50"], f["lat_sat_p99"], _ = run_latency(
                    server.port, lr, lat_samples, "saturating")
                if lr:
                    run_idle_memory(server, lr, idle)
                    m = run_idle_memory.metrics  # type: ignore[attr-defined]
                    f["metrics_1000"], f["metrics_changed"] = m["wall"], m["changed_wall"]
                    f["metrics_cpu"], f["metrics_changed_cpu"] = m["cpu"], m["changed_cpu"]
                    stats = daemon_histogram(server.port)
                    f["srv_p50"] = stats["decision_latency_p50_seconds"] or float("nan")
                    f["srv_p99"] = stats["decision_latency_p99_seconds"] or float("nan")
            except Exception:
                print(f"{kind} measurement failed (server exit status {server.proc.poll()}); "
                      "the server's log ends with:\n"
                      f"{server.log_tail()}", file=sys.stderr)
                raise
            finally:
                server.stop()
            # on a server of its own: the one above would reuse the heap its phases freed
            f["mem_idle"] = fresh_idle_memory(kind, Path(tmp) / f"{kind}-memory", idle)["per_conn"]
            figures[kind] = f
    a, b = figures["lrpilot"], figures["reference"]
    rows = [
        ("single-point msgs/s, 1 client", a["single_1"], b["single_1"], "msg/s"),
        ("points/s batched (100/frame), 1 client", a["batched_1"], b["batched_1"], "pt/s"),
        ("single-point msgs/s, 100 clients", a["single_100"], b["single_100"], "msg/s"),
        ("points/s batched, 100 clients", a["batched_100"], b["batched_100"], "pt/s"),
        ("decision RTT p50 idle", a["lat_idle_p50"] * 1e6, b["lat_idle_p50"] * 1e6, "µs"),
        ("decision RTT p99 idle", a["lat_idle_p99"] * 1e6, b["lat_idle_p99"] * 1e6, "µs"),
        ("background load sent (paced)", a["paced_rate"], b["paced_rate"], "msg/s"),
        ("decision RTT p50 under paced load", a["lat_load_p50"] * 1e6, b["lat_load_p50"] * 1e6, "µs"),
        ("decision RTT p99 under paced load", a["lat_load_p99"] * 1e6, b["lat_load_p99"] * 1e6, "µs"),
        ("decision RTT p50 saturated", a["lat_sat_p50"] * 1e6, b["lat_sat_p50"] * 1e6, "µs"),
        ("decision RTT p99 saturated", a["lat_sat_p99"] * 1e6, b["lat_sat_p99"] * 1e6, "µs"),
        ("memory per idle connection (fresh server)", a["mem_idle"] / 1024, b["mem_idle"] / 1024, "KiB"),
        (f"GET /metrics with {idle} jobs", a["metrics_1000"] * 1e3, float("nan"), "ms"),
        (f"GET /metrics, all {idle} jobs changed", a["metrics_changed"] * 1e3, float("nan"), "ms"),
        (f"  daemon loop CPU, /metrics with {idle} jobs", a["metrics_cpu"] * 1e3, float("nan"), "ms"),
        ("  daemon loop CPU, /metrics all changed", a["metrics_changed_cpu"] * 1e3, float("nan"), "ms"),
        ("daemon frame-in→decision-sent p50 (bucket ≤)", a["srv_p50"] * 1e6, float("nan"), "µs"),
        ("daemon frame-in→decision-sent p99 (bucket ≤)", a["srv_p99"] * 1e6, float("nan"), "µs"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'lrpilot':>12}  {'reference':>12}  {'ratio':>6}  unit")
    for name, x, y, unit in rows:
        ratio = f"{x / y:6.2f}" if y == y and y else "     -"
        ys = f"{y:12.1f}" if y == y else f"{'-':>12}"
        print(f"{name.ljust(width)}  {x:12.1f}  {ys}  {ratio}  {unit}")
    print(f"\n{os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
          f"{'quick' if args.quick else 'full'} run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
