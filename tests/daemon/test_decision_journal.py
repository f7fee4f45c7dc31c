"""The decision journal's encoding: the reused JSON encoder and the per-part snapshot text."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.server.store import (
    _SCHEMA,
    DB_NAME,
    Snapshot,
    SnapshotText,
    Store,
    _encode,
    dumps,
)

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
    assert texts.dumps(state) == dumps(state)  # a part's text is kept from its second writing
    quiet_item = texts._parts[("detectors", "quiet")][1]
    assert quiet_item is not None
    for level, spelled in ((0.0, "0.0"), (-0.0, "-0.0"), (False, "false"), (math.nan, '"NaN"')):
        busy["level"] = level
        text = texts.dumps(state)
        assert text == dumps(state)
        assert f'"level":{spelled}' in text
        assert texts._parts[("detectors", "quiet")][1] is quiet_item


def test_a_state_file_with_the_older_rowid_journal_still_journals(tmp_path: Path) -> None:
    """A file whose decisions table predates WITHOUT ROWID keeps its layout and journals,
    reads back and deletes decisions as a new file does."""
    old = sqlite3.connect(str(tmp_path / DB_NAME))
    old.executescript(_SCHEMA.replace(") WITHOUT ROWID;", ");"))
    old.close()
    store = Store(tmp_path)
    snap = Snapshot("j", "r", {"labels": {}}, {"v": 1}, "running", None, SnapshotText())
    store.commit_decisions([{"id": 1, "lrs": [0.5]}, {"id": 2, "lrs": [0.25]}], snap)
    store.commit_decisions([{"id": 3, "lrs": [math.inf]}], snap)
    assert [d["id"] for d in store.decisions("j", "r", after_id=1)] == [2, 3]
    assert store.decisions("j", "r", after_id=2)[0]["lrs"] == [math.inf]
    store.commit_decisions([{"id": 1}], Snapshot("j", "r2", {}, None, "running", None))
    store.delete_decisions("j", keep_run_id="r2")
    assert store.decisions("j", "r") == [] and len(store.decisions("j", "r2")) == 1
    store.close()
    reader = sqlite3.connect(str(tmp_path / DB_NAME))
    sql = reader.execute("SELECT sql FROM sqlite_master WHERE name='decisions'").fetchone()[0]
    reader.close()
    assert "WITHOUT ROWID" not in sql
    fresh = Store(tmp_path / "fresh")
    fresh.close()
    reader = sqlite3.connect(str(fresh.path))
    sql = reader.execute("SELECT sql FROM sqlite_master WHERE name='decisions'").fetchone()[0]
    reader.close()
    assert "WITHOUT ROWID" in sql


def test_a_failed_decision_commit_leaves_nothing_and_the_next_one_commits(tmp_path: Path) -> None:
    """A decision id journaled twice fails as a whole (no half-written snapshot) and the
    store's cursor commits the next decision as usual."""
    store = Store(tmp_path)
    texts = SnapshotText()
    store.commit_decisions([{"id": 1}], Snapshot("j", "r", {}, {"v": 1}, "running", None, texts))
    try:
        store.commit_decisions(
            [{"id": 1}], Snapshot("j", "r", {}, {"v": 2}, "running", None, texts)
        )
    except sqlite3.IntegrityError:
        pass
    else:  # pragma: no cover - the assertion is the test
        raise AssertionError("a duplicate decision id was journaled")
    assert store.load_jobs()[0].state == {"v": 1}
    store.commit_decisions([{"id": 2}], Snapshot("j", "r", {}, {"v": 3}, "running", None, texts))
    assert [d["id"] for d in store.decisions("j", "r")] == [1, 2]
    assert store.load_jobs()[0].state == {"v": 3}
    store.close()
