"""Ahead-of-time compilation of Triton kernels for a named GPU, with no GPU present.

:func:`compile_report` compiles :class:`KernelSpec` s (a kernel, its argument types and
constexprs, launch options) for each requested capability (80 -> ``sm_80``, 86, 89,
90 -> ``sm_90a``, 120: the entries of :data:`hrm.ops.arch.ARCHS`) and returns one row per
(kernel, target): registers per thread, spill stores/loads and stack frame (from ``ptxas -v``,
run on the PTX with the ptxas that Triton itself uses; its bundled ptxas accepts every target
of the table, sm_120 included, as ``sm_120a``) and shared memory (Triton's allocation). A
kernel that does not compile gets a row with ``error`` set instead of raising.

Under ``TRITON_INTERPRET=1`` (the test suite) ``@triton.jit`` yields interpreted
functions that cannot be compiled, so the work runs in a fresh interpreter process
without that variable; kernels are named there by ``module:attribute``.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from hrm.ops.common import interpreting

DEFAULT_CAPABILITIES = (80, 90)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one configuration.

    ``kernel`` is ``"module:attribute"`` of a ``@triton.jit`` function; ``signature`` maps
    every non-constexpr argument to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``);
    ``constexprs`` maps the constexpr arguments to values; ``aligned`` names the arguments
    that are 16-divisible at run time (pointers from torch allocations, strides), as the JIT
    would specialise them.
    """

    name: str
    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] = field(default_factory=tuple)


def _arch(capability: int) -> str:
    """The arch table's name for ``capability`` (``sm_90a`` for 90), else ``sm_<capability>``."""
    from hrm.ops.arch import arch_for_capability

    match = arch_for_capability(capability)
    return match.arch.name if match.exact else f"sm_{capability}"


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_info(ptx: str, capability: int) -> dict[str, int]:
    """Registers, stack frame and spills of ``ptx`` from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [
            get_ptxas(capability).path,
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(capability)}",
            src,
            "-o",
            os.path.join(tmp, "k.cubin"),
        ]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log!r}")
    return {
        "registers": int(used.group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def _compile_one(spec: KernelSpec, capability: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = pkgutil.resolve_name(spec.kernel)
    names = list(fn.arg_names)
    signature = {n: ("constexpr" if n in spec.constexprs else spec.signature[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    row: dict[str, Any] = {
        "kernel": spec.name,
        "arch": _arch(capability),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        **{k: v for k, v in spec.constexprs.items() if k.startswith("BLOCK") or k == "HEAD_DIM"},
    }
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, spec.constexprs, attrs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        row.update(_ptxas_info(compiled.asm["ptx"], capability), shared_bytes=int(compiled.metadata.shared), error=None)
    except Exception as e:  # a row per failure: the report shows every kernel
        row.update(
            registers=None,
            stack_bytes=None,
            spill_stores=None,
            spill_loads=None,
            shared_bytes=None,
            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
        )
    return row


def _compile_star(job: tuple[KernelSpec, int]) -> dict[str, Any]:
    return _compile_one(*job)


def _compile_all(specs: list[KernelSpec], capabilities: tuple[int, ...], jobs: int) -> list[dict[str, Any]]:
    work = [(s, c) for s in specs for c in capabilities]
    if jobs <= 1 or len(work) <= 1:
        return [_compile_one(*w) for w in work]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(work)), mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_star, work))


def compile_report(
    specs: list[KernelSpec], capabilities: tuple[int, ...] = DEFAULT_CAPABILITIES, jobs: int | None = None
) -> list[dict[str, Any]]:
    """One row per (spec, capability), in that order: ``kernel, arch, num_warps,
    num_stages, BLOCK_*, HEAD_DIM, registers, stack_bytes, spill_stores, spill_loads,
    shared_bytes, error``. ``jobs`` compiles run in parallel (default: one per CPU)."""
    jobs = jobs or os.cpu_count() or 1
    if not interpreting():
        return _compile_all(list(specs), tuple(capabilities), jobs)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = json.dumps({"specs": [asdict(s) for s in specs], "capabilities": list(capabilities), "jobs": jobs})
    proc = subprocess.run(
        [sys.executable, "-c", "from hrm.ops.aot import _worker; _worker()"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ahead-of-time compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker() -> None:
    """Subprocess side of :func:`compile_report`: JSON specs on stdin, JSON rows on stdout."""
    job = json.loads(sys.stdin.read())
    specs = [KernelSpec(**{**s, "aligned": tuple(s["aligned"])}) for s in job["specs"]]
    print(json.dumps(_compile_all(specs, tuple(job["capabilities"]), job["jobs"])))


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The report as a fixed-width text table."""
    cols = [
        "kernel",
        "arch",
        "HEAD_DIM",
        "BLOCK_M",
        "BLOCK_N",
        "num_warps",
        "num_stages",
        "registers",
        "spill_stores",
        "spill_loads",
        "stack_bytes",
        "shared_bytes",
        "error",
    ]
    cols = [c for c in cols if any(c in r for r in rows)]
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


__all__ = ["DEFAULT_CAPABILITIES", "KernelSpec", "compile_report", "format_rows"]
