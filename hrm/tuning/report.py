"""The static kernel report: every Triton kernel compiled ahead of time for named
architectures (no GPU needed), at its default config and across its search space, with
registers, spills, shared memory and an occupancy estimate from :mod:`hrm.ops.arch`.

Rows (``hrm kernels report --json F``)::

    {"kernel", "arch", "bucket", "config", "default", "registers", "spill_bytes",
     "shared_bytes", "occupancy", "limited_by", "error", "problem"}

``occupancy`` is resident blocks per SM (:func:`hrm.ops.arch.occupancy`); ``problem`` says
why a config cannot be used on that architecture (it does not compile, spills, needs more
shared memory than a block may have, or cannot launch); the tuner prunes such candidates
before timing, and :func:`check` fails when a default config has one.
"""

from __future__ import annotations

import random
from typing import Any

from hrm.ops.arch import Arch, occupancy

ROW_KEYS = ("kernel", "arch", "config", "default", "registers", "spill_bytes", "shared_bytes", "occupancy")


def _config_of(spec) -> dict:
    cfg = {k.lower(): v for k, v in spec.constexprs.items() if k.startswith("BLOCK")}
    return {**cfg, "num_warps": spec.num_warps, "num_stages": spec.num_stages}


def annotate(raw: dict, arch: Arch) -> dict:
    """A :func:`hrm.ops.aot.compile_report` row -> a report row's measurements and ``problem``."""
    out: dict[str, Any] = {"registers": raw.get("registers"), "shared_bytes": raw.get("shared_bytes")}
    if raw.get("error"):
        out.update(spill_bytes=None, occupancy=0, limited_by=None, error=raw["error"], problem="does not compile")
        return out
    spill = int(raw.get("spill_stores") or 0) + int(raw.get("spill_loads") or 0)
    blocks, limit = occupancy(arch, raw["registers"], raw["shared_bytes"], raw["num_warps"])
    problem = None
    if spill:
        problem = f"spills {spill} bytes"
    elif raw["shared_bytes"] > arch.smem_per_block:
        problem = f"needs {raw['shared_bytes']} B of shared memory, {arch.name} allows {arch.smem_per_block}"
    elif blocks == 0:
        problem = f"cannot launch (limited by {limit})"
    out.update(spill_bytes=spill, occupancy=blocks, limited_by=limit, error=None, problem=problem)
    return out


def row_kernel_specs(dtypes) -> list:
    """The row-wise kernels at the tiles their launchers pick, at the benchmark config and the
    largest preset (the shapes of tests/test_fused_aot.py)."""
    from hrm.config import BENCH_CONFIGS, get_preset
    from hrm.ops.impl import linear_cross_entropy, magicnorm_transition, rms_norm, split_rope, swiglu

    out = []
    for config in (BENCH_CONFIGS["bench"].model, get_preset("XL")):
        for dtype in dtypes:
            out += rms_norm.aot_specs(config.hidden_size, dtype)
            out += magicnorm_transition.aot_specs(config.hidden_size, dtype)
            out += swiglu.aot_specs(config.intermediate_size, dtype)
            out += split_rope.aot_specs(config.num_heads, config.head_dim, dtype)
            out += linear_cross_entropy.aot_specs(config.padded_vocab_size, dtype)
    return out


def _row_space_jobs(arch: Arch, buckets: list, sample: int | None, seed: int) -> list:
    """The row-wise kernels' search spaces (default excluded) at the widths of the benchmark
    config and the largest preset, in the dtypes of ``buckets``; bucket ``w<width>-<dtype>``."""
    from hrm.tuning.kernels import ROW_KERNELS, default_row_config, row_aot_spec, row_preset_buckets, row_search_space

    dtypes = sorted({b.dtype for b in buckets}) or ["bf16"]
    jobs = []
    for k in ROW_KERNELS.values():
        for b in row_preset_buckets(k, ["bench", "XL"], dtypes):
            default = default_row_config(k, b)
            space = [c for c in row_search_space(k, b) if c != default]
            if sample is not None:
                space = random.Random(f"{seed}{arch.name}{k.name}{b.key}").sample(space, min(sample, len(space)))
            jobs += [(arch, b.key, row_aot_spec(k, b, c, arch.capability), False) for c in space]
    return jobs


def jobs_for(
    archs: list[Arch],
    buckets: list,
    *,
    defaults_only: bool = True,
    sample: int | None = None,
    row_kernels: bool = True,
    seed: int = 0,
) -> list[tuple[Arch, str, Any, bool]]:
    """``(arch, bucket, spec, is_default)`` for everything the report compiles."""
    from hrm.ops.impl.prefixlm_attention import triton_kernels as tk
    from hrm.tuning.kernels import KERNELS, aot_spec, default_config, search_space

    jobs = []
    for arch in archs:
        for b in buckets:
            for spec in tk.aot_specs(b.head_dim, b.torch_dtype, arch.capability):
                jobs.append((arch, b.key, spec, True))
            if defaults_only:
                continue
            for k in KERNELS.values():
                default = default_config(k, b, arch.name)
                space = [c for c in search_space(k, b) if c != default]
                if sample is not None:
                    space = random.Random(f"{seed}{arch.name}{k.name}{b.key}").sample(space, min(sample, len(space)))
                jobs += [(arch, b.key, aot_spec(k, b, c, arch.capability), False) for c in space]
        if row_kernels:
            import torch

            dts = sorted({b.torch_dtype for b in buckets}, key=str) or [torch.bfloat16]
            jobs += [(arch, "", s, True) for s in row_kernel_specs(dts)]  # bucket "": named by shape
            if not defaults_only:
                jobs += _row_space_jobs(arch, buckets, sample, seed)
    return jobs


def static_report(
    archs: list[Arch],
    buckets: list,
    *,
    defaults_only: bool = True,
    sample: int | None = None,
    row_kernels: bool = True,
    compile_fn=None,
    jobs: int | None = None,
) -> list[dict]:
    """Compile and annotate every job of :func:`jobs_for`. ``compile_fn(specs, capability)``
    (default: :func:`hrm.ops.aot.compile_report`) is injectable for tests."""
    from hrm.ops.aot import compile_report

    compile_fn = compile_fn or (lambda specs, cap: compile_report(specs, (cap,), jobs))
    work = jobs_for(archs, buckets, defaults_only=defaults_only, sample=sample, row_kernels=row_kernels)
    rows = []
    for arch in archs:
        mine = [w for w in work if w[0] is arch]
        raw = compile_fn([w[2] for w in mine], arch.capability) if mine else []
        for (_, bucket, spec, is_default), r in zip(mine, raw):
            rows.append(
                {
                    "kernel": f"prefixlm_attention.{spec.name.split()[0]}" if bucket.startswith("hd") else spec.name,
                    "arch": arch.name,
                    "bucket": bucket,
                    "config": _config_of(spec),
                    "default": is_default,
                    **annotate(r, arch),
                }
            )
    return rows


def check(rows: list[dict]) -> list[str]:
    """One line per default config with a problem (empty: every default is usable)."""
    return [
        f"{r['kernel']} {r['bucket']} on {r['arch']} at its default {r['config']}: {r['problem']}"
        for r in rows
        if r["default"] and r.get("problem")
    ]


def format_report(rows: list[dict]) -> str:
    cols = ["kernel", "arch", "bucket", "default", "config", "registers", "spill_bytes", "shared_bytes", "occupancy"]
    cols += ["problem"]

    def cell(r, c):
        v = r.get(c)
        if c == "config":
            return " ".join(f"{k.removeprefix('block_').removeprefix('num_')}={x}" for k, x in v.items())
        if c == "default":
            return "*" if v else ""
        return "" if v is None else str(v)

    cells = [[cell(r, c) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


__all__ = ["ROW_KEYS", "annotate", "check", "format_report", "jobs_for", "static_report"]
