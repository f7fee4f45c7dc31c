"""A learning rate so high that the loss overflows to NaN: the daemon rolls the run back.

A small MLP learns scikit-learn's 8×8 digits with plain SGD at LR 8, which is far too high:
with this seed the weights blow up and the loss is NaN/Inf within about thirty steps. The
loop reports every step's loss (NaN included: it is the signal), checkpoints the weights in
memory whenever an epoch ends better than every epoch before, and lets the daemon decide:

1. the ``non_finite`` detector sees the NaN loss;
2. its response, requested in this job's hello, is a *rollback*: reload the last good
   checkpoint (here the initial weights of step 0), skip a few batches, and go on with the
   LR × 0.1;
3. the ``on_rollback`` hook reloads the checkpoint and LRPilot sets LR 0.8, at which the
   model trains well (about 97 % validation accuracy within 6 epochs).

Run ``lrpilot serve`` in one terminal and ``python examples/nan_rollback.py`` in another.
Needs torch and scikit-learn.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import uuid
from typing import Any

import torch
from _common import SEED, digits_tensors, parse_args, print_decision, unreachable
from lrpilot import Halted
from lrpilot.torch import LRPilot

INITIAL_LR = 8.0  # plain SGD on this MLP overflows at this LR; 0.8 trains well
EPOCHS = 6
BATCH_SIZE = 32
# A real step takes far longer than this toy one (0.3 ms). The daemon applies a decision
# 0.25 s worth of the job's steps ahead (so that every rank of a DDP job switches at the same
# step); the pause keeps that lead at a few dozen steps instead of hundreds.
STEP_PAUSE_SECONDS = 0.003

#: asked for in the hello (the daemon's server.allow_client_policy is on by default)
POLICY: dict[str, Any] = {
    "kind": "reduce_on_plateau",
    "monitor": "val_loss",
    "factor": 0.5,
    "patience": 5,
    "detectors": {
        "non_finite": {
            "response": {
                "action": "rollback",
                "factor": 0.1,  # 8 → 0.8; the default 0.3 gives 2.4, which still blows up
                "skip_batches": 5,
                # The job goes on reporting NaN until the rollback reaches it: no second
                # rollback for the next 200 records, longer than the apply lead.
                "cooldown": 200,
            }
        },
        # The default overshoot detector would see the loss blow up a few steps before it
        # turns NaN and roll back then (as `lrpilot demo` shows); off here, so that this
        # example shows the NaN path.
        "overshoot": False,
    },
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "example-nan-rollback", EPOCHS, argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = digits_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR)
    loss_fn = torch.nn.functional.cross_entropy

    def validate() -> tuple[float, float]:
        with torch.no_grad():
            logits = model(x_val)
            accuracy = (logits.argmax(dim=1) == y_val).float().mean().item()
            return loss_fn(logits, y_val).item(), accuracy

    # In-memory checkpoints of the weights, by step; a real job saves files. Plain SGD keeps no
    # optimizer state, so the weights are the whole checkpoint.
    checkpoints: dict[int, dict[str, torch.Tensor]] = {}
    skip = 0
    losses: list[float] = []  # this epoch's finite losses, since the last rollback

    def save(step: int) -> None:
        checkpoints[step] = copy.deepcopy(model.state_dict())
        pilot.checkpoint(step)

    def reload(step: int, skip_batches: int) -> None:
        """The rollback hook: load the checkpoint of ``step``; LRPilot then sets the new LR."""
        nonlocal skip
        model.load_state_dict(checkpoints[step])
        skip = skip_batches
        losses.clear()
        print(f"    reloaded the checkpoint of step {step}; skipping {skip_batches} batches")

    # A fresh run id per run: the daemon keeps a job's decisions per run, so a second run of
    # this script under the same job name starts clean instead of resuming the first.
    run_id = uuid.uuid4().hex[:8]
    pilot = LRPilot(
        optimizer,
        args.url,
        job=args.job,
        run_id=run_id,
        policy=POLICY,
        # the client's own callback runs first, before LRPilot's rollback hook
        on_decision=lambda decision, step: print_decision(decision, step, pilot.lrs),
    )
    pilot.on_rollback(reload)
    with pilot:
        if not pilot.client.wait_connected(10.0):
            return unreachable(args.url)
        print(f"job {args.job} (run {run_id}) connected to {args.url}; initial LR {INITIAL_LR}")

        initial_val_loss, _ = validate()
        best_val_loss = initial_val_loss
        save(0)  # the initial weights: a rollback target before the first good epoch
        print(f"checkpoint at step 0 (initial weights, val_loss {initial_val_loss:.3f})")

        generator = torch.Generator().manual_seed(SEED)
        step = 0
        non_finite = 0
        losses_were_bad = False
        val_loss, accuracy = initial_val_loss, 0.0
        try:
            for epoch in range(args.epochs):
                model.train()
                losses.clear()
                for batch in torch.randperm(len(x_train), generator=generator).split(BATCH_SIZE):
                    if skip:
                        skip -= 1
                        continue
                    loss = loss_fn(model(x_train[batch]), y_train[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    value = loss.item()
                    if math.isfinite(value):
                        losses.append(value)
                    else:
                        if not losses_were_bad:  # the first of a run of non-finite losses
                            print(f"step {step}: loss is {value} (reported; the daemon decides)")
                        non_finite += 1
                    losses_were_bad = not math.isfinite(value)
                    pilot.step(step, loss=value)  # sets the LR of step + 1, applies decisions
                    step += 1
                    time.sleep(STEP_PAUSE_SECONDS)
                model.eval()
                val_loss, accuracy = validate()
                pilot.report(step - 1, epoch, val_loss=val_loss, val_accuracy=accuracy)
                # a good checkpoint: finite, better than the untrained model and than any before
                good = math.isfinite(val_loss) and val_loss < best_val_loss
                if good:
                    best_val_loss = val_loss
                    save(step - 1)
                train_loss = f"{sum(losses) / len(losses):.3f}" if losses else "nan"
                print(
                    f"epoch {epoch:2d}  step {step - 1:4d}  lr {pilot.lrs[0]:.4g}  "
                    f"loss {train_loss}  val_loss {val_loss:.4f}  val_acc {accuracy:.1%}"
                    + ("  [checkpoint]" if good else ""),
                    flush=True,
                )
        except Halted as exc:
            print(f"the daemon halted the run: {exc.reason}")
            return 3

        kinds = [f"{d.kind.value} by {d.source} at step {s}" for d, s in pilot.client.decisions]
        print(
            f"summary: {len(kinds)} decision(s) applied ({'; '.join(kinds) or 'none'}); "
            f"{non_finite} non-finite losses reported; LR {INITIAL_LR:g} → {pilot.lrs[0]:.4g}; "
            f"final val_loss {val_loss:.4f}, val accuracy {accuracy:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
