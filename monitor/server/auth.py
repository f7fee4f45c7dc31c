"""Who may talk to the daemon: Bearer tokens checked on the websocket handshake.

* A **job token** lets a client stream metrics for jobs whose names match its globs
  (``fnmatch`` patterns such as ``"team-a-*"``). A hello for any other job gets the error
  ``forbidden``.
* An **admin token** may do everything, including operator commands (set-lr, pause, ...).
* **No token configured**: the daemon accepts only loopback peers (127.0.0.0/8, ::1), every
  one of them as admin; from other peers only the health probes /healthz and /readyz are
  answered. The daemon logs this at start-up.

A missing or wrong token is refused before the websocket opens, with HTTP 401.

Tokens come from ``auth.tokens`` and ``auth.token_file`` (see ``monitor.config``).
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("lrpilot.auth")

Role = Literal["job", "admin"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated peer: its role, the job globs it may use, a name for logs."""

    role: Role
    jobs: tuple[str, ...] = ("*",)
    name: str = "anonymous"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_stream(self, job: str) -> bool:
        """True when this principal may send metrics for ``job``."""
        if self.is_admin:
            return True
        return any(fnmatch.fnmatchcase(job, pattern) for pattern in self.jobs)


LOOPBACK_ADMIN = Principal(role="admin", name="loopback")


@dataclass(frozen=True, slots=True)
class _Token:
    secret: bytes
    principal: Principal


class Authenticator:
    """Checks handshake headers against the configured tokens."""

    def __init__(self, tokens: Iterable[tuple[Role, tuple[str, ...], str, str | None]]) -> None:
        self._tokens = [
            _Token(
                secret=token.encode(),
                principal=Principal(role=role, jobs=tuple(globs), name=name or f"{role}-token"),
            )
            for role, globs, token, name in tokens
        ]

    @classmethod
    def from_config(cls, config: Any) -> Authenticator:
        """Build from the config's tokens (``auth.tokens`` plus ``auth.token_file``)."""
        return cls((t.role, tuple(t.jobs), t.token, t.name) for t in config.all_tokens())

    @property
    def enabled(self) -> bool:
        """True when at least one token is configured."""
        return bool(self._tokens)

    def authenticate(
        self, headers: Mapping[str, str] | Any, peer_host: str | None
    ) -> Principal | None:
        """The principal for a handshake, or None to refuse it (HTTP 401)."""
        if not self._tokens:
            return LOOPBACK_ADMIN if is_loopback(peer_host) else None
        header = headers.get("Authorization")
        if not header or not header.startswith("Bearer "):
            return None
        presented = header[len("Bearer ") :].strip().encode()
        found: Principal | None = None
        # compare against every token so the time taken does not reveal which one matched
        for token in self._tokens:
            if hmac.compare_digest(token.secret, presented) and found is None:
                found = token.principal
        return found


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback
