"""Resource limits: each violation is an error code for the one offending client, never a crash.

==========================  ====================  ===============================================
limit (config ``limits.``)  error code            what happens
==========================  ====================  ===============================================
server.max_frame_bytes      frame_too_large       the frame is dropped, the connection continues;
                                                  frames over 4× the limit close it (1009)
max_jobs                    too_many_jobs         the hello is refused, the connection closes
max_metric_names_per_job    too_many_metrics      the frame is dropped (nothing of it is applied)
max_messages_per_second     rate_limited          the message is dropped (token bucket per
                                                  connection, burst of one second's worth)
max_ranks                   bad_message           the hello is refused
==========================  ====================  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass

#: websockets closes a connection (1009) beyond this multiple of max_frame_bytes; between the
#: limit and this we read the frame, answer ``frame_too_large`` and keep the connection.
HARD_FRAME_FACTOR = 4


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits in force (swapped whole on a config reload)."""

    max_frame_bytes: int = 1_048_576
    max_jobs: int = 1000
    max_metric_names_per_job: int = 64
    max_messages_per_second: float = 10_000.0
    max_ranks: int = 1024

    @classmethod
    def from_config(cls, config: object) -> Limits:
        """Read ``config.limits`` and ``config.server.max_frame_bytes``."""
        lim = config.limits  # type: ignore[attr-defined]
        return cls(
            max_frame_bytes=int(config.server.max_frame_bytes),  # type: ignore[attr-defined]
            max_jobs=int(lim.max_jobs),
            max_metric_names_per_job=int(lim.max_metric_names_per_job),
            max_messages_per_second=float(lim.max_messages_per_second),
            max_ranks=int(lim.max_ranks),
        )

    @property
    def hard_frame_bytes(self) -> int:
        return self.max_frame_bytes * HARD_FRAME_FACTOR


class TokenBucket:
    """Allows ``rate`` events per second on average with bursts up to ``burst``.

    The caller passes the current time (the event loop's clock), so tests drive it by hand.
    """

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.tokens = self.burst
        self.last = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; False (and take nothing) otherwise."""
        tokens = self.tokens + (now - self.last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.last = now
        if tokens >= cost:
            self.tokens = tokens - cost
            return True
        self.tokens = tokens
        return False

    def reconfigure(self, rate: float) -> None:
        """Adopt a new rate (after a config reload), keeping the tokens saved so far."""
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.tokens = min(self.tokens, self.burst)
