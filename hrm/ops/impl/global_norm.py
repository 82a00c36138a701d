"""The global L2 norm of a list of tensors, ``sqrt(sum_i ||x_i||^2)``: gradient clipping's norm
(:func:`hrm.training.loop.clip_grad_norm`), fp32 0-d, on the tensors' device, never read back.

Backends: ``torch`` (the reference: ``torch.nn.utils.get_total_norm``, one norm per tensor,
then the norm of the norms; DTensors are reduced across ranks) and ``cpu``
(``hrm_opt::global_norm`` in ``csrc/optim/adam_atan2_cpu.cpp`` for plain fp32 contiguous CPU
tensors: one pass over all of them on the thread pool, squares summed in fp32 over short
blocks and in fp64 beyond, in a fixed order, so the thread count changes no bit; torch's
per-tensor norms run one thread each and cost a setup per tensor). Other inputs take the
reference. Other backends use the reference.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.dispatch import get_impl, register
from hrm.ops.impl.adam_atan2 import _cpu_kernel_takes


@register("global_norm", "torch")
def global_norm_reference(tensors: list[Tensor]) -> Tensor:
    return torch.nn.utils.get_total_norm(tensors)


@register("global_norm", "cpu")
def global_norm_cpu(tensors: list[Tensor]) -> Tensor:
    """The C++ pass where every tensor is a plain fp32 contiguous CPU tensor (not a DTensor),
    else the reference."""
    if not tensors or not (all(type(t) is torch.Tensor for t in tensors) and _cpu_kernel_takes(*tensors)):
        return global_norm_reference(tensors)
    cpp_extension.load()  # built on first use, then a cached no-op
    return torch.ops.hrm_opt.global_norm([t.detach() for t in tensors])


def global_norm(tensors: Sequence[Tensor], *, backend: str | None = None) -> Tensor:
    """``sqrt(sum of squares)`` over every element of ``tensors`` (fp32 0-d, on their device;
    DTensors: over the whole tensors)."""
    return get_impl("global_norm", backend)(list(tensors))


__all__ = ["global_norm"]
