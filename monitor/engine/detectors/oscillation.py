"""``oscillation``: the metric keeps bouncing up and down by a large fraction of its level.

This is what a too-high LR looks like: the loss jumps ±20-50 % every few steps around a
level that hardly moves, instead of descending with small noise.

Statistic
    A Holt (double exponential) smoother follows the level ``L`` and the per-value trend ``T``
    of the metric. Each new value ``x`` is compared with the smoother's forecast
    ``f = L + T`` made *before* seeing it; the relative residual is::

        u = (x - f) / |L|

    Because the smoother follows the trend, a steadily descending loss gives residuals that
    are just its noise, and ``u`` measures swings relative to the current level, whatever
    the scale. The smoother learns from the residual clipped to ``±clip * |L|``
    (``L += alpha * clipped``, ``T += beta * alpha * clipped``): without the clip a single ×5
    spike would drag the level up and leave a trail of large negative residuals, then an
    overshoot of positive ones — an oscillation made of one spike (it happened in 77 % of
    noisy descents with 8 such spikes before the clip was added). Then:

    * an *excursion* is a value with ``|u| >= min_relative_amplitude``;
    * a *reversal* is an excursion whose sign differs from the previous excursion's sign;
    * ``amplitude`` is the mean of ``min(|u|, 10)`` over the window;
    * ``trend`` is the net relative change the smoother expects over the window,
      ``|T| * window / |L|``.

    Over the last ``window`` values, the detector fires when all four hold::

        excursions / window  >=  min_excursion_fraction    # large swings are the rule
        reversals  / window  >=  min_flip_rate             # and they go both ways, repeatedly
        trend                <=  max_trend_ratio * amplitude   # with little net progress
        periodicity          >=  min_periodicity           # and they repeat with a period

    where, with ``rho(k)`` the autocorrelation at lag ``k`` of the window's residuals ``u``
    (each capped at ±10)::

        periodicity = max over P in {p - 1, p, p + 1}, P >= 2, of (rho(P) - rho(P // 2)) / 2
        p = round(2 * window / reversals)     # the period the spacing of reversals suggests

    A wave of period ``P`` is in phase with itself ``P`` values later (``rho(P)`` near 1) and
    in opposition half a period later (``rho(P // 2)`` near -1): periodicity near 1.

    Why these and not the raw sign-change rate: i.i.d. noise changes sign about every other
    value, as often as a period-4 oscillation, so the rate of sign changes alone cannot tell
    them apart; the size of the swings can. Counting excursions (not summing ``|u|``) keeps a
    single spike, however large, from looking like an oscillation: it is one excursion.
    Requiring reversals rules out a level shift, a blow-up or the fast first descent of a
    loss (all excursions one way), and the trend condition leaves alone a loss that bounces
    but still falls fast.

    Period-2 bounces (the classic too-high LR) give a reversal at nearly every value; a
    period-10 oscillation gives about two per period, so ``min_flip_rate=0.08`` accepts
    periods up to about 20 values. The evidence on generated series is in docs/policies.md (Detectors)
    and tests/engine/test_detectors_oscillation.py.

    Why the periodicity rule: the loss of a minibatch is noisy, and at a low loss level its
    relative noise is large: ±25 % for a mean squared error over 32 samples, more for a
    cross-entropy once most samples are right. Such noise passes the first three rules all the
    time, and without the fourth the detector halved a well-chosen LR every ``cooldown``
    values, down to nothing (docs/quality.md). Noise is uncorrelated from value to value, so
    ``rho`` stays near 0 at every lag (about ±0.15 over 50 values, a little below 0 at short
    lags because the smoother follows the noise, a bias the difference of two lags cancels):
    periodicity about 0 ± 0.1. A period-3 wave scores 0.75, a period-2 bounce or a period-10
    square wave 1.

Cost
    O(1) per value: the smoother, and ring buffers of small ints (an excursion code, ``|u|``
    and the capped ``u`` in units of 1e-6) with running integer sums, so no rounding drift.
    The autocorrelations (at most six lags) are computed from the ring (3 x ``window`` products) only when
    the first three rules hold.

Parameters (:class:`OscillationParams`)
    ``monitor="loss"``, ``alpha=0.1`` (level smoothing), ``beta=0.05`` (trend smoothing),
    ``window=50``, ``min_relative_amplitude=0.2``, ``min_excursion_fraction=0.25``,
    ``min_flip_rate=0.08``, ``max_trend_ratio=2.0``, ``min_periodicity=0.55``, ``clip=0.5``,
    ``cooldown=50``.

Edge cases
    * A record without ``monitor`` changes nothing. The window counts *values*, not steps.
    * NaN and ±Inf (and finite values with ``|x| >= 1e150``) are ignored: the smoother and the
      window are untouched.
    * A level ``|L| < 1e-12`` makes ``u`` meaningless; such a value counts as no excursion.
      The detector is meant for positive metrics such as losses.

Phases (h11 style)::

    phase      on a finite value                                       next phase
    ---------  ------------------------------------------------------  --------------------
    warm-up    first value: L = x, T = 0; later: update window         watching after
                                                                       `window` residuals
    watching   all three conditions hold: FIRE                         cooldown
    watching   otherwise                                               watching
    cooldown   update window; left -= 1                                watching at left=0
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import length_hint
from typing import Any, ClassVar

from .._packing import pack_ints, unpack_ints
from ..base import Detector, ParamError, finite_values
from ..events import Detection, Metrics

__all__ = ["OscillationDetector", "OscillationParams", "OscillationPhase"]

MAX_ABS_VALUE = 1e150
_TINY = 1e-12
_AMPLITUDE_CAP = 10.0  # |u| above this counts as 10 in the amplitude
_AMPLITUDE_UNIT = 1e-6  # |u| is stored as an integer number of these

# excursion codes in the ring
_NONE = 0
_SAME = 1  # an excursion with the sign of the previous one
_FLIP = 2  # an excursion that reverses the sign of the previous one


class OscillationPhase(str, enum.Enum):
    """Where the oscillation detector is (see the module docstring)."""

    WARM_UP = "warm-up"
    WATCHING = "watching"
    COOLDOWN = "cooldown"


def _check_number(
    field: str, value: object, low: float, high: float, *, closed_high: bool
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(field, f"must be a number, got {value!r}")
    ok = low < value <= high if closed_high else low < value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ParamError(field, f"must be in ({low:g}, {high:g}{bracket}, got {value!r}")
    return float(value)


def _check_int(field: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ParamError(field, f"must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class OscillationParams:
    """Parameters of ``oscillation``."""

    monitor: str = "loss"
    alpha: float = 0.1
    beta: float = 0.05
    window: int = 50
    min_relative_amplitude: float = 0.2
    min_excursion_fraction: float = 0.25
    min_flip_rate: float = 0.08
    max_trend_ratio: float = 2.0
    min_periodicity: float = 0.55
    clip: float = 0.5
    cooldown: int = 50

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ParamError("monitor", f"must be a non-empty metric name, got {self.monitor!r}")
        setattr_ = object.__setattr__
        setattr_(self, "alpha", _check_number("alpha", self.alpha, 0.0, 1.0, closed_high=True))
        setattr_(self, "beta", _check_number("beta", self.beta, 0.0, 1.0, closed_high=True))
        _check_int("window", self.window, 2)
        setattr_(
            self,
            "min_relative_amplitude",
            _check_number(
                "min_relative_amplitude",
                self.min_relative_amplitude,
                0.0,
                math.inf,
                closed_high=False,
            ),
        )
        setattr_(
            self,
            "min_excursion_fraction",
            _check_number(
                "min_excursion_fraction", self.min_excursion_fraction, 0.0, 1.0, closed_high=True
            ),
        )
        setattr_(
            self,
            "min_flip_rate",
            _check_number("min_flip_rate", self.min_flip_rate, 0.0, 1.0, closed_high=True),
        )
        setattr_(
            self,
            "max_trend_ratio",
            _check_number(
                "max_trend_ratio", self.max_trend_ratio, 0.0, math.inf, closed_high=False
            ),
        )
        setattr_(
            self,
            "min_periodicity",
            _check_number("min_periodicity", self.min_periodicity, 0.0, 1.0, closed_high=True),
        )
        setattr_(self, "clip", _check_number("clip", self.clip, 0.0, math.inf, closed_high=False))
        _check_int("cooldown", self.cooldown, 0)


class OscillationDetector(Detector):
    """Fires when large swings of the metric keep reversing without net progress."""

    name: ClassVar[str] = "oscillation"

    __slots__ = (
        "_amp_ring",
        "_amp_sum",
        "_code_ring",
        "_cooldown_left",
        "_excursions",
        "_flips",
        "_head",
        "_last_sign",
        "_level",
        "_min_excursions",
        "_min_flips",
        "_n",
        "_res_ring",
        "_trend",
        "params",
    )

    def __init__(self, params: OscillationParams | None = None) -> None:
        self.params = p = params if params is not None else OscillationParams()
        # the rings are empty until a second value needs them (see _allocate)
        self._code_ring: list[int] = []
        self._amp_ring: list[int] = []
        self._res_ring: list[int] = []  # u capped at ±10, in units of 1e-6
        self._head = 0
        self._n = 0  # values seen, capped at window + 1 (the first only seeds the smoother)
        self._level = 0.0
        self._trend = 0.0
        self._excursions = 0
        self._flips = 0
        self._amp_sum = 0
        self._last_sign = 0
        self._cooldown_left = 0
        # the fraction conditions as integer counts, computed once
        self._min_excursions = math.ceil(p.min_excursion_fraction * p.window - 1e-9)
        self._min_flips = math.ceil(p.min_flip_rate * p.window - 1e-9)

    @property
    def phase(self) -> OscillationPhase:
        """The current phase (see the module docstring's table)."""
        if self._n <= self.params.window:
            return OscillationPhase.WARM_UP
        if self._cooldown_left:
            return OscillationPhase.COOLDOWN
        return OscillationPhase.WATCHING

    @property
    def level(self) -> float | None:
        """The smoother's level, None before the first value."""
        return self._level if self._n else None

    def statistics(self) -> dict[str, float]:
        """The window's statistics as they stand (for `lrpilot show` and tests)."""
        window = self.params.window
        level = self._level
        base = level if level > 0.0 else -level
        amplitude = self._amp_sum * _AMPLITUDE_UNIT / window
        trend = abs(self._trend) * window / base if base >= _TINY else 0.0
        return {
            "excursion_fraction": self._excursions / window,
            "flip_rate": self._flips / window,
            "amplitude": amplitude,
            "trend": trend,
            "level": level,
        }

    def rewind(self, to_step: int) -> None:
        """The job rolled back: forget the window and warm up again from the next value."""
        self.__init__(self.params)  # type: ignore[misc]

    def _allocate(self) -> None:
        """The rings, all empty slots: the first value only seeds the smoother, so a job that
        reported one value or none holds no window (~1.4 KB for every such job of the daemon)."""
        window = self.params.window
        self._code_ring = [_NONE] * window
        self._amp_ring = [0] * window
        self._res_ring = [0] * window

    def feed(self, record: Metrics) -> list[Detection]:
        """Update the smoother and the window with ``monitor``'s value; fire on an oscillation."""
        p = self.params
        x = record.values.get(p.monitor)
        if x is None or not -MAX_ABS_VALUE < x < MAX_ABS_VALUE:
            return []
        n = self._n
        if n == 0:
            self._level = float(x)
            self._trend = 0.0
            self._n = 1
            return []
        level = self._level
        trend = self._trend
        forecast = level + trend
        residual = x - forecast
        base = level if level > 0.0 else -level
        code = _NONE
        amp = 0
        res = 0
        if base >= _TINY:
            # the smoother learns from the residual clipped to ±clip*|L|: one spike barely
            # moves it, so it does not leave a trail of excursions behind
            limit = p.clip * base
            if residual > limit:
                step_ = p.alpha * limit
            elif residual < -limit:
                step_ = -p.alpha * limit
            else:
                step_ = p.alpha * residual
            u = residual / base
            magnitude = u if u > 0.0 else -u
            amp = int(
                (magnitude if magnitude < _AMPLITUDE_CAP else _AMPLITUDE_CAP) / _AMPLITUDE_UNIT
            )
            res = amp if u > 0.0 else -amp
            if magnitude >= p.min_relative_amplitude:
                sign = 1 if u > 0.0 else -1
                code = _FLIP if sign == -self._last_sign else _SAME
                self._last_sign = sign
        else:
            step_ = p.alpha * residual
        self._level = forecast + step_
        self._trend = trend + p.beta * step_
        if not self._code_ring:
            self._allocate()
        head = self._head
        codes = self._code_ring
        amps = self._amp_ring
        old = codes[head]
        if old:
            self._excursions -= 1
            if old == _FLIP:
                self._flips -= 1
        if code:
            self._excursions += 1
            if code == _FLIP:
                self._flips += 1
        codes[head] = code
        self._amp_sum += amp - amps[head]
        amps[head] = amp
        self._res_ring[head] = res
        head += 1
        self._head = head if head < p.window else 0
        if n <= p.window:
            self._n = n + 1
            if n < p.window:
                return []
        if self._cooldown_left:
            self._cooldown_left -= 1
            return []
        if self._excursions < self._min_excursions or self._flips < self._min_flips:
            return []
        return self._judge(record.step, x)

    def feed_columns(
        self,
        steps: Sequence[int],
        columns: Mapping[str, Sequence[float | None]],
        start: int,
        stop: int,
    ) -> list[tuple[int, Detection]]:
        """:meth:`feed` over a columnar batch: one loop over ``monitor``'s column.

        It takes the values :func:`finite_values` picks, with no test per value; the
        smoother, the rings' head and the counters live in local variables; the trend and
        periodicity rules are judged (:meth:`_judge`) only when the counts hold, as in
        :meth:`feed`.
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
        if n == 0:  # the first value only seeds the smoother
            self._level = float(next(taking))
            self._trend = 0.0
            self._n = n = 1
        if not self._code_ring and length_hint(taking):
            self._allocate()
        alpha = p.alpha
        neg_alpha = -alpha
        beta = p.beta
        clip = p.clip
        min_amplitude = p.min_relative_amplitude
        window = p.window
        min_excursions = self._min_excursions
        min_flips = self._min_flips
        tiny = _TINY
        cap = _AMPLITUDE_CAP
        neg_cap = -cap
        neg_min_amplitude = -min_amplitude
        none, same, flip = _NONE, _SAME, _FLIP
        unit = _AMPLITUDE_UNIT
        trunc = math.trunc  # int() of a float, without the cost of calling a type
        codes = self._code_ring
        amps = self._amp_ring
        residuals = self._res_ring
        head = self._head
        level = self._level
        trend = self._trend
        excursions = self._excursions
        flips = self._flips
        last_sign = self._last_sign
        left = self._cooldown_left
        for x in taking:
            forecast = level + trend
            residual = x - forecast
            base = level if level > 0.0 else -level
            if base >= tiny:
                limit = clip * base
                if residual > limit:
                    step_ = alpha * limit
                elif residual < -limit:
                    step_ = neg_alpha * limit
                else:
                    step_ = alpha * residual
                u = residual / base
                if u > 0.0:
                    res = amp = trunc((u if u < cap else cap) / unit)
                    if u >= min_amplitude:
                        code = flip if last_sign == -1 else same
                        last_sign = 1
                    else:
                        code = none
                else:  # as above for -u, written with u (the same roundings mirrored)
                    res = trunc((u if u > neg_cap else neg_cap) / unit)
                    amp = -res
                    if u <= neg_min_amplitude:
                        code = flip if last_sign == 1 else same
                        last_sign = -1
                    else:
                        code = none
            else:
                step_ = alpha * residual
                code = amp = res = 0
            level = forecast + step_
            trend = trend + beta * step_
            old = codes[head]
            if old != code:
                if old:
                    excursions -= 1
                    if old == flip:
                        flips -= 1
                if code:
                    excursions += 1
                    if code == flip:
                        flips += 1
                codes[head] = code
            amps[head] = amp
            residuals[head] = res
            head += 1
            if head == window:
                head = 0
            if n <= window:
                n += 1
                if n <= window:
                    continue
            if left:
                left -= 1
                continue
            if excursions < min_excursions or flips < min_flips:
                continue
            self._head, self._n, self._level, self._trend = head, n, level, trend
            self._excursions, self._flips, self._amp_sum = excursions, flips, sum(amps)
            self._last_sign, self._cooldown_left = last_sign, left
            k = len(values) - length_hint(taking) - 1  # the index of x in values
            i = start + k if indices is None else indices[k]
            for detection in self._judge(steps[i], x):
                out.append((i, detection))
            left = self._cooldown_left
        self._head, self._n, self._level, self._trend = head, n, level, trend
        self._excursions, self._flips, self._amp_sum = excursions, flips, sum(amps)
        self._last_sign, self._cooldown_left = last_sign, left
        return out

    def _judge(self, step: int, x: float) -> list[Detection]:
        """The trend and periodicity rules on the window as it stands; fire if both hold."""
        p = self.params
        stats = self.statistics()
        if stats["trend"] > p.max_trend_ratio * stats["amplitude"]:
            return []
        periodicity, period = self._periodicity()
        if periodicity < p.min_periodicity:
            return []
        stats["periodicity"] = periodicity
        stats["period"] = period
        self._cooldown_left = p.cooldown
        return [self._detection(step, float(x), stats)]

    def _periodicity(self) -> tuple[float, int]:
        """The window's periodicity and the period that scores it (module docstring).

        (0.0, 0) when the residuals do not vary or no reversal was seen.
        """
        window = self.params.window
        if not self._flips:
            return 0.0, 0
        head = self._head
        values = self._res_ring[head:] + self._res_ring[:head]  # oldest first
        mean = sum(values) / window
        variance = sum(v * v for v in values) / window - mean * mean
        if variance <= 0.0:
            return 0.0, 0
        rhos: dict[int, float] = {}

        def rho(lag: int) -> float:
            if lag not in rhos:
                products = sum(a * b for a, b in zip(values[lag:], values, strict=False))
                rhos[lag] = (products / (window - lag) - mean * mean) / variance
            return rhos[lag]

        guess = round(2 * window / self._flips)
        best, best_period = 0.0, 0
        for period in range(max(2, guess - 1), min(window - 2, guess + 1) + 1):
            score = (rho(period) - rho(period // 2)) / 2
            if score > best:
                best, best_period = score, period
        return best, best_period

    def _detection(self, step: int, value: float, stats: dict[str, float]) -> Detection:
        p = self.params
        return Detection(
            detector=self.name,
            metric=p.monitor,
            step=step,
            value=value,
            reason=(
                f"{p.monitor} is oscillating at step {step}: {self._excursions} of the last "
                f"{p.window} values swung at least {p.min_relative_amplitude:.0%} away from "
                f"its level {stats['level']:.4g} (mean swing {stats['amplitude']:.0%}), "
                f"reversing direction {self._flips} times with a period of about "
                f"{stats['period']:.0f} values (periodicity {stats['periodicity']:.2f}), "
                f"with a net trend of "
                f"{stats['trend']:.0%} over the window"
            ),
            detail=stats,
        )

    def state_dict(self) -> dict[str, Any]:
        """Smoother, window rings (oldest first, packed: see ``_packing``) and counters
        (JSON-ready)."""
        head = self._head
        codes, amps, residuals = self._code_ring, self._amp_ring, self._res_ring
        if not codes:  # not allocated yet: the empty window they stand for (head is 0)
            codes = amps = residuals = [_NONE] * self.params.window
        return {
            "n": self._n,
            "level": self._level,
            "trend": self._trend,
            "codes": pack_ints(codes[head:] + codes[:head]),
            "amplitudes": pack_ints(amps[head:] + amps[:head]),
            "residuals": pack_ints(residuals[head:] + residuals[:head]),
            "last_sign": self._last_sign,
            "cooldown_left": self._cooldown_left,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        window = self.params.window
        codes = unpack_ints(state["codes"])
        amps = unpack_ints(state["amplitudes"])
        if len(codes) != window or len(amps) != window:
            raise ValueError(f"state holds a window of {len(codes)} values, expected {window}")
        if any(c not in (_NONE, _SAME, _FLIP) for c in codes):
            raise ValueError("state holds an unknown excursion code")
        # snapshots from before the periodicity rule have no residuals: the rule then waits
        # for a window of new values
        residuals = unpack_ints(state.get("residuals", [0] * window))
        if len(residuals) != window:
            raise ValueError(f"state holds {len(residuals)} residuals, expected {window}")
        self._code_ring = codes
        self._amp_ring = amps
        self._res_ring = residuals
        self._head = 0
        self._excursions = sum(1 for c in codes if c)
        self._flips = sum(1 for c in codes if c == _FLIP)
        self._amp_sum = sum(amps)
        self._n = int(state["n"])
        self._level = float(state["level"])
        self._trend = float(state["trend"])
        self._last_sign = int(state["last_sign"])
        self._cooldown_left = int(state["cooldown_left"])

    def monitored(self) -> tuple[str, ...]:
        """The watched metric."""
        return (self.params.monitor,)
