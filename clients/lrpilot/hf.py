"""Hugging Face transformers integration: one ``TrainerCallback``.

::

    trainer = Trainer(..., args=TrainingArguments(..., lr_scheduler_type="constant"),
                      callbacks=[LRPilotCallback("ws://127.0.0.1:8765/ws", job="bert-a")])

The Trainer's logs (``loss``, ``eval_loss``, ...) are reported at the last completed step
(``state.global_step - 1``) whenever the Trainer logs, and after every optimizer step the LR
for ``state.global_step`` is written into the optimizer's param groups. The Trainer's own LR
scheduler runs before the callback and is overridden, so use ``lr_scheduler_type="constant"``
(its logged ``learning_rate`` is the scheduler's, not lrpilot's; external-change detection is
off by default for this reason). A halt decision sets ``control.should_training_stop = True``.
A client the callback makes itself tells the daemon the run's length (``state.max_steps``, as
``total_steps``; pass ``total_steps=None`` to keep it), so that the default policy anneals the
end of the run.

transformers is imported only when the callback class is first built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._client import Client
from ._decisions import Halted
from ._integration import ParamGroupDriver, ddp_rank_and_world_size, make_client

__all__ = ["LRPilotCallback"]

_NOT_METRICS = frozenset({"learning_rate", "epoch", "total_flos", "grad_norm"})


class _LRPilotCallbackImpl:
    def __init__(
        self,
        client_or_url: Client | str,
        job: str | None = None,
        *,
        on_rollback: Callable[[int, int], None] | None = None,
        detect_external_changes: bool = False,
        wait_for_daemon: float = 0.0,
        **client_kwargs: Any,
    ) -> None:
        self._client_or_url = client_or_url
        self._job = job
        self._client_kwargs = client_kwargs
        self._on_rollback = on_rollback
        self._detect_external = detect_external_changes
        self._wait_for_daemon = wait_for_daemon
        self.client: Client | None = None
        self._owns_client = False
        self._driver: ParamGroupDriver | None = None

    def _apply(self, state: Any, control: Any) -> None:
        if self._driver is None:
            return
        try:
            self._driver.apply(int(state.global_step))
        except Halted:
            control.should_training_stop = True

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if optimizer is None:
            raise ValueError("lrpilot.hf: the Trainer passed no optimizer to on_train_begin")
        lrs, momentums = ParamGroupDriver.initial([optimizer])
        client_kwargs = dict(self._client_kwargs)
        max_steps = getattr(state, "max_steps", None)
        if "total_steps" not in client_kwargs and isinstance(max_steps, int) and max_steps > 0:
            client_kwargs["total_steps"] = max_steps  # the run's length: the anneal at its end
        if isinstance(self._client_or_url, str) and "rank" not in client_kwargs:
            ddp = ddp_rank_and_world_size()
            if ddp is not None:
                client_kwargs["rank"], client_kwargs["world_size"] = ddp
        self.client, self._owns_client = make_client(
            self._client_or_url, self._job, lrs, momentums, client_kwargs
        )
        self._driver = ParamGroupDriver(self.client, [optimizer], self._detect_external)
        if self._on_rollback is not None:
            self._driver.on_rollback(self._on_rollback)
        if self._wait_for_daemon > 0:
            self.client.wait_connected(self._wait_for_daemon)
        self._apply(state, control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._apply(state, control)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.client is None or not logs:
            return
        metrics = {
            k: v
            for k, v in logs.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if metrics:  # a dict of its own (not the Trainer's logs): the client may keep it
            self.client._report(max(0, int(state.global_step) - 1), None, metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._owns_client and self.client is not None:
            self.client.close()


_class_cache: dict[str, type] = {}


def LRPilotCallback(
    client_or_url: Client | str,
    job: str | None = None,
    *,
    on_rollback: Callable[[int, int], None] | None = None,
    detect_external_changes: bool = False,
    wait_for_daemon: float = 0.0,
    **client_kwargs: Any,
) -> Any:
    """A ``transformers.TrainerCallback`` that streams logs to lrpilot and sets its LRs.

    ``wait_for_daemon``: seconds to wait at the start of training for the daemon's welcome, so
    that a schedule it starts at step 0 (a warmup, a cycle) applies from the first step; 0 (the
    default) does not wait. Without a daemon, training starts after at most this long.
    """
    cls = _class_cache.get("cls")
    if cls is None:
        import transformers

        cls = type("LRPilotCallback", (_LRPilotCallbackImpl, transformers.TrainerCallback), {})
        _class_cache["cls"] = cls
    return cls(
        client_or_url,
        job,
        on_rollback=on_rollback,
        detect_external_changes=detect_external_changes,
        wait_for_daemon=wait_for_daemon,
        **client_kwargs,
    )
