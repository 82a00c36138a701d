"""The one place that chooses a kernel backend.

Backends, in the order ``auto`` prefers them:

- ``cuda``: hand-written CUDA/CUTLASS kernels from ``csrc/`` (GPU), built with CMake into
  ``libhrm_cuda.so`` (:mod:`hrm.ops.cuda_extension`, docs/cuda.md); available when a CUDA
  device is visible and the library loads. Inputs its kernels do not take run on the fallback.
- ``triton``: Triton kernels (GPU; the interpreter runs them on the CPU for tests, but
  ``auto`` never picks it where no CUDA device is visible).
- ``cpu``: hand-written CPU kernels.
- ``compile``: ``torch.compile``/inductor over the references (the CPU fast path).
- ``torch``: the readable PyTorch references; always available, and the oracle.

Each op file registers its implementations with :func:`register`. A backend is
*available* when its runtime probes pass (:func:`register_probe`) and it implements at
least one op; an op that the chosen backend does not implement runs on the first available
backend of the same device family after it that does (``cpu`` -> ``compile``), else on
its ``torch`` reference. :func:`resolve_backend` turns a user's request into a backend
name: an explicit name that cannot run raises :class:`~hrm.errors.BackendUnavailable`;
``None``/``"auto"`` picks the most preferred available backend and logs which one it picked.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from hrm.errors import BackendUnavailable
from hrm.ops.common import interpreting, triton

log = logging.getLogger("hrm")

BACKENDS = ("cuda", "triton", "cpu", "compile", "torch")

_IMPLS: dict[str, dict[str, Callable]] = {}
_PROBES: dict[str, list[Callable[[], str | None]]] = {}
_REASONS: dict[str, str | None] = {}  # unavailable_reason's memo: torch.compile reads a dict, runs no probe


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def registered_ops() -> list[str]:
    """Every op that has at least one implementation, in registration order."""
    return list(_IMPLS)


def implementations(op: str) -> Mapping[str, Callable]:
    """The backends that implement ``op`` directly, each with its function (read-only)."""
    return MappingProxyType(_IMPLS[op])


def register_probe(backend: str, probe: Callable[[], str | None]) -> None:
    """Add a runtime check to ``backend`` (e.g. "a C++ compiler is on PATH"): ``probe()``
    returns why the backend cannot run here, or ``None``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _PROBES.setdefault(backend, []).append(probe)
    _REASONS.clear()


def _probe(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or ``None`` if it can."""
    if backend == "torch":
        return None
    if backend in ("cuda", "triton") and not torch.cuda.is_available():
        if backend == "triton" and interpreting():
            pass  # the interpreter runs Triton kernels on the CPU
        else:
            return "no CUDA device is visible"
    if backend == "triton" and triton is None:
        return "the 'triton' package is not installed"
    if not any(backend in impls for impls in _IMPLS.values()):
        return "no op implements it in this version of hrm"
    for probe in _PROBES.get(backend, ()):
        reason = probe()
        if reason is not None:
            return reason
    return None


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (``None`` if it can); probed once per backend."""
    if backend not in _REASONS:
        _REASONS[backend] = _probe(backend)
    return _REASONS[backend]


def available_backends() -> list[str]:
    """Backends that can run here, most preferred first (always ends with ``torch``)."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _auto_candidates() -> list[str]:
    """What ``auto`` may pick, in order: the available backends, less ``triton`` when no
    CUDA device is visible (the interpreter runs it on a CPU for tests, slowly)."""
    return [b for b in available_backends() if b != "triton" or torch.cuda.is_available()]


def resolve_backend(name: str | None = None) -> str:
    """Turn ``name`` (a backend, ``"auto"`` or ``None``) into a backend that can run here."""
    if name is None or name == "auto":
        chosen = _auto_candidates()[0]
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


# Where an op runs when the chosen backend lacks it: the next backends that suit the same
# tensors (the CPU kernels never run after a GPU backend).
_FALLBACK = {"cuda": ("triton", "compile"), "triton": ("compile",), "cpu": ("compile",), "compile": (), "torch": ()}


def get_impl(op: str, backend: str | None) -> Callable:
    """The implementation of ``op`` for ``backend``; an op that the backend lacks runs on its
    first available fallback that has it (``cpu`` -> ``compile``), else on its reference.

    The model resolves ``auto`` once and passes the name to every op, so this is what makes
    ``auto`` = ``cpu`` keep the other ops on ``compile``."""
    impls = _IMPLS[op]
    if backend in impls and _REASONS.get(backend, "") is None:  # probed and available: a dict read
        return impls[backend]
    name = resolve_backend(backend)  # probes once: loads libhrm_cuda, builds the C++ kernels
    for b in (name, *_FALLBACK[name]):
        if b in impls and unavailable_reason(b) is None:
            return impls[b]
    return impls["torch"]


def fallback_impl(op: str, backend: str) -> Callable:
    """Where ``op`` runs when ``backend`` implements it but declines these inputs (e.g. a dtype
    or shape its kernel does not take): the first available fallback of ``backend`` that has
    it, else the reference."""
    impls = _IMPLS[op]
    for b in _FALLBACK[backend]:
        if b in impls and unavailable_reason(b) is None:
            return impls[b]
    return impls["torch"]
