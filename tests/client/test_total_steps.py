"""A job that tells its length: ``total_steps`` on the wire, and the daemon's anneal end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from lrpilot import Client
from lrpilot import _protocol as proto

from tests._serve import start_daemon
from tests.client.fakes import FakeDaemon


def test_hello_carries_total_steps() -> None:
    hello = proto.Hello(job="j", lrs=(0.1,), total_steps=1500)
    back = proto.decode(proto.encode(hello))
    assert isinstance(back, proto.Hello) and back.total_steps == 1500
    legacy = json.loads(proto.encode(hello))
    del legacy["total_steps"]  # a client from before the field
    old = proto.decode(json.dumps(legacy))
    assert isinstance(old, proto.Hello) and old.total_steps is None


@pytest.mark.parametrize("bad", [0, -5, 1.5, "100", True])
def test_a_bad_total_steps_is_refused_with_its_field(bad: object) -> None:
    wire = json.loads(proto.encode(proto.Hello(job="j", lrs=(0.1,))))
    wire["total_steps"] = bad
    with pytest.raises(proto.ProtocolError) as err:
        proto.decode(json.dumps(wire))
    assert "hello.total_steps" in str(err.value)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_client_refuses_a_bad_total_steps(bad: object) -> None:
    with pytest.raises(ValueError, match="total_steps"):
        Client("ws://127.0.0.1:9/ws", job="j", initial_lr=0.1, total_steps=bad, start=False)  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_daemon_anneals_a_job_that_gives_its_length(tmp_path: Path) -> None:
    """A real daemon with the repository's default policy, a real client: the LR of the last
    20 % of a 200-step run falls to 0, with the job computing each step's LR itself."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "storage": {"state_dir": str(tmp_path / "state"), "flush_interval_seconds": 0.01},
                "defaults": {"apply_lead_steps": 5},
            }
        )
    )
    proc, base = start_daemon(["--config", str(config)], log_path=tmp_path / "daemon.log")
    url = base + "/ws"
    try:
        total = 200
        lrs: list[float] = []
        with Client(
            url, job="annealed", initial_lr=0.1, total_steps=total, flush_interval=0.005
        ) as client:
            assert client.wait_connected(10)
            for step in range(total):
                lrs.append(client.lrs_for_step(step)[0])
                values = {"loss": 1.0 / (1 + step)}
                if step % 10 == 9:
                    values["val_loss"] = 1.0 / (1 + step)
                client.report(step, **values)
                if step == 159:  # the record that sets step 160's LR starts the anneal
                    client.flush()
                    deadline = time.monotonic() + 10
                    while not client.pending_decisions and time.monotonic() < deadline:
                        time.sleep(0.01)
                    assert client.pending_decisions, "no anneal decision came"
                else:
                    time.sleep(0.001)
            (decision, applied_at), *_ = [d for d in client.decisions if d[0].source == "anneal"]
        assert decision.schedule is not None and decision.schedule["kind"] == "anneal"
        assert decision.schedule["origin_step"] == 160
        assert 160 < applied_at <= 170  # the daemon's apply lead after the record of step 159
        assert lrs[:160] == [0.1] * 160
        # from where it applied, each step's LR is the anneal's own: the last step trains at 0
        for step in range(applied_at, total):
            assert lrs[step] == pytest.approx(0.1 * (1 - (step - 160 + 1) / 40))
        assert lrs[-1] == 0.0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


# --------------------------------------------------------------------------- integrations


@pytest.mark.parametrize("given", [{}, {"total_steps": None}, {"total_steps": 7}])
def test_keras_callback_tells_the_fits_length_unless_told_otherwise(given: dict[str, Any]) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    import numpy as np
    from lrpilot.keras import LRPilotCallback

    daemon = FakeDaemon()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(48, 4)).astype("float32")
    pilot = LRPilotCallback(
        "ws://127.0.0.1:9/ws", "job-k", transport=daemon, wait_for_daemon=5.0, **given
    )
    model.fit(x, x.sum(axis=1), batch_size=16, epochs=2, verbose=0, callbacks=[pilot])
    hellos = daemon.of_type(proto.Hello)
    assert hellos
    assert hellos[0].total_steps == given.get("total_steps", 2 * 3)


def test_lightning_planned_steps_reads_the_trainers_estimate() -> None:
    from lrpilot.lightning import _planned_steps

    class Trainer:
        def __init__(self, steps: object) -> None:
            self._steps = steps

        @property
        def estimated_stepping_batches(self) -> object:
            if isinstance(self._steps, Exception):
                raise self._steps
            return self._steps

    assert _planned_steps(Trainer(300)) == 300
    assert _planned_steps(Trainer(math.inf)) is None  # max_steps=-1 with an endless loader
    assert _planned_steps(Trainer(RuntimeError("no dataloader yet"))) is None
    assert _planned_steps(Trainer(0)) is None
