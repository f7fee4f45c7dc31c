"""One training run of one task under one learning-rate controller.

Controllers:

``fixed``
    the LR never changes.
``plateau``
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with torch's defaults (factor 0.1,
    patience 10, threshold 1e-4 rel), stepped with the validation loss at every evaluation.
``onecycle``
    ``torch.optim.lr_scheduler.OneCycleLR`` with torch's defaults (pct_start 0.3, cosine,
    div_factor 25, final_div_factor 1e4, momentum cycled 0.85-0.95), ``max_lr`` = the run's
    LR, over the run's steps.
``lrpilot``
    the LR is steered by a real lrpilot daemon through :class:`lrpilot.Client`: the loop
    reports ``loss`` every step and ``val_loss`` (plus ``val_acc``) at every evaluation,
    keeps an in-memory checkpoint every ``checkpoint_every`` steps and reports it with
    ``client.checkpoint(step)`` (only when the weights and the last loss are finite: a
    *good* checkpoint), and applies decisions: a rollback reloads the model and optimizer
    state of that checkpoint and skips the batches asked for, a halt ends the run (counted
    as lost).

Steps are counted monotonically: a rollback reloads weights but does not give the steps
back, so every controller gets the same compute budget.

Lockstep. The daemon applies a decision ``apply_lead_seconds`` (0.25 s) of the job's own
steps ahead, so that every rank of a DDP job switches at the same step. These toy jobs run
hundreds of steps per second on a CPU; in real time, every decision would land a hundred
steps late, which says more about the toy than about lrpilot. So the loop stands in for a
job whose steps take ``STEP_SECONDS``: the times the client sends are that virtual clock,
and after every step the loop waits until the daemon has processed the step and the client
has received every decision the daemon made. Runs are then reproducible, and decisions
apply ``ceil(0.25 / STEP_SECONDS)`` steps after the record that caused them, as they would
for a job of that speed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tasks import TASKS, Task, data_of

STEP_SECONDS = 0.1  # the virtual duration of one step (a job doing 10 steps/s)


@dataclass
class RunSpec:
    """What to run."""

    task: str
    controller: str  # fixed | plateau | onecycle | lrpilot
    lr: float
    seed: int
    url: str | None = None  # the daemon's websocket URL (lrpilot only)
    label: str = ""  # e.g. "x10" for a start 10x the best fixed LR
    keep_history: bool = False
    #: lrpilot: tell the daemon the run's length (``total_steps`` in the hello)
    tell_length: bool = True


@dataclass
class RunResult:
    """What a run produced; histories only when asked for."""

    task: str
    controller: str
    lr: float
    seed: int
    label: str
    final_val_loss: float
    final_val_acc: float | None
    best_val_loss: float
    lost: bool
    lost_reason: str
    nan_incidents: int  # episodes of non-finite training loss (a finite loss ends one)
    decisions: dict[str, int]  # "kind:source" -> count (lrpilot only)
    final_lr: float
    seconds: float
    eval_steps: list[int]
    eval_losses: list[float]
    loss: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    decision_log: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _VirtualTime:
    """Stands in for the ``time`` module inside ``lrpilot._client``: ``time()`` is virtual."""

    def __init__(self) -> None:
        self.now = 1.7e9

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _Lockstep:
    """Waits until the daemon processed a step and the client holds its decisions."""

    def __init__(self, url: str, job: str, client: Any) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()  # connect() is meant to be a context manager
        self.ws = self._stack.enter_context(connect(url, open_timeout=10))
        self.job = job
        self.client = client

    def wait(self, step: int, timeout: float = 20.0) -> None:
        client = self.client
        deadline = time.monotonic() + timeout
        if not client.flush(timeout):
            raise RuntimeError(f"{self.job}: could not send step {step} within {timeout}s")
        while True:
            self.ws.send(json.dumps({"type": "command", "command": "show", "job": self.job}))
            reply = json.loads(self.ws.recv(timeout))
            if reply.get("type") != "result":
                if reply.get("code") != "unknown_job":
                    raise RuntimeError(f"{self.job}: unexpected reply {reply}")
                job: dict[str, Any] = {"step": None, "decisions": 0}
            else:
                job = reply["data"]["job"]
            if job["step"] is not None and job["step"] >= step:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.job}: the daemon did not reach step {step}")
            time.sleep(0.0002)
        made = int(job["decisions"])
        while client.stats.decisions_received < made:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.job}: decisions did not arrive ({made} made)")
            time.sleep(0.0002)

    def close(self) -> None:
        self._stack.close()


def _finite_params(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def evaluate(task: Task, model: torch.nn.Module) -> tuple[float, float | None]:
    data = data_of(task)
    model.eval()
    with torch.no_grad():
        out = model(data.x_val)
        loss = float(task.loss_fn()(out, data.y_val))
        acc = float((out.argmax(1) == data.y_val).float().mean()) if task.classification else None
    model.train()
    return loss, acc


def run(spec: RunSpec) -> RunResult:
    """Train one run and return its result.

    For ``lrpilot`` the client's clock is the virtual one (see "Lockstep" above) during the
    run only, so that a test process that runs this keeps its real clock afterwards.
    """
    if spec.controller != "lrpilot":
        return _train(spec, None)
    import lrpilot._client as client_module
    import lrpilot.torch as torch_module

    vt = _VirtualTime()
    # the client reads the clock through its ``time`` module and, on report()'s short paths,
    # through ``_now`` (time.time bound at import): both are swapped
    saved = client_module.time, client_module._now, torch_module._now
    client_module.time = vt  # type: ignore[assignment]
    client_module._now = torch_module._now = vt.time
    try:
        return _train(spec, vt)
    finally:
        client_module.time, client_module._now, torch_module._now = saved


def _train(spec: RunSpec, vt: _VirtualTime | None) -> RunResult:
    torch.set_num_threads(1)
    task = TASKS[spec.task]
    data = data_of(task)
    torch.manual_seed(spec.seed)
    model = task.model()
    optimizer = task.make_optimizer(model.parameters(), spec.lr)
    loss_fn = task.loss_fn()
    gen = torch.Generator().manual_seed(10_000 + spec.seed)
    n = len(data.y_train)

    def batches() -> Any:
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n - task.batch_size + 1, task.batch_size):
                yield perm[i : i + task.batch_size]

    stream = batches()
    scheduler: Any = None
    if spec.controller == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    elif spec.controller == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=task.steps)
    elif spec.controller not in ("fixed", "lrpilot"):
        raise ValueError(f"controller: unknown {spec.controller!r}")

    client: Any = None
    lockstep: _Lockstep | None = None
    checkpoints: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    decision_log: list[dict[str, Any]] = []
    if spec.controller == "lrpilot":
        import lrpilot

        assert spec.url is not None
        tag = (spec.label or "lr").replace("/", "div")
        job = f"{spec.task}-{tag}-s{spec.seed}-{int(time.time() * 1e6) % 10**9}"
        client = lrpilot.Client(
            spec.url,
            job=job,
            initial_lr=spec.lr,
            total_steps=task.steps if spec.tell_length else None,
            flush_interval=0.0005,
        )
        if not client.wait_connected(10):
            raise RuntimeError(f"{job}: cannot connect to {spec.url}")
        lockstep = _Lockstep(spec.url, job, client)

        def on_decision(decision: Any, at: int) -> None:
            entry = {
                "step": at,
                "kind": decision.kind.value,
                "source": decision.source,
                "reason": decision.reason,
                "lrs": list(decision.lrs) if decision.lrs else None,
            }
            if decision.kind.value == "rollback":
                to = int(decision.rollback_to_step)
                model_state, opt_state = checkpoints[to]
                model.load_state_dict(model_state)
                optimizer.load_state_dict(opt_state)
                for _ in range(decision.skip_batches):
                    next(stream)
                entry["rollback_to_step"] = to
            decision_log.append(entry)

        client.add_decision_callback(on_decision)

    t0 = time.perf_counter()
    losses: list[float] = []
    lrs: list[float] = []
    eval_steps: list[int] = []
    eval_losses: list[float] = []
    val_loss, val_acc = math.nan, None
    nan_incidents = 0
    in_nan = False
    lost, lost_reason = False, ""
    last_loss = 0.0
    try:
        for step in range(task.steps):
            if client is not None:
                if step % task.checkpoint_every == 0 and math.isfinite(last_loss) and _finite_params(model):
                    checkpoints[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
                    # every checkpoint stays: a rollback may return to one from before the
                    # trouble began, not only to the last one (a few MB for these models)
                    client.checkpoint(step)
                lr = client.lrs_for_step(step)[0]
                if client.halted:
                    lost, lost_reason = True, f"halted: {client.halt_reason}"
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr
            lr_now = float(optimizer.param_groups[0]["lr"])
            idx = next(stream)
            out = model(data.x_train[idx])
            loss = loss_fn(out, data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_loss = loss.item()
            if math.isfinite(last_loss):
                in_nan = False
            elif not in_nan:
                in_nan = True
                nan_incidents += 1
            losses.append(last_loss)
            lrs.append(lr_now)
            metrics: dict[str, float] = {"loss": last_loss}
            last = step == task.steps - 1
            if (step + 1) % task.eval_every == 0 or last:
                val_loss, val_acc = evaluate(task, model)
                eval_steps.append(step)
                eval_losses.append(val_loss)
                metrics["val_loss"] = val_loss
                if val_acc is not None:
                    metrics["val_acc"] = val_acc
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(val_loss)
            if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step()
            if client is not None:
                assert vt is not None and lockstep is not None
                vt.now = 1.7e9 + step * STEP_SECONDS
                client.report(step, epoch=step // task.eval_every, **metrics)
                lockstep.wait(step)
            elif not math.isfinite(last_loss) and not _finite_params(model):
                lost, lost_reason = True, f"non-finite weights at step {step}"
                break
    finally:
        if lockstep is not None:
            lockstep.close()
        if client is not None:
            client.close()
    if not lost and not math.isfinite(val_loss):
        lost, lost_reason = True, "final validation loss is not finite"
    decisions: dict[str, int] = {}
    for entry in decision_log:
        key = f"{entry['kind']}:{entry['source']}"
        decisions[key] = decisions.get(key, 0) + 1
    finite_evals = [v for v in eval_losses if math.isfinite(v)]
    return RunResult(
        task=spec.task,
        controller=spec.controller,
        lr=spec.lr,
        seed=spec.seed,
        label=spec.label,
        final_val_loss=val_loss if not lost else math.inf,
        final_val_acc=val_acc if not lost else None,
        best_val_loss=min(finite_evals) if finite_evals else math.inf,
        lost=lost,
        lost_reason=lost_reason,
        nan_incidents=nan_incidents,
        decisions=decisions,
        final_lr=float(optimizer.param_groups[0]["lr"]),
        seconds=time.perf_counter() - t0,
        eval_steps=eval_steps,
        eval_losses=eval_losses,
        loss=losses if spec.keep_history else [],
        lrs=lrs if spec.keep_history else [],
        decision_log=decision_log,
    )


def run_dict(spec: RunSpec) -> dict[str, Any]:
    """:func:`run` for a process pool: plain dicts out."""
    return run(spec).to_dict()


__all__ = ["STEP_SECONDS", "RunResult", "RunSpec", "run", "run_dict"]
