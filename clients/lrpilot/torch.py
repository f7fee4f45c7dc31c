"""PyTorch integration: two lines in a training loop.

::

    pilot = LRPilot(optimizer, "ws://127.0.0.1:8765/ws", job="mnist-a")
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
        pilot.step(step, loss=loss.item())        # like scheduler.step(): sets the LR of step+1

``pilot.step(step, **metrics)`` reports the metrics of the step just done and writes the LR
(and SGD momentum / Adam beta1, if the daemon sets them) that lrpilot gives for ``step + 1``
into ``optimizer.param_groups``. Report validation metrics with ``pilot.report(step,
val_loss=...)``. A halt decision raises :class:`lrpilot.Halted` from ``pilot.step``; a rollback
decision calls the hooks registered with :meth:`LRPilot.on_rollback`.

DDP: every rank makes its own ``LRPilot`` (rank and world size are read from an initialized
``torch.distributed`` group). Each rank reports its own metrics; the daemon picks every
decision's ``apply_at_step`` ahead of all ranks, so all ranks change the LR at the same step
without any collective call on the training thread.

This module does not import torch at import time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ._client import Client
from ._integration import ParamGroupDriver, ddp_rank_and_world_size, make_client

__all__ = ["LRPilot"]

# LRPilot.step reads these as module globals, as Client._report does (see there)
_FLOAT = float
_now = time.time


class LRPilot:
    """Drive a torch optimizer's learning rate from the lrpilot daemon.

    ``client_or_url`` is a :class:`lrpilot.Client` (used as is) or the daemon URL (a client is
    made with the optimizer's LRs and momentums and ``client_kwargs``, and closed by
    :meth:`close`).
    """

    def __init__(
        self,
        optimizer: Any,
        client_or_url: Client | str,
        job: str | None = None,
        *,
        detect_external_changes: bool = True,
        **client_kwargs: Any,
    ) -> None:
        lrs, momentums = ParamGroupDriver.initial([optimizer])
        if isinstance(client_or_url, str) and "rank" not in client_kwargs:
            ddp = ddp_rank_and_world_size()
            if ddp is not None:
                client_kwargs["rank"], client_kwargs["world_size"] = ddp
        self.client, self._owns_client = make_client(
            client_or_url, job, lrs, momentums, client_kwargs
        )
        self.optimizer = optimizer
        self._driver = ParamGroupDriver(self.client, [optimizer], detect_external_changes)
        # what step() reads, bound once: it runs on every training step
        self._report = self.client._report
        self._apply = self._driver.apply
        self._buffer = self.client._buffer
        self._max_buffer = self.client._max_buffer
        self._state = self.client._state

    def step(self, step: int, **metrics: Any) -> list[float]:
        """Report ``metrics`` of ``step`` and set the LR for ``step + 1``; returns those LRs.

        Raises :class:`lrpilot.Halted` once a halt decision applies.

        The common step runs in this one function: ``Client._report``'s check of the values
        (finite floats) and ``ParamGroupDriver.apply``'s short cut (one optimizer with one
        group, nothing due, nothing changed; see there), inline; anything else takes those
        methods. It runs right after torch's step has refilled the CPU caches, where each
        Python call and each object touched counts (``bench/bench_client.py``).
        """
        try:
            for value in metrics.values():
                if type(value) is not _FLOAT or value - value:  # not a finite float
                    self._report(step, None, metrics)  # this call's own dict: no copy
                    break
            else:
                if metrics:  # as Client._report's short path
                    client = self.client
                    buffer = self._buffer
                    if len(buffer) >= self._max_buffer:
                        client.stats.dropped_points += 1
                    buffer.append((step, None, _now(), metrics))
                    client._last_step = step
                    if client._sender_idle:
                        client._sender.wake()
                    client.stats.reported_points += 1
        except Exception:  # reporting never raises, as Client.report
            self.client.stats.report_errors += 1
        step += 1
        single = self._driver._single
        if single is not None:  # as ParamGroupDriver.apply's short cut
            optimizer, groups, group, lr, key, value, lrs_seen, momentums_seen = single
            state = self._state
            pending = state._pending
            if (
                state._lrs is lrs_seen
                and state._momentums is momentums_seen
                and state._segment is None
                and (not pending or pending[0][0] > step)
                and optimizer.param_groups is groups
                and group["lr"] is lr
                and group[key] is value
                and not state.halted
            ):
                return [lr]
        return self._apply(step)

    def start(self, step: int = 0, wait: float | None = 5.0) -> list[float]:
        """Set the LR of the first step to run (``step``, 0 for a new run) before it runs.

        :meth:`step` sets the LR of the step *after* the one reported, so without this the
        first step runs at the optimizer's own LR, even when the daemon's policy starts with a
        warmup. Waits up to ``wait`` seconds for the daemon's welcome; without a daemon the
        optimizer keeps its LR (fail-open). Returns the LRs set.
        """
        if wait:
            self.client.wait_connected(wait)
        return self._driver.apply(step)

    def report(self, step: int, epoch: int | None = None, **metrics: Any) -> None:
        """Report metrics without touching the LR (validation metrics, for example)."""
        self._report(step, epoch, metrics)  # this call's own dict: no copy

    def checkpoint(self, step: int) -> None:
        """Tell the daemon that a checkpoint of ``step`` was saved (a rollback target)."""
        self.client.checkpoint(step)

    def on_rollback(self, hook: Callable[[int, int], None]) -> None:
        """Call ``hook(checkpoint_step, skip_batches)`` when a rollback decision applies.

        The hook reloads the checkpoint of ``checkpoint_step`` and arranges to skip
        ``skip_batches`` batches; lrpilot then sets the decision's LR. The step is one the job
        reported with :meth:`checkpoint`, not always the last: a detection that knows when the
        trouble began (``overshoot``) returns to the last checkpoint saved before it, so keep
        a few recent ones (docs/policies.md, "Which checkpoint").
        """
        self._driver.on_rollback(hook)

    @property
    def lrs(self) -> list[float]:
        return self.client.lrs

    @property
    def halted(self) -> bool:
        return self.client.halted

    def close(self) -> None:
        """Close the client if this object made it."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> LRPilot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
