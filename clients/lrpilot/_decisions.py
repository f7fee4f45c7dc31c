"""Decisions on the job side: when they apply and what learning rate they give at each step.

This is the client's sans-I/O core. The sender thread hands it decisions as they arrive
(:meth:`LRState.receive`); the training thread asks for the LR of each step
(:meth:`LRState.lrs_for_step`). Rules:

- A decision applies at the first step ``s >= apply_at_step`` the job asks about, so every
  rank of a multi-rank job switches at the same step. Pending decisions are kept sorted by
  ``(apply_at_step, id)`` and applied in that order.
- Each decision id is applied once (a decision received twice, for example again in a
  welcome after a reconnect, is ignored) and acked once, with ``applied_at_step = s``.
- ``set_lr`` with one value for a job with several param groups keeps the ratios between the
  groups' current LRs. It replaces any schedule segment.
- ``schedule`` installs a segment that is evaluated locally at every step with
  ``lrpilot.schedules.lrs_at(segment, step)``; a segment with one LR per step for several
  groups keeps the ratios the groups had when it was installed.
- ``halt`` sets :attr:`LRState.halted`; ``rollback`` hands (checkpoint step, skip batches) to
  the rollback handlers and then sets its LRs / segment like set_lr / schedule.

If a segment cannot be evaluated (a bug, or a kind this client does not know), the job keeps
its last LR: training is never stopped by lrpilot's own failure.
"""

from __future__ import annotations

import bisect
import enum
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import schedules

__all__ = ["Decision", "DecisionKind", "Halted", "LRState"]

log = logging.getLogger("lrpilot")


class DecisionKind(str, enum.Enum):
    """What a decision asks the job to do."""

    SET_LR = "set_lr"
    SCHEDULE = "schedule"
    HALT = "halt"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class Decision:
    """One instruction from the daemon (the wire ``decision`` message, typed)."""

    id: int
    kind: DecisionKind
    apply_at_step: int
    source: str
    reason: str
    lrs: tuple[float, ...] | None = None
    momentums: tuple[float, ...] | None = None
    schedule: Mapping[str, Any] | None = None
    rollback_to_step: int | None = None
    skip_batches: int = 0
    actor: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Build from a dict that ``lrpilot._protocol.validate_decision`` accepted."""
        lrs = data.get("lrs")
        momentums = data.get("momentums")
        return cls(
            id=int(data["id"]),
            kind=DecisionKind(data["kind"]),
            apply_at_step=int(data["apply_at_step"]),
            source=str(data["source"]),
            reason=str(data["reason"]),
            lrs=None if lrs is None else tuple(float(x) for x in lrs),
            momentums=None if momentums is None else tuple(float(x) for x in momentums),
            schedule=data.get("schedule"),
            rollback_to_step=data.get("rollback_to_step"),
            skip_batches=int(data.get("skip_batches") or 0),
            actor=data.get("actor"),
        )


class Halted(Exception):
    """The daemon decided to stop this training run (``reason`` says why)."""

    def __init__(self, reason: str, decision: Decision | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decision = decision


class LRState:
    """The learning rate (and momentum) per param group over steps, driven by decisions.

    Thread use: :meth:`receive` is called by the sender thread, everything else by the
    training thread; a lock guards the pending queue only. ``acks`` is a deque the sender
    drains: ``(decision id, applied_at_step)`` pairs.
    """

    def __init__(
        self,
        initial_lrs: Sequence[float],
        initial_momentums: Sequence[float] | None = None,
        on_apply: Callable[[Decision, int], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        if not initial_lrs:
            raise ValueError("initial_lr: need at least one learning rate")
        self.initial_lrs = tuple(float(x) for x in initial_lrs)
        self._lrs = list(self.initial_lrs)
        self._momentums = (
            None if initial_momentums is None else [float(m) for m in initial_momentums]
        )
        self._segment: Mapping[str, Any] | None = None
        self._segment_ratios: list[float] = [1.0] * len(self._lrs)
        self._pending: list[tuple[int, int, Decision]] = []
        self._seen_ids: set[int] = set()
        self._lock = threading.Lock()
        self._on_apply = on_apply
        self._on_error = on_error
        self.acks: deque[tuple[int, int]] = deque()
        self.applied: list[tuple[Decision, int]] = []
        self.halted = False
        self.halt_reason: str | None = None
        self.last_received_id: int | None = None
        self.errors = 0
        self._segment_warned: object = None

    # ------------------------------------------------------------------ sender side

    def receive(self, decision: Decision) -> bool:
        """Queue a decision until its apply step; False if this id was already received."""
        with self._lock:
            if decision.id in self._seen_ids:
                return False
            self._seen_ids.add(decision.id)
            if self.last_received_id is None or decision.id > self.last_received_id:
                self.last_received_id = decision.id
            bisect.insort(self._pending, (decision.apply_at_step, decision.id, decision))
        return True

    @property
    def pending(self) -> list[Decision]:
        """Decisions received but not applied yet, in the order they will apply."""
        with self._lock:
            return [d for _, _, d in self._pending]

    # ------------------------------------------------------------------ training side

    @property
    def n_groups(self) -> int:
        return len(self._lrs)

    @property
    def lrs(self) -> list[float]:
        """The LR per group at the last step asked about (the initial LRs before any)."""
        return list(self._lrs)

    @property
    def momentums(self) -> list[float] | None:
        return None if self._momentums is None else list(self._momentums)

    @property
    def segment(self) -> Mapping[str, Any] | None:
        return self._segment

    def lrs_for_step(self, step: int) -> list[float]:
        """Apply the decisions due at ``step`` and return the LR per group for it."""
        if self._pending and self._pending[0][0] <= step:
            self._apply_due(step)
        if self._segment is not None:
            self._evaluate_segment(step)
        return list(self._lrs)

    def _apply_due(self, step: int) -> None:
        with self._lock:
            cut = 0
            while cut < len(self._pending) and self._pending[cut][0] <= step:
                cut += 1
            due = [d for _, _, d in self._pending[:cut]]
            del self._pending[:cut]
        hook_error: BaseException | None = None
        for decision in due:
            try:
                self._apply(decision, step)
            except Exception as exc:  # a decision we cannot follow must not stop training
                self._count_error()
                log.warning("lrpilot: cannot apply decision %s: %s", decision.id, exc)
                continue
            self.acks.append((decision.id, step))
            self.applied.append((decision, step))
            if self._on_apply is not None:
                try:
                    self._on_apply(decision, step)
                except Exception as exc:  # the user's hook: finish applying, then tell them
                    hook_error = hook_error or exc
        if hook_error is not None:
            raise hook_error

    def _apply(self, decision: Decision, step: int) -> None:
        kind = decision.kind
        if kind is DecisionKind.HALT:
            self.halted = True
            self.halt_reason = decision.reason or f"halted by {decision.source}"
            return
        new_lrs = self._expand(decision.lrs, "lrs") if decision.lrs is not None else None
        new_momentums = (
            None if decision.momentums is None else self._expand_momentums(decision.momentums)
        )
        if kind is DecisionKind.SCHEDULE or (kind is DecisionKind.ROLLBACK and decision.schedule):
            if decision.schedule is None:
                raise ValueError("schedule decision without a segment")
            self._segment_ratios = self._ratios()
            self._segment = decision.schedule
            if new_momentums is not None:
                self._momentums = new_momentums
            self._evaluate_segment(step, strict=True)
            return
        if new_lrs is not None:
            self._segment = None
            self._lrs = new_lrs
        if new_momentums is not None:
            self._momentums = new_momentums

    def _ratios(self) -> list[float]:
        for ref in (self._lrs, self.initial_lrs):
            if ref[0] > 0 and all(math.isfinite(x) for x in ref):
                return [x / ref[0] for x in ref]
        return [1.0] * len(self._lrs)

    def _expand(self, values: Sequence[float], what: str) -> list[float]:
        n = len(self._lrs)
        if len(values) == n:
            return [float(v) for v in values]
        if len(values) == 1:
            return [float(values[0]) * r for r in self._ratios()]
        raise ValueError(f"{what} has {len(values)} entries but the job has {n} param groups")

    def _expand_momentums(self, values: Sequence[float]) -> list[float]:
        n = len(self._lrs)
        if len(values) == n:
            return [float(v) for v in values]
        if len(values) == 1:
            return [float(values[0])] * n
        raise ValueError(f"momentums has {len(values)} entries but the job has {n} param groups")

    def _evaluate_segment(self, step: int, strict: bool = False) -> None:
        segment = self._segment
        assert segment is not None
        try:
            lrs = schedules.lrs_at(segment, step)
            momentums = schedules.momentums_at(segment, step)
            n = len(self._lrs)
            if len(lrs) == 1 and n > 1:
                lrs = [lrs[0] * r for r in self._segment_ratios]
            elif len(lrs) != n:
                raise ValueError(f"segment gives {len(lrs)} LRs but the job has {n} param groups")
            self._lrs = lrs
            if momentums is not None:
                self._momentums = self._expand_momentums(momentums)
        except Exception:
            if strict:
                self._segment = None
                raise
            # keep the last LR; count it once per step, log once per segment
            self._count_error()
            if self._segment_warned is not segment:
                self._segment_warned = segment
                log.warning(
                    "lrpilot: cannot evaluate schedule segment; keeping the last LR", exc_info=True
                )

    def _count_error(self) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error()
