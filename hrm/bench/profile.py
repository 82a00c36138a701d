"""``hrm profile``: train steps under ``torch.profiler`` (Chrome trace + time per named range),
or under Nsight Systems / Nsight Compute with NVTX ranges.

The named ranges come from :func:`hrm.profiling.range`: the train step's ``forward``,
``backward``, ``optimizer``; inside the model ``embed``, one range per stack call (``L0.0``
.. ``L0.2``, ``H0``, ``L1.0`` .. ``H1``), ``attn``, ``mlp``, ``norm`` and ``loss``. The table
gives each range's inclusive time per step; the top-level ranges (those inside no other
named range) add up to the step, and their total is compared to the step time measured
around the profiled steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hrm import HRMText, profiling
from hrm.bench.report import plural
from hrm.bench.suites import PRECISION_NAMES, make_train_step
from hrm.bench.workloads import train_batch
from hrm.config import BENCH_CONFIGS, PRESETS, BenchConfig
from hrm.errors import ConfigError, HrmError
from hrm.precision import resolve_precision

DEFAULT_TOKENS = 1024  # the packed row of a model preset (the bench configs name their own)
# what the profiler's native library (kineto) writes to stderr at every start and stop
PROFILER_CHATTER = re.compile(r"^(USDT|STAGE):")


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = PROFILER_CHATTER):
    """Run the block with file descriptor 2 in a temporary file, then copy to stderr the lines
    that do not match ``noise``: native libraries write there directly, past ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not noise.match(ln)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def bench_config(preset: str, tokens: int | None = None, bp_steps: int | None = None) -> BenchConfig:
    """A bench config by name, or a model preset in one packed row of ``tokens``."""
    if preset in BENCH_CONFIGS:
        bench = BENCH_CONFIGS[preset]
    elif preset in PRESETS:
        bench = BenchConfig(PRESETS[preset], tokens or DEFAULT_TOKENS)
    else:
        raise ConfigError(
            f"unknown preset {preset!r}; bench configs: {', '.join(BENCH_CONFIGS)}; model presets: {', '.join(PRESETS)}"
        )
    changes = {k: v for k, v in (("tokens", tokens), ("bp_steps", bp_steps)) if v is not None}
    if changes.get("tokens", bench.tokens) < 2:
        raise ConfigError("--tokens must be at least 2")
    return BenchConfig(**{**{f: getattr(bench, f) for f in BenchConfig.__dataclass_fields__}, **changes})


@dataclass
class RangeStat:
    name: str
    depth: int  # nesting among named ranges (0: top level)
    calls: int
    seconds: float  # inclusive, summed over all calls


def range_stats(events, names: set[str] | None = None) -> list[RangeStat]:
    """Inclusive time per named range from ``profiler.events()`` (user annotations only),
    keyed by (name, depth among named ranges); ``names`` restricts which annotations count."""

    def is_range(e) -> bool:
        return e.name in names if names is not None else _is_user_range(e)

    stats: dict[tuple[str, int], RangeStat] = {}
    for e in events:
        if not is_range(e) or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        depth, p = 0, e.cpu_parent
        while p is not None:
            depth += is_range(p)
            p = p.cpu_parent
        s = stats.setdefault((e.name, depth), RangeStat(e.name, depth, 0, 0.0))
        s.calls += 1
        s.seconds += e.time_range.elapsed_us() / 1e6
    return sorted(stats.values(), key=lambda s: (s.depth, -s.seconds))


def _is_user_range(e) -> bool:
    return getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep")


def ranges_table(stats: list[RangeStat], steps: int, step_seconds: float) -> tuple[str, float]:
    """Markdown table of time per range and step; returns it with the top-level total per step."""
    top = sum(s.seconds for s in stats if s.depth == 0) / steps
    lines = ["| range | depth | calls/step | ms/step | % of step |", "|---|---|---|---|---|"]
    for s in stats:
        ms = s.seconds / steps * 1e3
        lines.append(
            f"| {'  ' * s.depth}{s.name} | {s.depth} | {s.calls / steps:g} | {ms:.2f} | "
            f"{s.seconds / steps / step_seconds:.1%} |"
        )
    lines += [
        "",
        f"Top-level ranges: {top * 1e3:.2f} ms/step; measured step time {step_seconds * 1e3:.2f} ms/step "
        f"(ranges cover {top / step_seconds:.1%}).",
    ]
    return "\n".join(lines) + "\n", top


def _nsight_command(args: argparse.Namespace, tool: str, out: Path) -> list[str]:
    inner = [
        sys.executable,
        "-m",
        "hrm",
        "profile",
        "--capture",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--out",
        str(out),
        "--preset",
        args.preset,
        "--backend",
        args.backend,
    ]
    for flag, value in (("--tokens", args.tokens), ("--bp-steps", args.bp_steps)):
        if value is not None:
            inner += [flag, str(value)]
    if args.compile:
        inner.append("--compile")
    if tool == "nsys":
        return [
            "nsys",
            "profile",
            "--trace=cuda,nvtx,osrt,cudnn,cublas",
            "--capture-range=cudaProfilerApi",
            "--capture-range-end=stop",
            "--force-overwrite=true",
            "-o",
            str(out / "nsys"),
            *inner,
        ]
    return [
        "ncu",
        "--nvtx",
        "--nvtx-include",
        f"{args.ncu_range}/",
        "--profile-from-start",
        "off",
        "--set",
        "full",
        "--force-overwrite",
        "-o",
        str(out / "ncu"),
        *inner,
    ]


def _run_nsight(args: argparse.Namespace, tool: str, out: Path) -> None:
    cmd = _nsight_command(args, tool, out)
    line = shlex.join(cmd)
    missing = []
    if shutil.which(tool) is None:
        missing.append(f"'{tool}' is not on PATH (install Nsight {'Systems' if tool == 'nsys' else 'Compute'})")
    if not torch.cuda.is_available():
        missing.append(
            "no CUDA device is visible (Nsight traces GPU work; NVTX ranges need CUDA or the 'nvtx' package)"
        )
    if missing:
        print(f"hrm profile: would run:\n  {line}", file=sys.stderr)
        raise HrmError(f"cannot run --{tool}: " + "; ".join(missing))
    print(f"hrm profile: running {line}", file=sys.stderr)
    env = {**os.environ, "HRM_NVTX": "1"}
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise HrmError(f"{tool} exited with code {done.returncode}")


def main(args: argparse.Namespace) -> dict | None:
    if args.steps < 1:
        raise ConfigError("--steps must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.nsys or args.ncu:
        for tool in ("nsys",) * args.nsys + ("ncu",) * args.ncu:
            _run_nsight(args, tool, out)
        return None

    bench = bench_config(args.preset, args.tokens, args.bp_steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = HRMText(bench.model, backend=args.backend).to(device)
    batch = train_batch(bench).to(device)
    precision = resolve_precision("auto", device)
    step, _ = make_train_step(model, batch, bench.bp_steps, compiled=args.compile, precision=precision)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if args.capture:  # inside Nsight: NVTX on, capture only the steady-state steps
        profiling.enable_nvtx()
        torch.cuda.profiler.start()
        for _ in range(args.steps):
            step()
        sync()
        torch.cuda.profiler.stop()
        return None

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with native_stderr_filtered(), torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - t0) / args.steps
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    stats = range_stats(prof.events())
    table, top = ranges_table(stats, args.steps, seconds)
    header = (
        f"hrm profile: {args.preset} (T={bench.tokens}, bp={bench.bp_steps}), backend {model.backend}"
        f"{' + torch.compile' if args.compile else ''}, {device.type}, {plural(args.steps, 'step')} after "
        f"{args.warmup} warm-up, {PRECISION_NAMES[precision]}\n\n"
    )
    ranges = out / "ranges.md"
    ranges.write_text(header + table)
    return {
        "trace": trace,
        "ranges": ranges,
        "table": header + table,
        "stats": stats,
        "step_seconds": seconds,
        "ranges_seconds": top,
    }
