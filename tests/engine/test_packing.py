"""The packed windows inside detector snapshots (monitor.engine._packing)."""

from __future__ import annotations

import json
import math

import pytest

from monitor.engine._packing import pack_floats, pack_ints, unpack_floats, unpack_ints
from monitor.engine.detectors.divergence import DivergenceDetector
from monitor.engine.detectors.oscillation import OscillationDetector
from monitor.engine.events import Metrics


def test_ints_round_trip_through_json_exactly() -> None:
    values = [0, 1, -1, 2**31 - 1, -(2**31), 10_000_000, -7]
    packed = pack_ints(values)
    assert isinstance(packed, str)
    assert unpack_ints(json.loads(json.dumps(packed))) == values


def test_ints_outside_32_bits_stay_a_plain_list() -> None:
    values = [1, 2**31, -3]
    packed = pack_ints(values)
    assert packed == values
    assert unpack_ints(json.loads(json.dumps(packed))) == values


def test_unpacking_rejects_a_torn_string() -> None:
    packed = pack_ints([1, 2, 3])
    assert isinstance(packed, str)
    with pytest.raises(ValueError, match="int32"):
        unpack_ints(pack_floats([1.0])[:-4] + "AA==")  # 9 bytes
    with pytest.raises(ValueError):
        unpack_ints(packed[:-1])  # not base64 any more


def test_floats_keep_non_finite_values_and_their_bits() -> None:
    values = [math.nan, math.inf, -math.inf, -0.0, 5e-324]
    out = unpack_floats(pack_floats(values))
    assert math.isnan(out[0]) and out[1:] == values[1:]
    assert math.copysign(1.0, out[3]) == -1.0


_RING = {"codes": "_code_ring", "amplitudes": "_amp_ring", "residuals": "_res_ring"}


def _fed(detector: OscillationDetector | DivergenceDetector, n: int) -> None:
    for step in range(n):
        detector.feed(Metrics(step=step, values={"loss": 1.0 + (-1) ** step * 0.4 / (1 + step)}))


def test_detectors_write_packed_windows() -> None:
    osc, div = OscillationDetector(), DivergenceDetector()
    _fed(osc, 80)
    _fed(div, 80)
    osc_state, div_state = osc.state_dict(), div.state_dict()
    for key in ("codes", "amplitudes", "residuals"):
        assert isinstance(osc_state[key], str)
        assert unpack_ints(osc_state[key]) == [
            *getattr(osc, _RING[key])[osc._head :],
            *getattr(osc, _RING[key])[: osc._head],
        ]
    assert isinstance(div_state["ups"], str)
    assert sum(unpack_ints(div_state["ups"])) == div._ups


def test_snapshots_with_plain_int_lists_still_load() -> None:
    """A snapshot written before the windows were packed holds JSON lists; it restores the
    same detector, which then goes on exactly like the one that wrote it."""
    osc, div = OscillationDetector(), DivergenceDetector()
    _fed(osc, 80)
    _fed(div, 80)
    old_osc = osc.state_dict()
    for key in ("codes", "amplitudes", "residuals"):
        old_osc[key] = unpack_ints(old_osc[key])
    old_div = div.state_dict()
    old_div["ups"] = [bool(u) for u in unpack_ints(old_div["ups"])]  # any truthy flag
    osc2, div2 = OscillationDetector(), DivergenceDetector()
    osc2.load_state_dict(json.loads(json.dumps(old_osc)))
    div2.load_state_dict(json.loads(json.dumps(old_div)))
    fired = []
    for step in range(80, 200):
        swinging = Metrics(step=step, values={"loss": (1.0 + (-1) ** step * 0.5) * 1.02**step})
        rising = Metrics(step=step, values={"loss": 1.03 ** (step - 80)})
        found = osc.feed(swinging) + div.feed(rising)
        assert osc2.feed(swinging) + div2.feed(rising) == found
        fired += [d.detector for d in found]
    assert {"oscillation", "divergence"} <= set(fired)  # both had something to say
    assert osc2.state_dict() == osc.state_dict()
    assert div2.state_dict() == div.state_dict()
