"""One job's engine: its policy, its detectors, and the responses that tie them together.

A :class:`JobEngine` takes events (:class:`Metrics`, :class:`CheckpointSaved`) and returns
outputs (:class:`Detection`, :class:`Decision`); it owns no clock, socket or file. The daemon,
the directory watcher and ``lrpilot replay`` are shells that feed it.

Per record, in this order:

1. bookkeeping: the reporting rank's last step, the last value of every metric;
2. detectors, in :data:`~monitor.engine.registry.DETECTOR_ORDER`. A single spike (not a
   burst) on a metric keeps that record's value of the metric out of the plateau detector
   and out of a plateau policy, so that one outlier is not counted as a bad evaluation
   (pytorch issue 30873);
3. the policy advances to the record's *position* (see :class:`JobSpec.clock`) with the
   monitored metric's value if the record has it; a plateau reduction becomes a SET_LR
   decision;
4. at most one response to this record's detections, the most severe one
   (halt > rollback > reduce), unless that detector is cooling down.

Multi-rank jobs: every rank's records move that rank's last step, which decides
``apply_at_step`` (ahead of every rank, so that all ranks switch together); detectors and the
policy see rank 0's metrics only.

A paused job (``lrpilot pause``) still runs its detectors but makes no automatic decision;
a halted job makes no decision at all.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .base import Detector, Policy
from .events import CheckpointSaved, Decision, DecisionKind, Detection, Metrics, Output
from .policies.anneal import Anneal
from .registry import DETECTOR_ORDER, build_detector, build_policy
from .responses import ResolvedResponse, ResponseParams, resolve

STATE_VERSION = 1

#: what :meth:`JobEngine.exported` returns: (lrs, last_values, nonfinite_counts,
#: plateau_bad_evaluations, last_step, decisions_made, detection_counts)
ExportedFields = tuple[
    tuple[float, ...],
    dict[str, float],
    dict[str, int],
    int | None,
    int | None,
    int,
    dict[str, int],
]

#: checkpoints remembered per job as rollback targets (the most recent ones)
MAX_CHECKPOINTS = 64

_SEVERITY = {"none": 0, "reduce": 1, "rollback": 2, "halt": 3}


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A validated policy block: its kind, its parameters, an optional warmup and an
    optional anneal at the end."""

    kind: str
    params: Any
    warmup: Any = None  # WarmupParams, or None for no warmup
    anneal: Any = None  # AnnealParams, or None for no anneal

    def to_block(self) -> dict[str, Any]:
        """The policy block as a config file would write it."""
        block: dict[str, Any] = {"kind": self.kind, **_jsonable(dataclasses.asdict(self.params))}
        if self.warmup is not None:
            block["warmup"] = dataclasses.asdict(self.warmup)
        if self.anneal is not None:
            block["anneal"] = dataclasses.asdict(self.anneal)
        return block


@dataclass(frozen=True, slots=True)
class DetectorSpec:
    """A validated detector block with its response."""

    name: str
    params: Any
    response: ResponseParams = field(default_factory=ResponseParams)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything that configures one job's engine.

    ``clock`` says how a record maps to a schedule position: ``"steps"`` (the daemon) uses
    the job's own step, position = step + 1, so that the job evaluating a schedule segment
    at its step agrees with the engine; ``"records"`` (replay) advances the position by one
    per record, whatever the record's step, like one ``scheduler.step()`` per record.

    ``apply_at_step`` lies ``apply_lead_steps`` ahead of the furthest rank, or further: as
    many steps as the job makes in ``apply_lead_seconds`` (its step rate is estimated from
    the ``time`` fields of rank 0's records), so that a decision reaches every rank before
    the step at which it applies, however fast the job steps.
    """

    policy: PolicySpec
    detectors: tuple[DetectorSpec, ...] = ()
    apply_lead_steps: int = 1
    apply_lead_seconds: float = 0.0
    clock: Literal["steps", "records"] = "steps"
    spikes_skip_plateau: bool = True


@dataclass(slots=True)
class _ArmedDetector:
    name: str
    detector: Detector
    response: ResolvedResponse
    #: the one metric the detector reads, if it reads one: a record without it is skipped
    #: (Detector.monitored's contract)
    metric: str | None = None


class JobEngine:
    """The policy and detectors of one job, fed one event at a time."""

    def __init__(self, spec: JobSpec, initial_lrs: Sequence[float], world_size: int = 1) -> None:
        if not initial_lrs:
            raise ValueError("initial_lrs: at least one param group is needed")
        self.spec = spec
        self.initial_lrs = tuple(float(x) for x in initial_lrs)
        self.world_size = world_size
        self.policy: Policy = build_policy(
            spec.policy.kind,
            spec.policy.params,
            self.initial_lrs,
            spec.policy.warmup,
            spec.policy.anneal,
        )
        armed = []
        for d in spec.detectors:
            detector = build_detector(d.name, d.params)
            monitored = detector.monitored()
            metric = monitored[0] if len(monitored) == 1 else None
            armed.append(_ArmedDetector(d.name, detector, resolve(d.name, d.response), metric))
        armed.sort(key=lambda a: DETECTOR_ORDER.index(a.name) if a.name in DETECTOR_ORDER else 99)
        self._detectors = armed
        #: the configured detectors' names, in the order they see a record
        self.detector_names = tuple(a.name for a in armed)
        self._next_id = 1
        self._rank_steps: dict[int, int] = {}
        #: while :meth:`feed_batch` feeds a frame of rank 0: the frame's last step, which the
        #: job has reported already, so that a decision taken on an earlier record of the
        #: frame applies after it (see :meth:`_apply_at`)
        self._frame_last_step: int | None = None
        self._records = 0
        self._checkpoint_step: int | None = None
        self._checkpoints: list[int] = []  # steps of the reported checkpoints, ascending
        # a rollback on its way to the job: (apply_at_step, furthest step when decided, target)
        self._pending_rewind: tuple[int, int, int] | None = None
        self._rate: float | None = None  # steps per second, from records' times
        self._rate_ref: tuple[int, float] | None = None
        self._cooldowns: dict[str, int] = {}
        self.paused = False
        self.halted = False
        self.detection_counts: dict[str, int] = {}
        self.decision_counts: dict[str, int] = {}  # "kind:source" -> count
        self.nonfinite_counts: dict[str, int] = {}
        self.last_values: dict[str, float] = {}
        #: where :attr:`plateau_bad_evaluations` finds its number, for :meth:`exported`
        self._plateau_counter = _plateau_counter(self.policy, armed)
        self._anneal = self.policy if isinstance(self.policy, Anneal) else None

    # ------------------------------------------------------------------ views

    @property
    def lrs(self) -> tuple[float, ...]:
        """The LR per param group in effect after the last record."""
        return self.policy.lrs

    @property
    def segment(self) -> dict[str, Any] | None:
        """The schedule segment the job evaluates locally, if the policy is step-driven."""
        return None if self.paused else self.policy.segment()

    @property
    def policy_block(self) -> dict[str, Any]:
        """The effective policy, as a config block."""
        return self.spec.policy.to_block()

    @property
    def last_step(self) -> int | None:
        """The highest last-reported step over all ranks."""
        return max(self._rank_steps.values()) if self._rank_steps else None

    @property
    def checkpoint_step(self) -> int | None:
        """The step of the last good checkpoint the job reported."""
        return self._checkpoint_step

    @property
    def decisions_made(self) -> int:
        """Decisions taken so far (the last decision's id)."""
        return self._next_id - 1

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """The steps of the checkpoints a rollback may return to, oldest first."""
        return tuple(self._checkpoints)

    @property
    def plateau_bad_evaluations(self) -> int | None:
        """Evaluations without improvement so far, from the plateau policy or detector."""
        counter = self._plateau_counter
        return None if counter is None else int(getattr(counter[0], counter[1]))

    def exported(self) -> ExportedFields:
        """What the exporter reads of this job at every scrape, in one call.

        The same values as :attr:`lrs`, :attr:`last_values`, :attr:`nonfinite_counts`,
        :attr:`plateau_bad_evaluations`, :attr:`last_step`, :attr:`decisions_made` and
        :attr:`detection_counts` read one by one (the dicts are the engine's own: read, do
        not keep). A scrape of 1,000 busy jobs calls this once per job instead of seven
        attribute reads, and finds the plateau counter without walking the policy and the
        detectors again: the objects it lives on are made with the engine and never replaced.
        """
        steps = self._rank_steps
        counter = self._plateau_counter
        return (
            self.policy.lrs,
            self.last_values,
            self.nonfinite_counts,
            None if counter is None else int(getattr(counter[0], counter[1])),
            max(steps.values()) if steps else None,
            self._next_id - 1,
            self.detection_counts,
        )

    @property
    def min_lrs(self) -> tuple[float, ...]:
        """The LR floor per param group (0 where the policy has none)."""
        inner = _innermost(self.policy)
        floor = getattr(getattr(inner, "params", None), "min_lr", None)
        if floor is None:
            floor = getattr(getattr(inner, "params", None), "eta_min", 0.0)
        if isinstance(floor, (tuple, list)):
            return tuple(float(x) for x in floor)
        return tuple(float(floor or 0.0) for _ in self.initial_lrs)

    @property
    def monitored(self) -> tuple[str, ...]:
        """Every metric the policy or a detector reads."""
        names: list[str] = []
        if self.policy.monitor:
            names.append(self.policy.monitor)
        for armed in self._detectors:
            names.extend(m for m in armed.detector.monitored() if m not in names)
        return tuple(names)

    @property
    def total_steps(self) -> int | None:
        """The run's planned length, if the policy's anneal knows it."""
        anneal = self._anneal
        return None if anneal is None else anneal.total_steps

    @property
    def anneal_start(self) -> int | None:
        """The first step of the anneal at the run's end, if there will be one."""
        span = None if self._anneal is None else self._anneal.span
        return None if span is None else span[0]

    def plan(self, total_steps: int | None) -> None:
        """The job's planned length in steps (its hello's ``total_steps``; None: unknown).

        Only a policy with an ``anneal`` uses it; a ``total_steps`` in the anneal block
        itself wins. Kept in :meth:`state_dict`.
        """
        if self._anneal is not None:
            self._anneal.plan(total_steps)

    # ------------------------------------------------------------------ input

    def start(self) -> list[Decision]:
        """The decision that installs the initial schedule, for step-driven policies."""
        segment = self.policy.segment()
        if segment is None or self._next_id != 1:
            return []
        return [
            self._decide(
                DecisionKind.SCHEDULE,
                self.policy.kind,
                f"initial schedule: {_describe_segment(segment)}",
                apply_at_step=0,
                schedule=segment,
            )
        ]

    def feed(self, event: Metrics | CheckpointSaved) -> list[Output]:
        """Advance on one event; return the detections and decisions it caused."""
        if isinstance(event, CheckpointSaved):
            self._checkpoint_saved(event.step)
            return []
        if event.rank != 0:
            self._rank_steps[event.rank] = event.step
            return []
        if self._pending_rewind is not None:
            self._maybe_rewind(event.step)
        self._rank_steps[0] = event.step
        if event.time is not None:
            self._track_rate(event.step, event.time)
        values = event.values
        self.last_values.update(values)
        out: list[Output] = []
        if self.halted:
            return out

        skip_metrics: set[str] | None = None
        response: tuple[_ArmedDetector, Detection] | None = None
        for armed in self._detectors:
            metric = armed.metric
            if metric is not None and metric not in values:
                continue
            if skip_metrics and armed.name == "plateau":
                monitored = armed.detector.monitored()
                if monitored and monitored[0] in skip_metrics:
                    armed.detector.skip_next_evaluation()  # type: ignore[attr-defined]
            detections = armed.detector.feed(event)
            if not detections:
                continue
            for detection in detections:
                out.append(detection)
                response, kept_out = self._take(armed, detection, response)
                if kept_out is not None:
                    skip_metrics = skip_metrics or set()
                    skip_metrics.add(kept_out)

        if self._cooldowns:
            self._tick_cooldowns(1)

        if self.spec.clock == "records":
            self._records += 1
            position = self._records
        else:
            position = event.step + 1
        monitor = self.policy.monitor
        evaluation = values.get(monitor) if monitor is not None else None
        if evaluation is not None and skip_metrics and monitor in skip_metrics:
            evaluation = None
        if not self.paused:
            self._advance(position, evaluation, response, out)
        return out

    def feed_batch(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        epochs: Sequence[int | None] | None = None,
        times: Sequence[float | None] | None = None,
        rank: int = 0,
    ) -> list[Output]:
        """Advance on a columnar batch of records (one metrics frame) and return its outputs.

        Record ``i`` is ``Metrics(steps[i], {name: columns[name][i]}, epochs[i], rank,
        times[i])`` without the None values; the outputs are those of :meth:`feed` on each
        record in turn, in record order. Each detector runs over the whole frame at once
        (:meth:`Detector.feed_columns`), which is what makes a frame of 100 steps cheap;
        decisions are then taken at the records where something fired or the policy
        evaluated, with the same cooldowns and positions as record by record.

        Three differences from :meth:`feed`, all about a decision taken inside the frame:

        * its ``apply_at_step`` counts the apply lead from the frame's last step (or a
          further rank's), not from the step of the record that triggered it (the daemon
          feeds the frames it read at once as one batch: the batch's last step): the job has
          reported the whole frame already, so it is past that record's step by the time
          the decision can reach it, and ``apply_at_step`` is chosen ahead of every step a
          rank has reported. A frame of ``n`` records therefore moves the apply-at step of
          a decision on its record ``i`` by ``steps[n - 1] - steps[i]`` when the steps go
          up (never earlier than record by record); cooldowns, positions, rewinds and which
          records fire are those of :meth:`feed`;
        * a rollback decided on one of its records rewinds the detectors from the next frame
          on, never on later records of the same frame: those were sent before the job could
          have received the decision, so they describe the weights it is about to leave;
        * after a halt decided on one of its records, the detectors have still seen the
          frame's later records (no detection or decision comes from them).
        """
        n = len(steps)
        if n == 0:
            return []
        if rank != 0:
            self._rank_steps[rank] = steps[-1]
            return []
        if n == 1:
            # a loop, not a comprehension: no function frame for a frame of one record
            values = {}
            for name, col in columns.items():
                v = col[0]
                if v is not None:
                    values[name] = v
            return self.feed(
                Metrics(
                    steps[0],
                    values,
                    None if epochs is None else epochs[0],
                    0,
                    None if times is None else times[0],
                )
            )
        out: list[Output] = []
        start = 0
        self._frame_last_step = steps[-1]
        try:
            pending = self._pending_rewind
            if pending is not None:
                apply_at, furthest, _ = pending
                reached = next(
                    (i for i, s in enumerate(steps) if s >= apply_at or s < furthest), None
                )
                if reached is not None:
                    if reached > 0:
                        out = self._feed_span(steps, columns, times, 0, reached)
                    if self._pending_rewind is pending:  # not replaced by a newer rollback
                        self._maybe_rewind(steps[reached])
                    start = reached
            out.extend(self._feed_span(steps, columns, times, start, n))
        finally:
            self._frame_last_step = None
        return out

    def _feed_span(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        times: Sequence[float | None] | None,
        start: int,
        stop: int,
    ) -> list[Output]:
        """Records ``start`` to ``stop - 1`` of rank 0 (see :meth:`feed_batch`)."""
        out: list[Output] = []
        last = stop - 1
        rate_next = start  # the next record whose time the rate tracking has not seen
        if not self.halted:
            # 1. every detector over the whole span; single spikes of a metric keep that
            # record's value out of the plateau detector watching it
            skip_on = self.spec.spikes_skip_plateau
            firings: dict[int, list[tuple[_ArmedDetector, Detection]]] = {}
            spiked: dict[str, list[int]] = {}
            for armed in self._detectors:
                detector = armed.detector
                if spiked and armed.name == "plateau":
                    found = self._plateau_columns(detector, steps, columns, start, stop, spiked)
                else:
                    found = detector.feed_columns(steps, columns, start, stop)
                for i, detection in found:
                    firings.setdefault(i, []).append((armed, detection))
                    if (
                        skip_on
                        and detection.detector == "spike"
                        and not detection.detail.get("burst")
                    ):
                        spiked.setdefault(detection.metric, []).append(i)

            # 2. decisions, record by record where something fired or the policy evaluates
            monitor = self.policy.monitor
            evaluations = columns.get(monitor) if monitor is not None else None
            at: Sequence[int]
            if evaluations is None:
                at = sorted(firings)
            else:
                at = [i for i in range(start, stop) if evaluations[i] is not None]
                if firings:
                    at = sorted(set(at).union(firings))
            by_records = self.spec.clock == "records"
            records_before = self._records
            done = start - 1  # the last record whose cooldown tick is counted
            for i in at:
                step = steps[i]
                self._rank_steps[0] = step
                if times is not None:
                    rate_next = self._track_rates(steps, times, rate_next, i + 1)
                if self._cooldowns and i - done > 1:
                    self._tick_cooldowns(i - done - 1)
                response: tuple[_ArmedDetector, Detection] | None = None
                skip_evaluation = False
                for armed, detection in firings.get(i, ()):
                    out.append(detection)
                    response, kept_out = self._take(armed, detection, response)
                    if kept_out is not None and kept_out == monitor:
                        skip_evaluation = True
                if self._cooldowns:
                    self._tick_cooldowns(1)
                done = i
                position = records_before + (i - start) + 1 if by_records else step + 1
                if not self.paused:
                    evaluation = None if evaluations is None or skip_evaluation else evaluations[i]
                    self._advance(position, evaluation, response, out)
                if self.halted:
                    break
            else:
                # the records after the last one that needed a decision
                if self._cooldowns and last > done:
                    self._tick_cooldowns(last - done)
                if done < last and not self.paused:
                    position = (
                        records_before + (last - start) + 1 if by_records else steps[last] + 1
                    )
                    self._step_clock(position, out)
                done = last
            if by_records:
                self._records = records_before + (done - start) + 1
        self._rank_steps[0] = steps[last]
        if times is not None:
            self._track_rates(steps, times, rate_next, stop)
        last_values = self.last_values
        for name, col in columns.items():
            for i in range(last, start - 1, -1):
                v = col[i]
                if v is not None:
                    last_values[name] = v
                    break
        return out

    def _take(
        self,
        armed: _ArmedDetector,
        detection: Detection,
        response: tuple[_ArmedDetector, Detection] | None,
    ) -> tuple[tuple[_ArmedDetector, Detection] | None, str | None]:
        """Count one detection of a record and weigh it against the record's response so far.

        Returns the response to give (the most severe one whose detector is not cooling
        down) and, for a single spike (not a burst) when ``spikes_skip_plateau`` is on, the
        metric whose value the plateau detector and policy must not count for this record.
        """
        name = detection.detector
        self.detection_counts[name] = self.detection_counts.get(name, 0) + 1
        if name == "non_finite":
            metric = detection.metric
            self.nonfinite_counts[metric] = self.nonfinite_counts.get(metric, 0) + 1
        if name == "spike" and not detection.detail.get("burst"):
            return response, detection.metric if self.spec.spikes_skip_plateau else None
        if armed.response.action == "none" or self._cooldowns.get(armed.name, 0) > 0:
            return response, None
        if armed.response.require_checkpoint and not self._checkpoints:
            return response, None  # an LR raise needs a way back (responses.py)
        if response is None or (
            _SEVERITY[armed.response.action] > _SEVERITY[response[0].response.action]
        ):
            return (armed, detection), None
        return response, None

    def _advance(
        self,
        position: int,
        evaluation: float | None,
        response: tuple[_ArmedDetector, Detection] | None,
        out: list[Output],
    ) -> None:
        """The policy moves to the record's position (evaluating if it has a value), then the
        record's response, if any; decisions go to ``out``. Not called while paused."""
        if evaluation is None:
            self._step_clock(position, out)
        else:
            before = self.policy.lrs
            if self.policy.step(position, evaluation):
                out.append(self._policy_decision(before))
        if response is not None:
            decision = self._respond(*response)
            if decision is not None:
                out.append(decision)

    def _step_clock(self, position: int, out: list[Output]) -> None:
        """The policy moves to ``position`` without an evaluation: only a step-driven clock
        moves (the job computes its LRs), or the anneal begins (its decision is the only one
        a policy makes without an evaluation, so no LRs are read before the step)."""
        if self.policy.step(position, None):
            out.append(self._policy_decision(self.policy.lrs))

    @staticmethod
    def _plateau_columns(
        detector: Detector,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
        spiked: Mapping[str, list[int]],
    ) -> list[tuple[int, Detection]]:
        """The plateau detector over a span, skipping the evaluations that spiked."""
        monitored = detector.monitored()
        skips = spiked.get(monitored[0]) if monitored else None
        if not skips:
            return detector.feed_columns(steps, columns, start, stop)
        found: list[tuple[int, Detection]] = []
        at = start
        for i in sorted(set(skips)):
            found.extend(detector.feed_columns(steps, columns, at, i))
            detector.skip_next_evaluation()  # type: ignore[attr-defined]
            at = i
        found.extend(detector.feed_columns(steps, columns, at, stop))
        return found

    def _tick_cooldowns(self, records: int) -> None:
        cooldowns = self._cooldowns
        for name in list(cooldowns):
            left = cooldowns[name] - records
            if left <= 0:
                del cooldowns[name]
            else:
                cooldowns[name] = left

    def _track_rates(
        self, steps: Sequence[int], times: Sequence[float | None], start: int, stop: int
    ) -> int:
        track = self._track_rate
        for i in range(start, stop):
            t = times[i]
            if t is not None:
                track(steps[i], t)
        return stop

    # ------------------------------------------------------------------ operator

    def manual_set_lr(self, lrs: Sequence[float], reason: str, actor: str) -> Decision:
        """An operator's set-lr: one value (ratios between groups kept) or one per group."""
        current = self.policy.lrs
        if len(lrs) == 1 and len(current) > 1:
            ref = current[0] or 1.0
            target = tuple(float(lrs[0]) * x / ref for x in current)
        elif len(lrs) == len(current):
            target = tuple(float(x) for x in lrs)
        else:
            raise ValueError(f"lrs: expected 1 or {len(current)} values, got {len(lrs)}")
        self.policy.set_lrs(target)
        segment = self.segment
        kind = DecisionKind.SCHEDULE if segment is not None else DecisionKind.SET_LR
        return self._decide(
            kind,
            "operator",
            reason or f"set by {actor}",
            lrs=self.policy.lrs,
            schedule=segment,
            actor=actor,
        )

    def pause(self, actor: str = "operator") -> Decision | None:
        """Stop automatic changes; a running schedule is frozen at its current LR."""
        if self.paused:
            return None
        frozen = self.policy.segment() is not None
        self.paused = True
        if not frozen:
            return None
        return self._decide(
            DecisionKind.SET_LR, "operator", "paused: LR held", lrs=self.policy.lrs, actor=actor
        )

    def resume(self, actor: str = "operator") -> Decision | None:
        """Restart automatic changes; a frozen schedule continues where its clock is."""
        if not self.paused:
            return None
        self.paused = False
        segment = self.policy.segment()
        if segment is None:
            return None
        return self._decide(
            DecisionKind.SCHEDULE,
            "operator",
            "resumed: schedule continues",
            schedule=segment,
            actor=actor,
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (JSON-ready; floats may be non-finite)."""
        return {
            "version": STATE_VERSION,
            "initial_lrs": list(self.initial_lrs),
            "world_size": self.world_size,
            "next_id": self._next_id,
            "rank_steps": {str(k): v for k, v in self._rank_steps.items()},
            "records": self._records,
            "checkpoint_step": self._checkpoint_step,
            "checkpoints": list(self._checkpoints),
            "pending_rewind": list(self._pending_rewind)
            if self._pending_rewind is not None
            else None,
            "rate": self._rate,
            "rate_ref": list(self._rate_ref) if self._rate_ref is not None else None,
            "cooldowns": dict(self._cooldowns),
            "paused": self.paused,
            "halted": self.halted,
            "detection_counts": dict(self.detection_counts),
            "decision_counts": dict(self.decision_counts),
            "nonfinite_counts": dict(self.nonfinite_counts),
            "last_values": dict(self.last_values),
            "policy": self.policy.state_dict(),
            "detectors": {a.name: a.detector.state_dict() for a in self._detectors},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {STATE_VERSION}")
        self._next_id = int(state["next_id"])
        self._rank_steps = {int(k): int(v) for k, v in state["rank_steps"].items()}
        self._records = int(state["records"])
        self._checkpoint_step = state["checkpoint_step"]
        saved_checkpoints = state.get("checkpoints")
        if saved_checkpoints is None:  # a snapshot from before checkpoints were kept
            saved_checkpoints = [] if self._checkpoint_step is None else [self._checkpoint_step]
        self._checkpoints = [int(x) for x in saved_checkpoints]
        pending = state.get("pending_rewind")
        self._pending_rewind = (
            (int(pending[0]), int(pending[1]), int(pending[2])) if pending is not None else None
        )
        self._rate = state.get("rate")
        ref = state.get("rate_ref")
        self._rate_ref = (int(ref[0]), float(ref[1])) if ref is not None else None
        self._cooldowns = {str(k): int(v) for k, v in state["cooldowns"].items()}
        self.paused = bool(state["paused"])
        self.halted = bool(state["halted"])
        self.detection_counts = dict(state["detection_counts"])
        self.decision_counts = dict(state["decision_counts"])
        self.nonfinite_counts = dict(state["nonfinite_counts"])
        self.last_values = {k: float(v) for k, v in state["last_values"].items()}
        policy_state = state["policy"]
        if policy_state.get("kind") == "anneal" and self._anneal is None:
            policy_state = policy_state["inner"]  # the config dropped the anneal since
        self.policy.load_state_dict(policy_state)
        saved = state["detectors"]
        for armed in self._detectors:
            if armed.name in saved:
                armed.detector.load_state_dict(saved[armed.name])

    @classmethod
    def from_state(cls, spec: JobSpec, state: Mapping[str, Any]) -> JobEngine:
        """A job engine that continues exactly where the one that saved ``state`` stopped."""
        job = cls(spec, state["initial_lrs"], int(state.get("world_size", 1)))
        job.load_state_dict(state)
        return job

    # ------------------------------------------------------------------ internals

    def _checkpoint_saved(self, step: int) -> None:
        """Remember a checkpoint; one at or after ``step`` belongs to an abandoned branch."""
        kept = self._checkpoints
        while kept and kept[-1] >= step:
            kept.pop()
        kept.append(step)
        if len(kept) > MAX_CHECKPOINTS:
            del kept[: len(kept) - MAX_CHECKPOINTS]
        self._checkpoint_step = step

    def _rollback_target(self, detection: Detection, mode: str = "auto", margin: int = 0) -> int | None:
        """The checkpoint to return to: one saved before the trouble began.

        A detection may name the step up to which things were still fine
        (``detail["good_step"]``, e.g. ``overshoot``): then the last checkpoint at or before
        it, and ``margin`` more back (its weights may carry damage the loss did not show
        yet); when every checkpoint is younger than the good step, the oldest one. Without a
        good step, or with ``mode`` "last" (the response's ``checkpoint``), the last one.
        """
        if not self._checkpoints:
            return None
        good = detection.detail.get("good_step")
        if good is None or mode == "last":
            return self._checkpoints[-1]
        at_or_before = bisect.bisect_right(self._checkpoints, good)
        return self._checkpoints[max(0, at_or_before - 1 - margin)]

    def _maybe_rewind(self, step: int) -> None:
        """Tell the detectors once the rollback on its way has reached the job.

        A job applies a rollback at ``apply_at_step``: from then on its records either go on
        from there (steps not given back) or restart from the checkpoint's step (steps
        restored with the weights, as Lightning does), which is below every step the job
        had reported when the rollback was decided. In the second case a step-driven policy
        goes back to the restored step too, as the job's own evaluation of the schedule does.

        The checkpoints saved after the target and before the rollback applied hold the
        abandoned weights: they are forgotten, so that no later rollback returns to them.
        """
        assert self._pending_rewind is not None
        apply_at, furthest, target = self._pending_rewind
        if step >= apply_at or step < furthest:
            self._pending_rewind = None
            kept = [c for c in self._checkpoints if c <= target or c >= apply_at]
            if len(kept) != len(self._checkpoints):
                self._checkpoints = kept
                self._checkpoint_step = kept[-1] if kept else None
            for armed in self._detectors:
                armed.detector.rewind(target)
            if step < furthest and self.spec.clock == "steps":
                self.policy.rewind(step + 1)

    def _track_rate(self, step: int, time: float) -> None:
        ref = self._rate_ref
        if ref is None or step < ref[0]:
            self._rate_ref = (step, time)
        elif time - ref[1] >= 0.5:  # sample twice a second: cheap and smooth enough
            sample = (step - ref[0]) / (time - ref[1])
            self._rate = sample if self._rate is None else 0.7 * self._rate + 0.3 * sample
            self._rate_ref = (step, time)

    @property
    def apply_lead(self) -> int:
        """Steps between the furthest rank's last step and the step a new decision applies at."""
        lead = self.spec.apply_lead_steps
        if self._rate is not None and self.spec.apply_lead_seconds > 0:
            lead = max(lead, min(100_000, math.ceil(self._rate * self.spec.apply_lead_seconds)))
        return lead

    def _apply_at(self) -> int:
        """The furthest step any rank has reported, plus the apply lead. Inside a frame
        (:meth:`feed_batch`) that includes the frame's last step, which rank 0 has reported
        along with the record being decided on."""
        last = self.last_step
        if last is None:
            return 0
        frame_last = self._frame_last_step
        if frame_last is not None and frame_last > last:
            last = frame_last
        return last + self.apply_lead

    def _decide(
        self,
        kind: DecisionKind,
        source: str,
        reason: str,
        *,
        apply_at_step: int | None = None,
        lrs: Sequence[float] | None = None,
        schedule: Mapping[str, Any] | None = None,
        rollback_to_step: int | None = None,
        skip_batches: int = 0,
        actor: str | None = None,
    ) -> Decision:
        decision = Decision(
            id=self._next_id,
            kind=kind,
            apply_at_step=self._apply_at() if apply_at_step is None else apply_at_step,
            source=source,
            reason=reason,
            lrs=tuple(lrs) if lrs is not None else None,
            momentums=self.policy.momentums if schedule is None else None,
            schedule=schedule,
            rollback_to_step=rollback_to_step,
            skip_batches=skip_batches,
            actor=actor,
        )
        self._next_id += 1
        key = f"{kind.value}:{source}"
        self.decision_counts[key] = self.decision_counts.get(key, 0) + 1
        if kind is DecisionKind.HALT:
            self.halted = True
        return decision

    def _policy_decision(self, before: tuple[float, ...]) -> Decision:
        """The decision for an LR change the policy made by itself: a plateau cut, or the
        start of the anneal."""
        anneal = self._anneal
        reason = anneal.take_announcement() if anneal is not None else None
        if anneal is not None and reason is not None:
            segment = self.policy.segment()
            assert segment is not None  # an active anneal always has one
            return self._decide(DecisionKind.SCHEDULE, anneal.kind, reason, schedule=segment)
        inner = _innermost(self.policy)
        best = getattr(inner, "best", None)
        patience = getattr(getattr(inner, "params", None), "patience", None)
        after = self.policy.lrs
        reason = (
            f"{self.policy.monitor} has not improved for more than {patience} evaluations"
            f" (best {_fmt(best)}): LR {_fmt_lrs(before)} → {_fmt_lrs(after)}"
        )
        segment = self.policy.segment()
        if segment is not None:
            return self._decide(DecisionKind.SCHEDULE, inner.kind, reason, schedule=segment)
        return self._decide(DecisionKind.SET_LR, inner.kind, reason, lrs=after)

    def _respond(self, armed: _ArmedDetector, detection: Detection) -> Decision | None:
        response = armed.response
        if response.cooldown > 0:
            self._cooldowns[armed.name] = response.cooldown
        source = detection.detector
        target = (
            self._rollback_target(detection, response.checkpoint, response.margin)
            if response.action == "rollback"
            else None
        )
        if response.action == "halt" or (
            response.action == "rollback" and target is None and source == "non_finite"
        ):
            suffix = (
                "; no checkpoint reported, so halting"
                if response.action == "rollback"
                else "; halting"
            )
            return self._decide(DecisionKind.HALT, source, detection.reason + suffix)
        before = self.policy.lrs
        factor = response.factor
        changed = self.policy.scale_by(factor, self.min_lrs)
        after = self.policy.lrs
        segment = self.policy.segment()
        if target is not None:
            reason = (
                f"{detection.reason}; rolling back to the checkpoint at step {target}"
                f", skipping {response.skip_batches} batches, LR {_fmt_lrs(before)} → {_fmt_lrs(after)}"
            )
            decision = self._decide(
                DecisionKind.ROLLBACK,
                source,
                reason,
                lrs=after,
                schedule=segment,
                rollback_to_step=target,
                skip_batches=response.skip_batches,
            )
            self._pending_rewind = (decision.apply_at_step, self.last_step or 0, target)
            return decision
        if not changed:
            return None
        suffix = "; no checkpoint reported to roll back to" if response.action == "rollback" else ""
        reason = f"{detection.reason}{suffix}; LR × {factor:.3g}: {_fmt_lrs(before)} → {_fmt_lrs(after)}"
        if segment is not None:
            return self._decide(DecisionKind.SCHEDULE, source, reason, schedule=segment, lrs=after)
        return self._decide(DecisionKind.SET_LR, source, reason, lrs=after)


def _plateau_counter(policy: Policy, armed: Sequence[_ArmedDetector]) -> tuple[object, str] | None:
    """The object and attribute :attr:`JobEngine.plateau_bad_evaluations` reads: the plateau
    policy's counter, else the (last) plateau detector's, else None."""
    inner = _innermost(policy)
    for attribute in ("num_bad_epochs", "wait"):
        if getattr(inner, attribute, None) is not None:
            return inner, attribute
    found: tuple[object, str] | None = None
    for a in armed:
        if a.name == "plateau" and getattr(a.detector, "bad_evaluations", None) is not None:
            found = a.detector, "bad_evaluations"
    return found


def _innermost(policy: Policy) -> Policy:
    """The policy behind any warmup or anneal wrapper."""
    inner = getattr(policy, "inner", None)
    while isinstance(inner, Policy):
        policy, inner = inner, getattr(inner, "inner", None)
    return policy


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _fmt_lrs(lrs: Sequence[float]) -> str:
    return ", ".join(f"{x:.4g}" for x in lrs)


def _describe_segment(segment: Mapping[str, Any]) -> str:
    kind = str(segment.get("kind"))
    if kind == "warmup":
        then = segment.get("then") or {}
        return (
            f"warmup over {segment['params']['total_iters']} steps, then {_describe_segment(then)}"
        )
    if kind == "anneal":
        then = segment.get("then") or {}
        return f"{_describe_segment(then)}, annealed over {segment['params']['total_iters']} steps"
    return kind
