"""Daemon-wide counters, held as plain numbers that the exporter reads at scrape time.

Nothing here touches prometheus_client: the hot path only adds to ints and dicts, and the
exporter turns this object into metric families when Prometheus asks. Keys of the per-reason
and per-type dicts are small, fixed sets (message types and error codes from the protocol),
so a hostile client cannot grow them: unknown message types are counted as ``"unknown"``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: upper bounds (seconds) of the decision latency histogram buckets; +Inf is implicit
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

#: message types we count by name; anything else is counted as "unknown"
KNOWN_MESSAGE_TYPES = frozenset(
    {"hello", "metrics", "checkpoint", "ack", "heartbeat", "finished", "command"}
)


@dataclass(slots=True)
class LatencyHistogram:
    """A cumulative-on-export histogram: ``counts[i]`` counts samples in bucket ``i`` only.

    The last slot counts samples above the largest bound (the +Inf bucket).
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        """Add one sample."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, samples <= bound)`` pairs as Prometheus wants them, ending with +Inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float:
        """An upper-bound estimate of quantile ``q`` (0..1) from the buckets; NaN when empty."""
        if self.count == 0:
            return float("nan")
        target = q * self.count
        for bound, cum in self.cumulative():
            if cum >= target:
                return bound
        return float("inf")


@dataclass(slots=True)
class DaemonStats:
    """Counters for the whole daemon (one instance per daemon, passed to everything)."""

    connections: int = 0
    connections_total: int = 0
    messages: dict[str, int] = field(default_factory=dict)
    points: int = 0
    frames_rejected: dict[str, int] = field(default_factory=dict)
    decision_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    decisions_sent: int = 0
    ingest_lag_seconds: float = 0.0
    config_reloads: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0})
    handler_crashes: int = 0
    store_flushes: int = 0
    store_errors: int = 0

    def count_message(self, kind: object) -> None:
        """Count one received message by its type (unknown or non-string types as "unknown")."""
        key = kind if isinstance(kind, str) and kind in KNOWN_MESSAGE_TYPES else "unknown"
        self.messages[key] = self.messages.get(key, 0) + 1

    def reject(self, reason: str) -> None:
        """Count one rejected frame under a stable error code."""
        self.frames_rejected[reason] = self.frames_rejected.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary (for ``lrpilot status`` and /api)."""
        return {
            "connections": self.connections,
            "connections_total": self.connections_total,
            "messages": dict(self.messages),
            "points": self.points,
            "frames_rejected": dict(self.frames_rejected),
            "decisions_sent": self.decisions_sent,
            "decision_latency_p50_seconds": _json_float(self.decision_latency.quantile(0.5)),
            "decision_latency_p99_seconds": _json_float(self.decision_latency.quantile(0.99)),
            "ingest_lag_seconds": self.ingest_lag_seconds,
            "config_reloads": dict(self.config_reloads),
            "handler_crashes": self.handler_crashes,
            "store_flushes": self.store_flushes,
            "store_errors": self.store_errors,
        }


def _json_float(x: float) -> float | None:
    return x if x == x and x not in (float("inf"), float("-inf")) else None
