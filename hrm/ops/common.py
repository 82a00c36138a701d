"""What the fused op files share: the optional Triton import, launch sizes, and the lazily
compiled functions of the ``compile`` backend.

Triton is optional: without it ``jit`` leaves kernels as plain, never-launched functions
and :mod:`hrm.ops.dispatch` reports the ``triton`` backend unavailable.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # the triton backend then reports itself unavailable
    triton = tl = None

    def jit(fn: Callable) -> Callable:
        return fn


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Elements one program holds in registers per loaded tile: about a 4K tile on a GPU. The
# interpreter pays ~1 ms of Python per program whatever its size, so it takes whole
# tensors in as few programs as possible (see :func:`whole_tensor_tiles`).
TILE_ELEMS_GPU = 4096
TILE_ELEMS_INTERPRETER = 1 << 18
_gpu_tiles_forced = False


def whole_tensor_tiles() -> bool:
    """Whether launchers should size tiles for the interpreter (few, huge programs) rather
    than for a GPU; :func:`gpu_tiles` turns it off so that tests run the GPU tiling."""
    return interpreting() and not _gpu_tiles_forced


@contextlib.contextmanager
def gpu_tiles() -> Iterator[None]:
    """Launch with the GPU tile sizes even under the interpreter (for tests of the tiling)."""
    global _gpu_tiles_forced
    before, _gpu_tiles_forced = _gpu_tiles_forced, True
    try:
        yield
    finally:
        _gpu_tiles_forced = before


def tile_elems() -> int:
    return TILE_ELEMS_INTERPRETER if whole_tensor_tiles() else TILE_ELEMS_GPU


def rows_per_program(n_rows: int, block_cols: int) -> int:
    """Rows per program for a row-wise kernel whose rows are ``block_cols`` wide (a power of two)."""
    return max(1, min(next_pow2(max(n_rows, 1)), tile_elems() // block_cols))


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``[rows, last_dim]`` matrix (a view when it already is one)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


class compiled:
    """``fn`` compiled by inductor on first use (importing stays cheap).

    Shapes start static (inductor's fastest code: a training run repeats one shape) and
    turn dynamic after the first change of shape, so that later shapes reuse one graph.
    Inside an outer ``torch.compile`` the plain function is traced instead, so that it
    joins the outer graph.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled: Callable | None = None
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn)
        return self._compiled(*args)


TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def pointers(dtype: torch.dtype, *names: str) -> dict[str, str]:
    """Ahead-of-time signature entries: ``names`` are pointers to ``dtype``."""
    return {n: f"*{TRITON_TYPES[dtype]}" for n in names}


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients for any of ``tensors`` (else run forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


__all__ = ["TRITON_TYPES", "cdiv", "compiled", "gpu_tiles", "interpreting", "jit", "needs_grad", "next_pow2",
           "pointers", "rows_2d", "rows_per_program", "tile_elems", "tl", "triton", "whole_tensor_tiles"]


class RowKernelAot(NamedTuple):
    """What the ahead-of-time specs of a row-wise kernel share."""

    tiles: dict[str, int]  # BLOCK_ROWS / BLOCK_COLS at the tiles the launcher picks on a GPU
    sizes: dict[str, str]  # the n_rows / n_cols arguments
    aligned: tuple[str, ...]  # size arguments divisible by 16
    tag: str  # e.g. "d=1024 bf16"
    where: str  # "module:" prefix of the kernels' names
    num_warps: int


def row_kernel_aot(tile_fn: Callable, rows: int, cols: int, dtype: torch.dtype, module: str,
                   label: str) -> RowKernelAot:
    """:class:`RowKernelAot` for a kernel over ``rows x cols`` whose launcher picks tiles with
    ``tile_fn(rows, cols) -> (grid, block_rows, block_cols, num_warps)``."""
    with gpu_tiles():
        _, block_rows, block_cols, num_warps = tile_fn(rows, cols)
    return RowKernelAot({"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols}, {"n_rows": "i32", "n_cols": "i32"},
                        ("n_cols",) if cols % 16 == 0 else (), f"{label}={cols} {TRITON_TYPES[dtype]}",
                        f"{module}:", num_warps)

