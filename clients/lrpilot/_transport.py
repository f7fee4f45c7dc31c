"""The client's one seam for I/O: open a connection, send text, receive text with a timeout.

The sender thread only talks to a :class:`Transport`; unit tests pass an in-process fake,
production uses :class:`WebSocketTransport` (websockets' synchronous client, imported
lazily so that ``import lrpilot`` stays cheap).
"""

from __future__ import annotations

import contextlib
import os
import ssl as ssl_module
import struct
from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Connection", "Transport", "TransportClosed", "TransportRefused", "WebSocketTransport"]


class TransportClosed(ConnectionError):
    """The connection is gone (closed by the peer, reset, or never opened)."""


class TransportRefused(TransportClosed):
    """The daemon answered the upgrade with an HTTP error (401 bad token, 403 not allowed):
    retrying soon will not help."""


class Connection(Protocol):
    """One open connection to the daemon."""

    def send(self, text: str) -> None:
        """Send one text frame; raise :class:`TransportClosed` if the connection is gone."""

    def recv(self, timeout: float) -> str | None:
        """The next text frame, or None if none arrived within ``timeout`` seconds.

        Raise :class:`TransportClosed` if the connection is gone.
        """

    def close(self) -> None:
        """Close; never raises."""


class Transport(Protocol):
    """Opens connections. ``connect`` raises ``OSError`` (including TransportClosed and
    TimeoutError) when the daemon cannot be reached."""

    def connect(self, url: str, headers: Mapping[str, str], timeout: float) -> Connection: ...


_HEAD_16 = struct.Struct("!BBH").pack
_HEAD_64 = struct.Struct("!BBQ").pack

#: masking keys drawn from the OS's CSPRNG at once (4 bytes each): os.urandom is a system call
#: that releases the GIL, and the sender thread then has to win the GIL back from the
#: training thread, once more per frame; the keys stay what RFC 6455 §5.3 asks for (from a
#: strong source of entropy, none predictable from another)
_MASKS_PER_DRAW = 256


class _WebSocketConnection:
    """A websockets sync connection; text frames go out on a short path of our own.

    websockets' ``send`` runs about ten Python layers per frame (a context manager, the
    sans-I/O protocol's ``Frame`` object and its ``BytesIO`` serialization, ``data_to_send``),
    which cost the sender thread 60-70 µs of a ~200 µs send each wake-up, where nothing is in
    the CPU caches any more. :meth:`send` writes the frame itself instead (RFC 6455 §5.2: FIN
    and the text opcode, the length, and the payload masked with a fresh random key as §5.3
    requires of a client, see ``_MASKS_PER_DRAW``), under the connection's own lock, only while websockets' protocol
    state is OPEN; in any other state (closing, closed) websockets' ``send`` does the work
    and raises what it raises. websockets' own writes (pongs, the close frame) hold the same
    lock, so frames never interleave. Without those attributes (another websockets version),
    every frame goes through websockets' ``send``.
    """

    def __init__(self, ws: Any, closed_errors: tuple[type[BaseException], ...]) -> None:
        # entered as a context manager, the way websockets >= 17.1 wants connect() used
        self._stack = contextlib.ExitStack()
        self._ws = self._stack.enter_context(ws)
        self._closed_errors = closed_errors
        self._lock: Any = getattr(ws, "protocol_mutex", None)
        self._socket: Any = getattr(ws, "socket", None)
        self._protocol: Any = getattr(ws, "protocol", None)
        self._open: Any = None
        self._apply_mask: Any = None
        self._masks = b""  # unused masking keys, see _MASKS_PER_DRAW; only the sender sends
        self._mask_at = 0
        if self._lock is not None and self._socket is not None and self._protocol is not None:
            with contextlib.suppress(ImportError):
                from websockets.frames import apply_mask
                from websockets.protocol import OPEN

                self._open, self._apply_mask = OPEN, apply_mask

    def send(self, text: str) -> None:
        # one method: the sender thread calls it once a wake-up with cold caches, where each
        # Python call costs a few microseconds
        try:
            apply_mask = self._apply_mask
            if apply_mask is not None:
                data = text.encode()
                n = len(data)
                if n < 126:
                    head = bytes((0x81, 0x80 | n))
                elif n < 65536:
                    head = _HEAD_16(0x81, 0x80 | 126, n)
                else:
                    head = _HEAD_64(0x81, 0x80 | 127, n)
                at = self._mask_at
                if at >= len(self._masks):
                    self._masks = os.urandom(4 * _MASKS_PER_DRAW)
                    at = 0
                mask = self._masks[at : at + 4]
                self._mask_at = at + 4
                frame = b"".join((head, mask, apply_mask(data, mask)))
                with self._lock:
                    if self._protocol.state is self._open:
                        self._socket.sendall(frame)
                        return
            # not open (closing, closed), or no short path: websockets sends, or raises
            self._ws.send(text)
        except self._closed_errors as exc:
            raise TransportClosed(str(exc)) from exc

    def recv(self, timeout: float) -> str | None:
        try:
            data = self._ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        except self._closed_errors as exc:
            raise TransportClosed(str(exc)) from exc
        return data if isinstance(data, str) else bytes(data).decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing is best effort
            self._stack.close()


class WebSocketTransport:
    """websockets' sync client, uncompressed (metrics frames are small and CPU is precious).

    ``max_size`` bounds incoming frames (a welcome with many decisions is the largest).
    No proxy is used: the daemon is local or reached directly. ``ssl`` is the context for
    ``wss://`` URLs (e.g. ``ssl.create_default_context(cafile="daemon-ca.pem")`` for a daemon
    with a private certificate); None means the system's trusted CAs. It is not used for
    ``ws://`` URLs.
    """

    def __init__(
        self,
        max_size: int = 4 * 1024 * 1024,
        close_timeout: float = 1.0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.max_size = max_size
        self.close_timeout = close_timeout
        self.ssl = ssl

    def connect(self, url: str, headers: Mapping[str, str], timeout: float) -> Connection:
        from websockets.exceptions import (
            ConnectionClosed,
            InvalidHandshake,
            InvalidStatus,
            InvalidURI,
        )
        from websockets.sync.client import connect

        try:
            ws = connect(
                url,
                additional_headers=dict(headers),
                compression=None,
                open_timeout=timeout,
                close_timeout=self.close_timeout,
                max_size=self.max_size,
                proxy=None,
                user_agent_header=None,
                # websockets refuses an ssl context with a ws:// URL
                ssl=self.ssl if url.startswith("wss:") else None,
            )
        except InvalidStatus as exc:
            raise TransportRefused(f"{url}: {exc}") from exc
        except (InvalidHandshake, InvalidURI) as exc:
            raise TransportClosed(f"{url}: {exc}") from exc
        return _WebSocketConnection(ws, (ConnectionClosed, OSError))
