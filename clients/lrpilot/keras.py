"""Keras 3 integration: one callback.

::

    model.fit(x, y, epochs=10, callbacks=[LRPilotCallback("ws://127.0.0.1:8765/ws", job="mnist-a")])

Every batch's logs are reported at a global step (batches seen since training began), every
epoch's logs (``val_loss`` ...) at the step of the epoch's last batch, and the optimizer's
``learning_rate`` (and ``beta_1`` / ``momentum`` if the daemon sets momentums) is set for the
next batch. A halt decision sets ``model.stop_training = True``. The optimizer must be built
with a float learning rate (a ``LearningRateSchedule`` cannot be set from outside). A client
the callback makes itself tells the daemon the run's length, ``epochs * steps`` when keras
knows both (``total_steps``; pass ``total_steps=None`` to keep it to yourself), so that the
daemon's default policy anneals the end of the run.

keras is imported only when this module's callback class is first used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ._client import Client
from ._decisions import Decision, DecisionKind
from ._integration import make_client

__all__ = ["LRPilotCallback"]


def _callback_base() -> type:
    import keras

    base: type = keras.callbacks.Callback
    return base


def _numbers(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        k: v
        for k, v in (logs or {}).items()
        if isinstance(v, (int, float)) or hasattr(v, "__float__")
    }


class _LRPilotCallbackImpl:
    """The callback's behaviour; :func:`LRPilotCallback` mixes it with keras' Callback."""

    model: Any

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
        self.client: Client | None = client_or_url if isinstance(client_or_url, Client) else None
        self._owns_client = False
        self.step = 0  # global batch counter
        self._epoch = 0
        self._written: float | None = None
        self._hooked = False

    # the optimizer -----------------------------------------------------------------

    def _optimizer(self) -> Any:
        return self.model.optimizer

    def _read_lr(self) -> float:
        return float(self._optimizer().learning_rate)

    def _write(self, step: int) -> None:
        client = self.client
        assert client is not None
        lrs = client.lrs_for_step(step)
        optimizer = self._optimizer()
        if self._detect_external and self._written is not None:
            found = self._read_lr()
            if not math.isclose(found, self._written, rel_tol=1e-6):
                client.external_lr_change(step, 0, self._written, found)
        if self._written is None or lrs[0] != self._written:
            optimizer.learning_rate = lrs[0]
        self._written = self._read_lr()
        momentums = client.momentums
        if momentums is not None:
            if hasattr(optimizer, "beta_1"):
                optimizer.beta_1 = momentums[0]
            elif hasattr(optimizer, "momentum"):
                optimizer.momentum = momentums[0]
        if client.halted:
            self.model.stop_training = True

    def _planned_steps(self) -> int | None:
        """``epochs * steps`` of this fit, when keras knows both."""
        params = getattr(self, "params", None) or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        if isinstance(epochs, int) and isinstance(steps, int) and epochs > 0 and steps > 0:
            return epochs * steps
        return None

    def _on_decision(self, decision: Decision, step: int) -> None:
        if decision.kind is DecisionKind.ROLLBACK and self._on_rollback is not None:
            self._on_rollback(int(decision.rollback_to_step or 0), decision.skip_batches)

    # keras hooks ---------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.client is None or self._owns_client:
            optimizer = self._optimizer()
            momentum = getattr(optimizer, "beta_1", getattr(optimizer, "momentum", None))
            kwargs = dict(self._client_kwargs)
            if "total_steps" not in kwargs:
                kwargs["total_steps"] = self._planned_steps()
            self.client, self._owns_client = make_client(
                self._client_or_url,
                self._job,
                [self._read_lr()],
                None if not isinstance(momentum, (int, float)) else [float(momentum)],
                kwargs,
            )
            self.client.add_decision_callback(self._on_decision)
        elif not self._hooked:
            self.client.add_decision_callback(self._on_decision)
        self._hooked = True
        self._written = None
        if self._wait_for_daemon > 0:
            self.client.wait_connected(self._wait_for_daemon)
        self._write(self.step)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        assert self.client is not None
        values = _numbers(logs)  # a new dict: the client may keep it, no copy
        if values:
            self.client._report(self.step, self._epoch, values)
        self.step += 1
        self._write(self.step)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        assert self.client is not None
        values = {k: v for k, v in _numbers(logs).items() if k.startswith("val_")}
        if values:
            self.client._report(max(0, self.step - 1), epoch, values)
        if self.client.halted:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
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
    """A ``keras.callbacks.Callback`` that streams logs to lrpilot and sets the LR it decides.

    ``client_or_url``: a :class:`lrpilot.Client`, or the daemon URL (a client is made at
    ``on_train_begin`` with the optimizer's LR and closed at ``on_train_end``).
    ``on_rollback(checkpoint_step, skip_batches)`` is called when a rollback decision applies.
    ``wait_for_daemon``: seconds to wait at the start of training for the daemon's welcome, so
    that a schedule it starts at step 0 (a warmup, a cycle) applies from the first step; 0 (the
    default) does not wait. Without a daemon, training starts after at most this long.
    """
    cls = _class_cache.get("cls")
    if cls is None:
        cls = type("LRPilotCallback", (_LRPilotCallbackImpl, _callback_base()), {})
        cls.__doc__ = LRPilotCallback.__doc__
        _class_cache["cls"] = cls
    return cls(
        client_or_url,
        job,
        on_rollback=on_rollback,
        detect_external_changes=detect_external_changes,
        wait_for_daemon=wait_for_daemon,
        **client_kwargs,
    )
