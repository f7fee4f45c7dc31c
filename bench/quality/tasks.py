"""The benchmark's training tasks: small, real, and fast on a 2-core CPU.

Every task of the suite trains with SGD (momentum 0.9, Nesterov off, no weight decay) for a
fixed number of optimizer steps (``<task>_adam``: the same task with Adam, outside the suite). SGD is chosen over Adam because its loss reacts to the learning rate the
way the detectors are meant to see it: 10x too high oscillates or diverges, 100x too high
produces Inf/NaN within a few steps, and too low crawls. Data ship with installed packages
(scikit-learn's bundled digits and its Friedman #1 generator) or with Python itself (the source of ``argparse.py``), so
nothing is downloaded. The train/validation split is fixed; a run's seed sets the initial
weights and the batch order.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Data:
    """Tensors of one task: training and validation inputs and targets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass(frozen=True)
class Task:
    """One training problem and its budget."""

    name: str
    title: str
    steps: int  # optimizer steps per run (the compute budget, rollbacks included)
    batch_size: int
    eval_every: int  # steps between validation evaluations (about one epoch)
    checkpoint_every: int  # steps between in-memory checkpoints reported to lrpilot
    classification: bool
    load: Callable[[], Data]
    model: Callable[[], nn.Module]
    #: "sgd" (momentum 0.9) or "adam" (torch's defaults: betas 0.9/0.999, eps 1e-8)
    optimizer: str = "sgd"

    def make_optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def optimizer_title(self) -> str:
        return "Adam (torch's defaults)" if self.optimizer == "adam" else "SGD momentum 0.9"

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss() if self.classification else nn.MSELoss()


def _split(n: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # the split never depends on the run's seed
    perm = torch.randperm(n, generator=g)
    n_val = round(n * val_fraction)
    return perm[n_val:], perm[:n_val]


def _digits(image: bool) -> Data:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    if image:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    tr, va = _split(len(y), 0.2)
    return Data(x[tr], y[tr], x[va], y[va])


def _friedman() -> Data:
    from sklearn.datasets import make_friedman1

    features, target = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(target, dtype=torch.float32).unsqueeze(1)
    tr, va = _split(len(y), 0.2)
    # standardize with the training split's statistics
    xm, xs = x[tr].mean(0), x[tr].std(0)
    ym, ys = y[tr].mean(), y[tr].std()
    x = (x - xm) / xs
    y = (y - ym) / ys
    return Data(x[tr], y[tr], x[va], y[va])


CONTEXT = 24  # characters of context for the character-level model
_VOCAB: list[str] = []


def _text() -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    return path.read_text(encoding="utf-8")


def _chars() -> Data:
    text = _text()
    vocab = sorted(set(text))
    _VOCAB[:] = vocab
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    g = torch.Generator().manual_seed(1234)

    def windows(seq: torch.Tensor, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(len(seq) - CONTEXT)
        if count is not None:
            starts = starts[torch.randperm(len(starts), generator=g)[:count]]
        x = torch.stack([seq[s : s + CONTEXT] for s in starts.tolist()])
        y = seq[starts + CONTEXT]
        return x, y

    x_tr, y_tr = windows(ids[:cut], None)
    x_va, y_va = windows(ids[cut:], 2000)
    return Data(x_tr, y_tr, x_va, y_va)


def vocab_size() -> int:
    if not _VOCAB:
        _VOCAB[:] = sorted(set(_text()))
    return len(_VOCAB)


class CharMLP(nn.Module):
    """Bengio-style next-character model: embed the context, concatenate, two layers."""

    def __init__(self, vocab: int, context: int = CONTEXT, dim: int = 16, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.net = nn.Sequential(nn.Linear(context * dim, hidden), nn.Tanh(), nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x).flatten(1))


def _mlp_digits() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn_digits() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _mlp_friedman() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))


def _char_mlp() -> nn.Module:
    return CharMLP(vocab_size())


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "digits_mlp",
            "MLP 64-128-10 on sklearn digits",
            steps=1200,
            batch_size=32,
            eval_every=45,
            checkpoint_every=45,
            classification=True,
            load=lambda: _digits(image=False),
            model=_mlp_digits,
        ),
        Task(
            "digits_cnn",
            "2-conv CNN on sklearn digits (8x8 images)",
            steps=900,
            batch_size=32,
            eval_every=45,
            checkpoint_every=45,
            classification=True,
            load=lambda: _digits(image=True),
            model=_cnn_digits,
        ),
        Task(
            "friedman_reg",
            "MLP 10-64-64-1 regression on sklearn's generated Friedman #1 data (standardized)",
            steps=1000,
            batch_size=32,
            eval_every=50,
            checkpoint_every=50,
            classification=False,
            load=_friedman,
            model=_mlp_friedman,
        ),
        Task(
            "char_lm",
            "next-character MLP (24 chars of context) on CPython's argparse.py",
            steps=1500,
            batch_size=64,
            eval_every=50,
            checkpoint_every=50,
            classification=True,
            load=_chars,
            model=_char_mlp,
        ),
    )
}

#: the benchmark's suite, the one its target is on (``run.py``'s default)
SUITE: tuple[str, ...] = tuple(TASKS)

# The same tasks with Adam: a check of whether the defaults, tuned on SGD, carry over
# (``run.py --tasks digits_mlp_adam,...``); not in the suite. Adam's loss reacts to a too
# high LR less violently than SGD's (its steps are normalised), and its good LRs are lower.
for _name in ("digits_mlp", "digits_cnn", "friedman_reg", "char_lm"):
    _t = TASKS[_name]
    TASKS[f"{_name}_adam"] = replace(_t, name=f"{_name}_adam", optimizer="adam")
del _name, _t

_CACHE: dict[str, Data] = {}


def data_of(task: Task) -> Data:
    """The task's tensors, loaded once per process."""
    if task.name not in _CACHE:
        _CACHE[task.name] = task.load()
    return _CACHE[task.name]
