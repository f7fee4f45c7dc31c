"""The daemon process: a websockets server plus a few HTTP routes on the same port.

    ws://HOST:PORT/ws          job and operator connections (see ``lrpilot._protocol``)
    GET /healthz               200 while the process runs
    GET /readyz                200 once the state is loaded and the port is open, else 503
    GET /metrics               Prometheus text exposition (``monitor.exporter``)
    GET /api/jobs              JSON list of job summaries
    GET /api/jobs/NAME         JSON detail of one job

:class:`Daemon` wires the parts together — store, registry, sessions, auth, reload, exporter —
and :func:`serve_main` runs it until SIGTERM/SIGINT: stop accepting, close every connection
with 1001, flush state, exit 0. Tests start a :class:`Daemon` in-process on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import http
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from lrpilot._protocol import ErrorMsg, encode
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import __version__
from ..config import Config, ConfigError, find_default_config, load_config
from .auth import Authenticator, Principal, is_loopback
from .connection import JobConnection, Keepalive
from .daemon_stats import DaemonStats
from .jobs import JobRegistry
from .limits import Limits
from .reload import ConfigWatcher, Reloader
from .sessions import Hub, Session
from .store import Store, dumps

#: dirty jobs snapshotted per event-loop turn by the periodic maintenance: a snapshot costs
#: 0.1-0.5 ms (the engine's state as JSON), and while they are taken no frame is read, so a
#: few at a time keep a decision under load from waiting behind a whole batch of them
SNAPSHOTS_PER_SLICE = 4

log = logging.getLogger("lrpilot.daemon")

WS_PATHS = frozenset({"/ws", "/ws/"})
SERVER_HEADER = f"lrpilot/{__version__}"


class Daemon:
    """One running daemon. ``await start()``, then ``await stop()``.

    ``clock`` (default: the event loop's) drives stale detection and rate limits, so tests can
    move time by hand; ``tick_seconds`` is how often stale checks and snapshots run.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Callable[[], float] | None = None,
        tick_seconds: float | None = None,
        watch_config: bool = True,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self._clock = clock
        self.tick_seconds = tick_seconds
        self.watch_config = watch_config
        self.stats = DaemonStats()
        self.started_at = time.time()
        self.ready = False
        self.port = 0
        self.host = config.server.host
        self.server: Server | None = None
        self.store: Store | None = None
        self.registry: JobRegistry | None = None
        self.auth = Authenticator.from_config(config)
        self.reloader: Reloader | None = None
        self._watcher: ConfigWatcher | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._renderer: Any = None
        self.file_watcher: Any = None  # monitor.watch.Watcher, when watch.dirs is set

    @property
    def url(self) -> str:
        """The websocket URL clients connect to."""
        scheme = "wss" if self.config.server.tls_cert else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/ws"

    @property
    def state_path(self) -> Path:
        return Path(self.config.storage.state_dir) / "lrpilot.sqlite3"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        cfg = self.config
        stats = self.stats

        def flushed(_n: int) -> None:
            stats.store_flushes += 1

        def failed(_exc: BaseException) -> None:
            stats.store_errors += 1

        self.store = Store(
            Path(cfg.storage.state_dir),
            cfg.storage.flush_interval_seconds,
            on_flush=flushed,
            on_error=failed,
        )
        self.registry = JobRegistry(cfg, self.store, stats, clock)
        loaded = self.registry.load()
        if loaded:
            log.info("restored %d job(s) from %s", loaded, self.store.path)
        self.store.start()
        if cfg.tensorboard.enabled:
            from ..tboutput import TensorBoardOutput

            self.registry.tensorboard = TensorBoardOutput(Path(cfg.tensorboard.log_dir))
            log.info("writing TensorBoard output under %s", cfg.tensorboard.log_dir)
        if cfg.watch.dirs:
            from ..watch import Watcher

            self.file_watcher = Watcher(cfg)
            self.file_watcher.start()
            log.info("watching %s for runs that write logs", ", ".join(map(str, cfg.watch.dirs)))
        self._hub = Hub(self.registry, stats, self.status, clock)
        self._renderer = self._make_renderer()
        if not self.auth.enabled:
            log.warning(
                "no auth token configured: accepting connections from loopback peers only"
            )
        ssl_ctx = None
        if cfg.server.tls_cert is not None and cfg.server.tls_key is not None:
            ssl_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_ctx.load_cert_chain(str(cfg.server.tls_cert), str(cfg.server.tls_key))
        self.server = await serve(
            self._handle,
            cfg.server.host,
            cfg.server.port,
            compression=None,
            max_size=Limits.from_config(cfg).hard_frame_bytes,
            create_connection=JobConnection,
            process_request=self._process_request,
            ping_interval=None,  # one Keepalive for all connections, not a task each
            server_header=SERVER_HEADER,
            ssl=ssl_ctx,
        )
        sock = self.server.sockets[0]
        self.host = str(sock.getsockname()[0]) if cfg.server.host in ("", None) else cfg.server.host
        self.port = int(sock.getsockname()[1])
        tick = self.tick_seconds or max(0.05, min(1.0, cfg.server.stale_after_seconds / 4))
        self._ticker = loop.create_task(self._tick_forever(tick))
        server = self.server
        keepalive = Keepalive(
            lambda: server.connections,
            cfg.server.ping_interval_seconds,
            cfg.server.ping_interval_seconds,
        )
        self._keepalive = loop.create_task(keepalive.run())
        if self.config_path is not None:
            self.reloader = Reloader(self.config_path, lambda: self.config, self._apply, stats)
            if self.watch_config:
                self._watcher = ConfigWatcher(self.reloader, loop)
                self._watcher.start()
        self.ready = True

    async def stop(self) -> None:
        """Stop accepting, close connections with 1001, flush state."""
        self.ready = False
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self.server is not None:
            self.server.close(close_connections=True, code=1001, reason="daemon shutting down")
            try:
                await asyncio.wait_for(
                    self.server.wait_closed(), self.config.server.shutdown_grace_seconds + 1
                )
            except asyncio.TimeoutError:
                log.warning("some connections did not close within the grace period")
        for task in (self._ticker, self._keepalive):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._ticker = self._keepalive = None
        if self.file_watcher is not None:
            self.file_watcher.stop()
            self.file_watcher = None
        if self.registry is not None:
            self.registry.snapshot_all()
            if self.registry.tensorboard is not None:
                self.registry.tensorboard.close_all()
        if self.store is not None:
            self.store.close()
            self.store = None

    async def _tick_forever(self, every: float) -> None:
        assert self.registry is not None
        while True:
            await asyncio.sleep(every)
            try:
                self.registry.tick(snapshot_dirty=False)
                if self.server is not None:
                    for conn in self.server.connections:
                        if isinstance(conn, JobConnection):
                            conn.release_idle_inbox()
                # snapshots of the jobs that changed, a few at a time
                while self.registry.snapshot_dirty(SNAPSHOTS_PER_SLICE):
                    await asyncio.sleep(0)
                if self.registry.tensorboard is not None:
                    self.registry.tensorboard.flush()
            except Exception:
                log.exception("periodic job maintenance failed")

    def _apply(self, config: Config) -> None:
        """Swap in a reloaded config."""
        auth = Authenticator.from_config(config)
        self.config = config
        self.auth = auth
        if self.registry is not None:
            self.registry.set_config(config)

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, JobConnection)
        principal: Principal | None = ws.principal
        if principal is None:  # pragma: no cover - process_request always sets it
            await ws.close(1008, "not authenticated")
            return
        session = Session(ws, self._hub, principal)
        stats = self.stats
        stats.connections += 1
        stats.connections_total += 1
        try:
            await session.run()
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:
                stats.reject("frame_too_large")  # over the hard limit: websockets closed it
        except Exception:
            stats.handler_crashes += 1
            job = session.job.name if session.job is not None else None
            log.exception(
                "connection %s from %s (job %r) failed; closing it with 1011",
                session.session_id,
                _peer_host(ws),
                job,
            )
            try:
                await ws.send(
                    encode(ErrorMsg(code="internal", message="internal error in the daemon"))
                )
                await ws.close(1011, "internal error")
            except ConnectionClosed:
                pass
        finally:
            stats.connections -= 1

    # ------------------------------------------------------------------ HTTP

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, _query = request.path.partition("?")
        # health probes answer every peer: a kubelet probes from the node's address, and
        # "alive" / "ready" tell nothing about jobs
        if path == "/healthz":
            return _text(http.HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready:
                return _text(http.HTTPStatus.OK, "ready\n")
            return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        host = _peer_host(connection)
        if path == "/metrics" and self.config.exporter.public:
            return self._metrics()
        if not self.auth.enabled and not is_loopback(host):
            return _text(http.HTTPStatus.FORBIDDEN, "only loopback peers are accepted\n")
        if path in WS_PATHS:
            principal = self.auth.authenticate(request.headers, host)
            if principal is None:
                self.stats.reject("unauthorized")
                return _text(
                    http.HTTPStatus.UNAUTHORIZED,
                    "missing or unknown bearer token (Authorization: Bearer TOKEN)\n",
                )
            assert isinstance(connection, JobConnection)
            connection.principal = principal
            return None
        if path == "/metrics":
            return self._metrics()
        if path == "/api/jobs" or path.startswith("/api/jobs/"):
            if self.auth.enabled and self.auth.authenticate(request.headers, host) is None:
                return _text(http.HTTPStatus.UNAUTHORIZED, "missing or unknown bearer token\n")
            return self._api(path)
        return _text(http.HTTPStatus.NOT_FOUND, f"no route for {path}\n")

    def _metrics(self) -> Response:
        if self._renderer is None:
            return _text(http.HTTPStatus.NOT_FOUND, "the exporter is disabled\n")
        message = self._renderer.render_with_head(self._metrics_head)
        return _Whole(200, "OK", Headers(), message=message)

    def _metrics_head(self, length: int) -> bytes:
        """The status line and headers of a /metrics response whose body is ``length`` bytes
        (with the Server header websockets adds to the responses it serializes itself)."""
        headers = _headers(self._content_type, length)
        headers["Server"] = SERVER_HEADER
        return b"HTTP/1.1 200 OK\r\n" + headers.serialize()

    def _api(self, path: str) -> Response:
        assert self.registry is not None
        if path.rstrip("/") == "/api/jobs":
            body: Any = {"jobs": [j.summary() for j in self.registry.jobs.values()]}
            return _json(http.HTTPStatus.OK, body)
        name = unquote(path[len("/api/jobs/") :])
        job = self.registry.get(name)
        if job is None:
            return _json(http.HTTPStatus.NOT_FOUND, {"error": "unknown_job", "job": name})
        return _json(http.HTTPStatus.OK, {"job": job.detail()})

    # ------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        """What ``lrpilot status`` prints."""
        registry = self.registry
        return {
            "version": __version__,
            "url": self.url,
            "uptime_seconds": time.time() - self.started_at,
            "state_file": str(self.state_path),
            "config_file": str(self.config_path) if self.config_path else None,
            "auth": "tokens" if self.auth.enabled else "loopback only",
            "jobs": registry.counts_by_state() if registry is not None else {},
            "stats": self.stats.as_dict(),
        }

    def _make_renderer(self) -> Any:
        if not self.config.exporter.enabled:
            return None
        from ..exporter import (
            DaemonStatsView,
            HistogramView,
            LrpilotCollector,
            MetricsRenderer,
            expired,
        )

        registry = self.registry
        assert registry is not None
        stats = self.stats

        def jobs() -> list[Any]:
            now = time.time()
            ttl = self.config.exporter.finished_job_ttl_seconds
            views = registry.views()
            # only finished or halted jobs can expire: with none, no view needs a look
            if registry.ended_views:
                views = [v for v in views if not expired(v, now, ttl)]
            if self.file_watcher is not None:
                views += [v for v in self.file_watcher.views() if not expired(v, now, ttl)]
            return views

        def stats_view() -> Any:
            hist = stats.decision_latency
            lag = max((j.ingest_lag for j in registry.jobs.values()), default=0.0)
            return DaemonStatsView(
                connections=stats.connections,
                messages_by_type=dict(stats.messages),
                points=stats.points,
                rejected_by_reason=dict(stats.frames_rejected),
                decision_latency=HistogramView(
                    buckets=tuple(hist.cumulative()), sum=hist.total, count=hist.count
                ),
                ingest_lag_seconds=lag,
                reloads_ok=stats.config_reloads.get("ok", 0),
                reloads_error=stats.config_reloads.get("error", 0),
                jobs_by_state=registry.counts_by_state(),
            )

        renderer = MetricsRenderer(
            LrpilotCollector(jobs, stats_view), cache_seconds=self.config.exporter.cache_seconds
        )
        self._content_type = renderer.content_type
        return renderer

    _content_type = "text/plain; version=0.0.4; charset=utf-8"


def _peer_host(connection: ServerConnection) -> str | None:
    try:
        addr = connection.remote_address
    except Exception:
        return None
    if isinstance(addr, tuple) and addr:
        return str(addr[0])
    return None


@dataclasses.dataclass
class _Whole(Response):
    """A response sent as :attr:`message`, which holds it whole: status line, headers and body,
    built in one buffer (see ``MetricsRenderer.render_with_head``: the /metrics body of 1,000
    jobs is 1.4 MB, and websockets' ``serialize`` copies the body behind the headers, into
    fresh memory, at every scrape). ``headers`` and ``body`` are not sent."""

    message: bytes = b""

    def serialize(self) -> bytes:
        return self.message


def _headers(content_type: str, length: int) -> Headers:
    """The headers of a response of the daemon's HTTP endpoints with a body of ``length``."""
    return Headers(
        [("Content-Type", content_type), ("Content-Length", str(length)), ("Connection", "close")]
    )


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    return Response(status.value, status.phrase, _headers(content_type, len(body)), body)


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


def _json(status: http.HTTPStatus, body: Any) -> Response:
    return _response(status, (dumps(body) + "\n").encode(), "application/json")


# --------------------------------------------------------------------------- entry point


def build_config(args: Any) -> tuple[Config, Path | None]:
    """The config for ``lrpilot serve``: the file (or ./config.yaml), then flag overrides."""
    path = getattr(args, "config", None)
    config_path = Path(path) if path else find_default_config()
    config = load_config(config_path)
    server: dict[str, Any] = {}
    if getattr(args, "host", None):
        server["host"] = args.host
    if getattr(args, "port", None) is not None:
        server["port"] = int(args.port)
    update: dict[str, Any] = {}
    if server:
        update["server"] = config.server.model_copy(update=server)
    if getattr(args, "state", None):
        update["storage"] = config.storage.model_copy(update={"state_dir": Path(args.state)})
    if update:
        config = config.model_copy(update=update)
    return config, config_path


def serve_main(args: Any) -> int:
    """``lrpilot serve``: run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    # websockets logs every connection at INFO; we log what matters ourselves
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config, config_path = build_config(args)
    except ConfigError as exc:
        print(f"lrpilot serve: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(config, config_path))
    except OSError as exc:
        print(f"lrpilot serve: cannot listen on {config.server.host}:{config.server.port}: {exc}",
              file=sys.stderr)
        return 1


async def _run(config: Config, config_path: Path | None) -> int:
    daemon = Daemon(config, config_path=config_path)
    await daemon.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = f"[{daemon.host}]" if ":" in daemon.host else daemon.host
    scheme = "wss" if config.server.tls_cert else "ws"
    log.info(
        "listening on %s://%s:%d (websocket /ws; HTTP /metrics /healthz /readyz /api/jobs); "
        "state in %s",
        scheme, host, daemon.port, daemon.state_path.resolve(),
    )
    print(f"listening on {scheme}://{host}:{daemon.port}", flush=True)
    await stop.wait()
    log.info("shutting down: closing connections and flushing state")
    await daemon.stop()
    return 0


#: young-generation threshold of the garbage collector in the daemon process (Python: 700)
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling the event loop.

    Everything alive after start-up (modules, config, restored jobs) moves to the permanent
    generation (``gc.freeze()``), so that no collection walks it again; and young
    collections run every 20,000 allocations instead of 700. Most of the daemon's garbage
    is freed by reference counting the moment it dies; the collector only has cycles to
    find, and with 1,000 jobs a full collection walked 200,000 objects for 140 ms.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
