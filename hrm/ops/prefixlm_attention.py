"""PrefixLM attention over packed variable-length sequences.

Inputs ``q, k, v``: ``[T, heads, head_dim]``; sequence ``i`` occupies rows
``cu_seqlens[i] : cu_seqlens[i+1]`` and its first ``prefix_lens[i]`` tokens are the
instruction. Inside sequence ``i`` a query at local position ``p`` may attend to key ``j``
iff ``j < prefix_lens[i]`` (the whole instruction, bidirectionally) or ``j <= p`` (causal
over the response). Nothing crosses a sequence boundary. With ``scale = head_dim**-0.5``:

    out[t] = sigmoid(gate[t]) * softmax_j(scale * q[t] . k[j] | allowed(t, j)) @ v

Rows past ``cu_seqlens[-1]`` are padding and come out zero. Every legal sequence has
``1 <= prefix_lens[i] <= length`` (the instruction predicts the first response token), so
every real query sees at least key 0; one-token sequences and sequences with no causal
part (``prefix_len == length``) are ordinary inputs.

**Row intervals.** The mask is one key interval per query: query ``t`` sees exactly the
keys ``[row_lo[t], row_hi[t])`` with ``row_lo = start of t's sequence`` and
``row_hi = start + max(prefix, pos + 1)``; padding rows get the empty interval
``[total, total)``. Both arrays are non-decreasing in ``t``, so (transposed) key ``j`` is
seen by the queries ``[col_lo[j], col_hi[j])``, found by binary search, and any run of
consecutive rows sees one contiguous span of keys.

**Tiles.** For a block of rows the keys split into: the union of the rows' intervals
(anything outside is an *empty* tile, never visited) and their intersection (*full* tiles:
every row sees every key, no mask); the rest of the union is *partial*, masked by the
interval test ``row_lo <= j < row_hi``. Because the intervals are monotone, both sets are
contiguous, so each block needs four numbers (:func:`tile_ranges`) and no index lists; a
query block may span several short sequences (its intersection is then empty).

Backends: ``torch`` (the reference below, the oracle), ``triton`` (flash-style kernels,
one program per (block, head)), ``cpu`` (a C++ kernel built at first use from
``csrc/prefixlm_attention/``). Both fused backends run through the custom ops
``hrm::prefixlm_attention_fwd`` / ``hrm::prefixlm_attention_bwd``, which save the fp32
log-sum-exp and recompute the probabilities in the backward pass.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.errors import BackendUnavailable, HrmError
from hrm.ops.common import TRITON_TYPES, cdiv, interpreting, jit, pointers, tl
from hrm.ops.dispatch import get_impl, register, register_probe

def check_packing(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, num_tokens: int) -> tuple[list[int], list[int]]:
    """Validate a packing; return ``cu_seqlens`` and ``prefix_lens`` as Python lists."""
    if cu_seqlens.dim() != 1 or prefix_lens.dim() != 1 or cu_seqlens.numel() != prefix_lens.numel() + 1:
        raise HrmError(f"cu_seqlens must be [N+1] and prefix_lens [N]; got {tuple(cu_seqlens.shape)} "
                       f"and {tuple(prefix_lens.shape)}")
    cu, pl = cu_seqlens.tolist(), prefix_lens.tolist()
    if cu[0] != 0 or cu[-1] > num_tokens:
        raise HrmError(f"cu_seqlens must start at 0 and end at most at T={num_tokens}; got {cu[0]}..{cu[-1]}")
    for i, p in enumerate(pl):
        length = cu[i + 1] - cu[i]
        if length < 1:
            raise HrmError(f"sequence {i} has length {length}; cu_seqlens must be strictly increasing")
        if not 1 <= p <= length:
            raise HrmError(f"sequence {i}: prefix length {p} must be in [1, {length}] (a sample needs an "
                           "instruction: its last token predicts the first response token)")
    return cu, pl


def prefixlm_dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The ``[T, T]`` boolean mask (``True`` = may attend); padding rows are all False.

    For tests and small oracles only: it is quadratic in ``T``.
    """
    cu, pl = check_packing(cu_seqlens, prefix_lens, num_tokens)
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for i, p in enumerate(pl):
        s, e = cu[i], cu[i + 1]
        n = e - s
        pos = torch.arange(n)
        mask[s:e, s:e] = (pos[None, :] < p) | (pos[None, :] <= pos[:, None])
    return mask.to(cu_seqlens.device)


def _sequence_buckets(cu: list[int], pl: list[int]) -> dict[int, list[int]]:
    """Group sequences by their length rounded up to a power of two (bounds padding at 2x)."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pl)):
        length = cu[i + 1] - cu[i]
        buckets[1 << (length - 1).bit_length()].append(i)
    return dict(sorted(buckets.items()))


# -- reference -----------------------------------------------------------------------------
@register("prefixlm_attention", "torch")
def prefixlm_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 prefix_lens: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Readable reference: sequences of similar length are padded into one batch and run
    through ``scaled_dot_product_attention`` with a per-sequence PrefixLM mask. Memory is
    at most ``4 * sum(len_i**2)`` scores, never ``T**2``."""
    T, H, D = q.shape
    cu, pl = check_packing(cu_seqlens, prefix_lens, T)
    out = q.new_zeros(T, H, D)
    for width, seqs in _sequence_buckets(cu, pl).items():
        dev = q.device
        starts = torch.tensor([cu[i] for i in seqs], device=dev)
        lengths = torch.tensor([cu[i + 1] - cu[i] for i in seqs], device=dev)
        prefixes = torch.tensor([pl[i] for i in seqs], device=dev)
        pos = torch.arange(width, device=dev)
        valid = pos[None, :] < lengths[:, None]  # [n, W]
        rows = torch.where(valid, starts[:, None] + pos[None, :], 0)  # [n, W] token index (0 for slack)
        allowed = valid[:, None, :] & ((pos[None, None, :] < prefixes[:, None, None])
                                       | (pos[None, None, :] <= pos[None, :, None]))  # [n, Wq, Wk]
        qb, kb, vb = (t[rows].transpose(1, 2) for t in (q, k, v))  # [n, H, W, D]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None])  # [n, H, W, D]
        out = out.index_copy(0, rows[valid], ob.transpose(1, 2)[valid])
    if gate is not None:
        out = torch.sigmoid(gate) * out
    return out


# -- row intervals and tile ranges (device tensors, no host sync) ---------------------------
def row_intervals(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """int32 ``[T]`` arrays: query ``t`` sees the keys ``[row_lo[t], row_hi[t])``.

    Padding rows get ``[total, total)`` so that both arrays stay non-decreasing."""
    dev = cu_seqlens.device
    t = torch.arange(num_tokens, device=dev)
    if prefix_lens.numel() == 0:  # nothing but padding
        return torch.zeros_like(t, dtype=torch.int32), torch.zeros_like(t, dtype=torch.int32)
    cu = cu_seqlens.to(torch.int64)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_(max=prefix_lens.numel() - 1)  # [T]
    start, prefix, total = cu[seq], prefix_lens.to(torch.int64)[seq], cu[-1]
    real = t < total
    lo = torch.where(real, start, total)
    hi = torch.where(real, start + torch.maximum(prefix, t - start + 1), total)
    return lo.to(torch.int32), hi.to(torch.int32)


def col_intervals(row_lo: Tensor, row_hi: Tensor) -> tuple[Tensor, Tensor]:
    """int32 ``[T]`` arrays: key ``j`` is seen by the queries ``[col_lo[j], col_hi[j])``
    (``row_lo <= j < row_hi`` with both non-decreasing; keys nobody sees get ``[T, T)``)."""
    j = torch.arange(row_lo.numel(), device=row_lo.device, dtype=torch.int32)
    col_lo = torch.searchsorted(row_hi, j, right=True)  # first query whose interval ends after j
    col_hi = torch.searchsorted(row_lo, j, right=True)  # queries whose interval starts at or before j
    return col_lo.to(torch.int32), col_hi.to(torch.int32)


def tile_ranges(lo: Tensor, hi: Tensor, block: int, other_block: int) -> Tensor:
    """int32 ``[cdiv(T, block), 4]``: for each block of ``block`` rows with intervals
    ``[lo, hi)`` over the other axis, ``(first, full_first, full_end, end)`` in units of
    ``other_block``-sized tiles. Tiles ``[first, end)`` are non-empty; of those,
    ``[full_first, full_end)`` are full (every row sees every column) and the others partial;
    a block with no full tile has ``full_first == full_end == end``. Rows past ``T`` count
    as empty, so a block cut by the end of the row is never full."""
    T = lo.numel()
    nb = cdiv(T, block)
    pad = nb * block - T
    lo = F.pad(lo.to(torch.int64), (0, pad), value=T).view(nb, block)
    hi = F.pad(hi.to(torch.int64), (0, pad), value=0).view(nb, block)
    nonempty = lo < hi
    any_row = nonempty.any(1)
    first = torch.where(nonempty, lo, T).amin(1) // other_block
    end = -(-torch.where(nonempty, hi, 0).amax(1) // other_block)
    first, end = torch.where(any_row, first, 0), torch.where(any_row, end, 0)
    full_first = -(-lo.amax(1) // other_block)  # the intersection [max lo, min hi), in whole tiles
    full_end = hi.amin(1) // other_block
    no_full = full_first >= full_end
    full_first, full_end = torch.where(no_full, end, full_first), torch.where(no_full, end, full_end)
    return torch.stack([first, full_first, full_end, end], 1).to(torch.int32)


def tile_counts(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int, block_m: int = 64,
                block_n: int = 64) -> dict[str, int]:
    """How many ``block_m x block_n`` tiles of the ``[T, T]`` score matrix are empty, full
    and partial (for benchmark reports)."""
    lo, hi = row_intervals(cu_seqlens, prefix_lens, num_tokens)
    r = tile_ranges(lo, hi, block_m, block_n).to(torch.int64)
    full = int((r[:, 2] - r[:, 1]).sum())
    nonempty = int((r[:, 3] - r[:, 0]).sum())
    total = cdiv(num_tokens, block_m) * cdiv(num_tokens, block_n)
    return {"total": total, "empty": total - nonempty, "full": full, "partial": nonempty - full}


def allowed_pairs(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int) -> int:
    """Number of (query, key) pairs the mask allows: the useful work is ``4 * pairs * head_dim``
    FLOPs per head forward."""
    lo, hi = row_intervals(cu_seqlens, prefix_lens, num_tokens)
    return int((hi - lo).to(torch.int64).sum())


# -- block configuration --------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class AttentionConfig:
    """Tiles of the three Triton kernels: ``fwd`` and ``dq`` walk key tiles for a block of
    queries, ``dkdv`` walks query tiles for a block of keys."""

    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig


def _cfg(fwd, dq, dkdv) -> AttentionConfig:
    return AttentionConfig(KernelConfig(*fwd), KernelConfig(*dq), KernelConfig(*dkdv))


# Defaults by (architecture, head dim, input kind), each (block_m, block_n, warps, stages);
# every one compiles ahead of time without register spills (tests/test_prefixlm_attention_aot.py).
# fp32 inputs use exact fp32 dots (tf32 only if torch.backends.cuda.matmul.allow_tf32),
# which need far smaller tiles. Head dims below 64 use the 64 row.
_GPU_CONFIGS = {
    (80, 64, "16bit"): _cfg((128, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 2)),
    (80, 128, "16bit"): _cfg((128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 8, 2)),
    (90, 64, "16bit"): _cfg((128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 2)),
    (90, 128, "16bit"): _cfg((128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 2)),
    (80, 64, "fp32"): _cfg((32, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    (80, 128, "fp32"): _cfg((32, 32, 8, 2), (16, 32, 4, 2), (32, 32, 8, 2)),
    (90, 64, "fp32"): _cfg((32, 16, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)),
    (90, 128, "fp32"): _cfg((16, 16, 4, 1), (32, 32, 8, 2), (16, 16, 4, 1)),
}
# Not in the spill check (no preset uses it): small tiles, chosen by hand.
_GPU_CONFIGS.update({(arch, 256, kind): _cfg((32, 32, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1))
                     for arch in (80, 90) for kind in ("16bit", "fp32")})
_INTERPRETER_CONFIG = _cfg((16, 16, 1, 1), (16, 16, 1, 1), (16, 16, 1, 1))
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def attention_config(head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> AttentionConfig:
    """Tile sizes for ``head_dim``, input ``dtype`` and GPU ``capability`` (``None``: the
    interpreter, which wants small tiles so that short test rows still span many). The
    later tuning tables will be consulted here first."""
    if head_dim not in TRITON_HEAD_DIMS:
        raise HrmError(f"the triton attention kernels need head_dim in {TRITON_HEAD_DIMS}, got {head_dim}")
    if capability is None:
        return _INTERPRETER_CONFIG
    arch = 90 if capability[0] >= 9 else 80
    kind = "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"
    return _GPU_CONFIGS[(arch, max(head_dim, 64), kind)]


def _capability(device: torch.device) -> tuple[int, int] | None:
    return None if device.type != "cuda" or interpreting() else torch.cuda.get_device_capability(device)


# -- Triton kernels ------------------------------------------------------------------------
LOG2E = 1.4426950408889634  # the kernels inline it (a @jit function reads only constexpr globals)


@jit
def _tile_range(RANGES, block):
    """``(first, full_first, full_end, end)``: the block's tiles as :func:`tile_ranges` lists
    them (partial ``[first, full_first)``, full ``[full_first, full_end)``, partial
    ``[full_end, end)``)."""
    return (tl.load(RANGES + block * 4), tl.load(RANGES + block * 4 + 1), tl.load(RANGES + block * 4 + 2),
            tl.load(RANGES + block * 4 + 3))


@jit
def _block_rows(X, Y, block, h, T, H, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``block * BLOCK ...`` of head ``h`` of two contiguous ``[T, H, D]`` tensors:
    ``(idx, ok, offs, x, y)`` (rows past T read as zeros)."""
    idx = block * BLOCK + tl.arange(0, BLOCK)
    ok = idx < T
    offs = (idx.to(tl.int64)[:, None] * H + h) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    return idx, ok, offs, tl.load(X + offs, mask=ok[:, None], other=0.0), tl.load(Y + offs, mask=ok[:, None], other=0.0)


@jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, start, end, T, qk_scale,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key tiles ``[start, end)``. MASKED is a constexpr so that full
    tiles compile without the bounds checks and the interval test (the common case)."""
    offs_n = tl.arange(0, BLOCK_N)
    for kb in range(start, end):
        cols = kb * BLOCK_N + offs_n
        step = kb * BLOCK_N
        if MASKED:
            k = tl.load(k_ptrs + step * stride_kt, mask=(cols < T)[None, :], other=0.0)
            v = tl.load(v_ptrs + step * stride_vt, mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + step * stride_kt)
            v = tl.load(v_ptrs + step * stride_vt)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@jit
def _prefixlm_fwd_kernel(Q, K, V, G, O, LSE, ROW_LO, ROW_HI, RANGES,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_gt, stride_gh,
                         T, H, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (query block, head): with ``s = scale * log2(e) * q . k`` over the allowed keys,
    ``m = max s``, ``l = sum exp2(s - m)``:

        out = sigmoid(gate) * (sum exp2(s - m) v) / l        lse = ln(2) * (m + log2 l)

    ``out`` is stored in the input dtype and ``lse`` (fp32, natural log, 0 for padding rows)
    is saved for the backward pass. Key tiles are visited partial / full / partial as
    :func:`tile_ranges` lists them; empty tiles never."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    first, full_first, full_end, end = _tile_range(RANGES, qb)
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    q = tl.load(Q + rows64[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)
    hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
    k_ptrs = K + h * stride_kh + offs_d[:, None] + offs_n[None, :].to(tl.int64) * stride_kt  # [D, BN]
    v_ptrs = V + h * stride_vh + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]  # [BN, D]
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a row that sees nothing in a tile stays NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, first, full_first,
                               T, qk_scale, BLOCK_N, True, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, full_first, full_end,
                               T, qk_scale, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, full_end, end,
                               T, qk_scale, BLOCK_N, True, DOT_PRECISION)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_GATE:
        g = tl.load(G + rows64[:, None] * stride_gt + h * stride_gh + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0).to(tl.float32)
        out = out * tl.sigmoid(g)
    tl.store(O + (rows64[:, None] * H + h) * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + h * T + rows, tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0),
             mask=row_ok)


@jit
def _bwd_preprocess_kernel(GO, O, G, DO, DG, DELTA, T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_GATE: tl.constexpr):
    """``delta = rowsum(grad_out * out)`` (fp32, ``[H, T]``); with a gate also
    ``dO = grad_out * sigmoid(gate)`` and ``dgate = grad_out * out * (1 - sigmoid(gate))``.
    All tensors are contiguous ``[T, H, D]``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < T
    offs = (rows.to(tl.int64)[:, None] * H + h) * HEAD_DIM + offs_d[None, :]
    go = tl.load(GO + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(O + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + h * T + rows, tl.sum(go * o, 1), mask=row_ok)
    if HAS_GATE:
        sg = tl.sigmoid(tl.load(G + offs, mask=row_ok[:, None], other=0.0).to(tl.float32))
        tl.store(DO + offs, (go * sg).to(DO.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DG + offs, (go * o * (1.0 - sg)).to(DG.dtype.element_ty), mask=row_ok[:, None])


@jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, ROW_LO, ROW_HI, h, cols, start, end, T, H, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of one key tile over query tiles ``[start, end)``; MASKED (constexpr) compiles
    the bounds checks and the interval test into partial tiles only."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for qb in range(start, end):
        rows = qb * BLOCK_M + offs_m
        offs = (rows.to(tl.int64)[:, None] * H + h) * HEAD_DIM + offs_d[None, :]
        if MASKED:
            row_ok = rows < T
            q = tl.load(Q + offs, mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + offs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + h * T + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + h * T + rows, mask=row_ok, other=0.0)
            lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)
            hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
        else:
            q = tl.load(Q + offs)
            do = tl.load(DO + offs)
            lse = tl.load(LSE + h * T + rows)
            delta = tl.load(DELTA + h * T + rows)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                           - lse[None, :] * 1.4426950408889634)  # [BLOCK_N, BLOCK_M]
        if MASKED:
            p_t = tl.where((cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :]), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@jit
def _prefixlm_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, ROW_LO, ROW_HI, RANGES, T, H, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One (key block, head), recomputing ``p = exp2(scale * log2(e) * q . k - log2(e) * lse)``:

        dv = sum_t p dO_t        dk = scale * sum_t p (dO_t . v - delta_t) q_t

    over the query tiles that :func:`tile_ranges` lists for the block (from ``col_lo/col_hi``).
    All tensors are contiguous ``[T, H, D]``."""
    kb = tl.program_id(0)
    h = tl.program_id(1)
    cols, col_ok, offs, k, v = _block_rows(K, V, kb, h, T, H, HEAD_DIM, BLOCK_N)
    first, full_first, full_end, end = _tile_range(RANGES, kb)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, ROW_LO, ROW_HI, h, cols, first, full_first, T, H,
                         qk_scale, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, ROW_LO, ROW_HI, h, cols, full_first, full_end, T, H,
                         qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, ROW_LO, ROW_HI, h, cols, full_end, end, T, H,
                         qk_scale, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@jit
def _dq_tiles(dq, q, do, lse2, delta, K, V, lo, hi, h, start, end, T, H, qk_scale, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq of one query tile over key tiles ``[start, end)``; MASKED as in :func:`_fwd_tiles`."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for kb in range(start, end):
        cols = kb * BLOCK_N + offs_n
        offs = (cols.to(tl.int64)[:, None] * H + h) * HEAD_DIM + offs_d[None, :]
        if MASKED:
            k = tl.load(K + offs, mask=(cols < T)[:, None], other=0.0)
            v = tl.load(V + offs, mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(K + offs)
            v = tl.load(V + offs)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@jit
def _prefixlm_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, ROW_LO, ROW_HI, RANGES, T, H, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One (query block, head): ``dq = scale * sum_j p (dO . v_j - delta) k_j`` with ``p``
    recomputed from the saved ``lse``. All tensors are contiguous ``[T, H, D]``."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    rows, row_ok, offs, q, do = _block_rows(Q, DO, qb, h, T, H, HEAD_DIM, BLOCK_M)
    lse2 = tl.load(LSE + h * T + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + h * T + rows, mask=row_ok, other=0.0)
    lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)
    hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
    first, full_first, full_end, end = _tile_range(RANGES, qb)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, lo, hi, h, first, full_first, T, H, qk_scale, HEAD_DIM, BLOCK_N,
                   True, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, lo, hi, h, full_first, full_end, T, H, qk_scale, HEAD_DIM, BLOCK_N,
                   False, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse2, delta, K, V, lo, hi, h, full_end, end, T, H, qk_scale, HEAD_DIM, BLOCK_N,
                   True, DOT_PRECISION)
    tl.store(DQ + offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# -- Triton launchers ----------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use TF32 tensor cores only where PyTorch's own matmuls may."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"


def _triton_ready(q: Tensor) -> None:
    if q.device.type != "cuda" and not interpreting():
        raise BackendUnavailable("the triton attention kernels need CUDA tensors (or TRITON_INTERPRET=1 for tests)")


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def prefixlm_attention_triton_forward(q: Tensor, k: Tensor, v: Tensor, row_lo: Tensor, row_hi: Tensor,
                                      gate: Tensor | None = None,
                                      config: AttentionConfig | None = None) -> tuple[Tensor, Tensor]:
    """``(out [T, H, D], lse [H, T] fp32)``; ``q, k, v, gate`` may be strided over tokens and heads."""
    _triton_ready(q)
    T, H, D = q.shape
    cfg = (config or attention_config(D, q.dtype, _capability(q.device))).fwd
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    g = _last_dim_contiguous(gate) if gate is not None else q  # q: a placeholder that HAS_GATE=False never reads
    out = q.new_empty(T, H, D)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    ranges = tile_ranges(row_lo, row_hi, cfg.block_m, cfg.block_n)
    _prefixlm_fwd_kernel[(cdiv(T, cfg.block_m), H)](
        q, k, v, g, out, lse, row_lo, row_hi, ranges, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), g.stride(0), g.stride(1), T, H, D**-0.5 * LOG2E, HEAD_DIM=D,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_GATE=gate is not None, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def prefixlm_attention_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                       row_lo: Tensor, row_hi: Tensor, gate: Tensor | None = None,
                                       config: AttentionConfig | None = None
                                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dgate)``; ``dgate`` is an empty tensor when there is no gate."""
    _triton_ready(q)
    T, H, D = q.shape
    cfg = config or attention_config(D, q.dtype, _capability(q.device))
    grad_out, q, k, v, out = (x.contiguous() for x in (grad_out, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if gate is not None:
        gate = gate.contiguous()
        do, dgate = torch.empty_like(q), torch.empty_like(gate)
    else:
        do, dgate = grad_out, q.new_empty(0)
    if T == 0:
        return dq, dk, dv, dgate
    delta = torch.empty(H, T, dtype=torch.float32, device=q.device)
    block = cdiv(4096, D) if not interpreting() else min(1024, 1 << (T - 1).bit_length())
    _bwd_preprocess_kernel[(cdiv(T, block), H)](grad_out, out, gate if gate is not None else q, do, dgate, delta, T,
                                                H, HEAD_DIM=D, BLOCK_M=block, HAS_GATE=gate is not None)
    scale, prec = D**-0.5, _dot_precision(q.dtype)
    col_lo, col_hi = col_intervals(row_lo, row_hi)
    c = cfg.dkdv
    _prefixlm_dkdv_kernel[(cdiv(T, c.block_n), H)](
        q, k, v, do, lse, delta, dk, dv, row_lo, row_hi, tile_ranges(col_lo, col_hi, c.block_n, c.block_m), T, H,
        scale * LOG2E, scale, HEAD_DIM=D, BLOCK_M=c.block_m, BLOCK_N=c.block_n, DOT_PRECISION=prec,
        num_warps=c.num_warps, num_stages=c.num_stages)
    c = cfg.dq
    _prefixlm_dq_kernel[(cdiv(T, c.block_m), H)](
        q, k, v, do, lse, delta, dq, row_lo, row_hi, tile_ranges(row_lo, row_hi, c.block_m, c.block_n), T, H,
        scale * LOG2E, scale, HEAD_DIM=D, BLOCK_M=c.block_m, BLOCK_N=c.block_n, DOT_PRECISION=prec,
        num_warps=c.num_warps, num_stages=c.num_stages)
    return dq, dk, dv, dgate


def aot_specs(head_dim: int, dtype: torch.dtype, capability: int) -> list:
    """The four Triton kernels at their default configuration, as :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec

    cfg = attention_config(head_dim, dtype, (capability // 10, capability % 10))
    t, where = TRITON_TYPES[dtype], f"{__name__}:"
    f32, i32 = pointers(torch.float32, "LSE", "DELTA"), {n: "*i32" for n in ("ROW_LO", "ROW_HI", "RANGES")}
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    prec = _dot_precision(dtype)
    strides = [f"stride_{a}{b}" for a in "qkvg" for b in "th"]
    fwd = KernelSpec(f"fwd {t}", where + "_prefixlm_fwd_kernel",
                     {**pointers(dtype, "Q", "K", "V", "G", "O"), "LSE": f32["LSE"], **i32, **ints(*strides, "T", "H"),
                      "qk_scale": "fp32"},
                     {"HEAD_DIM": head_dim, "BLOCK_M": cfg.fwd.block_m, "BLOCK_N": cfg.fwd.block_n, "HAS_GATE": True,
                      "DOT_PRECISION": prec}, cfg.fwd.num_warps, cfg.fwd.num_stages,
                     ("Q", "K", "V", "G", "O", "LSE", "ROW_LO", "ROW_HI", "RANGES", *strides))
    pre = KernelSpec(f"bwd_preprocess {t}", where + "_bwd_preprocess_kernel",
                     {**pointers(dtype, "GO", "O", "G", "DO", "DG"), "DELTA": f32["DELTA"], **ints("T", "H")},
                     {"HEAD_DIM": head_dim, "BLOCK_M": cdiv(4096, head_dim), "HAS_GATE": True}, 4, 1,
                     ("GO", "O", "G", "DO", "DG", "DELTA"))
    bwd_sig = {**pointers(dtype, "Q", "K", "V", "DO", "DK", "DV", "DQ"), **f32, **i32, **ints("T", "H"),
               "qk_scale": "fp32", "sm_scale": "fp32"}
    aligned = ("Q", "K", "V", "DO", "LSE", "DELTA", "ROW_LO", "ROW_HI", "RANGES")
    specs = [fwd, pre]
    for name, kernel, c, out in (("dkdv", "_prefixlm_dkdv_kernel", cfg.dkdv, ("DK", "DV")),
                                 ("dq", "_prefixlm_dq_kernel", cfg.dq, ("DQ",))):
        sig = {k: v for k, v in bwd_sig.items() if k not in {"DK", "DV", "DQ"} - set(out)}
        specs.append(KernelSpec(f"{name} {t}", where + kernel, sig,
                                {"HEAD_DIM": head_dim, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                                 "DOT_PRECISION": prec}, c.num_warps, c.num_stages, aligned + out))
    return specs


def aot_report(head_dims: tuple[int, ...] = (64, 128),
               dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
               capabilities: tuple[int, ...] = (80, 90), jobs: int | None = None) -> list[dict]:
    """Registers, spills and shared memory of every attention kernel at its default
    configuration, compiled ahead of time for each capability (see :mod:`hrm.ops.aot`)."""
    from hrm.ops.aot import compile_report

    rows = []
    for cap in capabilities:
        specs = [s for hd in head_dims for dt in dtypes for s in aot_specs(hd, dt, cap)]
        rows += compile_report(specs, (cap,), jobs)
    return rows


# -- CPU kernel (C++, built at first use) ----------------------------------------------------
_CPU_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "prefixlm_attention" / "prefixlm_attention_cpu.cpp"
_CPU_ROWS_PER_ITEM = 64  # rows (keys in the dk/dv pass) per work item of the thread pool


def _put_pip_ninja_on_path() -> bool:
    """Make the ``ninja`` binary of the pip package visible to cpp_extension (a venv's bin/
    is not on PATH unless the venv is activated)."""
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def _cpu_toolchain_missing() -> str | None:
    """Why the C++ CPU kernel cannot be built here, or ``None``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r}, set CXX) on PATH to build the CPU kernels"
    if shutil.which("ninja") is None and not _put_pip_ninja_on_path():
        return "torch.utils.cpp_extension needs 'ninja' (pip install ninja) to build the CPU kernels"
    if not _CPU_SOURCE.is_file():
        return f"the C++ sources are not part of this installation ({_CPU_SOURCE} is missing)"
    return None


register_probe("cpu", _cpu_toolchain_missing)


def _cpu_build_dir() -> Path:
    """A cache directory keyed by everything the binary depends on (it is built -march=native)."""
    root = os.environ.get("HRM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "hrm")
    key = hashlib.sha256(_CPU_SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}|openmp".encode())
    try:
        key.update(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).encode())
    except (OSError, StopIteration):
        pass
    return Path(root) / "extensions" / f"prefixlm_attention_cpu-{key.hexdigest()[:16]}"


@functools.cache
def _cpu_ops():
    """``torch.ops.hrm_cpu``, building the extension on first use (~15 s, then cached)."""
    reason = _cpu_toolchain_missing()
    if reason is not None:
        raise BackendUnavailable(f"backend 'cpu' cannot run here: {reason}")
    from torch.utils import cpp_extension

    build = _cpu_build_dir()
    build.mkdir(parents=True, exist_ok=True)
    try:
        # -fopenmp: at::parallel_for is inline OpenMP in the headers; the library resolves to
        # the libgomp.so.1 that torch has already loaded, so there is one thread pool.
        cpp_extension.load(name="hrm_prefixlm_attention_cpu", sources=[str(_CPU_SOURCE)], build_directory=str(build),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as e:
        raise BackendUnavailable(f"building the CPU attention kernel in {build} failed: {e}") from e
    return torch.ops.hrm_cpu


def prefixlm_attention_cpu_forward(q: Tensor, k: Tensor, v: Tensor, row_lo: Tensor, row_hi: Tensor,
                                   gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(out [T, H, D], lse [H, T] fp32)`` from the C++ kernel: fp32 compute, or for bf16 ``q, k, v``
    on CPUs with AVX512_BF16 bf16 products with fp32 accumulation (``_cpu_ops().bf16_dots()``)."""
    out, lse = _cpu_ops().prefixlm_fwd(q, k, v, gate, row_lo, row_hi, q.shape[-1] ** -0.5, _CPU_ROWS_PER_ITEM)
    return out, lse


def prefixlm_attention_cpu_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    row_lo: Tensor, row_hi: Tensor, gate: Tensor | None = None
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    col_lo, col_hi = col_intervals(row_lo, row_hi)
    dq, dk, dv, dgate = _cpu_ops().prefixlm_bwd(grad_out, q, k, v, out, lse, gate, row_lo, row_hi, col_lo, col_hi,
                                                q.shape[-1] ** -0.5, _CPU_ROWS_PER_ITEM)
    return dq, dk, dv, dgate


# -- custom ops: the cpu and triton backends -------------------------------------------------
_FORWARD = {"cpu": prefixlm_attention_cpu_forward, "triton": prefixlm_attention_triton_forward}
_BACKWARD = {"cpu": prefixlm_attention_cpu_backward, "triton": prefixlm_attention_triton_backward}


def _op_intervals(q: Tensor, cu_seqlens: Tensor, prefix_lens: Tensor, validate: bool) -> tuple[Tensor, Tensor]:
    T = q.shape[0]
    # The check reads the packing on the host: on a GPU that is a sync, so it is skipped
    # while a CUDA graph is being captured.
    if validate and (q.device.type != "cuda" or not torch.cuda.is_current_stream_capturing()):
        check_packing(cu_seqlens, prefix_lens, T)
    return row_intervals(cu_seqlens.to(q.device), prefix_lens.to(q.device), T)


@torch.library.custom_op("hrm::prefixlm_attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prefix_lens: Tensor,
                      gate: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    row_lo, row_hi = _op_intervals(q, cu_seqlens, prefix_lens, validate=True)
    return _FORWARD[backend](q, k, v, row_lo, row_hi, gate)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_lens, gate, backend):
    T, H, D = q.shape
    return q.new_empty(T, H, D), q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("hrm::prefixlm_attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      cu_seqlens: Tensor, prefix_lens: Tensor, gate: Optional[Tensor],
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row_lo, row_hi = _op_intervals(q, cu_seqlens, prefix_lens, validate=False)
    return _BACKWARD[backend](grad_out, q, k, v, out, lse, row_lo, row_hi, gate)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, prefix_lens, gate, backend):
    dgate = gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgate


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, prefix_lens, gate, backend = inputs
    out, lse = output
    ctx.backend, ctx.has_gate = backend, gate is not None
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_lens, gate)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, prefix_lens, gate = ctx.saved_tensors
    dq, dk, dv, dgate = _attention_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens, prefix_lens, gate, ctx.backend)
    return dq, dk, dv, None, None, (dgate if ctx.has_gate else None), None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@register("prefixlm_attention", "triton")
def prefixlm_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prefix_lens: Tensor,
                              gate: Tensor | None = None) -> Tensor:
    return _attention_fwd_op(q, k, v, cu_seqlens, prefix_lens, gate, "triton")[0]


@register("prefixlm_attention", "cpu")
def prefixlm_attention_cpu(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prefix_lens: Tensor,
                           gate: Tensor | None = None) -> Tensor:
    return _attention_fwd_op(q, k, v, cu_seqlens, prefix_lens, gate, "cpu")[0]


# -- public --------------------------------------------------------------------------------
def prefixlm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       prefix_lens: torch.Tensor, *, gate: torch.Tensor | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """PrefixLM attention on a packed row; ``[T, heads, head_dim]`` in and out."""
    return get_impl("prefixlm_attention", backend)(q, k, v, cu_seqlens, prefix_lens, gate)
