"""``spike``: one value far above the recent values of the metric, and bursts of them.

Rule
    Keep the last ``window`` accepted values of ``monitor``. Once at least ``min_samples`` are
    kept, a new value ``x`` is a *spike* when::

        z = (x - mean) / std  >  z_threshold

    with ``mean`` and ``std`` (population standard deviation) of the kept values. The
    defaults follow OLMo-core's loss-spike reference: 6σ over the last 128 steps, judged only
    after 64 samples. Only upward spikes count (a sudden drop of the loss is good news).

    A spike is **not** added to the window. A single outlier would otherwise inflate ``std``
    for the next ``window`` values and hide the spikes that follow it (and a burst would
    teach the detector that spikes are normal). Non-spike values are added, replacing the
    oldest once the window is full.

Bursts
    Several spikes close together mean the LR is too high, not bad luck with a batch: the
    engine answers a *burst* by reducing the LR, and a lone spike by nothing. A burst is
    ``burst_count`` spikes whose steps all lie within ``burst_window`` steps, that is in
    ``(s - burst_window, s]`` for the step ``s`` of the last of them. The detector keeps the
    steps of recent spikes; on the spike that completes a burst it emits, after that spike's
    own detection and on the same record, a second detection with ``detector="spike"``,
    the same metric, step and value, and ``detail={"burst": 1, "count": n, "window": ...}``
    where ``n`` is the number of spikes in the burst window. The spike list is then cleared,
    so the next burst needs ``burst_count`` new spikes. ``burst_count=0`` turns bursts off;
    ``burst_count=1`` makes every spike a burst. Use :meth:`SpikeDetector.is_burst` to tell
    the two kinds apart: a single spike's detail has no ``"burst"`` key. Burst steps are step
    numbers (not records), so they mean the same with a metric reported every 10 steps.

Level shifts
    Since spikes are kept out of the window, a permanent jump of the metric to a new level
    would make every later value a spike. After ``reset_after`` spikes in a row (no accepted
    value in between) the detector takes the jump as the new normal: it empties the window
    and warms up again. ``reset_after=0`` never resets.

Statistic and cost
    ``mean`` and ``M2`` (sum of squared deviations) of the window, updated in O(1) per value
    with Welford's update (and its inverse when the oldest value leaves, done as one
    replace-update). Floating-point drift of that running update is bounded by recomputing
    ``mean`` and ``M2`` exactly from the ring buffer every ``window * 8`` replacements,
    which costs O(1) amortised. A window whose ``std`` is 0 (a constant metric) uses
    ``1e-9 * max(1, |mean|)`` instead, so a constant loss that moves by a rounding error is not
    a 10¹⁵σ event, while a real jump still is.

Parameters (:class:`SpikeParams`)
    ``monitor="loss"``, ``window=128``, ``min_samples=64``, ``z_threshold=6.0``,
    ``burst_count=3``, ``burst_window=50``, ``reset_after=32``.

Edge cases
    * A record without ``monitor`` changes nothing. The window counts *values*, not steps: a
      metric reported every 10 steps has a window of ``window * 10`` steps.
    * NaN and ±Inf values are ignored (the ``non_finite`` detector reports them), and so are
      finite values with ``|x| >= 1e150``, whose squares would overflow the statistics; the
      window stays untouched.
    * Steps that go backwards (a rollback) drop remembered spike steps that now lie in the
      future, so they cannot form a burst with the replayed steps.

Phases (h11 style: every transition is in this table)::

    phase      on a finite value                                        next phase
    ---------  -------------------------------------------------------  ---------------------
    warm-up    add to window                                            watching at min_samples
    watching   z <= z_threshold: add to window                          watching
    watching   z >  z_threshold: FIRE (and a burst if it completes one) watching
    watching   z >  z_threshold, reset_after spikes in a row: FIRE,     warm-up
               empty the window
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import length_hint
from typing import Any, ClassVar

from .._packing import pack_floats, unpack_floats
from ..base import Detector, ParamError, finite_values
from ..events import Detection, Metrics

__all__ = ["SpikeDetector", "SpikeParams", "SpikePhase"]

#: values at or beyond this magnitude are ignored: their squares would overflow
MAX_ABS_VALUE = 1e150


class SpikePhase(str, enum.Enum):
    """Where the spike detector is (see the module docstring)."""

    WARM_UP = "warm-up"  # fewer than min_samples values in the window
    WATCHING = "watching"


def _check_int(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ParamError(field, f"must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class SpikeParams:
    """Parameters of ``spike`` (defaults: OLMo-core's 6σ over 128 steps after 64 samples)."""

    monitor: str = "loss"
    window: int = 128
    min_samples: int = 64
    z_threshold: float = 6.0
    burst_count: int = 3
    burst_window: int = 50
    reset_after: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        _check_int("window", self.window, 2)
        _check_int("min_samples", self.min_samples, 2)
        if self.min_samples > self.window:
            raise ParamError(
                "min_samples", f"must be <= window ({self.window}), got {self.min_samples}"
            )
        z = self.z_threshold
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 < z < math.inf:
            raise ParamError("z_threshold", f"must be a finite number > 0, got {z!r}")
        object.__setattr__(self, "z_threshold", float(z))
        _check_int("burst_count", self.burst_count, 0)
        _check_int("burst_window", self.burst_window, 1)
        _check_int("reset_after", self.reset_after, 0)


class SpikeDetector(Detector):
    """Fires on values more than ``z_threshold`` standard deviations above the recent mean."""

    name: ClassVar[str] = "spike"

    __slots__ = (
        "_head",
        "_m2",
        "_mean",
        "_n",
        "_recompute_every",
        "_ring",
        "_run",
        "_since_recompute",
        "_spike_steps",
        "params",
        "spikes",
    )

    def __init__(self, params: SpikeParams | None = None) -> None:
        self.params = params if params is not None else SpikeParams()
        self._recompute_every = self.params.window * 8
        # grows by appends up to ``window`` values, then wraps: a job that reported a few
        # values holds a few slots, not 128 (1 KB for each idle job the daemon holds)
        self._ring: list[float] = []
        self._head = 0  # next slot to write (the oldest value once the ring is full)
        self._n = 0  # values in the window
        self._mean = 0.0
        self._m2 = 0.0
        self._since_recompute = 0
        self._run = 0  # spikes in a row
        self._spike_steps: list[int] = []  # steps of spikes that may still form a burst
        #: spikes fired so far
        self.spikes = 0

    # -- read-only views

    @property
    def phase(self) -> SpikePhase:
        """WARM_UP until ``min_samples`` values are in the window."""
        return SpikePhase.WATCHING if self._n >= self.params.min_samples else SpikePhase.WARM_UP

    @property
    def mean(self) -> float:
        """Mean of the window (0 when empty)."""
        return self._mean

    @property
    def std(self) -> float:
        """Population standard deviation of the window (0 when empty)."""
        return math.sqrt(self._m2 / self._n) if self._n else 0.0

    @property
    def samples(self) -> int:
        """Values in the window."""
        return self._n

    @staticmethod
    def is_burst(detection: Detection) -> bool:
        """True for the burst detection, False for a single spike's."""
        return bool(detection.detail.get("burst"))

    # -- Detector API

    def feed(self, record: Metrics) -> list[Detection]:
        """Judge the ``monitor`` value of ``record`` against the window, then update it."""
        p = self.params
        x = record.values.get(p.monitor)
        # the chained comparison is False for None-free NaN, ±Inf and huge values alike
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        n = self._n
        mean = self._mean
        if n >= p.min_samples:
            d = x - mean
            if d > 0.0:
                std = math.sqrt(self._m2 / n)
                floor = 1e-9 * (mean if mean > 1.0 else (-mean if mean < -1.0 else 1.0))
                if std < floor:
                    std = floor
                z = d / std
                if z > p.z_threshold:
                    return self._spike(record.step, float(x), z, mean, std)
        self._run = 0
        self._add(float(x))
        return []

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` on records ``start`` to ``stop - 1``.

        The values it takes come from :func:`finite_values`. While the window fills, each
        goes through :meth:`feed`; once it is full, :meth:`_full_run` takes them in runs (see
        there), with the same operations in the same order as :meth:`feed`, so the
        statistics are bit-identical.
        """
        monitor = self.params.monitor
        col = columns.get(monitor)
        if col is None:
            return []
        values, indices = finite_values(col, start, stop)
        out: list[tuple[int, Detection]] = []
        window = self.params.window
        k = 0
        total = len(values)
        while k < total:
            if self._n < window:  # warm-up, or after a reset: one value at a time
                i = start + k if indices is None else indices[k]
                for detection in self.feed(Metrics(steps[i], {monitor: values[k]})):
                    out.append((i, detection))
                k += 1
            else:
                k = self._full_run(steps, values, indices, start, k, out)
        return out

    def _full_run(
        self,
        steps: Sequence[int],
        values: Sequence[Any],
        indices: Sequence[int] | None,
        start: int,
        k: int,
        out: list[tuple[int, Detection]],
    ) -> int:
        """The full window takes ``values[k:]`` up to the ring's end, the next recomputation
        or the first spike, whichever comes first; returns the index of the next value.

        In such a run the slots to replace are consecutive and no value is both written and
        read: the old values are read as one slice before and the new ones written as one
        slice after, and the statistics live in local variables. The loop is :meth:`feed`'s
        judgement and :meth:`_add`'s replace-update, written out.
        """
        p = self.params
        window = p.window
        head = self._head
        since = self._since_recompute
        count = min(len(values) - k, window - head, max(1, self._recompute_every - since))
        xs = list(map(float, values[k : k + count]))
        taking = iter(xs)
        nf = float(window)
        mean = self._mean
        m2 = self._m2
        z_threshold = p.z_threshold
        sqrt = math.sqrt
        spiked = False
        for x, y in zip(taking, self._ring[head : head + count], strict=True):
            if x > mean:  # x - mean > 0.0, without making the difference of every value
                d = x - mean
                std = sqrt(m2 / nf)
                floor = 1e-9 * (mean if mean > 1.0 else (-mean if mean < -1.0 else 1.0))
                if std < floor:
                    std = floor
                z = d / std
                if z > z_threshold:
                    spiked = True
                    break
            shift = x - y
            new_mean = mean + shift / nf
            m2 = m2 + shift * (x - new_mean + y - mean)
            if not m2 > 0.0:
                m2 = 0.0
            mean = new_mean
        taken = count - length_hint(taking)  # the spike included
        added = taken - 1 if spiked else taken
        if added:
            self._ring[head : head + added] = xs[:added]
            head += added
            self._head = 0 if head == window else head
            self._mean, self._m2 = mean, m2
            self._run = 0
            since += added
            self._since_recompute = since
            if since >= self._recompute_every:
                self._recompute()
        k += taken
        if spiked:
            i = start + k - 1 if indices is None else indices[k - 1]
            for detection in self._spike(steps[i], x, z, mean, std):
                out.append((i, detection))
        return k

    def _add(self, x: float) -> None:
        ring = self._ring
        head = self._head
        n = self._n
        window = self.params.window
        if n < window:
            # Welford's update
            n += 1
            self._n = n
            delta = x - self._mean
            self._mean += delta / n
            self._m2 += delta * (x - self._mean)
            ring.append(x)
        else:
            # replace the oldest value y by x: inverse update and update in one step
            y = ring[head]
            old_mean = self._mean
            new_mean = old_mean + (x - y) / n
            self._mean = new_mean
            m2 = self._m2 + (x - y) * (x - new_mean + y - old_mean)
            self._m2 = m2 if m2 > 0.0 else 0.0
            self._since_recompute += 1
            ring[head] = x
        head += 1
        self._head = head if head < window else 0
        if self._since_recompute >= self._recompute_every:
            self._recompute()

    def _recompute(self) -> None:
        """Exact mean and M2 of the (full) window, to wipe out accumulated rounding drift."""
        ring = self._ring
        mean = math.fsum(ring) / len(ring)
        self._mean = mean
        self._m2 = math.fsum((v - mean) * (v - mean) for v in ring)
        self._since_recompute = 0

    def _spike(self, step: int, x: float, z: float, mean: float, std: float) -> list[Detection]:
        p = self.params
        self.spikes += 1
        self._run += 1
        metric = p.monitor
        out = [
            Detection(
                detector=self.name,
                metric=metric,
                step=step,
                value=x,
                reason=(
                    f"{metric} spiked to {x:.4g} at step {step}: {z:.1f}σ above its mean "
                    f"{mean:.4g} over the last {self._n} values"
                ),
                detail={"z": z, "mean": mean, "std": std},
            )
        ]
        if p.burst_count:
            steps = self._spike_steps
            if steps and steps[-1] > step:  # the job went back (rollback): forget the future
                steps[:] = [s for s in steps if s <= step]
            horizon = step - p.burst_window
            while steps and steps[0] <= horizon:
                del steps[0]
            steps.append(step)
            if len(steps) >= p.burst_count:
                count = len(steps)
                first = steps[0]
                steps.clear()
                out.append(
                    Detection(
                        detector=self.name,
                        metric=metric,
                        step=step,
                        value=x,
                        reason=(
                            f"burst of {count} {metric} spikes between steps {first} and {step} "
                            f"(at least {p.burst_count} within {p.burst_window} steps)"
                        ),
                        detail={
                            "burst": 1.0,
                            "count": float(count),
                            "window": float(p.burst_window),
                            "first_step": float(first),
                            "z": z,
                        },
                    )
                )
        if p.reset_after and self._run >= p.reset_after:
            self._reset_window()
        return out

    def _reset_window(self) -> None:
        self._n = 0
        self._head = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._since_recompute = 0
        self._run = 0
        self._ring.clear()  # in place: feed_columns holds it

    def state_dict(self) -> dict[str, Any]:
        """The window in order (oldest first), its statistics and the spike bookkeeping."""
        ring = self._ring
        n = self._n
        values = ring[:n] if n < self.params.window else ring[self._head :] + ring[: self._head]
        return {
            "values": pack_floats(values),
            "mean": self._mean,
            "m2": self._m2,
            "since_recompute": self._since_recompute,
            "run": self._run,
            "spike_steps": list(self._spike_steps),
            "spikes": self.spikes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the window must fit this ``window``)."""
        values = unpack_floats(state["values"])
        window = self.params.window
        if len(values) > window:
            raise ValueError(f"state holds {len(values)} values, more than window={window}")
        self._ring = values
        self._n = len(values)
        self._head = len(values) % window
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])
        self._since_recompute = int(state.get("since_recompute", 0))
        self._run = int(state.get("run", 0))
        self._spike_steps = [int(s) for s in state.get("spike_steps", [])]
        self.spikes = int(state.get("spikes", 0))

    def monitored(self) -> tuple[str, ...]:
        """The watched metric."""
        return (self.params.monitor,)
