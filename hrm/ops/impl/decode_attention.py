"""Decode attention: one new token per sequence against that sequence's KV cache.

Per sequence ``b`` and head ``h``, the new key and value are written into the cache at
position ``pos[b]`` (in place), then the query attends to positions ``0..pos[b]``::

    s_j = q . k_j / sqrt(D),   out = sigmoid(gate) * softmax(s) . V   (softmax in fp32)

Shapes: ``q, k, v, gate [B, H, D]``, caches ``[B, H, S, D]``, ``pos [B]`` int64. A generated
token is causal over its own sequence: it sees the prompt (the bidirectional prefix, whose
keys the prefill wrote) and every generated token up to itself.

Backends: ``torch`` (the reference and oracle: ``index_put_`` into the cache, then the whole
cache length ``S`` under a ``[B, S]`` mask, so every step has the same shapes; eagerly through
SDPA, under ``torch.compile`` as an elementwise product and reductions that inductor fuses)
and ``cpu`` (``csrc/decode/decode_cpu.cpp``: one work item per (b, h) that reads only the
``pos[b] + 1`` visible positions; q, k, v, gate and both caches all fp32 or all bf16 -- bf16
autocast makes them so -- and heads of up to 256 lanes; anything else goes to the backend's
fallback, here the reference). The op is inference only: generation runs under
``torch.inference_mode`` and nothing here has a backward. The ``cpu`` kernel is the C++ op
``hrm_decode::decode_attention`` (mutating both caches) with a fake registered here, opaque
to ``torch.compile``: a compiled decode step calls it as one extern kernel, with no Python in
between.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.dispatch import fallback_impl, get_impl, register

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # q, k, v, gate and both caches of one of these
KERNEL_MAX_HEAD_DIM = 256  # kMaxHeadDim of the kernel


@register("decode_attention", "torch")
def decode_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
) -> Tensor:
    B, H = q.shape[:2]
    where = (torch.arange(B, device=q.device)[:, None], torch.arange(H, device=q.device)[None, :], pos[:, None])
    keys = k_cache.index_put_(where, k.to(k_cache.dtype)).to(q.dtype)  # [B, H, S, D]
    values = v_cache.index_put_(where, v.to(v_cache.dtype)).to(q.dtype)
    visible = torch.arange(k_cache.shape[2], device=q.device)[None, :] <= pos[:, None]  # [B, S]
    if torch.compiler.is_compiling():  # one query: a fusable reduction beats an attention kernel call
        scores = (keys * q[:, :, None, :]).sum(-1) * q.shape[-1] ** -0.5  # [B, H, S]
        p = torch.softmax(scores.float().masked_fill(~visible[:, None, :], float("-inf")), dim=-1)
        o = (p.to(values.dtype)[..., None] * values).sum(2)  # [B, H, D]
    else:
        mask = visible[:, None, None, :]
        o = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask)[:, :, 0, :]
    return torch.sigmoid(gate) * o


@functools.cache
def load_kernel() -> None:
    """Build (at first use; then a cached no-op) and load the C++ kernel, the op
    ``hrm_decode::decode_attention`` (mutating both caches), with a fake for torch.compile.
    A compiled decode step calls the op itself, with no Python in between, so the kernel must
    be loaded before the step is traced (:func:`prepare` does it)."""
    cpp_extension.load()

    @torch.library.register_fake("hrm_decode::decode_attention")
    def _(q, k, v, g, k_cache, v_cache, pos):
        return q.new_empty(q.shape)  # contiguous, as the kernel's output, whatever q's strides


def prepare(backend: str, device: torch.device | str) -> None:
    """Load what a traced decode step needs to call ``backend``'s kernel on ``device`` (the
    ``cpu`` kernel's library: tracing cannot build it); a no-op elsewhere."""
    if backend == "cpu" and torch.device(device).type == "cpu":
        load_kernel()


@register("decode_attention", "cpu")
def decode_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
) -> Tensor:
    dtype = k_cache.dtype
    if (
        dtype not in KERNEL_DTYPES
        or q.device.type != "cpu"
        or q.shape[-1] > KERNEL_MAX_HEAD_DIM
        or any(t.dtype != dtype for t in (q, k, v, gate, v_cache))
    ):
        return fallback_impl("decode_attention", "cpu")(q, k, v, gate, k_cache, v_cache, pos)
    if not torch.compiler.is_compiling():  # a traced step finds it loaded
        load_kernel()
    return torch.ops.hrm_decode.decode_attention(q, k, v, torch.sigmoid(gate), k_cache, v_cache, pos)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    pos: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Write ``k, v`` ``[B, H, D]`` into the caches ``[B, H, S, D]`` at ``pos [B]`` and attend
    ``q`` to positions ``0..pos[b]``; returns ``sigmoid(gate) * attention`` ``[B, H, D]``."""
    return get_impl("decode_attention", backend)(q, k, v, gate, k_cache, v_cache, pos)


__all__ = ["decode_attention"]
