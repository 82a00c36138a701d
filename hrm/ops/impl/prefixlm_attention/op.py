"""The PrefixLM attention op: the ``cpu`` and ``triton`` backends as ``torch.library`` custom
ops with autograd, and the public function.

Both fused backends run through ``hrm::prefixlm_attention_fwd`` / ``hrm::prefixlm_attention_bwd``,
which take the packing's index tensors (never ``cu_seqlens`` itself, so nothing is derived
or read back per call), save the fp32 log-sum-exp and recompute the probabilities in the
backward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hrm.errors import HrmError
from hrm.ops.dispatch import get_impl, register
from hrm.ops.impl.prefixlm_attention.cpu import prefixlm_attention_cpu_backward, prefixlm_attention_cpu_forward
from hrm.ops.impl.prefixlm_attention.packing import AttentionPacking
from hrm.ops.impl.prefixlm_attention.triton_kernels import (
    device_config,
    kernel_config,
    prefixlm_attention_triton_backward,
    prefixlm_attention_triton_forward,
)


@torch.library.custom_op("hrm::prefixlm_attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_lo: Tensor,
    row_hi: Tensor,
    col_lo: Tensor,
    col_hi: Tensor,
    fwd_ranges: Optional[Tensor],
    dq_ranges: Optional[Tensor],
    dkdv_ranges: Optional[Tensor],
    gate: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "triton":
        return prefixlm_attention_triton_forward(q, k, v, row_lo, row_hi, gate, ranges=fwd_ranges)
    return prefixlm_attention_cpu_forward(q, k, v, row_lo, row_hi, gate)


@_attention_fwd_op.register_fake
def _(q, k, v, row_lo, row_hi, col_lo, col_hi, fwd_ranges, dq_ranges, dkdv_ranges, gate, backend):
    T, H, D = q.shape
    return q.new_empty(T, H, D), q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("hrm::prefixlm_attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    row_lo: Tensor,
    row_hi: Tensor,
    col_lo: Tensor,
    col_hi: Tensor,
    dq_ranges: Optional[Tensor],
    dkdv_ranges: Optional[Tensor],
    gate: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        return prefixlm_attention_triton_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            row_lo,
            row_hi,
            col_lo,
            col_hi,
            gate,
            dq_ranges=dq_ranges,
            dkdv_ranges=dkdv_ranges,
        )
    return prefixlm_attention_cpu_backward(grad_out, q, k, v, out, lse, row_lo, row_hi, col_lo, col_hi, gate)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, row_lo, row_hi, col_lo, col_hi, dq_ranges, dkdv_ranges, gate, backend):
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, row_lo, row_hi, col_lo, col_hi, _, dq_ranges, dkdv_ranges, gate, backend = inputs
    out, lse = output
    ctx.backend, ctx.has_gate = backend, gate is not None
    ctx.save_for_backward(q, k, v, out, lse, row_lo, row_hi, col_lo, col_hi, dq_ranges, dkdv_ranges, gate)


def _attention_backward(ctx, grad_out, grad_lse):
    dq, dk, dv, dgate = _attention_bwd_op(grad_out, *ctx.saved_tensors, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, (dgate if ctx.has_gate else None), None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@register("prefixlm_attention", "triton")
def prefixlm_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, packing: AttentionPacking, gate: Tensor | None = None
) -> Tensor:
    cfg = kernel_config(q)
    tiles = packing.tile_ranges(*cfg.blocks())
    return _attention_fwd_op(
        q,
        k,
        v,
        packing.row_lo,
        packing.row_hi,
        packing.col_lo,
        packing.col_hi,
        tiles.fwd,
        tiles.dq,
        tiles.dkdv,
        gate,
        "triton",
    )[0]


@register("prefixlm_attention", "cpu")
def prefixlm_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, packing: AttentionPacking, gate: Tensor | None = None
) -> Tensor:
    return _attention_fwd_op(
        q, k, v, packing.row_lo, packing.row_hi, packing.col_lo, packing.col_hi, None, None, None, gate, "cpu"
    )[0]


def prepare_packing(
    packing: AttentionPacking, head_dim: int, dtype: torch.dtype, backend: str | None
) -> AttentionPacking:
    """``packing`` carrying what ``backend``'s attention derives from it for ``dtype`` inputs
    of ``head_dim`` on the packing's device: the Triton tile ranges, computed once here for
    every attention call of a forward."""
    if get_impl("prefixlm_attention", backend) is not prefixlm_attention_triton:
        return packing
    cfg = device_config(head_dim, dtype, packing.device)
    return packing.with_tiles(*cfg.blocks())


def prefixlm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    packing: AttentionPacking,
    *,
    gate: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """PrefixLM attention on a packed row; ``[T, heads, head_dim]`` in and out. ``packing`` is
    the row's :class:`~hrm.ops.AttentionPacking` (build it once per batch)."""
    if packing.num_tokens != q.shape[0]:
        raise HrmError(f"the packing describes {packing.num_tokens} tokens, q has {q.shape[0]}")
    return get_impl("prefixlm_attention", backend)(q, k, v, packing, gate)
