"""Named ranges for profilers: ``with range("H1"): ...``.

A range shows up as a ``torch.profiler`` user annotation (``record_function``) while a
torch profiler is recording, and as an NVTX push/pop range (Nsight Systems / Nsight
Compute) once :func:`enable_nvtx` has been called (``hrm profile --nsys/--ncu`` does;
so does ``HRM_NVTX=1`` in the environment). With neither, :func:`range` returns a shared
no-op context manager after one C call: nothing measurable in a train step. Inside a
``torch.compile`` trace it is always the no-op, so ranges never break a graph.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from typing import Callable, ContextManager

import torch

_NULL = contextlib.nullcontext()
_profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled
_nvtx: tuple[Callable[[str], object], Callable[[], object]] | None = None  # (push, pop) while enabled


def _nvtx_functions() -> tuple[Callable[[str], object], Callable[[], object]] | None:
    """NVTX push/pop from CUDA (``torch.cuda.nvtx``), else from the ``nvtx`` package, else ``None``."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    try:
        import nvtx
    except ImportError:
        return None
    return nvtx.push_range, nvtx.pop_range


def enable_nvtx(enabled: bool = True) -> bool:
    """Emit NVTX ranges from now on (or stop); returns whether an NVTX library was found."""
    global _nvtx
    _nvtx = _nvtx_functions() if enabled else None
    return _nvtx is not None


def nvtx_enabled() -> bool:
    return _nvtx is not None


class _Range:
    __slots__ = ("name", "record")

    def __init__(self, name: str, record: bool) -> None:
        self.name, self.record = name, record

    def __enter__(self) -> _Range:
        if _nvtx is not None:
            _nvtx[0](self.name)
        if self.record:
            self.record = torch.profiler.record_function(self.name)
            self.record.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.record:
            self.record.__exit__(*exc)
        if _nvtx is not None:
            _nvtx[1]()


def range(name: str) -> ContextManager:  # noqa: A001 - reads as profiling.range("H1")
    """A named range around a block of code (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _NULL
    record = _profiler_enabled()
    if not record and _nvtx is None:
        return _NULL
    return _Range(name, record)


def stack_range_name(level: str, call: int, L_cycles: int) -> str:
    """Name of stack invocation ``call`` (0-based, in call order) of an HRM forward: ``L{h}.{l}``
    for the ``l``-th L step of H cycle ``h``, ``H{h}`` for that cycle's H step."""
    h, l = builtins.divmod(call, L_cycles + 1)
    return f"L{h}.{l}" if level == "L" else f"H{h}"


if os.environ.get("HRM_NVTX") == "1":
    enable_nvtx()

__all__ = ["range", "enable_nvtx", "nvtx_enabled", "stack_range_name"]
