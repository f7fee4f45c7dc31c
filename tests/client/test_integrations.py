"""Real tiny training loops on CPU for each integration, against the in-process fake daemon.

Decisions are journaled in the fake daemon before the client connects, so the welcome carries
them and the tests do not depend on thread timing.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import pytest
import torch
from lrpilot import Client, Halted
from lrpilot import _protocol as proto

from tests.client.fakes import FakeDaemon

URL = "ws://127.0.0.1:1/ws"


def connected_client(daemon: FakeDaemon, initial_lr: Any, **kwargs: Any) -> Client:
    client = Client(URL, "job-a", initial_lr, transport=daemon, flush_interval=0.001, **kwargs)
    assert client.wait_connected(5.0)
    return client


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _batches(n: int) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


# --------------------------------------------------------------------------- torch


def test_torch_loop_follows_decisions_keeps_ratios_and_halts() -> None:
    """LRPilot sets the decided LR at its exact step on both groups (ratio kept) and halts."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=5, lrs=[0.01], momentums=[0.5])
    daemon.push_decision(kind="halt", apply_at_step=12, reason="test halt")
    model = _mlp()
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.05},
        ],
        momentum=0.9,
    )
    client = connected_client(daemon, [0.1, 0.05], initial_momentum=0.9)
    pilot = LRPilot(optimizer, client)
    used: list[list[float]] = []
    with pytest.raises(Halted, match="test halt"):
        for step, (x, y) in enumerate(_batches(50)):
            used.append([g["lr"] for g in optimizer.param_groups])
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pilot.step(step, loss=loss.item())
    assert used[:5] == [[0.1, 0.05]] * 5
    assert used[5:12] == [pytest.approx([0.01, 0.005])] * 7
    assert len(used) == 12  # pilot.step(11) raised: step 12 never ran
    assert [g["momentum"] for g in optimizer.param_groups] == [0.5, 0.5]
    client.close()
    assert [s for s, _ in daemon.metric_rows()] == list(range(12))
    acks = daemon.of_type(proto.Ack)
    assert acks == [proto.Ack(id=1, applied_at_step=5), proto.Ack(id=2, applied_at_step=12)]


def test_torch_rollback_hook_and_external_change() -> None:
    """A rollback calls the hook with (checkpoint step, skip batches); a foreign LR write warns."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    daemon.push_decision(
        kind="rollback", apply_at_step=4, lrs=[0.02], rollback_to_step=2, skip_batches=3
    )
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    client = connected_client(daemon, [0.1])
    pilot = LRPilot(optimizer, client)
    rollbacks: list[tuple[int, int]] = []
    pilot.on_rollback(lambda step, skip: rollbacks.append((step, skip)))
    for step in range(3):
        pilot.step(step, loss=1.0)
    pilot.checkpoint(2)
    pilot.step(3, loss=1.0)  # sets the LR of step 4: the rollback applies
    assert rollbacks == [(2, 3)]
    assert optimizer.param_groups[0]["lr"] == 0.02
    optimizer.param_groups[0]["lr"] = 0.5  # someone else writes the LR
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pilot.step(4, loss=1.0)
    assert any("changed outside lrpilot" in str(w.message) for w in caught)
    assert optimizer.param_groups[0]["lr"] == 0.02  # lrpilot's value is written again
    assert client.stats.external_lr_changes == 1
    client.close()
    assert daemon.of_type(proto.CheckpointNotice) == [proto.CheckpointNotice(step=2)]


def test_torch_pilot_made_from_url_fails_open() -> None:
    """LRPilot given an unreachable URL trains on with the optimizer's own LR and closes quickly."""
    from lrpilot.torch import LRPilot

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with LRPilot(optimizer, "ws://127.0.0.1:9/ws", job="job-a", close_timeout=0.5) as pilot:
        for step, (x, y) in enumerate(_batches(5)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert pilot.step(step, loss=loss.item()) == [0.1]
    assert optimizer.param_groups[0]["lr"] == 0.1


def _ddp_worker(rank: int, world_size: int, port: int, out: Any) -> None:
    import torch.distributed as dist
    from lrpilot.torch import LRPilot

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        daemon = FakeDaemon()  # the real daemon aligns apply_at_step across ranks; here: same step
        daemon.push_decision(kind="set_lr", apply_at_step=5, lrs=[0.01])
        model = torch.nn.parallel.DistributedDataParallel(_mlp())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        client = Client(URL, "ddp-job", [0.1], rank=rank, world_size=world_size, transport=daemon)
        assert client.wait_connected(5.0)
        pilot = LRPilot(optimizer, client)
        lrs = []
        for step, (x, y) in enumerate(_batches(10)):
            lrs.append(optimizer.param_groups[0]["lr"])
            loss = torch.nn.functional.mse_loss(model(x[rank::world_size]), y[rank::world_size])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pilot.step(step, loss=loss.item())
        client.close()
        hello = daemon.of_type(proto.Hello)[0]
        checksum = float(sum(p.sum() for p in model.parameters()))
        out.put((rank, lrs, (hello.rank, hello.world_size), checksum))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_ddp_two_ranks_switch_together() -> None:
    """Two gloo ranks each with their own client switch LR at the same step and stay in sync."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    (_, lrs0, id0, sum0), (_, lrs1, id1, sum1) = results
    assert (id0, id1) == ((0, 2), (1, 2))
    assert lrs0 == lrs1 == [0.1] * 5 + [0.01] * 5
    assert math.isclose(sum0, sum1, rel_tol=1e-6)


# --------------------------------------------------------------------------- keras


def test_keras_callback_sets_lr_reports_logs_and_stops_on_halt() -> None:
    """The keras callback reports batch and epoch logs, sets the LR at its step, and halts fit()."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import numpy as np
    from lrpilot.keras import LRPilotCallback

    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=3, lrs=[0.01])
    daemon.push_decision(kind="halt", apply_at_step=10, reason="enough")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    client = connected_client(daemon, [0.1])
    seen: list[float] = []

    spy_base: Any = keras.callbacks.Callback

    class Spy(spy_base):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(float(self.model.optimizer.learning_rate))

    history = model.fit(
        x, y, batch_size=16, epochs=5, validation_split=0.25, verbose=0,
        callbacks=[LRPilotCallback(client), Spy()],
    )  # fmt: skip
    client.close()
    assert seen[:3] == [pytest.approx(0.1)] * 3
    assert seen[3:10] == [pytest.approx(0.01)] * 7
    assert len(seen) == 10  # 3 batches per epoch; stopped at the end of epoch 4 (step 10 reached)
    assert len(history.history["loss"]) == 4
    rows = daemon.metric_rows()
    assert [s for s, r in rows if "loss" in r] == list(range(10))
    assert [s for s, r in rows if "val_loss" in r] == [2, 5, 8, 9]


# --------------------------------------------------------------------------- lightning


@pytest.mark.slow
def test_lightning_callback_sets_lr_and_stops_on_halt() -> None:
    """The Lightning callback reports the loss per step, sets the decided LR and stops on halt."""
    pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    from lrpilot.lightning import LRPilotCallback

    seen: list[float] = []

    module_base: Any = pl.LightningModule

    class Module(module_base):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(self.optimizers().param_groups[0]["lr"])
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=4, lrs=[0.02])
    daemon.push_decision(kind="halt", apply_at_step=9, reason="stop")
    client = connected_client(daemon, [0.1])
    trainer = pl.Trainer(
        max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LRPilotCallback(client)],
    )  # fmt: skip
    batches: Any = _batches(30)  # a list is a map-style dataset
    loader: Any = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(Module(), loader)
    client.close()
    assert seen[:4] == [0.1] * 4
    assert seen[4:9] == [pytest.approx(0.02)] * 5
    assert len(seen) == 9
    assert [s for s, r in daemon.metric_rows() if "loss" in r] == list(range(9))


# --------------------------------------------------------------------------- transformers


@pytest.mark.slow
def test_hf_callback_sets_lr_and_stops_on_halt(tmp_path: Any) -> None:
    """The transformers callback writes the decided LR after each step and stops on halt."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip(
        "accelerate", reason="transformers' Trainer needs accelerate (not installed)"
    )
    from lrpilot.hf import LRPilotCallback

    seen: list[float] = []

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    callback_base: Any = transformers.TrainerCallback

    class Spy(callback_base):
        def on_step_begin(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
        ) -> None:
            seen.append(optimizer.param_groups[0]["lr"])

    data = [{"x": x[0], "labels": y[0]} for x, y in _batches(40)]
    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=3, lrs=[0.01])
    daemon.push_decision(kind="halt", apply_at_step=7, reason="stop")
    client = connected_client(daemon, [0.1])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20, learning_rate=0.1,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=Model(), args=args, train_dataset=data, callbacks=[LRPilotCallback(client), Spy()]
    )
    trainer.train()
    client.close()
    assert seen[:3] == [pytest.approx(0.1)] * 3
    assert seen[3:7] == [pytest.approx(0.01)] * 4
    assert len(seen) == 7
    assert [s for s, r in daemon.metric_rows() if "loss" in r] == list(range(7))


def test_one_lr_client_drives_several_groups_keeping_their_ratios() -> None:
    """A client made for one LR drives every param group, each keeping its initial ratio to the first."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=3, lrs=[0.02])
    model = _mlp()
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.01},
        ]
    )
    client = connected_client(daemon, 0.1)
    pilot = LRPilot(optimizer, client)
    try:
        for step in range(5):
            pilot.step(step, loss=1.0)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.002])
    finally:
        client.close()


def test_torch_rollback_that_reloads_the_optimizer_gets_the_decided_lr() -> None:
    """optimizer.load_state_dict() in the rollback hook replaces the param-group dicts; the
    decided LR must land in the new ones, and the reload is not an "external change"."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    daemon.push_decision(kind="rollback", apply_at_step=4, lrs=[0.02], rollback_to_step=2)
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    client = connected_client(daemon, [0.1])
    pilot = LRPilot(optimizer, client)
    saved: dict[int, Any] = {}

    def reload(step: int, _skip: int) -> None:
        optimizer.load_state_dict(saved[step])

    pilot.on_rollback(reload)
    for step, (x, y) in enumerate(_batches(6)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 2:
            saved[2] = copy.deepcopy(optimizer.state_dict())
            pilot.checkpoint(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pilot.step(step, loss=loss.item())
        assert not [w for w in caught if "changed outside lrpilot" in str(w.message)]
        if step >= 3:
            assert optimizer.param_groups[0]["lr"] == 0.02, step
    assert client.stats.external_lr_changes == 0
    client.close()


def test_torch_start_sets_the_lr_of_the_first_step() -> None:
    """pilot.start() applies what the welcome carries for step 0 before any step runs."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.01])
    optimizer = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    client = Client(URL, "job-a", [0.1], transport=daemon, flush_interval=0.001)
    pilot = LRPilot(optimizer, client)
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert pilot.start() == [0.01]
    assert optimizer.param_groups[0]["lr"] == 0.01
    client.close()


def test_keras_callback_can_wait_for_the_welcome_so_step_0_gets_the_daemons_lr() -> None:
    """With wait_for_daemon, a decision for step 0 (a schedule's start) applies to the first
    batch even when the daemon takes a while to answer."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import numpy as np
    from lrpilot.keras import LRPilotCallback

    daemon = FakeDaemon()
    daemon.connect_delay = 0.5
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.01])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    seen: list[float] = []
    spy_base: Any = keras.callbacks.Callback

    class Spy(spy_base):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            seen.append(float(self.model.optimizer.learning_rate))

    pilot = LRPilotCallback(URL, "job-a", transport=daemon, wait_for_daemon=5.0)
    model.fit(x, x.sum(axis=1), batch_size=16, epochs=1, verbose=0, callbacks=[pilot, Spy()])
    assert seen == [pytest.approx(0.01)] * 2


# --------------------------------------------------------------------------- param groups


class _Optimizer:
    """The part of a torch optimizer that ParamGroupDriver uses: ``param_groups``."""

    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": 0.1, "momentum": 0.9}]

    def load_state_dict(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = [dict(g) for g in groups]  # new dicts, as torch's does


def _driven(optimizers: int = 1) -> tuple[FakeDaemon, Client, Any, list[_Optimizer]]:
    from lrpilot._integration import ParamGroupDriver

    daemon = FakeDaemon()
    client = Client(
        URL, "job-a", 0.1, initial_momentum=0.9, transport=daemon, start=False, flush_interval=0.0
    )
    client._sender.run_once()  # connect
    made = [_Optimizer() for _ in range(optimizers)]
    return daemon, client, ParamGroupDriver(client, made), made


@pytest.mark.parametrize(("optimizers", "through"), [(1, "driver"), (2, "driver"), (1, "pilot")])
def test_param_group_driver_short_cut_never_keeps_a_stale_lr(optimizers: int, through: str) -> None:
    """Steps that change nothing skip the full write; a due decision, a schedule, a foreign
    write, a reloaded optimizer or a halt each get the right LR (or Halted) at that very step
    (one group: the short cut without loops; two optimizers: the one with, checked on the last
    group; "pilot": LRPilot.step's own copy of the short cut, reporting a loss each step)."""
    from lrpilot.torch import LRPilot

    daemon, client, driver, made = _driven(optimizers)
    if through == "pilot":
        pilot = LRPilot(made[0], client)
        driver = pilot._driver

        class Apply:  # apply(s) as a training loop asks for it: pilot.step(s - 1) sets step s
            def apply(self, step: int) -> list[float]:
                if step == 0:
                    return pilot.start(0, wait=None)
                return pilot.step(step - 1, loss=0.5)

        apply: Any = Apply()
    else:
        apply = driver
    full = []
    apply_in_full = driver._apply
    driver._apply = lambda step: full.append(step) or apply_in_full(step)
    group = made[-1].param_groups[0]

    def each(lr: float) -> list[Any]:
        return [pytest.approx(lr)] * optimizers

    assert [apply.apply(s) for s in range(3)] == [each(0.1)] * 3
    assert full == [0]  # steps 1 and 2 changed nothing
    daemon.push_decision(kind="set_lr", apply_at_step=4, lrs=[0.05], momentums=[0.8])
    segment = {"kind": "warmup", "origin_step": 8, "params": {"total_iters": 2, "start_factor": 0.5},
               "then": {"kind": "constant", "params": {"lrs": [0.2]}}}  # fmt: skip
    daemon.push_decision(kind="schedule", apply_at_step=8, schedule=segment)
    daemon.push_decision(kind="halt", apply_at_step=14, reason="stop")
    client._sender.run_once()  # receive
    assert apply.apply(3) == each(0.1) and group["lr"] == 0.1
    assert apply.apply(4) == each(0.05) and (group["lr"], group["momentum"]) == (0.05, 0.8)
    group["momentum"] = 0.3  # someone else's momentum: lrpilot's again at the next step
    apply.apply(5)
    assert group["momentum"] == 0.8
    group["lr"] = float("0.05")  # an equal value, another object: no foreign change
    assert apply.apply(6) == each(0.05) and client.stats.external_lr_changes == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        group["lr"] = 0.5  # a foreign LR: reported, and lrpilot's written again
        assert apply.apply(7) == each(0.05) and group["lr"] == 0.05
    assert client.stats.external_lr_changes == 1
    assert [apply.apply(s)[-1] for s in range(8, 12)] == pytest.approx([0.1, 0.15, 0.2, 0.2])
    made[-1].load_state_dict([{"lr": 0.2, "momentum": 0.8}])  # as a reload would
    made[-1].param_groups[0]["lr"] = 0.001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert apply.apply(12) == each(0.2)
    assert made[-1].param_groups[0]["lr"] == pytest.approx(0.2)
    assert apply.apply(13) == each(0.2)
    for step in (14, 15):  # Halted at the halt's step and at every step after it
        with pytest.raises(Halted, match="stop"):
            apply.apply(step)
    assert full == [0, *range(4, 16)]  # 1-3 changed nothing (step 3: a decision not yet due)
    if through == "pilot":
        # the loss of steps 0-14 (0 and 1 were sent at the receive), and the foreign LRs'
        # count, reported at the step they were found at
        rows = [(step, metrics) for step, _, _, metrics in client._buffer]
        loss = [(step, {"loss": 0.5}) for step in range(2, 15)]
        count = "lrpilot_external_lr_changes"
        assert rows == [*loss[:5], (7, {count: 1.0}), *loss[5:10], (12, {count: 2.0}), *loss[10:]]
        assert client.stats.reported_points == 17
    client.close(timeout=0.5)


def test_param_group_driver_returns_a_list_the_caller_may_change() -> None:
    """apply() returns a new list every step: changing it changes nothing that lrpilot writes."""
    _, client, driver, (optimizer,) = _driven()
    first = driver.apply(0)
    first[0] = 123.0
    assert driver.apply(1) == [0.1] and optimizer.param_groups[0]["lr"] == 0.1
    client.close(timeout=0.5)


# --------------------------------------------------------------------------- frameworks' dicts


def test_integrations_never_change_the_frameworks_own_metric_dicts() -> None:
    """Keras logs, Lightning's callback_metrics and the HF Trainer's logs keep their values
    (tensors stay tensors); the client gets a dict of its own with plain floats."""
    from types import SimpleNamespace

    from lrpilot import hf, keras, lightning

    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, start=False, flush_interval=0.0)

    def entries() -> list[tuple[Any, Any, dict[str, Any]]]:
        out = [(s, e, m) for s, e, _, m in client._buffer]
        client._buffer.clear()
        return out

    loss = torch.tensor(0.5)
    logs = {"loss": loss, "val_loss": 0.25}
    callback = keras._LRPilotCallbackImpl(client)
    callback.model = SimpleNamespace(
        optimizer=SimpleNamespace(learning_rate=0.1), stop_training=False
    )
    callback.on_train_batch_end(0, logs)
    callback.on_epoch_end(0, logs)
    assert logs == {"loss": loss, "val_loss": 0.25} and logs["loss"] is loss
    ((_, _, batch), (_, _, epoch)) = entries()
    assert batch == {"loss": 0.5, "val_loss": 0.25} and batch["loss"].__class__ is float
    assert epoch == {"val_loss": 0.25} and batch is not logs

    metrics = {"acc": torch.tensor(0.75), "val_loss": torch.tensor(1.0)}
    kept = dict(metrics)
    trainer = SimpleNamespace(
        optimizers=[torch.optim.SGD(_mlp().parameters(), lr=0.1)], global_step=1,
        current_epoch=0, callback_metrics=metrics, sanity_checking=False, should_stop=False,
    )  # fmt: skip
    callback = lightning._LRPilotCallbackImpl(client)
    callback.on_fit_start(trainer, None)
    callback.on_train_batch_end(trainer, None, {"loss": loss}, None, 0)
    callback.on_validation_end(trainer, None)
    assert trainer.callback_metrics is metrics and all(metrics[k] is kept[k] for k in kept)
    assert [m for _, _, m in entries()] == [{"acc": 0.75, "loss": 0.5}, {"val_loss": 1.0}]

    logs = {"loss": 0.5, "learning_rate": 0.1, "epoch": 0.5}
    callback = hf._LRPilotCallbackImpl(client)
    callback.client = client
    callback.on_log(None, SimpleNamespace(global_step=3), None, logs=logs)
    assert logs == {"loss": 0.5, "learning_rate": 0.1, "epoch": 0.5}
    assert [(s, m) for s, _, m in entries()] == [(2, {"loss": 0.5})]
    client.close(timeout=0.5)


def test_torch_step_reports_as_client_report_does() -> None:
    """LRPilot.step's own short path for finite floats keeps report()'s rules: no metrics, no
    row; other values take report()'s path (a CPU tensor converted, an int kept); a full buffer
    counts the point it drops; a NaN wakes the sender at once, and any point an idle one."""
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, start=False, max_buffer=3)
    pilot = LRPilot(torch.optim.SGD(_mlp().parameters(), lr=0.1), client)
    wakes: list[int] = []
    client._sender.wake = lambda: wakes.append(len(client._buffer))  # type: ignore[method-assign]
    pilot.step(0, loss=0.5)
    pilot.step(1)
    pilot.step(2, loss=torch.tensor(0.25), n=2)
    rows = [(step, epoch, metrics) for step, epoch, _, metrics in client._buffer]
    assert rows == [(0, None, {"loss": 0.5}), (2, None, {"loss": 0.25, "n": 2})]
    assert rows[1][2]["loss"].__class__ is float and client.stats.reported_points == 2
    pilot.step(3, loss=0.125, acc=0.75)
    pilot.step(4, loss=0.0625)
    assert [step for step, _, _, _ in client._buffer] == [2, 3, 4]
    assert client.stats.dropped_points == 1 and wakes == []
    pilot.step(5, loss=math.nan)
    assert wakes == [3]
    client._sender_idle = True
    pilot.step(6, loss=0.5)
    assert wakes == [3, 3] and client.stats.reported_points == 6
    assert client._last_step == 6

    class Odd:
        @property
        def __class__(self) -> type:  # type: ignore[override]
            raise RuntimeError("no class")

    assert pilot.step(7, loss=Odd()) == [0.1]  # counted, never raised; the LR still set
    assert client.stats.report_errors == 1 and client.stats.reported_points == 6
    client.close(timeout=0.5)
