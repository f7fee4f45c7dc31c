"""The validation loss stops improving: the daemon's reduce-on-plateau policy cuts the LR.

A small MLP learns scikit-learn's 8×8 digits with SGD (LR 0.1, momentum 0.9). After about
five epochs ``val_loss`` stops going down. The job reports ``val_loss`` once per epoch with
``pilot.report(step, val_loss=...)``; its hello asks for

    {kind: reduce_on_plateau, monitor: val_loss, factor: 0.5, patience: 2}

which counts exactly like ``torch.optim.lr_scheduler.ReduceLROnPlateau(factor=0.5,
patience=2)``: after three epochs in a row without a better ``val_loss`` the daemon sends a
``set_lr`` decision with half the LR, and LRPilot writes it into the optimizer at the step the
decision names (early in the next epoch).

Run ``lrpilot serve`` in one terminal and ``python examples/plateau_cut.py`` in another.
Needs torch and scikit-learn.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import torch
from _common import SEED, digits_tensors, parse_args, print_decision, unreachable
from lrpilot import Halted
from lrpilot.torch import LRPilot

INITIAL_LR = 0.1
EPOCHS = 10
BATCH_SIZE = 32
# A real epoch takes minutes; this one takes 15 ms. The daemon applies a decision 0.25 s worth
# of the job's steps after the step that caused it (so that every rank of a DDP job switches
# at the same step); the pause makes an epoch last longer than that, so that a cut decided
# at the end of one epoch lands early in the next, as torch's scheduler would set it.
STEP_PAUSE_SECONDS = 0.008

#: asked for in the hello (the daemon's server.allow_client_policy is on by default)
POLICY: dict[str, Any] = {
    "kind": "reduce_on_plateau",
    "monitor": "val_loss",
    "factor": 0.5,
    "patience": 2,
    # The per-batch loss of a classifier that nearly fits its training set swings by several
    # hundred percent from batch to batch (0.001 when a batch has no mistake, 0.3 when it has
    # one). The oscillation detector and spike bursts would read that as instability and halve
    # the LR; this example is about the plateau policy, so they only record what they see.
    "detectors": {"oscillation": {"response": "none"}, "spike": {"response": "none"}},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, "example-plateau-cut", EPOCHS, argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x_train, y_train, x_val, y_val = digits_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy

    run_id = uuid.uuid4().hex[:8]  # a fresh run: the daemon keeps decisions per job and run
    with LRPilot(
        optimizer,
        args.url,
        job=args.job,
        run_id=run_id,
        policy=POLICY,
        on_decision=lambda decision, step: print_decision(decision, step, pilot.lrs),
    ) as pilot:
        if not pilot.client.wait_connected(10.0):
            return unreachable(args.url)
        print(f"job {args.job} (run {run_id}) connected to {args.url}; policy {POLICY}")

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
                pilot.report(step - 1, epoch, val_loss=val_loss)  # one evaluation of the policy
                best = min(best, val_loss)
                last_lr = optimizer.param_groups[0]["lr"]
                lr = f"{first_lr:.4g}" if last_lr == first_lr else f"{first_lr:.4g} → {last_lr:.4g}"
                print(
                    f"epoch {epoch:2d}  lr {lr:<16}  loss {total / len(batches):.4f}  "
                    f"val_loss {val_loss:.4f}" + ("  (best so far)" if val_loss == best else ""),
                    flush=True,
                )
        except Halted as exc:
            print(f"the daemon halted the run: {exc.reason}")
            return 3

        cuts = [s for d, s in pilot.client.decisions if d.source == "reduce_on_plateau"]
        print(
            f"summary: {len(cuts)} plateau cut(s), at steps {cuts}; LR {INITIAL_LR:g} → "
            f"{pilot.lrs[0]:.4g}; best val_loss {best:.4f}, final {val_loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
