"""``anneal``: the LR annealed over the last part of a run whose length is known.

A job that says how many steps it will train (``total_steps`` in its hello, or the block's
own ``total_steps``) gets, over its last ``fraction`` of them, the wrapped policy's LR times a
factor that falls from 1 to ``final_factor`` (linearly, or along a half cosine). This is the
decay phase of a warmup-stable-decay schedule: whatever LR the policy and the detectors found
during the run, the run ends annealed, which is where a constant LR leaves most of its loss.

Rule, with ``T`` the planned steps, ``N = round(fraction * T)`` (at least 1) and
``S = T - N`` the first step of the anneal::

    job step s < S:   the wrapped policy, untouched
    job step s >= S:  lr = anneal_factor(s - S, N, final_factor, anneal_strategy) * inner_lr

``anneal_factor`` lives in ``lrpilot.schedules`` (the job evaluates the same function): the
first anneal step trains at ``1 - (1 - final_factor) / N`` times the inner LR, the last one
(``T - 1``) at ``final_factor`` times it.

What changes once the anneal has begun:

* The wrapped policy's clock goes on (a cyclic schedule keeps cycling under the decay), but a
  plateau policy no longer evaluates: a cut during the anneal would only repeat it.
* :meth:`step` returns True once, at the record that starts the anneal, so the engine sends
  the job an ``anneal`` segment (its ``then`` is the wrapped policy's segment, or a constant
  segment of its LRs).
* :meth:`scale_by` refuses increases (a "progress is too slow" probe would fight the anneal)
  and passes cuts on to the wrapped policy: a divergence during the anneal still cuts.
* :meth:`set_lrs` (an operator's set-lr) sets the current LR: the wrapped LR becomes
  ``lrs / factor``, so the anneal continues from there.
* A rollback to a step before ``S`` (:meth:`rewind`) leaves the anneal; it begins again
  when the job reaches ``S`` once more.

Without a known length (no ``total_steps`` anywhere) the wrapper does nothing at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lrpilot.schedules import anneal_factor, constant_segment

from ..base import ParamError, Policy
from .constant import check_int, check_number, set_lrs_through

__all__ = ["Anneal", "AnnealParams"]

_STRATEGIES = ("linear", "cos")


@dataclass(frozen=True, slots=True)
class AnnealParams:
    """Parameters of the anneal at the end of a run of known length."""

    #: the share of the planned steps the anneal takes (0 turns the anneal off)
    fraction: float = 0.2
    #: the LR at the last step, as a multiple of the wrapped policy's LR
    final_factor: float = 0.0
    #: the shape of the fall: ``linear`` or ``cos`` (a half cosine)
    anneal_strategy: str = "linear"
    #: the run's length in steps; null: the length the job gives in its hello
    total_steps: int | None = None

    def __post_init__(self) -> None:
        fraction = check_number("fraction", self.fraction)
        if not 0.0 <= fraction < 1.0:
            raise ParamError("fraction", f"must be >= 0 and < 1, got {self.fraction!r}")
        object.__setattr__(self, "fraction", fraction)
        final = check_number("final_factor", self.final_factor)
        if not 0.0 <= final <= 1.0:
            raise ParamError("final_factor", f"must be >= 0 and <= 1, got {self.final_factor!r}")
        object.__setattr__(self, "final_factor", final)
        if self.anneal_strategy not in _STRATEGIES:
            raise ParamError(
                "anneal_strategy",
                f"must be one of {', '.join(_STRATEGIES)}, got {self.anneal_strategy!r}",
            )
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps, 2)


class Anneal(Policy):
    """Anneals the wrapped policy's LR over the last ``fraction`` of a run of known length."""

    kind: ClassVar[str] = "anneal"

    def __init__(self, params: AnnealParams, inner: Policy) -> None:
        if not isinstance(inner, Policy):
            raise TypeError(f"inner: expected a Policy, got {type(inner).__name__}")
        self.params = params
        self.inner = inner
        self.monitor = inner.monitor
        self._planned: int | None = None  # the job's own total_steps, from its hello
        self._position = 0
        self._active = False
        self._announce = False

    # -- the run's length

    @property
    def total_steps(self) -> int | None:
        """The run's length: the block's ``total_steps``, else the job's, else None."""
        return self.params.total_steps if self.params.total_steps is not None else self._planned

    def plan(self, total_steps: int | None) -> None:
        """The job says how many steps it will train (None: it does not know)."""
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        self._planned = total_steps

    @property
    def span(self) -> tuple[int, int] | None:
        """``(S, N)``: the anneal's first job step and its length, or None if it has none."""
        total = self.total_steps
        if total is None or self.params.fraction <= 0.0 or total < 2:
            return None
        n = min(total - 1, max(1, round(self.params.fraction * total)))
        return total - n, n

    @property
    def active(self) -> bool:
        """True from the anneal's first step on."""
        return self._active

    def _factor(self) -> float:
        span = self.span
        if not self._active or span is None:
            return 1.0
        first, n = span
        p = self.params
        return anneal_factor(self._position - first, n, p.final_factor, p.anneal_strategy)

    def take_announcement(self) -> str | None:
        """Why the LR changed at the last :meth:`step`, if the anneal began there; once."""
        if not self._announce:
            return None
        self._announce = False
        span = self.span
        assert span is not None
        first, n = span
        p = self.params
        shape = "linearly" if p.anneal_strategy == "linear" else "along a half cosine"
        lrs = self.inner.lrs
        start = ", ".join(f"{x:.4g}" for x in lrs)
        end = ", ".join(f"{x * p.final_factor:.4g}" for x in lrs)
        return (
            f"anneal: the last {n} of the run's {self.total_steps} planned steps, from step"
            f" {first}: the LR falls {shape} from {start} to {end} by step {first + n - 1}"
        )

    # -- Policy API

    @property
    def lrs(self) -> tuple[float, ...]:
        if not self._active:
            return self.inner.lrs
        factor = self._factor()
        return tuple(factor * x for x in self.inner.lrs)

    @property
    def momentums(self) -> tuple[float, ...] | None:
        return self.inner.momentums

    def step(self, position: int, metric: float | None) -> bool:
        """Advance; the anneal begins when ``position`` (the job step the LR is for) reaches
        ``S``: with the record of step ``S - 1``."""
        self._position = max(self._position, int(position))
        if self._active:
            self.inner.step(position, None)
            return False
        changed = self.inner.step(position, metric)
        span = self.span
        if span is not None and self._position >= span[0]:
            self._active = True
            self._announce = True
            return True
        return changed

    def rewind(self, position: int) -> None:
        """Back to ``position``; before the anneal's first step, out of the anneal."""
        self._position = min(self._position, max(0, int(position)))
        span = self.span
        if span is not None and self._position < span[0]:
            self._active = False
        self.inner.rewind(position)

    def segment(self) -> dict[str, Any] | None:
        then = self.inner.segment()
        span = self.span
        if not self._active or span is None:
            return then
        if then is None:
            then = constant_segment(list(self.inner.lrs))
        first, n = span
        p = self.params
        return {
            "kind": self.kind,
            "origin_step": first,
            "scale": 1.0,
            "params": {
                "total_iters": n,
                "final_factor": p.final_factor,
                "anneal_strategy": p.anneal_strategy,
            },
            "then": then,
        }

    def scale_by(self, factor: float, min_lrs: Sequence[float]) -> bool:
        """The wrapped policy's ``scale_by``; during the anneal, cuts only."""
        if self._active and factor > 1.0:
            return False
        return self.inner.scale_by(factor, min_lrs)

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Make the current LR ``lrs`` (during the anneal by rescaling the wrapped policy)."""
        set_lrs_through(self.inner, lrs, self._factor())

    # -- persistence

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "position": self._position,
            "planned": self._planned,
            "active": self._active,
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; a state saved without an anneal (the config gained
        one since) is the wrapped policy's, and the anneal starts from nothing."""
        if state.get("kind") != self.kind:
            self.inner.load_state_dict(state)
            self._position = 0
            self._active = False
            self._announce = False
            return
        self._position = int(state["position"])
        planned = state.get("planned")
        self._planned = None if planned is None else int(planned)
        self._active = bool(state["active"])
        self._announce = False
        self.inner.load_state_dict(state["inner"])
