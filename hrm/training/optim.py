"""Optimizer, parameter EMA and learning-rate schedule (docs/design.md, "Optimizer").

* :class:`AdamAtan2`: Adam whose update is ``atan2(m_hat, sqrt(v_hat))`` -- bounded by
  ``pi/2`` per element and scale invariant, so it needs no epsilon -- with decoupled weight
  decay. The step is the op :func:`hrm.ops.adam_atan2_` (multi-tensor ``torch`` reference,
  fused ``compile`` backend); :func:`adam_atan2_reference` is the same step written per
  tensor, for reading and for the tests.
* :class:`EMA`: an exponential moving average of a model's parameters (and a copy of its
  buffers), in ``model.state_dict()`` key order so it saves as ``ema.safetensors``.
* :func:`lr_at`: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

Both are elementwise, so under FSDP2 (parameters, gradients, optimizer state and EMA are
DTensors sharded over the ranks) they run on each rank's local shard and compute exactly
what one process computes on the whole tensor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from hrm.ops.dispatch import resolve_backend
from hrm.ops.impl.adam_atan2 import adam_atan2_, adam_atan2_reference


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the DTensor); other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (``dim >= 2``: projections, embedding, LM head); never 1-d tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class AdamAtan2(torch.optim.Optimizer):
    """Adam-atan2 with decoupled weight decay: one :func:`hrm.ops.adam_atan2_` call per
    parameter group, on ``backend`` (``torch``: the multi-tensor reference; ``cpu``: one C++
    pass per tensor; ``compile``: one fused kernel per tensor; ``auto`` resolves as the
    model's backend does, and backends
    without the op fall back as :func:`hrm.ops.dispatch.get_impl` says).

    The math is :func:`adam_atan2_reference`'s. State per parameter: ``step`` (its own count,
    for the bias corrections), ``exp_avg``, ``exp_avg_sq``; the backend is not part of the
    state dict, so a checkpoint resumes on any backend. Parameters without a gradient are
    left alone, state included. DTensor parameters (FSDP2) are stepped on their local shards.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        *,
        backend: str | None = "torch",
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.backend = resolve_backend(backend)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None, *, ema: EMA | None = None, grad_scale: torch.Tensor | None = None):
        """One update of every parameter with a gradient. With ``ema``, also its update
        (:meth:`EMA.update`): the averages of the stepped parameters move in the optimizer's own
        pass over them (one read of each new parameter fewer), the rest in ``ema.update``. With
        ``grad_scale`` (a one-element tensor on the parameters' device, e.g. the factor of
        :func:`hrm.training.loop.clip_grad_norm`) the update takes ``grad_scale * p.grad``, in
        the same pass; the gradients are not changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weight = 0.0 if ema is None else 1.0 - ema.current_decay()
        stepped: list[torch.Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = []
            for p in params:
                state = self._state_of(p)
                state["step"] += 1
                states.append(state)
            adam_atan2_(
                [local(p) for p in params],
                [local(p.grad) for p in params],
                [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states],
                [s["step"] for s in states],
                lr=group["lr"],
                betas=group["betas"],
                weight_decay=group["weight_decay"],
                backend=self.backend,
                ema_avgs=None if ema is None else [local(ema.average_of(p)) for p in params],
                ema_weight=weight,
                grad_scale=grad_scale,
            )
            stepped += params
        if ema is not None:
            ema.update(skip=stepped)
        return loss

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        return state

    def init_state(self) -> None:
        """Give every parameter its (zero) state now rather than at its first gradient, so that
        the state dict has the same entries at every step (a sharded checkpoint is loaded into
        the structure of the live state dict). Changes no update: a parameter's ``step`` still
        counts only the steps it had a gradient in."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p)


class EMA:
    """Exponential moving average of ``model``'s parameters; buffers are copied as they are.

    ``update()`` after each optimizer step does ``shadow = d * shadow + (1 - d) * param`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the ``n``-th update: the warmup keeps a short run
    from averaging in its random initialisation (with ``decay = 0.9999`` a full-strength
    average needs tens of thousands of steps). :meth:`state_dict` has the model's keys in the
    model's order; :meth:`swapped` puts the average into the model for evaluation or export.
    For an FSDP2 model the averages are DTensors sharded like the parameters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.model = model
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        param_names = {name for name, _ in model.named_parameters()}
        self._param_keys = [k for k in self.shadow if k in param_names]
        self._buffer_keys = [k for k in self.shadow if k not in param_names]
        self._names = {id(p): name for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def average_of(self, param: torch.Tensor) -> torch.Tensor:
        """The average of one of the model's parameters."""
        if id(param) not in self._names:  # parameters replaced since (e.g. sharded)
            self._names = {id(p): name for name, p in self.model.named_parameters()}
        return self.shadow[self._names[id(param)]]

    @torch.no_grad()
    def update(self, skip: Iterable[torch.Tensor] = ()) -> None:
        """One update; the averages of the parameters in ``skip`` are taken as moved already
        (:meth:`AdamAtan2.step` with ``ema`` moves those of the parameters it steps)."""
        weight = 1.0 - self.current_decay()
        state = self.model.state_dict()
        done = {id(p) for p in skip}
        moved = {name for name, p in self.model.named_parameters() if id(p) in done}
        keys = [k for k in self._param_keys if k not in moved]
        if keys:
            torch._foreach_lerp_([local(self.shadow[k]) for k in keys], [local(state[k]) for k in keys], weight)
        for k in self._buffer_keys:
            local(self.shadow[k]).copy_(local(state[k]))
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """``state`` holds full tensors, or DTensors sharded like the averages; a full tensor is
        sharded here for a DTensor average (a collective: every rank calls this)."""
        for k, v in self.shadow.items():
            new = state[k]
            if isinstance(v, DTensor) and not isinstance(new, DTensor):
                new = distribute_tensor(new.to(v.device), v.device_mesh, v.placements)
            local(v).copy_(local(new))
        self.num_updates = num_updates

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The averages as whole tensors (DTensors are gathered: a collective, every rank calls this)."""
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.shadow.items()}

    @contextlib.contextmanager
    def swapped(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Within the block, ``model`` (default: the tracked one) holds the averaged weights."""
        model = model if model is not None else self.model
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for 0-based ``step``: ``lr * step / warmup_steps`` during warmup, then
    ``lr * (r + (1 - r) * (1 + cos(pi * progress)) / 2)`` with ``r = min_lr_ratio`` and
    ``progress`` going from 0 at the end of warmup to 1 at ``total_steps``."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


__all__ = ["AdamAtan2", "EMA", "adam_atan2_reference", "local", "lr_at", "param_groups"]
