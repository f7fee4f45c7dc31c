"""``divergence``: the metric is running away upwards.

Rule
    Smooth ``monitor`` with an exponential moving average ``s`` (``s = x`` on the first value,
    then ``s += alpha * (x - s)``). Over the last ``window`` values (``half = window // 2``),
    fire when all three hold::

        rise   = (s_now - s_window_ago) / |s_window_ago|        >=  min_rise
        rising = (steps where s went up) / window                >=  min_rising_fraction
        (s_now - s_half_ago) / half  >=  min_acceleration * (s_half_ago - s_window_ago) / (window - half)

    ``rise`` asks for a large relative increase (0.5 = the smoothed loss grew by half);
    ``rising`` asks that it grew *steadily*; the third rule asks that it is *not slowing
    down*: the second half of the window rose at least ``min_acceleration`` times as fast as
    the first half (0 turns this rule off).

    Why: a single spike lifts ``s`` for a few values, then ``s`` decays again, so most steps
    of the window are falling. A noisy but descending loss has ``s`` going down. A loss that
    jumps once to a higher level and stays there lifts ``s`` at every step for a while (an
    EMA approaches a new level from below), but ever more slowly, which the third rule
    rejects. An exponential blow-up rises at nearly every step, faster and faster.

    The rule looks at a growth *rate*: an exponential growth slower than ``(1 + min_rise)``
    per ``window`` values (e.g. ×1.28 per 50 values) never fires.

Statistic
    ``rise``, ``rising`` and the two half-window rises over a ring buffer of the last
    ``window`` smoothed values and the running count of their up-steps: O(1) per value.
    ``Detection.detail`` holds ``rise``, ``rising_fraction``, ``smoothed``,
    ``smoothed_before``, ``first_half_rise`` and ``second_half_rise`` (both relative to
    ``|s_window_ago|``).

Parameters (:class:`DivergenceParams`)
    ``monitor="loss"``, ``alpha=0.1`` (EMA weight of the new value), ``window=50``,
    ``min_rise=0.5``, ``min_rising_fraction=0.7``, ``min_acceleration=1.0``, ``cooldown=50``.

Edge cases
    * A record without ``monitor`` changes nothing. The window counts *values*, not steps.
    * NaN and ±Inf (and finite values with ``|x| >= 1e150``) are ignored; ``s`` and the window
      are untouched. A blow-up that ends in Inf is reported by ``non_finite``.
    * ``s_window_ago`` close to 0: the denominator is at least ``1e-12``. The rule is meant for
      positive metrics such as losses.

Phases (h11 style)::

    phase      on a finite value                                         next phase
    ---------  --------------------------------------------------------  ------------------
    warm-up    update s and the window                                   watching once the
                                                                         window is full
    watching   all three rules hold: FIRE                                cooldown
    watching   otherwise                                                 watching
    cooldown   update s and the window; left -= 1                        watching at left=0

The window keeps updating during cooldown, so a divergence that goes on fires again once
``cooldown`` values have passed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import length_hint
from typing import Any, ClassVar

from .._packing import pack_floats, pack_ints, unpack_floats, unpack_ints
from ..base import Detector, ParamError, finite_values
from ..events import Detection, Metrics

__all__ = ["DivergenceDetector", "DivergenceParams", "DivergencePhase"]

MAX_ABS_VALUE = 1e150
_TINY = 1e-12


class DivergencePhase(str, enum.Enum):
    """Where the divergence detector is (see the module docstring)."""

    WARM_UP = "warm-up"
    WATCHING = "watching"
    COOLDOWN = "cooldown"


def _check_fraction(field: str, value: object, *, allow_one: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(field, f"must be a number, got {value!r}")
    ok = 0.0 < value <= 1.0 if allow_one else 0.0 < value < 1.0
    if not ok:
        raise ParamError(field, f"must be in (0, 1{']' if allow_one else ')'}, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class DivergenceParams:
    """Parameters of ``divergence``."""

    monitor: str = "loss"
    alpha: float = 0.1
    window: int = 50
    min_rise: float = 0.5
    min_rising_fraction: float = 0.7
    min_acceleration: float = 1.0
    cooldown: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        object.__setattr__(self, "alpha", _check_fraction("alpha", self.alpha))
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ParamError("window", f"must be an integer >= 2, got {self.window!r}")
        rise = self.min_rise
        if (
            isinstance(rise, bool)
            or not isinstance(rise, (int, float))
            or not 0.0 < rise < math.inf
        ):
            raise ParamError("min_rise", f"must be a finite number > 0, got {rise!r}")
        object.__setattr__(self, "min_rise", float(rise))
        object.__setattr__(
            self,
            "min_rising_fraction",
            _check_fraction("min_rising_fraction", self.min_rising_fraction),
        )
        acceleration = self.min_acceleration
        if (
            isinstance(acceleration, bool)
            or not isinstance(acceleration, (int, float))
            or not 0.0 <= acceleration < math.inf
        ):
            raise ParamError(
                "min_acceleration", f"must be a finite number >= 0, got {acceleration!r}"
            )
        object.__setattr__(self, "min_acceleration", float(acceleration))
        if (
            isinstance(self.cooldown, bool)
            or not isinstance(self.cooldown, int)
            or self.cooldown < 0
        ):
            raise ParamError("cooldown", f"must be an integer >= 0, got {self.cooldown!r}")


class DivergenceDetector(Detector):
    """Fires when the smoothed metric rose by ``min_rise`` steadily over ``window`` values."""

    name: ClassVar[str] = "divergence"

    __slots__ = (
        "_cooldown_left",
        "_head",
        "_min_ups",
        "_n",
        "_ring",
        "_smoothed",
        "_up_ring",
        "_ups",
        "params",
    )

    def __init__(self, params: DivergenceParams | None = None) -> None:
        self.params = p = params if params is not None else DivergenceParams()
        # both rings are empty until a second value needs them (see _allocate)
        self._ring: list[float] = []  # smoothed values; ring[head] is the oldest
        self._up_ring: list[int] = []  # 1 where the smoothed value went up
        self._head = 0
        self._n = 0  # smoothed values seen, capped at window + 1
        self._ups = 0  # sum of _up_ring
        self._smoothed = 0.0
        self._cooldown_left = 0
        # rising >= fraction  <=>  ups >= ceil(fraction * window), computed once
        self._min_ups = math.ceil(p.min_rising_fraction * p.window - 1e-9)

    @property
    def smoothed(self) -> float | None:
        """The current EMA of the metric, None before the first value."""
        return self._smoothed if self._n else None

    @property
    def phase(self) -> DivergencePhase:
        """The current phase (see the module docstring's table)."""
        if self._n <= self.params.window:
            return DivergencePhase.WARM_UP
        if self._cooldown_left:
            return DivergencePhase.COOLDOWN
        return DivergencePhase.WATCHING

    def rewind(self, to_step: int) -> None:
        """The job rolled back: forget the window and warm up again from the next value."""
        self.__init__(self.params)  # type: ignore[misc]

    def _allocate(self) -> None:
        """The rings, all zeros: the first value only seeds the EMA, so a job that reported
        one value or none holds no window (~900 bytes for every such job of the daemon)."""
        window = self.params.window
        self._ring = [0.0] * window
        self._up_ring = [0] * window

    def feed(self, record: Metrics) -> list[Detection]:
        """Update the EMA and the window with ``monitor``'s value; fire on a steady rise."""
        p = self.params
        x = record.values.get(p.monitor)
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        n = self._n
        if n == 0:
            self._smoothed = float(x)
            self._n = 1
            return []
        previous = self._smoothed
        s = previous + p.alpha * (x - previous)
        self._smoothed = s
        if not self._ring:
            self._allocate()
        head = self._head
        ring = self._ring
        up_ring = self._up_ring
        # before overwriting: ring[head] holds s from `window` values ago (once full),
        # up_ring[head] the up-flag that leaves the window
        oldest = ring[head] if n > p.window else None
        up = 1 if s > previous else 0
        self._ups += up - up_ring[head]
        up_ring[head] = up
        # the ring holds the previous value s_{t-1} at slot head-1; we store s_t at head
        ring[head] = s
        head += 1
        self._head = head if head < p.window else 0
        if n <= p.window:
            self._n = n + 1
        if self._cooldown_left:
            self._cooldown_left -= 1
            return []
        if oldest is None or self._ups < self._min_ups:
            return []
        return self._judge(record.step, x, s, oldest)

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` over a columnar batch: one loop over ``monitor``'s column.

        It takes the values :func:`finite_values` picks, with no test per value; the EMA,
        the window and the counters live in local variables; the rules are judged
        (:meth:`_judge`) only when enough of the window went up, as in :meth:`feed`.
        """
        out: list[tuple[int, Detection]] = []
        p = self.params
        col = columns.get(p.monitor)
        if col is None:
            return out
        values, indices = finite_values(col, start, stop)
        if not values:
            return out
        taking = iter(values)
        n = self._n
        if n == 0:  # the first value starts the average
            self._smoothed = float(next(taking))
            self._n = n = 1
        if not self._ring and length_hint(taking):
            self._allocate()
        alpha = p.alpha
        window = p.window
        min_ups = self._min_ups
        ring = self._ring
        up_ring = self._up_ring
        head = self._head
        ups = self._ups
        s = self._smoothed
        left = self._cooldown_left
        for x in taking:
            previous = s
            s = previous + alpha * (x - previous)
            if s > previous:
                ups += 1 - up_ring[head]
                up_ring[head] = 1
            else:
                ups -= up_ring[head]
                up_ring[head] = 0
            oldest = ring[head]
            ring[head] = s
            head += 1
            if head == window:
                head = 0
            if n <= window:  # warming up: no value from `window` values ago yet
                n += 1
                if left:
                    left -= 1
                continue
            if left:
                left -= 1
                continue
            if ups < min_ups:
                continue
            self._head, self._n, self._ups, self._smoothed = head, n, ups, s
            self._cooldown_left = left
            k = len(values) - length_hint(taking) - 1  # the index of x in values
            i = start + k if indices is None else indices[k]
            for detection in self._judge(steps[i], x, s, oldest):
                out.append((i, detection))
            left = self._cooldown_left
        self._head, self._n, self._ups, self._smoothed = head, n, ups, s
        self._cooldown_left = left
        return out

    def _judge(self, step: int, x: float, s: float, oldest: float) -> list[Detection]:
        """The rise and acceleration rules on the window that ends with ``s``: fire if both hold."""
        p = self.params
        base = oldest if oldest > 0.0 else -oldest
        if base < _TINY:
            base = _TINY
        rise = (s - oldest) / base
        if rise < p.min_rise:
            return []
        # not slowing down: s_{t-half} is `half` slots behind s_t (stored at `head - 1` now)
        half = p.window // 2
        middle = self._ring[(self._head - 1 - half) % p.window]
        first_rate = (middle - oldest) / (p.window - half)
        second_rate = (s - middle) / half
        if second_rate < p.min_acceleration * first_rate:
            return []
        self._cooldown_left = p.cooldown
        rising = self._ups / p.window
        return [
            Detection(
                detector=self.name,
                metric=p.monitor,
                step=step,
                value=float(x),
                reason=(
                    f"{p.monitor} is diverging at step {step}: its moving average rose "
                    f"{rise:+.0%} (from {oldest:.4g} to {s:.4g}) over the last {p.window} "
                    f"values, going up in {rising:.0%} of them"
                ),
                detail={
                    "rise": rise,
                    "rising_fraction": rising,
                    "smoothed": s,
                    "smoothed_before": oldest,
                    "first_half_rise": (middle - oldest) / base,
                    "second_half_rise": (s - middle) / base,
                },
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """EMA, window and up-flags (oldest first, packed: see ``_packing``) and cooldown
        (JSON-ready)."""
        head = self._head
        ring, ups = self._ring, self._up_ring
        if not ring:  # not allocated yet: the zeros they stand for (head is 0)
            ring, ups = [0.0] * self.params.window, [0] * self.params.window
        return {
            "smoothed": self._smoothed,
            "n": self._n,
            "window": pack_floats(ring[head:] + ring[:head]),
            "ups": pack_ints(ups[head:] + ups[:head]),
            "cooldown_left": self._cooldown_left,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        window = self.params.window
        ring = unpack_floats(state["window"])
        ups = [1 if u else 0 for u in unpack_ints(state["ups"])]
        if len(ring) != window or len(ups) != window:
            raise ValueError(f"state holds a window of {len(ring)} values, expected {window}")
        self._ring = ring
        self._up_ring = ups
        self._ups = sum(ups)
        self._head = 0
        self._n = int(state["n"])
        self._smoothed = float(state["smoothed"])
        self._cooldown_left = int(state["cooldown_left"])

    def monitored(self) -> tuple[str, ...]:
        """The watched metric."""
        return (self.params.monitor,)
