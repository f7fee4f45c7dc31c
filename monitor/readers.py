"""Readers of recorded metric streams: JSONL, CSV and TensorBoard log directories.

Formats (documented for users in docs/replay.md):

- **JSONL**: one JSON object per line, ``{"step": 12, "loss": 0.53, "val_loss": 0.61}``.
  ``step`` is required (an integer); ``epoch``, ``rank`` and ``time`` are optional; every
  other key is a metric. A value may be a number, ``null`` (not reported), or one of
  ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (bare ``NaN``/``Infinity`` tokens are accepted
  too). A line ``{"checkpoint": 1200}`` reports a good checkpoint.
- **CSV**: a header row with a ``step`` column; empty cells are "not reported"; ``nan``,
  ``inf`` and ``-inf`` are read as such.
- **TensorBoard**: a log directory (or one event file); every scalar tag becomes a metric,
  records are grouped by step. Read with the tensorboard package, no TensorFlow.

Readers yield ``(line, event)``; for a malformed record the event is a :class:`RecordError`
carrying the line number, so that the caller decides whether to skip it or stop. A file that
cannot be read at all raises :class:`RecordError`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .engine.events import CheckpointSaved, Metrics

_RESERVED = ("step", "epoch", "rank", "time")
_NON_FINITE = {"nan": math.nan, "infinity": math.inf, "-infinity": -math.inf, "inf": math.inf, "-inf": -math.inf}


class RecordError(ValueError):
    """One malformed record: ``source`` and ``line`` say where, ``message`` what is wrong."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}: line {line}: {message}")
        self.source = source
        self.line = line
        self.message = message


def parse_value(value: Any, field: str) -> float | None:
    """A metric value from JSON/CSV: a float (NaN and ±Inf included), or None for absent."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        special = _NON_FINITE.get(value.strip().lower())
        if special is not None:
            return special
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{field}: expected a number, got {value!r}")


def record_from_mapping(data: Any) -> Metrics | CheckpointSaved:
    """One event from a decoded JSON object; raises ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    if "checkpoint" in data and "step" not in data:
        step = data["checkpoint"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"checkpoint: expected an integer step, got {step!r}")
        return CheckpointSaved(step)
    step = data.get("step")
    if step is None:
        raise ValueError("step: missing")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"step: expected an integer, got {step!r}")
    values: dict[str, float] = {}
    for key, raw in data.items():
        if key in _RESERVED:
            continue
        value = parse_value(raw, key)
        if value is not None:
            values[key] = value
    epoch = data.get("epoch")
    rank = data.get("rank", 0)
    time = data.get("time")
    if epoch is not None and not isinstance(epoch, int):
        raise ValueError(f"epoch: expected an integer, got {epoch!r}")
    if not isinstance(rank, int):
        raise ValueError(f"rank: expected an integer, got {rank!r}")
    if time is not None and not isinstance(time, (int, float)):
        raise ValueError(f"time: expected a number, got {time!r}")
    return Metrics(step, values, epoch=epoch, rank=rank, time=None if time is None else float(time))


def read_jsonl(path: Path) -> Iterator[tuple[int, Metrics | CheckpointSaved | RecordError]]:
    """Events from a JSONL file, with their line numbers."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RecordError(str(path), number, f"invalid JSON: {exc.msg} at column {exc.colno}")
                continue
            try:
                yield number, record_from_mapping(data)
            except ValueError as exc:
                yield number, RecordError(str(path), number, str(exc))


def read_csv(path: Path) -> Iterator[tuple[int, Metrics | CheckpointSaved | RecordError]]:
    """Events from a CSV file with a header row, with their line numbers."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        if "step" not in header:
            raise RecordError(str(path), 1, f"header has no 'step' column: {header}")
        for row in reader:
            number = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield number, RecordError(str(path), number, f"expected {len(header)} cells, got {len(row)}")
                continue
            try:
                yield number, record_from_mapping(_csv_row(header, row))
            except ValueError as exc:
                yield number, RecordError(str(path), number, str(exc))


def _csv_row(header: list[str], row: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, cell in zip(header, row, strict=True):
        cell = cell.strip()
        if key in ("step", "epoch", "rank"):
            if not cell:
                continue
            try:
                data[key] = int(float(cell))
            except ValueError:
                raise ValueError(f"{key}: expected an integer, got {cell!r}") from None
        elif key == "time":
            data[key] = float(cell) if cell else None
        else:
            data[key] = cell
    return data


def read_tensorboard(path: Path) -> Iterator[tuple[int, Metrics | CheckpointSaved | RecordError]]:
    """Records from a TensorBoard log directory or event file, one per step, in step order.

    The "line" of a record is its index (1-based) in step order.
    """
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    try:
        acc.Reload()
    except Exception as exc:  # the reader raises several kinds on corrupt files
        raise RecordError(str(path), 0, f"cannot read TensorBoard events: {exc}") from None
    by_step: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    tags = acc.Tags()
    for tag in tags.get("scalars", []):
        for event in acc.Scalars(tag):
            by_step.setdefault(event.step, {})[tag] = float(event.value)
            times.setdefault(event.step, event.wall_time)
    for tag in tags.get("tensors", []):
        for tensor_event in acc.Tensors(tag):
            proto = tensor_event.tensor_proto
            if proto.tensor_shape.dim:
                continue  # not a scalar
            if proto.float_val:
                value = float(proto.float_val[0])
            elif proto.double_val:
                value = float(proto.double_val[0])
            else:
                continue
            by_step.setdefault(tensor_event.step, {})[tag] = value
            times.setdefault(tensor_event.step, tensor_event.wall_time)
    for index, step in enumerate(sorted(by_step), 1):
        yield index, Metrics(step, by_step[step], time=times.get(step))


def read_stream(path: Path) -> Iterator[tuple[int, Metrics | CheckpointSaved | RecordError]]:
    """Events from ``path``, by its kind: a directory or tfevents file, .csv, else JSONL."""
    if path.is_dir() or "tfevents" in path.name:
        return read_tensorboard(path)
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    return read_jsonl(path)
