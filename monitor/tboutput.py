"""TensorBoard output: the LR lrpilot commands, its detections and decisions, per job.

Pointing TensorBoard at the same root as a job's own logs shows *why and when* the LR changed
beside the job's curves. Per job, one directory (see :func:`job_directory`) holding event files
written with the tensorboard package's record format (no TensorFlow):

    lrpilot/lr/group{i}             scalar   the LR of param group i: at every change, and at
                                             least every ``lr_every_steps`` steps
    lrpilot/detections/{detector}   scalar   1 at the step of each detection
    lrpilot/decisions/{kind}        scalar   1 at the step of each decision (set_lr, schedule,
                                             halt, rollback)
    lrpilot/detections              text     the reasons of the step's detections (markdown)
    lrpilot/decisions               text     the step's decisions: id, source, LR, reason

Steps are the job's own steps, the ones its metrics were reported at, so the points line up
with the job's curves.

Writes are cheap: an event is serialised into the job's buffered file and reaches the disk on
:meth:`TensorBoardOutput.flush` (call it periodically), when the buffer fills, or on
:meth:`close`. There is no thread per job. At most ``max_open`` files are open at once; the
least recently written one is closed first and a later write opens a new event file in the
same directory (TensorBoard reads every event file of a run).

Nothing here raises into the caller: an error (disk full, permission denied) is logged and
counted in :attr:`TensorBoardOutput.errors`, and that job's writer is dropped, to be reopened
by a later write.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto.types_pb2 import DT_STRING
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.record_writer import RecordWriter

from .engine.events import Decision, Detection

__all__ = ["TensorBoardOutput", "job_directory"]

log = logging.getLogger("lrpilot.tensorboard")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def job_directory(job: str) -> Path:
    """The relative directory of ``job``'s event files.

    ``/`` in a job name makes nested directories (TensorBoard groups them); every other
    character outside ``A-Za-z0-9._-`` becomes ``_``, and ``.``/``..``/empty segments are
    dropped. When anything had to change, a short hash of the original name is appended to
    the last segment, so that two different job names never share a directory.
    """
    segments = []
    for raw in job.split("/"):
        clean = _UNSAFE.sub("_", raw).strip()
        if clean and clean not in (".", ".."):
            segments.append(clean)
    if not segments:
        segments = ["job"]
    if "/".join(segments) != job:
        digest = hashlib.sha1(job.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        segments[-1] = f"{segments[-1]}-{digest}"
    return Path(*segments)


@dataclass(slots=True)
class _Writer:
    handle: BinaryIO
    records: RecordWriter
    dirty: bool = False


@dataclass(slots=True)
class _JobState:
    directory: Path
    last_lrs: tuple[float, ...] | None = None
    last_lr_step: int | None = None
    skip_through_step: int | None = None  # writes at or before this step are dropped


@dataclass(slots=True)
class _Stats:
    events: int = 0
    errors: int = 0
    files_opened: int = 0
    by_job_errors: dict[str, int] = field(default_factory=dict)


class TensorBoardOutput:
    """Event files of lrpilot's LR, detections and decisions, one directory per job.

    ``log_dir`` is the root (``tensorboard.log_dir`` in the config); :meth:`set_directory`
    places one job elsewhere (the directory watcher writes beside each run).
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        lr_every_steps: int = 100,
        max_open: int = 256,
        buffer_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.lr_every_steps = max(1, int(lr_every_steps))
        self.max_open = max(1, int(max_open))
        self.buffer_bytes = buffer_bytes
        self.clock = clock
        self._jobs: dict[str, _JobState] = {}
        self._writers: OrderedDict[str, _Writer] = OrderedDict()  # least recently written first
        self._stats = _Stats()

    # ------------------------------------------------------------------ views

    @property
    def errors(self) -> int:
        """Write errors so far (each was logged)."""
        return self._stats.errors

    @property
    def events_written(self) -> int:
        """Events handed to the writers so far."""
        return self._stats.events

    def directory(self, job: str) -> Path:
        """Where ``job``'s event files go."""
        return self._state(job).directory

    # ------------------------------------------------------------------ set-up

    def set_directory(
        self, job: str, directory: Path, skip_through_step: int | None = None
    ) -> None:
        """Write ``job``'s events into ``directory``; drop writes at steps <= ``skip_through_step``.

        ``skip_through_step`` lets a restarted reader replay a job's history through its
        engine without writing the points a previous run already wrote.
        """
        self.close(job)
        self._jobs[job] = _JobState(Path(directory), skip_through_step=skip_through_step)

    # ------------------------------------------------------------------ writes

    def on_outputs(
        self,
        job: str,
        step: int,
        lrs: Sequence[float],
        outputs: Sequence[Detection | Decision] = (),
        wall_time: float | None = None,
    ) -> None:
        """Record the LR in effect after ``step`` and the detections/decisions it caused.

        Cheap when nothing is due: no event is made unless the LR changed, ``lr_every_steps``
        passed since the last LR point, or there are outputs.
        """
        try:
            self._on_outputs(job, step, tuple(float(x) for x in lrs), outputs, wall_time)
        except Exception:
            self._error(job, f"cannot write TensorBoard events for job {job!r} at step {step}")

    def _on_outputs(
        self,
        job: str,
        step: int,
        lrs: tuple[float, ...],
        outputs: Sequence[Detection | Decision],
        wall_time: float | None,
    ) -> None:
        state = self._state(job)
        if state.skip_through_step is not None and step <= state.skip_through_step:
            return
        values: list[summary_pb2.Summary.Value] = []
        due = (
            state.last_lrs is None
            or lrs != state.last_lrs
            or state.last_lr_step is None
            or step - state.last_lr_step >= self.lr_every_steps
            or step < state.last_lr_step  # the job restarted from an earlier step
        )
        if due:
            for index, lr in enumerate(lrs):
                values.append(_scalar(f"lrpilot/lr/group{index}", lr))
            state.last_lrs = lrs
            state.last_lr_step = step
        detections = [o for o in outputs if isinstance(o, Detection)]
        decisions = [o for o in outputs if isinstance(o, Decision)]
        for name in dict.fromkeys(d.detector for d in detections):
            values.append(_scalar(f"lrpilot/detections/{name}", 1.0))
        for kind in dict.fromkeys(d.kind.value for d in decisions):
            values.append(_scalar(f"lrpilot/decisions/{kind}", 1.0))
        if detections:
            values.append(_text("lrpilot/detections", _detections_markdown(detections)))
        if decisions:
            values.append(_text("lrpilot/decisions", _decisions_markdown(decisions)))
        if not values:
            return
        event = event_pb2.Event(
            wall_time=self.clock() if wall_time is None else wall_time,
            step=step,
            summary=summary_pb2.Summary(value=values),
        )
        self._write(job, state, event.SerializeToString())

    def flush(self) -> None:
        """Push every buffered event to disk."""
        for job, writer in list(self._writers.items()):
            if not writer.dirty:
                continue
            try:
                writer.handle.flush()
                writer.dirty = False
            except Exception:
                self._drop(job)
                self._error(job, f"cannot flush TensorBoard events of job {job!r}")

    def close(self, job: str) -> None:
        """Flush and close ``job``'s event file (a later write opens a new one)."""
        writer = self._writers.pop(job, None)
        if writer is None:
            return
        try:
            writer.handle.close()
        except Exception:
            self._error(job, f"cannot close TensorBoard events of job {job!r}")

    def forget(self, job: str) -> None:
        """Close ``job``'s file and drop what is remembered about it."""
        self.close(job)
        self._jobs.pop(job, None)

    def close_all(self) -> None:
        """Flush and close every open event file."""
        for job in list(self._writers):
            self.close(job)

    # ------------------------------------------------------------------ internals

    def _state(self, job: str) -> _JobState:
        state = self._jobs.get(job)
        if state is None:
            state = _JobState(self.log_dir / job_directory(job))
            self._jobs[job] = state
        return state

    def _write(self, job: str, state: _JobState, record: bytes) -> None:
        writer = self._writers.get(job)
        if writer is None:
            writer = self._open(job, state.directory)
        else:
            self._writers.move_to_end(job)
        writer.records.write(record)
        writer.dirty = True
        self._stats.events += 1

    def _open(self, job: str, directory: Path) -> _Writer:
        while len(self._writers) >= self.max_open:
            oldest = next(iter(self._writers))
            self.close(oldest)
        directory.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        # the name TensorBoard's own writers use, plus a counter so that reopening never collides
        self._stats.files_opened += 1
        name = (
            f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
            f".{self._stats.files_opened}.lrpilot"
        )
        handle = open(directory / name, "wb", buffering=self.buffer_bytes)  # noqa: SIM115 (kept open)
        writer = _Writer(handle, RecordWriter(handle))
        version = event_pb2.Event(wall_time=now, step=0, file_version="brain.Event:2")
        writer.records.write(version.SerializeToString())
        writer.dirty = True
        self._writers[job] = writer
        return writer

    def _drop(self, job: str) -> None:
        writer = self._writers.pop(job, None)
        if writer is not None:
            try:
                writer.handle.close()
            except Exception:
                log.debug("closing a failed TensorBoard writer of %r", job, exc_info=True)

    def _error(self, job: str, message: str) -> None:
        self._stats.errors += 1
        self._stats.by_job_errors[job] = self._stats.by_job_errors.get(job, 0) + 1
        log.exception(message)
        self._drop(job)


def _scalar(tag: str, value: float) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(tag=tag, simple_value=value)


_TEXT_METADATA = text_metadata.create_summary_metadata(display_name="", description="")


def _text(tag: str, markdown: str) -> summary_pb2.Summary.Value:
    tensor = tensor_pb2.TensorProto(
        dtype=DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[markdown.encode("utf-8")],
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=_TEXT_METADATA)


def _number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def _detections_markdown(detections: Sequence[Detection]) -> str:
    lines = [
        f"- **{d.detector}** on `{d.metric}` = {_number(d.value)}: {d.reason}" for d in detections
    ]
    return "\n".join(lines)


def _decisions_markdown(decisions: Sequence[Decision]) -> str:
    lines = []
    for d in decisions:
        parts = [f"- decision {d.id} **{d.kind.value}** by {d.source}, from step {d.apply_at_step}"]
        if d.lrs is not None:
            parts.append(f", LR {', '.join(_number(x) for x in d.lrs)}")
        if d.schedule is not None:
            parts.append(f", schedule {d.schedule.get('kind', '?')}")
        if d.rollback_to_step is not None:
            parts.append(f", roll back to step {d.rollback_to_step}")
        if d.actor:
            parts.append(f" (by {d.actor})")
        parts.append(f": {d.reason}")
        lines.append("".join(parts))
    return "\n".join(lines)
