"""Keras ``model.fit`` with a cyclic learning rate that the daemon schedules.

A small Keras 3 model (torch backend) learns scikit-learn's 8×8 digits through
``lrpilot.keras.LRPilotCallback``. The job's hello asks for

    {kind: cyclic, base_lr: 0.005, max_lr: 0.05, step_size_up: 2 epochs of batches}

the policy of ``torch.optim.lr_scheduler.CyclicLR`` (triangular). The daemon answers with one
``schedule`` decision: a segment that the client evaluates locally at every batch, so the LR
climbs from 0.005 to 0.05 over two epochs, falls back over the next two, and so on, without a
message per batch. Each epoch prints the LR of its first and last batch.

Run ``lrpilot serve`` in one terminal and ``python examples/cyclic_keras.py`` in another.
Needs keras (3), torch and scikit-learn.
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # keras reads it once, at import

import keras
import lrpilot
import torch
from _common import SEED, digits, parse_args, print_decision, unreachable
from lrpilot.keras import LRPilotCallback

EPOCHS = 10
BATCH_SIZE = 32
BASE_LR = 0.005
MAX_LR = 0.05


class EpochPrinter(keras.callbacks.Callback):
    """Prints each epoch's LR (first and last batch) and losses; keeps the LRs for the summary."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch_lrs: list[tuple[float, float]] = []
        self._batch_lrs: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._batch_lrs = []

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._batch_lrs.append(float(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        logs = logs or {}
        first, last = self._batch_lrs[0], self._batch_lrs[-1]
        self.epoch_lrs.append((first, last))
        trend = "rising" if last > first else "falling" if last < first else "flat"
        print(
            f"epoch {epoch:2d}  lr {first:.4f} → {last:.4f}  {trend:7}  "
            f"loss {logs.get('loss', math.nan):.4f}  val_loss {logs.get('val_loss', math.nan):.4f}"
            f"  val_acc {logs.get('val_accuracy', math.nan):.1%}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "example-cyclic-keras", EPOCHS, argv)

    keras.utils.set_random_seed(SEED)
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = digits()
    batches_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    policy = {
        "kind": "cyclic",
        "base_lr": BASE_LR,
        "max_lr": MAX_LR,
        "step_size_up": 2 * batches_per_epoch,  # positions are batches (optimizer steps)
        "mode": "triangular",
        "cycle_momentum": False,  # keep SGD's momentum at 0.9
        # In its high phase a cyclic schedule makes the loss rise on purpose; the divergence
        # detector would answer by scaling the whole cycle down. Here it only records it.
        "detectors": {"divergence": {"response": "none"}},
    }

    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=BASE_LR, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )

    # The client is made here, not by the callback, so that the example can wait for the
    # daemon's welcome (which carries the schedule: the cycle then starts at the very first
    # batch) and say so when there is no daemon. LRPilotCallback(url, job=..., policy=...,
    # wait_for_daemon=10.0) would make its own client when fit begins and wait there.
    run_id = uuid.uuid4().hex[:8]  # a fresh run: the daemon keeps decisions per job and run
    with lrpilot.Client(
        args.url,
        args.job,
        initial_lr=BASE_LR,  # the optimizer's LR
        run_id=run_id,
        policy=policy,  # asked for in the hello
        on_decision=lambda decision, step: print_decision(decision, step, client.lrs),
    ) as client:
        if not client.wait_connected(10.0):
            return unreachable(args.url)
        print(f"job {args.job} (run {run_id}) connected to {args.url}; policy {policy}")
        printer = EpochPrinter()
        model.fit(
            x_train,
            y_train,
            batch_size=BATCH_SIZE,
            epochs=args.epochs,
            validation_data=(x_val, y_val),
            callbacks=[LRPilotCallback(client), printer],
            verbose=0,
        )
        ends = [f"{last:.4f}" for _, last in printer.epoch_lrs]
        kinds = [f"{d.kind.value} by {d.source} at step {s}" for d, s in client.decisions]
        print(f"summary: {len(kinds)} decision(s) applied ({'; '.join(kinds) or 'none'})")
        print(f"summary: LR at the end of each epoch: {', '.join(ends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
