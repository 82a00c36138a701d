"""``hrm bench`` and ``hrm profile``: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from hrm.config import BENCH_CONFIGS

    p = sub.add_parser(
        "bench",
        help="benchmark every op and the train step on every backend; write a report",
        description="Time every fused op (forward / backward / full) and the train step on every "
        "available backend next to the torch reference, with parity errors and roofline "
        "context; writes OUT/<device>.json, .md and .png.",
    )
    p.add_argument(
        "--suite",
        choices=["ops", "train", "all", "generate"],
        default="all",
        help="all = ops + train; generate: greedy generation at preset small vs transformers (not in all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller op shapes and fewer repetitions (the train step stays at the bench config)",
    )
    p.add_argument("--config", default="bench", choices=sorted(BENCH_CONFIGS), help="benchmark config (shapes)")
    p.add_argument("--backends", help="comma-separated subset of backends (and torch+compile) to time")
    p.add_argument("--reps", type=int, help="timed repetitions (default 5, quick 2)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads for every suite (default: torch's choice; "
        "1 is steadier on cores shared with other processes)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="train-step precision (default auto: what hrm train picks here, bf16 autocast on GPUs with "
        "bf16 tensor cores and on CPUs with AMX-BF16, fp32 elsewhere); at bf16 the ops suite times every "
        "op in bf16 as well as in fp32",
    )
    p.add_argument("--out", default="bench/results", help="results directory (default: bench/results)")
    p.set_defaults(func=run_bench)

    p = sub.add_parser(
        "profile",
        help="profile train steps: Chrome trace + time per named range; Nsight",
        description="Run train steps under torch.profiler; write OUT/trace.json and OUT/ranges.md "
        "(time per named range, compared to the measured step time). --nsys / --ncu run "
        "Nsight Systems / Compute around the steady-state steps instead.",
    )
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--preset",
        default="bench",
        help="a benchmark config (hrm.config.BENCH_CONFIGS) or a model preset (hrm.config.PRESETS)",
    )
    p.add_argument("--tokens", type=int, help="tokens in the packed row (default: the config's, or 1024)")
    p.add_argument("--bp-steps", type=int, help="truncated-backprop steps (default: the config's)")
    p.add_argument("--backend", default="auto", help="kernel backend (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    p.add_argument("--nsys", action="store_true", help="run under Nsight Systems (NVTX ranges, CUDA profiler range)")
    p.add_argument("--ncu", action="store_true", help="run under Nsight Compute (kernels inside the NVTX ranges)")
    p.add_argument("--ncu-range", default="H1", help="NVTX range whose kernels --ncu profiles (default: H1)")
    p.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)  # the process Nsight runs
    p.set_defaults(func=run_profile)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from hrm.bench.run import run_bench as run

    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b] if args.backends else None
    paths = run(
        args.suite,
        config=args.config,
        quick=args.quick,
        out=args.out,
        reps=args.reps,
        backends=backends,
        precision=args.precision,
    )
    print(Path(paths["md"]).read_text())
    print(f"hrm bench: wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from hrm.bench import profile

    t0 = time.perf_counter()
    result = profile.main(args)
    if result is not None and not args.capture:
        print(result["table"])
        print(f"hrm profile: wrote {result['trace']} and {result['ranges']} ({time.perf_counter() - t0:.0f} s)")
    return 0
