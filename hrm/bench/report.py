"""Benchmark rows, the results file, and the report (markdown table + PNG plots) made from it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One timed measurement, always next to the reference timed in the same run."""

    suite: str  # "ops" | "train"
    name: str  # op name or train config name
    backend: str
    mode: str  # "forward" | "backward" | "full" | "step"
    shape: str
    dtype: str
    seconds: float
    flops: float | None = None  # useful floating-point work of one call
    bytes: float | None = None  # unavoidable memory traffic of one call
    parity: float | None = None  # max error vs the fp64 oracle, relative to its max magnitude
    tolerance: float | None = None
    peak_mem_mb: float | None = None
    tokens: int | None = None  # tokens processed by one call (train step)
    extra: dict = field(default_factory=dict)
    # filled in by `derive` from the device's measured peaks and the reference row
    gflops: float | None = None
    gbps: float | None = None
    frac_peak: float | None = None
    speedup: float | None = None
    tokens_per_s: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.suite, self.name, self.mode


def derive(rows: list[Row], peaks: dict[str, float], reference: str = "torch") -> list[Row]:
    """Fill throughput, fraction of this device's measured peak and speedup over ``reference``.

    ``peaks`` holds ``matmul_gflops_<dtype>`` and ``copy_gbps``; compute-bound rows (with
    ``flops``) are compared to the matmul peak of their dtype, memory-bound rows to the copy
    bandwidth.
    """
    ref = {r.key: r.seconds for r in rows if r.backend == reference}
    for r in rows:
        if r.flops:
            r.gflops = r.flops / r.seconds / 1e9
            peak = peaks.get(f"matmul_gflops_{r.dtype}")
            r.frac_peak = r.gflops / peak if peak else None
        if r.bytes:
            r.gbps = r.bytes / r.seconds / 1e9
            if not r.flops and peaks.get("copy_gbps"):
                r.frac_peak = r.gbps / peaks["copy_gbps"]
        if r.tokens:
            r.tokens_per_s = r.tokens / r.seconds
        if r.key in ref:
            r.speedup = ref[r.key] / r.seconds
    return rows


def write_results(
    path: str | os.PathLike, device: dict, peaks: dict[str, float], rows: list[Row], settings: dict
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"device": device, "peaks": peaks, "settings": settings, "rows": [dataclasses.asdict(r) for r in rows]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> tuple[dict, dict, list[Row], dict]:
    doc = json.loads(Path(path).read_text())
    return doc["device"], doc["peaks"], [Row(**r) for r in doc["rows"]], doc.get("settings", {})


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(device: dict, peaks: dict[str, float], rows: list[Row]) -> str:
    """The report: device line, measured peaks, then one table per suite."""
    lines = [
        f"Device: {device.get('name')} ({device.get('cores') or device.get('sm_count')} "
        f"{'cores' if device.get('device_type') == 'cpu' else 'SMs'}), torch {device.get('torch')}, "
        f"triton {device.get('triton')}, commit {device.get('git_commit')}",
        "",
        "Measured peaks: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(peaks.items())),
        "",
    ]
    for suite in dict.fromkeys(r.suite for r in rows):
        sel = [r for r in rows if r.suite == suite]
        if suite == "train":
            lines += [
                "| config | shape | backend | precision | ms/step | tokens/s | speedup | model GFLOP/s | MFU | "
                "peak MiB (tensors) | peak MiB (resident) | loss diff vs torch (tol) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                if "error" in r.extra:
                    lines.append(
                        f"| {r.name} | {r.shape} | {r.backend} | {r.dtype} | failed: {r.extra['error']} | | | | | | | |"
                    )
                    continue
                parity = "" if r.parity is None else f"{r.parity:.1e} ({_fmt(r.tolerance, '.0e')})"
                lines.append(
                    f"| {r.name} | {r.shape} | {r.backend} | {r.dtype} | {r.seconds * 1e3:.0f} | "
                    f"{_fmt(r.tokens_per_s, '.0f')} | {_fmt(r.speedup, '.2f')}x | {_fmt(r.gflops, '.1f')} | "
                    f"{_fmt(r.frac_peak, '.1%')} | {_fmt(r.peak_mem_mb, '.0f')} | "
                    f"{_fmt(r.extra.get('rss_peak_mb'), '.0f')} | {parity} |"
                )
        else:
            lines += [
                "| op | mode | shape | dtype | backend | ms | speedup | GFLOP/s | GB/s | of peak | parity err (tol) |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                parity = "" if r.parity is None else f"{r.parity:.1e} ({_fmt(r.tolerance, '.0e')})"
                lines.append(
                    f"| {r.name} | {r.mode} | {r.shape} | {r.dtype} | {r.backend} | {r.seconds * 1e3:.2f} | "
                    f"{_fmt(r.speedup, '.2f')}x | {_fmt(r.gflops, '.1f')} | {_fmt(r.gbps, '.1f')} | "
                    f"{_fmt(r.frac_peak, '.1%')} | {parity} |"
                )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], path: str | os.PathLike) -> Path:
    """Speedup over the reference per op and backend; train-step tokens/s and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r for r in rows if r.suite == "ops" and r.speedup is not None and r.mode == "full"]
    train = [r for r in rows if r.suite == "train"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = [f"{r.name}\n{r.backend}" for r in ops]
    axes[0].bar(range(len(ops)), [r.speedup for r in ops], color="tab:blue")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set_xticks(range(len(ops)), labels, rotation=60, fontsize=7)
    axes[0].set_ylabel("speedup over torch reference (fwd+bwd)")
    names = [f"{r.backend}" for r in train]
    axes[1].bar(names, [r.tokens_per_s or 0 for r in train], color="tab:green")
    axes[1].set_ylabel("train step tokens/s")
    axes[2].bar(names, [r.peak_mem_mb or 0 for r in train], color="tab:orange")
    axes[2].set_ylabel("train step peak tensor memory (MiB)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
