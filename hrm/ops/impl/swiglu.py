"""SwiGLU on the fused ``[gate | up]`` projection output.

For ``gate_up = [g | u]`` (each half ``I`` wide) and ``s = sigmoid(g)``:

    y  = silu(g) * u = g * s * u
    dg = dy * u * s * (1 + g * (1 - s))
    du = dy * g * s

computed in fp32 and stored in the input dtype. Only ``gate_up`` is saved for backward;
``silu(g)`` is recomputed there rather than stored.

Backends: ``torch`` (the reference), ``triton`` and ``compile`` (the kernels and graphs
below), ``cpu`` (``csrc/elementwise/elementwise_cpu.cpp``: one pass over memory each way,
fp32 and bf16; other dtypes run on ``compile``).

``swiglu_linear(x, weight)`` is the up-projection and the activation in one op,
``swiglu(x @ weight.T)`` for the fused ``[gate | up]`` weight (``[2I, K]``). Its ``cuda``
backend is a GEMM with the SwiGLU in the epilogue (csrc/swiglu_linear), so the ``[T, 2I]``
product never reaches memory; its backward runs the same GEMM again with the SwiGLU's
gradient in the epilogue (``hrm_cuda::swiglu_linear_backward``: ``d(gate_up)`` in one
launch, from the fp32 accumulators), then ``dx`` and ``dW`` as two torch GEMMs. The other
backends run ``F.linear`` and then their ``swiglu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops import cpp_extension, cuda_extension
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
from hrm.ops.dispatch import fallback_impl, get_impl, register


@register("swiglu", "torch")
def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``gate_up``: ``[..., 2I]`` laid out ``[gate | up]``; returns ``[..., I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# -- Triton kernels ------------------------------------------------------------------------
@jit
def _swiglu_tile(GU, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's tile: ``(mask, gate_offs, offs, g, u)``, the offsets of the gate half in
    ``[g | u]`` rows (``2 * n_cols`` wide) and in ``n_cols``-wide rows, and ``g``, ``u`` in fp32."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows[:, None].to(tl.int64)
    gate_offs = rows64 * (2 * n_cols) + cols[None, :]
    g = tl.load(GU + gate_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + gate_offs + n_cols, mask=mask, other=0.0).to(tl.float32)
    return mask, gate_offs, rows64 * n_cols + cols[None, :], g, u


@jit
def _swiglu_fwd_kernel(GU, Y, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``y = g * sigmoid(g) * u`` for a tile of rows ``[g | u]`` (``2 * n_cols`` wide); fp32 math."""
    mask, gate_offs, offs, g, u = _swiglu_tile(GU, n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(GU, DY, DGU, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``dg = dy * u * s * (1 + g * (1 - s))``, ``du = dy * g * s`` with ``s = sigmoid(g)``
    recomputed from the saved input; writes ``[dg | du]``."""
    mask, gate_offs, offs, g, u = _swiglu_tile(GU, n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DGU + gate_offs, dg.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + gate_offs + n_cols, du.to(DGU.dtype.element_ty), mask=mask)


# Columns per program on a GPU; the interpreter takes whole rows (see hrm.ops.common).
_BLOCK_COLS_GPU = 1024


def _tiles(n_rows: int, n_cols: int, target: TileTarget) -> tuple[tuple[int, int], int, int, int]:
    block_cols = next_pow2(n_cols) if target == "interpreter" else min(next_pow2(n_cols), _BLOCK_COLS_GPU)
    block_rows, num_warps = row_settings(n_rows, block_cols, target)
    return (cdiv(n_rows, block_rows), cdiv(n_cols, block_cols)), block_rows, block_cols, num_warps


# -- launchers -----------------------------------------------------------------------------
def swiglu_forward(gate_up: Tensor) -> Tensor:
    gu = rows_2d(gate_up)
    n_rows, n_cols = gu.shape[0], gu.shape[1] // 2
    y = gu.new_empty(n_rows, n_cols)
    if n_rows:
        grid, block_rows, block_cols, num_warps = _tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("swiglu.fwd", n_cols, gu, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows), grid[1])
        with device_of(gu):
            _swiglu_fwd_kernel[grid](
                gu, y, n_rows, n_cols, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps
            )
    return y.view(*gate_up.shape[:-1], n_cols)


def swiglu_backward(gate_up: Tensor, dy: Tensor) -> Tensor:
    gu, dy2 = rows_2d(gate_up), rows_2d(dy)
    n_rows, n_cols = dy2.shape
    dgu = torch.empty_like(gu)
    if n_rows:
        grid, block_rows, block_cols, num_warps = _tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("swiglu.bwd", n_cols, gu, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows), grid[1])
        with device_of(gu):
            _swiglu_bwd_kernel[grid](
                gu, dy2, dgu, n_rows, n_cols, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps
            )
    return dgu.view(gate_up.shape)


# -- custom ops (the triton backend) ------------------------------------------------------
@torch.library.custom_op("hrm::swiglu", mutates_args=())
def _swiglu_op(gate_up: Tensor) -> Tensor:
    return swiglu_forward(gate_up)


@_swiglu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


@torch.library.custom_op("hrm::swiglu_backward", mutates_args=())
def _swiglu_backward_op(gate_up: Tensor, dy: Tensor) -> Tensor:
    return swiglu_backward(gate_up, dy)


@_swiglu_backward_op.register_fake
def _(gate_up, dy):
    return gate_up.new_empty(gate_up.shape)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_op_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_backward_op(gate_up, dy)


_swiglu_op.register_autograd(_swiglu_op_backward, setup_context=_swiglu_setup)


@register("swiglu", "triton")
def swiglu_triton(gate_up: Tensor) -> Tensor:
    return _swiglu_op(gate_up)


def aot_specs(intermediate_size: int, dtype: torch.dtype, rows: int = 8192) -> list:
    """Both kernels at the tiles the launchers pick on a GPU, as :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec

    tiles, sizes, aligned_cols, tag, where, num_warps = row_kernel_aot(
        _tiles, rows, intermediate_size, dtype, __name__, "I"
    )
    return [
        KernelSpec(
            f"swiglu_fwd {tag}",
            where + "_swiglu_fwd_kernel",
            {**pointers(dtype, "GU", "Y"), **sizes},
            tiles,
            num_warps,
            1,
            ("GU", "Y", *aligned_cols),
        ),
        KernelSpec(
            f"swiglu_bwd {tag}",
            where + "_swiglu_bwd_kernel",
            {**pointers(dtype, "GU", "DY", "DGU"), **sizes},
            tiles,
            num_warps,
            1,
            ("GU", "DY", "DGU", *aligned_cols),
        ),
    ]


# -- compile backend -----------------------------------------------------------------------
def _swiglu_forward_math(gate_up: Tensor) -> Tensor:
    g, u = gate_up.to(compute_dtype(gate_up.dtype)).chunk(2, dim=-1)
    return (F.silu(g) * u).to(gate_up.dtype)


def _swiglu_backward_math(gate_up: Tensor, dy: Tensor) -> Tensor:
    dt = compute_dtype(gate_up.dtype)
    g, u = gate_up.to(dt).chunk(2, dim=-1)
    dy = dy.to(dt)
    s = torch.sigmoid(g)
    return torch.cat([dy * u * s * (1 + g * (1 - s)), dy * g * s], dim=-1).to(gate_up.dtype)


_swiglu_fwd_compiled = compiled(_swiglu_forward_math)
_swiglu_bwd_compiled = compiled(_swiglu_backward_math)


class _SwiGLUCompiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        return _swiglu_fwd_compiled(gate_up)

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        return _swiglu_bwd_compiled(gate_up, dy)


@register("swiglu", "compile")
def swiglu_compile(gate_up: Tensor) -> Tensor:
    gu = gate_up.reshape(-1, gate_up.shape[-1])  # one compiled graph for every rank
    y = _SwiGLUCompiled.apply(gu) if needs_grad(gate_up) else _swiglu_fwd_compiled(gu)
    return y.view(*gate_up.shape[:-1], y.shape[-1])


# -- cpu backend: csrc/elementwise/elementwise_cpu.cpp ------------------------------------------


def elementwise_cpu_ops():
    """``torch.ops.hrm_ew`` (the SwiGLU and split-RoPE kernels), building the extension on first use."""
    cpp_extension.load()  # built on first use, then a cached no-op
    return torch.ops.hrm_ew


@torch.library.custom_op("hrm::swiglu_cpu", mutates_args=())
def _swiglu_cpu_op(gate_up: Tensor) -> Tensor:
    return elementwise_cpu_ops().swiglu_fwd(gate_up)


@_swiglu_cpu_op.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("hrm::swiglu_cpu_backward", mutates_args=())
def _swiglu_cpu_backward_op(gate_up: Tensor, dy: Tensor) -> Tensor:
    return elementwise_cpu_ops().swiglu_bwd(gate_up, dy)


@_swiglu_cpu_backward_op.register_fake
def _(gate_up, dy):
    return gate_up.new_empty(gate_up.shape)


_swiglu_cpu_op.register_autograd(
    lambda ctx, dy: _swiglu_cpu_backward_op(ctx.saved_tensors[0], dy), setup_context=_swiglu_setup
)


@register("swiglu", "cpu")
def swiglu_cpu(gate_up: Tensor) -> Tensor:
    """The C++ kernel for fp32 and bf16 CPU tensors (timed against the others by ``hrm bench
    --suite ops``, row ``swiglu``); other dtypes and devices run on the fallback."""
    if gate_up.device.type != "cpu" or gate_up.dtype not in (torch.float32, torch.bfloat16):
        return fallback_impl("swiglu", "cpu")(gate_up)
    y = _swiglu_cpu_op(gate_up.reshape(-1, gate_up.shape[-1]).contiguous())
    return y.view(*gate_up.shape[:-1], y.shape[-1])


def swiglu(gate_up: Tensor, *, backend: str | None = None) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` on the last dimension."""
    return get_impl("swiglu", backend)(gate_up)


# -- swiglu_linear: the up-projection with the activation --------------------------------------
@register("swiglu_linear", "torch")
def swiglu_linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """``silu(x W_g^T) * (x W_u^T)`` for ``weight = [W_g | W_u]`` (``[2I, K]``)."""
    return swiglu_reference(F.linear(x, weight))


@register("swiglu_linear", "triton")
def swiglu_linear_triton(x: Tensor, weight: Tensor) -> Tensor:
    return swiglu_triton(F.linear(x, weight))


@register("swiglu_linear", "compile")
def swiglu_linear_compile(x: Tensor, weight: Tensor) -> Tensor:
    return swiglu_compile(F.linear(x, weight))


@register("swiglu_linear", "cpu")
def swiglu_linear_cpu(x: Tensor, weight: Tensor) -> Tensor:
    return swiglu_cpu(F.linear(x, weight))


def cuda_swiglu_linear_takes(x: Tensor, weight: Tensor) -> bool:
    """Whether the CUDA GEMM takes these inputs: bf16/fp16 of one dtype on the GPU, contiguous,
    16-byte aligned, ``K`` and ``I`` multiples of 8."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.dim() == 2
        and weight.shape[1] == x.shape[-1]
        and x.shape[-1] % 8 == 0
        and weight.shape[0] % 16 == 0
        and x.is_contiguous()
        and weight.is_contiguous()
        and cuda_extension.storage_aligned(x, weight)
    )


@cuda_extension.on_load
def _register_cuda_swiglu_linear() -> None:
    """Fakes and autograd of ``hrm_cuda::swiglu_linear`` and ``swiglu_linear_backward``
    (csrc/hrm_cuda/ops.cpp). The backward: ``d(gate_up)`` from the backward kernel (the
    product recomputed, the SwiGLU gradient in its epilogue), then ``dx = d(gate_up) W`` and
    ``dW = d(gate_up)^T x``."""

    @torch.library.register_fake("hrm_cuda::swiglu_linear")
    def _(x, weight):
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)

    @torch.library.register_fake("hrm_cuda::swiglu_linear_backward")
    def _(x, weight, dy):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        if not cuda_extension.storage_aligned(dy):  # a view at an odd offset: the kernel reads 16 B at a time
            dy = dy.clone()
        dgu = torch.ops.hrm_cuda.swiglu_linear_backward(x, weight, dy)
        dx = dgu @ weight
        dw = dgu.reshape(-1, dgu.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return dx, dw

    torch.library.register_autograd("hrm_cuda::swiglu_linear", backward, setup_context=setup)


@register("swiglu_linear", "cuda")
def swiglu_linear_cuda(x: Tensor, weight: Tensor) -> Tensor:
    if torch.is_autocast_enabled("cuda"):  # a custom op is not autocast-aware: cast as F.linear would
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
    if not cuda_swiglu_linear_takes(x, weight):
        return fallback_impl("swiglu_linear", "cuda")(x, weight)
    return torch.ops.hrm_cuda.swiglu_linear(x, weight)


def swiglu_linear(x: Tensor, weight: Tensor, *, backend: str | None = None) -> Tensor:
    """``swiglu(x @ weight.T)`` for the fused ``[gate | up]`` weight ``[2I, K]``: ``[..., I]``."""
    return get_impl("swiglu_linear", backend)(x, weight)
