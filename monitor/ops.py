"""Operator commands against a running daemon: status, jobs, show, set-lr, pause, resume.

Each command is one ``command`` message over the daemon's websocket, answered by one
``result`` (or ``error``) message. With auth on, commands need an admin token (``--token`` or
``$LRPILOT_TOKEN``); a daemon serving ``wss://`` with a private certificate needs its CA file
(``--cacert`` or ``$LRPILOT_CACERT``). Manual actions are journaled with the actor
(``--actor`` or ``$USER``) and the reason, and reach the job like any other decision.

Output is a human-readable table by default and the daemon's JSON with ``--json``.
Exit status: 0 done, 1 the daemon refused the command, 2 the daemon could not be reached or
refused the token.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from lrpilot._protocol import Command, ProtocolError, decode, encode
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
TIMEOUT = 10.0


class OpsError(Exception):
    """The daemon refused the command (``code`` is the protocol's error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unreachable(Exception):
    """The daemon could not be reached, or refused the token (HTTP 401/403)."""


class CAFileError(ValueError):
    """The CA file given to trust the daemon's certificate cannot be loaded."""


# --------------------------------------------------------------------------- client functions


def call(
    command: str,
    *,
    url: str = DEFAULT_URL,
    token: str | None = None,
    job: str | None = None,
    lrs: Sequence[float] | None = None,
    reason: str | None = None,
    actor: str | None = None,
    timeout: float = TIMEOUT,
    cacert: str | None = None,
) -> dict[str, Any]:
    """Send one command; return the result's data. Raises OpsError or Unreachable.

    ``cacert`` is a PEM file of the CA (or the self-signed certificate) to trust for a
    ``wss://`` URL instead of the system's CAs; CAFileError when it cannot be loaded.
    """
    msg = Command(
        command=command,
        job=job,
        lrs=tuple(float(x) for x in lrs) if lrs is not None else None,
        reason=reason,
        actor=actor,
    )
    headers = {"Authorization": f"Bearer {token}"} if token else None
    context = _ssl_context(url, cacert)
    try:
        with connect(
            url, additional_headers=headers, open_timeout=timeout, compression=None,
            max_size=None, ssl=context,
        ) as ws:
            ws.send(encode(msg))
            reply = decode(ws.recv(timeout=timeout))
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        raise Unreachable(f"{url}: HTTP {status} {body}".strip()) from None
    except ProtocolError as exc:
        raise OpsError(str(exc.code), f"unreadable reply: {exc.message}") from None
    except ssl.SSLCertVerificationError as exc:
        hint = "" if cacert else " (to trust a private certificate: --cacert FILE or $LRPILOT_CACERT)"
        raise Unreachable(f"{url}: TLS certificate not trusted: {exc.verify_message}{hint}") from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise Unreachable(f"{url}: {exc}") from None
    if reply.type == "error":
        raise OpsError(reply.code, reply.message)  # type: ignore[union-attr]
    if reply.type != "result":
        raise OpsError("bad_message", f"expected a result, got {reply.type!r}")
    return dict(reply.data or {})  # type: ignore[union-attr]


def _ssl_context(url: str, cacert: str | None) -> ssl.SSLContext | None:
    """The TLS context trusting ``cacert`` for a ``wss://`` URL (None: websockets' default)."""
    if not cacert or not url.startswith("wss://"):
        return None  # websockets refuses a context with ws://; plain ws needs none
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CAFileError(f"cannot load the CA file {cacert}: {reason}") from None


def status(url: str = DEFAULT_URL, token: str | None = None) -> dict[str, Any]:
    """The daemon's version, uptime, state file, jobs per state and counters."""
    return call("status", url=url, token=token)


def jobs(url: str = DEFAULT_URL, token: str | None = None) -> list[dict[str, Any]]:
    """One summary per job."""
    return list(call("jobs", url=url, token=token).get("jobs", []))


def show(job: str, url: str = DEFAULT_URL, token: str | None = None) -> dict[str, Any]:
    """Everything the daemon knows about one job."""
    return dict(call("show", url=url, token=token, job=job).get("job", {}))


def set_lr(
    job: str, lrs: Sequence[float], reason: str, actor: str,
    url: str = DEFAULT_URL, token: str | None = None,
) -> dict[str, Any]:
    """Set the job's LR (one value keeps the groups' ratios, or one per group)."""
    return call("set_lr", url=url, token=token, job=job, lrs=lrs, reason=reason, actor=actor)


def pause(
    job: str, reason: str, actor: str, url: str = DEFAULT_URL, token: str | None = None
) -> dict[str, Any]:
    """Stop automatic LR changes for the job."""
    return call("pause", url=url, token=token, job=job, reason=reason, actor=actor)


def resume(
    job: str, reason: str, actor: str, url: str = DEFAULT_URL, token: str | None = None
) -> dict[str, Any]:
    """Restart automatic LR changes for the job."""
    return call("resume", url=url, token=token, job=job, reason=reason, actor=actor)


# --------------------------------------------------------------------------- CLI


def run(args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the operator command named in ``args`` (from ``lrpilot``'s argparse)."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = _command_name(args)
    url = getattr(args, "url", None) or os.environ.get("LRPILOT_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("LRPILOT_TOKEN")
    cacert = getattr(args, "cacert", None) or os.environ.get("LRPILOT_CACERT")
    actor = getattr(args, "actor", None) or os.environ.get("USER") or _whoami()
    reason = getattr(args, "reason", None) or ""
    job = getattr(args, "job", None)
    lrs = getattr(args, "lrs", None)
    if isinstance(lrs, str):  # "0.1" or "0.1,0.01" (one per param group)
        try:
            lrs = [float(x) for x in lrs.split(",") if x.strip()]
        except ValueError:
            print(f"lrpilot set-lr: learning rates must be numbers, got {lrs!r}", file=err)
            return 2
    timeout = float(getattr(args, "timeout", None) or TIMEOUT)
    as_json = bool(getattr(args, "json", False))
    if name in ("show", "set_lr", "pause", "resume") and not job:
        print(f"lrpilot {name.replace('_', '-')}: a job name is required", file=err)
        return 2
    if name == "set_lr" and not lrs:
        print("lrpilot set-lr: at least one learning rate is required", file=err)
        return 2
    try:
        data = call(
            name, url=url, token=token, job=job,
            lrs=[float(x) for x in lrs] if lrs else None,
            reason=reason if name in ("set_lr", "pause", "resume") else None,
            actor=actor if name in ("set_lr", "pause", "resume") else None,
            timeout=timeout,
            cacert=cacert,
        )
    except CAFileError as exc:
        print(f"lrpilot {name.replace('_', '-')}: --cacert: {exc}", file=err)
        return 2
    except Unreachable as exc:
        print(f"lrpilot {name.replace('_', '-')}: cannot reach the daemon: {exc}", file=err)
        return 2
    except OpsError as exc:
        print(f"lrpilot {name.replace('_', '-')}: {exc.code}: {exc.message}", file=err)
        return 1
    if as_json:
        out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return 0
    out.write(format_result(name, data))
    return 0


def _command_name(args: Any) -> str:
    for attr in ("ops_command", "command", "cmd", "subcommand"):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value.replace("-", "_") in (
            "status", "jobs", "show", "set_lr", "pause", "resume"
        ):
            return value.replace("-", "_")
    raise SystemExit("lrpilot: no operator command given")


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "operator"


# --------------------------------------------------------------------------- formatting


def format_result(command: str, data: dict[str, Any]) -> str:
    """The human-readable rendering of a command's result."""
    if command == "status":
        return _format_status(data)
    if command == "jobs":
        return _format_jobs(data.get("jobs", []))
    if command == "show":
        return _format_show(data.get("job", {}))
    decision = data.get("decision")
    job = data.get("job", {})
    if decision is None:
        return f"{job.get('job')}: {command} done (no change to send)\n"
    return (
        f"{job.get('job')}: decision {decision['id']} ({decision['kind']}) sent, "
        f"applies at step {decision['apply_at_step']}; LR now {_lrs(job.get('lrs'))}\n"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def _format_status(d: dict[str, Any]) -> str:
    stats = d.get("stats", {})
    jobs_by_state = d.get("jobs", {})
    rows = [
        ("version", d.get("version")),
        ("url", d.get("url")),
        ("uptime", _duration(d.get("uptime_seconds"))),
        ("state file", d.get("state_file")),
        ("config file", d.get("config_file") or "(defaults)"),
        ("auth", d.get("auth")),
        ("jobs", ", ".join(f"{k} {v}" for k, v in sorted(jobs_by_state.items())) or "none"),
        ("connections", stats.get("connections")),
        ("messages", sum((stats.get("messages") or {}).values())),
        ("points", stats.get("points")),
        ("decisions sent", stats.get("decisions_sent")),
        ("frames rejected", ", ".join(
            f"{k} {v}" for k, v in sorted((stats.get("frames_rejected") or {}).items())
        ) or "none"),
        ("config reloads", ", ".join(
            f"{k} {v}" for k, v in sorted((stats.get("config_reloads") or {}).items())
        )),
    ]
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k.ljust(width)}  {_cell(v)}\n" for k, v in rows)


def _format_jobs(jobs_: list[dict[str, Any]]) -> str:
    if not jobs_:
        return "no jobs\n"
    rows = [
        (
            j.get("job"),
            str(j.get("state")) + (" (paused)" if j.get("paused") else ""),
            j.get("step"),
            _lrs(j.get("lrs")),
            j.get("policy"),
            f"{j.get('connected_ranks')}/{j.get('world_size')}",
            j.get("decisions"),
            _ago(j.get("last_seen")),
        )
        for j in sorted(jobs_, key=lambda j: str(j.get("job")))
    ]
    return table(("JOB", "STATE", "STEP", "LR", "POLICY", "RANKS", "DECISIONS", "LAST SEEN"), rows)


def _checkpoints(j: dict[str, Any]) -> str:
    """The rollback targets the daemon knows, newest last; the last few when there are many."""
    steps = j.get("checkpoints")
    if steps is None:  # a daemon from before the list: its one checkpoint
        last = j.get("checkpoint_step")
        return "-" if last is None else str(last)
    if not steps:
        return "none reported"
    shown = ", ".join(str(s) for s in steps[-8:])
    return (f"{len(steps)}: ..., " if len(steps) > 8 else "") + shown


def _planned(j: dict[str, Any]) -> str:
    total, start = j.get("total_steps"), j.get("anneal_from_step")
    if total is None:
        return "- (the job did not say: no anneal)" if start is None else f"anneal from step {start}"
    if start is None:
        return f"{total} (the policy has no anneal)"
    return f"{total}, annealed from step {start}"


def _format_show(j: dict[str, Any]) -> str:
    head = [
        ("job", j.get("job")),
        ("run", j.get("run_id") or "-"),
        ("state", str(j.get("state")) + (" (paused)" if j.get("paused") else "")),
        ("step", j.get("step")),
        ("lr", _lrs(j.get("lrs"))),
        ("min lr", _lrs(j.get("min_lrs"))),
        ("policy", json.dumps(j.get("policy_block"), sort_keys=True)),
        ("schedule", json.dumps(j.get("schedule")) if j.get("schedule") else "-"),
        ("plateau bad evals", j.get("plateau_bad_evaluations")),
        ("planned steps", _planned(j)),
        ("checkpoints", _checkpoints(j)),
        ("ranks", f"{j.get('connected_ranks')}/{j.get('world_size')} connected"),
        ("last seen", _ago(j.get("last_seen"))),
        ("last values", ", ".join(
            f"{k}={_num(v)}" for k, v in sorted((j.get("last_values") or {}).items())
        ) or "-"),
        ("detections", ", ".join(
            f"{k} {v}" for k, v in sorted((j.get("detection_counts") or {}).items())
        ) or "none"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted((j.get("labels") or {}).items())) or "-"),
    ]
    width = max(len(k) for k, _ in head)
    text = "".join(f"{k.ljust(width)}  {_cell(v)}\n" for k, v in head)
    decisions = j.get("recent_decisions") or []
    if decisions:
        text += "\nrecent decisions\n" + table(
            ("ID", "KIND", "APPLY AT", "SOURCE", "LR", "ACTOR", "REASON"),
            [
                (
                    d.get("id"),
                    d.get("kind"),
                    d.get("apply_at_step"),
                    d.get("source"),
                    _lrs(d.get("lrs")),
                    d.get("actor") or "",
                    d.get("reason"),
                )
                for d in decisions[-10:]
            ],
        )
    return text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _num(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _lrs(lrs: Any) -> str:
    if not lrs:
        return "-"
    return ",".join(_num(float(x)) if not isinstance(x, str) else x for x in lrs)


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    return _duration(max(0.0, time.time() - float(ts))) + " ago"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
