"""C++ kernels for the ``cpu`` backend, built at first use with ``torch.utils.cpp_extension``.

This module owns the ``cpu`` backend's probe (a C++ compiler, ninja and the ``csrc/``
sources must be present) and the build: every source of :data:`SOURCES` is compiled
``-O3 -march=native -fopenmp`` into one library (``ninja`` compiles them side by side, one
per core), in a cache directory keyed by everything the binary depends on (sources, shared
headers, torch and Python versions, the CPU's flags), so a rebuild happens only when one of
them changes; one process at a time builds there (:func:`_build_lock`, which also clears the
lock file a killed build leaves). Each source registers its own ops (``TORCH_LIBRARY``); the op files call
:func:`load` before their first call into the library. The ``ninja`` binary of the pip
package is put on ``PATH`` for the duration of a build only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from hrm.errors import BackendUnavailable
from hrm.ops.dispatch import register_probe


def _csrc() -> Path:
    """The C++ sources: ``csrc/`` of the checkout holding this package (a checkout or an editable
    install), else ``<prefix>/share/hrm/csrc``, where a wheel installs them
    (``[tool.setuptools.data-files]`` in pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if checkout.is_dir():
        return checkout
    return Path(sysconfig.get_path("data")) / "share" / "hrm" / "csrc"


CSRC = _csrc()
NAME = "hrm_cpu_kernels"
# The library's sources under csrc/, with the op namespaces they register.
SOURCES = (
    "prefixlm_attention/prefixlm_attention_cpu.cpp",  # hrm_cpu: PrefixLM attention, fwd and bwd
    "decode/decode_cpu.cpp",  # hrm_decode: generation's decode attention
    "cross_entropy/ce_chunk_cpu.cpp",  # hrm_ce: the LM head's cross-entropy chunk, dW slab add
    "elementwise/elementwise_cpu.cpp",  # hrm_ew: SwiGLU and split-RoPE, fwd and bwd
    "optim/adam_atan2_cpu.cpp",  # hrm_opt: the Adam-atan2 step with the EMA
)


def _pip_ninja_dir() -> str | None:
    """The directory of the ``ninja`` binary that the pip package ships (a venv's bin/ is not
    on PATH unless the venv is activated), or ``None``."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _build_path() -> str:
    """``PATH`` as a build sees it: the current one, with pip's ninja appended."""
    extra = _pip_ninja_dir()
    path = os.environ.get("PATH", "")
    return path + os.pathsep + extra if extra else path


@contextlib.contextmanager
def _build_environment() -> Iterator[None]:
    before = os.environ.get("PATH")
    os.environ["PATH"] = _build_path()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def toolchain_missing() -> str | None:
    """Why the C++ CPU kernels cannot be built here, or ``None``."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r}, set CXX) on PATH to build the CPU kernels"
    if shutil.which("ninja", path=_build_path()) is None:
        return "torch.utils.cpp_extension needs 'ninja' (pip install ninja) to build the CPU kernels"
    if not CSRC.is_dir():
        return f"the C++ sources are not part of this installation ({CSRC} is missing)"
    return None


register_probe("cpu", toolchain_missing)


def _build_dir(name: str, sources: tuple[Path, ...]) -> Path:
    """A cache directory keyed by everything the binary depends on (it is built -march=native)."""
    root = os.environ.get("HRM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "hrm"
    )
    key = hashlib.sha256()
    for src in (*sources, *sorted((CSRC / "common").glob("*.h"))):  # the sources and the headers they share
        key.update(src.read_bytes())
    key.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}|openmp".encode())
    try:
        key.update(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).encode())
    except (OSError, StopIteration):
        pass
    return Path(root) / "extensions" / f"{name}-{key.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold this build directory for one process at a time, with a lock that ends with its
    process (``flock``). ``torch.utils.cpp_extension`` guards a build with a plain ``lock``
    file, which a build killed halfway (Ctrl-C, a timeout, the OOM killer) leaves behind, and
    every later load then waits on it forever, silently. Holding the ``flock``, no other
    process of ours is building here, so such a ``lock`` file is stale: it is removed."""
    with open(build / "hrm-build.flock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"hrm: waiting for another process to finish building the C++ kernels in {build}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            print(f"hrm: removing {stale}, left by a build that was interrupted", file=sys.stderr)
            stale.unlink(missing_ok=True)
        yield  # the flock goes with the file's close, or with the process


@functools.cache
def load() -> None:
    """Build (or load from the cache) the library of :data:`SOURCES`; its ops register
    themselves with ``TORCH_LIBRARY`` (~25 s the first time on 2 cores, then a no-op)."""
    reason = toolchain_missing()
    if reason is not None:
        raise BackendUnavailable(f"backend 'cpu' cannot run here: {reason}")
    paths = tuple(CSRC / s for s in SOURCES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise BackendUnavailable(f"backend 'cpu' cannot run here: missing C++ sources {', '.join(missing)}")
    from torch.utils import cpp_extension

    build = _build_dir(NAME, paths)
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{NAME}.so").is_file():  # a wait of ~25 s: say why
        print(
            f"hrm: building the cpu backend's C++ kernels (once per machine, ~25 s on 2 cores) in {build}",
            file=sys.stderr,
        )
    try:
        with _build_lock(build), _build_environment():
            # -fopenmp: at::parallel_for is inline OpenMP in the headers; the library resolves
            # to the libgomp.so.1 that torch has already loaded, so there is one thread pool.
            cpp_extension.load(
                name=NAME,
                sources=[str(p) for p in paths],
                build_directory=str(build),
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
    except (RuntimeError, OSError) as e:
        raise BackendUnavailable(f"building the cpu backend's C++ kernels in {build} failed: {e}") from e


__all__ = ["CSRC", "NAME", "SOURCES", "load", "toolchain_missing"]
