"""Token embedding with the model's input scale: ``out_t = scale * W[ids_t]``.

The gradient of the table is dense, as ``nn.Embedding`` gives it:
``dW_i = scale * sum_{t : ids_t = i} dout_t`` (rows of tokens that do not occur are 0).

Backends: ``torch`` (the reference: ``F.embedding``, then the scale) and ``cpu``. On a CPU
tensor of fp32 or bf16, ``cpu`` runs two kernels of ``csrc/elementwise``:
``hrm_ew::embedding_fwd`` gathers and scales the rows in one pass (the reference makes two),
and ``hrm_ew::embedding_bwd`` writes the table's gradient once, row by row, the rows of
tokens that do not occur as streaming zeros, where zeros plus an ``index_add_`` made two
passes of the table's size. The backward sums each row's tokens in token order, so it is
deterministic. For other dtypes, or where the C++ kernels cannot be built, the reference's
forward and that ``index_add_``.
Other backends use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.common import CPU_KERNEL_DTYPES
from hrm.ops.dispatch import get_impl, register, unavailable_reason


@register("embedding", "torch")
def embedding_reference(ids: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    """``ids`` (any shape, int) into ``weight [V, d]``; returns ``[*ids.shape, d]``."""
    return F.embedding(ids, weight) * scale


class _EmbeddingIndexAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.scale, ctx.num_rows, ctx.dtype = scale, weight.shape[0], weight.dtype
        if weight.device.type == "cpu" and weight.dtype in CPU_KERNEL_DTYPES:
            return _embedding_forward_cpu(ids, weight, scale)
        return embedding_reference(ids, weight, scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        (ids,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        if rows.device.type == "cpu" and rows.dtype in CPU_KERNEL_DTYPES:
            dw = _embedding_backward_cpu(ids.reshape(-1), rows, ctx.num_rows, ctx.scale)
            return None, dw.to(ctx.dtype), None
        dw = rows.new_zeros(ctx.num_rows, rows.shape[1])
        return None, dw.index_add_(0, ids.reshape(-1), rows, alpha=ctx.scale), None


@torch.library.custom_op("hrm::embedding_cpu_forward", mutates_args=())
def _embedding_forward_cpu(ids: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * weight[ids]`` in ``weight``'s dtype (opaque to ``torch.compile``):
    ``hrm_ew::embedding_fwd`` where the C++ kernels can be built, else the reference's
    gather then multiply (the same bits)."""
    if unavailable_reason("cpu") is None:
        cpp_extension.load()
        return torch.ops.hrm_ew.embedding_fwd(ids, weight, scale)
    return embedding_reference(ids, weight, scale)


@_embedding_forward_cpu.register_fake
def _(ids, weight, scale):
    return weight.new_empty(*ids.shape, weight.shape[1])


@torch.library.custom_op("hrm::embedding_cpu_backward", mutates_args=())
def _embedding_backward_cpu(ids: Tensor, rows: Tensor, num_rows: int, scale: float) -> Tensor:
    """The table's gradient in fp32 (opaque to ``torch.compile``): ``hrm_ew::embedding_bwd``
    where the C++ kernels can be built, else zeros plus ``index_add_`` (the same bits)."""
    if unavailable_reason("cpu") is None:
        cpp_extension.load()  # built on first use, then a cached no-op
        return torch.ops.hrm_ew.embedding_bwd(ids, rows, num_rows, scale)
    return rows.new_zeros(num_rows, rows.shape[1], dtype=torch.float32).index_add_(0, ids, rows.float(), alpha=scale)


@_embedding_backward_cpu.register_fake
def _(ids, rows, num_rows, scale):
    return rows.new_empty(num_rows, rows.shape[1], dtype=torch.float32)


@register("embedding", "cpu")
def embedding_cpu(ids: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    return _EmbeddingIndexAdd.apply(ids, weight, scale)


def embedding(ids: Tensor, weight: Tensor, scale: float = 1.0, *, backend: str | None = None) -> Tensor:
    """``scale * weight[ids]``: rows of the table ``weight [V, d]`` for the integer ``ids``."""
    return get_impl("embedding", backend)(ids, weight, scale)


__all__ = ["embedding"]
