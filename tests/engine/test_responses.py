"""Resolving a detector's configured response."""

from __future__ import annotations

from monitor.engine.responses import ResponseParams, resolve


def test_equal_responses_resolve_to_one_shared_object() -> None:
    """Jobs of one policy share each detector's resolved response (frozen) instead of holding
    a copy each: equal params give the very same object, different ones a different one."""
    a = resolve("spike", ResponseParams(cooldown=5))
    assert resolve("spike", ResponseParams(cooldown=5)) is a
    assert resolve("spike", ResponseParams(cooldown=6)) is not a
    assert resolve("divergence", ResponseParams(cooldown=5)).factor == 0.3
    assert a.factor == 0.5 and a.cooldown == 5
