"""pytest-benchmark suites over the same cases as ``hrm bench``: every fused op (forward,
backward alone, forward + backward; the forward alone for generation's decode attention and
gradient clipping's norm)
and the train step, on every available backend, the ``torch`` reference included, each
test recording its parity error next to its timing
(``extra_info``) and failing when the error exceeds the case's tolerance.

    pytest bench/test_benchmarks.py [--hrm-config bench] [--hrm-tokens N] [--benchmark-json out.json]
                                    [-k "attention and cpu"]

Compare backends with pytest-benchmark's own tables (``--benchmark-group-by=group``: one
group per op and mode, or the train step). ``hrm bench`` runs the same cases with roofline
context, a markdown report and plots; this file is for pytest-benchmark's tooling (saved
runs, ``--benchmark-compare``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hrm import HRMText
from hrm.bench import suites
from hrm.bench.workloads import train_batch
from hrm.config import BENCH_CONFIGS, BenchConfig
from hrm.precision import resolve_precision

OPS = [
    "embedding",
    "rms_norm",
    "add_rms_norm",
    "magicnorm_transition",
    "swiglu",
    "split_rope",
    "prefixlm_attention",
    "swiglu_linear",
    "linear_cross_entropy",
    "decode_attention",
    "global_norm",
]
INFERENCE_ONLY = {"decode_attention", "global_norm"}  # no backward: the forward alone


@pytest.fixture(scope="session")
def bench_config(request) -> BenchConfig:
    bench = BENCH_CONFIGS[request.config.getoption("--hrm-config")]
    tokens = request.config.getoption("--hrm-tokens")
    return dataclasses.replace(bench, tokens=tokens) if tokens else bench


@pytest.fixture(scope="session")
def op_cases(bench_config) -> dict[str, suites.OpCase]:
    cases = {case.name: case for case in suites.op_cases(bench_config)}
    assert sorted(cases) == sorted(OPS), "OPS must list every case of hrm.bench.suites.op_cases"
    assert {n for n, c in cases.items() if c.inference_only} == INFERENCE_ONLY
    return cases


@pytest.mark.parametrize(
    "op,backend,mode",
    [
        (op, b, mode)
        for op in OPS
        for b in suites.bench_backends(op)
        for mode in (("forward",) if op in INFERENCE_ONLY else ("forward", "backward", "full"))
    ],
)
def test_op(benchmark, op_cases, op, backend, mode):
    case = op_cases[op]
    run = suites.op_run(case, backend)
    benchmark.group = f"{op} {mode}"
    benchmark.extra_info.update(
        shape=case.shape, dtype="float32", tolerance=case.tolerance, parity=suites.op_parity(case, run.inputs, backend)
    )
    if mode == "backward":

        def setup():
            outs = run.forward_with_grad()
            return (outs, run.leaves, [torch.ones_like(o) for o in outs]), {}

        benchmark.pedantic(torch.autograd.grad, setup=setup, rounds=5, warmup_rounds=1)
    else:
        benchmark(run.forward if mode == "forward" else run.full)
    assert benchmark.extra_info["parity"] <= case.tolerance


@pytest.mark.parametrize("backend", suites.bench_backends("adam_atan2"))
def test_adam_atan2(benchmark, bench_config, backend):
    step, parity, tensors, n = suites.adam_atan2_run(bench_config, backend)
    benchmark.group = "adam_atan2 step"
    benchmark.extra_info.update(
        tensors=tensors, values=n, dtype="float32", parity=parity, tolerance=suites.OP_TOLERANCE
    )
    benchmark(step)
    assert parity <= suites.OP_TOLERANCE


@pytest.mark.parametrize("label,backend,compiled", suites.train_variants())
def test_train_step(benchmark, bench_config, label, backend, compiled):
    """One train step (at the precision ``auto`` picks here, Adam-atan2) in this process; its
    first loss is checked against the torch reference's."""
    batch = train_batch(bench_config)
    tolerance = suites.LOSS_TOLERANCE[resolve_precision("auto", batch.input_ids.device)]
    torch.manual_seed(0)
    model = HRMText(bench_config.model, backend=backend)
    reference = HRMText(bench_config.model, backend="torch")
    reference.load_state_dict(model.state_dict())
    want = float(suites.make_train_step(reference, batch, bench_config.bp_steps)[0]())
    step, _ = suites.make_train_step(model, batch, bench_config.bp_steps, compiled=compiled)
    loss = float(step())  # warm-up: compiles
    benchmark.group = f"train step {bench_config.tokens} tokens"
    benchmark.extra_info.update(tokens=batch.num_tokens, parity=abs(loss - want) / abs(want), tolerance=tolerance)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert benchmark.extra_info["parity"] <= tolerance
