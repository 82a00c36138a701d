"""The ``torch`` backend of the PrefixLM attention: the readable reference and the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops.dispatch import register
from hrm.ops.impl.prefixlm_attention.packing import AttentionPacking


@register("prefixlm_attention", "torch")
def prefixlm_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, packing: AttentionPacking, gate: Tensor | None = None
) -> Tensor:
    """Sequences of similar length are padded into one batch (the packing's buckets) and run
    through ``scaled_dot_product_attention`` with a per-sequence PrefixLM mask. Memory is at
    most ``4 * sum(len_i**2)`` scores, never ``T**2``; no value is read back to the host."""
    T, H, D = q.shape
    out = q.new_zeros(T, H, D)
    for b in packing.buckets:
        pos = torch.arange(b.width, device=q.device)
        allowed = b.valid[:, None, :] & (
            (pos[None, None, :] < b.prefixes[:, None, None]) | (pos[None, None, :] <= pos[None, :, None])
        )  # [n, Wq, Wk]
        qb, kb, vb = (t[b.rows].transpose(1, 2) for t in (q, k, v))  # [n, H, W, D]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None])  # [n, H, W, D]
        out = out.index_copy(0, b.dst, ob.transpose(1, 2).reshape(-1, H, D)[b.src])
    if gate is not None:
        out = torch.sigmoid(gate) * out
    return out
