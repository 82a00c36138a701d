"""The one place that chooses a kernel backend.

Backends, in the order ``auto`` prefers them:

- ``cuda``: hand-written CUDA/CUTLASS kernels from ``csrc/`` (GPU).
- ``triton``: Triton kernels (GPU; the interpreter runs them on the CPU for tests).
- ``cpu``: hand-written CPU kernels.
- ``compile``: ``torch.compile``/inductor over the references (the CPU fast path).
- ``torch``: the readable PyTorch references; always available, and the oracle.

Each op file registers its implementations with :func:`register`. A backend is
*available* when its runtime probe passes and it implements at least one op; an op that
a backend does not implement runs its ``torch`` reference. :func:`resolve_backend`
turns a user's request into a backend name: an explicit name that cannot run raises
:class:`~hrm.errors.BackendUnavailable`; ``None``/``"auto"`` picks the most preferred
available backend and logs which one it picked.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Callable

import torch

from hrm.errors import BackendUnavailable

log = logging.getLogger("hrm")

BACKENDS = ("cuda", "triton", "cpu", "compile", "torch")

_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def _probe(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or ``None`` if it can."""
    if backend == "torch":
        return None
    if backend in ("cuda", "triton") and not torch.cuda.is_available():
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            pass  # the interpreter runs Triton kernels on the CPU
        else:
            return "no CUDA device is visible"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if not any(backend in impls for impls in _IMPLS.values()):
        return "no op implements it in this version of hrm"
    return None


@functools.cache
def unavailable_reason(backend: str) -> str | None:
    return _probe(backend)


def available_backends() -> list[str]:
    """Backends that can run here, most preferred first (always ends with ``torch``)."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def resolve_backend(name: str | None = None) -> str:
    """Turn ``name`` (a backend, ``"auto"`` or ``None``) into a backend that can run here."""
    if name is None or name == "auto":
        chosen = available_backends()[0]
        log.info("backend auto: using %r (available: %s)", chosen, ", ".join(available_backends()))
        return chosen
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from auto, {', '.join(BACKENDS)}")
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(
            f"backend {name!r} cannot run here: {reason} (available: {', '.join(available_backends())})"
        )
    return name


def get_impl(op: str, backend: str | None) -> Callable:
    """The implementation of ``op`` for ``backend`` (its reference where it has none)."""
    impls = _IMPLS[op]
    name = resolve_backend(backend) if backend not in impls else backend
    return impls.get(name, impls["torch"])
