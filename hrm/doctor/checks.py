"""The checks behind ``hrm doctor``, one function per section; each returns JSON-able rows.

Every row has a ``check`` (what was checked), a ``status`` (``PASS``, ``FAIL``, ``SKIP`` or
``INFO``) and a ``note`` (why it failed or was skipped, or what else was measured).

- :func:`device_section`: the device and the software around it, and every backend of
  :data:`hrm.ops.dispatch.BACKENDS` with whether it can run here and why not.
- :func:`parity_section`: every op that one backend implements, in every dtype it runs in
  on this device, against the fp64 oracle (:func:`hrm.bench.suites.op_parity`: the max error
  of the outputs and of the gradients of ``sum(outputs)``, relative to the oracle's largest
  magnitude). In fp32 the error must stay under the op's tolerance (``1e-5``, attention
  ``1e-4``); in fp16 / bf16 under ``2 * e_ref + floor``, with ``e_ref`` the error of the
  ``torch`` reference run in the same dtype and floors of ``2e-3`` / ``1.6e-2`` (the rule
  of ``tests/test_fused_ops.py``). Besides the benchmark shapes: a PrefixLM packing with
  one-token sequences, sequences that are all prefix and trailing padding.
- :func:`long_attention_section` (CUDA): attention on a ``[300000, 4*64, 128]`` fused bf16
  buffer, whose element offsets pass ``2**31``; the last sequence against SDPA.
- :func:`host_reads_section`: one train step of a small model on the fastest backend after a
  warm-up step, counting its host reads (:func:`~hrm.doctor.host_reads.count_host_reads`);
  on CUDA also under ``torch.cuda.set_sync_debug_mode("error")``.
- :func:`cuda_graph_section` (CUDA): forward + backward of that step captured in one CUDA
  graph and replayed; the replayed loss must equal the eager one.
- :func:`cuda_kernels_section` (CUDA): the ``cuda`` backend's kernels (csrc/) timed against
  the Triton versions at preset B's width on 16K tokens, with their parity.
- :func:`attention_timing_section`: PrefixLM attention on every backend next to SDPA,
  FlexAttention and FlashAttention's varlen kernel at the same useful work (causal packed
  sequences): ``4 * pairs * head_dim * heads`` FLOPs forward, 3.5x that forward + backward.

``python -m hrm.doctor.checks SPEC_JSON`` runs one section in a fresh process (what
:mod:`hrm.doctor.run` does) and writes its rows to ``SPEC["result"]``.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hrm import HRMText, ops
from hrm.bench import suites
from hrm.bench.device import device_info
from hrm.bench.run import quick_ops_config
from hrm.bench.timing import measure
from hrm.bench.workloads import train_batch
from hrm.config import BENCH_CONFIGS, BenchConfig, ModelConfig, get_preset
from hrm.doctor import count_host_reads
from hrm.ops import allowed_pairs, common, dispatch

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
NEEDS_CUDA = "needs a CUDA device"

# Low precision: a backend's error may be REF_FACTOR x the torch reference's own error in
# that dtype plus a floor (the bench's rule, hrm.bench.suites.op_tolerance); fp32 uses each
# op's fixed tolerance.
REF_FACTOR, FLOOR = suites.REF_FACTOR, suites.LOW_PRECISION_FLOOR
GRAPH_LOSS_TOLERANCE = 1e-3  # relative: the replayed graph runs the same kernels on the same inputs
PROGRESS = "doctor: "  # stderr lines with this prefix are progress, shown by the parent

# Op shapes: --quick (and always under the Triton interpreter) a small model on 256 tokens;
# otherwise the benchmark config (4096 tokens on a GPU, 1024 on a CPU).
QUICK_OPS = BenchConfig(
    ModelConfig(vocab_size=500, hidden_size=64, num_heads=2, n_layers=2, max_seq_len=512), tokens=256, median_seq_len=32
)
# The train step: the tiny preset on a CPU or with --quick, the benchmark config on a GPU.
QUICK_TRAIN = BenchConfig(get_preset("tiny"), tokens=512, median_seq_len=64)
CPU_TRAIN = BenchConfig(get_preset("tiny"), tokens=2048, median_seq_len=128)
# The CUDA kernels' timing: preset B's width on 16K tokens. The bench config (256 wide) fits in
# a GPU's L2 and times launches, not bandwidth or tensor cores (docs/gpu-runs.md).
CUDA_KERNELS = BenchConfig(get_preset("B"), tokens=16384)
# The long attention case: T * 4 * H * D = 9.8e9 elements of the fused buffer > 2**31.
LONG_T, LONG_H, LONG_D, LONG_SEQ = 300_000, 64, 128, 4096


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


# The backends whose kernels take each device type's tensors (the ``cpu`` kernels take CPU
# tensors only, the ``cuda`` and ``triton`` ones CUDA tensors, except Triton's interpreter).
DEVICE_BACKENDS = {"cuda": ("cuda", "triton", "compile", "torch"), "cpu": ("cpu", "compile", "torch")}


def device_backends(device: torch.device, op: str | None = None, selected: list[str] | None = None) -> list[str]:
    """Backends that run here for real on ``device``'s tensors, most preferred first (those
    that implement ``op``, if given; of ``selected``, if given). The Triton interpreter is
    not among them: only the parity section uses it."""
    return [
        b
        for b in suites.bench_backends(op)
        if b in DEVICE_BACKENDS[device.type] and (selected is None or b in selected)
    ]


def _implements(op: str, backend: str) -> bool:
    """Whether ``backend`` has its own implementation of ``op`` (not a fallback)."""
    return op in dispatch.registered_ops() and backend in dispatch.implementations(op)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# -- device, versions, backends --------------------------------------------------------------
def device_section(device: torch.device) -> dict:
    """``{"info": ..., "backends": [...]}``: :func:`hrm.bench.device.device_info` plus memory,
    and per backend whether it runs here, why not, and how the parity section checks it
    (``native``; ``interpreter``: Triton's CPU interpreter where no CUDA device is visible;
    ``None``: not at all)."""
    info = device_info(device)
    if device.type == "cuda":
        info["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text().splitlines()
            info["memory_gib"] = round(
                int(next(ln for ln in meminfo if ln.startswith("MemTotal:")).split()[1]) / 2**20, 1
            )
        except (OSError, StopIteration):
            info["memory_gib"] = None
    backends = []
    for name in dispatch.BACKENDS:
        reason = dispatch.unavailable_reason(name)
        if reason is None and name in DEVICE_BACKENDS[device.type]:
            checked = "native"
        elif name == "triton" and device.type == "cpu" and common.triton is not None:
            checked = "interpreter"
        else:
            checked = None
        backends.append({"backend": name, "available": reason is None, "reason": reason, "checked": checked})
    return {"info": info, "backends": backends}


# -- op parity vs the fp64 oracle ------------------------------------------------------------
def parity_dtypes(backend: str, device: torch.device) -> list[torch.dtype]:
    """fp32 everywhere; on CUDA also bf16 and fp16; on a CPU bf16 for the fused CPU backends
    and fp16 for Triton's interpreter (which mishandles bf16)."""
    if device.type == "cuda":
        return [torch.float32, torch.bfloat16, torch.float16]
    return {
        "compile": [torch.float32, torch.bfloat16],
        "cpu": [torch.float32, torch.bfloat16],
        "triton": [torch.float32, torch.float16],
    }.get(backend, [torch.float32])


def attention_case(
    lengths: list[int], prefixes: list[int], pad: int, heads: int, head_dim: int, device: torch.device, what: str
) -> suites.OpCase:
    """PrefixLM attention (with a gate) on one packed row of the given sequences and
    ``pad`` trailing padding tokens."""
    T = sum(lengths) + pad
    packing = ops.AttentionPacking.build([0, *itertools.accumulate(lengths)], prefixes, T, device)
    g = torch.Generator().manual_seed(1)

    def inputs() -> list[torch.Tensor]:
        return [
            torch.randn(T, heads, head_dim, generator=g, dtype=torch.float64).to(device).requires_grad_()
            for _ in range(4)
        ]

    return suites.OpCase(
        "prefixlm_attention",
        f"{T}x{heads}x{head_dim} ({what})",
        inputs,
        lambda q, k, v, gate, backend: ops.prefixlm_attention(q, k, v, packing, gate=gate, backend=backend),
        tolerance=suites.ATTENTION_TOLERANCE,
    )


def parity_cases(bench: BenchConfig, device: torch.device, quick: bool) -> list[suites.OpCase]:
    """:func:`hrm.bench.suites.op_cases` at ``bench`` (``decode_attention`` and ``swiglu_linear``
    among them), the two reference-only ops (``cross_entropy``, ``rope``), and attention on
    degenerate packings; without ``quick`` also attention at head dim 128 (the reference
    presets') on a 2048-token row."""
    cfg = bench.model
    batch = train_batch(bench).to(device)
    cos, sin = ops.rope_cos_sin(batch.position_ids, cfg.head_dim, cfg.rope_theta)
    T, V, H, hd = bench.tokens, cfg.padded_vocab_size, cfg.num_heads, cfg.head_dim
    g = torch.Generator().manual_seed(2)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    cases = suites.op_cases(bench, device) + [
        suites.OpCase(
            "cross_entropy",
            f"{T}x{V}",
            lambda: [rand(T, V)],
            lambda logits, backend: ops.cross_entropy(logits, batch.labels, backend=backend),
        ),
        suites.OpCase(
            "rope", f"{T}x{H}x{hd}", lambda: [rand(T, H, hd)], lambda x, backend: ops.rope(x, cos, sin, backend=backend)
        ),
        # one-token sequences, sequences that are all prefix, a long causal part, trailing padding
        attention_case(
            [1, 6, 1, 9, 3, 24], [1, 6, 1, 4, 3, 10], 5, H, hd, device, "1-token seqs, prefix = length, padding"
        ),
    ]
    if not quick:
        cases.append(attention_case([700, 1, 300, 1024], [350, 1, 300, 1], 23, 4, 128, device, "head dim 128, padding"))
    return cases


def parity_section(backend: str, device: torch.device, quick: bool) -> list[dict]:
    """One row per (op that ``backend`` implements, shape, dtype) and one for Adam-atan2
    (fp32: it updates fp32 master weights). Triton on a CPU (the interpreter: set
    ``TRITON_INTERPRET=1`` before hrm is imported) always runs the quick shapes."""
    interpreter = backend == "triton" and device.type != "cuda"
    bench = (
        QUICK_OPS
        if quick or interpreter
        else (BENCH_CONFIGS["bench"] if device.type == "cuda" else quick_ops_config(BENCH_CONFIGS["bench"]))
    )
    rows = []
    for case in parity_cases(bench, device, quick or interpreter):
        if not _implements(case.name, backend):
            continue
        inputs = case.inputs()
        for dtype in parity_dtypes(backend, device):
            row = {
                "check": f"{case.name} on {backend} in {str(dtype)[6:]}",
                "op": case.name,
                "shape": case.shape,
                "backend": backend,
                "dtype": str(dtype)[6:],
                "error": None,
                "tolerance": None,
                "note": "",
            }
            try:
                row["error"] = suites.op_parity(case, inputs, backend, dtype)
                if dtype == torch.float32:
                    row["tolerance"] = case.tolerance
                else:
                    ref = row["error"] if backend == "torch" else suites.op_parity(case, inputs, "torch", dtype)
                    row["tolerance"] = REF_FACTOR * ref + FLOOR[dtype]
                    row["note"] = f"torch reference in {row['dtype']}: {ref:.2g}"
                row["status"] = PASS if row["error"] <= row["tolerance"] else FAIL
            except Exception as e:  # noqa: BLE001 - a crashing op is a failed check, not a crashed doctor
                row.update(status=FAIL, note=_first_line(e))
            progress(f"parity {row['check']} [{case.shape}]: {row['status']}")
            rows.append(row)
    if _implements("adam_atan2", backend):
        row = {
            "check": f"adam_atan2 on {backend} in float32",
            "op": "adam_atan2",
            "backend": backend,
            "dtype": "float32",
            "tolerance": suites.OP_TOLERANCE,
            "error": None,
            "note": "3 steps",
        }
        try:
            _, row["error"], tensors, values = suites.adam_atan2_run(bench, backend, device)
            row.update(
                shape=f"{tensors} tensors, {values} values", status=PASS if row["error"] <= row["tolerance"] else FAIL
            )
        except Exception as e:  # noqa: BLE001
            row.update(shape="", status=FAIL, note=_first_line(e))
        progress(f"parity {row['check']}: {row['status']}")
        rows.append(row)
    return rows


# -- attention past 32-bit offsets (CUDA) ----------------------------------------------------
def _prefixlm_mask(length: int, prefix: int, device: torch.device) -> torch.Tensor:
    """``[L, L]`` boolean: query ``i`` may see key ``j`` iff ``j < prefix`` or ``j <= i``."""
    pos = torch.arange(length, device=device)
    return (pos[None, :] < prefix) | (pos[None, :] <= pos[:, None])


def long_attention_section(device: torch.device, backends: list[str] | None = None) -> list[dict]:
    """Forward attention with ``gate, q, k, v`` strided views of one fused ``[T, 4*H, D]``
    bf16 buffer (``T=300000, H=64, D=128``: element offsets up to ``9.8e9``) packed as
    sequences of 4096 (half prefix) and a last one of 992; its last sequence, whose every
    offset is past ``2**31``, against SDPA (error relative to an fp32 SDPA, within
    ``2 x`` a bf16 SDPA's + the bf16 floor). Runs only where the buffers fit in free memory."""
    name = f"attention at T={LONG_T}, H={LONG_H}, D={LONG_D} (offsets > 2**31)"
    if device.type != "cuda":
        return [{"check": name, "status": SKIP, "note": NEEDS_CUDA}]
    fused = [b for b in device_backends(device, "prefixlm_attention", backends) if b != "torch"]
    if not fused:
        return [{"check": name, "status": SKIP, "note": "no fused GPU attention backend selected or available"}]
    elem = 2  # bf16
    need = LONG_T * LONG_H * LONG_D * elem * 5 + LONG_H * LONG_T * 4 * 2  # fused buffer + out; lse
    free, _ = torch.cuda.mem_get_info(device)
    if free < 1.2 * need:
        return [
            {
                "check": name,
                "status": SKIP,
                "note": f"needs {1.2 * need / 2**30:.0f} GiB free device memory, {free / 2**30:.0f} GiB are",
            }
        ]
    lengths = [LONG_SEQ] * (LONG_T // LONG_SEQ) + [LONG_T % LONG_SEQ]
    prefixes = [max(1, n // 2) for n in lengths]
    packing = ops.AttentionPacking.build([0, *itertools.accumulate(lengths)], prefixes, LONG_T, device)
    buf = torch.empty(LONG_T, 4 * LONG_H, LONG_D, dtype=torch.bfloat16, device=device).normal_()
    gate, q, k, v = buf.split(LONG_H, dim=1)  # [T, H, D] each, token stride 4*H*D
    s, n, p = LONG_T - lengths[-1], lengths[-1], prefixes[-1]
    mask = _prefixlm_mask(n, p, device)

    def last_sequence(dtype: torch.dtype) -> torch.Tensor:
        qs, ks, vs = (x[s:].to(dtype).transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1)
        return (torch.sigmoid(gate[s:].to(dtype)) * out).float()

    ref = last_sequence(torch.float32)
    scale = ref.abs().max().item()
    bound = REF_FACTOR * (last_sequence(torch.bfloat16) - ref).abs().max().item() / scale + FLOOR[torch.bfloat16]
    rows = []
    for backend in fused:
        row = {
            "check": f"{name} on {backend}",
            "backend": backend,
            "shape": f"{LONG_T}x{LONG_H}x{LONG_D} bf16",
            "tolerance": bound,
            "error": None,
            "note": f"last sequence ({n} tokens from row {s}) vs SDPA",
        }
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                prepared = ops.prepare_packing(packing, LONG_D, torch.bfloat16, backend)
                out = ops.prefixlm_attention(q, k, v, prepared, gate=gate, backend=backend)
                torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
            row["error"] = (out[s:].float() - ref).abs().max().item() / scale
            row["status"] = PASS if row["error"] <= bound else FAIL
            row["note"] += f"; first call {seconds:.2f} s"
            del out
        except Exception as e:  # noqa: BLE001
            row.update(status=FAIL, note=_first_line(e))
        progress(f"{row['check']}: {row['status']}")
        rows.append(row)
    return rows


# -- train step: host reads, syncs, CUDA graph -----------------------------------------------
def fastest_backend(device: torch.device, backends: list[str] | None = None) -> str | None:
    """The most preferred backend that runs here for real on ``device`` (of ``backends``, if given)."""
    names = device_backends(device, selected=backends)
    return names[0] if names else None


def train_config(device: torch.device, quick: bool) -> BenchConfig:
    return QUICK_TRAIN if quick else (BENCH_CONFIGS["bench"] if device.type == "cuda" else CPU_TRAIN)


def host_reads_section(device: torch.device, quick: bool, backends: list[str] | None = None) -> list[dict]:
    """One train step (:func:`hrm.bench.suites.make_train_step`: forward at the precision ``auto`` picks +
    loss, backward, Adam-atan2) on the fastest backend after one warm-up step: its host
    reads must be 0 (each is a device sync on a GPU and breaks CUDA-graph capture); on CUDA
    one more step under ``torch.cuda.set_sync_debug_mode("error")`` must not raise."""
    backend = fastest_backend(device, backends)
    sync_check = "CUDA syncs in one train step (set_sync_debug_mode('error'))"
    if backend is None:
        return [{"check": "host reads in one train step", "status": SKIP, "note": "no selected backend available"}]
    bench = train_config(device, quick)
    batch = train_batch(bench).to(device)
    torch.manual_seed(0)
    model = HRMText(bench.model, backend=backend).to(device)
    step, _ = suites.make_train_step(model, batch, bench.bp_steps)
    step()  # warm-up: compiles, allocates the optimizer state
    shape = f"{bench.model.hidden_size}d x {bench.model.n_layers} layers, T={bench.tokens}, bp={bench.bp_steps}"
    with count_host_reads() as reads:
        loss = step()
    loss_value = float(loss)
    sites = ", ".join(f"{Path(site).name} ({n})" for site, n in reads.sites.most_common(3))
    rows = [
        {
            "check": f"train step on {backend}: loss is finite",
            "backend": backend,
            "shape": shape,
            "value": f"{loss_value:.4f}",
            "status": PASS if math.isfinite(loss_value) else FAIL,
            "note": "",
        },
        {
            "check": f"host reads in one train step on {backend}",
            "backend": backend,
            "shape": shape,
            "value": reads.total,
            "local_scalar_dense": reads.local_scalar_dense,
            "tolist": reads.tolist,
            "sites": dict(reads.sites),
            "status": PASS if reads.total == 0 else FAIL,
            "note": (
                f"{reads.local_scalar_dense} item/bool/int, {reads.tolist} tolist; from {sites}" if reads.total else ""
            ),
        },
    ]
    if device.type != "cuda":
        rows.append({"check": sync_check, "status": SKIP, "note": NEEDS_CUDA})
    else:
        row = {"check": sync_check, "backend": backend, "shape": shape, "note": ""}
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            row.update(status=PASS, value=0)
        except RuntimeError as e:
            row.update(status=FAIL, value=">= 1", note=_first_line(e))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        rows.append(row)
    for row in rows:
        progress(f"{row['check']}: {row['status']}")
    return rows


def cuda_graph_section(device: torch.device, quick: bool, backends: list[str] | None = None) -> list[dict]:
    """Forward + loss + backward of the train step's model (bf16 autocast without its cast
    cache, as graph capture needs) warmed up on a side stream, captured in one CUDA graph and
    replayed once: the replayed loss must match an eager one within ``GRAPH_LOSS_TOLERANCE``
    and every gradient must be finite."""
    name = "CUDA graph capture of forward + backward"
    if device.type != "cuda":
        return [{"check": name, "status": SKIP, "note": NEEDS_CUDA}]
    backend = fastest_backend(device, backends)
    if backend is None:
        return [{"check": name, "status": SKIP, "note": "no selected backend available"}]
    bench = train_config(device, quick)
    batch = train_batch(bench).to(device)
    torch.manual_seed(0)
    model = HRMText(bench.model, backend=backend).to(device)

    def forward_loss() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(**batch.model_inputs(), bp_steps=bench.bp_steps)[0]

    row = {"check": f"{name} on {backend}", "backend": backend, "note": ""}
    try:
        eager = forward_loss().item()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                forward_loss().backward()
        torch.cuda.current_stream(device).wait_stream(side)
        model.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss = forward_loss()
            static_loss.backward()
        graph.replay()
        torch.cuda.synchronize(device)
        replayed = static_loss.item()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        diff = abs(replayed - eager) / max(abs(eager), 1e-30)
        row.update(
            value=f"{replayed:.5f} vs eager {eager:.5f}",
            error=diff,
            tolerance=GRAPH_LOSS_TOLERANCE,
            status=PASS if diff <= GRAPH_LOSS_TOLERANCE and finite else FAIL,
            note="" if finite else "non-finite gradients after replay",
        )
    except Exception as e:  # noqa: BLE001
        row.update(status=FAIL, note=_first_line(e))
    progress(f"{row['check']}: {row['status']}")
    return [row]


# -- attention timing ------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionShape:
    """``seqs`` causal sequences of ``seq_len`` tokens packed into one row of ``seqs * seq_len``."""

    seqs: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return self.seqs * self.seq_len

    def __str__(self) -> str:
        return f"{self.seqs}x{self.seq_len} tokens, {self.heads} heads x {self.head_dim}, {str(self.dtype)[6:]}"


GPU_ATTENTION = AttentionShape(16, 8, 4096, 128)  # T = 65536
GPU_ATTENTION_QUICK = AttentionShape(4, 8, 2048, 128)
CPU_ATTENTION = AttentionShape(4, 4, 1024, 64)  # T = 4096 at the bench config's heads and head dim


def attention_shape(device: torch.device, quick: bool) -> AttentionShape:
    if device.type != "cuda":
        return CPU_ATTENTION
    return GPU_ATTENTION_QUICK if quick else GPU_ATTENTION


@dataclass
class AttentionImpl:
    """One attention implementation: ``forward()`` (no grad) and ``full()`` (forward +
    backward), an ``output()`` in the packed ``[T, H, D]`` layout, and whether it is ``ours``
    (a crash is then a failed check; another library's crash only skips its row)."""

    name: str
    forward: Callable[[], object]
    full: Callable[[], object]
    output: Callable[[], torch.Tensor]
    ours: bool = False


def attention_impls(
    shape: AttentionShape,
    device: torch.device,
    backends: list[str],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
) -> list[AttentionImpl | dict]:
    """Every implementation to time on ``shape`` with packed ``[T, H, D]`` inputs and output
    gradient ``dout`` (rows that cannot run at all are dicts: skipped rows)."""
    B, L, T = shape.seqs, shape.seq_len, shape.tokens
    packing = ops.AttentionPacking.build(list(range(0, T + 1, L)), [1] * B, T, device)  # prefix 1: exactly causal
    prepared = {b: ops.prepare_packing(packing, shape.head_dim, q.dtype, b) for b in backends}

    def make(
        name: str,
        fn: Callable[..., torch.Tensor],
        inputs: list[torch.Tensor],
        to_packed: Callable,
        grad_out: torch.Tensor,
        ours: bool = False,
    ) -> AttentionImpl:
        grads = [x.detach().clone().requires_grad_() for x in inputs]

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(*inputs)

        def full() -> None:
            torch.autograd.grad(fn(*grads), grads, grad_out)

        return AttentionImpl(name, forward, full, lambda: to_packed(forward()), ours)

    impls: list[AttentionImpl | dict] = [
        make(
            f"hrm prefixlm_attention ({b})",
            lambda q_, k_, v_, b=b: ops.prefixlm_attention(q_, k_, v_, prepared[b], backend=b),
            [q, k, v],
            lambda o: o,
            dout,
            ours=True,
        )
        for b in backends
    ]
    impls.append(
        make(
            "torch SDPA (batched, is_causal)",
            lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True),
            [_batched(x, shape) for x in (q, k, v)],
            lambda o: _unbatched(o, shape),
            _batched(dout, shape),
        )
    )
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.arange(T, device=device) // L

        def document_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        block_mask = create_block_mask(document_causal, None, None, T, T, device=str(device))
        flex = torch.compile(flex_attention)
        impls.append(
            make(
                "torch flex_attention (compiled, document mask)",
                lambda q_, k_, v_: flex(q_, k_, v_, block_mask=block_mask),
                [x.transpose(0, 1)[None] for x in (q, k, v)],
                lambda o: o[0].transpose(0, 1),
                dout.transpose(0, 1)[None],
            )
        )
    except Exception as e:  # noqa: BLE001
        impls.append({"impl": "torch flex_attention", "status": SKIP, "note": _first_line(e)})
    if device.type != "cuda":
        impls.append({"impl": "flash_attn varlen", "status": SKIP, "note": NEEDS_CUDA})
    else:
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is None:
            impls.append({"impl": "flash_attn varlen", "status": SKIP, "note": "flash_attn is not installed"})
            return impls
        cu = packing.cu_seqlens
        try:
            impls.append(
                make(
                    "flash_attn varlen (causal)",
                    lambda q_, k_, v_: flash_attn_varlen_func(q_, k_, v_, cu, cu, L, L, causal=True),
                    [q, k, v],
                    lambda o: o,
                    dout,
                )
            )
        except Exception as e:  # noqa: BLE001
            impls.append({"impl": "flash_attn varlen", "status": SKIP, "note": _first_line(e)})
    return impls


def _batched(x: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """Packed ``[T, H, D]`` -> SDPA's ``[B, H, L, D]`` (contiguous)."""
    return x.view(shape.seqs, shape.seq_len, shape.heads, shape.head_dim).transpose(1, 2).contiguous()


def _unbatched(o: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return o.transpose(1, 2).reshape(shape.tokens, shape.heads, shape.head_dim)


def attention_timing_section(device: torch.device, quick: bool, backends: list[str] | None = None) -> list[dict]:
    """Forward and forward + backward time of each implementation on causal packed
    sequences and its rate on useful work, ``4 * pairs * head_dim * heads`` FLOPs forward
    (``pairs``: allowed query-key pairs) and 3.5x that forward + backward (TFLOP/s on a GPU,
    GFLOP/s on a CPU). Each forward row also has its max error against an fp32 SDPA,
    relative to its largest magnitude; ours must be within ``2 x`` a bf16 SDPA's + the
    floor, another library's is for information."""
    shape = attention_shape(device, quick)
    ours = device_backends(device, "prefixlm_attention", backends)
    B, H, L, D, T = shape.seqs, shape.heads, shape.seq_len, shape.head_dim, shape.tokens
    pairs = allowed_pairs(
        torch.arange(0, T + 1, L, dtype=torch.int32, device=device), torch.ones(B, dtype=torch.int32, device=device), T
    )
    flops = {"forward": 4.0 * pairs * D * H, "forward+backward": 14.0 * pairs * D * H}
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    warmup, reps = (2, 10) if device.type == "cuda" else (1, 3)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(T, H, D, generator=g, device=device, dtype=shape.dtype) for _ in range(4))
    with torch.no_grad():
        ref = _unbatched(
            F.scaled_dot_product_attention(*(_batched(x, shape).float() for x in (q, k, v)), is_causal=True), shape
        )
    ref_scale = ref.abs().max().item()
    impls = attention_impls(shape, device, ours, q, k, v, dout)
    sdpa = next(i for i in impls if isinstance(i, AttentionImpl) and i.name.startswith("torch SDPA"))
    tolerance = REF_FACTOR * (sdpa.output().float() - ref).abs().max().item() / ref_scale + FLOOR[shape.dtype]
    rows: list[dict] = []
    for impl in impls:
        if isinstance(impl, dict):
            rows += [{**impl, "check": f"{impl['impl']} {mode}", "mode": mode, "shape": str(shape)} for mode in flops]
            continue
        for mode, work in flops.items():
            row = {
                "check": f"{impl.name} {mode}",
                "impl": impl.name,
                "mode": mode,
                "shape": str(shape),
                "flops": work,
                "unit": unit,
                "note": "",
            }
            try:
                if mode == "forward":
                    row["error"] = (impl.output().float() - ref).abs().max().item() / ref_scale
                    if impl.ours:
                        row["tolerance"] = tolerance
                seconds = measure(
                    impl.forward if mode == "forward" else impl.full, device=device, warmup=warmup, reps=reps
                )
                row.update(seconds=seconds, rate=work / seconds / scale)
                ok = "tolerance" not in row or row["error"] <= row["tolerance"]
                row["status"] = (PASS if ok else FAIL) if impl.ours else INFO
            except Exception as e:  # noqa: BLE001
                row.update(status=FAIL if impl.ours else SKIP, note=_first_line(e))
            progress(
                f"timing {row['check']}: {row['status']}" + (f", {row['rate']:.3g} {unit}" if "rate" in row else "")
            )
            rows.append(row)
    return rows


# -- the csrc/ CUDA kernels against Triton (CUDA) --------------------------------------------
def cuda_kernel_cases(bench: BenchConfig, device: torch.device) -> list[tuple[suites.OpCase, torch.dtype, str]]:
    """``(case, dtype, unit)``: the bench's cases (:func:`hrm.bench.suites.op_cases`) of the
    MagicNorm transition at ``bench``'s shape in fp32 and bf16 (rated in GB/s of its unavoidable
    traffic: 3 loads + 3 stores forward, 5 loads + 2 stores backward) and of the SwiGLU
    up-projection ``swiglu(x @ W^T)`` in bf16 (TFLOP/s: ``2 * T * d * 2I`` forward, 3x that
    forward + backward)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        cases = {c.name: c for c in suites.op_cases(bench, device, dtype)}
        out.append((cases["magicnorm_transition"], dtype, "GB/s"))
    out.append((cases["swiglu_linear"], torch.bfloat16, "TFLOP/s"))
    return out


def cuda_kernels_section(device: torch.device, quick: bool, backends: list[str] | None = None) -> list[dict]:
    """The ``cuda`` backend's kernels (csrc/, docs/cuda.md) next to ``triton`` at preset B's
    width on 16K tokens (:data:`CUDA_KERNELS`; ``quick``: the small op shapes): forward and
    forward + backward time, the rate, and the parity against the fp64 oracle (the parity
    section's rule); a ``cuda`` row passes when its parity does."""
    name = "cuda kernels vs triton"
    if device.type != "cuda":
        return [{"check": name, "status": SKIP, "note": NEEDS_CUDA}]
    reason = dispatch.unavailable_reason("cuda")
    if reason is not None:
        return [{"check": name, "status": SKIP, "note": f"backend 'cuda': {reason}"}]
    from hrm.ops import cuda_extension

    rows = [{"check": "libhrm_cuda kernels", "value": cuda_extension.kernels(), "status": INFO, "note": ""}]
    bench = QUICK_OPS if quick else CUDA_KERNELS
    for case, dtype, unit in cuda_kernel_cases(bench, device):
        times: dict[str, float] = {}
        for backend in ("cuda", "triton"):
            if dispatch.unavailable_reason(backend) is not None or (backends is not None and backend not in backends):
                continue
            check = f"{case.name} {case.shape} {str(dtype)[6:]} on {backend}"
            row = {"check": check, "value": None, "status": INFO, "note": ""}
            try:
                run = suites.op_run(case, backend, dtype)
                t_fwd = measure(run.forward, device=device, warmup=3, reps=20)
                t_full = measure(run.full, device=device, warmup=3, reps=20)
                times[backend] = t_full
                if unit == "GB/s":
                    rates = (case.fwd_bytes / t_fwd / 1e9, (case.fwd_bytes + case.bwd_bytes) / t_full / 1e9)
                else:
                    rates = (case.fwd_flops / t_fwd / 1e12, case.full_flops / t_full / 1e12)
                row["value"] = (
                    f"fwd {t_fwd * 1e3:.3f} ms ({rates[0]:.3g} {unit}), "
                    f"fwd+bwd {t_full * 1e3:.3f} ms ({rates[1]:.3g} {unit})"
                )
                error = suites.op_parity(case, run.inputs, backend, dtype)
                tolerance = suites.op_tolerance(case, run.inputs, dtype)
                row["note"] = f"parity {error:.2g} (tolerance {tolerance:.2g})"
                if backend == "cuda":
                    row["status"] = PASS if error <= tolerance else FAIL
                elif "cuda" in times:
                    row["note"] += f"; cuda fwd+bwd is {t_full / times['cuda']:.2f}x faster"
            except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed check, not a crashed doctor
                row.update(status=FAIL if backend == "cuda" else INFO, note=_first_line(e))
            progress(f"cuda kernels {check}: {row['status']}")
            rows.append(row)
    return rows


# -- one section in a fresh process ----------------------------------------------------------
def run_section(spec: dict) -> object:
    """The result of the section that ``spec`` names (``section``, ``device``, ``quick``,
    ``backends``; ``backend`` for ``parity``)."""
    device, quick, backends = torch.device(spec["device"]), spec["quick"], spec.get("backends")
    section = spec["section"]
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device, named (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # graph capture and side streams use the current device
    if section == "device":
        return device_section(device)
    if section == "parity":
        return parity_section(spec["backend"], device, quick)
    if section == "long_attention":
        return long_attention_section(device, backends)
    sections: dict[str, Callable[..., list[dict]]] = {
        "host_reads": host_reads_section,
        "cuda_graph": cuda_graph_section,
        "attention_timing": attention_timing_section,
        "cuda_kernels": cuda_kernels_section,
    }
    return sections[section](device, quick, backends)


if __name__ == "__main__":  # the section child process (see hrm.doctor.run)
    _spec = json.loads(sys.argv[1])
    Path(_spec["result"]).write_text(json.dumps(run_section(_spec)))
