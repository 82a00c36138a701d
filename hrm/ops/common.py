"""What every op shares: the optional Triton import, the dtype policy, math constants, launch
sizes for row-wise kernels, and the lazily compiled functions of the ``compile`` backend.

Triton is optional: without it ``jit`` leaves kernels as plain, never-launched functions
and :mod:`hrm.ops.dispatch` reports the ``triton`` backend unavailable.

Tile pickers are pure functions of the shape and a *tile target*: ``"gpu"`` (tiles of about
4K elements per program, what a GPU runs) or ``"interpreter"`` (the Triton interpreter pays
~1 ms of Python per program whatever its size, so it takes whole tensors in as few
programs as possible). Launchers ask :func:`tile_target` which one applies.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Literal, NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    constexpr = tl.constexpr
except ImportError:  # the triton backend then reports itself unavailable
    triton = tl = None

    def jit(fn: Callable) -> Callable:
        return fn

    class constexpr:  # what host code reads of a constant: .value
        def __init__(self, value: float) -> None:
            self.value = value


# Math constants: inside @jit functions (which read only constexpr globals) as they are, in
# host code as ``.value``.
LOG2E = constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# What the cpu backend's C++ kernels store (their math is fp32): other dtypes take a fallback.
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms, RoPE, losses and optimizer math compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes ``x`` in: autocast's, as ``F.linear`` would, when
    autocast is on for x's device and x is an autocast-eligible float; else x's."""
    device = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` in ``dtype`` (``None``: as it is)."""
    return x if dtype is None or x.dtype == dtype else x.to(dtype)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- launch sizes ----------------------------------------------------------------------------
TileTarget = Literal["gpu", "interpreter"]
TILE_ELEMS = {"gpu": 4096, "interpreter": 1 << 18}  # elements one program holds per loaded tile


def tile_target() -> TileTarget:
    """``"interpreter"`` under ``TRITON_INTERPRET=1``, else ``"gpu"``. ``HRM_TRITON_TILES=gpu``
    makes the interpreter run the GPU tiling (many programs, partial tiles) for tests of it."""
    if interpreting() and os.environ.get("HRM_TRITON_TILES") != "gpu":
        return "interpreter"
    return "gpu"


def row_settings(n_rows: int, block_cols: int, target: TileTarget) -> tuple[int, int]:
    """``(block_rows, num_warps)`` for a row-wise kernel whose programs hold ``block_rows``
    rows of ``block_cols`` (a power of two) elements: about :data:`TILE_ELEMS` per program,
    at least one row, and one warp per 512 elements (4 to 16)."""
    block_rows = max(1, min(next_pow2(max(n_rows, 1)), TILE_ELEMS[target] // block_cols))
    return block_rows, min(16, max(4, block_rows * block_cols // 512))


# -- tuned row-wise tiles ------------------------------------------------------------------
# The launchers' (block_rows, num_warps) may come from a tuning table (hrm.tuning.table):
# per (kernel, row width, dtype, device), resolved once and cached; the tuner forces a
# candidate with :func:`forced_row_config`. Only on a CUDA device outside the interpreter.
_ROW_CACHE: dict[tuple, tuple[tuple[int, int] | None, str]] = {}  # -> (tuned or None, why)
_ROW_FORCED: dict[str, tuple[int, int]] = {}
_ROW_DEVICES: dict[int, tuple[tuple[int, int], str]] = {}


def clear_row_config_cache() -> None:
    """Forget resolved row-wise configs (after a tuning table changed in this process; tests)."""
    _ROW_CACHE.clear()


@contextlib.contextmanager
def forced_row_config(kernel: str, config: dict) -> Iterator[None]:
    """Make ``kernel``'s launcher use ``config`` (``block_rows``, ``num_warps``), on any device:
    how the tuner runs a candidate."""
    _ROW_FORCED[kernel] = (int(config["block_rows"]), int(config["num_warps"]))
    try:
        yield
    finally:
        _ROW_FORCED.pop(kernel, None)


def row_config_source(
    kernel: str, width: int, dtype: torch.dtype, capability: tuple[int, int], device_name: str | None
) -> tuple[tuple[int, int] | None, str]:
    """The tuned ``(block_rows, num_warps)`` of a row-wise ``kernel`` at row ``width`` and
    ``dtype`` on this device (exact device table, then same capability), or ``None`` (the
    launcher's heuristic default), and why."""
    key = (kernel, width, dtype, tuple(capability), device_name)
    if key in _ROW_CACHE:
        return _ROW_CACHE[key]
    from hrm.tuning.kernels import row_bucket
    from hrm.tuning.table import lookup

    bucket = row_bucket(width, dtype)
    t = lookup(kernel, bucket, device_name, tuple(capability)) if bucket is not None else None
    hit, why = None, "heuristic default (row_settings; not timed)"
    if t is not None:
        if set(t.config) == {"block_rows", "num_warps"}:
            hit, why = (int(t.config["block_rows"]), int(t.config["num_warps"])), t.why
        else:  # a table from a version with other config fields
            import warnings

            warnings.warn(f"ignoring the tuned {kernel} config {t.config}: unknown fields", stacklevel=2)
    _ROW_CACHE[key] = (hit, why)
    return hit, why


def tuned_row_config(kernel: str, width: int, t: torch.Tensor, block_rows: int, num_warps: int) -> tuple[int, int]:
    """``(block_rows, num_warps)`` for a row-wise launcher over ``t`` (rows ``width`` wide):
    the tuned config of this device when a table has one, else the heuristic default given.
    Under the interpreter and on a CPU the default stays (no table is read). One dict
    lookup per call once resolved: no file I/O, no host sync."""
    if _ROW_FORCED and kernel in _ROW_FORCED:
        return _ROW_FORCED[kernel]
    if t.device.type != "cuda" or interpreting():
        return block_rows, num_warps
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    dev = _ROW_DEVICES.get(index)
    if dev is None:
        if torch.compiler.is_compiling():
            return block_rows, num_warps
        dev = _ROW_DEVICES[index] = (torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))
    key = (kernel, width, t.dtype, dev[0], dev[1])
    entry = _ROW_CACHE.get(key)
    if entry is None:
        if torch.compiler.is_compiling():  # reading tables is no graph op: the default, uncached
            return block_rows, num_warps
        entry = row_config_source(kernel, width, t.dtype, dev[0], dev[1])
    return entry[0] if entry[0] is not None else (block_rows, num_warps)


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous ``[rows, last_dim]`` matrix (a view when it already is one)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


@contextlib.contextmanager
def device_of(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s CUDA device current for a kernel launch (Triton launches on the current
    device, whatever device its arguments live on); a no-op for CPU tensors."""
    if t.device.type == "cuda":
        with torch.cuda.device(t.device):
            yield
    else:
        yield


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


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will want gradients for any of ``tensors`` (else run forward-only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- ahead-of-time specs ------------------------------------------------------------------------
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def pointers(dtype: torch.dtype, *names: str) -> dict[str, str]:
    """Ahead-of-time signature entries: ``names`` are pointers to ``dtype``."""
    return {n: f"*{TRITON_TYPES[dtype]}" for n in names}


class RowKernelAot(NamedTuple):
    """What the ahead-of-time specs of a row-wise kernel share."""

    tiles: dict[str, int]  # BLOCK_ROWS / BLOCK_COLS at the tiles the launcher picks on a GPU
    sizes: dict[str, str]  # the n_rows / n_cols arguments
    aligned: tuple[str, ...]  # size arguments divisible by 16
    tag: str  # e.g. "d=1024 bf16"
    where: str  # "module:" prefix of the kernels' names
    num_warps: int


def row_kernel_aot(
    tile_fn: Callable, rows: int, cols: int, dtype: torch.dtype, module: str, label: str
) -> RowKernelAot:
    """:class:`RowKernelAot` for a kernel over ``rows x cols`` whose launcher picks tiles with
    ``tile_fn(rows, cols, target) -> (grid, block_rows, block_cols, num_warps)``."""
    _, block_rows, block_cols, num_warps = tile_fn(rows, cols, "gpu")
    return RowKernelAot(
        {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols},
        {"n_rows": "i32", "n_cols": "i32"},
        ("n_cols",) if cols % 16 == 0 else (),
        f"{label}={cols} {TRITON_TYPES[dtype]}",
        f"{module}:",
        num_warps,
    )


__all__ = [
    "LN2",
    "LOG2E",
    "TILE_ELEMS",
    "TRITON_TYPES",
    "RowKernelAot",
    "TileTarget",
    "cdiv",
    "clear_row_config_cache",
    "compiled",
    "compute_dtype",
    "constexpr",
    "device_of",
    "forced_row_config",
    "interpreting",
    "jit",
    "needs_grad",
    "next_pow2",
    "pointers",
    "row_config_source",
    "row_kernel_aot",
    "row_settings",
    "rows_2d",
    "tile_target",
    "tl",
    "triton",
    "tuned_row_config",
]
