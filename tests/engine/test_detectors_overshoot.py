"""The overshoot detector: a blow-up, progress given back, or a loss stuck above its start."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.engine.base import ParamError
from monitor.engine.detectors.overshoot import OvershootDetector, OvershootParams, OvershootPhase
from monitor.engine.events import Detection, Metrics
from monitor.engine.responses import ResponseParams, resolve


def feed_all(det: OvershootDetector, values: list[float], start: int = 0) -> list[Detection]:
    out: list[Detection] = []
    for i, value in enumerate(values):
        out += det.feed(Metrics(step=start + i, values={"loss": value}))
    return out


def healthy(seed: int, n: int, start: float = 2.3, floor: float = 0.02, noise: float = 0.25) -> list[float]:
    """A good LR's training loss: fast then slow descent, multiplicative minibatch noise."""
    rng = random.Random(seed)
    return [
        (floor + (start - floor) * math.exp(-i / 60)) * math.exp(rng.gauss(0, noise)) for i in range(n)
    ]


def test_a_blow_up_fires_within_a_few_steps_and_names_the_first_step_as_good() -> None:
    """Rule 1: the fast average at twice the first value, twice in a row (2.31 -> 12.9 -> 32 as from a 100x LR)."""
    det = OvershootDetector()
    out = feed_all(det, [2.31, 12.9, 32.0, 1886.0], start=100)
    # 2.31 + 0.3 * (12.9 - 2.31) = 5.49 >= 2 * 2.31 at step 101, and 13.4 at step 102
    assert [d.step for d in out] == [102]
    d = out[0]
    assert (d.detector, d.metric, d.value) == ("overshoot", "loss", 32.0)
    assert d.detail["rule"] == 1
    assert d.detail["good_step"] == 100
    assert "first value 2.31" in d.reason and "LR is too high" in d.reason
    assert det.phase is OvershootPhase.TRIPPED


def test_progress_given_back_fires_and_points_at_the_best_step() -> None:
    """Rule 2: down from 2.3 to about 1.0, then back up by more than 3/4 of that."""
    det = OvershootDetector()
    down = [2.3] * 5 + [1.0] * 40
    assert feed_all(det, down) == []
    best_step = det.good_step
    out = feed_all(det, [2.4] * 40, start=len(down))
    assert len(out) == 1
    d = out[0]
    assert d.detail["rule"] == 2
    assert d.detail["good_step"] == best_step
    assert len(down) - 1 <= best_step <= len(down) + 1  # where the smoothed loss bottomed out
    assert d.detail["best"] < 1.1 and d.detail["reference"] == pytest.approx(2.3)
    assert "progress lost" in d.reason


def test_a_loss_held_above_its_start_fires_after_hold_values() -> None:
    """Rule 3: a dead network's loss a little above chance level, with little noise."""
    det = OvershootDetector(OvershootParams(hold=20))
    rng = random.Random(1)
    values = [2.30 + rng.gauss(0, 0.01) for _ in range(5)] + [2.45 + rng.gauss(0, 0.01) for _ in range(80)]
    out = feed_all(det, values)
    assert len(out) == 1 and out[0].detail["rule"] == 3
    # the average needs a few values to cross the line, then hold more values in a row
    assert 5 + 20 <= out[0].step <= 5 + 45


def test_the_same_rise_inside_minibatch_noise_does_not_fire() -> None:
    """Rule 3 asks for a rise beyond what the noise of the average explains."""
    det = OvershootDetector()
    rng = random.Random(2)
    values = [2.3 * math.exp(rng.gauss(0, 0.3)) for _ in range(5)] + [2.38 * math.exp(rng.gauss(0, 0.3)) for _ in range(300)]
    assert [d for d in feed_all(det, values) if d.detail["rule"] == 3] == []


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), noise=st.floats(0.0, 0.3), floor=st.floats(0.001, 0.5))
def test_a_healthy_descending_loss_never_fires(seed: int, noise: float, floor: float) -> None:
    """A good LR's loss keeps its progress, down to near zero, with minibatch noise up to ±30 % (lognormal sigma 0.3)."""
    det = OvershootDetector()
    assert feed_all(det, healthy(seed, 1500, floor=floor, noise=noise)) == []


def test_non_finite_values_are_ignored() -> None:
    """NaN and Inf are non_finite's business; they neither fire nor move the averages."""
    det = OvershootDetector()
    assert feed_all(det, [2.3, math.nan, math.inf, -math.inf, 2.2]) == []
    assert det.state_dict()["fast"] == pytest.approx(2.3 + 0.3 * (2.2 - 2.3))


def test_silent_while_tripped_until_cooldown_or_rewind() -> None:
    """After a detection: nothing for cooldown values; a rewind (rollback applied) re-arms at once."""
    det = OvershootDetector(OvershootParams(cooldown=10))
    growing = [2.0 * 3.0**i for i in range(20)]  # a blow-up that goes on
    # f = 3.2, 7.64, 21.5: twice over 2 x 2 at step 3; then 10 values of cooldown
    assert [d.step for d in feed_all(det, growing[:15])] == [3, 14]

    rewound = OvershootDetector(OvershootParams(cooldown=1000))
    assert len(feed_all(rewound, [2.0, 9.0, 30.0])) == 1
    rewound.rewind(0)
    assert rewound.phase is not OvershootPhase.TRIPPED
    # the averages start again from the checkpoint's loss; the first value (2.0) is kept
    assert feed_all(rewound, [2.1, 2.0, 1.9], start=3) == []
    # a new segment from the checkpoint's loss (about 2): the next blow-up fires again
    # (at step 7 the new reference, 6.0, is in: f must pass 12 twice)
    assert [d.step for d in feed_all(rewound, [6.0, 18.0, 54.0, 162.0], start=6)] == [9]


def test_state_dict_round_trip_continues_exactly() -> None:
    """A detector restored from a JSON snapshot mid-run fires at the same step as one that never stopped."""
    values = healthy(3, 100) + [v * 3 for v in healthy(4, 100, start=1.0)]
    whole = OvershootDetector()
    expected = [(d.step, d.reason) for d in feed_all(whole, values)]
    assert expected, "the test needs a detection after the cut"
    first = OvershootDetector()
    got = [(d.step, d.reason) for d in feed_all(first, values[:70])]
    second = OvershootDetector()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [(d.step, d.reason) for d in feed_all(second, values[70:], start=70)]
    assert got == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blowup_factor", 1.0),
        ("alpha", 0.0),
        ("fast_alpha", 1.5),
        ("reference_values", 0),
        ("hold", 0),
        ("noise_z", -1.0),
        ("min_progress", 2.0),
        ("monitor", ""),
    ],
)
def test_bad_parameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ParamError) as info:
        OvershootParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_default_response_is_a_rollback_with_a_tenfold_cut() -> None:
    resolved = resolve("overshoot", ResponseParams())
    assert (resolved.action, resolved.factor) == ("rollback", 0.1)


def test_a_rollback_to_before_the_reference_replaces_it() -> None:
    """A blow-up's first steps made the reference; after going back to step 0 the new segment's start is it.

    Otherwise a too-high LR after the rollback (100x cut to 10x) could never look high
    against a reference of hundreds.
    """
    det = OvershootDetector(OvershootParams(cooldown=1000))
    assert len(feed_all(det, [2.3, 13.0, 32.0, 1886.0, 500.0])) == 1
    assert det.state_dict()["reference"] > 400
    det.rewind(0)
    assert feed_all(det, [2.3, 2.2, 2.4, 2.3, 2.3], start=5) == []
    assert det.state_dict()["reference"] == pytest.approx(2.3)
    # down to 1.0 and back up: lost progress against the new reference
    out = feed_all(det, [1.0] * 40 + [2.4] * 40, start=10)
    assert [d.detail["rule"] for d in out] == [2]


def test_a_rollback_to_after_the_reference_keeps_it() -> None:
    """Back to a checkpoint taken after the first values: the run's start level still holds."""
    det = OvershootDetector()
    feed_all(det, [2.3] * 5 + [1.0] * 60 + [2.4] * 60)
    reference = det.state_dict()["reference"]
    det.rewind(30)
    feed_all(det, [1.2] * 10, start=200)
    assert det.state_dict()["reference"] == reference
