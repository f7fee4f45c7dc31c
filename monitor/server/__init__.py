"""The daemon's I/O shell around the pure engine.

    app.py          Daemon (websockets server + HTTP routes) and serve_main (``lrpilot serve``)
    sessions.py     one connection: handshake, messages, error replies, fan-out of decisions
    jobs.py         the job registry and the job lifecycle table
    store.py        SQLite state: decision journal, job snapshots, acks
    auth.py         Bearer tokens and job-name scopes
    limits.py       frame size, job count, metric names, message rate
    reload.py       config file watcher
    daemon_stats.py counters read by the Prometheus exporter
"""

from .app import Daemon, serve_main

__all__ = ["Daemon", "serve_main"]
