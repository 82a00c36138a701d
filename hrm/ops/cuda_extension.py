"""The ``cuda`` backend: the CUDA/CUTLASS kernels of ``csrc/`` in ``libhrm_cuda.so``.

The library is built by the top-level ``CMakeLists.txt`` for a CUDA build of torch
(:data:`BUILD_COMMAND`, docs/cuda.md) into ``hrm/_lib/``; ``$HRM_CUDA_LIBRARY`` points at a
copy elsewhere. Its ``TORCH_LIBRARY(hrm_cuda)`` block defines the ops (``torch.ops.hrm_cuda``);
this module loads it and then runs the Python side that the op files hand in with
:func:`on_load`: fake (meta) implementations, so ``torch.compile`` traces through, and autograd.

The backend is offered only when a CUDA device is visible (:mod:`hrm.ops.dispatch` checks
that) and the library loads; otherwise :func:`unavailable` says why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import torch

from hrm.ops.dispatch import register_probe

LIBRARY_ENV = "HRM_CUDA_LIBRARY"
LIB_DIR = Path(__file__).resolve().parents[1] / "_lib"
LIB_NAME = "libhrm_cuda.so"
BUILD_COMMAND = "cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j"

_ON_LOAD: list[Callable[[], None]] = []
_ops_defined = False  # the hrm_cuda ops exist and _ON_LOAD has run


def on_load(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run ``fn`` once the ``hrm_cuda`` ops exist (to register their fakes and
    autograd); at once if they already do."""
    _ON_LOAD.append(fn)
    if _ops_defined:
        fn()
    return fn


def register_python_side() -> None:
    """Run what the op files handed to :func:`on_load`, once. Called after the library loads;
    tests that stand in CPU versions of the ``hrm_cuda`` ops call it too."""
    global _ops_defined
    if _ops_defined:
        return
    _ops_defined = True
    for fn in _ON_LOAD:
        fn()


def library_path() -> Path | None:
    """Where ``libhrm_cuda.so`` is: ``$HRM_CUDA_LIBRARY``, else ``hrm/_lib/``; ``None`` if not built."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return Path(env)
    path = LIB_DIR / LIB_NAME
    return path if path.is_file() else None


@functools.cache
def _load() -> str | None:
    path = library_path()
    if path is None:
        return (
            f"{LIB_NAME} is not built: run `{BUILD_COMMAND}` in a checkout (docs/cuda.md), "
            f"or point ${LIBRARY_ENV} at a built copy"
        )
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"loading {path} failed: {e}"
    register_python_side()
    return None


def unavailable() -> str | None:
    """Why the CUDA kernels cannot run here, or ``None`` (loads the library on first call)."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA (torch.version.cuda is None)"
    return _load()


def kernels() -> str:
    """The kernels the loaded library holds (e.g. ``"magicnorm_transition swiglu_linear_sm90"``)."""
    return torch.ops.hrm_cuda.kernels()


def storage_aligned(*tensors: torch.Tensor, bytes_: int = 16) -> bool:
    """Whether every tensor's first element sits ``bytes_``-aligned within its storage (the
    caching allocator aligns storages themselves; fake tensors have no address to check)."""
    return all(t.storage_offset() * t.element_size() % bytes_ == 0 for t in tensors)


register_probe("cuda", unavailable)

__all__ = ["BUILD_COMMAND", "LIBRARY_ENV", "kernels", "library_path", "on_load", "register_python_side", "unavailable"]
