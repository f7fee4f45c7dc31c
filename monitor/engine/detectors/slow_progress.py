"""``slow_progress``: the metric improves at a steady, unhurried pace — the LR is too low.

A loss trained with a learning rate far below a good one follows the same curve as with the
good LR, stretched in time: over a few evaluations it falls in a straight line, each
evaluation gaining about as much as the one before. With a good LR the same evaluations
show the curve's bend: big gains first, then smaller and smaller ones. The detector looks
for the straight line and answers it like an LR range test: raise the LR (the engine's
default response: × 3), look at the next evaluation, and keep raising while each raise buys a
faster descent. The first evaluation whose gain does not grow enough ends the probe for good.

Rule
    Each finite value of ``monitor`` (one *evaluation*; ``val_loss`` by default, which is
    computed on a fixed set and so free of minibatch noise) gives a relative gain over the
    previous one::

        gain_k = (x_{k-1} - x_k) / |x_{k-1}|

    ``probing`` (from the third evaluation on)::

        gain_{k-1} >= min_gain and gain_k >= min_gain
        and min_ratio <= gain_k / gain_{k-1} <= 1 / steadiness
                                                       -> FIRE, checking (a straight line,
                                                          or one that bends gently)
        gain_{k-1} >= min_gain
        and gain_k < min_ratio * gain_{k-1}            -> settled (the curve bends sharply:
                                                          the LR is not too low)
        gain_{k-1} >= min_gain and gain_k >= min_gain
        and gain_k / gain_{k-1} > 1 / steadiness
        and x_k >= x_0 - near_start * |x_0|            -> FIRE, checking (speeding up, but
                                                          still near the first evaluation)
        otherwise (no measurable progress yet, or a
        descent speeding up by itself far from x_0)    -> probing

    ``checking`` (the evaluation after a detection)::

        gain_k > max_gain
        and gain_k > max_speedup * gain_{k-1}          -> settled (the loss left its
                                                          plateau: see below)
        gain_k >= min_speedup * expected               -> FIRE again, checking
        otherwise                                      -> settled

    where ``expected`` is what the curve would have gained without the raise: the gain at
    the last detection times the curve's own ratio of gains when the probe fired (at most
    1; for a descent that was speeding up, that ratio as it is: its acceleration is not the
    raise's doing). A curve bending by 0.8 per evaluation that keeps its gain after a raise has sped
    up by 1.25.

    ``settled`` fires nothing; after ``rearm_after`` evaluations in it (0: never) the
    detector probes again, because a curve bends for other reasons than a good LR too: the
    loss leaving its first plateau speeds up and then slows down whatever the LR, and a probe
    that was judged during that drop ends early. No detection after ``max_increases``.

    ``stopped``: in any phase, an evaluation *worse* than the one before by more than
    ``max_rise`` (relative), or a rollback (:meth:`rewind`), stops the detector for good. A metric that got worse says the LR has been
    too high at least once (a 10-100x too low LR gives a monotone descent); and a loss that
    comes back down after a blow-up, once the LR is cut, falls in a straight line too, which
    the probe must not take for a too-low LR (it did in 9 of 24 runs from too-high starts on
    the quality benchmark before this rule). ``max_rise`` 0.2 %
    and 5 % gave the same results there, except one needless raise from a good LR with 5 %.

    Why a ratio of consecutive gains and not a threshold on the gain: how fast a loss can
    fall depends on the task; whether it falls in a straight line does not. A good LR's
    curve bends within a few evaluations (gain ratios of 0.2-0.7 on the quality benchmark's
    tasks, docs/quality.md); a 10-100x too low LR gives ratios of 0.85-1.15, or of 0.5-0.85
    on a curve that bends at any LR (a language model's). ``min_ratio`` 0.5 instead of 0.8
    probes those too: it fires a little more often from a good LR, where the check finds no
    speedup and the plateau policy takes the raise back (docs/quality.md). Ratios above
    ``1 / steadiness`` are the start of a curve that is speeding up by itself (the loss
    leaving its initial plateau), not a straight line: the detector waits, unless the metric
    is still within ``near_start`` (3 %) of its first evaluation. A good LR moves a loss by
    more than that within its first evaluations; a 10x too low one on the quality
    benchmark's CNN spends 8-9 evaluations leaving its plateau, its loss within 1.5 % of the
    first evaluation for the first three (docs/quality.md).

    One bound on the gain itself, for the first raise only: a descent that loses more than
    ``max_gain`` (half) of its loss per evaluation is not slow, whatever the ratio of its
    gains. A good LR's first evaluations can fall geometrically (the CNN from its best LR:
    75 %, then 58 % per evaluation, a ratio of 0.77), and a raise there overshot it (ratio
    1.135 to the best fixed LR's loss on the quality benchmark). After a raise, a large gain
    is the raise's doing and counts as a speedup: from a 100x too low LR the probe's last,
    decisive raises come at gains of 55-68 % (capping those too cost 8-29 % on two tasks).
    Unless the gain also jumped by more than ``max_speedup`` (5x) over the one before: a
    raise (x 3 by default) multiplies a descent's pace by about its factor (2.2-4.6 on the
    quality benchmark's smooth curves), while a loss falling off its first plateau jumps far
    more (the CNN from a 10x too low LR: 3.8 %, then 75 %, 8-20x). That LR is already enough
    to fall fast; the raise after it went to 2.7x the best LR and left one seed of three at
    1.5x the best fixed LR's loss (docs/quality.md).

Parameters (:class:`SlowProgressParams`)
    ``monitor="val_loss"``, ``min_gain=2e-5`` (0.002 % per evaluation: below this the
    metric is not measurably moving; a validation loss on a fixed set is smooth enough that
    a 100x too low LR's creep, 0.02 % per evaluation on ``digits_cnn``, is measurable),
    ``steadiness=0.8``, ``min_ratio=0.5``, ``min_speedup=1.2``, ``rearm_after=3``,
    ``max_rise=0.002``, ``max_increases=10``, ``near_start=0.03`` (0: never fire on a
    descent that speeds up), ``max_gain=0.5`` (the first raise only), ``max_speedup=5``
    (after a raise, with a gain above ``max_gain``).

Edge cases
    * A record without ``monitor`` changes nothing; NaN, ±Inf and ``|x| >= 1e150`` are
      ignored (``non_finite`` reports them).
    * ``|x_{k-1}|`` below 1e-12 counts as 1e-12. The rule is meant for losses (mode min).
    * The detector cannot know whether the engine applied its detection (a paused job, an
      LR already changed by another response); it judges the evaluations that follow as if
      it had, and settles if they do not speed up.

Phases (h11 style)::

    phase      on a finite evaluation                                  next phase
    ---------  ------------------------------------------------------  -----------------
    warm-up    remember it                                             probing at the 2nd
    probing    steady or gently shrinking gains: FIRE                  checking
    probing    the gains shrink below min_ratio                        settled
    probing    gains growing fast, still within near_start of x_0: FIRE  checking
    probing    no measurable gain, gains growing fast, or a gain above
               max_gain                                                probing
    checking   a gain above max_gain, max_speedup over the one before  settled
    checking   min_speedup over what the curve gains by itself: FIRE   checking
    checking   otherwise                                               settled
    settled    remember it                                             probing after
                                                                       rearm_after of them
    any        worse than the previous one by more than max_rise       stopped
    any        rewind (a rollback reached the job)                     stopped
    stopped    remember it                                             stopped
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Detector, ParamError, optional_float, present_indices
from ..events import Detection, Metrics

__all__ = ["SlowProgressDetector", "SlowProgressParams", "SlowProgressPhase"]

MAX_ABS_VALUE = 1e150
_TINY = 1e-12


class SlowProgressPhase(str, enum.Enum):
    """Where the slow-progress detector is (see the module docstring)."""

    WARM_UP = "warm-up"
    PROBING = "probing"
    CHECKING = "checking"
    SETTLED = "settled"
    STOPPED = "stopped"


def _check_positive(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise ParamError(field, f"must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class SlowProgressParams:
    """Parameters of ``slow_progress``."""

    monitor: str = "val_loss"
    min_gain: float = 2e-5
    steadiness: float = 0.8
    min_ratio: float = 0.5
    min_speedup: float = 1.2
    rearm_after: int = 3
    max_rise: float = 0.002
    max_increases: int = 10
    near_start: float = 0.03
    max_gain: float = 0.5
    max_speedup: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        object.__setattr__(self, "min_gain", _check_positive("min_gain", self.min_gain))
        steadiness = _check_positive("steadiness", self.steadiness)
        if steadiness >= 1.0:
            raise ParamError("steadiness", f"must be < 1, got {self.steadiness!r}")
        object.__setattr__(self, "steadiness", steadiness)
        min_ratio = _check_positive("min_ratio", self.min_ratio)
        if min_ratio > 1.0:
            raise ParamError("min_ratio", f"must be <= 1, got {self.min_ratio!r}")
        object.__setattr__(self, "min_ratio", min_ratio)
        near = self.near_start
        if isinstance(near, bool) or not isinstance(near, (int, float)) or not 0.0 <= near < 1.0:
            raise ParamError("near_start", f"must be a number in [0, 1), got {near!r}")
        object.__setattr__(self, "near_start", float(near))
        object.__setattr__(self, "max_gain", _check_positive("max_gain", self.max_gain))
        object.__setattr__(self, "min_speedup", _check_positive("min_speedup", self.min_speedup))
        object.__setattr__(self, "max_speedup", _check_positive("max_speedup", self.max_speedup))
        object.__setattr__(self, "max_rise", _check_positive("max_rise", self.max_rise))
        if (
            isinstance(self.rearm_after, bool)
            or not isinstance(self.rearm_after, int)
            or self.rearm_after < 0
        ):
            raise ParamError("rearm_after", f"must be an integer >= 0, got {self.rearm_after!r}")
        if (
            isinstance(self.max_increases, bool)
            or not isinstance(self.max_increases, int)
            or self.max_increases < 0
        ):
            raise ParamError(
                "max_increases", f"must be an integer >= 0, got {self.max_increases!r}"
            )


class SlowProgressDetector(Detector):
    """Fires while the metric falls in a straight line, and while each raise speeds it up."""

    name: ClassVar[str] = "slow_progress"

    __slots__ = (
        "_fired",
        "_first",
        "_last",
        "_last_gain",
        "_natural",
        "_phase",
        "_reference_gain",
        "_settled_for",
        "params",
    )

    def __init__(self, params: SlowProgressParams | None = None) -> None:
        self.params = params if params is not None else SlowProgressParams()
        self._phase = SlowProgressPhase.WARM_UP
        self._last: float | None = None  # the previous evaluation
        self._last_gain: float | None = None  # the previous evaluation's gain
        self._reference_gain = 0.0  # checking: the gain at the last detection
        self._natural = 1.0  # checking: the curve's own ratio of gains when the probe began
        self._first: float | None = None  # the first evaluation
        self._fired = 0
        self._settled_for = 0  # evaluations since the detector settled

    @property
    def phase(self) -> SlowProgressPhase:
        """The current phase (see the module docstring's table)."""
        return self._phase

    @property
    def increases(self) -> int:
        """Detections so far."""
        return self._fired

    def feed(self, record: Metrics) -> list[Detection]:
        """Judge one evaluation of ``monitor``; fire while progress is steady and speeds up."""
        x = record.values.get(self.params.monitor)
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        return self._evaluate(record.step, float(x))

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` on records ``start`` to ``stop - 1``: only the records with ``monitor``.

        A record without ``monitor`` changes nothing, so only the records that carry it are
        visited (:func:`~monitor.engine.base.present_indices`). Evaluations are rare (val_loss once per
        epoch): each goes through :meth:`_evaluate`, as in :meth:`feed`.
        """
        col = columns.get(self.params.monitor)
        if col is None:
            return []
        indices = present_indices(col, start, stop)
        out: list[tuple[int, Detection]] = []
        evaluate = self._evaluate
        for i in indices:
            x = col[i]
            if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
                continue
            for detection in evaluate(steps[i], float(x)):
                out.append((i, detection))
        return out

    def _evaluate(self, step: int, x: float) -> list[Detection]:
        """Judge one evaluation, a finite ``x`` of ``monitor`` at ``step``."""
        p = self.params
        previous, previous_gain = self._last, self._last_gain
        self._last = x
        if previous is None:
            self._first = x
            return []
        base = abs(previous)
        gain = (previous - x) / (base if base >= _TINY else _TINY)
        self._last_gain = gain
        phase = self._phase
        if phase is SlowProgressPhase.STOPPED:
            return []
        if gain < -p.max_rise:
            self._phase = SlowProgressPhase.STOPPED
            return []
        if phase is SlowProgressPhase.WARM_UP:
            self._phase = SlowProgressPhase.PROBING
            return []
        if previous_gain is None:
            return []
        if phase is SlowProgressPhase.CHECKING:
            expected = self._reference_gain * self._natural
            sped_up = gain >= p.min_gain and gain >= p.min_speedup * expected
            broke_out = gain > p.max_gain and gain > p.max_speedup * previous_gain
            if sped_up and not broke_out and self._fired < p.max_increases:
                return self._fire(step, x, gain, previous_gain)
            self._settle()
            return []
        if self._fired >= p.max_increases:
            return []
        if phase is SlowProgressPhase.SETTLED:
            self._settled_for += 1
            if p.rearm_after and self._settled_for >= p.rearm_after:
                self._phase = SlowProgressPhase.PROBING
            return []
        # probing
        if previous_gain < p.min_gain:
            return []
        if gain < p.min_ratio * previous_gain:
            self._settle()
            return []
        if gain > p.max_gain:
            return []  # falling fast: not a slow descent, whatever the ratio
        if gain >= p.min_gain and gain * p.steadiness <= previous_gain:
            self._natural = min(1.0, gain / previous_gain)
            return self._fire(step, x, gain, previous_gain)
        first = self._first
        if gain >= p.min_gain and first is not None and x >= first - p.near_start * abs(first):
            # speeding up, but still near the first evaluation: not leaving a plateau soon
            self._natural = gain / previous_gain  # the acceleration, extrapolated
            return self._fire(step, x, gain, previous_gain)
        return []

    def _settle(self) -> None:
        self._phase = SlowProgressPhase.SETTLED
        self._settled_for = 0

    def _fire(self, step: int, value: float, gain: float, previous_gain: float) -> list[Detection]:
        p = self.params
        checking = self._phase is SlowProgressPhase.CHECKING
        self._phase = SlowProgressPhase.CHECKING
        self._reference_gain = gain
        self._fired += 1
        if checking:
            why = (
                f"the last LR increase sped it up: this evaluation gained {gain:.2%}, "
                f"{gain / previous_gain:.2g}x the one before"
            )
        else:
            why = (
                f"it gained {gain:.2%} at this evaluation and {previous_gain:.2%} at the one "
                "before: a straight, slow descent"
            )
        return [
            Detection(
                detector=self.name,
                metric=p.monitor,
                step=step,
                value=value,
                reason=f"{p.monitor} is improving slowly and steadily at step {step}: {why}",
                detail={"gain": gain, "previous_gain": previous_gain, "increases": self._fired},
            )
        ]

    def rewind(self, to_step: int) -> None:
        """A rollback reached the job: the LR has been too high at least once, stop for good.

        The loss coming back down from the checkpoint falls in a straight line, which the
        probe must not take for a too-low LR (``max_rise``'s reason, for a rollback that came
        before any evaluation rose).
        """
        self._phase = SlowProgressPhase.STOPPED

    def state_dict(self) -> dict[str, Any]:
        """Phase, the last evaluation and gain, the reference gain and the count (JSON-ready)."""
        return {
            "phase": self._phase.value,
            "last": self._last,
            "last_gain": self._last_gain,
            "reference_gain": self._reference_gain,
            "natural": self._natural,
            "first": self._first,
            "fired": self._fired,
            "settled_for": self._settled_for,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._phase = SlowProgressPhase(state["phase"])
        last, last_gain = state["last"], state["last_gain"]
        self._last = optional_float(last)
        self._last_gain = optional_float(last_gain)
        self._reference_gain = float(state["reference_gain"])
        self._natural = float(state.get("natural", 1.0))
        first = state.get("first")
        self._first = optional_float(first)
        self._fired = int(state["fired"])
        self._settled_for = int(state.get("settled_for", 0))

    def monitored(self) -> tuple[str, ...]:
        """The watched metric."""
        return (self.params.monitor,)
