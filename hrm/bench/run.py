"""``hrm bench``: measure this device's peaks, run the suites, write the results and the report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from hrm.bench import suites
from hrm.bench.device import device_info, device_slug
from hrm.bench.generation import generate_lines, run_generate
from hrm.bench.report import Row, derive, markdown_table, plot, plural, write_results
from hrm.bench.timing import copy_bandwidth_gbps, matmul_peak_gflops
from hrm.config import BENCH_CONFIGS, BenchConfig
from hrm.errors import ConfigError
from hrm.precision import resolve_precision


def measure_peaks(device: torch.device, quick: bool, bf16: bool = True) -> dict[str, float]:
    """This device's practical matmul peak in fp32 (and, with ``bf16``, in bf16) and its copy
    bandwidth (best of a few). The bf16 peak is measured only where a row runs bf16: a CPU
    without bf16 instructions multiplies bf16 matrices around 100x slower than fp32 (minutes)."""
    reps = 3 if quick else 5
    peaks = {"matmul_gflops_float32": matmul_peak_gflops(torch.float32, device, reps=reps)}
    if bf16:
        peaks["matmul_gflops_bfloat16"] = matmul_peak_gflops(torch.bfloat16, device, reps=reps)
    return {**peaks, "copy_gbps": copy_bandwidth_gbps(device, reps=reps)}


def measure_copy_peaks(rows: list[Row], device: torch.device, min_time: float = 0.05) -> None:
    """Set ``extra["copy_gbps"]`` of every memory-bound row to the bandwidth of a plain copy of
    its own working set (source + destination = the row's bytes), so that an op whose data
    fits in a cache is compared to a copy that fits there too, not to a 256 MiB one."""
    measured: dict[float, float] = {}
    for r in rows:
        if r.bytes and not r.flops:
            if r.bytes not in measured:
                measured[r.bytes] = copy_bandwidth_gbps(device, mib=r.bytes / 2 / 2**20, reps=3, min_time=min_time)
            r.extra["copy_gbps"] = measured[r.bytes]


def quick_ops_config(bench: BenchConfig) -> BenchConfig:
    """The op shapes of ``--quick``: the same model, a shorter row."""
    tokens = min(bench.tokens, suites.QUICK_OP_TOKENS)
    return BenchConfig(
        bench.model, tokens, bench.supervised_fraction, bench.bp_steps, min(bench.median_seq_len, tokens // 4)
    )


def run_bench(
    suite: str = "all",
    *,
    config: str | BenchConfig = "bench",
    quick: bool = False,
    out: str | os.PathLike = "bench/results",
    reps: int | None = None,
    backends: list[str] | None = None,
    ops_config: BenchConfig | None = None,
    device: torch.device | str | None = None,
    train_warmup: int = 1,
    op_min_time: float = suites.OP_MIN_TIME,
    plots: bool = True,
    precision: str = "auto",
    loop_steps: int = suites.LOOP_STEPS,
    loop_rounds: int | None = None,
) -> dict[str, Path]:
    """Run ``suite`` (``ops``, ``train``, ``all`` = both, or ``generate``) and write
    ``OUT/<device-slug>.{json,md,png}``.

    ``generate`` (:mod:`hrm.bench.generation`) times greedy generation at preset ``small``
    against ``transformers``; it is not part of ``all`` (each compiled variant compiles for
    about a minute on a CPU).

    ``config`` names a :data:`~hrm.config.BENCH_CONFIGS` entry (or is one); ``ops_config``
    overrides the op shapes (``quick`` shrinks them otherwise). Each train step is timed
    after its first step (which compiles) and ``train_warmup`` more, at ``precision``
    (``auto``: what ``hrm train`` picks on this device; at bf16 the ops are timed in bf16 too,
    beside fp32); then ``hrm train`` itself runs
    ``loop_steps`` steps on the reference and the fastest backend (0: not at all), ``loop_rounds``
    times each in alternating order (default :data:`~hrm.bench.suites.LOOP_ROUNDS`, 1 with ``quick``).
    """
    if isinstance(config, str):
        if config not in BENCH_CONFIGS:
            raise ConfigError(f"unknown bench config {config!r}; known: {', '.join(BENCH_CONFIGS)}")
        name, bench = config, BENCH_CONFIGS[config]
    else:
        name, bench = "custom", config
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = reps or (2 if quick else 5)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    info = device_info(device)
    train_precision = resolve_precision(precision, device)
    peaks = measure_peaks(device, quick, bf16=suite != "generate" and train_precision == "bf16")
    rows: list[Row] = []
    if suite in ("ops", "all"):
        op_bench = ops_config or (quick_ops_config(bench) if quick else bench)
        rows += suites.run_ops(
            op_bench,
            reps=reps,
            device=device,
            backends=backends,
            min_time=op_min_time,
            dtypes=(torch.float32, torch.bfloat16) if train_precision == "bf16" else (torch.float32,),
        )
    if suite in ("train", "all"):
        rows += suites.run_train(
            name,
            bench,
            reps=reps,
            warmup=train_warmup,
            device=device,
            backends=backends,
            precision=train_precision,
            loop_steps=loop_steps,
            loop_rounds=loop_rounds or (1 if quick else suites.LOOP_ROUNDS),
        )
    if suite == "generate":
        rows += run_generate(reps=reps, device=device)
    measure_copy_peaks(rows, device)
    derive(rows, peaks)
    out = Path(out)
    stem = out / (device_slug(info) + ("-generate" if suite == "generate" else ""))
    settings = {
        "suite": suite,
        "config": name,
        "bench": suites.bench_to_dict(bench),
        "quick": quick,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "precision": train_precision,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "backends": suites.bench_backends(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": time.perf_counter() - started,
    }
    paths = {"json": write_results(stem.with_suffix(".json"), info, peaks, rows, settings)}
    report = markdown_table(info, peaks, [r for r in rows if r.suite != "generate"])
    if any(r.suite == "train" for r in rows):
        report += "\n".join(suites.target_lines(rows)) + "\n"
    if any(r.suite == "generate" for r in rows):
        report += "\n".join(generate_lines(rows)) + "\n"
    report += (
        f"\n{'quick' if quick else 'full'} run, {plural(reps, 'rep')} at least, "
        f"{plural(torch.get_num_threads(), 'thread')}, "
        f"{settings['seconds']:.0f} s; load average {load_before:.1f} before, "
        f"{settings['load_average_after']:.1f} after (other processes on these cores slow every row)\n"
    )
    paths["md"] = stem.with_suffix(".md")
    paths["md"].write_text(report)
    if plots and suite != "generate":  # the generate suite is one table
        paths["png"] = plot(rows, stem.with_suffix(".png"))
    return paths
