"""``hrm tune``, ``hrm kernels show`` and ``hrm kernels report``: argument parsing and wiring."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PRESETS = "bench,B"  # head dims 64 and 128
TUNABLE_OPS = ("prefixlm_attention", "rms_norm", "magicnorm_transition", "swiglu", "split_rope", "linear_cross_entropy")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="autotune the Triton kernels on this GPU; write tune/tables/<device>.json",
        description="Sweep each tunable Triton kernel's search space over the shape buckets of the "
        "presets, discard candidates that spill, overflow shared memory (static report) or "
        "compute wrong results, time the rest (triton.testing.do_bench medians) and write the "
        "winners to <out>/<device-slug>.json after every bucket (re-running resumes).",
    )
    p.add_argument(
        "--ops",
        default=",".join(TUNABLE_OPS),
        help=f"comma-separated ops to tune (default all: {','.join(TUNABLE_OPS)})",
    )
    p.add_argument("--rows", type=int, default=8192, help="rows of the row-wise kernels' inputs (default 8192)")
    p.add_argument(
        "--presets", default=DEFAULT_PRESETS, help=f"model presets / bench configs (default {DEFAULT_PRESETS})"
    )
    p.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, fp16, fp32 (default bf16)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed row timed (default 8192)")
    p.add_argument("--out", help="tables directory (default: the checkout's tune/tables, else the cache)")
    p.add_argument("--restart", action="store_true", help="ignore an existing table for this device")
    p.set_defaults(func=run_tune)

    p = sub.add_parser("kernels", help="which kernel configs this device uses; static compile report")
    ksub = p.add_subparsers(dest="kernels_command", required=True, metavar="SUBCOMMAND")
    s = ksub.add_parser("show", help="the config each Triton kernel will use here, and why")
    s.add_argument("--arch", help="also show what these architectures would use (e.g. sm_86,sm_90a)")
    s.add_argument("--presets", default=DEFAULT_PRESETS)
    s.add_argument("--dtypes", default="bf16,fp32")
    s.set_defaults(func=run_show)

    r = ksub.add_parser(
        "report",
        help="compile every kernel ahead of time for named archs (no GPU): registers, spills, smem, occupancy",
    )
    r.add_argument("--arch", default="sm_80,sm_90a", help="comma-separated (default sm_80,sm_90a)")
    r.add_argument("--presets", default=DEFAULT_PRESETS)
    r.add_argument("--dtypes", default="bf16,fp32")
    r.add_argument("--defaults-only", action="store_true", help="only the default configs (fast; what CI checks)")
    r.add_argument("--sample", type=int, help="compile N random configs of each search space instead of all")
    r.add_argument("--no-row-kernels", action="store_true", help="attention kernels only")
    r.add_argument("--json", help="write the rows to this JSON file")
    r.add_argument("--jobs", type=int, help="parallel compiles (default: one per CPU)")
    r.set_defaults(func=run_report)


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _buckets(args):
    from hrm.tuning.kernels import preset_buckets

    return preset_buckets(_list(args.presets), _list(args.dtypes))


def run_tune(args) -> int:
    import torch

    from hrm.errors import HrmError

    if not torch.cuda.is_available():
        raise HrmError("no CUDA GPU here: hrm tune times kernels on the GPU it tunes for (see hrm kernels report)")
    ops = _list(args.ops)
    if set(ops) - set(TUNABLE_OPS):
        raise HrmError(f"unknown --ops {args.ops}; tunable: {','.join(TUNABLE_OPS)}")
    from pathlib import Path

    from hrm.bench.device import device_info, device_slug
    from hrm.ops.arch import arch_for_capability
    from hrm.tuning.kernels import (
        KERNELS,
        ROW_KERNELS,
        RowKernel,
        row_preset_buckets,
        row_search_space,
        space_with_default,
    )
    from hrm.tuning.table import clear_cache, default_output_dir
    from hrm.tuning.tuner import AttentionCase, RowCase, tune

    dev = torch.device("cuda", torch.cuda.current_device())
    info = device_info(dev)
    device = {
        "name": info["name"],
        "capability": info["capability"],
        "sm_count": info["sm_count"],
        "driver": _driver_version(),
        "torch": info["torch"],
        "triton": info["triton"],
        "cuda": info["cuda"],
    }
    path = Path(args.out or default_output_dir()) / f"{device_slug(info)}.json"
    arch = arch_for_capability(torch.cuda.get_device_capability(dev))
    if arch.note:
        print(f"hrm tune: {arch.note}", file=sys.stderr)
    kernels = [k for k in KERNELS.values() if "prefixlm_attention" in ops]
    kernels += [k for k in ROW_KERNELS.values() if k.op in ops]
    attention_buckets = _buckets(args)
    presets, dtypes = _list(args.presets), _list(args.dtypes)
    row = lambda k: isinstance(k, RowKernel)
    table = tune(
        kernels,
        lambda k: row_preset_buckets(k, presets, dtypes) if row(k) else attention_buckets,
        path,
        device,
        lambda k, b: RowCase(k, b, dev, rows=args.rows) if row(k) else AttentionCase(k, b, dev, tokens=args.tokens),
        space=lambda k, b: row_search_space(k, b) if row(k) else space_with_default(k, b, arch.arch.name),
        resume=not args.restart,
    )
    clear_cache()
    n = sum(len(k["buckets"]) for k in table["kernels"].values())
    print(f"wrote {path} ({n} tuned (kernel, bucket) entries)")
    return 0


def _driver_version() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def _fmt(cfg) -> str:
    return f"block_m={cfg.block_m} block_n={cfg.block_n} warps={cfg.num_warps} stages={cfg.num_stages}"


def run_show(args) -> int:
    import torch

    from hrm.ops.arch import parse_archs
    from hrm.ops.impl.prefixlm_attention import triton_kernels as tk
    from hrm.tuning.kernels import DTYPES

    buckets = _buckets(args)
    targets: list[tuple[str, tuple[int, int] | None, str | None]] = []
    if torch.cuda.is_available() and not tk.interpreting():
        cap = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        targets.append((f"this device: {name} (capability {cap[0]}.{cap[1]})", cap, name))
    else:
        why = "TRITON_INTERPRET=1" if tk.interpreting() else "no CUDA device"
        targets.append((f"this machine ({why}): the Triton interpreter", None, None))
    for arch in parse_archs(args.arch or ""):
        targets.append((f"--arch {arch.name} (same-capability tables, else defaults)", arch.major_minor, None))
    for title, cap, name in targets:
        print(title)
        for b in buckets:
            cfg, why = tk.attention_config_source(b.head_dim, DTYPES[b.dtype], cap, name)
            for k in tk.KERNELS:
                print(f"  prefixlm_attention.{k:<5} {b.key:<10} {_fmt(getattr(cfg, k))}  <- {why[k]}")
        _show_rows(_list(args.presets), _list(args.dtypes), cap, name)
    return 0


def _show_rows(presets: list[str], dtypes: list[str], cap, name) -> None:
    """The row-wise kernels' configs per bucket and where they come from."""
    from hrm.ops.common import row_config_source
    from hrm.tuning.kernels import ROW_KERNELS, default_row_config, row_preset_buckets

    for k in ROW_KERNELS.values():
        for b in row_preset_buckets(k, presets, dtypes):
            if cap is None:
                print(f"  {k.name:<26} {b.key:<14} whole tensors  <- the interpreter's tiles (row_settings)")
                continue
            tuned, why = row_config_source(k.name, b.width, b.torch_dtype, cap, name)
            cfg = default_row_config(k, b) if tuned is None else dict(zip(("block_rows", "num_warps"), tuned))
            print(f"  {k.name:<26} {b.key:<14} block_rows={cfg['block_rows']} warps={cfg['num_warps']}  <- {why}")


def run_report(args) -> int:
    from hrm.ops.arch import parse_archs
    from hrm.tuning.report import check, format_report, static_report

    archs = parse_archs(args.arch)
    rows = static_report(
        archs,
        _buckets(args),
        defaults_only=args.defaults_only,
        sample=args.sample,
        row_kernels=not args.no_row_kernels,
        jobs=args.jobs,
    )
    print(format_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    problems = check(rows)
    for p in problems:
        print(f"hrm kernels report: default config unusable: {p}", file=sys.stderr)
    return 1 if problems else 0


__all__ = ["register"]
