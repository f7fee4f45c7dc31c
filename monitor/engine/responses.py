"""What the engine does when a detector fires.

Each detector has a response, configured per detector:

=========  ===============================================================================
action     effect
=========  ===============================================================================
none       record the detection only
reduce     multiply the LR by ``factor`` (a step-driven schedule is scaled from now on)
increase   multiply the LR by ``factor`` > 1 (the same scaling as ``reduce``, upwards);
           by default only for a job that has reported a checkpoint
           (``require_checkpoint``): a raise that overshoots must have a way back
halt       ask the job to stop (as keras' TerminateOnNaN does)
rollback   ask the job to reload a good checkpoint, skip ``skip_batches`` batches, and
           continue with the LR multiplied by ``factor`` (PaLM's recipe for loss spikes).
           The checkpoint is the last one reported, or, when the detection names the step
           up to which things were fine (``detail["good_step"]``, as ``overshoot`` and ``stalled`` do),
           the last one at or before that step, then ``margin`` (1) more back: the weights
           of the last checkpoint before a loss turned may already be damaged (dead units
           cost capacity before they cost loss). ``checkpoint: last`` asks for the last one
           always, for a job that keeps only its newest. With no checkpoint reported yet:
           ``non_finite`` halts (its weights may be NaN), any other detector only
           multiplies the LR
auto       the detector's default, from the table below
=========  ===============================================================================

Defaults (``auto``):

============  ===================================================================
detector      default response
============  ===================================================================
non_finite    rollback (factor 0.3) when the job has reported a checkpoint, else halt
oscillation   reduce by 0.5
spike         a single spike: none; a burst of spikes: reduce by 0.5
divergence    reduce by 0.3
plateau       none (a plateau policy acts on plateaus itself)
slow_progress increase by 3 (an LR range test, one step per evaluation)
overshoot     rollback to the last checkpoint before the trouble began, LR × 0.1;
              with no checkpoint reported, only the LR cut
stalled       rollback to the last checkpoint at or before the start of training,
              LR × 0.1 (a network killed by a too-high LR); no checkpoint: the LR cut
============  ===================================================================

``increase`` resolves to the engine's scaling action, ``reduce``, with its factor above 1:
the engine multiplies the LR the same way, ranks it like a reduction when several detectors
fire on one record (the first in detector order wins, and ``slow_progress`` comes after
the detectors that cut), and the decision's reason says ``LR × 3``.

After a response, further detections of the same detector cause no response for
``cooldown`` records: data already in flight when the job applies a decision would
otherwise trigger it twice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from .base import ParamError

Action = Literal["auto", "none", "reduce", "increase", "halt", "rollback"]


@dataclass(frozen=True, slots=True)
class ResponseParams:
    """How the engine answers one detector's detections."""

    action: Action = "auto"
    factor: float | None = None  # None: the detector's default factor; > 1 for increase
    cooldown: int = 10  # records during which this detector causes no further response
    skip_batches: int = 0  # rollback only: batches the job skips after reloading
    # rollback only: "auto" returns to the last checkpoint from before the trouble when the
    # detection says where it began (overshoot), else to the last one; "last" always to the
    # last one (for a job that keeps only its newest checkpoint)
    checkpoint: Literal["auto", "last"] = "auto"
    # rollback to a good step only: checkpoints to go back beyond the last one at or before it
    margin: int = 1
    # increase only: raise the LR only once the job has reported a checkpoint, so that a raise
    # that overshoots can be rolled back (without one its damage stays: docs/policies.md)
    require_checkpoint: bool = True

    def __post_init__(self) -> None:
        if self.action not in ("auto", "none", "reduce", "increase", "halt", "rollback"):
            raise ParamError(
                "action",
                f"must be one of auto, none, reduce, increase, halt, rollback, not {self.action!r}",
            )
        if self.factor is not None:
            if self.action == "increase":
                if not 1.0 < self.factor < 1000.0:
                    raise ParamError("factor", f"must be in (1, 1000) to increase, got {self.factor}")
            elif not 0.0 < self.factor < 1.0:
                raise ParamError("factor", f"must be in (0, 1), got {self.factor}")
        if self.cooldown < 0:
            raise ParamError("cooldown", f"must be >= 0, got {self.cooldown}")
        if self.skip_batches < 0:
            raise ParamError("skip_batches", f"must be >= 0, got {self.skip_batches}")
        if self.checkpoint not in ("auto", "last"):
            raise ParamError("checkpoint", f"must be auto or last, not {self.checkpoint!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ParamError("margin", f"must be an integer >= 0, got {self.margin!r}")
        if not isinstance(self.require_checkpoint, bool):
            raise ParamError(
                "require_checkpoint", f"must be true or false, got {self.require_checkpoint!r}"
            )


@dataclass(frozen=True, slots=True)
class ResolvedResponse:
    """A response with ``auto`` and a missing factor replaced by the detector's defaults."""

    action: Literal["none", "reduce", "halt", "rollback"]
    factor: float
    cooldown: int
    skip_batches: int
    checkpoint: Literal["auto", "last"] = "auto"
    margin: int = 1
    require_checkpoint: bool = False  # resolved: True only for an increase that asks for it


DEFAULT_ACTIONS: dict[str, tuple[Literal["none", "reduce", "increase", "halt", "rollback"], float]] = {
    "non_finite": ("rollback", 0.3),
    "oscillation": ("reduce", 0.5),
    "spike": ("reduce", 0.5),  # bursts only; a single spike never causes a response
    "divergence": ("reduce", 0.3),
    "plateau": ("none", 0.5),
    "slow_progress": ("increase", 3.0),
    "overshoot": ("rollback", 0.1),
    "stalled": ("rollback", 0.1),
}


@functools.lru_cache(maxsize=256)
def resolve(detector: str, params: ResponseParams) -> ResolvedResponse:
    """Fill in ``auto`` and the default factor for ``detector``.

    Cached: every job of one policy shares one resolved response per detector (both are
    frozen), instead of 88 bytes each of seven copies for every job the daemon holds."""
    default_action, default_factor = DEFAULT_ACTIONS.get(detector, ("none", 0.5))
    action = default_action if params.action == "auto" else params.action
    if params.factor is not None:
        factor = params.factor
    elif (action == "increase") == (default_action == "increase"):
        factor = default_factor
    else:  # e.g. action: reduce on a detector that increases by default
        factor = 2.0 if action == "increase" else 0.5
    require = action == "increase" and params.require_checkpoint
    if action == "increase":
        action = "reduce"
    return ResolvedResponse(
        action,
        factor,
        params.cooldown,
        params.skip_batches,
        params.checkpoint,
        params.margin,
        require,
    )
