"""Every policy and detector by the name config files use for it.

``policy_classes(kind)`` gives ``(Params, Policy)`` and ``detector_classes(name)`` gives
``(Params, Detector)``. The config layer validates a block against ``Params`` and the engine
builds the state machine from it; nothing else needs to know the list. Modules load on first
use, so importing the engine stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from .base import Detector, Policy

#: kind -> (module, Params class, Policy class), resolved on first use
_POLICY_TABLE: dict[str, tuple[str, str, str]] = {
    "constant": ("constant", "ConstantParams", "ConstantPolicy"),
    "reduce_on_plateau": ("reduce_on_plateau", "ReduceOnPlateauParams", "ReduceOnPlateauPolicy"),
    "keras_reduce_on_plateau": (
        "keras_reduce_on_plateau",
        "KerasReduceOnPlateauParams",
        "KerasReduceOnPlateauPolicy",
    ),
    "cyclic": ("cyclic", "CyclicParams", "CyclicPolicy"),
    "one_cycle": ("one_cycle", "OneCycleParams", "OneCyclePolicy"),
    "cosine_restarts": ("cosine_restarts", "CosineRestartsParams", "CosineRestartsPolicy"),
}

#: name -> (module, Params class, Detector class)
_DETECTOR_TABLE: dict[str, tuple[str, str, str]] = {
    "non_finite": ("non_finite", "NonFiniteParams", "NonFiniteDetector"),
    "spike": ("spike", "SpikeParams", "SpikeDetector"),
    "oscillation": ("oscillation", "OscillationParams", "OscillationDetector"),
    "divergence": ("divergence", "DivergenceParams", "DivergenceDetector"),
    "plateau": ("plateau", "PlateauParams", "PlateauDetector"),
    "slow_progress": ("slow_progress", "SlowProgressParams", "SlowProgressDetector"),
    "overshoot": ("overshoot", "OvershootParams", "OvershootDetector"),
    "stalled": ("stalled", "StalledParams", "StalledDetector"),
}

POLICY_KINDS = tuple(_POLICY_TABLE)
DETECTOR_NAMES = tuple(_DETECTOR_TABLE)


def _load(package: str, entry: tuple[str, str, str]) -> tuple[type, type]:
    module = importlib.import_module(f"{__package__}.{package}.{entry[0]}")
    return getattr(module, entry[1]), getattr(module, entry[2])


def policy_classes(kind: str) -> tuple[type, type[Policy]]:
    """(Params, Policy) for a policy kind."""
    try:
        entry = _POLICY_TABLE[kind]
    except KeyError:
        raise ValueError(f"unknown policy kind {kind!r}; expected one of {', '.join(POLICY_KINDS)}") from None
    return _load("policies", entry)


def detector_classes(name: str) -> tuple[type, type[Detector]]:
    """(Params, Detector) for a detector name."""
    try:
        entry = _DETECTOR_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTOR_NAMES)}") from None
    return _load("detectors", entry)


#: the order in which detectors see a record: spike before plateau, so that a single
#: outlier can be kept out of the plateau count of the same record
DETECTOR_ORDER = (
    "non_finite",
    "spike",
    "oscillation",
    "divergence",
    "overshoot",
    "stalled",
    "slow_progress",
    "plateau",
)


def build_policy(
    kind: str, params: Any, initial_lrs: Sequence[float], warmup: Any = None, anneal: Any = None
) -> Policy:
    """The policy state machine for validated ``params``, behind a warmup if one is given and
    inside an anneal if one is given."""
    _, policy_class = policy_classes(kind)
    policy: Policy = policy_class(params, initial_lrs)  # type: ignore[call-arg]
    if warmup is not None and warmup.total_iters > 0:
        from .policies.warmup import Warmup

        policy = Warmup(warmup, policy)
    if anneal is not None and anneal.fraction > 0:
        from .policies.anneal import Anneal

        policy = Anneal(anneal, policy)
    return policy


def build_detector(name: str, params: Any) -> Detector:
    """The detector state machine for validated ``params``."""
    _, detector_class = detector_classes(name)
    return detector_class(params)  # type: ignore[call-arg]
