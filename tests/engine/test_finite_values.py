"""``finite_values`` picks what the loss detectors take, whichever of its two ways it goes."""

from __future__ import annotations

import math
import random

import pytest

from monitor.engine.base import MAX_ABS_VALUE, finite_values

NAN = float("nan")
INF = float("inf")


def _by_hand(column: list, start: int, stop: int) -> tuple[list, list[int]]:
    indices = [
        i
        for i in range(start, stop)
        if column[i] is not None and -MAX_ABS_VALUE < column[i] < MAX_ABS_VALUE
    ]
    return [column[i] for i in indices], indices


def _check(column: list, start: int, stop: int) -> None:
    values, indices = finite_values(column, start, stop)
    want_values, want_indices = _by_hand(column, start, stop)
    if indices is None:
        indices = list(range(start, start + len(values)))
    assert indices == want_indices
    assert [type(v) for v in values] == [type(v) for v in want_values]
    assert [repr(v) for v in values] == [repr(v) for v in want_values]


@pytest.mark.parametrize(
    "odd",
    [None, NAN, INF, -INF, 1e150, -1e150, 2e149, 1e308, 2**1100, -(2**1100)],
)
def test_every_value_that_is_not_taken_is_left_out_wherever_it_is(odd: object) -> None:
    """A gap, a non-finite value, one at or beyond the limit or an int too large for a
    float is left out at the start, the middle or the end of the span."""
    base = [1.0 - 1e-3 * i for i in range(20)]
    for where in (0, 7, 19):
        column = base[:]
        column[where] = odd
        for start, stop in ((0, 20), (5, 15), (7, 8), (0, 0)):
            _check(column, start, stop)


def test_a_clean_span_comes_back_whole_with_no_indices() -> None:
    """The common case: every value taken, ints and -0.0 as they are."""
    column = [0.5, 2, -0.0, 1e-300, -3.25, 1e148, True]
    values, indices = finite_values(column, 1, 6)
    assert indices is None
    assert values == [2, -0.0, 1e-300, -3.25, 1e148]
    assert type(values[0]) is int and math.copysign(1.0, values[1]) == -1.0


def test_values_just_under_the_limit_are_taken_either_way() -> None:
    """Just below 1e150 is taken (the C check's margin sends it the slow way), at it is not."""
    below = math.nextafter(MAX_ABS_VALUE, 0.0)
    _check([1.0, below, -below, MAX_ABS_VALUE, 3.0], 0, 5)
    assert finite_values([below], 0, 1)[0] == [below]


def test_random_columns_agree_with_the_rule() -> None:
    """Random columns mixing every kind of value give what the rule says."""
    rng = random.Random(7)
    kinds = [
        lambda: rng.uniform(-5, 5),
        lambda: rng.randint(-10, 10),
        lambda: None,
        lambda: NAN,
        lambda: rng.choice([INF, -INF]),
        lambda: rng.choice([1e150, -1e151, 1e149 * 9.9]),
    ]
    for _ in range(300):
        n = rng.randint(0, 40)
        weights = [50, 5, rng.randint(0, 5), rng.randint(0, 2), rng.randint(0, 2), 1]
        column = [rng.choices(kinds, weights)[0]() for _ in range(n)]
        start = rng.randint(0, n)
        _check(column, start, rng.randint(start, n))
