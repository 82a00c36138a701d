"""The fp64 PrefixLM attention oracle and packing generators shared by the attention tests.

``dense_attention`` is independent of every backend: it builds the dense ``[T, T]`` mask
and takes a plain softmax. ``bf16_products_emulation`` reproduces, in fp64, the rounding
points of the CPU kernel's bf16 path. ``packing`` draws random packings for hypothesis;
``DEGENERATE`` lists the packings every backend must survive.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from hrm import ops
from hrm.ops.impl.prefixlm_attention import prefixlm_attention_reference
from hrm.ops.impl.prefixlm_attention.packing import prefixlm_dense_mask


def attention(q, k, v, cu, pl, gate=None, backend=None):
    """The public op on the packing ``cu``/``pl`` (built here, on q's device)."""
    return ops.prefixlm_attention(
        q, k, v, ops.AttentionPacking.build(cu, pl, q.shape[0], q.device), gate=gate, backend=backend
    )


def reference(q, k, v, cu, pl, gate=None):
    """The ``torch`` backend (the reference) on the packing ``cu``/``pl``."""
    return prefixlm_attention_reference(q, k, v, ops.AttentionPacking.build(cu, pl, q.shape[0], q.device), gate)


def packing(draw, max_seqs=6, max_len=40, pad=True, max_pad=7):
    """(cu_seqlens, prefix_lens, T) with one-token sequences, causal length 0, padding."""
    n = draw(st.integers(1, max_seqs))
    lens = [draw(st.integers(1, max_len)) for _ in range(n)]
    prefixes = [draw(st.sampled_from([1, L, draw(st.integers(1, L))])) for L in lens]
    return make_packing(lens, prefixes, draw(st.integers(0, max_pad)) if pad else 0)


def make_packing(lengths, prefixes, pad=0):
    """(cu_seqlens, prefix_lens, T) for the given sequence lengths and prefix lengths."""
    cu = [0]
    for L in lengths:
        cu.append(cu[-1] + L)
    return torch.tensor(cu, dtype=torch.int32), torch.tensor(prefixes, dtype=torch.int32), cu[-1] + pad


def dense_attention(q, k, v, cu, pl, gate=None):
    """fp64 softmax over the dense [T, T] PrefixLM mask; padding rows are zero."""
    T, H, D = q.shape
    mask = prefixlm_dense_mask(cu, pl, T)
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # padding rows: all masked -> 0
    out = torch.einsum("hts,shd->thd", p, v)
    return out if gate is None else torch.sigmoid(gate) * out


def bf16_products_emulation(q, k, v, gate, grad_out, cu, pl):
    """(out, dq, dk, dv, dgate) in fp64 as the CPU kernel's bf16 path computes them from bf16
    ``q, k, v, gate, grad_out``: every product of bf16 values is exact and everything else is
    fp64, except where the kernel rounds to bf16 (to nearest even): the unnormalized forward
    probabilities and the backward's p and ds as operands of the products over tokens, the
    output before ``delta = rowsum(grad_out * out)``, and ``dO = grad_out * sigmoid(gate)``.
    The outputs themselves are left unrounded."""
    T, H, D = q.shape
    r = lambda x: x.to(torch.bfloat16).double()  # noqa: E731
    q, k, v, go = (x.double() for x in (q, k, v, grad_out))
    sg = torch.sigmoid(gate.double()) if gate is not None else torch.ones_like(q)
    mask = prefixlm_dense_mask(cu, pl, T)
    s = (torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)).masked_fill(~mask[None], float("-inf"))
    m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # padding rows: all masked
    p = torch.exp(s - m)  # [H, T, T], unnormalized; 0 where masked
    l = p.sum(-1, keepdim=True)
    out = sg * (torch.einsum("hts,shd->thd", r(p), v) / l.clamp(min=1e-300).transpose(0, 1))
    pn = torch.exp(s - m - torch.log(l)).nan_to_num(0.0)  # recomputed from the log-sum-exp
    do = r(go * sg)
    delta = (go * r(out)).sum(-1).T[..., None]  # [H, T, 1]
    ds = pn * (torch.einsum("thd,shd->hts", do, v) - delta)
    dv = torch.einsum("hts,thd->shd", r(pn), do)
    dk = torch.einsum("hts,thd->shd", r(ds), q) / math.sqrt(D)
    dq = torch.einsum("hts,shd->thd", r(ds), k) / math.sqrt(D)
    dgate = go * r(out) * (1 - sg) if gate is not None else None
    return out, dq, dk, dv, dgate


# name -> (lengths, prefixes, trailing padding); tile edges at 4 (CPU micro-blocks), 16
# (interpreter tiles) and 64 (CPU work items, GPU tiles).
DEGENERATE = {
    "one_token_sequences": ([1, 1, 5, 1, 1, 3], [1, 1, 2, 1, 1, 3], 0),
    "no_causal_part": ([7, 9, 16, 1], [7, 9, 16, 1], 3),
    "ends_on_tile_edges": ([16, 16, 32, 64], [3, 16, 5, 1], 0),
    "single_sequence_fills_row": ([96], [31], 0),
    "many_tiny_sequences": ([1, 2, 3, 2, 1] * 8, [1, 1, 2, 2, 1] * 8, 0),
    "trailing_padding": ([10, 21], [4, 5], 13),
}
