"""Lightning integration: one callback.

::

    trainer = lightning.pytorch.Trainer(callbacks=[LRPilotCallback("ws://127.0.0.1:8765/ws", job="mnist-a")])

After each training batch the callback reports the batch loss (and the non-validation metrics
logged with ``self.log``) at the step just done (``trainer.global_step - 1``) and writes the LR
for ``trainer.global_step`` into every optimizer's param groups (numbered across optimizers).
Validation metrics (names starting with ``val``) are reported when validation ends. A halt
decision sets ``trainer.should_stop = True``; ``on_rollback(checkpoint_step, skip_batches)`` is
called when a rollback decision applies. Use no Lightning LR scheduler with it. A client the
callback makes itself tells the daemon the run's length (``trainer.estimated_stepping_batches``,
as ``total_steps``; pass ``total_steps=None`` to keep it), so that the default policy anneals
the end of the run.

lightning is imported only when the callback class is first built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ._client import Client
from ._decisions import Halted
from ._integration import ParamGroupDriver, ddp_rank_and_world_size, make_client

__all__ = ["LRPilotCallback"]


def _scalar_items(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in metrics.items():
        if getattr(value, "numel", None) is not None and value.numel() != 1:
            continue
        out[name] = value.detach() if hasattr(value, "detach") else value
    return out


class _LRPilotCallbackImpl:
    def __init__(
        self,
        client_or_url: Client | str,
        job: str | None = None,
        *,
        on_rollback: Callable[[int, int], None] | None = None,
        detect_external_changes: bool = True,
        wait_for_daemon: float = 0.0,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        self._client_or_url = client_or_url
        self._job = job
        self._client_kwargs = client_kwargs
        self._on_rollback = on_rollback
        self._detect_external = detect_external_changes
        self._wait_for_daemon = wait_for_daemon
        self.client: Client | None = None
        self._owns_client = False
        self._driver: ParamGroupDriver | None = None

    def _apply(self, trainer: Any) -> None:
        assert self._driver is not None
        try:
            self._driver.apply(int(trainer.global_step))
        except Halted:
            trainer.should_stop = True

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        lrs, momentums = ParamGroupDriver.initial(optimizers)
        kwargs = dict(self._client_kwargs)
        if "total_steps" not in kwargs:
            kwargs["total_steps"] = _planned_steps(trainer)  # the anneal at the run's end
        if isinstance(self._client_or_url, str) and "rank" not in kwargs:
            ddp = ddp_rank_and_world_size()
            if ddp is not None:
                kwargs["rank"], kwargs["world_size"] = ddp
        self.client, self._owns_client = make_client(
            self._client_or_url, self._job, lrs, momentums, kwargs
        )
        self._driver = ParamGroupDriver(self.client, optimizers, self._detect_external)
        if self._on_rollback is not None:
            self._driver.on_rollback(self._on_rollback)
        if self._wait_for_daemon > 0:
            self.client.wait_connected(self._wait_for_daemon)
        self._apply(trainer)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self.client is not None
        step = max(0, int(trainer.global_step) - 1)
        metrics = {
            k: v
            for k, v in _scalar_items(trainer.callback_metrics).items()
            if not k.startswith("val")
        }
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            metrics["loss"] = loss.detach() if hasattr(loss, "detach") else loss
        if metrics:  # a dict of its own: the client may keep it, no copy
            self.client._report(step, int(trainer.current_epoch), metrics)
        self._apply(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.client is None or trainer.sanity_checking:
            return
        metrics = {
            k: v for k, v in _scalar_items(trainer.callback_metrics).items() if k.startswith("val")
        }
        if metrics:
            step = max(0, int(trainer.global_step) - 1)
            self.client._report(step, int(trainer.current_epoch), metrics)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._owns_client and self.client is not None:
            self.client.close()


_class_cache: dict[str, type] = {}


def LRPilotCallback(
    client_or_url: Client | str,
    job: str | None = None,
    *,
    on_rollback: Callable[[int, int], None] | None = None,
    detect_external_changes: bool = True,
    wait_for_daemon: float = 0.0,
    **client_kwargs: Any,
) -> Any:
    """A ``lightning.pytorch.Callback`` that streams metrics to lrpilot and sets its LRs.

    ``client_or_url``: a :class:`lrpilot.Client` or the daemon URL (a client is made at
    ``on_fit_start`` from the optimizers' LRs and closed at ``on_fit_end``).
    ``wait_for_daemon``: seconds to wait at the start of training for the daemon's welcome, so
    that a schedule it starts at step 0 (a warmup, a cycle) applies from the first step; 0 (the
    default) does not wait. Without a daemon, training starts after at most this long.
    """
    cls = _class_cache.get("cls")
    if cls is None:
        import lightning.pytorch as pl

        cls = type("LRPilotCallback", (_LRPilotCallbackImpl, pl.Callback), {})
        _class_cache["cls"] = cls
    return cls(
        client_or_url,
        job,
        on_rollback=on_rollback,
        detect_external_changes=detect_external_changes,
        wait_for_daemon=wait_for_daemon,
        **client_kwargs,
    )


def _planned_steps(trainer: Any) -> int | None:
    """The fit's optimizer steps, when Lightning can tell (not for an unbounded run)."""
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length yet, or an iterable without one
        return None
    if isinstance(steps, (int, float)) and math.isfinite(steps) and steps >= 1:
        return int(steps)
    return None
