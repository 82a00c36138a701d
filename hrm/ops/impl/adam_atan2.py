"""One Adam-atan2 step, in place, on lists of tensors (the optimizer's update; see
:class:`hrm.training.optim.AdamAtan2`).

For each parameter ``p`` with gradient ``g``, moments ``m``, ``v`` and its own step count
``t`` (from 1)::

    m = lerp(m, g, 1 - b1)  = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    p = p * (1 - lr * wd)                                      (decoupled weight decay)
    p = p - lr * atan2(m / (1 - b1**t), sqrt(v / (1 - b2**t)))

The update is bounded by ``pi/2`` per element and invariant to the gradient's scale, so
there is no epsilon. Given ``grad_scale`` (a 0-d tensor, e.g. the gradient clipping's factor),
the step reads ``grad_scale * g`` for ``g``: the clipping's multiply fused into the step's own
read of the gradient, the gradients themselves left as they are. Given ``ema_avgs`` (a
parameter EMA, :class:`hrm.training.optim.EMA`), the same pass also moves each average toward
its new parameter::

    e = lerp(e, p, ema_weight) = (1 - ema_weight) * e + ema_weight * p

Backends:

- ``torch``: the reference, multi-tensor ``torch._foreach_*`` (eight passes over memory
  and one ``atan2`` per tensor: torch has no foreach atan2; a ``grad_scale`` one more).
- ``cpu``: ``csrc/optim/adam_atan2_cpu.cpp``, one C++ pass per fp32 contiguous CPU tensor
  (the EMA in the same pass; atan2 from Cephes' atanf, about 1 ulp); other tensors run on
  ``compile``.
- ``compile``: one fused inductor kernel per tensor (read ``p, g, m, v``; write ``p, m, v``;
  with an EMA also read and write ``e``, while the new ``p`` is still in registers).
  It compiles ONE graph for every tensor and every step: each tensor goes in flattened to
  1-d with its length marked dynamic (and size-oblivious, so that 1-element tensors do not
  specialise), and the per-step scalars (``lr``, the bias corrections, ...) go in as a
  tensor, so that dynamo never specialises on their values.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.common import compiled, compute_dtype
from hrm.ops.dispatch import fallback_impl, get_impl, register


def adam_atan2_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
) -> None:
    """One Adam-atan2 step on one tensor, in place (``step`` counts from 1): the module
    docstring's formula written per tensor, for reading and for the tests."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    param.mul_(1 - lr * weight_decay)
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    param.add_(torch.atan2(m_hat, v_hat.sqrt()), alpha=-lr)


@register("adam_atan2", "torch")
def adam_atan2_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    ema_avgs: list[Tensor] | None = None,
    ema_weight: float = 0.0,
    grad_scale: Tensor | None = None,
) -> None:
    """:func:`adam_atan2_reference` on every tensor at once, with ``torch._foreach_*``, on the
    gradients times ``grad_scale`` (new tensors); then the EMA's ``lerp`` toward the new parameters."""
    beta1, beta2 = betas
    if grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    m_hat = torch._foreach_div(exp_avgs, [1 - beta1**s for s in steps])
    denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**s for s in steps])
    torch._foreach_sqrt_(denom)
    updates = [torch.atan2(m, d) for m, d in zip(m_hat, denom)]  # torch has no foreach atan2
    torch._foreach_add_(params, updates, alpha=-lr)
    if ema_avgs is not None:
        torch._foreach_lerp_(ema_avgs, params, ema_weight)


# -- compile backend -----------------------------------------------------------------------
def _step_scalars(
    step: int, lr: float, betas: tuple[float, float], weight_decay: float, ema_weight: float | None
) -> list[float]:
    """The per-step numbers of the fused steps (compile, cpu): ``[1-b1, b2, 1-b2, 1-lr*wd, lr,
    1-b1**t, 1-b2**t]``, then ``ema_weight`` when there is an EMA (not ``None``)."""
    beta1, beta2 = betas
    values = [1 - beta1, beta2, 1 - beta2, 1 - lr * weight_decay, lr, 1 - beta1**step, 1 - beta2**step]
    return values if ema_weight is None else [*values, ema_weight]


def _adam_atan2_math(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scalars: Tensor, grad_scale: Tensor) -> None:
    """The step on 1-d ``p, g, m, v`` (same length), in place, on ``grad_scale * g``. ``scalars``
    holds the per-step numbers ``[1-b1, b2, 1-b2, 1-lr*wd, lr, 1-b1**t, 1-b2**t]`` (in the math's
    dtype, on the parameter's device), ``grad_scale`` is 0-d: both change between steps as data,
    which dynamo does not guard on."""
    w1, b2, w2, decay, lr, bc1, bc2 = scalars[:7].unbind(0)
    dt = scalars.dtype
    g = g.to(dt) * grad_scale.to(dt)
    m_new = torch.lerp(m.to(dt), g, w1)
    v_new = v.to(dt) * b2 + w2 * g * g
    p_new = p.to(dt) * decay - lr * torch.atan2(m_new / bc1, torch.sqrt(v_new / bc2))
    p.copy_(p_new)
    m.copy_(m_new)
    v.copy_(v_new)


def _adam_atan2_ema_math(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, e: Tensor, scalars: Tensor, grad_scale: Tensor
) -> None:
    """:func:`_adam_atan2_math`, then the EMA ``e`` moved toward the new ``p`` (as stored, as the
    torch backend does) by ``scalars[7]``; traced as one graph, so one kernel."""
    _adam_atan2_math(p, g, m, v, scalars, grad_scale)
    e.copy_(torch.lerp(e.to(scalars.dtype), p.to(scalars.dtype), scalars[7]))


_adam_atan2_compiled = compiled(_adam_atan2_math)
_adam_atan2_ema_compiled = compiled(_adam_atan2_ema_math)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a new CPU tensor) on ``device`` without a host sync: on a GPU through pinned memory,
    copied asynchronously (a pageable copy would wait for the device)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _flat(t: Tensor) -> Tensor:
    """``t`` as a 1-d tensor sharing its memory (the caller copies back where it cannot)."""
    flat = t.detach().view(-1) if t.is_contiguous() else t.detach().contiguous().view(-1)
    torch._dynamo.mark_dynamic(flat, 0)  # imported on first use: the CLI starts without dynamo
    return flat


@register("adam_atan2", "compile")
def adam_atan2_compile(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    ema_avgs: list[Tensor] | None = None,
    ema_weight: float = 0.0,
    grad_scale: Tensor | None = None,
) -> None:
    averages = ema_avgs if ema_avgs is not None else [None] * len(params)
    scalars: dict[tuple, Tensor] = {}  # one small tensor per (step, device, dtype): usually one per call
    scales: dict[torch.device, Tensor] = {}  # grad_scale (or 1) on each parameter's device
    # Size-oblivious: a dynamic length of 1 stays symbolic instead of compiling its own graph.
    with fx_config.patch(backed_size_oblivious=True):
        for p, g, m, v, e, step in zip(params, grads, exp_avgs, exp_avg_sqs, averages, steps):
            if p.numel() == 0:
                continue
            dt = compute_dtype(p.dtype)
            key = (step, p.device, dt)
            if key not in scalars:
                values = _step_scalars(step, lr, betas, weight_decay, ema_weight if e is not None else None)
                scalars[key] = _to_device(torch.tensor(values, dtype=dt), p.device)
            if p.device not in scales:
                scales[p.device] = (
                    _to_device(torch.ones((), dtype=torch.float32), p.device)
                    if grad_scale is None
                    else grad_scale.to(p.device, torch.float32)
                )
            written = (p, m, v) if e is None else (p, m, v, e)
            flat = [_flat(t) for t in (p, g, *written[1:])]
            if e is None:
                _adam_atan2_compiled(*flat, scalars[key], scales[p.device])
            else:
                _adam_atan2_ema_compiled(*flat, scalars[key], scales[p.device])
            for t, f in zip(written, (flat[0], *flat[2:])):
                if f.data_ptr() != t.data_ptr():  # a non-contiguous tensor went in as a copy
                    t.copy_(f.view_as(t))


# -- cpu backend: csrc/optim/adam_atan2_cpu.cpp -------------------------------------------------


def _cpu_kernel_takes(*tensors: Tensor | None) -> bool:
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
    )


@register("adam_atan2", "cpu")
def adam_atan2_cpu(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    ema_avgs: list[Tensor] | None = None,
    ema_weight: float = 0.0,
    grad_scale: Tensor | None = None,
) -> None:
    """The C++ step, one call per fp32 contiguous CPU parameter (one pass over its memory, the
    EMA and ``grad_scale`` in the same pass); other tensors take the fallback's step."""
    cpp_extension.load()  # built on first use, then a cached no-op
    averages = ema_avgs if ema_avgs is not None else [None] * len(params)
    scale = None if grad_scale is None else grad_scale.to("cpu", torch.float32).reshape(())
    others = []
    for i, (p, g, m, v, e, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, averages, steps)):
        if not _cpu_kernel_takes(p, g, m, v, e):
            others.append(i)
            continue
        scalars = _step_scalars(step, lr, betas, weight_decay, ema_weight if e is not None else None)
        torch.ops.hrm_opt.adam_atan2_step(p, g, m, v, e, scale, scalars)
    if others:
        fallback_impl("adam_atan2", "cpu")(
            *([seq[i] for i in others] for seq in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            ema_avgs=None if ema_avgs is None else [ema_avgs[i] for i in others],
            ema_weight=ema_weight,
            grad_scale=grad_scale,
        )


def adam_atan2_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    backend: str | None = None,
    ema_avgs: Sequence[Tensor] | None = None,
    ema_weight: float = 0.0,
    grad_scale: Tensor | None = None,
) -> None:
    """One Adam-atan2 step on each ``params[i]`` in place, updating ``exp_avgs[i]`` and
    ``exp_avg_sqs[i]``; ``steps[i]`` is that parameter's step count including this step (from
    1), for its bias corrections. Gradients are read only: with ``grad_scale`` (a 0-d tensor,
    read where the step runs, never on the host) the step takes ``grad_scale * grads[i]``.
    With ``ema_avgs``, each ``ema_avgs[i]`` then moves toward the new ``params[i]`` by
    ``ema_weight`` in the same pass. The formula is the module's."""
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps)):
        raise ValueError("adam_atan2_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length")
    if ema_avgs is not None and len(ema_avgs) != len(params):
        raise ValueError("adam_atan2_: ema_avgs must have one average per parameter")
    if grad_scale is not None and grad_scale.numel() != 1:
        raise ValueError(f"adam_atan2_: grad_scale must be a one-element tensor, got shape {tuple(grad_scale.shape)}")
    if not params:
        return
    with torch.no_grad():
        get_impl("adam_atan2", backend)(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            [int(s) for s in steps],
            lr=float(lr),
            betas=(float(betas[0]), float(betas[1])),
            weight_decay=float(weight_decay),
            ema_avgs=None if ema_avgs is None else list(ema_avgs),
            ema_weight=float(ema_weight),
            grad_scale=grad_scale,
        )


__all__ = ["adam_atan2_", "adam_atan2_reference"]
