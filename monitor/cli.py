"""The ``lrpilot`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import __version__

DEFAULT_URL = "ws://127.0.0.1:8765/ws"

EPILOG = """\
examples:
  lrpilot serve                                  # ./config.yaml if present, else defaults
  lrpilot serve --config config.yaml --port 9000 --state /var/lib/lrpilot
  lrpilot replay run.jsonl --policy policy.yaml --initial-lr 0.1
  lrpilot jobs                                   # jobs known to a running daemon
  lrpilot set-lr my-job 0.003 --reason "loss too noisy"
  lrpilot demo                                   # a live demo: daemon + a real training run
"""


def _add_ops_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("LRPILOT_URL", DEFAULT_URL),
        help="daemon websocket URL (env LRPILOT_URL; default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("LRPILOT_TOKEN"),
        help="admin token when the daemon requires one (env LRPILOT_TOKEN)",
    )
    parser.add_argument(
        "--cacert",
        default=os.environ.get("LRPILOT_CACERT"),
        help="PEM file of the CA (or self-signed certificate) to trust for a wss:// URL "
        "(env LRPILOT_CACERT; default: the system's CAs)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="lrpilot",
        description="Watch training runs and steer their learning rate, live.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lrpilot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon", description="Run the lrpilot daemon.")
    serve.add_argument("--config", help="config file (default: ./config.yaml when present, else built-in defaults)")
    serve.add_argument("--host", help="address to bind (overrides server.host)")
    serve.add_argument("--port", type=int, help="port to bind, 0 for any free port (overrides server.port)")
    serve.add_argument("--state", help="state directory (overrides storage.state_dir)")
    serve.add_argument(
        "--log-level", default=os.environ.get("LRPILOT_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (default INFO)"
    )

    replay = sub.add_parser(
        "replay",
        help="run a policy over a recorded metric stream",
        description=(
            "Run one policy over a recorded metric stream and print one JSON line per record: "
            '{"step": S, "lr": LR} plus detections and decisions.'
        ),
    )
    replay.add_argument("input", help="JSONL file, CSV file with a header row, or TensorBoard log directory")
    replay.add_argument("--policy", required=True, help="policy file (one policy block, as in config.yaml)")
    replay.add_argument(
        "--initial-lr", default="0.1", help="initial LR, or comma-separated per param group (default 0.1)"
    )
    replay.add_argument("--strict", action="store_true", help="stop at the first malformed record (default: skip it)")

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", nargs="?", help="config file (default ./config.yaml)")

    for name, help_text in (("status", "daemon status"), ("jobs", "list jobs")):
        p = sub.add_parser(name, help=help_text)
        _add_ops_options(p)
    show = sub.add_parser("show", help="one job: state, LR, recent decisions")
    show.add_argument("job")
    _add_ops_options(show)
    set_lr = sub.add_parser("set-lr", help="set a job's learning rate now")
    set_lr.add_argument("job")
    set_lr.add_argument("lrs", help="LR, or comma-separated per param group")
    set_lr.add_argument("--reason", default="", help="why, for the decision journal")
    set_lr.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who (default $USER)")
    _add_ops_options(set_lr)
    for name, help_text in (("pause", "stop automatic LR changes for a job"), ("resume", "restart them")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("job")
        p.add_argument("--reason", default="", help="why, for the decision journal")
        p.add_argument("--actor", default=os.environ.get("USER", "operator"), help="who (default $USER)")
        _add_ops_options(p)

    demo = sub.add_parser("demo", help="live demo: a daemon steering a real training run")
    demo.add_argument("--port", type=int, default=0, help="daemon port (default: any free port)")
    demo.add_argument("--steps", type=int, default=0, help="training steps (default: the demo's own)")
    demo.add_argument("--plain", action="store_true", help="plain log lines instead of a live display")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrpilot`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "replay":
        from .replay import main as replay_main

        return replay_main(args)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "serve":
        from .server.app import serve_main

        return serve_main(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    from .ops import run as ops_run

    return ops_run(args)


def _check_config(path: str | None) -> int:
    from .config import ConfigError, find_default_config, load_config

    target = path or find_default_config()
    try:
        load_config(target)
    except ConfigError as exc:
        print(f"lrpilot: {exc}", file=sys.stderr)
        return 2
    print(f"{target or '<defaults>'}: ok")
    return 0
