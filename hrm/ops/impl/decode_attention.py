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
``pos[b] + 1`` visible positions; fp32 caches, others go to the backend's fallback, here
the reference). The op is inference only: generation runs under ``torch.inference_mode``
and nothing here has a backward. The ``cpu`` kernel is the ``torch.library`` custom op ``hrm::decode_attention``
(mutating both caches), opaque to ``torch.compile``, so a compiled decode step calls it as
one extern kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.dispatch import fallback_impl, get_impl, register

SOURCE = "decode/decode_cpu.cpp"


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


@torch.library.custom_op("hrm::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
) -> Tensor:
    """The C++ kernel; ``g = sigmoid(gate)``."""
    cpp_extension.load("hrm_decode_cpu", SOURCE)  # built on first use, then a cached no-op
    return torch.ops.hrm_decode.decode_attention(q, k, v, g, k_cache, v_cache, pos)


@_decode_attention_op.register_fake
def _(q, k, v, g, k_cache, v_cache, pos):
    return q.new_empty(q.shape)  # contiguous, as the kernel's output, whatever q's strides


@register("decode_attention", "cpu")
def decode_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor
) -> Tensor:
    if k_cache.dtype != torch.float32 or q.dtype != torch.float32 or q.device.type != "cpu":
        return fallback_impl("decode_attention", "cpu")(q, k, v, gate, k_cache, v_cache, pos)
    return _decode_attention_op(q, k, v, torch.sigmoid(gate), k_cache, v_cache, pos)


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
