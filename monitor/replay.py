"""``lrpilot replay``: run one policy over a recorded metric stream, offline.

One JSON line per input record::

    {"step": 12, "lr": 0.01}
    {"step": 13, "lr": 0.001, "detections": [...], "decisions": [...]}

``lr`` is the learning rate in effect after the record was processed (``lrs`` too when there
are several param groups). Only what the policy file names is active; every record is one
scheduler step and every record carrying the monitored metric is one evaluation, so the LR
sequence equals what the torch scheduler (or keras callback) produces on the same values.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .config import ConfigError, load_policy_file
from .engine.events import CheckpointSaved, Decision, Detection, Metrics
from .engine.job import JobEngine, JobSpec
from .readers import RecordError, read_stream


def jsonable(value: Any) -> Any:
    """Non-finite floats as "NaN"/"Infinity"/"-Infinity", the way the wire protocol sends them."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def detection_dict(d: Detection) -> dict[str, Any]:
    """A detection as JSON-ready data."""
    return {
        "detector": d.detector,
        "metric": d.metric,
        "step": d.step,
        "value": d.value,
        "reason": d.reason,
        "detail": dict(d.detail),
    }


def replay(
    spec: JobSpec,
    path: Path,
    initial_lrs: Sequence[float],
    out: TextIO,
    err: TextIO,
    strict: bool = False,
) -> int:
    """Replay ``path`` through a fresh job engine; return the process exit status."""
    job = JobEngine(spec, initial_lrs)
    multi = len(job.lrs) > 1
    pending: list[Detection | Decision] = list(job.start())  # reported with the first record
    bad = 0
    records = 0
    try:
        stream = read_stream(path)
        for _number, event in stream:
            if isinstance(event, RecordError):
                bad += 1
                print(f"lrpilot replay: {event}", file=err)
                if strict:
                    print("lrpilot replay: stopping at the first malformed record (--strict)", file=err)
                    return 2
                continue
            outputs = job.feed(event)
            if pending and isinstance(event, Metrics):
                outputs, pending = pending + outputs, []
            if isinstance(event, CheckpointSaved):
                out.write(json.dumps({"checkpoint": event.step}) + "\n")
                continue
            records += 1
            out.write(json.dumps(jsonable(_line(event, job, outputs, multi)), allow_nan=False) + "\n")
    except RecordError as exc:
        print(f"lrpilot replay: {exc}", file=err)
        return 2
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"lrpilot replay: {path}: cannot read: {exc.strerror or exc}", file=err)
        return 2
    if bad:
        print(f"lrpilot replay: skipped {bad} malformed record(s) of {records + bad}", file=err)
    return 0


def _line(event: Metrics, job: JobEngine, outputs: list[Detection | Decision], multi: bool) -> dict[str, Any]:
    line: dict[str, Any] = {"step": event.step, "lr": job.lrs[0]}
    if multi:
        line["lrs"] = list(job.lrs)
    momentums = job.policy.momentums
    if momentums is not None:
        line["momentum"] = momentums[0]
    detections = [detection_dict(o) for o in outputs if isinstance(o, Detection)]
    decisions = [o.to_dict() for o in outputs if isinstance(o, Decision)]
    if detections:
        line["detections"] = detections
    if decisions:
        line["decisions"] = decisions
    return line


def parse_lrs(text: str) -> list[float]:
    """``0.1`` or ``0.1,0.01`` (one per param group)."""
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--initial-lr: expected a number or comma-separated numbers, got {text!r}") from None
    if not lrs or any(not math.isfinite(x) or x < 0 for x in lrs):
        raise ValueError(f"--initial-lr: expected non-negative numbers, got {text!r}")
    return lrs


def main(args: Any) -> int:
    """Entry point of ``lrpilot replay``."""
    try:
        spec = load_policy_file(args.policy)
        initial = parse_lrs(args.initial_lr)
    except (ConfigError, ValueError) as exc:
        print(f"lrpilot replay: {exc}", file=sys.stderr)
        return 2
    path = Path(args.input)
    if not path.exists():
        print(f"lrpilot replay: {path}: no such file or directory", file=sys.stderr)
        return 2
    try:
        return replay(spec, path, initial, sys.stdout, sys.stderr, strict=args.strict)
    except BrokenPipeError:  # `lrpilot replay ... | head`: stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes it at exit)
        return 0
