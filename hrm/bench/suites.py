"""The benchmark suites behind ``hrm bench``: every op, and the end-to-end train step.

``ops``: each fused op at the shapes of a benchmark config (:data:`hrm.config.BENCH_CONFIGS`),
forward (no grad), backward alone and forward + backward, on every backend that
implements it here, next to the ``torch`` reference timed in the same run; each row
carries the op's useful FLOPs / unavoidable bytes and the max error of its outputs and
gradients against the fp64 oracle (relative to the oracle's largest magnitude). Every op is
timed in fp32, and where the run's precision is bf16 (a GPU with bf16 tensor cores, a CPU
with AMX-BF16) also in bf16, the dtype its matmuls and activations take under the train
step's autocast; the ops that stay fp32 there (the embedding's fp32 table, the gradients'
norm) only in fp32.

``train``: one optimizer step of the config under one precision for every variant (``auto``
as ``hrm train`` resolves it: bf16 autocast with fp32 master weights where the device has
fast bf16, fp32 elsewhere; Adam-atan2): the forward with the config's
``bp_steps``, loss, backward, optimizer step. Variants: every backend, plus the reference
model's forward + loss under ``torch.compile`` (``torch+compile``). Each variant runs in
its own fresh process. Peak memory (the target's) is tensor memory, as the CUDA allocator
counts it on a GPU (``max_memory_allocated``); on a CPU: the tensors a step holds between
steps (parameters, optimizer state, the batch) plus the peak of the tensors one more step
allocates, from the profiler's allocation events. Next to it, a CPU row records the
process's resident high-water mark minus an idle process's (one that imports the same
libraries and builds the same batch): it also counts what the compilers and malloc keep.
Model FLOPs count only the useful work (:mod:`hrm.flops`, the count the training loop logs):
allowed attention pairs, real tokens, supervised LM-head rows; every stack call forward,
the backward only of those with gradients.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from hrm import HRMText, ops, profiling
from hrm.bench.report import Row
from hrm.bench.timing import measure_all, spread
from hrm.bench.workloads import SFT_JSONL, train_batch
from hrm.config import BenchConfig, ModelConfig
from hrm.data import ByteTokenizer, PackedBatch, PackedLoader, read_jsonl
from hrm.flops import RowWork, train_step_flops
from hrm.heap import retain_freed_memory
from hrm.ops import allowed_pairs, dispatch, rope_cos_sin
from hrm.precision import autocast as precision_autocast
from hrm.precision import resolve_precision
from hrm.training.config import TrainConfig
from hrm.training.optim import AdamAtan2

OP_TOLERANCE = 1e-5  # fp32 vs the fp64 oracle, relative to its largest magnitude
ATTENTION_TOLERANCE = 1e-4  # a softmax over up to a few hundred keys
# Low precision: a backend's error may be REF_FACTOR x the torch reference's own error in
# that dtype plus a floor (tests/test_fused_ops.py); fp32 uses each op's fixed tolerance.
REF_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# relative first-step loss difference to the reference: bf16 autocast rounds through 8 recurrent
# stack calls; fp32 differs only in summation order
LOSS_TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
PRECISION_NAMES = {"bf16": "bf16 autocast, fp32 master weights", "fp32": "fp32"}
DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}  # a row's dtype: its matmuls
QUICK_OP_TOKENS = 1024
OP_MIN_TIME = 0.2  # seconds of timed calls per op, mode and backend at least: short ops get more reps
COMPILED_REFERENCE = "torch+compile"
LOOP_STEPS = 10  # `hrm train` steps per loop row: LOOP_WARMUP untimed, the rest timed
LOOP_WARMUP = 2  # the first compiles (and the second may recompile for another packing)
LOOP_ROUNDS = 2  # `hrm train` runs per loop row, in the order torch, cpu, cpu, torch (loop_order)

# Targets of the train step (the issue's): fastest CPU backend vs the reference and vs
# torch.compile of the reference, its MFU and its peak memory relative to the reference.
# The training loop's (issue 18): `hrm train` on the fastest backend vs on the reference, and the
# loop's tokens/s no more than 5% under the bench step's on the same backend and the same rows.
TARGETS = {
    "speedup_vs_torch": 3.0,
    "speedup_vs_compile": 2.0,
    "mfu": 0.5,
    "memory_vs_torch": 0.5,
    "loop_speedup_vs_torch": 3.5,
    "loop_vs_step_loss": 0.05,
}


def bench_backends(op: str | None = None) -> list[str]:
    """Backends to time here (of ``op``, when given: those that implement it directly). The
    Triton interpreter is a test vehicle, not a CPU backend: it is left out without CUDA."""
    names = [b for b in dispatch.available_backends() if b != "triton" or torch.cuda.is_available()]
    if op is None:
        return names
    return [b for b in names if b in dispatch.implementations(op)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- ops -------------------------------------------------------------------------------------------
@dataclass
class OpCase:
    name: str
    shape: str
    inputs: Callable[[], list]  # fp64 tensors (requires_grad = differentiable) and other arguments
    call: Callable[..., object]  # call(*inputs, backend=...)
    fwd_bytes: float = 0.0  # unavoidable traffic of a forward / a backward, in bytes
    bwd_bytes: float = 0.0
    fwd_flops: float = 0.0
    full_flops: float = 0.0  # forward + backward
    bwd_flops: float = 0.0  # the backward alone (0 where backends split the work differently)
    tolerance: float = OP_TOLERANCE  # in fp32 (low precision: :func:`op_tolerance`)
    note: str = ""  # shown under the report's table (where an op's costs sit in another mode)
    inference_only: bool = False  # no backward: only the forward is timed
    fp32_only: bool = False  # fp32 under the train step's bf16 autocast too: not timed in bf16


LINEAR_CE_NOTE = (
    "the fused backends compute the gradients in the forward that needs them, so their backward "
    "row is only the scaling (the reference's backward does the work): compare the full rows"
)


def op_cases(
    bench: BenchConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[OpCase]:
    """One case per public fused op at the config's shapes (one packed row of ``bench.tokens``);
    ``dtype`` is the one its rows are timed in (the unavoidable bytes depend on it)."""
    device = torch.device(device)
    cfg, T = bench.model, bench.tokens
    d, I, H, hd, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
    batch = train_batch(bench).to(device)
    labels, S, cu, pl = batch.labels, batch.num_supervised, batch.cu_seqlens, batch.prefix_lens
    cos, sin = rope_cos_sin(batch.position_ids, hd, cfg.rope_theta)
    pairs = allowed_pairs(cu, pl, T)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device).requires_grad_()

    with torch.device("meta"):
        param_shapes = [tuple(p.shape) for p in HRMText(cfg).parameters()]
    param_values = sum(math.prod(s) for s in param_shapes)
    f32, e = 4, dtype.itemsize
    return [
        # The backward writes the whole dense table (zeros where no token points). The table is
        # an fp32 master weight under bf16 autocast, which leaves the lookup in fp32.
        OpCase(
            "embedding",
            f"{T} ids into {V}x{d}",
            lambda: [rand(V, d)],
            lambda w, backend: ops.embedding(batch.input_ids, w, cfg.embed_std**-1, backend=backend),
            2 * T * d * f32,
            (T + V) * d * f32,
            fp32_only=True,
        ),
        OpCase(
            "rms_norm",
            f"{T}x{d}",
            lambda: [rand(T, d)],
            lambda x, backend: ops.rms_norm(x, backend=backend),
            2 * T * d * e,
            3 * T * d * e,
        ),
        OpCase(
            "add_rms_norm",
            f"{T}x{d}",
            lambda: [rand(T, d), rand(T, d)],
            lambda x, r, backend: ops.add_rms_norm(x, r, backend=backend),
            4 * T * d * e,
            4 * T * d * e,
        ),
        OpCase(
            "magicnorm_transition",
            f"{T}x{d}",
            lambda: [rand(T, d), rand(T, d), rand(T, d)],
            lambda x, dl, o, backend: ops.magicnorm_transition(x, dl, o, backend=backend),
            6 * T * d * e,
            7 * T * d * e,
        ),
        OpCase(
            "swiglu",
            f"{T}x2x{I}",
            lambda: [rand(T, 2 * I)],
            lambda gu, backend: ops.swiglu(gu, backend=backend),
            3 * T * I * e,
            5 * T * I * e,
        ),
        OpCase(
            "split_rope",
            f"{T}x4x{H}x{hd}",
            lambda: [rand(T, 4 * H, hd)],
            lambda x, backend: ops.split_rope(x, cos, sin, backend=backend),
            8 * T * d * e + 2 * T * hd * f32,  # cos and sin are fp32
            8 * T * d * e + 2 * T * hd * f32,
        ),
        # Useful work only: 4 * pairs * hd per head forward; forward + backward 3.5x that
        # (flash-attention's convention: the backward is 2.5 forwards, recomputation included).
        OpCase(
            "prefixlm_attention",
            f"{T}x{H}x{hd} ({pairs} pairs)",
            lambda: [rand(T, H, hd) for _ in range(4)],
            lambda q, k, v, gate, backend: ops.prefixlm_attention(q, k, v, batch.attention, gate=gate, backend=backend),
            fwd_flops=4.0 * pairs * hd * H,
            full_flops=14.0 * pairs * hd * H,
            bwd_flops=10.0 * pairs * hd * H,
            tolerance=ATTENTION_TOLERANCE,
        ),
        # The up-projection with the SwiGLU in one op (the cuda backend's GEMM of
        # csrc/swiglu_linear, bf16/fp16 only; the others a GEMM then the activation).
        OpCase(
            "swiglu_linear",
            f"{T}x{d} @ {d}x2x{I}",
            lambda: [rand(T, d), rand(2 * I, d, scale=d**-0.5)],
            lambda x, w, backend: ops.swiglu_linear(x, w, backend=backend),
            fwd_flops=2 * T * d * 2 * I,
            full_flops=6 * T * d * 2 * I,
            bwd_flops=4 * T * d * 2 * I,
        ),
        # The fused backends compute the gradients in the forward that needs them (the
        # reference in its backward): only the forward and the full rows count FLOPs.
        OpCase(
            "linear_cross_entropy",
            f"{T}x{d}->{V} ({S} supervised)",
            lambda: [rand(T, d), rand(V, d, scale=d**-0.5)],
            lambda z, w, backend: ops.linear_cross_entropy(z, w, labels, rows=batch.supervised_rows, backend=backend),
            fwd_flops=2 * S * d * V,
            full_flops=6 * S * d * V,
            note=LINEAR_CE_NOTE,
        ),
        decode_attention_case(H, hd, device, dtype),
        # Gradient clipping's norm over every parameter's gradient: one read of each. The
        # tolerance is the reference's: torch's fp32 norm of a table of 8M values is ~2e-4 off.
        # The gradients are the fp32 master weights' under bf16 autocast too.
        OpCase(
            "global_norm",
            f"{len(param_shapes)} tensors, {param_values} values",
            lambda: [rand(*shape) for shape in param_shapes],
            lambda *ts, backend: ops.global_norm([t.detach() for t in ts], backend=backend),
            fwd_bytes=param_values * f32,
            tolerance=1e-3,
            inference_only=True,
            fp32_only=True,
        ),
    ]


def decode_attention_case(
    H: int, hd: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> OpCase:
    """One decode step's attention (generation; inference only): 8 sequences at different
    positions of a 256-position cache, the first and last positions included. The caches are
    made once per dtype: each call writes its new key and value at the same positions and
    reads only up to them, so calls do not disturb each other (and no copy is timed)."""
    B, S = 8, 256
    device = torch.device(device)
    g = torch.Generator().manual_seed(3)
    caches = torch.randn(2, B, H, S, hd, generator=g, dtype=torch.float64).to(device)
    pos = torch.tensor([0, 1, 37, 100, 128, 200, 254, 255], device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}

    def call(q, k, v, gate, backend):
        q, k, v, gate = (t.detach() for t in (q, k, v, gate))
        if q.dtype not in by_dtype:
            by_dtype[q.dtype] = [c.to(q.dtype, copy=True) for c in caches]
        kc, vc = by_dtype[q.dtype]
        return ops.decode_attention(q, k, v, gate, kc, vc, pos, backend=backend)

    def inputs() -> list:
        return [torch.randn(B, H, hd, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(4)]

    visible = int((pos + 1).sum())
    return OpCase(
        "decode_attention",
        f"{B}x{H}x{hd} over {S} cached",
        inputs,
        call,
        # the visible keys and values; q, k, v, gate, out, writes
        fwd_bytes=(2 * visible + 7 * B) * H * hd * dtype.itemsize,
        tolerance=ATTENTION_TOLERANCE,
        inference_only=True,
    )


def _float_outputs(out) -> list[torch.Tensor]:
    out = out if isinstance(out, tuple) else (out,)
    return [o for o in out if o.is_floating_point()]


def op_parity(case: OpCase, inputs: list, backend: str, dtype: torch.dtype = torch.float32) -> float:
    """Max error of outputs and gradients (in ``dtype`` on ``backend``) against the fp64
    reference, relative to the reference's largest magnitude."""

    def run(dtype):
        xs = [x.detach().to(dtype).requires_grad_() if torch.is_tensor(x) and x.requires_grad else x for x in inputs]
        outs = _float_outputs(case.call(*xs, backend="torch" if dtype == torch.float64 else backend))
        leaves = [x for x in xs if torch.is_tensor(x) and x.requires_grad]
        differentiable = any(o.requires_grad for o in outs)  # decode attention is inference only
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs]) if differentiable else ()
        return [t.detach().double() for t in (*outs, *grads)]

    return max(
        ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(run(dtype), run(torch.float64))
    )


def op_tolerance(case: OpCase, inputs: list, dtype: torch.dtype) -> float:
    """The largest parity error a backend's row may have: the case's own in fp32; in fp16 and
    bf16, :data:`REF_FACTOR` times the ``torch`` reference's own error in that dtype plus a
    floor (rounding, not the kernels, sets the error there)."""
    if dtype == torch.float32:
        return case.tolerance
    return REF_FACTOR * op_parity(case, inputs, "torch", dtype) + LOW_PRECISION_FLOOR[dtype]


def _backward_times(
    forward: Callable[[], list], leaves: list, reps: int, device: torch.device, min_time: float = 0.0
) -> list[float]:
    """Seconds of each backward alone (each rep runs an untimed forward first)."""
    times: list[float] = []
    i = 0
    while len(times) < reps or sum(times) < min_time:
        outs = forward()
        grads = [torch.ones_like(o) for o in outs]
        sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(outs, leaves, grads)
        sync(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
        i += 1
    return times


@dataclass
class OpRun:
    """What is timed of one op case on one backend, on copies of the case's inputs in the
    row's dtype."""

    inputs: list  # the case's fp64 inputs (for the parity check)
    leaves: list[torch.Tensor]  # the inputs that take gradients, in the row's dtype
    forward: Callable[[], None]  # without gradients
    forward_with_grad: Callable[[], list]  # returns the float outputs
    full: Callable[[], None]  # forward + backward


def op_run(case: OpCase, backend: str, dtype: torch.dtype = torch.float32) -> OpRun:
    inputs = case.inputs()
    xs = [x.detach().to(dtype).requires_grad_() if torch.is_tensor(x) and x.requires_grad else x for x in inputs]
    leaves = [x for x in xs if torch.is_tensor(x) and x.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            case.call(*xs, backend=backend)

    def forward_with_grad() -> list:
        return _float_outputs(case.call(*xs, backend=backend))

    def full() -> None:
        outs = forward_with_grad()
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    return OpRun(inputs, leaves, forward, forward_with_grad, full)


def bench_op(
    case: OpCase,
    backend: str,
    reps: int,
    device: torch.device | str = "cpu",
    min_time: float = OP_MIN_TIME,
    dtype: torch.dtype = torch.float32,
    tolerance: float | None = None,
) -> list[Row]:
    """Forward without gradients, backward alone, and forward + backward of ``case`` on ``backend``
    in ``dtype`` (only the forward for an ``inference_only`` case), with the parity error and its
    ``tolerance`` (default :func:`op_tolerance`). (The fused linear cross-entropy computes
    its gradients during a forward that needs them, so its backward alone is only the scaling;
    compare its full rows.)"""
    device = torch.device(device)
    run = op_run(case, backend, dtype)
    t_fwd = spread(measure_all(run.forward, device=device, warmup=1, reps=reps, min_time=min_time))
    common = dict(
        suite="ops",
        name=case.name,
        backend=backend,
        shape=case.shape,
        dtype=str(dtype).removeprefix("torch."),
        parity=op_parity(case, run.inputs, backend, dtype),
        tolerance=op_tolerance(case, run.inputs, dtype) if tolerance is None else tolerance,
    )

    def times(t: tuple[float, float, float]) -> dict:
        """The row's timings, and its own ``extra`` (derive marks rows in it)."""
        return {
            "seconds_min": t[0],
            "seconds": t[1],
            "seconds_max": t[2],
            "extra": {"note": case.note} if case.note else {},
        }

    forward = Row(mode="forward", **times(t_fwd), bytes=case.fwd_bytes or None, flops=case.fwd_flops or None, **common)
    if case.inference_only:
        return [forward]
    t_bwd = spread(_backward_times(run.forward_with_grad, run.leaves, reps, device, min_time))
    t_full = spread(measure_all(run.full, device=device, warmup=1, reps=reps, min_time=min_time))
    return [
        forward,
        Row(mode="backward", **times(t_bwd), bytes=case.bwd_bytes or None, flops=case.bwd_flops or None, **common),
        Row(
            mode="full",
            **times(t_full),
            bytes=(case.fwd_bytes + case.bwd_bytes) or None,
            flops=case.full_flops or None,
            **common,
        ),
    ]


def adam_atan2_run(
    bench: BenchConfig, backend: str, device: torch.device | str = "cpu"
) -> tuple[Callable[[], None], float, int, int]:
    """``(step, parity, tensors, values)``: one Adam-atan2 step (:func:`hrm.ops.adam_atan2_`)
    over fp32 copies of the config model's parameters (``tensors`` of them, ``values`` numbers)
    with random gradients, on ``backend``; its parity is the max error after 3 steps against
    the fp64 reference."""
    device = torch.device(device)
    shapes = [p.shape for p in HRMText(bench.model).parameters()]
    g = torch.Generator().manual_seed(0)
    init = [(torch.randn(s, generator=g), torch.randn(s, generator=g)) for s in shapes]

    def tensors(dtype: torch.dtype) -> tuple[list[torch.Tensor], ...]:
        ps = [p.to(device, dtype) for p, _ in init]
        return (
            ps,
            [gr.to(device, dtype) for _, gr in init],
            [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps],
        )

    def step(ts: tuple[list[torch.Tensor], ...], k: int, on: str) -> None:
        ops.adam_atan2_(*ts, [k] * len(ts[0]), lr=1e-3 * k, betas=(0.9, 0.95), weight_decay=0.1, backend=on)

    out, ref = tensors(torch.float32), tensors(torch.float64)
    for k in (1, 2, 3):
        step(out, k, backend)
        step(ref, k, "torch")
    parity = max(
        ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
        for a, b in zip([*out[0], *out[2], *out[3]], [*ref[0], *ref[2], *ref[3]])
    )
    counter = itertools.count(4)
    return (lambda: step(out, next(counter), backend)), parity, len(shapes), sum(p.numel() for p in out[0])


def bench_adam_atan2(
    bench: BenchConfig, backend: str, reps: int, device: torch.device | str = "cpu", min_time: float = OP_MIN_TIME
) -> list[Row]:
    """The row of :func:`adam_atan2_run` (mode ``full``: the whole op). Traffic: read p, g, m,
    v; write p, m, v."""
    step, parity, tensors, n = adam_atan2_run(bench, backend, device)
    fastest, seconds, slowest = spread(measure_all(step, device=device, warmup=1, reps=reps, min_time=min_time))
    return [
        Row(
            suite="ops",
            name="adam_atan2",
            backend=backend,
            mode="full",
            shape=f"{tensors} tensors, {n} values",
            dtype="float32",
            seconds=seconds,
            seconds_min=fastest,
            seconds_max=slowest,
            bytes=7 * 4 * n,
            parity=parity,
            tolerance=OP_TOLERANCE,
        )
    ]


def run_ops(
    bench: BenchConfig,
    *,
    reps: int,
    device: torch.device | str = "cpu",
    backends: list[str] | None = None,
    min_time: float = OP_MIN_TIME,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    progress: bool = True,
) -> list[Row]:
    """Every op case in each of ``dtypes`` (but ``fp32_only`` ones in fp32 only) on each of
    ``backends`` (default: all that implement it here), then the Adam-atan2 step (fp32), with a
    progress bar on stderr (one tick per op, backend and dtype)."""
    from tqdm import tqdm

    work = []  # (case, backend, dtype), case by case
    for dtype in dtypes:
        for case in op_cases(bench, device, dtype):
            chosen = [b for b in bench_backends(case.name) if backends is None or b in backends]
            if chosen and not (case.fp32_only and dtype != torch.float32):
                work += [(case, b, dtype) for b in chosen]
    adam = [b for b in bench_backends("adam_atan2") if backends is None or b in backends]
    rows: list[Row] = []
    tolerances: dict[tuple[str, torch.dtype], float] = {}
    with tqdm(total=len(work) + len(adam), desc="hrm bench ops", unit="op", disable=not progress) as bar:
        for case, backend, dtype in work:
            bar.set_postfix_str(f"{case.name} {backend} {str(dtype).removeprefix('torch.')}")
            if (case.name, dtype) not in tolerances:  # in low precision it times the reference's own error
                tolerances[case.name, dtype] = (
                    case.tolerance if dtype == torch.float32 else op_tolerance(case, case.inputs(), dtype)
                )
            rows += bench_op(case, backend, reps, device, min_time, dtype, tolerances[case.name, dtype])
            bar.update()
        for backend in adam:
            bar.set_postfix_str(f"adam_atan2 {backend}")
            rows += bench_adam_atan2(bench, backend, reps, device, min_time)
            bar.update()
    return rows


# -- train step ------------------------------------------------------------------------------------
def _say(message: str) -> None:
    """A progress line on stderr: the train suite runs each variant as a process of its own,
    for up to minutes each."""
    print(f"hrm bench: {message}", file=sys.stderr, flush=True)


def train_flops(cfg: ModelConfig, batch: PackedBatch, bp_steps: int) -> float:
    """Useful FLOPs of one train step (:func:`hrm.flops.train_step_flops`, the accounting the
    training loop logs): every stack call forward (real tokens, allowed attention pairs),
    the backward of the calls with gradients, the LM head on the supervised rows."""
    return float(train_step_flops(cfg, RowWork.of(batch), bp_steps).total)


def make_train_step(
    model: HRMText,
    batch: PackedBatch | list[PackedBatch],
    bp_steps: int,
    *,
    compiled: bool = False,
    lr: float = 1e-4,
    precision: str = "auto",
) -> tuple[Callable[[], torch.Tensor], AdamAtan2]:
    """One train step at ``precision`` (:func:`hrm.precision.resolve_precision`: ``auto`` is
    bf16 autocast with fp32 master weights where the device has fast bf16, fp32 elsewhere, as
    ``hrm train`` picks): forward + loss (``torch.compile``d with ``compiled``), backward,
    Adam-atan2 step. Each phase is a named range (``forward``, ``backward``, ``optimizer``).
    Given a list of batches, each call trains on the next one (cycling)."""
    rows = itertools.cycle([batch] if isinstance(batch, PackedBatch) else batch)
    device = next(model.parameters()).device
    optimizer = AdamAtan2(model.parameters(), lr=lr, backend=model.backend)
    autocast = precision_autocast(resolve_precision(precision, device), device)

    def forward_loss(batch: PackedBatch):
        with autocast:
            return model(**batch.model_inputs(), bp_steps=bp_steps)[0]

    fwd = torch.compile(forward_loss) if compiled else forward_loss

    def step() -> torch.Tensor:
        with profiling.range("forward"):
            loss = fwd(next(rows))
        with profiling.range("backward"):
            loss.backward()
        with profiling.range("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, optimizer


def bench_to_dict(bench: BenchConfig) -> dict:
    return dataclasses.asdict(bench)


def bench_from_dict(data: dict) -> BenchConfig:
    data = dict(data)
    return BenchConfig(ModelConfig.from_dict(data.pop("model")), **data)


def _rss_peak_bytes() -> int:
    """Resident high-water mark of this program (Linux: ``VmHWM``; ``ru_maxrss`` is no use
    there, since it carries the parent's resident size across fork and exec)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(ln for ln in status if ln.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def held_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of the tensors that one call of ``step`` allocates and holds at once (CPU),
    from the profiler's memory events (their running total of what the profiled span
    allocated and has not freed)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals])


def train_child(spec: dict) -> dict:
    """Runs in a fresh process: the train step of one variant (or, with ``variant`` None, an
    idle process that builds the same batch), timed; returns its numbers. With ``loop_steps``
    (mode :data:`LOOP_ROWS`) the steps train on the rows ``hrm train`` trains on in the loop
    case (:func:`loop_rows`), in its order: its warm-up rows untimed, then each of its timed
    rows once; seconds, tokens and FLOPs are then means over those rows."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    bench = bench_from_dict(spec["bench"])
    loop_steps = spec.get("loop_steps")
    batches = [b.to(device) for b in loop_rows(bench, loop_steps)] if loop_steps else [train_batch(bench).to(device)]
    batch = batches[-1]
    if spec["variant"] is None:
        return {"rss_bytes": _rss_peak_bytes()}
    torch.manual_seed(0)
    model = HRMText(bench.model, backend=spec["backend"]).to(device)
    step, optimizer = make_train_step(
        model, batches, bench.bp_steps, compiled=spec["compiled"], precision=spec["precision"]
    )
    t0 = time.perf_counter()
    first_loss = float(step())  # warm-up: compiles, allocates the optimizer state
    first_seconds = time.perf_counter() - t0
    if loop_steps:  # the loop's other warm-up rows, then every timed row once
        timed = batches[LOOP_WARMUP:]
        times = measure_all(step, device=device, warmup=LOOP_WARMUP - 1, reps=len(timed))
        fastest, seconds, slowest = min(times), sum(times) / len(times), max(times)
    else:
        timed = batches
        fastest, seconds, slowest = spread(measure_all(step, device=device, warmup=spec["warmup"], reps=spec["reps"]))
    out = {
        "seconds_min": fastest,
        "seconds_max": slowest,
        "backend": model.backend,
        "first_loss": first_loss,
        "first_seconds": first_seconds,
        "seconds": seconds,
        "tokens": round(sum(b.num_tokens for b in timed) / len(timed)),  # per step (a mean over loop rows)
        "supervised": round(sum(b.num_supervised for b in timed) / len(timed)),
        "flops": sum(train_flops(bench.model, b, bench.bp_steps) for b in timed) / len(timed),
    }
    if device.type == "cuda":
        return {**out, "peak_bytes": torch.cuda.max_memory_allocated(device)}
    state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    held = held_bytes(
        *model.parameters(),
        *model.buffers(),
        *state,
        batch.input_ids,
        batch.position_ids,
        batch.labels,
        batch.cu_seqlens,
        batch.prefix_lens,
        batch.supervised_rows,
        *batch.attention.tensors(),
    )
    rss = _rss_peak_bytes()  # before the profiled step: the profiler holds its own records
    return {**out, "peak_bytes": held + step_peak_bytes(step), "rss_bytes": rss}


def _run_child(spec: dict, timeout: float | None) -> dict:
    """``train_child(spec)`` in a fresh interpreter; ``{"error": ...}`` when it fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "hrm.bench.suites", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit code {out.returncode}", "stderr": out.stderr[-4000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_variants(backends: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """``(label, backend, compiled)``: every backend, then the compiled reference."""
    names = [b for b in bench_backends() if backends is None or b in backends]
    variants = [(b, b, False) for b in names]
    if backends is None or COMPILED_REFERENCE in backends:
        variants.append((COMPILED_REFERENCE, "torch", True))
    return variants


ONE_THREAD = "step, 1 thread"
LOOP_ROWS = "step, loop rows"  # the bench step on the rows that the `loop` rows' `hrm train` run times


def _fastest(results: dict[tuple[str, str], dict]) -> list[str]:
    """The fused backends' labels (not the reference, not its compiled form) by step time, fastest first."""
    timed = {
        label: r["seconds"]
        for (label, mode), r in results.items()
        if mode == "step" and "seconds" in r and label not in ("torch", COMPILED_REFERENCE)
    }
    return sorted(timed, key=timed.get)


def run_train(
    name: str,
    bench: BenchConfig,
    *,
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    backends: list[str] | None = None,
    timeout: float | None = None,
    precision: str = "auto",
    loop_steps: int = LOOP_STEPS,
    loop_rounds: int = LOOP_ROUNDS,
) -> list[Row]:
    """One ``step`` row per variant at this process's thread count (a failed variant's row has
    ``seconds`` NaN and the error in ``extra``), every variant at ``precision`` resolved once
    here (``auto``: as ``hrm train`` picks). On a CPU with more than one thread, ``step, 1
    thread`` rows for the reference and the fastest fused backend. With ``loop_steps``, for the
    same two: ``step, loop rows`` rows (the bench step on the rows the loop times,
    :func:`loop_rows`) and ``loop`` rows (:func:`run_loop`, ``loop_rounds`` runs of each), each
    with ``extra["loop_vs_step"]``: its tokens/s over its backend's step on the same rows."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    dtype = DTYPE_NAMES[precision]
    base = {
        "precision": precision,
        "device": str(device),
        "bench": bench_to_dict(bench),
        "reps": reps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
    }
    idle = {}
    if device.type == "cpu":
        _say("train: an idle process's resident memory")
        idle = _run_child({**base, "variant": None}, timeout)
    variants = {label: (backend, compiled) for label, backend, compiled in train_variants(backends)}
    results = {}
    for i, (label, (backend, compiled)) in enumerate(variants.items()):
        _say(f"train step {i + 1}/{len(variants)}: {label}")
        results[label, "step"] = _run_child(
            {**base, "variant": label, "backend": backend, "compiled": compiled}, timeout
        )
    # the reference and the fastest fused backend: again on one core, and in the training loop
    compared = list(dict.fromkeys(["torch", *_fastest(results)[:1]])) if "torch" in variants else []
    if device.type == "cpu" and base["threads"] > 1:
        for label in compared:
            backend, compiled = variants[label]
            spec = {**base, "threads": 1, "variant": label, "backend": backend, "compiled": compiled}
            _say(f"train step at 1 thread: {label}")
            results[label, ONE_THREAD] = _run_child(spec, timeout)
    if loop_steps:  # the bench step on the loop's own rows: what the loop rows are compared with
        compared = compared or _fastest(results)[:1]
        for label in compared:
            backend, compiled = variants[label]
            spec = {**base, "variant": label, "backend": backend, "compiled": compiled, "loop_steps": loop_steps}
            _say(f"train step on hrm train's rows: {label}")
            results[label, LOOP_ROWS] = _run_child(spec, timeout)
    rows = []
    shape_notes = {ONE_THREAD: ", 1 thread", LOOP_ROWS: f", hrm train's rows {LOOP_WARMUP + 1}-{loop_steps}"}
    for (label, mode), r in results.items():
        ref = results.get(("torch", mode), {})
        extra: dict = {"precision": PRECISION_NAMES[precision], "bp_steps": bench.bp_steps}
        if "error" in r:
            extra["error"] = r["error"]
            rows.append(
                Row(
                    suite="train",
                    name=name,
                    backend=label,
                    mode=mode,
                    shape=f"T={bench.tokens}",
                    dtype=dtype,
                    seconds=float("nan"),
                    extra=extra,
                )
            )
            continue
        extra.update(resolved_backend=r["backend"], supervised=r["supervised"], first_step_s=r["first_seconds"])
        if "rss_bytes" in r and "rss_bytes" in idle:
            extra.update(
                rss_peak_mb=(r["rss_bytes"] - idle["rss_bytes"]) / 2**20, idle_rss_mb=idle["rss_bytes"] / 2**20
            )
        parity = None
        if "first_loss" in ref:
            parity = abs(r["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
        rows.append(
            Row(
                suite="train",
                name=name,
                backend=label,
                mode=mode,
                shape=f"T={bench.tokens} ({r['tokens']} real) bp={bench.bp_steps}" + shape_notes.get(mode, ""),
                dtype=dtype,
                seconds=r["seconds"],
                seconds_min=r.get("seconds_min"),
                seconds_max=r.get("seconds_max"),
                flops=r["flops"],
                parity=parity,
                tolerance=LOSS_TOLERANCE[precision],
                peak_mem_mb=r["peak_bytes"] / 2**20,
                tokens=r["tokens"],
                extra=extra,
            )
        )
    if loop_steps:
        for row in run_loop(
            name, bench, compared, precision=precision, steps=loop_steps, rounds=loop_rounds, timeout=timeout
        ):
            step = results.get((row.backend, LOOP_ROWS), {})
            if row.seconds == row.seconds and "seconds" in step:
                row.extra["loop_vs_step"] = (row.tokens / row.seconds) / (step["tokens"] / step["seconds"])
            rows.append(row)
    return rows


# -- the training loop itself -------------------------------------------------------------------------


def loop_command(bench: BenchConfig, backend: str, precision: str, out: Path, steps: int = LOOP_STEPS) -> list[str]:
    """``hrm train`` on the shipped SFT-like JSONL (:data:`hrm.bench.workloads.SFT_JSONL`,
    byte tokenizer) at ``bench``'s model, rows of ``bench.tokens`` and truncated backprop fixed
    at ``bench.bp_steps``, logging every step."""
    model = dataclasses.replace(bench.model, bp_min=bench.bp_steps, bp_max=bench.bp_steps)
    overrides = [f"--override={k}={v}" for k, v in model.to_dict().items()]
    return [
        sys.executable,
        "-m",
        "hrm",
        "train",
        "--data",
        str(SFT_JSONL),
        *overrides,
        "--batch-tokens",
        str(bench.tokens),
        "--too-long",
        "truncate",
        "--backend",
        backend,
        "--precision",
        precision,
        "--steps",
        str(steps),
        "--log-every",
        "1",
        "--out",
        str(out),
    ]


def loop_rows(bench: BenchConfig, steps: int = LOOP_STEPS) -> list[PackedBatch]:
    """The rows :func:`loop_command`'s ``hrm train`` trains on in its first ``steps`` steps, in
    order: the shipped JSONL under the byte tokenizer, packed by the training loader with the
    run's settings (rows of ``bench.tokens``, one per step, too-long samples truncated, the
    default seed)."""
    tokenizer = ByteTokenizer()
    samples, _ = read_jsonl(SFT_JSONL, tokenizer)
    loader = PackedLoader(
        samples, bench.tokens, seed=TrainConfig().seed, pad_id=tokenizer.pad_id, num_rows=1, too_long="truncate"
    )
    return [next(loader)[0] for _ in range(steps)]


def loop_throughput(records: list[dict], warmup: int = LOOP_WARMUP) -> tuple[list[float], float, float]:
    """``(seconds of each step, tokens per step, FLOPs per step)`` over the logged steps after
    ``warmup`` (each line logs one step: ``tokens`` and ``tokens_per_s``; ``flops`` is cumulative)."""
    steps = [r for r in records if "tokens_per_s" in r]
    timed = steps[warmup:]
    if not timed:
        raise ValueError(f"{len(steps)} logged steps, none after the {warmup} warm-up steps")
    seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
    tokens = sum(r["tokens"] for r in timed)
    flops = timed[-1]["flops"] - steps[warmup - 1]["flops"] if warmup else timed[-1]["flops"]
    return seconds, tokens / len(timed), flops / len(timed)


def loop_order(backends: list[str], rounds: int) -> list[str]:
    """The runs of :func:`run_loop` in order: ``rounds`` passes over ``backends``, every other
    pass reversed (``torch, cpu, cpu, torch``), so that a machine whose speed drifts during
    the bench (the 2-core VMs this project measures on drift by 10% within minutes) favours
    neither backend."""
    return [b for r in range(rounds) for b in (backends if r % 2 == 0 else backends[::-1])]


class LoopRun(NamedTuple):
    """One ``hrm train`` run of the loop case: :func:`loop_throughput` of its metrics, its stderr."""

    seconds: list[float]  # each timed step's
    tokens: float  # per timed step
    flops: float  # per timed step
    stderr: str


def _loop_once(bench: BenchConfig, backend: str, precision: str, steps: int, timeout: float | None) -> LoopRun:
    """One ``hrm train`` run of :func:`loop_command` at the default thread count
    (``OMP_NUM_THREADS`` unset), timed from its ``metrics.jsonl``."""
    from hrm.training.metrics import read_metrics

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            loop_command(bench, backend, precision, Path(tmp) / "run", steps),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(lines[-1] if lines else f"exit code {done.returncode}")
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
        return LoopRun(*loop_throughput(records, min(LOOP_WARMUP, steps - 1)), done.stderr)


def run_loop(
    name: str,
    bench: BenchConfig,
    backends: list[str],
    *,
    precision: str,
    steps: int = LOOP_STEPS,
    rounds: int = LOOP_ROUNDS,
    timeout: float | None = None,
) -> list[Row]:
    """One ``mode="loop"`` row per backend: :func:`loop_command` run as its own process at the
    default thread count (as a user runs it), ``rounds`` times per backend in the order of
    :func:`loop_order`, each process alone on the machine; timed from its own
    ``metrics.jsonl`` over the steps after warm-up, every timed step of every run counted
    (``extra["run_seconds"]``: each run's mean step)."""
    runs: dict[str, list[LoopRun]] = {b: [] for b in backends}
    errors: dict[str, str] = {}
    order = loop_order(backends, rounds)
    for i, backend in enumerate(order):
        if backend not in errors:
            _say(f"hrm train {i + 1}/{len(order)}: backend {backend}, {steps} steps")
            try:
                runs[backend].append(_loop_once(bench, backend, precision, steps, timeout))
            except (subprocess.TimeoutExpired, RuntimeError, ValueError, OSError) as e:
                errors[backend] = str(e)
    rows = []
    shape = f"hrm train, T={bench.tokens} bp={bench.bp_steps}" + (f", {rounds} runs" if rounds > 1 else "")
    dtype = DTYPE_NAMES[precision]
    for backend in backends:
        extra: dict = {"precision": PRECISION_NAMES[precision], "bp_steps": bench.bp_steps, "steps": steps}
        if backend in errors:
            extra["error"] = errors[backend]
            rows.append(Row("train", name, backend, "loop", shape, dtype, float("nan"), extra=extra))
            continue
        each = [s for r in runs[backend] for s in r.seconds]
        extra.update(runs=rounds, run_seconds=[sum(r.seconds) / len(r.seconds) for r in runs[backend]])
        banner = re.search(r"\((\d+) threads\).*, backend (\w+)", runs[backend][0].stderr)
        if banner:
            extra.update(threads=int(banner[1]), resolved_backend=banner[2])
        rows.append(
            Row(
                "train",
                name,
                backend,
                "loop",
                shape,
                dtype,
                sum(each) / len(each),  # the mean: tokens/s over all timed steps
                flops=sum(r.flops for r in runs[backend]) / rounds,
                tokens=round(sum(r.tokens for r in runs[backend]) / rounds),
                extra=extra,
                seconds_min=min(each),
                seconds_max=max(each),
            )
        )
    return rows


def target_lines(rows: list[Row]) -> list[str]:
    """One line per train-step target: met / missed, with the numbers (needs :func:`derive` first)."""
    train = {r.backend: r for r in rows if r.suite == "train" and r.mode == "step" and r.seconds == r.seconds}
    ref, comp = train.get("torch"), train.get(COMPILED_REFERENCE)
    fast = [r for b, r in train.items() if b not in ("torch", COMPILED_REFERENCE)]
    if ref is None or not fast:
        failed = [f"{r.backend}: {r.extra.get('error')}" for r in rows if r.suite == "train" and "error" in r.extra]
        return [
            "Train-step targets: not evaluated (need the torch reference and one fused backend)"
            + (f"; failed: {'; '.join(failed)}" if failed else "")
        ]
    best = min(fast, key=lambda r: r.seconds)

    def line(what: str, value: float | None, target: float, better_low: bool = False) -> str:
        if value is None:
            return f"- {what}: not measured"
        ok = value <= target if better_low else value >= target
        unit = "x" if "MFU" not in what else ""
        shown = f"{value:.1%}" if not unit else f"{value:.2f}x"
        goal = (
            f"{'<=' if better_low else '>='} {target:.0%}"
            if not unit
            else f"{'<=' if better_low else '>='} {target:.1f}x"
        )
        return f"- {what}: {shown} (target {goal}): {'met' if ok else 'MISSED'}"

    lines = [f"Train-step targets, fastest fused backend `{best.backend}` ({best.tokens_per_s:.0f} tokens/s):"]
    lines.append(line("speedup vs torch reference", ref.seconds / best.seconds, TARGETS["speedup_vs_torch"]))
    lines.append(
        line(
            f"speedup vs {COMPILED_REFERENCE}",
            comp.seconds / best.seconds if comp else None,
            TARGETS["speedup_vs_compile"],
        )
    )
    peak = "bf16" if best.dtype == "bfloat16" else "fp32"
    lines.append(line(f"MFU vs measured {peak} matmul peak", best.frac_peak, TARGETS["mfu"]))
    mem = best.peak_mem_mb / ref.peak_mem_mb if best.peak_mem_mb and ref.peak_mem_mb else None
    lines.append(line("peak tensor memory vs torch reference", mem, TARGETS["memory_vs_torch"], better_low=True))
    rss, rss_ref = best.extra.get("rss_peak_mb"), ref.extra.get("rss_peak_mb")
    if rss and rss_ref:
        lines.append(
            f"- peak resident memory vs torch reference: {rss / rss_ref:.2f}x (for reference; it also "
            "counts what the compilers and malloc keep)"
        )
    loops = {r.backend: r for r in rows if r.suite == "train" and r.mode == "loop" and r.seconds == r.seconds}
    fast_loops = [r for b, r in loops.items() if b != "torch"]
    if "torch" in loops and fast_loops:
        loop = fast_loops[0]
        lines.append(
            line(
                f"training loop (`hrm train`, {loop.extra.get('threads', '?')} threads) `{loop.backend}` vs torch",
                loops["torch"].seconds / loop.seconds,
                TARGETS["loop_speedup_vs_torch"],
            )
        )
    for r in loops.values():
        ratio = r.extra.get("loop_vs_step")
        if ratio is not None:
            ok = ratio >= 1 - TARGETS["loop_vs_step_loss"]
            lines.append(
                f"- `hrm train` tokens/s over the bench step's on the same rows, `{r.backend}`: {ratio:.2f}x "
                f"(target >= {1 - TARGETS['loop_vs_step_loss']:.2f}x): {'met' if ok else 'MISSED'}"
            )
    for r in rows:
        if r.suite == "train" and "error" in r.extra:
            lines.append(f"- {r.backend} ({r.mode}): FAILED: {r.extra['error']}")
    return lines


if __name__ == "__main__":  # the train-step child process (see _run_child)
    retain_freed_memory()  # as hrm's commands do (hrm.heap)
    print(json.dumps(train_child(json.loads(sys.argv[1]))))
