"""Linear warmup in front of reduce-on-plateau, one policy block, driven by the daemon.

torch cannot chain these two: ``ReduceLROnPlateau`` is not an ``LRScheduler`` that
``SequentialLR`` accepts (pytorch issue 68978). lrpilot can. This job's hello asks for

    {kind: reduce_on_plateau, monitor: val_loss, factor: 0.5, patience: 2,
     warmup: {total_iters: 3 epochs of steps, start_factor: 0.1}}

The daemon answers with one ``schedule`` decision, a warmup segment that the client
evaluates at every step: the LR climbs linearly from 0.01 to 0.1 over the first three epochs.
Evaluations of ``val_loss`` during the warmup are ignored (a model still warming up is not on
a plateau). Afterwards the plateau policy counts like torch's ``ReduceLROnPlateau``: after
three epochs without a better ``val_loss``, a ``set_lr`` decision halves the LR.

Run ``lrpilot serve`` in one terminal and ``python examples/warmup_plateau.py`` in another.
Needs torch and scikit-learn.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from typing import Any

import torch
from _common import SEED, digits_tensors, parse_args, print_decision, unreachable
from lrpilot import Halted
from lrpilot.torch import LRPilot

PEAK_LR = 0.1
EPOCHS = 12
WARMUP_EPOCHS = 3
BATCH_SIZE = 32
# A real epoch takes minutes; this one takes 15 ms. The daemon applies a decision 0.25 s worth
# of the job's steps after the step that caused it (so that every rank of a DDP job switches
# at the same step); the pause makes an epoch last longer than that, so that a cut decided
# at the end of one epoch lands early in the next.
STEP_PAUSE_SECONDS = 0.008


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "example-warmup-plateau", EPOCHS, argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = digits_tensors()
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    policy: dict[str, Any] = {
        "kind": "reduce_on_plateau",
        "monitor": "val_loss",
        "factor": 0.5,
        "patience": 2,
        "warmup": {"total_iters": WARMUP_EPOCHS * steps_per_epoch, "start_factor": 0.1},
        # The per-batch loss of a classifier that nearly fits its training set swings by
        # several hundred percent from batch to batch; the oscillation detector and spike
        # bursts would read that as instability and halve the LR. Here they only record it.
        "detectors": {"oscillation": {"response": "none"}, "spike": {"response": "none"}},
    }
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=PEAK_LR, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy

    run_id = uuid.uuid4().hex[:8]  # a fresh run: the daemon keeps decisions per job and run
    with LRPilot(
        optimizer,
        args.url,
        job=args.job,
        run_id=run_id,
        policy=policy,
        on_decision=lambda decision, step: print_decision(decision, step, pilot.lrs),
    ) as pilot:
        # The welcome carries the warmup segment; wait for it so that training starts warm.
        if not pilot.client.wait_connected(10.0):
            return unreachable(args.url)
        print(f"job {args.job} (run {run_id}) connected to {args.url}; policy {policy}")
        pilot.start()  # sets the LR of step 0, the warmup's first

        generator = torch.Generator().manual_seed(SEED)
        step = 0
        best = float("inf")
        val_loss = float("nan")
        try:
            for epoch in range(args.epochs):
                model.train()
                first_lr = optimizer.param_groups[0]["lr"]
                total = 0.0
                batches = torch.randperm(len(x_train), generator=generator).split(BATCH_SIZE)
                for batch in batches:
                    last_lr = optimizer.param_groups[0]["lr"]  # the LR this step uses
                    loss = loss_fn(model(x_train[batch]), y_train[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
                    pilot.step(step, loss=loss.item())  # sets the LR of step + 1
                    step += 1
                    time.sleep(STEP_PAUSE_SECONDS)
                model.eval()
                with torch.no_grad():
                    val_loss = loss_fn(model(x_val), y_val).item()
                pilot.report(step - 1, epoch, val_loss=val_loss)
                best = min(best, val_loss)
                phase = "warmup" if epoch < WARMUP_EPOCHS else "plateau policy"
                print(
                    f"epoch {epoch:2d}  {phase:14}  lr {first_lr:.4f} → {last_lr:.4f}  "
                    f"loss {total / len(batches):.4f}  val_loss {val_loss:.4f}"
                    + ("  (best so far)" if val_loss == best else ""),
                    flush=True,
                )
        except Halted as exc:
            print(f"the daemon halted the run: {exc.reason}")
            return 3

        kinds = [f"{d.kind.value} by {d.source} at step {s}" for d, s in pilot.client.decisions]
        print(
            f"summary: {len(kinds)} decision(s) applied ({'; '.join(kinds)}); "
            f"LR {PEAK_LR * 0.1:g} → {PEAK_LR:g} (warmup) → {pilot.lrs[0]:.4g}; "
            f"best val_loss {best:.4f}, final {val_loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
