"""The CUDA kernels of csrc/ (docs/cuda.md).

Without a GPU (CI): the host unit test of the per-element helpers, a compile of every kernel
for sm_80 and sm_90a through the CMake ``cuda_resources`` target that fails on any spill, the
report parser, a compile of the torch binding against torch's headers, and the Python side
(schemas, fakes, autograd) against CPU stand-ins of the ``hrm_cuda`` ops. With a GPU and a
built ``libhrm_cuda.so``: forward and backward parity of the kernels against the fp64 oracle
under the Triton tests' tolerance rule, and the same under ``compute-sanitizer`` when it is
installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE
from test_fused_ops import check_against_oracle, randn

from hrm import ops
from hrm.errors import BackendUnavailable
from hrm.ops import cuda_extension, dispatch
from hrm.ops.impl import magicnorm_transition as mt
from hrm.ops.impl import swiglu as sw

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TOOL = ROOT / "tools" / "cuda_resources.py"
CXX = os.environ.get("CXX", "c++")


def _nvcc() -> str | None:
    return shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


def _cutlass_include() -> Path | None:
    try:
        import cutlass_library
    except ImportError:
        return None
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return path if (path / "cute" / "tensor.hpp").is_file() else None


# -- host unit test of csrc/common/hrm_cuda_math.h --------------------------------------------
@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX!r}) on PATH")
def test_host_helpers(tmp_path):
    """fp16/bf16 conversions (every bit pattern and every rounding midpoint), 128-bit pack and
    unpack, the row plan's coverage, the RMS and SwiGLU math against double precision and
    finite differences, and the gate/up row pairing: csrc/tests/test_cuda_math.cpp."""
    exe = tmp_path / "test_cuda_math"
    src = CSRC / "tests" / "test_cuda_math.cpp"
    subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert re.search(r"^\d{6,} checks, 0 failed$", proc.stdout.strip(), re.M), proc.stdout


# -- every kernel compiled for sm_80 and sm_90a, no spills -------------------------------------
def _expected_kernels() -> set[tuple[str, str]]:
    """(kernel, arch) pairs the two default archs must produce."""
    want = set()
    for arch in ("sm_80", "sm_90a"):
        for t in ("float", "fp16_t", "bf16_t"):
            for vpt in (1, 2, 4, 8):
                want |= {(f"transition_{d}_kernel<{t}, {vpt}>", arch) for d in ("fwd", "bwd")}
    for t in ("bfloat16_t", "half_t"):
        for bwd in ("false", "true"):  # the forward and the backward (d(gate_up)) instances
            want.add((f"swiglu_linear_kernel<{t}, {bwd}>", "sm_80"))
            want.add((f"swiglu_linear_kernel<{t}, {bwd}, ..., ..., ..., ..., ...>", "sm_90a"))
    return want


def _cmake_build(build: Path, *options: str, target: str | None = None) -> None:
    """Configure CMakeLists.txt into ``build`` without libhrm_cuda (``options`` on top) and build
    ``target`` (default: all)."""
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DHRM_BUILD_CUDA=OFF"]
    subprocess.run([*configure, f"-DPython3_EXECUTABLE={sys.executable}", *options], check=True, capture_output=True)
    targets = ["--target", target] if target else []
    proc = subprocess.run(["cmake", "--build", str(build), *targets, "-j", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed: the CUDA kernels cannot be compiled here")
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(_cutlass_include() is None, reason="the nvidia-cutlass package (CuTe headers) is not installed")
def test_kernels_compile_for_sm80_and_sm90a_without_spills(tmp_path):
    """The ``cuda_resources`` target of CMakeLists.txt: every .cu for each of its archs with
    ``-Xptxas -v``, then tools/cuda_resources.py writes the report and fails on a spill."""
    report = tmp_path / "report"
    _cmake_build(tmp_path / "build", "-DHRM_BUILD_CPU=OFF", f"-DHRM_RESOURCES_DIR={report}", target="cuda_resources")
    rows = json.loads((report / "cuda_resources.json").read_text())
    assert (report / "cuda_resources.md").read_text().count("\n") == len(rows) + 2
    got = {(r["kernel"], r["arch"]) for r in rows}
    assert _expected_kernels() <= got, sorted(_expected_kernels() - got)
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r
    sm90 = [r for r in rows if r["kernel"].startswith("swiglu_linear_kernel") and r["arch"] == "sm_90a"]
    assert all(r["registers"] <= 168 for r in sm90), sm90  # 384 threads: 65536 / 384, rounded down to 8


_CMAKE_CPU_SCRIPT = """
import sys, torch
for lib in sys.argv[1:]:
    torch.ops.load_library(lib)
ops = {"hrm_cpu": "prefixlm_fwd", "hrm_decode": "decode_attention", "hrm_ce": "ce_chunk_t", "hrm_ew": "swiglu_fwd",
       "hrm_opt": "adam_atan2_step"}
for ns, op in ops.items():
    assert hasattr(getattr(torch.ops, ns), op), (ns, op)
gu = torch.randn(5, 2 * 24)
g, u = gu.chunk(2, -1)
torch.testing.assert_close(torch.ops.hrm_ew.swiglu_fwd(gu), torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-6)
print("cmake cpu libraries ok")
"""


def test_the_cpu_library_and_cmake_take_every_cpu_source():
    """The ``cpu`` backend's one library (:data:`hrm.ops.cpp_extension.SOURCES`) and the CMake
    targets name every ``csrc/*/*_cpu.cpp``: a new kernel file cannot be left out of either."""
    from hrm.ops.cpp_extension import CSRC, SOURCES

    on_disk = sorted(p.relative_to(CSRC).as_posix() for p in CSRC.glob("*/*_cpu.cpp"))
    assert sorted(SOURCES) == on_disk
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert [s for s in on_disk if s not in cmake] == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX!r}) on PATH")
def test_cmake_builds_the_cpu_kernel_libraries(tmp_path):
    """CMakeLists.txt's CPU targets (HRM_BUILD_CPU): every C++ kernel of the ``cpu`` backend as a
    library that ``torch.ops.load_library`` loads, with its ops registered (a fresh process: the
    test process may have registered the same namespaces from the cpp_extension builds)."""
    lib = tmp_path / "lib"
    _cmake_build(tmp_path / "build", "-DHRM_CUDA_RESOURCES=OFF", f"-DHRM_LIB_DIR={lib}")
    libs = sorted(str(p) for p in lib.glob("libhrm_*_cpu.so"))
    assert [Path(p).name for p in libs] == [
        f"libhrm_{n}_cpu.so" for n in ("cross_entropy", "decode", "elementwise", "optim", "prefixlm")
    ]
    proc = subprocess.run([sys.executable, "-c", _CMAKE_CPU_SCRIPT, *libs], capture_output=True, text=True)
    assert proc.returncode == 0 and "cmake cpu libraries ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]


_SPILLING_LOG = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5cleanv' for 'sm_90a'
ptxas info    : Function properties for _Z5cleanv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, 360 bytes cmem[0]
"""


def test_resource_report_parses_ptxas_and_fails_on_spills(tmp_path):
    log = tmp_path / "demo.sm_80.log"
    log.write_text(_SPILLING_LOG)
    proc = subprocess.run(
        [sys.executable, str(TOOL), "report", "--fail-on-spill", "--out", str(tmp_path / "r"), str(log)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "SPILL sm_80 kernel" in proc.stdout, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "r" / "cuda_resources.json").read_text())
    spill, clean = sorted(rows, key=lambda r: r["arch"])
    assert (spill["kernel"], spill["registers"], spill["spill_stores"], spill["spill_loads"]) == ("kernel", 255, 8, 12)
    assert (spill["smem_bytes"], spill["stack_bytes"], spill["barriers"]) == (4096, 16, 1)
    assert (clean["kernel"], clean["arch"], clean["registers"], clean["smem_bytes"]) == ("clean", "sm_90a", 12, 0)
    ok = subprocess.run([sys.executable, str(TOOL), "report", "--out", str(tmp_path / "r"), str(log)])
    assert ok.returncode == 0  # without --fail-on-spill the report is written and the run passes


# -- the torch binding compiles against torch's headers ----------------------------------------
def _cuda_include() -> Path | None:
    """The CUDA toolkit's include directory: $CUDA_HOME's, nvcc's, or /usr/local/cuda's."""
    nvcc = _nvcc()
    roots = [os.environ.get("CUDA_HOME"), nvcc and Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX!r}) on PATH")
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers (cuda_runtime.h) next to nvcc")
def test_torch_binding_compiles(tmp_path):
    """csrc/hrm_cuda/ops.cpp (schemas, checks, launches) compiles with every kernel enabled. The
    CPU torch wheel lacks one generated CUDA header, c10/cuda/impl/cuda_cmake_macros.h; an
    empty stand-in takes its place (it only defines build macros of torch's own libraries)."""
    from torch.utils import cpp_extension

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    real = [Path(p) / "c10/cuda/impl/cuda_cmake_macros.h" for p in cpp_extension.include_paths()]
    (shim / "cuda_cmake_macros.h").write_text(real[0].read_text() if real[0].is_file() else "#pragma once\n")
    incs = [f"-I{p}" for p in (*cpp_extension.include_paths(), _cuda_include(), tmp_path)]
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-DHRM_SWIGLU_SM80", "-DHRM_SWIGLU_SM90", *incs]
    proc = subprocess.run([*cmd, str(CSRC / "hrm_cuda" / "ops.cpp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# -- the Python side against CPU stand-ins of the hrm_cuda ops ---------------------------------
def _schemas() -> dict[str, str]:
    """The ``m.def`` schemas of csrc/hrm_cuda/ops.cpp (adjacent string literals joined)."""
    text = (CSRC / "hrm_cuda" / "ops.cpp").read_text()
    out = {}
    for m in re.finditer(r'm\.def\(((?:\s*"[^"]*")+)', text):
        schema = "".join(re.findall(r'"([^"]*)"', m.group(1)))
        out[schema.split("(")[0]] = schema
    return out


def _standin_fwd(x, delta, other, eps):
    z, u, n, rstd_h, rstd_u = (t.contiguous() for t in mt._transition_forward_math(x, delta, other, eps))
    if x.dtype != torch.float64:  # the kernel's contract: fp32 statistics (fp64 inputs: exact tests)
        rstd_h, rstd_u = rstd_h.float(), rstd_u.float()
    return z, u, n, rstd_h, rstd_u


def _standin_bwd(dz, du, dn, z, n, rstd_h, rstd_u):
    dz, du, dn = (g if g is not None else torch.zeros_like(z) for g in (dz, du, dn))
    dh, _, dother = mt._transition_backward_math(dz, du, dn, z, n, rstd_h, rstd_u)
    return dh, dother


def _standin_swiglu_bwd(x, w, dy):
    """d(gate_up), refusing what ops.cpp refuses: a dy that is not contiguous and 16-byte aligned."""
    if not (dy.is_contiguous() and cuda_extension.storage_aligned(dy)):
        raise RuntimeError("hrm_cuda: dy must be a contiguous CUDA tensor, 16-byte aligned")
    return sw._swiglu_backward_math(torch.nn.functional.linear(x, w), dy).contiguous()


@pytest.fixture(scope="module")
def standins():
    """``hrm_cuda`` ops defined from ops.cpp's schemas with CPU implementations that compute the
    references, and the Python side (fakes, autograd) registered on them."""
    if cuda_extension.library_path() is not None and torch.version.cuda is not None:
        pytest.skip("the real libhrm_cuda.so is here: the GPU tests cover its Python side")
    schemas = _schemas()
    assert set(schemas) == {
        "magicnorm_transition",
        "magicnorm_transition_backward",
        "swiglu_linear",
        "swiglu_linear_backward",
        "kernels",
    }
    lib = torch.library.Library("hrm_cuda", "DEF")
    impls = {
        "magicnorm_transition": _standin_fwd,
        "magicnorm_transition_backward": _standin_bwd,
        "swiglu_linear": lambda x, w: sw.swiglu_linear_reference(x, w).contiguous(),
        "swiglu_linear_backward": _standin_swiglu_bwd,
    }
    for name, schema in schemas.items():
        lib.define(schema)
        if name in impls:
            lib.impl(name, impls[name], "CPU")
        else:
            lib.impl(name, lambda: "cpu stand-in", "CompositeExplicitAutograd")
    cuda_extension.register_python_side()
    yield lib


def test_python_side_opcheck(standins):
    """Schemas, fake implementations and autograd registrations agree (``torch.library.opcheck``)."""
    x, d, o = (torch.randn(3, 5, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.hrm_cuda.magicnorm_transition.default, (x, d, o, 1e-6))
    z, n = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    r = torch.rand(2, 3, dtype=torch.float32) + 0.5
    bwd_args = (None, torch.randn_like(z), torch.randn_like(z), z, n, r, r)
    torch.library.opcheck(torch.ops.hrm_cuda.magicnorm_transition_backward.default, bwd_args)
    x2, w = torch.randn(2, 7, 24, requires_grad=True), torch.randn(2 * 40, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.hrm_cuda.swiglu_linear.default, (x2, w))
    bwd_args = (x2.detach(), w.detach(), torch.randn(2, 7, 40))  # a backward: no autograd of its own
    torch.library.opcheck(torch.ops.hrm_cuda.swiglu_linear_backward.default, bwd_args)
    assert cuda_extension.kernels() == "cpu stand-in"


def _grads(outs, leaves, upstream):
    """Gradients of ``outs`` weighted by ``upstream`` (None: no gradient) w.r.t. ``leaves``; a leaf
    that does not reach a weighted output gets zeros."""
    pairs = [(o, u) for o, u in zip(outs, upstream) if u is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True)
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


@pytest.mark.parametrize("present", [(1, 1, 1), (0, 1, 1), (1, 0, 0), (0, 0, 1)], ids=lambda p: "dz_du_dn=" + str(p))
def test_python_side_transition_autograd(standins, present):
    """The autograd glue of ``hrm_cuda::magicnorm_transition``: the same gradients as the
    reference for x, delta (both dh) and other, whichever outputs receive a gradient."""
    leaves = [torch.randn(4, 9, 24, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    upstream = [torch.randn(4, 9, 24, dtype=torch.float64) if p else None for p in present]
    got = _grads(torch.ops.hrm_cuda.magicnorm_transition(*leaves, 1e-6)[:3], leaves, upstream)
    want = _grads(ops.magicnorm_transition(*leaves, 1e-6, backend="torch"), leaves, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dy_layout", ["contiguous", "unaligned", "strided"])
def test_python_side_swiglu_linear_autograd(standins, dy_layout):
    """The backward of ``hrm_cuda::swiglu_linear`` (d(gate_up) from the backward op, then the two
    torch GEMMs) against autograd through the reference, for a 3-d input; an upstream gradient
    the kernel cannot read (a view 8 bytes into its storage, a transposed one) is copied first."""
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * 40, 24, dtype=torch.float64, requires_grad=True)
    dy = {
        "contiguous": lambda: torch.randn(2, 7, 40, dtype=torch.float64),
        "unaligned": lambda: torch.randn(2 * 7 * 40 + 1, dtype=torch.float64)[1:].view(2, 7, 40),
        "strided": lambda: torch.randn(40, 7, 2, dtype=torch.float64).permute(2, 1, 0),
    }[dy_layout]()
    got = _grads([torch.ops.hrm_cuda.swiglu_linear(x, w)], [x, w], [dy])
    want = _grads([sw.swiglu_linear_reference(x, w)], [x, w], [dy])
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


# -- availability --------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_backend_says_why_it_is_unavailable():
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run here: no CUDA device is visible"):
        dispatch.resolve_backend("cuda")
    assert "cuda" not in dispatch.available_backends()


def test_unbuilt_library_reason_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda_extension.unavailable() == "this torch build has no CUDA (torch.version.cuda is None)"
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cuda_extension, "LIB_DIR", tmp_path)
    monkeypatch.delenv(cuda_extension.LIBRARY_ENV, raising=False)
    cuda_extension._load.cache_clear()
    try:
        reason = cuda_extension.unavailable()
        assert reason is not None and cuda_extension.BUILD_COMMAND in reason and "not built" in reason
        monkeypatch.setenv(cuda_extension.LIBRARY_ENV, str(tmp_path / "missing.so"))
        cuda_extension._load.cache_clear()
        assert cuda_extension.unavailable().startswith(f"loading {tmp_path / 'missing.so'} failed")
    finally:
        cuda_extension._load.cache_clear()


def test_cuda_impls_decline_what_the_kernels_do_not_take():
    """Inputs outside the kernels' contract go to the fallback, never to a launch."""
    x = torch.randn(4, 64)
    assert not mt.cuda_takes(x, x, x)  # on the CPU
    if torch.cuda.is_available():
        g = x.cuda()
        assert mt.cuda_takes(g, g, g)
        assert not mt.cuda_takes(g.double(), g.double(), g.double())
        assert not mt.cuda_takes(g, g.half(), g)  # mixed dtypes (autocast)
        odd = torch.randn(4, 62, device="cuda")  # 248-byte rows: not whole 16-byte vectors
        assert not mt.cuda_takes(odd, odd, odd)
        shifted = torch.randn(4 * 64 + 1, device="cuda")[1:].view(4, 64)  # 4 bytes past an aligned start
        assert not mt.cuda_takes(shifted, shifted, shifted)
        assert not mt.cuda_takes(g.t(), g.t(), g.t())  # not contiguous
        h = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
        assert sw.cuda_swiglu_linear_takes(h, h)
        assert not sw.cuda_swiglu_linear_takes(h, h[:12])  # I = 6: not a multiple of 8
        assert not sw.cuda_swiglu_linear_takes(h.float(), h.float())


# -- on a GPU with the built library ---------------------------------------------------------
def _gpu_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the CUDA kernels run only on a GPU (CI compiles them, see above)"
    return cuda_extension.unavailable()


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"cuda backend unavailable: {GPU_REASON}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Widths are whole 128-bit vectors (the kernels' contract) yet odd otherwise; row counts are
# not multiples of anything; 8200 bf16 columns need 8 vectors a thread.
TRANSITION_SHAPES = [(37, 1024), (2, 65, 520), (3, 8200), (1, 8)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRANSITION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_magicnorm_transition_parity(dtype, shape):
    x = torch.zeros(shape, device=DEVICE, dtype=dtype)
    assert mt.cuda_takes(x, x, x)  # the kernel runs, not the fallback
    check_against_oracle(
        lambda x, d, o, backend: ops.magicnorm_transition(x, d, o, 1e-6, backend=backend),
        [randn(*shape, scale=2), randn(*shape), randn(*shape)],
        "cuda",
        dtype,
    )


# (M, K, I): M and I not multiples of the tiles, K not a multiple of BK (32 / 64), a decode-size M.
SWIGLU_SHAPES = [(123, 256, 344), (1000, 1024, 2816), (3, 520, 136), (2, 77, 512, 1000)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_swiglu_linear_parity(dtype, shape):
    *lead, k, inter = shape
    x, w = randn(*lead, k), randn(2 * inter, k, scale=k**-0.5)
    assert sw.cuda_swiglu_linear_takes(x.to(DEVICE, dtype), w.to(DEVICE, dtype))
    check_against_oracle(lambda x, w, backend: ops.swiglu_linear(x, w, backend=backend), [x, w], "cuda", dtype)


@needs_gpu
def test_gpu_swiglu_linear_takes_no_rows():
    """No rows: an empty output, forward and backward (the backward kernel's dy has no storage)."""
    x = torch.zeros(0, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2 * 48, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = ops.swiglu_linear(x, w, backend="cuda")
    assert y.shape == (0, 48)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not installed")
@needs_gpu
def test_gpu_kernels_under_compute_sanitizer():
    """The parity tests again under compute-sanitizer (memcheck): no out-of-bounds access at the
    tile edges, no misaligned vector access."""
    cmd = [
        "compute-sanitizer", "--error-exitcode", "1", sys.executable, "-m", "pytest", "-q", "-x",
        f"{__file__}::test_gpu_magicnorm_transition_parity", f"{__file__}::test_gpu_swiglu_linear_parity",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# -- packaging: the cpu backend from a wheel in a fresh venv -----------------------------------
_WHEEL_SCRIPT = """
import torch
from hrm import ops
from hrm.ops import cpp_extension, dispatch
assert "site-packages" in cpp_extension.__file__, cpp_extension.__file__
assert dispatch.unavailable_reason("cpu") is None, dispatch.unavailable_reason("cpu")
torch.manual_seed(0)
packing = ops.AttentionPacking.build([0, 5, 14, 17], [2, 9, 1], 20)  # 3 sequences, 3 padding rows
q, k, v, gate = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(4))
out = ops.prefixlm_attention(q, k, v, packing, gate=gate, backend="cpu")
ref = ops.prefixlm_attention(q, k, v, packing, gate=gate, backend="torch")
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
got = torch.autograd.grad(out.sum(), (q, k, v, gate))
want = torch.autograd.grad(ref.sum(), (q, k, v, gate))
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
q, k, v, gate = (torch.randn(3, 2, 16) for _ in range(4))  # generation's decode attention
pos = torch.tensor([0, 4, 7])
outs = [ops.decode_attention(q, k, v, gate, *torch.zeros(2, 3, 2, 8, 16), pos, backend=b) for b in ("cpu", "torch")]
torch.testing.assert_close(*outs, rtol=1e-4, atol=1e-5)
z, w, labels = torch.randn(9, 16), torch.randn(40, 16), torch.tensor([-100, 3, 7, -100, 0, 39, 5, 5, -100])
outs = [ops.linear_cross_entropy(z, w, labels, chunk_rows=4, backend=b) for b in ("cpu", "torch")]
torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)  # the loss's C++ chunk
assert torch.equal(outs[0][1], outs[1][1])
gu = torch.randn(7, 2 * 24)  # the SwiGLU and split-RoPE kernels
torch.testing.assert_close(ops.swiglu(gu, backend="cpu"), ops.swiglu(gu, backend="torch"), rtol=1e-5, atol=1e-5)
gqkv, (cos, sin) = torch.randn(7, 8, 16), ops.rope_cos_sin(torch.arange(7), 16, 10000.0)
for a, b in zip(*(ops.split_rope(gqkv, cos, sin, backend=b) for b in ("cpu", "torch"))):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
steps = {b: [torch.ones(5), torch.full((5,), 0.5), torch.zeros(5), torch.zeros(5)] for b in ("cpu", "torch")}
for b, (p, g, m, v) in steps.items():  # the optimizer's step
    ops.adam_atan2_([p], [g], [m], [v], [1], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, backend=b)
torch.testing.assert_close(steps["cpu"], steps["torch"], rtol=1e-6, atol=1e-7)
print("cpu backend ok from", cpp_extension.CSRC)
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX!r}) on PATH")
def test_wheel_carries_the_cpu_kernels(tmp_path):
    """``pip wheel .``, a fresh venv with torch and that wheel, and the ``cpu`` backend's attention,
    decode attention, cross-entropy chunk, SwiGLU, split-RoPE and Adam-atan2 step built at first
    use from the sources the wheel installed (with the header they share), against the torch
    reference."""
    # Build from a copy of the files git does not ignore: a build in the checkout leaves build/ and an
    # egg-info there, which a PYTHONPATH pointing at the checkout would show to pip as hrm.
    src = tmp_path / "src"
    ls = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(ls, cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HRM_CACHE_DIR"] = str(tmp_path / "cache")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)]
    subprocess.run(build, check=True, env=env, cwd=tmp_path)
    (wheel,) = wheels.glob("hrm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    vpy = venv / "bin" / "python"
    vpip = [str(vpy), "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    subprocess.run([*vpip, f"torch=={torch.__version__.split('+')[0]}", "numpy", "ninja"], check=True, env=env)
    subprocess.run([*vpip, "--no-deps", str(wheel)], check=True, env=env)
    proc = subprocess.run([str(vpy), "-c", _WHEEL_SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"cpu backend ok from {venv}/share/hrm/csrc" in proc.stdout, proc.stdout
