"""The pure decision engine: metric events in, decisions out.

No module under ``monitor.engine`` opens a socket, a file or a thread, reads a clock, or
imports asyncio, websockets, prometheus_client, watchdog or pydantic: a test enforces it.
"""

from .events import (
    CheckpointSaved,
    Decision,
    DecisionKind,
    Detection,
    Metrics,
    Output,
)
from .job import DetectorSpec, JobEngine, JobSpec, PolicySpec
from .responses import ResponseParams

__all__ = [
    "CheckpointSaved",
    "Decision",
    "DecisionKind",
    "Detection",
    "DetectorSpec",
    "JobEngine",
    "JobSpec",
    "Metrics",
    "Output",
    "PolicySpec",
    "ResponseParams",
]
