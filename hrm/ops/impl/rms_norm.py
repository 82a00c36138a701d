"""Parameterless RMSNorm (every norm in HRM-Text has no learned scale), alone and fused with
the residual add in front of it.

    rms_norm:      y = x * rstd(x),                  rstd(h) = 1 / sqrt(mean(h**2, -1) + eps)
    add_rms_norm:  h = x + r;  y = h * rstd(h)       returns the new residual h and y

Computed in at least fp32 and returned in the input dtype; ``h`` is rounded to the input
dtype before it is normalised (the residual stream is stored in that dtype).

Backward, from the saved output ``y`` (the linear layer that reads ``y`` saves it anyway,
so keeping it costs nothing) and one fp32 ``rstd`` per row:

    dx = rstd * (dy - y * mean(dy * y, -1))  (+ dh, the gradient that reaches h directly)

Backends: ``torch`` (the composite reference, the oracle), ``compile`` (the explicit
forward/backward below compiled by inductor), ``triton`` (the kernels below, registered
as ``torch.library`` custom ops so that ``torch.compile`` traces through them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hrm.ops.common import (
    TileTarget,
    cdiv,
    compiled,
    compute_dtype,
    device_of,
    jit,
    needs_grad,
    next_pow2,
    pointers,
    row_kernel_aot,
    row_settings,
    rows_2d,
    tile_target,
    tl,
    tuned_row_config,
)
from hrm.ops.dispatch import get_impl, register


# -- reference -----------------------------------------------------------------------------
@register("rms_norm", "torch")
def rms_norm_reference(x: Tensor, eps: float = 1e-6) -> Tensor:
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@register("add_rms_norm", "torch")
def add_rms_norm_reference(x: Tensor, residual: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    h = x + residual
    return h, rms_norm_reference(h, eps)


# -- Triton kernels ------------------------------------------------------------------------
@jit
def _rms_norm_fwd_kernel(
    X,
    R,
    H,
    Y,
    RSTD,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """A tile of rows: ``h = x (+ r)``, ``rstd = rsqrt(mean(h*h) + eps)``, ``y = h * rstd``.

    Stores ``y``, ``rstd`` (fp32, for the backward) and, with a residual, ``h`` in x's dtype;
    HAS_RESIDUAL is a constexpr so that the plain norm compiles without the second load.
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = (h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    tl.store(Y + offs, (h * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@jit
def _rms_norm_bwd_kernel(
    DY, Y, RSTD, DH, DX, n_rows, n_cols, HAS_DH: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr
):
    """``dx = rstd * (dy - y * mean(dy * y)) (+ dh)``; HAS_DH (the residual output received a
    gradient of its own) is a constexpr so that the plain norm skips that load."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    dx = rstd[:, None] * (dy - y * (tl.sum(dy * y, axis=1) / n_cols)[:, None])
    if HAS_DH:
        dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def row_tiles(n_rows: int, n_cols: int, target: TileTarget) -> tuple[tuple[int], int, int, int]:
    """Grid, rows per program, padded row width and warps for a whole-row kernel."""
    block_cols = next_pow2(n_cols)
    block_rows, num_warps = row_settings(n_rows, block_cols, target)
    return (cdiv(n_rows, block_rows),), block_rows, block_cols, num_warps


# -- launchers -----------------------------------------------------------------------------
def rms_norm_forward(x: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(h, y, rstd)`` of :func:`add_rms_norm` (``h`` is ``None`` without a residual)."""
    x2 = rows_2d(x)
    n_rows, n_cols = x2.shape
    # h and y promote like the reference's ``x + residual`` (a bf16 block output added to an
    # fp32 residual stream stays fp32)
    dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(x2.shape, dtype=dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        grid, block_rows, block_cols, num_warps = row_tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("rms_norm.fwd", n_cols, x2, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows),)
        r2 = rows_2d(residual) if residual is not None else x2
        with device_of(x):
            _rms_norm_fwd_kernel[grid](
                x2,
                r2,
                h if h is not None else y,
                y,
                rstd,
                n_rows,
                n_cols,
                eps,
                HAS_RESIDUAL=residual is not None,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
            )
    shape = x.shape
    return (h.view(shape) if h is not None else None), y.view(shape), rstd.view(shape[:-1])


def rms_norm_backward(dy: Tensor, y: Tensor, rstd: Tensor, dh: Tensor | None) -> Tensor:
    """``dx`` (= ``dr`` for the fused add) from the output gradient(s)."""
    dy2, y2 = rows_2d(dy), rows_2d(y)
    n_rows, n_cols = y2.shape
    dx = torch.empty_like(y2)
    if n_rows:
        grid, block_rows, block_cols, num_warps = row_tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("rms_norm.bwd", n_cols, y2, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows),)
        dh2 = rows_2d(dh) if dh is not None else dy2
        with device_of(y):
            _rms_norm_bwd_kernel[grid](
                dy2,
                y2,
                rstd.contiguous(),
                dh2,
                dx,
                n_rows,
                n_cols,
                HAS_DH=dh is not None,
                BLOCK_ROWS=block_rows,
                BLOCK_COLS=block_cols,
                num_warps=num_warps,
            )
    return dx.view(y.shape)


# -- custom ops (the triton backend) ------------------------------------------------------
@torch.library.custom_op("hrm::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _, y, rstd = rms_norm_forward(x, None, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("hrm::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return rms_norm_forward(x, residual, eps)


@_add_rms_norm_op.register_fake
def _(x, residual, eps):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return (
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape, dtype=dtype),
        x.new_empty(x.shape[:-1], dtype=torch.float32),
    )


@torch.library.custom_op("hrm::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, y: Tensor, rstd: Tensor, dh: Optional[Tensor]) -> Tensor:
    return rms_norm_backward(dy, y, rstd, dh)


@_rms_norm_backward_op.register_fake
def _(dy, y, rstd, dh):
    return y.new_empty(y.shape)


def _save_y_rstd(ctx, inputs, output) -> None:
    y, rstd = output[-2:]
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(y, rstd)


def _rms_norm_op_backward(ctx, dy, _drstd):
    y, rstd = ctx.saved_tensors
    return _rms_norm_backward_op(dy, y, rstd, None), None


def _add_rms_norm_op_backward(ctx, dh, dy, _drstd):
    y, rstd = ctx.saved_tensors
    dx = _rms_norm_backward_op(dy if dy is not None else torch.zeros_like(y), y, rstd, dh)  # in h's dtype
    return dx.to(ctx.x_dtype), dx.to(ctx.residual_dtype), None


def _add_rms_norm_setup(ctx, inputs, output) -> None:
    _save_y_rstd(ctx, inputs, output)
    ctx.x_dtype, ctx.residual_dtype = inputs[0].dtype, inputs[1].dtype


_rms_norm_op.register_autograd(_rms_norm_op_backward, setup_context=_save_y_rstd)
_add_rms_norm_op.register_autograd(_add_rms_norm_op_backward, setup_context=_add_rms_norm_setup)


@register("rms_norm", "triton")
def rms_norm_triton(x: Tensor, eps: float = 1e-6) -> Tensor:
    return _rms_norm_op(x, eps)[0]


@register("add_rms_norm", "triton")
def add_rms_norm_triton(x: Tensor, residual: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    h, y, _ = _add_rms_norm_op(x, residual, eps)
    return h, y


def aot_specs(hidden_size: int, dtype: torch.dtype, rows: int = 8192) -> list:
    """The kernels at the tiles the launchers pick on a GPU for ``rows x hidden_size``, as
    :class:`hrm.ops.aot.KernelSpec` s (plain and fused-residual variants)."""
    from hrm.ops.aot import KernelSpec

    tiles, sizes, aligned_cols, tag, where, num_warps = row_kernel_aot(
        row_tiles, rows, hidden_size, dtype, __name__, "d"
    )
    fwd_ptrs, bwd_ptrs = ("X", "R", "H", "Y"), ("DY", "Y", "DH", "DX")
    fwd = {**pointers(dtype, *fwd_ptrs), **pointers(torch.float32, "RSTD"), **sizes, "eps": "fp32"}
    bwd = {**pointers(dtype, *bwd_ptrs), **pointers(torch.float32, "RSTD"), **sizes}
    specs = []
    for flag in (False, True):
        suffix = "+residual" if flag else ""
        specs.append(
            KernelSpec(
                f"rms_norm_fwd{suffix} {tag}",
                where + "_rms_norm_fwd_kernel",
                fwd,
                {"HAS_RESIDUAL": flag, **tiles},
                num_warps,
                1,
                (*fwd_ptrs, "RSTD", *aligned_cols),
            )
        )
        specs.append(
            KernelSpec(
                f"rms_norm_bwd{suffix} {tag}",
                where + "_rms_norm_bwd_kernel",
                bwd,
                {"HAS_DH": flag, **tiles},
                num_warps,
                1,
                (*bwd_ptrs, "RSTD", *aligned_cols),
            )
        )
    return specs


# -- compile backend: the same forward/backward in torch, compiled by inductor -------------
def rms_norm_forward_math(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(y, rstd)``: the reference's forward, keeping ``rstd`` for the backward."""
    hf = h.to(compute_dtype(h.dtype))
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    return (hf * rstd[..., None]).to(h.dtype), rstd


def rms_norm_grad_math(dy: Tensor, y: Tensor, rstd: Tensor) -> Tensor:
    """``rstd * (dy - y * mean(dy * y))`` in the compute dtype (inputs already cast to it)."""
    return rstd[..., None] * (dy - y * (dy * y).mean(-1, keepdim=True))


def _add_rms_norm_forward_math(x: Tensor, residual: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    h = x + residual
    return (h, *rms_norm_forward_math(h, eps))


def _rms_norm_backward_math(dy: Tensor, y: Tensor, rstd: Tensor) -> Tensor:
    dt = compute_dtype(y.dtype)
    return rms_norm_grad_math(dy.to(dt), y.to(dt), rstd).to(y.dtype)


def _add_rms_norm_backward_math(dy: Tensor, dh: Tensor, y: Tensor, rstd: Tensor) -> Tensor:
    dt = compute_dtype(y.dtype)
    return (rms_norm_grad_math(dy.to(dt), y.to(dt), rstd) + dh.to(dt)).to(y.dtype)


_rms_norm_fwd_compiled = compiled(rms_norm_forward_math)
_add_rms_norm_fwd_compiled = compiled(_add_rms_norm_forward_math)
_rms_norm_bwd_compiled = compiled(_rms_norm_backward_math)
_add_rms_norm_bwd_compiled = compiled(_add_rms_norm_backward_math)


class _RMSNormCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        y, rstd = _rms_norm_fwd_compiled(x, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, rstd = ctx.saved_tensors
        return _rms_norm_bwd_compiled(dy, y, rstd), None


class _AddRMSNormCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        h, y, rstd = _add_rms_norm_fwd_compiled(x, residual, eps)
        ctx.save_for_backward(y, rstd)
        return h, y

    @staticmethod
    def backward(ctx, dh: Tensor, dy: Tensor):
        y, rstd = ctx.saved_tensors
        dx = _add_rms_norm_bwd_compiled(dy, dh, y, rstd)
        return dx, dx, None


@register("rms_norm", "compile")
def rms_norm_compile(x: Tensor, eps: float = 1e-6) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # one compiled graph for every rank
    y = _RMSNormCompiled.apply(x2, eps) if needs_grad(x) else _rms_norm_fwd_compiled(x2, eps)[0]
    return y.view(x.shape)


@register("add_rms_norm", "compile")
def add_rms_norm_compile(x: Tensor, residual: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    if needs_grad(x, residual):
        h, y = _AddRMSNormCompiled.apply(x2, r2, eps)
    else:
        h, y, _ = _add_rms_norm_fwd_compiled(x2, r2, eps)
    return h.view(x.shape), y.view(x.shape)


# -- public --------------------------------------------------------------------------------
def rms_norm(x: Tensor, eps: float = 1e-6, *, backend: str | None = None) -> Tensor:
    """Parameterless RMSNorm over the last dimension."""
    return get_impl("rms_norm", backend)(x, eps)


def add_rms_norm(
    x: Tensor, residual: Tensor, eps: float = 1e-6, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """``(h, rms_norm(h))`` with ``h = x + residual`` (same shapes): the new residual stream
    and its normalised copy."""
    return get_impl("add_rms_norm", backend)(x, residual, eps)
