"""The ``cpu`` backend's PrefixLM attention: the C++ kernel in
``csrc/prefixlm_attention/prefixlm_attention_cpu.cpp`` (built at first use by
:mod:`hrm.ops.cpp_extension`), fp32 compute, or for bf16 ``q, k, v`` on CPUs with
AVX512_BF16 bf16 products with fp32 accumulation (on AMX tiles where the CPU has AMX-BF16,
unless ``HRM_CPU_AMX=0``). It walks the row intervals (forward, dq)
and column intervals (dk, dv) of :mod:`.packing` directly, ``ROWS_PER_ITEM`` rows per work
item of the thread pool.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrm.ops import cpp_extension

ROWS_PER_ITEM = 64  # rows (keys in the dk/dv pass) per work item of the thread pool


def cpu_ops():
    """``torch.ops.hrm_cpu``, building the extension on first use."""
    cpp_extension.load()
    return torch.ops.hrm_cpu


def prefixlm_attention_cpu_forward(
    q: Tensor, k: Tensor, v: Tensor, row_lo: Tensor, row_hi: Tensor, gate: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(out [T, H, D], lse [H, T] fp32)``."""
    return tuple(cpu_ops().prefixlm_fwd(q, k, v, gate, row_lo, row_hi, q.shape[-1] ** -0.5, ROWS_PER_ITEM))


def prefixlm_attention_cpu_backward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dgate)``; ``dgate`` is empty without a gate."""
    return tuple(
        cpu_ops().prefixlm_bwd(
            grad_out, q, k, v, out, lse, gate, row_lo, row_hi, col_lo, col_hi, q.shape[-1] ** -0.5, ROWS_PER_ITEM
        )
    )
