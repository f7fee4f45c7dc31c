"""What the framework integrations share: making the client and driving torch param groups.

Nothing here imports a framework: torch optimizers are used through their ``param_groups``
(a list of dicts with ``lr`` and, depending on the optimizer, ``momentum`` or ``betas``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._client import Client
from ._decisions import Decision, DecisionKind, Halted

log = logging.getLogger("lrpilot")

RollbackHook = Callable[[int, int], None]


def make_client(
    client_or_url: Client | str,
    job: str | None,
    initial_lrs: Sequence[float],
    initial_momentums: Sequence[float] | None,
    client_kwargs: Mapping[str, Any],
) -> tuple[Client, bool]:
    """The client to use and whether the integration owns it (and closes it)."""
    if isinstance(client_or_url, Client):
        if job is not None and job != client_or_url.job:
            raise ValueError(
                f"job: {job!r} differs from the given client's job {client_or_url.job!r}"
            )
        return client_or_url, False
    if job is None:
        raise ValueError("job: required when a URL is given instead of a Client")
    return (
        Client(
            client_or_url,
            job,
            list(initial_lrs),
            initial_momentum=None if initial_momentums is None else list(initial_momentums),
            **client_kwargs,
        ),
        True,
    )


def ddp_rank_and_world_size() -> tuple[int, int] | None:
    """(rank, world_size) of an initialized torch.distributed process group, else None."""
    import sys

    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def group_momentum(group: Mapping[str, Any]) -> float | None:
    """SGD/RMSprop ``momentum`` or Adam-family ``betas[0]`` of a param group, if it has one."""
    if "betas" in group:
        return float(group["betas"][0])
    if "momentum" in group:
        return float(group["momentum"])
    return None


def _set_value(group: dict[str, Any], key: str, value: float) -> None:
    current = group[key]
    if hasattr(current, "fill_"):  # a tensor LR (capturable optimizers): keep the tensor
        current.fill_(value)
    else:
        group[key] = value


class ParamGroupDriver:
    """Sets lrpilot's LR (and momentum) on the param groups of one or more torch optimizers.

    Groups are numbered across optimizers in order. Before each write it checks that the
    group still holds the value written last; if not, something else changed it, which is
    reported through :meth:`Client.external_lr_change` (when ``detect_external``).

    ``optimizer.load_state_dict()`` (what a rollback hook calls to reload a checkpoint)
    replaces an optimizer's ``param_groups`` with new dicts, so the driver notices a new
    ``param_groups`` list and writes to the groups the optimizer holds now.
    """

    def __init__(
        self, client: Client, optimizers: Sequence[Any], detect_external: bool = True
    ) -> None:
        self.client = client
        self._state = client._state  # read directly on the hot path: one step, one call
        self.optimizers = list(optimizers)
        self._group_lists: list[Any] = []
        self.groups: list[dict[str, Any]] = []
        self._refresh_groups()
        self.detect_external = detect_external
        self._written: list[float | None] = [None] * len(self.groups)
        # what the last full apply saw and wrote, for apply's short cut (None: take the full path)
        self._checks: list[tuple[dict[str, Any], str, Any]] | None = None
        # the same for one optimizer with one group: (optimizer, its param_groups, the group,
        # the LR written, the momentum's key and value, or "lr" and the LR again, and the
        # state's LR and momentum lists seen), in one tuple: the fewer objects the short cut
        # reads, the less it costs right after the framework's step has refilled the caches
        self._single: tuple[Any, Any, dict[str, Any], Any, str, Any, Any, Any] | None = None
        self._lrs_seen: list[float] | None = None
        self._momentums_seen: list[float] | None = None
        self._applied: list[float] = []
        self._rollback_hooks: list[RollbackHook] = []
        client.add_decision_callback(self._on_decision)
        # A client made for one LR drives several groups by keeping their initial ratios
        # (e.g. the HF Trainer's decay / no-decay groups that share one LR).
        self._ratios: list[float] | None = None
        if client.n_groups == 1 and len(self.groups) > 1:
            first = float(self.groups[0]["lr"]) or 1.0
            self._ratios = [float(g["lr"]) / first for g in self.groups]
        elif len(self.groups) != client.n_groups:
            raise ValueError(
                f"the optimizer(s) have {len(self.groups)} param groups but the client was made "
                f"for {client.n_groups}"
            )

    def _refresh_groups(self) -> None:
        self._group_lists = [opt.param_groups for opt in self.optimizers]
        self._pairs = list(zip(self.optimizers, self._group_lists, strict=True))
        self.groups = [g for groups in self._group_lists for g in groups]

    def _groups_replaced(self) -> bool:
        for opt, groups in self._pairs:  # noqa: SIM110 (once per step: a loop beats any() + genexpr)
            if opt.param_groups is not groups:
                return True
        return False

    @staticmethod
    def initial(optimizers: Sequence[Any]) -> tuple[list[float], list[float] | None]:
        groups = [g for opt in optimizers for g in opt.param_groups]
        lrs = [float(g["lr"]) for g in groups]
        momentums = [group_momentum(g) for g in groups]
        return lrs, None if any(m is None for m in momentums) else momentums  # type: ignore[return-value]

    def on_rollback(self, hook: RollbackHook) -> None:
        self._rollback_hooks.append(hook)

    def _on_decision(self, decision: Decision, step: int) -> None:
        if decision.kind is not DecisionKind.ROLLBACK:
            return
        if not self._rollback_hooks:
            log.warning(
                "lrpilot: rollback to step %s requested but no on_rollback hook is registered; "
                "only the new learning rate is applied",
                decision.rollback_to_step,
            )
            return
        for hook in self._rollback_hooks:
            hook(int(decision.rollback_to_step or 0), decision.skip_batches)
        # the checkpoint's LRs are not a foreign write: lrpilot writes the decision's next
        self._written = [None] * len(self._written)

    def apply(self, step: int) -> list[float]:
        """Write the LR (and momentum) for ``step`` into the param groups; raise Halted if halted.

        Once per training step. The common step changes nothing: no decision is due, no
        schedule segment runs, lrpilot's LRs are the list it applied last time, and every
        group still holds the very objects written then (``is``: a foreign write, even of an
        equal value, or a reloaded optimizer takes the full path, which checks and reports).
        Only then it returns at once, without evaluating or writing anything.
        """
        state = self._state
        single = self._single
        if single is not None:  # one optimizer with one group: the checks without loops
            optimizer, groups, group, lr, key, value, lrs_seen, momentums_seen = single
            pending = state._pending
            if (
                state._lrs is lrs_seen
                and state._momentums is momentums_seen
                and state._segment is None
                and (not pending or pending[0][0] > step)
                and optimizer.param_groups is groups
                and group["lr"] is lr
                and group[key] is value
                and not state.halted  # else the full path raises Halted
            ):
                return [lr]
            return self._apply(step)
        checks = self._checks
        if (
            checks is not None
            and state._lrs is self._lrs_seen
            and state._momentums is self._momentums_seen
            and state._segment is None
            and not state.halted
        ):
            pending = state._pending
            if not pending or pending[0][0] > step:
                for opt, groups in self._pairs:
                    if opt.param_groups is not groups:
                        break
                else:
                    for group, key, value in checks:
                        if group[key] is not value:
                            break
                    else:
                        return list(self._applied)
        return self._apply(step)

    def _apply(self, step: int) -> list[float]:
        """:meth:`apply` when something may have changed: evaluate, check, write."""
        self._checks = self._single = None  # until this write is complete
        state = self._state
        lrs = state.lrs_for_step(step)
        if self._groups_replaced():
            self._refresh_groups()
            if len(self.groups) != len(self._written):
                raise ValueError(
                    f"the optimizer(s) now have {len(self.groups)} param groups, not {len(self._written)}"
                )
        momentums: list[float] | None = state._momentums  # read only: no copy
        seen = (state._lrs, momentums)
        if self._ratios is not None:
            lrs = [lrs[0] * r for r in self._ratios]
            if momentums is not None:
                momentums = [momentums[0]] * len(self._ratios)
        written_lrs = self._written
        checks: list[tuple[dict[str, Any], str, Any]] | None = []
        for i, group in enumerate(self.groups):
            lr = lrs[i]
            current = group["lr"]
            written = written_lrs[i]
            # a float LR that is still the one lrpilot wrote and does not change: nothing to
            # check or write
            if not (current.__class__ is float and current == written == lr):
                if self.detect_external and written is not None:
                    found = float(current)
                    if not math.isclose(found, written, rel_tol=1e-9, abs_tol=0.0):
                        self.client.external_lr_change(step, i, written, found)
                _set_value(group, "lr", lr)
                written_lrs[i] = lr
            current = group["lr"]
            if checks is not None and current.__class__ is float:
                checks.append((group, "lr", current))
            else:  # a tensor LR can change in place: no short cut
                checks = None
            if momentums is not None:
                momentum = momentums[i]
                if "betas" in group:
                    betas = group["betas"]
                    if betas[0] != momentum:
                        group["betas"] = (momentum, *tuple(betas)[1:])
                    key = "betas"
                elif "momentum" in group:
                    if group["momentum"] != momentum:
                        group["momentum"] = momentum
                    key = "momentum"
                else:
                    continue
                if checks is not None:
                    checks.append((group, key, group[key]))
        if state.halted:
            raise Halted(state.halt_reason or "halted by lrpilot")
        self._checks = checks
        if checks is not None and len(self._pairs) == 1 and len(self.groups) == 1:
            (group, _, lr), *others = checks
            key, value = (others[0][1], others[0][2]) if others else ("lr", lr)
            optimizer, groups = self._pairs[0]
            self._single = (optimizer, groups, group, lr, key, value, *seen)
        self._lrs_seen, self._momentums_seen = seen
        self._applied = lrs
        return list(lrs)
