"""Reload the config file when it changes, without dropping a connection.

A watchdog observer watches the file's directory (editors replace files by renaming, so
watching the file itself would miss the second save). Events are handed to the event loop,
debounced, and the file is re-read there:

* valid: the new config is swapped in — new jobs get its policies, every job gets its limits,
  new handshakes its tokens. Jobs already running keep their engines. Settings that only take
  effect at start-up (host, port, TLS, state_dir, frame size) are logged as needing a restart.
* invalid: the error (file, field path, reason) is logged and counted; the old config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from ..config import Config, ConfigError, load_config
from .daemon_stats import DaemonStats

log = logging.getLogger("lrpilot.reload")

#: settings read once at start-up; a reload that changes them only logs a warning
RESTART_ONLY = (
    ("server", "host"),
    ("server", "port"),
    ("server", "tls_cert"),
    ("server", "tls_key"),
    ("server", "max_frame_bytes"),
    ("storage", "state_dir"),
)


class Reloader:
    """Re-reads the config and hands a valid one to ``apply``."""

    def __init__(
        self,
        path: Path,
        current: Callable[[], Config],
        apply: Callable[[Config], None],
        stats: DaemonStats,
    ) -> None:
        self.path = Path(path)
        self.current = current
        self.apply = apply
        self.stats = stats

    def reload(self) -> bool:
        """Read the file now; True when the new config was applied."""
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            self.stats.config_reloads["error"] = self.stats.config_reloads.get("error", 0) + 1
            log.error("config reload refused, keeping the previous config: %s", exc)
            return False
        except Exception:  # an unreadable file is the operator's problem, not a crash
            self.stats.config_reloads["error"] = self.stats.config_reloads.get("error", 0) + 1
            log.exception("config reload of %s failed, keeping the previous config", self.path)
            return False
        old = self.current()
        for section, name in RESTART_ONLY:
            before = getattr(getattr(old, section), name)
            after = getattr(getattr(new, section), name)
            if before != after:
                log.warning(
                    "config reload: %s.%s changed (%s -> %s); it takes effect after a restart",
                    section, name, before, after,
                )
        try:
            self.apply(new)
        except Exception:
            self.stats.config_reloads["error"] = self.stats.config_reloads.get("error", 0) + 1
            log.exception("config reload of %s could not be applied", self.path)
            return False
        self.stats.config_reloads["ok"] = self.stats.config_reloads.get("ok", 0) + 1
        log.info("config reloaded from %s", self.path)
        return True


class _Events(FileSystemEventHandler):
    def __init__(self, target: Path, notify: Callable[[], None]) -> None:
        self.target = os.path.realpath(target)
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p and os.path.realpath(os.fsdecode(p)) == self.target:
                self.notify()
                return


class ConfigWatcher:
    """Runs :class:`Reloader` on the event loop whenever the config file changes."""

    def __init__(
        self, reloader: Reloader, loop: asyncio.AbstractEventLoop, debounce: float = 0.2
    ) -> None:
        self.reloader = reloader
        self.loop = loop
        self.debounce = debounce
        self._observer: Any = None
        self._pending: asyncio.TimerHandle | None = None

    def start(self) -> None:
        directory = self.reloader.path.resolve().parent
        self._observer = Observer()
        self._observer.schedule(
            _Events(self.reloader.path, self._from_thread), str(directory), recursive=False
        )
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _from_thread(self) -> None:
        # a closed loop (RuntimeError) means we are shutting down
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        # several events per save (truncate, write, close): reload once, after they settle
        if self._pending is not None:
            self._pending.cancel()
        self._pending = self.loop.call_later(self.debounce, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self.reloader.reload()

