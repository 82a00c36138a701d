"""``hrm bench``: the suites run on tiny shapes and time every available backend next to the
reference, with parity inside tolerance (never speed: these machines are shared)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from hrm import cli
from hrm.bench import suites
from hrm.bench.report import charts, derive, plural, read_results
from hrm.bench.run import run_bench
from hrm.config import BENCH_CONFIGS, BenchConfig, ModelConfig
from hrm.errors import ConfigError

TINY = BenchConfig(
    ModelConfig(vocab_size=260, hidden_size=64, num_heads=2, n_layers=2, max_seq_len=512), tokens=128, median_seq_len=20
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # Every backend; the whole-model torch.compile baseline (minutes of compiling) is left to `hrm bench`.
    paths = run_bench(
        "all",
        config=TINY,
        quick=True,
        out=out,
        reps=1,
        ops_config=TINY,
        train_warmup=0,
        op_min_time=0.0,
        backends=suites.bench_backends(),
        loop_steps=3,
    )
    return paths, read_results(paths["json"])


def test_writes_results_table_and_plot(results):
    paths, (device, peaks, rows, settings) = results
    assert paths["json"].name == paths["md"].stem + ".json" and paths["png"].stat().st_size > 0
    doc = json.loads(paths["json"].read_text())
    assert {"device", "peaks", "settings", "rows"} <= set(doc)
    assert {"name", "torch", "git_commit"} <= set(device)
    assert {"matmul_gflops_float32", "copy_gbps"} <= set(peaks)
    # the bf16 peak only where a row runs bf16 (a CPU without bf16 instructions takes minutes)
    assert ("matmul_gflops_bfloat16" in peaks) == (settings["precision"] == "bf16")
    table = paths["md"].read_text()
    assert "| op | mode |" in table and "Train-step targets" in table


def test_op_rows_for_every_backend_within_tolerance(results):
    """Every op in fp32, and in bf16 as well where the run's precision is bf16 (but the ops that
    stay fp32 under autocast)."""
    _, (_, _, rows, settings) = results
    op_rows = [r for r in rows if r.suite == "ops"]
    assert {r.dtype for r in op_rows} == ({"float32", "bfloat16"} if settings["precision"] == "bf16" else {"float32"})
    for case in suites.op_cases(TINY):
        for backend in suites.bench_backends(case.name):
            got = {r.mode: r for r in op_rows if r.name == case.name and r.backend == backend and r.dtype == "float32"}
            modes = {"forward"} if case.inference_only else {"forward", "backward", "full"}
            assert set(got) == modes, (case.name, backend)
            for r in got.values():
                assert r.parity <= r.tolerance, (case.name, backend, r.mode, r.parity)
                if r.mode != "backward" or case.bwd_flops or case.bwd_bytes:  # roofline context
                    assert r.frac_peak is not None and (r.gflops or r.gbps), (case.name, backend, r.mode)
                assert r.speedup is not None  # the reference ran in the same run


def test_train_rows_for_every_variant(results):
    _, (_, _, rows, settings) = results
    train = {r.backend: r for r in rows if r.suite == "train" and r.mode == "step"}
    assert set(train) == {label for label, _, _ in suites.train_variants(suites.bench_backends())}
    for b, r in train.items():
        assert r.peak_mem_mb > 0 and r.extra["rss_peak_mb"] > 0, b
        assert "error" not in r.extra, (b, r.extra.get("error"))
        assert r.parity <= r.tolerance, (b, r.parity)
        assert r.tokens_per_s > 0 and r.flops > 0 and r.frac_peak is not None
        assert r.dtype == ("bfloat16" if settings["precision"] == "bf16" else "float32")
    fastest = min(
        (r for b, r in train.items() if b not in ("torch", suites.COMPILED_REFERENCE)), key=lambda r: r.seconds
    )
    one_thread = {r.backend: r for r in rows if r.mode == suites.ONE_THREAD}
    if settings["threads"] > 1:  # the reference and the fastest backend again on one core
        assert set(one_thread) == {"torch", fastest.backend}
        assert all(r.tokens_per_s > 0 and r.speedup is not None for r in one_thread.values())
    else:
        assert not one_thread


def test_loop_rows_run_hrm_train_on_the_shipped_data(results):
    """``hrm train`` itself, on the reference and the fastest backend, at the default thread
    count; each row next to its own backend's bench step on the same rows (the loop's third:
    the loop case here runs 3 steps, 2 of them warm-up), which trains on as many tokens and
    does as much useful work."""
    _, (_, _, rows, _) = results
    step = {r.backend: r for r in rows if r.suite == "train" and r.mode == suites.LOOP_ROWS}
    loops = {r.backend: r for r in rows if r.mode == "loop"}
    assert "torch" in loops and len(loops) == 2, loops
    assert set(step) == set(loops)
    for b, r in loops.items():
        assert "error" not in r.extra and "error" not in step[b].extra, (b, r.extra, step[b].extra)
        assert r.extra["resolved_backend"] == b and r.extra["threads"] >= 1
        assert r.tokens_per_s > 0 and r.flops > 0 and r.speedup is not None
        assert (r.tokens, r.flops) == (step[b].tokens, pytest.approx(step[b].flops)), b  # the same row
        want = r.tokens_per_s / step[b].tokens_per_s
        assert r.extra["loop_vs_step"] == pytest.approx(want), b


def test_loop_rows_are_the_rows_hrm_train_packs():
    """:func:`loop_rows` follows the training loader: its rows are full rows of the shipped
    JSONL, different from step to step, and the same on every call."""
    rows = suites.loop_rows(TINY, 4)
    again = suites.loop_rows(TINY, 4)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rows, again))
    assert len({tuple(r.input_ids.tolist()) for r in rows}) == 4
    assert all(r.input_ids.shape == (TINY.tokens,) and 0 < r.num_supervised < r.num_tokens for r in rows)


def test_loop_runs_alternate_and_pool_their_steps(monkeypatch):
    """Each backend's ``hrm train`` runs ``rounds`` times in the order torch, cpu, cpu, torch
    (a machine that drifts favours neither); a row counts every timed step of its runs, and a
    backend whose run fails gets an error row and no more runs."""
    assert suites.loop_order(["torch", "cpu"], 1) == ["torch", "cpu"]
    assert suites.loop_order(["torch", "cpu"], 3) == ["torch", "cpu", "cpu", "torch", "torch", "cpu"]
    calls = []
    step_seconds = {"torch": iter([[4.0, 2.0], [3.0, 3.0]]), "cpu": iter([[1.0, 1.0], [0.5, 0.5]])}

    def once(bench, backend, precision, steps, timeout):
        calls.append(backend)
        if backend == "broken":
            raise RuntimeError("no such backend")
        return suites.LoopRun(next(step_seconds[backend]), 100.0, 1000.0, "hrm train (2 threads), backend " + backend)

    monkeypatch.setattr(suites, "_loop_once", once)
    rows = suites.run_loop("tiny", TINY, ["torch", "cpu", "broken"], precision="fp32", steps=4, rounds=2)
    assert calls == ["torch", "cpu", "broken", "cpu", "torch"]
    torch_row, cpu_row, broken = rows
    assert (torch_row.seconds, torch_row.seconds_min, torch_row.seconds_max) == (3.0, 2.0, 4.0)
    assert torch_row.extra["run_seconds"] == [3.0, 3.0] and cpu_row.extra["run_seconds"] == [1.0, 0.5]
    assert cpu_row.seconds == 0.75 and (cpu_row.tokens, cpu_row.flops) == (100, 1000.0)
    assert cpu_row.extra["threads"] == 2 and cpu_row.extra["resolved_backend"] == "cpu"
    assert broken.seconds != broken.seconds and broken.extra["error"] == "no such backend"


def test_loop_throughput_counts_only_steps_after_warm_up():
    records = [
        {"step": 1, "tokens": 100, "tokens_per_s": 10.0, "flops": 1000},  # warm-up: 10 s
        {"step": 2, "tokens": 100, "tokens_per_s": 100.0, "flops": 2000},
        {"step": 3, "tokens": 300, "tokens_per_s": 100.0, "flops": 3500},
        {"step": 3, "eval_loss": 1.0, "flops": 3500},  # an evaluation line is not a step
    ]
    seconds, tokens, flops = suites.loop_throughput(records, warmup=1)
    assert (seconds, tokens, flops) == ([1.0, 3.0], 200.0, 1250.0)
    with pytest.raises(ValueError, match="none after"):
        suites.loop_throughput(records[:1], warmup=1)


def test_shipped_sft_data_is_the_generators_and_sft_like():
    """The loop case's JSONL is exactly what ``python -m hrm.bench.workloads`` writes, with
    packed lengths log-normal around 270 tokens under the byte tokenizer."""
    import statistics

    from hrm.bench.workloads import SFT_JSONL, sft_records
    from hrm.data import load_tokenizer, read_jsonl

    assert SFT_JSONL.read_text() == "".join(json.dumps(r) + "\n" for r in sft_records())
    samples, stats = read_jsonl(SFT_JSONL, load_tokenizer("byte"))
    lengths = [s.packed_len for s in samples]
    assert len(samples) == stats.read == 512
    assert 250 <= statistics.median(lengths) <= 290 and min(lengths) >= 8 and max(lengths) < 4096
    supervised = sum(len(s.response) - 1 for s in samples) / sum(lengths)
    assert 0.45 <= supervised <= 0.55


def test_child_peak_memory_is_its_own():
    """A variant's peak is its own process's, not its parent's: on Linux ``ru_maxrss`` carries
    the parent's resident size across fork and exec, so a bench run that has grown (the ops
    suite runs first) made every variant read as the idle baseline."""
    import torch

    ballast = torch.ones(256 << 20)  # 1 GiB resident in this (the parent) process
    idle = suites._run_child(
        {"device": "cpu", "bench": suites.bench_to_dict(TINY), "reps": 1, "warmup": 0, "threads": 1, "variant": None},
        timeout=120,
    )
    assert idle["rss_bytes"] < ballast.numel() * ballast.element_size() // 2


def test_step_peak_bytes_counts_what_a_step_holds_at_once():
    import torch

    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(2 << 20)  # 8 MiB, while a is alive
        del a, b
        torch.ones(3 << 20)  # 12 MiB alone

    peak = suites.step_peak_bytes(step)
    assert 12 << 20 <= peak < (12 << 20) + (1 << 16)
    w = torch.ones(10)
    assert suites.held_bytes(w, w[2:], torch.ones(5)) == 60


def test_train_flops_count_only_grad_steps():
    from hrm.bench.workloads import train_batch

    batch = train_batch(TINY)
    full, short = suites.train_flops(TINY.model, batch, 5), suites.train_flops(TINY.model, batch, 2)
    assert full > short > 0


@pytest.mark.parametrize("tokens", [1, 2, 16, 512])
def test_train_batch_is_never_empty(tokens):
    """A row shorter than the first drawn sequence (the log-normal lengths centre on 20 here
    and 270 at the bench config) holds that sequence cut to the row, not nothing."""
    from hrm.bench.workloads import train_batch

    for bench in (TINY, BENCH_CONFIGS["bench"]):
        batch = train_batch(dataclasses.replace(bench, tokens=tokens))
        assert batch.num_tokens > 0 and batch.num_supervised > 0, (bench.tokens, tokens)
        assert batch.num_tokens <= tokens
    with pytest.raises(ConfigError, match="at least 1 token, got 0"):
        train_batch(dataclasses.replace(TINY, tokens=0))


def test_cli_registers_bench_and_profile():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--suite", "ops", "--quick"])
    assert args.suite == "ops" and args.quick and args.out == "bench/results"
    args = parser.parse_args(["profile", "--steps", "2", "--out", "x", "--nsys"])
    assert args.steps == 2 and args.nsys


@pytest.mark.slow
def test_pytest_benchmark_suites_run(tmp_path):
    """bench/test_benchmarks.py (the pytest-benchmark view of the same cases) collects every
    op, backend and mode, and a subset runs once each with its parity asserted."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(root / "bench" / "test_benchmarks.py"),
        "--hrm-tokens",
        "1024",
    ]
    listed = subprocess.run([*base, "--collect-only"], capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout[-2000:]
    for backend in suites.bench_backends("prefixlm_attention"):
        assert f"test_op[prefixlm_attention-{backend}-full]" in listed.stdout
    ran = subprocess.run(
        [*base, "--benchmark-disable", "-k", "add_rms_norm or adam_atan2 or (train_step and not True)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout[-2000:]
    assert " passed" in ran.stdout and "failed" not in ran.stdout


def test_rows_carry_their_spread_and_their_own_copy_peak(results):
    """Every row: median within its fastest-slowest; a memory-bound op is compared to a copy of
    its own working set, and one faster than that copy is marked cache-resident."""
    paths, (_, _, rows, _) = results
    for r in rows:
        assert r.seconds_min <= r.seconds <= r.seconds_max, (r.name, r.backend, r.mode)
        if r.suite == "ops" and r.bytes and not r.flops:
            assert r.extra["copy_gbps"] > 0
            assert r.frac_peak == pytest.approx(r.gbps / r.extra["copy_gbps"])
            assert r.extra.get("cache_resident", False) == (r.frac_peak > 1)
    md = paths["md"].read_text()
    assert re.search(r"\| rms_norm \| full \| .* \| \d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\) \|", md)
    assert re.search(r"\| adam_atan2 \| full \| \d+ tensors, \d+ values \|", md)
    assert not re.search(r"\b1 (threads|reps|cores)\b", md)


def test_linear_cross_entropy_backward_row_carries_the_note(results):
    paths, (_, _, rows, _) = results
    noted = {(r.name, r.mode) for r in rows if r.extra.get("note")}
    assert ("linear_cross_entropy", "backward") in noted and {name for name, _ in noted} == {"linear_cross_entropy"}
    md = paths["md"].read_text()
    assert re.search(r"\| linear_cross_entropy \| backward \[1\] \|", md)
    assert "[1] linear_cross_entropy: the fused backends compute the gradients in the forward" in md


def test_one_chart_per_suite_with_a_label_per_bar(results):
    _, (_, _, rows, _) = results
    both = charts(rows)
    assert [c.xlabel for c in both] == ["speedup (x)", "tokens/s"]
    train = [r for r in rows if r.suite == "train"]
    assert len(set(both[1].labels)) == len(both[1].labels) == len(train)  # step, 1-thread and loop bars apart
    ops_only = charts([r for r in rows if r.suite == "ops" and r.dtype == "float32"])
    full = [r for r in rows if r.suite == "ops" and r.mode == "full" and r.dtype == "float32"]
    assert len(ops_only) == 1 and ops_only[0].labels == [f"{r.name} ({r.backend})" for r in full]
    assert len(set(ops_only[0].labels)) == len(full) and all(v > 0 for v in ops_only[0].values)


def test_op_rows_in_bf16_next_to_fp32():
    """The ops suite in bf16 (what a bf16 run adds): a row per op that autocast runs in bf16,
    with the reference's own bf16 error (times REF_FACTOR, plus the floor) as its tolerance,
    the bytes of 2-byte elements, its speedup over the reference in the same dtype, and charts
    whose labels say which dtype each bar is."""
    backends = [b for b in ("torch", "cpu") if b in suites.bench_backends()]
    rows = suites.run_ops(TINY, reps=1, min_time=0.0, backends=backends, dtypes=(torch.float32, torch.bfloat16))
    derive(rows, {"matmul_gflops_float32": 1.0, "matmul_gflops_bfloat16": 1.0, "copy_gbps": 1.0})
    by = {(r.name, r.mode, r.backend, r.dtype): r for r in rows if r.suite == "ops"}
    cases = suites.op_cases(TINY)
    assert {c.name for c in cases if c.fp32_only} == {"embedding", "global_norm"}
    for case in cases:
        for backend in backends:
            if backend not in suites.bench_backends(case.name):
                continue
            fp32, bf16 = (
                by.get((case.name, "forward", backend, "float32")),
                by.get((case.name, "forward", backend, "bfloat16")),
            )
            assert fp32 is not None, (case.name, backend)
            if case.fp32_only:
                assert bf16 is None, case.name
                continue
            assert bf16 is not None, (case.name, backend)
            assert bf16.parity <= bf16.tolerance and bf16.tolerance >= suites.LOW_PRECISION_FLOOR[torch.bfloat16]
            assert bf16.tolerance > fp32.tolerance and bf16.speedup is not None, case.name
            if case.name in ("rms_norm", "swiglu", "magicnorm_transition"):  # all of their traffic is in the op's dtype
                assert bf16.bytes == fp32.bytes / 2, case.name
    labels = charts(rows)[0].labels
    assert "swiglu_linear (torch, bfloat16)" in labels and "swiglu_linear (torch, float32)" in labels


def test_plural():
    assert [plural(n, "thread") for n in (0, 1, 2)] == ["0 threads", "1 thread", "2 threads"]


def test_generate_case_checks_parity_against_transformers_full_forward():
    """The generate suite's machinery on a tiny preset (the compiled variant, which compiles for a
    while, is covered by tests/test_inference.py)."""
    pytest.importorskip("transformers")
    from hrm.bench.generation import generate_lines, run_generate

    variants = ("transformers", "eager")
    rows = run_generate("tiny", batch=3, prompt_len=5, new_tokens=4, reps=1, backend="torch", variants=variants)
    assert [r.backend for r in rows] == ["transformers", "eager"]
    assert all(r.suite == "generate" and r.tokens == 12 and r.seconds > 0 for r in rows)
    assert rows[1].parity == 0  # our tokens equal transformers' full-forward argmax
    table = generate_lines(rows)
    assert table[2].startswith("| tiny | 3x5+4 | transformers | fp32 |") and "0 of 12" in table[3]


def test_generate_parity_of_a_bf16_run_separates_near_ties_from_wrong_tokens(monkeypatch):
    """``_parity`` on hand-made logits: a token that trails the argmax by less than the bf16
    tolerance counts as a mismatch only; one that trails by more counts beyond it."""
    from hrm.bench import generation

    exact = torch.tensor([[[0.0, 1.0, 0.99, -5.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]])
    rounded = exact + 0.02  # the bf16 forward: off by at most 0.02, so the tolerance is 0.04
    calls = iter([exact, rounded])
    monkeypatch.setattr(generation, "_full_forward_logits", lambda *args: next(calls).clone())
    tokens = torch.tensor([[2, 1, 2]])  # a near-tie (0.01 behind), a wrong token (2.0 behind), the argmax
    out = generation._parity(None, None, tokens, 4, "bf16")
    assert out["mismatched"] == 2 and out["beyond_tolerance"] == 1
    assert out["logit_tolerance"] == pytest.approx(0.04)
