"""MagicNorm transition: the seam between two stack invocations of the HRM recurrence, in one pass.

A stack ends with its last block's MLP add and its exit RMSNorm; the next invocation
starts with the injection add and its first block's pre-norm. With ``x`` the residual
stream before the last MLP add, ``delta`` that MLP's output and ``other`` the state that
is injected (``z_H`` after an L step, ``z_L`` after an H step):

    h = x + delta                      (the last residual add)
    z = h * rstd(h)                    (exit norm: the new state z_L or z_H)
    u = z + other                      (injection: the next stack's residual stream)
    n = u * rstd(u)                    (the next block's pre-norm)

with ``rstd(t) = 1 / sqrt(mean(t**2, -1) + eps)`` in fp32 and ``h``, ``z``, ``u``, ``n`` stored
(and ``h``, ``u`` rounded) in the input dtype; with ``out_dtype`` (the dtype of the linear layer
that reads ``n``), ``n`` is then cast to it (fused by the ``compile`` backend, after the op by
the others). Returns ``(z, u, n)``; ``h`` never reaches memory.
Saved for backward: ``z`` (the state, alive anyway), ``n`` (the next linear layer saves it
too; where the fused cast rounds ``n``, ``u`` instead, and ``n = u * rstd(u)`` is recomputed)
and the two fp32 ``rstd`` per row. Backward:

    du' = du + rstd(u) * (dn - n * mean(dn * n))        = d other
    dh  = rstd(h) * (dz' - z * mean(dz' * z)),  dz' = dz + du'   = d x = d delta
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hrm.ops import cuda_extension
from hrm.ops.common import (
    cast,
    cdiv,
    compiled,
    compute_dtype,
    device_of,
    jit,
    needs_grad,
    pointers,
    row_kernel_aot,
    rows_2d,
    tile_target,
    tl,
    tuned_row_config,
)
from hrm.ops.dispatch import fallback_impl, get_impl, register
from hrm.ops.impl.rms_norm import normed, rms_norm_forward_math, rms_norm_grad_math, rms_norm_reference, row_tiles


@register("magicnorm_transition", "torch")
def magicnorm_transition_reference(
    x: Tensor, delta: Tensor, other: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    z = rms_norm_reference(x + delta, eps)
    u = z + other
    return z, u, rms_norm_reference(u, eps, out_dtype)


# -- Triton kernels ------------------------------------------------------------------------
@jit
def _transition_fwd_kernel(
    X, DELTA, OTHER, Z, U, N, RSTD_H, RSTD_U, n_rows, n_cols, eps, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """``h = x + delta; z = h * rstd(h); u = z + other; n = u * rstd(u)`` for a tile of rows:
    three loads, three stores and two fp32 ``rstd`` per row (saved for the backward)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(DELTA + offs, mask=mask, other=0.0).to(
        tl.float32
    )
    h = h.to(Z.dtype.element_ty).to(tl.float32)  # h, z in promote(x, delta); u, n in promote(z, other)
    rstd_h = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    z = (h * rstd_h[:, None]).to(Z.dtype.element_ty)
    tl.store(Z + offs, z, mask=mask)
    u = (z.to(tl.float32) + tl.load(OTHER + offs, mask=mask, other=0.0).to(tl.float32)).to(U.dtype.element_ty)
    tl.store(U + offs, u, mask=mask)
    u = u.to(tl.float32)
    rstd_u = tl.rsqrt(tl.sum(u * u, axis=1) / n_cols + eps)
    tl.store(N + offs, (u * rstd_u[:, None]).to(N.dtype.element_ty), mask=mask)
    tl.store(RSTD_H + rows, rstd_h, mask=row_ok)
    tl.store(RSTD_U + rows, rstd_u, mask=row_ok)


@jit
def _transition_bwd_kernel(
    DZ,
    DU,
    DN,
    Z,
    N,
    RSTD_H,
    RSTD_U,
    DH,
    DOTHER,
    n_rows,
    n_cols,
    HAS_DZ: tl.constexpr,
    HAS_DU: tl.constexpr,
    HAS_DN: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``du' = du + rstd_u * (dn - n * mean(dn * n))`` (-> d other) and
    ``dh = rstd_h * (dz' - z * mean(dz' * z))`` with ``dz' = dz + du'`` (-> d x = d delta).
    An output that received no gradient is a constexpr flag: its load compiles away."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    du = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    if HAS_DN:
        dn = tl.load(DN + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.load(N + offs, mask=mask, other=0.0).to(tl.float32)
        rstd_u = tl.load(RSTD_U + rows, mask=row_ok, other=0.0)
        du += rstd_u[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / n_cols)[:, None])
    if HAS_DU:
        du += tl.load(DU + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DOTHER + offs, du.to(DOTHER.dtype.element_ty), mask=mask)
    dz = du
    if HAS_DZ:
        dz += tl.load(DZ + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    rstd_h = tl.load(RSTD_H + rows, mask=row_ok, other=0.0)
    dh = rstd_h[:, None] * (dz - z * (tl.sum(dz * z, axis=1) / n_cols)[:, None])
    tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=mask)


# -- launchers -----------------------------------------------------------------------------
def transition_dtypes(x: torch.dtype, delta: torch.dtype, other: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """The reference's output dtypes: ``z`` in ``promote(x, delta)``, ``u`` and ``n`` in
    ``promote(z, other)`` (under autocast a bf16 MLP output meets an fp32 residual stream)."""
    z = torch.promote_types(x, delta)
    return z, torch.promote_types(z, other)


def magicnorm_transition_forward(
    x: Tensor, delta: Tensor, other: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(z, u, n, rstd_h, rstd_u)``."""
    x2, delta2, other2 = rows_2d(x), rows_2d(delta), rows_2d(other)
    n_rows, n_cols = x2.shape
    z_dtype, u_dtype = transition_dtypes(x.dtype, delta.dtype, other.dtype)
    z = torch.empty(x2.shape, dtype=z_dtype, device=x.device)
    u, n = (torch.empty(x2.shape, dtype=u_dtype, device=x.device) for _ in range(2))
    rstd_h, rstd_u = (torch.empty(n_rows, dtype=torch.float32, device=x.device) for _ in range(2))
    if n_rows:
        grid, block_rows, block_cols, num_warps = row_tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("magicnorm_transition.fwd", n_cols, x2, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows),)
        with device_of(x):
            _transition_fwd_kernel[grid](
                x2,
                delta2,
                other2,
                z,
                u,
                n,
                rstd_h,
                rstd_u,
                n_rows,
                n_cols,
                eps,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
            )
    shape = x.shape
    return z.view(shape), u.view(shape), n.view(shape), rstd_h.view(shape[:-1]), rstd_u.view(shape[:-1])


def magicnorm_transition_backward(
    dz: Tensor | None, du: Tensor | None, dn: Tensor | None, z: Tensor, n: Tensor, rstd_h: Tensor, rstd_u: Tensor
) -> tuple[Tensor, Tensor]:
    """``(dh, d other)``; ``dh`` is the gradient of both ``x`` and ``delta``."""
    z2, n2 = rows_2d(z), rows_2d(n)
    n_rows, n_cols = z2.shape
    dh, dother = torch.empty_like(z2), torch.empty_like(n2)  # in h's and u's dtypes
    if n_rows:
        grid, block_rows, block_cols, num_warps = row_tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("magicnorm_transition.bwd", n_cols, z2, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows),)
        dz2, du2, dn2 = (rows_2d(g) if g is not None else z2 for g in (dz, du, dn))
        with device_of(z):
            _transition_bwd_kernel[grid](
                dz2,
                du2,
                dn2,
                z2,
                n2,
                rstd_h.contiguous(),
                rstd_u.contiguous(),
                dh,
                dother,
                n_rows,
                n_cols,
                HAS_DZ=dz is not None,
                HAS_DU=du is not None,
                HAS_DN=dn is not None,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
            )
    return dh.view(z.shape), dother.view(z.shape)


# -- custom ops (the triton backend) ------------------------------------------------------
@torch.library.custom_op("hrm::magicnorm_transition", mutates_args=())
def _transition_op(
    x: Tensor, delta: Tensor, other: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return magicnorm_transition_forward(x, delta, other, eps)


@_transition_op.register_fake
def _(x, delta, other, eps):
    z_dtype, u_dtype = transition_dtypes(x.dtype, delta.dtype, other.dtype)
    rows = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=z_dtype),
        *(x.new_empty(x.shape, dtype=u_dtype) for _ in range(2)),
        *(x.new_empty(rows, dtype=torch.float32) for _ in range(2)),
    )


@torch.library.custom_op("hrm::magicnorm_transition_backward", mutates_args=())
def _transition_backward_op(
    dz: Optional[Tensor],
    du: Optional[Tensor],
    dn: Optional[Tensor],
    z: Tensor,
    n: Tensor,
    rstd_h: Tensor,
    rstd_u: Tensor,
) -> tuple[Tensor, Tensor]:
    return magicnorm_transition_backward(dz, du, dn, z, n, rstd_h, rstd_u)


@_transition_backward_op.register_fake
def _(dz, du, dn, z, n, rstd_h, rstd_u):
    return z.new_empty(z.shape), n.new_empty(n.shape)


def _transition_setup(ctx, inputs, output) -> None:
    z, _, n, rstd_h, rstd_u = output
    ctx.mark_non_differentiable(rstd_h, rstd_u)
    ctx.save_for_backward(z, n, rstd_h, rstd_u)


def _transition_op_backward(ctx, dz, du, dn, _drstd_h, _drstd_u):
    dh, dother = _transition_backward_op(dz, du, dn, *ctx.saved_tensors)
    return dh, dh, dother, None


_transition_op.register_autograd(_transition_op_backward, setup_context=_transition_setup)


@register("magicnorm_transition", "triton")
def magicnorm_transition_triton(
    x: Tensor, delta: Tensor, other: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    z, u, n, _, _ = _transition_op(x, delta, other, eps)
    return z, u, cast(n, out_dtype)


def aot_specs(hidden_size: int, dtype: torch.dtype, rows: int = 8192) -> list:
    """The two kernels at the tiles the launcher picks on a GPU (all gradients present), as
    :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec

    tiles, sizes, aligned_cols, tag, where, num_warps = row_kernel_aot(
        row_tiles, rows, hidden_size, dtype, __name__, "d"
    )
    fwd_ptrs, bwd_ptrs, rstd = (
        ("X", "DELTA", "OTHER", "Z", "U", "N"),
        ("DZ", "DU", "DN", "Z", "N", "DH", "DOTHER"),
        ("RSTD_H", "RSTD_U"),
    )
    fwd = {**pointers(dtype, *fwd_ptrs), **pointers(torch.float32, *rstd), **sizes, "eps": "fp32"}
    bwd = {**pointers(dtype, *bwd_ptrs), **pointers(torch.float32, *rstd), **sizes}
    return [
        KernelSpec(
            f"magicnorm_transition_fwd {tag}",
            where + "_transition_fwd_kernel",
            fwd,
            tiles,
            num_warps,
            1,
            (*fwd_ptrs, *rstd, *aligned_cols),
        ),
        KernelSpec(
            f"magicnorm_transition_bwd {tag}",
            where + "_transition_bwd_kernel",
            bwd,
            {"HAS_DZ": True, "HAS_DU": True, "HAS_DN": True, **tiles},
            num_warps,
            1,
            (*bwd_ptrs, *rstd, *aligned_cols),
        ),
    ]


# -- compile backend -----------------------------------------------------------------------
def _transition_forward_math(
    x: Tensor, delta: Tensor, other: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    z, rstd_h = rms_norm_forward_math(x + delta, eps)
    u = z + other
    n, rstd_u = rms_norm_forward_math(u, eps)
    return z, u, cast(n, out_dtype), rstd_h, rstd_u


def _transition_backward_math(
    dz: Tensor,
    du: Tensor,
    dn: Tensor,
    z: Tensor,
    n: Tensor,
    rstd_h: Tensor,
    rstd_u: Tensor,
    n_is_u: bool = False,
    x_dtype: torch.dtype | None = None,
    delta_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, d delta, d other)``: ``dh`` (the gradient of both x and delta, in z's dtype) cast
    to x's and delta's dtypes in the same pass (a bf16 MLP output added to an fp32 stream gets
    its bf16 copy here, not from autograd after the op); with ``n_is_u`` the forward saved
    ``u`` in ``n``'s place."""
    n = normed(n, rstd_u, n_is_u)
    dt = compute_dtype(z.dtype)
    du = du.to(dt) + rms_norm_grad_math(dn.to(dt), n.to(dt), rstd_u)
    dh = rms_norm_grad_math(dz.to(dt) + du, z.to(dt), rstd_h).to(z.dtype)
    return cast(dh, x_dtype), cast(dh, delta_dtype), du.to(n.dtype)


_transition_fwd_compiled = compiled(_transition_forward_math)
_transition_bwd_compiled = compiled(_transition_backward_math)


class _TransitionCompiled(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, delta: Tensor, other: Tensor, eps: float, out_dtype: torch.dtype | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        z, u, n, rstd_h, rstd_u = _transition_fwd_compiled(x, delta, other, eps, out_dtype)
        ctx.n_is_u = n.dtype != u.dtype  # n was cast: keep u, recompute n in the backward
        ctx.save_for_backward(z, u if ctx.n_is_u else n, rstd_h, rstd_u)
        ctx.dtypes = x.dtype, delta.dtype
        return z, u, n

    @staticmethod
    def backward(ctx, dz: Tensor, du: Tensor, dn: Tensor):
        return *_transition_bwd_compiled(dz, du, dn, *ctx.saved_tensors, ctx.n_is_u, *ctx.dtypes), None, None


@register("magicnorm_transition", "compile")
def magicnorm_transition_compile(
    x: Tensor, delta: Tensor, other: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    flat = [t.reshape(-1, x.shape[-1]) for t in (x, delta, other)]  # one compiled graph for every rank
    if needs_grad(x, delta, other):
        z, u, n = _TransitionCompiled.apply(*flat, eps, out_dtype)
    else:
        z, u, n = _transition_fwd_compiled(*flat, eps, out_dtype)[:3]
    return z.view(x.shape), u.view(x.shape), n.view(x.shape)


# -- cuda backend (csrc/magicnorm_transition, hrm.ops.cuda_extension) -------------------------
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_MAX_VECS = 8 * 512  # csrc/common/hrm_cuda_math.h: kMaxVecsPerThread * kMaxThreads


def cuda_takes(x: Tensor, delta: Tensor, other: Tensor) -> bool:
    """Whether the CUDA kernel takes these inputs: one dtype (fp32/fp16/bf16) and shape, CUDA,
    contiguous, 16-byte aligned, rows of whole 128-bit vectors and at most 4096 of them."""
    row_bytes = x.shape[-1] * x.element_size()
    return (
        x.is_cuda
        and x.dtype in _CUDA_DTYPES
        and all(t.dtype == x.dtype and t.shape == x.shape and t.is_contiguous() for t in (delta, other))
        and x.is_contiguous()
        and row_bytes % 16 == 0
        and 0 < row_bytes // 16 <= _CUDA_MAX_VECS
        and cuda_extension.storage_aligned(x, delta, other)
    )


@cuda_extension.on_load
def _register_cuda_transition() -> None:
    """Fakes and autograd of ``hrm_cuda::magicnorm_transition`` (defined in csrc/hrm_cuda/ops.cpp)."""

    @torch.library.register_fake("hrm_cuda::magicnorm_transition")
    def _(x, delta, other, eps):
        rows = x.shape[:-1]
        return (
            *(torch.empty_like(x) for _ in range(3)),
            *(x.new_empty(rows, dtype=torch.float32) for _ in range(2)),
        )

    @torch.library.register_fake("hrm_cuda::magicnorm_transition_backward")
    def _(dz, du, dn, z, n, rstd_h, rstd_u):
        return torch.empty_like(z), torch.empty_like(n)

    def backward(ctx, dz, du, dn, _drstd_h, _drstd_u):
        grads = (g.contiguous() if g is not None else None for g in (dz, du, dn))
        dh, dother = torch.ops.hrm_cuda.magicnorm_transition_backward(*grads, *ctx.saved_tensors)
        return dh, dh, dother, None

    torch.library.register_autograd("hrm_cuda::magicnorm_transition", backward, setup_context=_transition_setup)


@register("magicnorm_transition", "cuda")
def magicnorm_transition_cuda(
    x: Tensor, delta: Tensor, other: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    if not cuda_takes(x, delta, other):  # mixed dtypes (autocast), odd widths: the fallback
        return fallback_impl("magicnorm_transition", "cuda")(x, delta, other, eps, out_dtype)
    z, u, n, _, _ = torch.ops.hrm_cuda.magicnorm_transition(x, delta, other, eps)
    return z, u, cast(n, out_dtype)


def magicnorm_transition(
    x: Tensor,
    delta: Tensor,
    other: Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(z, u, n)``: the exit-normed state ``z = rms(x + delta)``, the next stack's input
    ``u = z + other`` and its pre-norm ``n = rms(u)`` (all of ``x``'s shape; ``n`` in
    ``out_dtype``, default u's)."""
    return get_impl("magicnorm_transition", backend)(x, delta, other, eps, out_dtype)
