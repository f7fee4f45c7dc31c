"""What the examples share: the digits data, the command line, and how a decision is printed.

Not an lrpilot API: each example imports it from its own directory
(``python examples/NAME.py`` puts ``examples/`` first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np
from lrpilot import Decision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DEFAULT_URL = os.environ.get("LRPILOT_URL", "ws://127.0.0.1:8765/ws")
SEED = 0


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and validation arrays (float32 features, int labels) of scikit-learn's digits,
    standardized on the training split; a fixed, stratified 75/25 split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=0.25, random_state=SEED, stratify=y
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0.1, std, 1.0)  # some border pixels are always 0
    return (
        ((x_train - mean) / std).astype("float32"),
        y_train,
        ((x_val - mean) / std).astype("float32"),
        y_val,
    )


def digits_tensors() -> tuple[Any, Any, Any, Any]:
    """:func:`digits` as torch tensors (imports torch)."""
    import torch

    x_train, y_train, x_val, y_val = digits()
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_val),
        torch.from_numpy(y_val),
    )


def parse_args(doc: str | None, job: str, epochs: int, argv: list[str] | None) -> argparse.Namespace:
    """``--url``, ``--job`` and ``--epochs``, with this example's defaults."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="daemon URL (env LRPILOT_URL)")
    parser.add_argument("--job", default=job, help="job name")
    parser.add_argument("--epochs", type=int, default=epochs)
    return parser.parse_args(argv)


def unreachable(url: str) -> int:
    """Say that the daemon is not there; the exit status for it."""
    print(f"cannot reach the lrpilot daemon at {url}; start it with `lrpilot serve`")
    return 2


def print_decision(decision: Decision, step: int, lrs: list[float]) -> None:
    """One line per decision the job applies: what, why, and the LR from now on."""
    lr = ", ".join(f"{x:.4g}" for x in lrs)
    print(
        f">>> decision {decision.id} at step {step}: {decision.kind.value} by {decision.source}, "
        f"LR now {lr}\n    {decision.reason}",
        flush=True,
    )
