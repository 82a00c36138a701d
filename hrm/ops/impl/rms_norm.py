"""Parameterless RMSNorm (every norm in HRM-Text has no learned scale), alone and fused with
the residual add in front of it.

    rms_norm:      y = x * rstd(x),                  rstd(h) = 1 / sqrt(mean(h**2, -1) + eps)
    add_rms_norm:  h = x + r;  y = h * rstd(h)       returns the new residual h and y

Computed in at least fp32 and returned in the input dtype; ``h`` is rounded to the input
dtype before it is normalised (the residual stream is stored in that dtype). With
``out_dtype`` (the model passes the dtype of the linear layer that reads ``y``: autocast's),
``y`` is then cast to it, as that layer would cast it; the ``compile`` backend (which the
``cpu`` backend uses) fuses the cast into the norm, the others cast after it.

Backward, from the saved output ``y`` (the linear layer that reads ``y`` saves it anyway,
so keeping it costs nothing) and one fp32 ``rstd`` per row:

    dx = rstd * (dy - y * mean(dy * y, -1))  (+ dh, the gradient that reaches h directly)

When the fused cast rounds ``y``, the ``compile`` backend saves the norm's input ``h``
instead and recomputes ``y = h * rstd`` (bit for bit the forward's) in the backward.

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
    cast,
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
def rms_norm_reference(x: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    xf = x.to(compute_dtype(x.dtype))
    return cast((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), out_dtype)


@register("add_rms_norm", "torch")
def add_rms_norm_reference(
    x: Tensor, residual: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    h = x + residual
    return h, rms_norm_reference(h, eps, out_dtype)


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
def rms_norm_triton(x: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    return cast(_rms_norm_op(x, eps)[0], out_dtype)


@register("add_rms_norm", "triton")
def add_rms_norm_triton(
    x: Tensor, residual: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    h, y, _ = _add_rms_norm_op(x, residual, eps)
    return h, cast(y, out_dtype)


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


def _rms_norm_forward_cast_math(x: Tensor, eps: float, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    y, rstd = rms_norm_forward_math(x, eps)
    return cast(y, out_dtype), rstd


def _add_rms_norm_forward_math(
    x: Tensor, residual: Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    h = x + residual
    return (h, *_rms_norm_forward_cast_math(h, eps, out_dtype))


def normed(saved: Tensor, rstd: Tensor, is_input: bool) -> Tensor:
    """The forward's output ``y`` from what it saved: ``y`` itself, or (``is_input``) its input
    ``h``, renormalised as :func:`rms_norm_forward_math` did (bit for bit)."""
    if not is_input:
        return saved
    return (saved.to(compute_dtype(saved.dtype)) * rstd[..., None]).to(saved.dtype)


def _rms_norm_backward_math(dy: Tensor, saved: Tensor, rstd: Tensor, is_input: bool = False) -> Tensor:
    y = normed(saved, rstd, is_input)
    dt = compute_dtype(y.dtype)
    return rms_norm_grad_math(dy.to(dt), y.to(dt), rstd).to(y.dtype)


def _add_rms_norm_backward_math(
    dy: Tensor,
    dh: Tensor,
    saved: Tensor,
    rstd: Tensor,
    is_input: bool = False,
    x_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The gradients of ``x`` and ``residual``: one ``dx`` in h's dtype, cast to each input's
    (autograd would cast it after the op otherwise; a bf16 block output added to an fp32
    stream gets its bf16 copy in the same pass)."""
    y = normed(saved, rstd, is_input)
    dt = compute_dtype(y.dtype)
    dx = (rms_norm_grad_math(dy.to(dt), y.to(dt), rstd) + dh.to(dt)).to(y.dtype)
    return cast(dx, x_dtype), cast(dx, residual_dtype)


_rms_norm_fwd_compiled = compiled(_rms_norm_forward_cast_math)
_add_rms_norm_fwd_compiled = compiled(_add_rms_norm_forward_math)
_rms_norm_bwd_compiled = compiled(_rms_norm_backward_math)
_add_rms_norm_bwd_compiled = compiled(_add_rms_norm_backward_math)


class _RMSNormCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, eps: float, out_dtype: torch.dtype | None) -> Tensor:
        y, rstd = _rms_norm_fwd_compiled(x, eps, out_dtype)
        ctx.is_input = y.dtype != x.dtype  # y was cast: keep x, recompute y in the backward
        ctx.save_for_backward(x if ctx.is_input else y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        saved, rstd = ctx.saved_tensors
        return _rms_norm_bwd_compiled(dy, saved, rstd, ctx.is_input), None, None


class _AddRMSNormCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, eps: float, out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        h, y, rstd = _add_rms_norm_fwd_compiled(x, residual, eps, out_dtype)
        ctx.is_input = y.dtype != h.dtype  # y was cast: keep h, recompute y in the backward
        ctx.save_for_backward(h if ctx.is_input else y, rstd)
        ctx.dtypes = x.dtype, residual.dtype
        return h, y

    @staticmethod
    def backward(ctx, dh: Tensor, dy: Tensor):
        saved, rstd = ctx.saved_tensors
        dx, dr = _add_rms_norm_bwd_compiled(dy, dh, saved, rstd, ctx.is_input, *ctx.dtypes)
        return dx, dr, None, None


@register("rms_norm", "compile")
def rms_norm_compile(x: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # one compiled graph for every rank
    if needs_grad(x):
        y = _RMSNormCompiled.apply(x2, eps, out_dtype)
    else:
        y = _rms_norm_fwd_compiled(x2, eps, out_dtype)[0]
    return y.view(x.shape)


@register("add_rms_norm", "compile")
def add_rms_norm_compile(
    x: Tensor, residual: Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    x2, r2 = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    if needs_grad(x, residual):
        h, y = _AddRMSNormCompiled.apply(x2, r2, eps, out_dtype)
    else:
        h, y, _ = _add_rms_norm_fwd_compiled(x2, r2, eps, out_dtype)
    return h.view(x.shape), y.view(x.shape)


# -- public --------------------------------------------------------------------------------
def rms_norm(
    x: Tensor, eps: float = 1e-6, *, backend: str | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Parameterless RMSNorm over the last dimension, in ``out_dtype`` (default: x's)."""
    return get_impl("rms_norm", backend)(x, eps, out_dtype)


def add_rms_norm(
    x: Tensor,
    residual: Tensor,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(h, rms_norm(h))`` with ``h = x + residual`` (same shapes): the new residual stream
    and its normalised copy, the latter in ``out_dtype`` (default: h's)."""
    return get_impl("add_rms_norm", backend)(x, residual, eps, out_dtype)
