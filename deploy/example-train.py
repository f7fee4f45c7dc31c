"""An example training job for the deployment examples: a small MLP on a synthetic regression.

It streams its training loss every step and its validation loss every ``--eval-every`` steps
to an lrpilot daemon (the sidecar), and lets the daemon steer the SGD learning rate through
:class:`lrpilot.torch.LRPilot`. The daemon's default policy (reduce-on-plateau on
``val_loss``) halves the LR whenever validation stops improving, so a few minutes of this job
show decisions on the Grafana dashboards.

Settings come from flags or, for containers, from the environment:

    LRPILOT_URL      daemon websocket URL (default ws://127.0.0.1:8765/ws: a sidecar)
    LRPILOT_TOKEN    job token, when the daemon has tokens (read by lrpilot.Client itself)
    LRPILOT_JOB      job name (default example-regression)
    LRPILOT_RUN_ID   run id, so a restarted job is told apart (read by lrpilot.Client)
    TRAIN_STEPS      steps to run (default 6000)
    TRAIN_STEP_DELAY seconds to sleep per step (default 0.02), to pace a demo

Exit status: 0 when training ran to the end, 3 when the daemon halted the job.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import lrpilot
import torch
from lrpilot.torch import LRPilot
from torch import nn

log = logging.getLogger("example-train")

FEATURES = 32
TRAIN_SIZE = 4096
VAL_SIZE = 1024
BATCH = 256
INITIAL_LR = 0.05


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noisy non-linear regression: y = sin(x·w1) + 0.5·(x·w2)² + noise, split train/val."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TRAIN_SIZE + VAL_SIZE, FEATURES, generator=gen)
    w1 = torch.randn(FEATURES, generator=gen) / math.sqrt(FEATURES)
    w2 = torch.randn(FEATURES, generator=gen) / math.sqrt(FEATURES)
    y = torch.sin(x @ w1) + 0.5 * (x @ w2) ** 2 + 0.1 * torch.randn(len(x), generator=gen)
    y = y.unsqueeze(1)
    return x[:TRAIN_SIZE], y[:TRAIN_SIZE], x[TRAIN_SIZE:], y[TRAIN_SIZE:]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=env.get("LRPILOT_URL", "ws://127.0.0.1:8765/ws"))
    parser.add_argument("--job", default=env.get("LRPILOT_JOB", "example-regression"))
    parser.add_argument("--steps", type=int, default=int(env.get("TRAIN_STEPS", "6000")))
    parser.add_argument("--step-delay", type=float, default=float(env.get("TRAIN_STEP_DELAY", "0.02")))
    parser.add_argument("--eval-every", type=int, default=50, help="steps between val_loss reports")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = make_data(args.seed)
    model = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=INITIAL_LR, momentum=0.9)
    loss_fn = nn.MSELoss()
    batches_per_epoch = TRAIN_SIZE // BATCH
    log.info("training %s for %d steps, reporting to %s", args.job, args.steps, args.url)
    with LRPilot(optimizer, args.url, job=args.job, labels={"example": "regression"}) as pilot:
        if not pilot.client.wait_connected(30):
            # training goes on regardless: the client buffers and reconnects in the background
            log.warning("no daemon at %s yet; training goes on and the client keeps retrying", args.url)
        order = torch.randperm(TRAIN_SIZE)
        try:
            for step in range(args.steps):
                batch = step % batches_per_epoch
                if batch == 0:
                    order = torch.randperm(TRAIN_SIZE)
                idx = order[batch * BATCH : (batch + 1) * BATCH]
                model.train()
                loss = loss_fn(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                lr = pilot.step(step, loss=loss.item())[0]
                if (step + 1) % args.eval_every == 0:
                    model.eval()
                    with torch.no_grad():
                        val_loss = loss_fn(model(x_val), y_val).item()
                    pilot.report(step, epoch=step // batches_per_epoch, val_loss=val_loss)
                    if (step + 1) % (args.eval_every * 10) == 0:
                        log.info("step %d: loss %.4f val_loss %.4f lr %.2e", step, loss.item(), val_loss, lr)
                if args.step_delay > 0:
                    time.sleep(args.step_delay)
        except lrpilot.Halted as exc:
            log.error("the daemon halted the job: %s", exc)
            return 3
        pilot.client.flush(10)
    log.info("done: %d decision(s) applied, final lr %.2e", len(pilot.client.decisions), pilot.lrs[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
