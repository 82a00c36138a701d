"""Rotary position embedding, rotate-half convention, fp32 cos/sin.

For a head vector ``x = [x1 | x2]`` of even size ``hd`` at position ``p``:
``inv_freq[i] = theta ** (-2i / hd)``, ``angle = p * [inv_freq, inv_freq]`` and
``rope(x) = x * cos(angle) + rotate_half(x) * sin(angle)`` with
``rotate_half([x1, x2]) = [-x2, x1]``. Positions restart at 0 for every packed sequence.
With ``cos = [c1 | c2]``, ``sin = [s1 | s2]``:

    y1 = x1 * c1 - x2 * s1          dx1 = dy1 * c1 + dy2 * s2
    y2 = x2 * c2 + x1 * s2          dx2 = dy2 * c2 - dy1 * s1

:func:`split_rope` is the fused op the attention layer uses: it splits the fused
``[gate | q | k | v]`` projection output ``[T, 4 * heads, hd]`` into four contiguous
``[T, heads, hd]`` tensors and rotates ``q`` and ``k`` on the way, in one pass; its
backward applies the transposed rotation while writing the one ``[T, 4 * heads, hd]``
gradient. Nothing is saved for backward but ``cos`` and ``sin``.

Backends of :func:`split_rope`: ``torch`` (the reference), ``triton`` and ``compile`` (the
kernels and graphs below), ``cpu`` (``csrc/elementwise/elementwise_cpu.cpp``, fp32 and bf16
with fp32 ``cos``/``sin``; other dtypes run on ``compile``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrm.ops.common import (
    TRITON_TYPES,
    TileTarget,
    cdiv,
    compiled,
    compute_dtype,
    device_of,
    jit,
    needs_grad,
    next_pow2,
    pointers,
    row_settings,
    tile_target,
    tl,
    tuned_row_config,
)
from hrm.ops.dispatch import fallback_impl, get_impl, register
from hrm.ops.impl.swiglu import elementwise_cpu_ops


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 ``cos, sin`` of shape ``[T, head_dim]`` for the given positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    )
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register("rope", "torch")
def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[T, heads, hd]``; ``cos``/``sin``: ``[T, hd]``. Computes in fp32 (fp64 for fp64)."""
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    c, s = cos.to(dt)[:, None, :], sin.to(dt)[:, None, :]
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


@register("split_rope", "torch")
def split_rope_reference(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``gqkv``: ``[T, 4 * heads, hd]`` laid out ``[gate | q | k | v]``; returns
    ``(gate, rope(q), rope(k), v)``, each ``[T, heads, hd]``."""
    gate, q, k, v = gqkv.split(gqkv.shape[1] // 4, dim=1)
    return gate, rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


# -- Triton kernels ------------------------------------------------------------------------
@jit
def _store_pair(OUT, offs, half, y1, y2, mask):
    tl.store(OUT + offs, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + offs + half, y2.to(OUT.dtype.element_ty), mask=mask)


@jit
def _rope_tile(COS, SIN, n_tokens, n_heads, head_dim, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
    """This program's tile of tokens x (head, pair) columns: ``(half, t64, head, pair, mask,
    c1, c2, s1, s2)`` with the cos/sin of both halves of each pair."""
    half = head_dim // 2
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_J)
    head, pair = j // half, j % half
    mask = (t[:, None] < n_tokens) & (j[None, :] < n_heads * half)
    t64 = t[:, None].to(tl.int64)
    trig = t64 * head_dim + pair[None, :]
    c1, c2 = tl.load(COS + trig, mask=mask, other=0.0), tl.load(COS + trig + half, mask=mask, other=0.0)
    s1, s2 = tl.load(SIN + trig, mask=mask, other=0.0), tl.load(SIN + trig + half, mask=mask, other=0.0)
    return half, t64, head, pair, mask, c1, c2, s1, s2


@jit
def _split_rope_fwd_kernel(
    GQKV, COS, SIN, G, Q, K, V, n_tokens, n_heads, head_dim, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr
):
    """A tile of tokens, all heads; tile column ``j`` is (head ``j // half``, pair ``j % half``).
    The four parts (0 gate, 1 q, 2 k, 3 v) are a constexpr loop, so that whether a part
    rotates and where it goes are settled at compile time: q and k get
    ``(x1 c1 - x2 s1, x2 c2 + x1 s2)``, gate and v are copied; each part to its own
    contiguous ``[T, heads, hd]`` output. cos/sin are loaded once for q and k."""
    half, t64, head, pair, mask, c1, c2, s1, s2 = _rope_tile(COS, SIN, n_tokens, n_heads, head_dim, BLOCK_T, BLOCK_J)
    dst = t64 * (n_heads * head_dim) + head[None, :] * head_dim + pair[None, :]
    for part in tl.static_range(4):
        src = GQKV + t64 * (4 * n_heads * head_dim) + (part * n_heads + head[None, :]) * head_dim + pair[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        if part == 0:
            _store_pair(G, dst, half, x1, x2, mask)
        elif part == 1:
            _store_pair(Q, dst, half, x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, mask)
        elif part == 2:
            _store_pair(K, dst, half, x1 * c1 - x2 * s1, x2 * c2 + x1 * s2, mask)
        else:
            _store_pair(V, dst, half, x1, x2, mask)


@jit
def _split_rope_bwd_kernel(
    DG, DQ, DK, DV, COS, SIN, DGQKV, n_tokens, n_heads, head_dim, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr
):
    """The transpose of the forward: ``(d1 c1 + d2 s2, d2 c2 - d1 s1)`` for q and k, a copy
    for gate and v, all written into the one fused ``[T, 4 * heads, hd]`` gradient."""
    half, t64, head, pair, mask, c1, c2, s1, s2 = _rope_tile(COS, SIN, n_tokens, n_heads, head_dim, BLOCK_T, BLOCK_J)
    src = t64 * (n_heads * head_dim) + head[None, :] * head_dim + pair[None, :]
    for part in tl.static_range(4):
        dst = t64 * (4 * n_heads * head_dim) + (part * n_heads + head[None, :]) * head_dim + pair[None, :]
        if part == 0:
            d1, d2 = tl.load(DG + src, mask=mask, other=0.0), tl.load(DG + src + half, mask=mask, other=0.0)
            _store_pair(DGQKV, dst, half, d1.to(tl.float32), d2.to(tl.float32), mask)
        elif part == 1:
            d1 = tl.load(DQ + src, mask=mask, other=0.0).to(tl.float32)
            d2 = tl.load(DQ + src + half, mask=mask, other=0.0).to(tl.float32)
            _store_pair(DGQKV, dst, half, d1 * c1 + d2 * s2, d2 * c2 - d1 * s1, mask)
        elif part == 2:
            d1 = tl.load(DK + src, mask=mask, other=0.0).to(tl.float32)
            d2 = tl.load(DK + src + half, mask=mask, other=0.0).to(tl.float32)
            _store_pair(DGQKV, dst, half, d1 * c1 + d2 * s2, d2 * c2 - d1 * s1, mask)
        else:
            d1, d2 = tl.load(DV + src, mask=mask, other=0.0), tl.load(DV + src + half, mask=mask, other=0.0)
            _store_pair(DGQKV, dst, half, d1.to(tl.float32), d2.to(tl.float32), mask)


def _tiles(n_tokens: int, n_heads: int, head_dim: int, target: TileTarget) -> tuple[tuple[int], int, int, int]:
    block_j = next_pow2(n_heads * head_dim // 2)
    block_t, num_warps = row_settings(n_tokens, 2 * block_j, target)  # a token row is two half-tiles of x
    return (cdiv(n_tokens, block_t),), block_t, block_j, num_warps


# -- launchers -----------------------------------------------------------------------------
def split_rope_forward(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gqkv = gqkv.contiguous()
    T, four_h, hd = gqkv.shape
    parts = [gqkv.new_empty(T, four_h // 4, hd) for _ in range(4)]
    if T:
        grid, block_t, block_j, num_warps = _tiles(T, four_h // 4, hd, tile_target())
        block_t, num_warps = tuned_row_config("split_rope.fwd", four_h // 4 * hd, gqkv, block_t, num_warps)
        grid = (cdiv(T, block_t),)
        with device_of(gqkv):
            _split_rope_fwd_kernel[grid](
                gqkv,
                cos.float().contiguous(),
                sin.float().contiguous(),
                *parts,
                T,
                four_h // 4,
                hd,
                BLOCK_T=block_t,
                BLOCK_J=block_j,
                num_warps=num_warps,
            )
    return tuple(parts)


def split_rope_backward(dgate: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    T, H, hd = dq.shape
    dgqkv = dq.new_empty(T, 4 * H, hd)
    if T:
        grid, block_t, block_j, num_warps = _tiles(T, H, hd, tile_target())
        block_t, num_warps = tuned_row_config("split_rope.bwd", H * hd, dq, block_t, num_warps)
        grid = (cdiv(T, block_t),)
        with device_of(dq):
            _split_rope_bwd_kernel[grid](
                dgate.contiguous(),
                dq.contiguous(),
                dk.contiguous(),
                dv.contiguous(),
                cos.float().contiguous(),
                sin.float().contiguous(),
                dgqkv,
                T,
                H,
                hd,
                BLOCK_T=block_t,
                BLOCK_J=block_j,
                num_warps=num_warps,
            )
    return dgqkv


# -- custom ops (the triton backend) ------------------------------------------------------
@torch.library.custom_op("hrm::split_rope", mutates_args=())
def _split_rope_op(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return split_rope_forward(gqkv, cos, sin)


@_split_rope_op.register_fake
def _split_rope_fake(gqkv, cos, sin):
    T, four_h, hd = gqkv.shape
    return tuple(gqkv.new_empty(T, four_h // 4, hd) for _ in range(4))


@torch.library.custom_op("hrm::split_rope_backward", mutates_args=())
def _split_rope_backward_op(dgate: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return split_rope_backward(dgate, dq, dk, dv, cos, sin)


@_split_rope_backward_op.register_fake
def _split_rope_backward_fake(dgate, dq, dk, dv, cos, sin):
    T, H, hd = dq.shape
    return dq.new_empty(T, 4 * H, hd)


def _split_rope_setup(ctx, inputs, output) -> None:
    _, cos, sin = inputs
    ctx.part_shape, ctx.part_dtype = output[0].shape, output[0].dtype  # for parts that get no gradient
    ctx.save_for_backward(cos, sin)


def _autograd_backward(backward_op):
    """The autograd backward of a split-RoPE custom op whose gradient op is ``backward_op``
    (parts that get no gradient count as zeros)."""

    def backward(ctx, dgate, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        grads = [
            g if g is not None else torch.zeros(ctx.part_shape, dtype=ctx.part_dtype, device=cos.device)
            for g in (dgate, dq, dk, dv)
        ]
        return backward_op(*grads, cos, sin), None, None

    return backward


_split_rope_op.register_autograd(_autograd_backward(_split_rope_backward_op), setup_context=_split_rope_setup)


@register("split_rope", "triton")
def split_rope_triton(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _split_rope_op(gqkv, cos, sin)


def aot_specs(num_heads: int, head_dim: int, dtype: torch.dtype, tokens: int = 8192) -> list:
    """Both kernels at the tiles the launchers pick on a GPU, as :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec

    _, block_t, block_j, num_warps = _tiles(tokens, num_heads, head_dim, "gpu")
    tiles = {"BLOCK_T": block_t, "BLOCK_J": block_j}
    sizes = {"n_tokens": "i32", "n_heads": "i32", "head_dim": "i32"}
    tag, where = f"{num_heads}x{head_dim} {TRITON_TYPES[dtype]}", f"{__name__}:"
    trig = pointers(torch.float32, "COS", "SIN")
    fwd_ptrs, bwd_ptrs = ("GQKV", "G", "Q", "K", "V"), ("DG", "DQ", "DK", "DV", "DGQKV")
    return [
        KernelSpec(
            f"split_rope_fwd {tag}",
            where + "_split_rope_fwd_kernel",
            {**pointers(dtype, *fwd_ptrs[:1]), **trig, **pointers(dtype, *fwd_ptrs[1:]), **sizes},
            tiles,
            num_warps,
            1,
            (*fwd_ptrs, *trig, "head_dim"),
        ),
        KernelSpec(
            f"split_rope_bwd {tag}",
            where + "_split_rope_bwd_kernel",
            {**pointers(dtype, *bwd_ptrs[:4]), **trig, **pointers(dtype, *bwd_ptrs[4:]), **sizes},
            tiles,
            num_warps,
            1,
            (*bwd_ptrs, *trig, "head_dim"),
        ),
    ]


# -- compile backend -----------------------------------------------------------------------
def _split_rope_forward_math(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gate, q, k, v = gqkv.split(gqkv.shape[1] // 4, dim=1)
    return gate.contiguous(), rope_reference(q, cos, sin), rope_reference(k, cos, sin), v.contiguous()


def _rope_transposed(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The adjoint of :func:`rope_reference`: ``dy * cos - rotate_half(dy * sin)``."""
    dt = compute_dtype(dy.dtype)
    d = dy.to(dt)
    return (d * cos.to(dt)[:, None, :] - rotate_half(d * sin.to(dt)[:, None, :])).to(dy.dtype)


def _split_rope_backward_math(dgate: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.cat([dgate, _rope_transposed(dq, cos, sin), _rope_transposed(dk, cos, sin), dv], dim=1)


_split_rope_fwd_compiled = compiled(_split_rope_forward_math)
_split_rope_bwd_compiled = compiled(_split_rope_backward_math)


class _SplitRopeCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.save_for_backward(cos, sin)
        return _split_rope_fwd_compiled(gqkv, cos, sin)

    @staticmethod
    def backward(ctx, dgate: Tensor, dq: Tensor, dk: Tensor, dv: Tensor):
        cos, sin = ctx.saved_tensors
        return _split_rope_bwd_compiled(dgate, dq, dk, dv, cos, sin), None, None


@register("split_rope", "compile")
def split_rope_compile(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not needs_grad(gqkv):
        return _split_rope_fwd_compiled(gqkv, cos, sin)
    return _SplitRopeCompiled.apply(gqkv, cos, sin)


# -- cpu backend: csrc/elementwise/elementwise_cpu.cpp ------------------------------------------
@torch.library.custom_op("hrm::split_rope_cpu", mutates_args=())
def _split_rope_cpu_op(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(elementwise_cpu_ops().split_rope_fwd(gqkv, cos, sin))


_split_rope_cpu_op.register_fake(_split_rope_fake)


@torch.library.custom_op("hrm::split_rope_cpu_backward", mutates_args=())
def _split_rope_cpu_backward_op(dgate: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return elementwise_cpu_ops().split_rope_bwd(dgate, dq, dk, dv, cos, sin)


_split_rope_cpu_backward_op.register_fake(_split_rope_backward_fake)


_split_rope_cpu_op.register_autograd(_autograd_backward(_split_rope_cpu_backward_op), setup_context=_split_rope_setup)


@register("split_rope", "cpu")
def split_rope_cpu(gqkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The C++ kernel for fp32 and bf16 CPU tensors with fp32 ``cos``/``sin`` (timed against
    the others by ``hrm bench --suite ops``, row ``split_rope``); others run on the fallback."""
    if gqkv.device.type != "cpu" or gqkv.dtype not in (torch.float32, torch.bfloat16) or cos.dtype != torch.float32:
        return fallback_impl("split_rope", "cpu")(gqkv, cos, sin)
    return _split_rope_cpu_op(gqkv.contiguous(), cos.contiguous(), sin.contiguous())


# -- public --------------------------------------------------------------------------------
def rope(x: Tensor, cos: Tensor, sin: Tensor, *, backend: str | None = None) -> Tensor:
    """Apply RoPE to ``x`` of shape ``[T, heads, head_dim]``."""
    return get_impl("rope", backend)(x, cos, sin)


def split_rope(
    gqkv: Tensor, cos: Tensor, sin: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(gate, rope(q), rope(k), v)`` from the fused projection output ``[T, 4 * heads, hd]``
    laid out ``[gate | q | k | v]``; each ``[T, heads, hd]``."""
    return get_impl("split_rope", backend)(gqkv, cos, sin)
