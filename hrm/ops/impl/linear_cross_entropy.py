"""Response-only fused linear cross-entropy: the LM head and its loss without ``[T, V]`` logits.

For hidden states ``z [T, d]``, head weight ``W [V, d]`` and ``labels [T]`` (``-100`` =
not supervised), over the supervised rows ``S = {t : labels[t] != -100}``:

    logits_t = W z_t                       (in the LM head's dtype: autocast's when it is on,
                                            else z's; the weight is cast to it once per call)
    loss     = sum_{t in S} lse(logits_t) - logits_t[labels_t]      (fp32; fp64 for fp64)
    pred_t   = argmax logits_t (first maximum) for t in S, -100 elsewhere

The supervised rows are gathered and processed in chunks of ``chunk_rows`` tokens: one
``[chunk, V]`` logits buffer at a time, never ``[T, V]`` (nor ``[S, V]``). Gradients are
computed in the forward (the loss is a scalar, so its backward only scales them):
``g_t = softmax(logits_t) - onehot(labels_t)``, ``dz_t = g_t W`` (rows outside ``S`` get
0) and ``dW = sum_t g_t^T z_t`` (products in the head's dtype, accumulated over chunks in
fp32 for fp32 or 16-bit weights, returned in the weight's dtype). Saved for backward: ``dz``
and ``dW``; the backward returns them times the loss gradient.

Backends: ``torch`` (the reference: ``F.linear`` on the supervised rows then
:func:`~hrm.ops.impl.cross_entropy.cross_entropy_reference`; materialises ``[S, V]``),
``compile`` (the chunk loop below with each chunk's softmax/loss compiled by inductor),
``cpu`` (the same loop over transposed logits, ``W z^T``, with the chunk's loss, argmax and
gradient in C++, which writes the gradient both over the logits, as ``g^T``, and beside them
as ``g``, so that every product of the loop takes row-major operands; a second ``[chunk, V]``
buffer; fp32 and bf16, other dtypes as ``compile``),
``triton`` (the same loop with the chunk's loss, argmax and gradient in one Triton kernel
that overwrites the logits with their gradient: an online log-sum-exp over vocabulary
blocks, then a second pass for the gradient). Matmuls go to the BLAS/cuBLAS of the device.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.ops import cpp_extension
from hrm.ops.common import (
    CPU_KERNEL_DTYPES,
    TILE_ELEMS,
    TRITON_TYPES,
    TileTarget,
    cdiv,
    compiled,
    compute_dtype,
    device_of,
    jit,
    linear_dtype,
    needs_grad,
    next_pow2,
    pointers,
    row_settings,
    tile_target,
    tl,
    tuned_row_config,
)
from hrm.ops.dispatch import get_impl, register
from hrm.ops.impl.cross_entropy import IGNORE_INDEX, cross_entropy_reference

# Bytes of one chunk's logits, which bound the op's working memory: on a CPU 32 MiB (256
# tokens of a 32K vocabulary in fp32, 512 in bf16; the cpu backend's loop holds two such
# buffers, the logits and the gradient); on a GPU 1/64 of the device's memory
# (1.2 GiB on an 80 GB part: 4096 tokens of a 151,808 vocabulary in bf16), and at least
# ``CE_PROGRAMS_PER_SM`` rows per SM so that the loss kernel (one program per row) fills the
# device. Chunks are a power of two, at least 16 tokens.
CPU_LOGITS_CHUNK_BYTES = 32 << 20
GPU_MEMORY_FRACTION = 64
CE_PROGRAMS_PER_SM = 4


@functools.cache
def _gpu_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.total_memory // GPU_MEMORY_FRACTION, props.multi_processor_count


def default_chunk_rows(vocab: int, itemsize: int = 4, device: torch.device | str = "cpu") -> int:
    """Supervised rows per chunk of the loop for a ``vocab``-wide head in ``itemsize``-byte
    logits on ``device`` (sizes above)."""
    device = torch.device(device)
    if device.type == "cuda":
        budget, sms = _gpu_limits(device.index if device.index is not None else torch.cuda.current_device())
        rows = max(budget // (itemsize * vocab), 16)
        return max(1 << (rows.bit_length() - 1), next_pow2(CE_PROGRAMS_PER_SM * sms))
    rows = max(CPU_LOGITS_CHUNK_BYTES // (itemsize * vocab), 16)
    return 1 << (rows.bit_length() - 1)


def supervised_rows(labels: Tensor) -> Tensor:
    """int64 ``[S]``: the rows whose label is not ``-100``. A host sync on a GPU (the size of the
    result is data): compute it once per batch where the batch is built."""
    return (labels != IGNORE_INDEX).nonzero().squeeze(1)


@register("linear_cross_entropy", "torch")
def linear_cross_entropy_reference(
    z: Tensor, weight: Tensor, labels: Tensor, rows: Tensor | None = None, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(loss_sum, pred)``; ``chunk_rows`` is ignored: the reference has no chunks."""
    rows = supervised_rows(labels) if rows is None else rows  # [S]
    logits = F.linear(z[rows], weight)  # [S, V]
    loss = cross_entropy_reference(logits, labels[rows], "sum")
    pred = torch.full_like(labels, IGNORE_INDEX).index_copy(0, rows, logits.detach().argmax(-1).to(labels.dtype))
    return loss, pred


# -- Triton kernel -------------------------------------------------------------------------
@jit
def _ce_chunk_kernel(
    LOGITS,
    TARGETS,
    LOSS,
    PRED,
    n_rows,
    n_cols,
    WRITE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """For a tile of rows of ``[n_rows, n_cols]`` logits: one pass over vocabulary blocks keeps
    the running max ``m``, ``s = sum exp(l - m)`` and the first argmax; then
    ``loss = m + log(s) - l[target]``. With WRITE_GRAD (a constexpr: evaluation compiles
    without the second pass) the logits are overwritten with ``softmax(l) - onehot(target)``."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * n_cols
    target = tl.load(TARGETS + rows, mask=row_ok, other=0)
    m = tl.full((BLOCK_ROWS,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    x_target = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    best = tl.zeros((BLOCK_ROWS,), dtype=tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        # the target logit is taken in this read-only pass: the gradient pass below overwrites
        # the logits in place, and its stores from other warps are not ordered before a later load
        x_target += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), axis=1)
        block_max = tl.max(x, axis=1)
        block_arg = tl.min(tl.where(x == block_max[:, None], cols[None, :], n_cols), axis=1)
        best = tl.where(block_max > m, block_arg, best)
        m_new = tl.where(row_ok, tl.maximum(m, block_max), 0.0)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(row_ok, s, 1.0))  # padding rows of the tile: keep them finite
    tl.store(LOSS + rows, lse - x_target, mask=row_ok)
    tl.store(PRED + rows, best.to(PRED.dtype.element_ty), mask=row_ok)
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols[None, :] < n_cols)
            x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            tl.store(base + cols[None, :], g.to(LOGITS.dtype.element_ty), mask=mask)


def _ce_tiles(n_rows: int, n_cols: int, target: TileTarget) -> tuple[tuple[int], int, int, int]:
    """On a GPU one row per program, the vocabulary in blocks of one program's tile; the
    interpreter takes every row at once and as many columns as fit its tile."""
    if target == "interpreter":
        block_rows = next_pow2(n_rows)
        block_v = max(16, min(next_pow2(n_cols), TILE_ELEMS[target] // block_rows))
        return (1,), block_rows, block_v, 4
    block_v = min(next_pow2(n_cols), TILE_ELEMS[target])
    _, num_warps = row_settings(1, block_v, target)
    return (n_rows,), 1, block_v, num_warps


def ce_chunk_forward(
    logits: Tensor, targets: Tensor, write_grad: bool, *, block_v: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-row ``(loss fp32, argmax)`` of contiguous ``logits [C, V]``; with ``write_grad``
    the logits now hold ``softmax - onehot``. ``block_v`` overrides the vocabulary block."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    pred = torch.empty(n_rows, dtype=targets.dtype, device=logits.device)
    if n_rows:
        grid, block_rows, bv, num_warps = _ce_tiles(n_rows, n_cols, tile_target())
        block_rows, num_warps = tuned_row_config("linear_cross_entropy.chunk", n_cols, logits, block_rows, num_warps)
        grid = (cdiv(n_rows, block_rows),)
        with device_of(logits):
            _ce_chunk_kernel[grid](
                logits,
                targets.contiguous(),
                loss,
                pred,
                n_rows,
                n_cols,
                WRITE_GRAD=write_grad,
                BLOCK_ROWS=block_rows,
                BLOCK_V=block_v or bv,
                num_warps=num_warps,
            )
    return loss, pred


def _ce_chunk_triton(logits: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    loss, pred = ce_chunk_forward(logits, targets, with_grad)
    return loss, pred, (logits if with_grad else None)


def aot_specs(vocab: int, dtype: torch.dtype) -> list:
    """The chunk kernel (with and without the gradient pass) at the tiles the launcher picks on
    a GPU, as :class:`hrm.ops.aot.KernelSpec` s."""
    from hrm.ops.aot import KernelSpec

    _, block_rows, block_v, num_warps = _ce_tiles(default_chunk_rows(vocab), vocab, "gpu")
    sig = {
        **pointers(dtype, "LOGITS"),
        "TARGETS": "*i64",
        **pointers(torch.float32, "LOSS"),
        "PRED": "*i64",
        "n_rows": "i32",
        "n_cols": "i32",
    }
    aligned = ("LOGITS", "TARGETS", "LOSS", "PRED", *(("n_cols",) if vocab % 16 == 0 else ()))
    return [
        KernelSpec(
            f"ce_chunk{'+grad' if grad else ''} V={vocab} {TRITON_TYPES[dtype]}",
            f"{__name__}:_ce_chunk_kernel",
            sig,
            {"WRITE_GRAD": grad, "BLOCK_ROWS": block_rows, "BLOCK_V": block_v},
            num_warps,
            1,
            aligned,
        )
        for grad in (False, True)
    ]


# -- compile backend: the chunk's loss and gradient in torch, compiled by inductor ---------
def _ce_chunk_math(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    lf = logits.to(compute_dtype(logits.dtype))
    loss = torch.logsumexp(lf, -1) - lf.gather(1, targets[:, None]).squeeze(1)
    return loss, lf.argmax(-1)


def _ce_chunk_grad_math(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk's loss and argmax; overwrites ``logits`` with their gradient."""
    lf = logits.to(compute_dtype(logits.dtype))
    lse = torch.logsumexp(lf, -1)
    loss = lse - lf.gather(1, targets[:, None]).squeeze(1)
    onehot = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]
    pred = lf.argmax(-1)
    logits.copy_(torch.exp(lf - lse[:, None]) - onehot.to(lf.dtype))
    return loss, pred


_ce_chunk_compiled = compiled(_ce_chunk_math)
_ce_chunk_grad_compiled = compiled(_ce_chunk_grad_math)


def _ce_chunk_compile(logits: Tensor, targets: Tensor, with_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    if with_grad:
        return (*_ce_chunk_grad_compiled(logits, targets), logits)
    return (*_ce_chunk_compiled(logits, targets), None)


# -- cpu backend: the chunk's loss and gradient in C++ -----------------------------------------
def _ce_chunk_cpu(logits_t: Tensor, targets: Tensor, grad: Tensor | None, with_grad: bool) -> tuple[Tensor, Tensor]:
    """``hrm_ce::ce_chunk_t`` (``csrc/cross_entropy/ce_chunk_cpu.cpp``): the loss and argmax of
    the ``n = len(targets)`` first columns of the transposed logits ``[V, C]`` (C a multiple of
    32; the other columns are padding), with ``with_grad`` the gradient written over them as
    ``g^T`` and into ``grad [C, V]`` as ``g`` (zero in the padding)."""
    cpp_extension.load()  # built on first use, then a cached no-op
    loss, pred = torch.ops.hrm_ce.ce_chunk_t(logits_t, targets, grad, with_grad)
    return loss, pred


# -- the chunk loop (the fused backends) -----------------------------------------------------
ChunkCE = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor, "Tensor | None"]]


def _product_rows(rows: int, device: torch.device) -> int:
    """The rows a chunk of ``rows`` supervised rows runs its products on (``_CPU_ROW_BUCKET``)."""
    return cdiv(rows, _CPU_ROW_BUCKET) * _CPU_ROW_BUCKET if device.type == "cpu" else rows


# Rows per matmul of the chunk loop: large enough for the GEMM to run at its peak (each call
# packs the whole head weight again, so on the AMX CPU a bf16 chunk of 512 rows is faster in
# one product than in two), small enough that the output rows stay a few tens of MiB (a
# 1024-row product at once runs ~40% slower on a CPU).
_MATMUL_ROWS = 512
# On a CPU each chunk's products run on a multiple of this many rows, the chunk's rows then
# zero rows (whose logits are 0 and stay so: the chunk's softmax runs on its own rows only):
# oneDNN compiles a kernel for each new product shape (tens of milliseconds for the three
# products of a 32K-vocabulary chunk on the AMX CPU), and the last chunk of every step would
# otherwise have a new row count. A multiple of 32: the cpu backend's chunk kernel takes whole
# blocks of 32 columns.
_CPU_ROW_BUCKET = 64
# Vocabulary rows per dW update when dW is accumulated in a wider dtype than the products:
# the product of one slab is the only temporary (never one of the weight's size).
_DW_SLAB_ROWS = 8192


def _add_slab(out: Tensor, part: Tensor, first: bool) -> None:
    """``out = part`` (``first``) or ``out += part``: a slab of dW and its product."""
    if first:
        out.copy_(part)
    else:
        out.add_(part)


def _add_slab_cpu(out: Tensor, part: Tensor, first: bool) -> None:
    """:func:`_add_slab` in one pass for an fp32 slab and a bf16 product (``hrm_ce::accumulate``;
    torch's mixed-dtype ``add_`` first converts the product to a new fp32 tensor)."""
    if out.dtype == torch.float32 and part.dtype == torch.bfloat16:
        cpp_extension.load()  # a cached no-op after the chunk's
        torch.ops.hrm_ce.accumulate(out, part, first)
    else:
        _add_slab(out, part, first)


def _accumulate_dw(dw: Tensor, g_t: Tensor, x: Tensor, first: bool, add_slab: Callable = _add_slab) -> None:
    """``dw (+)= g_t x`` with ``g_t [V, C]`` (the chunk's gradient transposed: a view of a
    row-major ``g``, or the cpu loop's own ``g^T``), ``x [C, d]`` in the head's dtype and
    ``dw [V, d]`` in its own (fp32 for 16-bit products): same dtype in one GEMM; else slab by
    slab, with the product accumulated in fp32 by cuBLAS on a GPU and rounded to the head's
    dtype elsewhere, then added to its slab by ``add_slab``."""
    if dw.dtype == g_t.dtype:
        if first:
            torch.mm(g_t, x, out=dw)
        else:
            dw.addmm_(g_t, x)
        return
    for v0 in range(0, dw.shape[0], _DW_SLAB_ROWS):
        gs = g_t[v0 : v0 + _DW_SLAB_ROWS]
        part = torch.mm(gs, x, out_dtype=dw.dtype) if dw.is_cuda else torch.mm(gs, x)
        add_slab(dw[v0 : v0 + _DW_SLAB_ROWS], part, first)


def _loop_buffers(z: Tensor, weight: Tensor, labels: Tensor, with_grad: bool) -> tuple[Tensor, ...]:
    """A chunk loop's ``(w, loss, pred, dz, dW)``: the weight cast to z's dtype once for all
    chunks (a no-op when the dtypes agree), the loss and ``pred`` to fill, and (``with_grad``)
    the gradients, ``dW`` in the weight's compute dtype (empty tensors otherwise)."""
    w = weight.to(z.dtype)
    loss = torch.zeros((), dtype=compute_dtype(z.dtype), device=z.device)
    pred = torch.full(labels.shape, IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    dz = torch.zeros(z.shape, dtype=z.dtype, device=z.device) if with_grad else z.new_empty(0)
    dw = (
        torch.empty(weight.shape, dtype=compute_dtype(weight.dtype), device=weight.device)
        if with_grad
        else weight.new_empty(0)
    )
    return w, loss, pred, dz, dw


def _chunk(z: Tensor, rows: Tensor, start: int, chunk_rows: int) -> tuple[Tensor, Tensor]:
    """The chunk's supervised rows ``r`` and its product rows ``x [m, d]``: ``z[r]``, then zero
    rows up to the bucket (:func:`_product_rows`)."""
    r = rows[start : start + chunk_rows]
    n = r.shape[0]
    m = _product_rows(n, z.device)
    return r, (z[r] if m == n else torch.cat([z[r], z.new_zeros(m - n, z.shape[1])]))


def _loop_result(loss, pred, dz, dw, weight, S: int, with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if with_grad and S == 0:
        dw.zero_()  # no chunk wrote it
    return loss, pred, dz, (dw.to(weight.dtype) if with_grad else dw)


def linear_cross_entropy_chunked(
    z: Tensor,
    weight: Tensor,
    labels: Tensor,
    rows: Tensor,
    chunk_rows: int,
    ce_chunk: ChunkCE,
    with_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss_sum, pred, dz, dW)`` (the gradients are empty without ``with_grad``) over the
    supervised ``rows``; ``ce_chunk(logits, targets, with_grad) -> (loss_rows, pred_rows,
    dlogits)``, where ``dlogits`` is ``logits`` overwritten with their gradient; dW gathers in
    :func:`_accumulate_dw`. The matmuls run in z's dtype, on CPUs over whole buckets of rows
    (:func:`_product_rows`); every buffer is allocated once per call and reused by the chunks.
    Reads nothing back to the host: the loop's length is ``rows``'s size."""
    w, loss, pred, dz, dw = _loop_buffers(z, weight, labels, with_grad)
    V, S = w.shape[0], rows.shape[0]
    logits_buf = z.new_empty(_product_rows(min(chunk_rows, S), z.device), V)
    for start in range(0, S, chunk_rows):
        r, x = _chunk(z, rows, start, chunk_rows)
        n, m = r.shape[0], x.shape[0]
        logits = logits_buf[:m]
        for a in range(0, m, _MATMUL_ROWS):
            torch.mm(x[a : a + _MATMUL_ROWS], w.t(), out=logits[a : a + _MATMUL_ROWS])
        # with_grad: the gradient overwrites the chunk's logits, the zero rows' logits stay 0
        loss_rows, pred_rows, _ = ce_chunk(logits[:n], labels[r], with_grad)
        loss += loss_rows.sum()
        pred[r] = pred_rows.to(pred.dtype)
        if with_grad:
            dz[r] = (logits @ w)[:n]  # [C, d]
            _accumulate_dw(dw, logits.t(), x, start == 0)
    return _loop_result(loss, pred, dz, dw, weight, S, with_grad)


def linear_cross_entropy_chunked_cpu(
    z: Tensor, weight: Tensor, labels: Tensor, rows: Tensor, chunk_rows: int, with_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`linear_cross_entropy_chunked` for the cpu backend: each chunk's logits are made
    transposed, ``W x^T [V, m]`` (which streams the head weight once), and :func:`_ce_chunk_cpu`
    turns them into ``g^T`` in place and ``g [m, V]`` beside them; then ``dz = g W`` and the dW
    slabs ``g^T x`` take row-major operands. fp32 and bf16 products on a CPU; other dtypes run
    the generic loop with the compile backend's chunk."""
    if z.dtype not in CPU_KERNEL_DTYPES or z.device.type != "cpu":
        return linear_cross_entropy_chunked(z, weight, labels, rows, chunk_rows, _ce_chunk_compile, with_grad)
    w, loss, pred, dz, dw = _loop_buffers(z, weight, labels, with_grad)
    V, S = w.shape[0], rows.shape[0]
    most = _product_rows(min(chunk_rows, S), z.device)
    logits_buf = z.new_empty(V * most)  # a chunk's [V, m] at its start: contiguous for any m
    grad_buf = z.new_empty(most * V) if with_grad else None
    for start in range(0, S, chunk_rows):
        r, x = _chunk(z, rows, start, chunk_rows)
        n, m = r.shape[0], x.shape[0]
        logits_t = logits_buf[: V * m].view(V, m)
        torch.mm(w, x.t(), out=logits_t)
        g = grad_buf[: m * V].view(m, V) if with_grad else None
        loss_rows, pred_rows = _ce_chunk_cpu(logits_t, labels[r], g, with_grad)
        loss += loss_rows.sum()
        pred[r] = pred_rows.to(pred.dtype)
        if with_grad:
            dz[r] = (g @ w)[:n]  # [n, d]
            _accumulate_dw(dw, logits_t, x, start == 0, _add_slab_cpu)
    return _loop_result(loss, pred, dz, dw, weight, S, with_grad)


def _define_op(name: str, loop: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]):
    """A chunk loop, ``loop(z, weight, labels, rows, chunk_rows, with_grad)``, as a
    ``torch.library`` custom op (opaque to ``torch.compile``, so that its data-dependent row
    selection does not break graphs) with its fake and autograd."""

    @torch.library.custom_op(f"hrm::{name}", mutates_args=())
    def op(
        z: Tensor, weight: Tensor, labels: Tensor, rows: Optional[Tensor], chunk_rows: int, with_grad: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rows = supervised_rows(labels) if rows is None else rows
        return loop(z, weight, labels, rows, chunk_rows, with_grad)

    @op.register_fake
    def _(z, weight, labels, rows, chunk_rows, with_grad):
        loss = z.new_empty((), dtype=compute_dtype(z.dtype))
        if not with_grad:
            return loss, labels.new_empty(labels.shape), z.new_empty(0), weight.new_empty(0)
        return loss, labels.new_empty(labels.shape), z.new_empty(z.shape), weight.new_empty(weight.shape)

    def setup_context(ctx, inputs, output) -> None:
        _, pred, dz, dw = output
        ctx.mark_non_differentiable(pred, dz, dw)
        ctx.save_for_backward(dz, dw)
        ctx.set_materialize_grads(False)  # the other outputs' gradients are never used: no zeros of W's size

    def backward(ctx, dloss, _dpred, _ddz, _ddw):
        dz, dw = ctx.saved_tensors
        return dloss * dz, dloss * dw, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def _generic_loop(ce_chunk: ChunkCE) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    def loop(z, weight, labels, rows, chunk_rows, with_grad):
        return linear_cross_entropy_chunked(z, weight, labels, rows, chunk_rows, ce_chunk, with_grad)

    return loop


_lce_compile_op = _define_op("linear_cross_entropy_compile", _generic_loop(_ce_chunk_compile))
_lce_triton_op = _define_op("linear_cross_entropy_triton", _generic_loop(_ce_chunk_triton))
_lce_cpu_op = _define_op("linear_cross_entropy_cpu", linear_cross_entropy_chunked_cpu)


def _fused_backend(op) -> Callable[..., tuple[Tensor, Tensor]]:
    def impl(
        z: Tensor, weight: Tensor, labels: Tensor, rows: Tensor | None = None, chunk_rows: int | None = None
    ) -> tuple[Tensor, Tensor]:
        z = z.to(linear_dtype(z))  # a custom op runs below autocast: the fused backends apply it here
        chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0], z.element_size(), z.device)
        loss, pred, _, _ = op(z, weight, labels, rows, chunk_rows, needs_grad(z, weight))
        return loss, pred

    return impl


linear_cross_entropy_compile = register("linear_cross_entropy", "compile")(_fused_backend(_lce_compile_op))
linear_cross_entropy_triton = register("linear_cross_entropy", "triton")(_fused_backend(_lce_triton_op))
linear_cross_entropy_cpu = register("linear_cross_entropy", "cpu")(_fused_backend(_lce_cpu_op))


def linear_cross_entropy(
    z: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    rows: Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss_sum, pred)`` of the LM head ``weight [V, d]`` on the supervised rows of
    ``z [T, d]`` (``labels [T]``, ``-100`` = ignore): the summed cross-entropy and the
    argmax prediction per row (``-100`` on unsupervised rows). ``rows`` = :func:`supervised_rows`
    of ``labels``, precomputed with the batch; without it the op finds them itself (on a GPU
    that reads their count back to the host)."""
    return get_impl("linear_cross_entropy", backend)(z, weight, labels, rows, chunk_rows)
