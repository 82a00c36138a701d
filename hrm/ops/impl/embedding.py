"""Token embedding with the model's input scale: ``out_t = scale * W[ids_t]``.

The gradient of the table is dense, as ``nn.Embedding`` gives it:
``dW_i = scale * sum_{t : ids_t = i} dout_t`` (rows of tokens that do not occur are 0).

Backends: ``torch`` (the reference: ``F.embedding``, then the scale) and ``cpu`` (the same
forward; the backward is one ``index_add_`` of the scaled output gradient into zeros, which
runs in token order, so it is deterministic, and ~7x faster than the reference's backward on
this project's CPU at a 32K vocabulary). Other backends use the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops.dispatch import get_impl, register


@register("embedding", "torch")
def embedding_reference(ids: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    """``ids`` (any shape, int) into ``weight [V, d]``; returns ``[*ids.shape, d]``."""
    return F.embedding(ids, weight) * scale


class _EmbeddingIndexAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.scale, ctx.num_rows = scale, weight.shape[0]
        return weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[1]) * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        (ids,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        dw = rows.new_zeros(ctx.num_rows, rows.shape[1])
        return None, dw.index_add_(0, ids.reshape(-1), rows, alpha=ctx.scale), None


@register("embedding", "cpu")
def embedding_cpu(ids: Tensor, weight: Tensor, scale: float = 1.0) -> Tensor:
    return _EmbeddingIndexAdd.apply(ids, weight, scale)


def embedding(ids: Tensor, weight: Tensor, scale: float = 1.0, *, backend: str | None = None) -> Tensor:
    """``scale * weight[ids]``: rows of the table ``weight [V, d]`` for the integer ``ids``."""
    return get_impl("embedding", backend)(ids, weight, scale)


__all__ = ["embedding"]
