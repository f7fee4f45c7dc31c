"""``overshoot``: the training loss lost the progress it made, or never made any — the LR is too high.

A learning rate 10-100x too high does not always end in NaN. More often the loss jumps far
above where it started within a few steps, or it falls for a while and then climbs back as
the network's units die, or it hovers just above its starting value and never comes down.
No LR cut revives a network in that state; what helps is going back to weights from before
the damage with a much lower LR. The detector recognises the three shapes, and each of its
detections names the step at which the smoothed loss was at its best (``detail["good_step"]``)
so that a rollback can return to the last checkpoint saved before the trouble began.

Rule
    Two exponential moving averages of ``monitor``: a fast one ``f`` (weight ``fast_alpha``)
    and a slow one ``s`` (weight ``alpha``), both starting at the first value ``x_0``, plus the
    running variance ``v`` of the values around ``s`` (at least the reference values' sample
    variance once they are in, so that the noise is not underrated while ``v`` settles).
    Once the reference is in, ``s`` restarts from it: one minibatch is a poor start. After ``reference_values`` values the
    *reference* ``r`` is their mean and ``b`` is the lowest ``s`` seen since. Fire when any of:

    1. **blow-up**: ``f >= blowup_factor * x_0`` at two values in a row (``max(x_0, r)``
       once the reference is in): a loss twice its starting level within a few steps.
       (fastai's LR finder stops at 4x the best loss: the same idea for a loss that has not
       come down yet.) Two values, and ``r`` when it is known, because ``x_0`` is a single
       minibatch's loss and may be a lucky one, far below the loss's level.
    2. **lost progress**: ``r - b >= max(min_progress * r, noise_z * sd)`` (the loss came
       down by a real amount, beyond the noise of ``s``) and
       ``s - b >= max_lost_progress * (r - b)`` (and went back up by most of it).
    3. **no progress**: ``s - r >= max(min_rise * r, noise_z * sd)`` for ``hold`` values in a
       row: the smoothed loss has stayed clearly above its start, beyond what minibatch
       noise explains.

    ``sd = sqrt(v * alpha / (2 - alpha))`` is the standard deviation of ``s`` itself.

    Why these shapes and not a rate: a good LR's loss, however noisy, stays below its start
    once it has fallen, and a healthy run never gives back three quarters of its progress.
    On the quality benchmark's runs (four tasks, three seeds, docs/quality.md) with a fixed
    LR from 1/100 to 3x the best one, the rules never fire; from 100x they fire on all 12
    runs (rule 1 within 3 steps on three tasks), from 10x on 8 of 12 (docs/policies.md).

Statistic
    ``detail`` holds ``rule`` (1, 2 or 3, as above), ``smoothed`` (``s``, or ``f`` for rule
    1), ``reference``, ``best`` and ``good_step`` (the step of the record at which ``s`` was
    lowest; the first record's step before the reference is complete).

Parameters (:class:`OvershootParams`)
    ``monitor="loss"``, ``fast_alpha=0.3``, ``alpha=0.1``, ``reference_values=5``,
    ``blowup_factor=2.0``, ``min_progress=0.2``, ``max_lost_progress=0.75``,
    ``min_rise=0.03``, ``noise_z=3.0``, ``hold=20``, ``cooldown=50``.

Edge cases
    * A record without ``monitor`` changes nothing. NaN, ±Inf and ``|x| >= 1e150`` are
      ignored: ``non_finite`` reports them.
    * The rules are meant for positive losses: with ``x_0 <= 0`` rule 1 is off, with
      ``r <= 0`` rules 2 and 3 are.
    * After a detection the detector stays silent until the job rolls back (the engine
      calls :meth:`rewind`) or ``cooldown`` values have passed.

Segments
    The run is a segment; so is what follows each rollback (:meth:`rewind`). A segment
    starts with ``reference_values`` values: their mean is where ``s`` and ``b`` start, and
    the first segment's mean is the reference ``r``. A rollback to a checkpoint older than
    the reference starts the reference (and ``x_0``) again too: the values it was made of
    came from the abandoned weights, e.g. a blow-up's first steps.

Phases (h11 style)::

    phase      on a finite value                                      next phase
    ---------  -----------------------------------------------------  -----------------
    warm-up    update f, s, v; collect the segment's first values;    watching after
               rule 1 only                                            reference_values
    watching   a rule holds: FIRE                                     tripped
    watching   otherwise                                              watching
    tripped    update f, s, v, b; left -= 1                           watching at left=0
    any        rewind(): a new segment                                warm-up
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base import Detector, ParamError, finite_values, optional_float
from ..events import Detection, Metrics

__all__ = ["OvershootDetector", "OvershootParams", "OvershootPhase"]

MAX_ABS_VALUE = 1e150


class OvershootPhase(str, enum.Enum):
    """Where the overshoot detector is (see the module docstring)."""

    WARM_UP = "warm-up"
    WATCHING = "watching"
    TRIPPED = "tripped"


def _fraction(field: str, value: object, *, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= upper:
        raise ParamError(field, f"must be in (0, {upper:g}], got {value!r}")
    return float(value)


def _count(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParamError(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class OvershootParams:
    """Parameters of ``overshoot``."""

    monitor: str = "loss"
    fast_alpha: float = 0.3
    alpha: float = 0.1
    reference_values: int = 5
    blowup_factor: float = 2.0
    min_progress: float = 0.2
    max_lost_progress: float = 0.75
    min_rise: float = 0.03
    noise_z: float = 3.0
    hold: int = 20
    cooldown: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        object.__setattr__(self, "fast_alpha", _fraction("fast_alpha", self.fast_alpha))
        object.__setattr__(self, "alpha", _fraction("alpha", self.alpha))
        _count("reference_values", self.reference_values, 1)
        factor = self.blowup_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1.0 < factor < math.inf:
            raise ParamError("blowup_factor", f"must be a finite number > 1, got {factor!r}")
        object.__setattr__(self, "blowup_factor", float(factor))
        object.__setattr__(self, "min_progress", _fraction("min_progress", self.min_progress))
        object.__setattr__(
            self, "max_lost_progress", _fraction("max_lost_progress", self.max_lost_progress, upper=10.0)
        )
        object.__setattr__(self, "min_rise", _fraction("min_rise", self.min_rise, upper=10.0))
        z = self.noise_z
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 <= z < math.inf:
            raise ParamError("noise_z", f"must be a finite number >= 0, got {z!r}")
        object.__setattr__(self, "noise_z", float(z))
        _count("hold", self.hold, 1)
        _count("cooldown", self.cooldown, 0)


class OvershootDetector(Detector):
    """Fires when the loss blows up, gives back most of its progress, or stays above its start."""

    name: ClassVar[str] = "overshoot"

    __slots__ = (
        "_best",
        "_best_step",
        "_collected",
        "_fast",
        "_first",
        "_first_step",
        "_held",
        "_left",
        "_n",
        "_new_reference",
        "_over",
        "_reference",
        "_reference_step",
        "_slow",
        "_var",
        "params",
    )

    def __init__(self, params: OvershootParams | None = None) -> None:
        self.params = params if params is not None else OvershootParams()
        self._n = 0  # values in this segment (since the start or the last rewind)
        self._first: float | None = None  # x_0, the run's first value
        self._first_step = 0
        self._collected: list[float] | None = []  # this segment's first values; None once in
        self._reference: float | None = None
        self._reference_step = 0  # the step at which the reference was complete
        self._new_reference = False  # a rewind went back to before the reference
        self._fast = 0.0
        self._slow = 0.0
        self._var = 0.0
        self._best: float | None = None  # the lowest s of this segment
        self._best_step = 0
        self._held = 0
        self._left = 0  # tripped: values until the detector watches again
        self._over = False  # rule 1 held at the previous value

    @property
    def phase(self) -> OvershootPhase:
        """The current phase (see the module docstring's table)."""
        if self._left:
            return OvershootPhase.TRIPPED
        if self._collected is not None:
            return OvershootPhase.WARM_UP
        return OvershootPhase.WATCHING

    @property
    def good_step(self) -> int:
        """The step of the record at which the smoothed loss was lowest in this segment."""
        return self._best_step if self._best is not None else self._first_step

    def rewind(self, to_step: int) -> None:
        """The job went back to the checkpoint of ``to_step``: a new segment starts.

        The averages start again from the next value and the segment warms up like the run
        did (its first values' mean is where ``s`` and ``b`` start: the progress to judge is
        the progress made from the checkpoint, not the abandoned weights' best). The
        reference stays, unless the checkpoint is older than it: then the reference values
        came from the abandoned weights (a blow-up's first steps) and the segment's mean
        replaces them, as its first value replaces ``x_0``.
        """
        self._n = 0
        self._held = 0
        self._left = 0
        self._over = False
        self._collected = []
        self._best = None
        self._var = 0.0  # the abandoned weights' swings say nothing about the noise to come
        if self._reference is None or to_step < self._reference_step:
            self._new_reference = True
            self._first = None

    def feed(self, record: Metrics) -> list[Detection]:
        """Smooth one value of ``monitor`` and fire when a rule holds."""
        p = self.params
        x = record.values.get(p.monitor)
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        x = float(x)
        step = record.step
        if self._n == 0:
            self._fast = self._slow = x
            self._n = 1
            if self._first is None:
                self._first, self._first_step = x, step
            self._collected = [x]
            if p.reference_values == 1:
                self._complete_segment_start(step)
            return []
        self._n += 1
        fast = self._fast = self._fast + p.fast_alpha * (x - self._fast)
        slow = self._slow
        deviation = x - slow
        alpha = p.alpha
        s = self._slow = slow + alpha * deviation
        var = self._var = (1.0 - alpha) * (self._var + alpha * deviation * deviation)
        first = self._first
        assert first is not None
        collected = self._collected
        r = self._reference
        if collected is not None:
            collected.append(x)
            if len(collected) >= p.reference_values:
                self._complete_segment_start(step)
                r = self._reference
        else:
            best = self._best
            if best is None or s < best:
                self._best, self._best_step = s, step
        # rule 1, on two values in a row: one could be the doing of a lucky first minibatch
        base = first if r is None or first >= r else r
        over = base > 0.0 and fast >= p.blowup_factor * base
        twice = over and self._over
        self._over = over
        if self._left:
            self._left -= 1
            return []
        if twice:
            return self._fire(record, 1, fast, base)
        b = self._best
        if collected is not None or r is None or b is None or r <= 0.0:
            return []
        s = self._slow
        # The noise of s (a square root) only when a rule's other conditions already hold:
        # a healthy run never gets that far.
        noise = -1.0
        progress = r - b
        if progress >= p.min_progress * r and s - b >= p.max_lost_progress * progress:
            noise = math.sqrt(var * alpha / (2.0 - alpha))
            if progress >= p.noise_z * noise:
                return self._fire(record, 2, s)
        rise = s - r
        if rise >= p.min_rise * r:
            if noise < 0.0:
                noise = math.sqrt(var * alpha / (2.0 - alpha))
            if rise >= p.noise_z * noise:
                self._held += 1
                if self._held >= p.hold:
                    return self._fire(record, 3, s)
                return []
        self._held = 0
        return []

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` over a columnar batch: one loop over ``monitor``'s column.

        It takes the values :func:`finite_values` picks. A segment's first values go through
        :meth:`feed` (they complete the segment's start); the values after them through
        :meth:`_watch`, a loop with the averages and counters in local variables and no
        test per value.
        """
        out: list[tuple[int, Detection]] = []
        monitor = self.params.monitor
        col = columns.get(monitor)
        if col is None:
            return out
        values, indices = finite_values(col, start, stop)
        k = 0
        total = len(values)
        while k < total:
            if self._n and self._collected is None:
                k = self._watch(steps, values, indices, start, k, out)
                continue
            i = start + k if indices is None else indices[k]
            for detection in self.feed(Metrics(steps[i], {monitor: values[k]})):
                out.append((i, detection))
            k += 1
        return out

    def _watch(
        self,
        steps: Sequence[int],
        values: Sequence[Any],
        indices: Sequence[int] | None,
        start: int,
        k: int,
        out: list[tuple[int, Detection]],
    ) -> int:
        """:meth:`feed` on ``values[k:]`` (``values[j]`` is at ``start + j``, or at
        ``indices[j]``) once the segment's start is complete.

        Stops after a detection (it changes the state the loop holds) and returns the
        index of the next value to feed.
        """
        p = self.params
        first = self._first
        r = self._reference
        assert first is not None
        fast_alpha = p.fast_alpha
        alpha = p.alpha
        keep = 1.0 - alpha
        two_minus_alpha = 2.0 - alpha
        noise_z = p.noise_z
        max_lost_progress = p.max_lost_progress
        hold = p.hold
        # Rule 1's base and the thresholds are fixed until the segment ends. fast is a
        # weighted mean of finite values, never >= inf: rule 1 is off when base <= 0.
        base = first if r is None or first >= r else r
        blowup = p.blowup_factor * base if base > 0.0 else math.inf
        judge = r is not None and r > 0.0
        if r is None or not judge:
            r = min_progress = min_rise = 0.0
        else:
            min_progress = p.min_progress * r
            min_rise = p.min_rise * r
        n = self._n
        fast = self._fast
        slow = self._slow
        var = self._var
        best = self._best
        held = self._held
        left = self._left
        over = self._over
        # rule 2's terms change only with the best value
        progress = lost = 0.0
        regained = False
        if best is not None:
            progress = r - best
            regained = progress >= min_progress
            lost = max_lost_progress * progress
        # n counts the values taken: values[k + m] is the value that made it n0 + m + 1
        n0 = n
        best_n = 0  # n at a new best value (0: none in this run)
        sqrt = math.sqrt
        rule = 0
        taking = iter(values[k:]) if k else iter(values)
        for x in taking:
            n += 1
            fast = fast + fast_alpha * (x - fast)
            deviation = x - slow
            slow = slow + alpha * deviation
            var = keep * (var + alpha * deviation * deviation)
            if best is None or slow < best:
                best = slow
                best_n = n
                progress = r - best
                regained = progress >= min_progress
                lost = max_lost_progress * progress
            was_over = over
            over = fast >= blowup
            if left:
                left -= 1
                continue
            if over and was_over:
                rule = 1
                break
            if not judge:
                continue
            noise = -1.0
            if regained and slow - best >= lost:
                noise = sqrt(var * alpha / two_minus_alpha)
                if progress >= noise_z * noise:
                    rule = 2
                    break
            rise = slow - r
            if rise >= min_rise:
                if noise < 0.0:
                    noise = sqrt(var * alpha / two_minus_alpha)
                if rise >= noise_z * noise:
                    held += 1
                    if held >= hold:
                        rule = 3
                        break
                    continue
            held = 0
        if best_n:
            j = k + best_n - n0 - 1
            self._best_step = steps[start + j if indices is None else indices[j]]
        self._n, self._fast, self._slow, self._var = n, fast, slow, var
        self._best = best
        self._held, self._left, self._over = held, left, over
        if not rule:
            return len(values)
        j = k + n - n0 - 1  # the value that fired
        i = start + j if indices is None else indices[j]
        record = Metrics(steps[i], {p.monitor: values[j]})
        for detection in self._fire(record, rule, fast if rule == 1 else slow, base):
            out.append((i, detection))
        return j + 1

    def _complete_segment_start(self, step: int) -> None:
        values = self._collected
        assert values
        mean = math.fsum(values) / len(values)
        # The running variance starts at 0 and needs ~1/alpha values to settle; until then
        # the noise would look small and a lucky dip like progress. The spread of the
        # first values is a fair first estimate (an upper one: any trend adds to it).
        spread = math.fsum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
        self._var = max(self._var, spread)
        self._collected = None
        # s started at one noisy value; the mean of the first few is the better start
        self._slow = mean
        self._best, self._best_step = mean, step
        if self._reference is None or self._new_reference:
            self._reference, self._reference_step = mean, step
            self._new_reference = False

    def _fire(self, record: Metrics, rule: int, smoothed: float, base: float = 0.0) -> list[Detection]:
        p = self.params
        self._left = p.cooldown
        self._held = 0
        first = self._first
        assert first is not None
        r = self._reference
        b = self._best
        good = self.good_step
        if rule == 1:
            what = "its first value" if base == first else "the mean of its first values"
            why = f"its smoothed value {smoothed:.4g} is {smoothed / base:.3g}x {what} {base:.4g}"
        elif rule == 2:
            assert r is not None and b is not None
            why = (
                f"it came down from {r:.4g} to {b:.4g} (at step {good}) and is back at "
                f"{smoothed:.4g}, {(smoothed - b) / (r - b):.0%} of that progress lost"
            )
        else:
            assert r is not None
            why = f"it has stayed above its start {r:.4g} for {p.hold} values (now {smoothed:.4g})"
        detail: dict[str, float] = {"rule": float(rule), "smoothed": smoothed, "good_step": float(good)}
        if r is not None:
            detail["reference"] = r
        if b is not None:
            detail["best"] = b
        return [
            Detection(
                detector=self.name,
                metric=p.monitor,
                step=record.step,
                value=float(record.values[p.monitor]),
                reason=f"{p.monitor} overshoots at step {record.step}: {why}; the LR is too high",
                detail=detail,
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """Both averages, the variance, the reference, the best value and the counters."""
        return {
            "n": self._n,
            "first": self._first,
            "first_step": self._first_step,
            "collected": None if self._collected is None else list(self._collected),
            "reference": self._reference,
            "reference_step": self._reference_step,
            "new_reference": self._new_reference,
            "fast": self._fast,
            "slow": self._slow,
            "var": self._var,
            "best": self._best,
            "best_step": self._best_step,
            "held": self._held,
            "left": self._left,
            "over": self._over,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._n = int(state["n"])
        first = state["first"]
        self._first = optional_float(first)
        self._first_step = int(state["first_step"])
        collected = state["collected"]
        self._collected = None if collected is None else [float(x) for x in collected]
        ref = state["reference"]
        self._reference = optional_float(ref)
        self._reference_step = int(state["reference_step"])
        self._new_reference = bool(state["new_reference"])
        self._fast = float(state["fast"])
        self._slow = float(state["slow"])
        self._var = float(state["var"])
        best = state["best"]
        self._best = optional_float(best)
        self._best_step = int(state["best_step"])
        self._held = int(state["held"])
        self._left = int(state["left"])
        self._over = bool(state["over"])

    def monitored(self) -> tuple[str, ...]:
        """The watched metric."""
        return (self.params.monitor,)
