"""An in-process stand-in for the daemon, plugged into the client's transport seam.

It speaks the real wire protocol (every frame goes through ``encode``/``decode``), answers a
hello with a welcome carrying the decisions after ``resume.last_decision_id``, and lets a test
push decisions, take the daemon down, or refuse connections.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from lrpilot import TransportClosed
from lrpilot import _protocol as proto


class FakeDaemon:
    """Holds what every connection received and the job's decision journal."""

    def __init__(self) -> None:
        self.up = True
        self.refuse: proto.ErrorMsg | None = None
        self.received: list[proto.Message] = []
        self.decisions: list[dict[str, Any]] = []
        self.connections: list[FakeConnection] = []
        self.connect_attempts = 0
        self.connect_delay = 0.0  # seconds each connect takes (a daemon that is slow to answer)
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- test controls

    def push_decision(self, **fields: Any) -> dict[str, Any]:
        """Journal a decision and send it on every open connection."""
        decision = {"id": len(self.decisions) + 1, "source": "test", "reason": "test", **fields}
        proto.validate_decision(decision)
        with self.lock:
            self.decisions.append(decision)
            for conn in self.connections:
                if not conn.closed:
                    conn.inbox.append(proto.encode(proto.DecisionMsg(decision=decision)))
        return decision

    def drop_all(self) -> None:
        """Close every open connection, as a daemon restart would."""
        for conn in self.connections:
            conn.closed = True

    def of_type(self, cls: type) -> list[Any]:
        with self.lock:
            return [m for m in self.received if isinstance(m, cls)]

    def metric_rows(self) -> list[tuple[int, dict[str, float | None]]]:
        """Every received metrics row as (step, {name: value}) without nulls."""
        rows = []
        for batch in self.of_type(proto.MetricsBatch):
            for i, step in enumerate(batch.steps):
                rows.append(
                    (step, {k: col[i] for k, col in batch.values.items() if col[i] is not None})
                )
        return rows

    # ---------------------------------------------------------------- transport

    def connect(self, url: str, headers: Mapping[str, str], timeout: float) -> FakeConnection:
        self.connect_attempts += 1
        self.headers.append(dict(headers))
        if self.connect_delay:
            time.sleep(self.connect_delay)
        if not self.up:
            raise ConnectionRefusedError(f"{url}: connection refused (fake daemon is down)")
        conn = FakeConnection(self)
        self.connections.append(conn)
        return conn

    def on_frame(self, conn: FakeConnection, text: str) -> None:
        msg = proto.decode(text)
        with self.lock:
            self.received.append(msg)
        if isinstance(msg, proto.Hello):
            if self.refuse is not None:
                conn.inbox.append(proto.encode(self.refuse))
                return
            after = msg.resume.last_decision_id if msg.resume else None
            missed = [d for d in self.decisions if after is None or d["id"] > after]
            welcome = proto.Welcome(
                session=f"s{len(self.connections)}",
                job=msg.job,
                lrs=msg.lrs,
                policy={"kind": "fake"},
                decisions=tuple(missed),
            )
            conn.inbox.append(proto.encode(welcome))


class FakeConnection:
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        self.inbox: deque[str] = deque()
        self.closed = False

    def send(self, text: str) -> None:
        if self.closed:
            raise TransportClosed("fake connection closed")
        self.daemon.on_frame(self, text)

    def recv(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            if self.closed:
                raise TransportClosed("fake connection closed")
            if self.inbox:
                return self.inbox.popleft()
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.0005, timeout))

    def close(self) -> None:
        self.closed = True


class FakeClock:
    """A monotonic clock that only moves when told to (sleep advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
