"""Helpers for the daemon tests: configs, an in-process daemon, a small JSON websocket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from monitor.config import Config
from monitor.server.app import Daemon

#: a policy that cuts the LR on every non-improving val_loss: deterministic decisions
PLATEAU = {"kind": "reduce_on_plateau", "monitor": "val_loss", "patience": 0, "factor": 0.5}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A raw config for tests: port 0, state under tmp_path, fast flushes."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"state_dir": str(tmp_path / "state"), "flush_interval_seconds": 0.01},
        "defaults": {"policy": dict(PLATEAU)},
    }
    return _merge(base, sections)


def make_config(tmp_path: Path, **sections: Any) -> Config:
    return Config.model_validate(config_dict(tmp_path, **sections))


class FakePeer:
    """The session side a :class:`JobRegistry` attaches a rank to, for tests without sockets."""

    def __init__(self) -> None:
        self.session_id = "s"
        self.last_sent_id = 0

    def detach(self, reason: str) -> None:
        pass


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Daemon]:
    daemon = Daemon(config, **kwargs)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


class Client:
    """A websocket client that speaks JSON objects."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, token: str | None = None) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await connect(url, additional_headers=headers, compression=None, max_size=None)
        return cls(ws)

    async def send(self, obj: Any) -> None:
        await self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def nothing(self, timeout: float = 0.2) -> bool:
        """True when no message arrives within ``timeout``."""
        try:
            await asyncio.wait_for(self.ws.recv(), timeout)
        except asyncio.TimeoutError:
            return True
        return False

    async def hello(self, job: str, **fields: Any) -> dict[str, Any]:
        msg = {"type": "hello", "protocol": 1, "job": job, "run_id": "r1", "lrs": [0.1]}
        msg.update(fields)
        await self.send(msg)
        return await self.recv()

    async def metrics(self, steps: list[int], **columns: list[Any]) -> None:
        await self.send({"type": "metrics", "steps": steps, "values": columns})

    async def close(self) -> None:
        await self.ws.close()


class ThreadedDaemon:
    """A daemon on its own event loop in a thread, for sync clients (hypothesis, ops)."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        self.config = config
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedDaemon:
        self._thread.start()
        self.daemon = Daemon(self.config, **self.kwargs)
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.daemon is not None
        asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    @property
    def url(self) -> str:
        assert self.daemon is not None
        return self.daemon.url


@contextlib.contextmanager
def threaded(config: Config, **kwargs: Any) -> Iterator[ThreadedDaemon]:
    with ThreadedDaemon(config, **kwargs) as td:
        yield td
