"""The decision journal's encoding: the reused JSON encoder and the per-part snapshot text."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.server.store import SnapshotText, _encode, dumps

_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5)
)
_value = st.recursive(
    _leaf,
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(
        st.text(max_size=4) | st.integers(-2, 2) | st.floats(-2, 2) | st.booleans() | st.none(),
        children,
        max_size=4,
    ),
    max_leaves=15,
)


@given(_value)
@settings(max_examples=300, deadline=None)
def test_the_reused_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    """The one C encoder kept for every call writes the text of json.dumps with compact
    separators, non-string keys and bare NaN/Infinity tokens included."""
    assert _encode(value) == json.dumps(value, separators=(",", ":"))


def test_the_reused_encoder_refuses_what_json_refuses() -> None:
    """A value JSON cannot hold is a TypeError naming its type, as with json.dumps."""
    try:
        _encode({"a": [object()]})
    except TypeError as exc:
        assert "object" in str(exc)
    else:  # pragma: no cover - the assertion is the test
        raise AssertionError("no TypeError")


def test_each_detector_of_a_small_state_is_a_part_of_its_own() -> None:
    """Every value of a dict of dicts is reused on its own, however few there are: an
    unchanged detector's item is the very text of last time, a changed one is written again,
    even to a value equal to the old one (0, 0.0, -0.0 and False are all == 0)."""
    quiet = {"n": 3, "mean": 0.5}
    busy: dict[str, Any] = {"n": 1, "level": 0}
    state = {"v": 1, "detectors": {"quiet": quiet, "busy": busy}}
    texts = SnapshotText()
    assert texts.dumps(state) == dumps(state)
    quiet_item = texts._parts[("detectors", "quiet")][1]
    for level, spelled in ((0.0, "0.0"), (-0.0, "-0.0"), (False, "false"), (math.nan, '"NaN"')):
        busy["level"] = level
        text = texts.dumps(state)
        assert text == dumps(state)
        assert f'"level":{spelled}' in text
        assert texts._parts[("detectors", "quiet")][1] is quiet_item
