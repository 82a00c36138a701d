"""Compile the Triton kernels of a bucket's candidates on a thread pool before the tuner checks
and times them one at a time.

Triton compiles a kernel on the launching thread the first time it launches with a new
specialization. Each attention candidate is new code (its tiles are constexprs), and an
attention kernel takes seconds to compile, so a bucket of about 90 candidates spent minutes
compiling, one at a time, before any timing.

:func:`precompile` works in two passes:

1. It runs each candidate's launches once with Triton's compile step recorded instead of run.
   ``JITFunction._do_compile`` is swapped for a recorder that returns no kernel, and
   ``JITFunction.run`` then returns without launching.
2. It runs the recorded compiles, one per distinct (kernel, key), on a thread pool.
   Triton's compiler passes and ptxas release the GIL, so the threads compile side by side.
   Each kernel lands in its own in-memory cache under the key the JIT computed for the launch,
   so the candidate's next launch finds it.

This uses Triton internals: ``JITFunction._do_compile`` has the same signature in Triton 3.6
and 3.9. Whatever fails here (another signature, a candidate that does not compile) is left to
the first launch, which compiles as before; no result depends on this module.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple


class CompileRequest(NamedTuple):
    """The arguments of one ``JITFunction._do_compile`` call that a launch would have made."""

    fn: Any  # the JITFunction
    key: Any  # its kernel-cache key for the launch's specialization
    signature: Any
    device: int
    constexprs: Any
    options: Any
    attrs: Any


def default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


@contextlib.contextmanager
def recorded_compiles() -> Iterator[list[CompileRequest]]:
    """Inside: every Triton JIT compile is appended to the yielded list instead of run, and its
    launch skipped (``JITFunction.run`` returns ``None`` when ``_do_compile`` does)."""
    from triton.runtime.jit import JITFunction

    requests: list[CompileRequest] = []
    original = JITFunction._do_compile

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        requests.append(CompileRequest(self, key, signature, device, constexprs, options, attrs))
        return None

    JITFunction._do_compile = record
    try:
        yield requests
    finally:
        JITFunction._do_compile = original


def compile_requests(requests: list[CompileRequest], workers: int | None = None) -> int:
    """Run the distinct ``requests`` (by kernel and key) through ``JITFunction._do_compile`` on
    ``workers`` threads; returns how many compiled (a failure is left to the launch)."""
    from triton.runtime.jit import JITFunction

    compile_fn = JITFunction._do_compile
    unique: dict[tuple, CompileRequest] = {}
    for r in requests:
        unique.setdefault((id(r.fn), r.device, r.key), r)

    def build(r: CompileRequest) -> bool:
        try:
            compile_fn(r.fn, r.key, r.signature, r.device, r.constexprs, r.options, r.attrs, True)
            return True
        except Exception:  # it fails again at its launch, where the tuner discards it with the reason
            return False

    if not unique:
        return 0
    with ThreadPoolExecutor(min(workers or default_workers(), len(unique))) as pool:
        return sum(pool.map(build, unique.values()))


def precompile(
    launches: list[Callable[[], object]], workers: int | None = None, log: Callable[[str], None] | None = None
) -> int:
    """Compile what ``launches`` (callables that each launch one candidate's kernels) would
    compile, on ``workers`` threads (default: one per CPU); returns the number compiled. Any
    error is swallowed: those kernels compile at their first launch instead. Under the Triton
    interpreter nothing compiles, and nothing runs."""
    from hrm.ops.common import interpreting

    if interpreting():
        return 0
    start = time.perf_counter()
    try:
        with recorded_compiles() as requests:
            for launch in launches:
                with contextlib.suppress(Exception):  # a candidate that cannot launch: check() says why
                    launch()
        done = compile_requests(requests, workers)
    except Exception as e:  # Triton internals not as expected: compile at first launch
        if log:
            log(f"precompile skipped ({type(e).__name__}: {e}); kernels compile at first launch")
        return 0
    if log and done:
        seconds, threads = time.perf_counter() - start, workers or default_workers()
        log(f"precompiled {done} kernels in {seconds:.1f} s on {threads} threads")
    return done


__all__ = ["CompileRequest", "compile_requests", "default_workers", "precompile", "recorded_compiles"]
