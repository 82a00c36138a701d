"""Triton kernels of the PrefixLM attention: flash-style forward and backward, one program per
(block, head), visiting only the non-empty tiles of each block (:mod:`.packing`), with the
interval mask compiled into partial tiles only.

Tile configurations come from :func:`attention_config` (by architecture of
:mod:`hrm.ops.arch`, head dim and input kind); every default compiles ahead of time without
register spills and within its architecture's shared memory (``aot_specs``, checked in
``tests/test_prefixlm_attention_aot.py``). Pointer offsets that scale with the
token index are 64-bit: a strided view of a fused ``[T, 4 * heads, head_dim]`` projection
passes 2**31 elements at about 262K tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from hrm.errors import BackendUnavailable, HrmError
from hrm.ops.common import LN2, LOG2E, TRITON_TYPES, cdiv, device_of, interpreting, jit, pointers, tile_target, tl
from hrm.ops.impl.prefixlm_attention.packing import tile_ranges


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

    def blocks(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``(block_m, block_n)`` of each kernel, as :meth:`.packing.AttentionPacking.tile_ranges` takes them."""
        return tuple((c.block_m, c.block_n) for c in (self.fwd, self.dq, self.dkdv))


def _cfg(fwd, dq, dkdv) -> AttentionConfig:
    return AttentionConfig(KernelConfig(*fwd), KernelConfig(*dq), KernelConfig(*dkdv))


# Defaults by (architecture, head dim, input kind), each (block_m, block_n, warps, stages);
# every one compiles ahead of time without register spills and within its architecture's
# shared memory per block (hrm.ops.arch.ARCHS; tests/test_prefixlm_attention_aot.py). They
# were chosen to compile, not timed: `hrm tune` measures better ones per device (hrm.tuning).
# fp32 inputs use exact fp32 dots (tf32 only if torch.backends.cuda.matmul.allow_tf32),
# which need far smaller tiles. Head dims below 64 use the 64 row. Every row is also spill-free
# under Triton 3.6 (torch 2.11's), where six earlier fp32 ones spilled (up to 2848 B: sm_80's
# 4-warp dkdv at head dim 64; docs/tuning.md).
_SM80_CONFIGS = {
    (64, "16bit"): _cfg((128, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 2)),
    (128, "16bit"): _cfg((128, 32, 8, 2), (64, 64, 8, 2), (64, 64, 8, 2)),
    (64, "fp32"): _cfg((32, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
    (128, "fp32"): _cfg((32, 32, 8, 1), (16, 32, 8, 2), (32, 32, 8, 2)),
}
# sm_90a's 16-bit backward follows flex_attention's H100 defaults (torch 2.13's inductor
# template heuristics: 64 query rows per dk/dv step over 128 keys per program, 128 query rows
# per dq program over 64-key steps, 3 stages, 8 warps), the nearest measured prior: on the
# first H200 run our backward took 8.2 ms on 64 x 64 tiles with 2 stages, flex_attention's
# 4.0 on its own (docs/gpu-runs.md). At head dim 128 dk/dv takes 32 query rows per step and
# 2 stages: 64 rows spill there, and 3 stages spill under Triton 3.6 (docs/tuning.md). The forward
# takes flex's third stage at head dim 128. Untimed, as the others.
_SM90_CONFIGS = {
    (64, "16bit"): _cfg((128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3)),
    (128, "16bit"): _cfg((128, 64, 8, 3), (128, 64, 8, 3), (32, 128, 8, 2)),
    (64, "fp32"): _cfg((32, 16, 4, 2), (64, 32, 8, 2), (32, 16, 4, 2)),
    (128, "fp32"): _cfg((16, 16, 4, 1), (32, 32, 8, 3), (16, 16, 4, 1)),
}
# The 99 KB parts (sm_86, sm_89, sm_120): sm_80's 16-bit rows (the largest needs 73 KB of
# shared memory, 74752 B for dkdv head dim 128; sm_90a's, sized for 227 KB parts, need up to
# 97 KB, 99328 B, at the edge of the 99 KB per block these parts allow); their fp32
# rows spill on these targets (ptxas allocates differently from sm_80), so fp32 takes smaller
# tiles, spill-free on all three.
_SM99KB_CONFIGS = {
    (64, "16bit"): _SM80_CONFIGS[(64, "16bit")],
    (128, "16bit"): _SM80_CONFIGS[(128, "16bit")],
    (64, "fp32"): _cfg((32, 16, 4, 2), (64, 32, 8, 2), (16, 32, 8, 2)),
    (128, "fp32"): _cfg((16, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 1)),
}
# Head dim 256 is not in the spill check (no preset uses it): small tiles, chosen by hand.
for _table in (_SM80_CONFIGS, _SM90_CONFIGS, _SM99KB_CONFIGS):
    _table.update({(256, kind): _cfg((32, 32, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1)) for kind in ("16bit", "fp32")})
# By hrm.ops.arch name; each row is compiled for its own target in the AOT test.
_GPU_CONFIGS: dict[str, dict[tuple[int, str], AttentionConfig]] = {
    "sm_80": _SM80_CONFIGS,
    "sm_86": _SM99KB_CONFIGS,
    "sm_89": _SM99KB_CONFIGS,
    "sm_90a": _SM90_CONFIGS,
    "sm_120": _SM99KB_CONFIGS,
}
_INTERPRETER_CONFIG = _cfg((16, 16, 1, 1), (16, 16, 1, 1), (16, 16, 1, 1))
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
KERNELS = ("fwd", "dq", "dkdv")  # the tuned kernels, fields of AttentionConfig


def input_kind(dtype: torch.dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def _check_head_dim(head_dim: int) -> None:
    if head_dim not in TRITON_HEAD_DIMS:
        raise HrmError(f"the triton attention kernels need head_dim in {TRITON_HEAD_DIMS}, got {head_dim}")


def default_attention_config(head_dim: int, dtype: torch.dtype, arch: str) -> AttentionConfig:
    """The heuristic default of :data:`_GPU_CONFIGS` for an :data:`hrm.ops.arch.ARCHS` name."""
    _check_head_dim(head_dim)
    return _GPU_CONFIGS[arch][(max(head_dim, 64), input_kind(dtype))]


_CONFIG_CACHE: dict[tuple, tuple[AttentionConfig, dict[str, str]]] = {}


def clear_config_cache() -> None:
    """Forget resolved configs (after a tuning table changed in this process; tests)."""
    _CONFIG_CACHE.clear()


def attention_config(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, device_name: str | None = None
) -> AttentionConfig:
    """Tile sizes for ``head_dim``, input ``dtype`` and GPU ``capability`` (``None``: the
    interpreter, which wants small tiles so that short test rows still span many). Each
    kernel's tiles come from the tuning tables (:mod:`hrm.tuning.table`: the exact device
    ``device_name``'s table, then one of the same capability), else from the heuristic
    default of its architecture. Resolved once per argument tuple (no file I/O per call)."""
    return attention_config_source(head_dim, dtype, capability, device_name)[0]


def attention_config_source(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, device_name: str | None = None
) -> tuple[AttentionConfig, dict[str, str]]:
    """:func:`attention_config` and where each kernel's tiles come from (``{kernel: why}``)."""
    key = (head_dim, dtype, None if capability is None else tuple(capability), device_name)
    hit = _CONFIG_CACHE.get(key)
    if hit is None:
        if torch.compiler.is_compiling() and capability is not None:
            # first seen while tracing: reading tables is no graph op, so the defaults, uncached
            return _resolve_config(*key, tables=False)
        hit = _CONFIG_CACHE[key] = _resolve_config(*key)
    return hit


def _resolve_config(
    head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None, device_name: str | None, tables: bool = True
) -> tuple[AttentionConfig, dict[str, str]]:
    _check_head_dim(head_dim)
    if capability is None:
        return _INTERPRETER_CONFIG, {k: "the interpreter's config (small tiles)" for k in KERNELS}
    from hrm.ops.arch import arch_for_capability
    from hrm.tuning.kernels import attention_bucket
    from hrm.tuning.table import lookup

    match = arch_for_capability(capability)
    cfg = default_attention_config(head_dim, dtype, match.arch.name)
    default_why = f"heuristic default for {match.arch.name} (compiles without spills; not timed)"
    if match.note:
        default_why += f"; {match.note}"
    why, tuned = {}, {}
    for k in KERNELS:
        if not tables:
            why[k] = default_why
            continue
        t = lookup(f"prefixlm_attention.{k}", attention_bucket(head_dim, dtype), device_name, tuple(capability))
        try:
            tuned[k], why[k] = (KernelConfig(**t.config), t.why) if t is not None else (None, default_why)
        except TypeError as e:  # a table from a version with other config fields
            warnings.warn(f"ignoring the tuned prefixlm_attention.{k} config {t.config}: {e}", stacklevel=2)
            tuned[k], why[k] = None, default_why
    tuned = {k: c for k, c in tuned.items() if c is not None}
    return replace(cfg, **tuned), why


def device_capability(device: torch.device) -> tuple[int, int] | None:
    return None if device.type != "cuda" or interpreting() else torch.cuda.get_device_capability(device)


_DEVICE_NAMES: dict[int, str] = {}


def device_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    """:func:`attention_config` for tensors on ``device`` (its capability and name, read once)."""
    capability = device_capability(device)
    if capability is None:
        return attention_config(head_dim, dtype, None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _DEVICE_NAMES.get(index)
    if name is None and not torch.compiler.is_compiling():
        name = _DEVICE_NAMES[index] = torch.cuda.get_device_name(index)
    return attention_config(head_dim, dtype, capability, name)


# -- Triton kernels ------------------------------------------------------------------------
@jit
def _tile_range(RANGES, block):
    """``(first, full_first, full_end, end)``: the block's tiles as :func:`tile_ranges` lists
    them (partial ``[first, full_first)``, full ``[full_first, full_end)``, partial
    ``[full_end, end)``)."""
    return (
        tl.load(RANGES + block * 4),
        tl.load(RANGES + block * 4 + 1),
        tl.load(RANGES + block * 4 + 2),
        tl.load(RANGES + block * 4 + 3),
    )


@jit
def _block_rows(X, Y, block, h, T, H, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Rows ``block * BLOCK ...`` of head ``h`` of two contiguous ``[T, H, D]`` tensors:
    ``(idx, ok, offs, x, y)`` (rows past T read as zeros)."""
    idx = block * BLOCK + tl.arange(0, BLOCK)
    ok = idx < T
    offs = (idx.to(tl.int64)[:, None] * H + h) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    return idx, ok, offs, tl.load(X + offs, mask=ok[:, None], other=0.0), tl.load(Y + offs, mask=ok[:, None], other=0.0)


@jit
def _tile_offset(tile, BLOCK: tl.constexpr, stride):
    """Element offset of tile ``tile``'s first row, ``tile * BLOCK * stride``, in 64 bits: with
    the token stride of a fused projection view (``4 * heads * head_dim``) the 32-bit product
    passes 2**31 at about 262K tokens."""
    return tl.cast(tile, tl.int64) * BLOCK * stride


@jit
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    lo,
    hi,
    start,
    end,
    T,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key tiles ``[start, end)``. MASKED is a constexpr so that full
    tiles compile without the bounds checks and the interval test (the common case)."""
    offs_n = tl.arange(0, BLOCK_N)
    for kb in range(start, end):
        cols = kb * BLOCK_N + offs_n
        k_step, v_step = _tile_offset(kb, BLOCK_N, stride_kt), _tile_offset(kb, BLOCK_N, stride_vt)
        if MASKED:
            k = tl.load(k_ptrs + k_step, mask=(cols < T)[None, :], other=0.0)
            v = tl.load(v_ptrs + v_step, mask=(cols < T)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + k_step)
            v = tl.load(v_ptrs + v_step)
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
def _prefixlm_fwd_kernel(
    Q,
    K,
    V,
    G,
    O,
    LSE,
    ROW_LO,
    ROW_HI,
    RANGES,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gt,
    stride_gh,
    T,
    H,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        lo,
        hi,
        first,
        full_first,
        T,
        qk_scale,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        lo,
        hi,
        full_first,
        full_end,
        T,
        qk_scale,
        BLOCK_N,
        False,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        lo,
        hi,
        full_end,
        end,
        T,
        qk_scale,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_GATE:
        g = tl.load(
            G + rows64[:, None] * stride_gt + h * stride_gh + offs_d[None, :], mask=row_ok[:, None], other=0.0
        ).to(tl.float32)
        out = out * tl.sigmoid(g)
    tl.store(
        O + (rows64[:, None] * H + h) * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None]
    )
    tl.store(LSE + h * T + rows, tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, 0.0), mask=row_ok)


@jit
def _bwd_preprocess_kernel(
    GO, O, G, DO, DG, DELTA, T, H, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_GATE: tl.constexpr
):
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
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    ROW_LO,
    ROW_HI,
    h,
    cols,
    start,
    end,
    T,
    H,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
        p_t = tl.math.exp2(
            tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :] * LOG2E
        )  # [BLOCK_N, BLOCK_M]
        if MASKED:
            p_t = tl.where((cols[:, None] >= lo[None, :]) & (cols[:, None] < hi[None, :]), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@jit
def _prefixlm_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    ROW_LO,
    ROW_HI,
    RANGES,
    T,
    H,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        ROW_LO,
        ROW_HI,
        h,
        cols,
        first,
        full_first,
        T,
        H,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        True,
        DOT_PRECISION,
    )
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        ROW_LO,
        ROW_HI,
        h,
        cols,
        full_first,
        full_end,
        T,
        H,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        False,
        DOT_PRECISION,
    )
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        Q,
        DO,
        LSE,
        DELTA,
        ROW_LO,
        ROW_HI,
        h,
        cols,
        full_end,
        end,
        T,
        H,
        qk_scale,
        HEAD_DIM,
        BLOCK_M,
        True,
        DOT_PRECISION,
    )
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    K,
    V,
    lo,
    hi,
    h,
    start,
    end,
    T,
    H,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
def _prefixlm_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    ROW_LO,
    ROW_HI,
    RANGES,
    T,
    H,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (query block, head): ``dq = scale * sum_j p (dO . v_j - delta) k_j`` with ``p``
    recomputed from the saved ``lse``. All tensors are contiguous ``[T, H, D]``."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    rows, row_ok, offs, q, do = _block_rows(Q, DO, qb, h, T, H, HEAD_DIM, BLOCK_M)
    lse2 = tl.load(LSE + h * T + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + h * T + rows, mask=row_ok, other=0.0)
    lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)
    hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
    first, full_first, full_end, end = _tile_range(RANGES, qb)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        K,
        V,
        lo,
        hi,
        h,
        first,
        full_first,
        T,
        H,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        K,
        V,
        lo,
        hi,
        h,
        full_first,
        full_end,
        T,
        H,
        qk_scale,
        HEAD_DIM,
        BLOCK_N,
        False,
        DOT_PRECISION,
    )
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K, V, lo, hi, h, full_end, end, T, H, qk_scale, HEAD_DIM, BLOCK_N, True, DOT_PRECISION
    )
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


def kernel_config(q: Tensor) -> AttentionConfig:
    """The tiles the launchers use for ``q``'s head dim, dtype and device."""
    return device_config(q.shape[-1], q.dtype, q.device)


def prefixlm_attention_triton_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    row_lo: Tensor,
    row_hi: Tensor,
    gate: Tensor | None = None,
    config: AttentionConfig | None = None,
    ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [T, H, D], lse [H, T] fp32)``; ``q, k, v, gate`` may be strided over tokens and
    heads. ``ranges``: the forward's tile ranges under ``config`` (computed here if absent)."""
    _triton_ready(q)
    T, H, D = q.shape
    cfg = (config or kernel_config(q)).fwd
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    g = _last_dim_contiguous(gate) if gate is not None else q  # q: a placeholder that HAS_GATE=False never reads
    out = q.new_empty(T, H, D)
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    if ranges is None:
        ranges = tile_ranges(row_lo, row_hi, cfg.block_m, cfg.block_n)
    with device_of(q):
        _prefixlm_fwd_kernel[(cdiv(T, cfg.block_m), H)](
            q,
            k,
            v,
            g,
            out,
            lse,
            row_lo,
            row_hi,
            ranges,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            g.stride(0),
            g.stride(1),
            T,
            H,
            D**-0.5 * LOG2E.value,
            HEAD_DIM=D,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            HAS_GATE=gate is not None,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out, lse


def prefixlm_attention_triton_backward(
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
    gate: Tensor | None = None,
    config: AttentionConfig | None = None,
    dq_ranges: Tensor | None = None,
    dkdv_ranges: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dgate)``; ``dgate`` is an empty tensor when there is no gate. The tile
    ranges under ``config`` are computed here when not given."""
    _triton_ready(q)
    T, H, D = q.shape
    cfg = config or kernel_config(q)
    grad_out, q, k, v, out = (x.contiguous() for x in (grad_out, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if gate is not None:
        gate = gate.contiguous()
        do, dgate = torch.empty_like(q), torch.empty_like(gate)
    else:
        do, dgate = grad_out, q.new_empty(0)
    if T == 0:
        return dq, dk, dv, dgate
    if dq_ranges is None:
        dq_ranges = tile_ranges(row_lo, row_hi, cfg.dq.block_m, cfg.dq.block_n)
    if dkdv_ranges is None:
        dkdv_ranges = tile_ranges(col_lo, col_hi, cfg.dkdv.block_n, cfg.dkdv.block_m)
    delta = torch.empty(H, T, dtype=torch.float32, device=q.device)
    block = cdiv(4096, D) if tile_target() == "gpu" else min(1024, 1 << (T - 1).bit_length())
    scale, prec = D**-0.5, _dot_precision(q.dtype)
    with device_of(q):
        _bwd_preprocess_kernel[(cdiv(T, block), H)](
            grad_out,
            out,
            gate if gate is not None else q,
            do,
            dgate,
            delta,
            T,
            H,
            HEAD_DIM=D,
            BLOCK_M=block,
            HAS_GATE=gate is not None,
        )
        c = cfg.dkdv
        _prefixlm_dkdv_kernel[(cdiv(T, c.block_n), H)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            row_lo,
            row_hi,
            dkdv_ranges,
            T,
            H,
            scale * LOG2E.value,
            scale,
            HEAD_DIM=D,
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            DOT_PRECISION=prec,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
        c = cfg.dq
        _prefixlm_dq_kernel[(cdiv(T, c.block_m), H)](
            q,
            k,
            v,
            do,
            lse,
            delta,
            dq,
            row_lo,
            row_hi,
            dq_ranges,
            T,
            H,
            scale * LOG2E.value,
            scale,
            HEAD_DIM=D,
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            DOT_PRECISION=prec,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )
    return dq, dk, dv, dgate


def aot_specs(head_dim: int, dtype: torch.dtype, capability: int, config: AttentionConfig | None = None) -> list:
    """The four Triton kernels at ``config`` (default: the architecture's heuristic default,
    never a tuned table), as :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec
    from hrm.ops.arch import arch_for_capability

    cfg = config or default_attention_config(head_dim, dtype, arch_for_capability(capability).arch.name)
    t, where = TRITON_TYPES[dtype], f"{__name__}:"
    f32, i32 = pointers(torch.float32, "LSE", "DELTA"), {n: "*i32" for n in ("ROW_LO", "ROW_HI", "RANGES")}
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    prec = _dot_precision(dtype)
    strides = [f"stride_{a}{b}" for a in "qkvg" for b in "th"]
    fwd = KernelSpec(
        f"fwd {t}",
        where + "_prefixlm_fwd_kernel",
        {
            **pointers(dtype, "Q", "K", "V", "G", "O"),
            "LSE": f32["LSE"],
            **i32,
            **ints(*strides, "T", "H"),
            "qk_scale": "fp32",
        },
        {
            "HEAD_DIM": head_dim,
            "BLOCK_M": cfg.fwd.block_m,
            "BLOCK_N": cfg.fwd.block_n,
            "HAS_GATE": True,
            "DOT_PRECISION": prec,
        },
        cfg.fwd.num_warps,
        cfg.fwd.num_stages,
        ("Q", "K", "V", "G", "O", "LSE", "ROW_LO", "ROW_HI", "RANGES", *strides),
    )
    pre = KernelSpec(
        f"bwd_preprocess {t}",
        where + "_bwd_preprocess_kernel",
        {**pointers(dtype, "GO", "O", "G", "DO", "DG"), "DELTA": f32["DELTA"], **ints("T", "H")},
        {"HEAD_DIM": head_dim, "BLOCK_M": cdiv(4096, head_dim), "HAS_GATE": True},
        4,
        1,
        ("GO", "O", "G", "DO", "DG", "DELTA"),
    )
    bwd_sig = {
        **pointers(dtype, "Q", "K", "V", "DO", "DK", "DV", "DQ"),
        **f32,
        **i32,
        **ints("T", "H"),
        "qk_scale": "fp32",
        "sm_scale": "fp32",
    }
    aligned = ("Q", "K", "V", "DO", "LSE", "DELTA", "ROW_LO", "ROW_HI", "RANGES")
    specs = [fwd, pre]
    for name, kernel, c, out in (
        ("dkdv", "_prefixlm_dkdv_kernel", cfg.dkdv, ("DK", "DV")),
        ("dq", "_prefixlm_dq_kernel", cfg.dq, ("DQ",)),
    ):
        sig = {k: v for k, v in bwd_sig.items() if k not in {"DK", "DV", "DQ"} - set(out)}
        specs.append(
            KernelSpec(
                f"{name} {t}",
                where + kernel,
                sig,
                {"HEAD_DIM": head_dim, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "DOT_PRECISION": prec},
                c.num_warps,
                c.num_stages,
                aligned + out,
            )
        )
    return specs


def aot_report(
    head_dims: tuple[int, ...] = (64, 128),
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
    capabilities: tuple[int, ...] = (80, 86, 89, 90, 120),
    jobs: int | None = None,
) -> list[dict]:
    """Registers, spills and shared memory of every attention kernel at its default
    configuration, compiled ahead of time for each capability (see :mod:`hrm.ops.aot`)."""
    from hrm.ops.aot import compile_report

    rows = []
    for cap in capabilities:
        specs = [s for hd in head_dims for dt in dtypes for s in aot_specs(hd, dt, cap)]
        rows += compile_report(specs, (cap,), jobs)
    return rows
