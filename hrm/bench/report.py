"""Benchmark rows, the results file, and the report (markdown table + PNG plots) made from it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    """One timed measurement, always next to the reference timed in the same run."""

    suite: str  # "ops" | "train"
    name: str  # op name or train config name
    backend: str
    mode: str  # "forward" | "backward" | "full" | "step"
    shape: str
    dtype: str
    seconds: float  # the median of the timed calls
    flops: float | None = None  # useful floating-point work of one call
    bytes: float | None = None  # unavoidable memory traffic of one call
    parity: float | None = None  # max error vs the fp64 oracle, relative to its max magnitude
    tolerance: float | None = None
    peak_mem_mb: float | None = None
    tokens: int | None = None  # tokens processed by one call (train step)
    extra: dict = field(default_factory=dict)
    seconds_min: float | None = None  # the fastest and slowest timed calls
    seconds_max: float | None = None
    # filled in by `derive` from the device's measured peaks and the reference row
    gflops: float | None = None
    gbps: float | None = None
    frac_peak: float | None = None
    speedup: float | None = None
    tokens_per_s: float | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.suite, self.name, self.mode, self.dtype


def derive(rows: list[Row], peaks: dict[str, float], reference: str = "torch") -> list[Row]:
    """Fill throughput, fraction of this device's measured peak and speedup over ``reference``.

    ``peaks`` holds ``matmul_gflops_<dtype>`` and ``copy_gbps``; compute-bound rows (with
    ``flops``) are compared to the matmul peak of their dtype, memory-bound rows to the copy
    bandwidth measured at their own working-set size (``extra["copy_gbps"]``, set by
    :func:`hrm.bench.run.measure_copy_peaks`) when there is one, else to ``copy_gbps``. A
    memory-bound row above that copy bandwidth is marked ``extra["cache_resident"]``: its data
    stayed in caches between calls, which a copy of the same size does not reach.
    """
    ref = {r.key: r.seconds for r in rows if r.backend == reference}
    for r in rows:
        if r.flops:
            r.gflops = r.flops / r.seconds / 1e9
            peak = peaks.get(f"matmul_gflops_{r.dtype}")
            r.frac_peak = r.gflops / peak if peak else None
        if r.bytes:
            r.gbps = r.bytes / r.seconds / 1e9
            copy = r.extra.get("copy_gbps") or peaks.get("copy_gbps")
            if not r.flops and copy:
                r.frac_peak = r.gbps / copy
                if r.frac_peak > 1:
                    r.extra["cache_resident"] = True
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


def _train_label(r: Row) -> str:
    """A train-suite bar: the backend, what ran (a bench step, at one thread, or ``hrm train``)
    and the peak tensor memory where measured."""
    what = {"step": "", "loop": ", hrm train"}.get(r.mode, f", {r.mode.removeprefix('step, ')}")
    memory = f" ({r.peak_mem_mb:.0f} MiB peak)" if r.peak_mem_mb else ""
    return f"{r.backend}{what}{memory}"


def plural(n: int, word: str) -> str:
    """``"1 thread"``, ``"2 threads"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ms(r: Row) -> str:
    """Median ms with the spread of the timed calls: ``1.23 (1.20-1.31)``."""
    if r.seconds_min is None or r.seconds_max is None:
        return f"{r.seconds * 1e3:.2f}"
    return f"{r.seconds * 1e3:.2f} ({r.seconds_min * 1e3:.2f}-{r.seconds_max * 1e3:.2f})"


def _peaks_line(peaks: dict[str, float]) -> str:
    parts = []
    for key, value in sorted(peaks.items()):
        if key.startswith("matmul_gflops_"):
            parts.append(f"{key.removeprefix('matmul_gflops_')} matmul {value:.1f} GFLOP/s")
        elif key == "copy_gbps":
            parts.append(f"copy {value:.1f} GB/s (256 MiB)")
        else:
            parts.append(f"{key} {value:.1f}")
    return "Measured peaks: " + ", ".join(parts)


def markdown_table(device: dict, peaks: dict[str, float], rows: list[Row]) -> str:
    """The report: device line, measured peaks, then one table per suite (times: median, and
    the fastest-slowest of the timed calls), with notes under the op table."""
    units = "cores" if device.get("device_type") == "cpu" else "SMs"
    lines = [
        f"Device: {device.get('name')} ({plural(device.get('cores') or device.get('sm_count') or 0, units[:-1])}), "
        f"torch {device.get('torch')}, triton {device.get('triton')}, commit {device.get('git_commit')}",
        "",
        _peaks_line(peaks),
        "",
    ]
    for suite in dict.fromkeys(r.suite for r in rows):
        sel = [r for r in rows if r.suite == suite]
        if suite == "train":
            lines += [
                "| config | shape | backend | precision | ms/step (min-max) | tokens/s | speedup | model GFLOP/s | "
                "MFU | peak MiB (tensors) | peak MiB (resident) | loss diff vs torch (tol) |",
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
                    f"| {r.name} | {r.shape} | {r.backend} | {r.dtype} | {_ms(r)} | "
                    f"{_fmt(r.tokens_per_s, '.0f')} | {_fmt(r.speedup, '.2f')}x | {_fmt(r.gflops, '.1f')} | "
                    f"{_fmt(r.frac_peak, '.1%')} | {_fmt(r.peak_mem_mb, '.0f')} | "
                    f"{_fmt(r.extra.get('rss_peak_mb'), '.0f')} | {parity} |"
                )
        else:
            lines += [
                "| op | mode | shape | dtype | backend | ms (min-max) | speedup | GFLOP/s | GB/s | of peak | "
                "parity err (tol) |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            notes: dict[str, tuple[str, str]] = {}  # note -> (its mark, the op it is about)
            for r in sel:
                parity = "" if r.parity is None else f"{r.parity:.1e} ({_fmt(r.tolerance, '.0e')})"
                mark = ""
                if r.extra.get("note"):
                    notes.setdefault(r.extra["note"], (f"[{len(notes) + 1}]", r.name))
                    mark = " " + notes[r.extra["note"]][0] if r.mode == "backward" else ""
                of_peak = _fmt(r.frac_peak, ".1%")
                if r.flops:
                    of_peak += " matmul"
                elif r.frac_peak is not None:
                    of_peak += " copy" + (" (cache-resident)" if r.extra.get("cache_resident") else "")
                lines.append(
                    f"| {r.name} | {r.mode}{mark} | {r.shape} | {r.dtype} | {r.backend} | {_ms(r)} | "
                    f"{_fmt(r.speedup, '.2f')}x | {_fmt(r.gflops, '.1f')} | {_fmt(r.gbps, '.1f')} | "
                    f"{of_peak} | {parity} |"
                )
            lines += [
                "",
                "Of peak: GFLOP/s over this device's measured matmul peak of the row's dtype, or GB/s over a "
                "copy of the row's own working set (its bytes) measured in the same run; a row above that copy "
                "is marked cache-resident (its data stayed in caches between calls).",
            ]
            lines += [f"{mark} {name}: {note}" for note, (mark, name) in notes.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class Chart:
    """One horizontal bar chart of the report's PNG: a bar per row, with its spread."""

    title: str
    xlabel: str
    labels: list[str]
    values: list[float]
    spans: list[tuple[float, float] | None]  # fastest-slowest, in the bar's unit


def charts(rows: list[Row]) -> list[Chart]:
    """One chart per suite with rows to show: the ops' speedup over the reference (forward +
    backward) per op and backend; the train step's tokens/s per variant, with its peak tensor
    memory in the label."""

    def span(r: Row, at: Callable[[float], float]) -> tuple[float, float] | None:
        return (at(r.seconds_max), at(r.seconds_min)) if r.seconds_min and r.seconds_max else None

    out = []
    ops = [r for r in rows if r.suite == "ops" and r.speedup is not None and r.mode == "full"]
    if ops:
        dtypes = len({r.dtype for r in ops}) > 1  # then each label names its row's
        out.append(
            Chart(
                "ops: speedup over the torch reference, forward + backward (median; lines: fastest-slowest)",
                "speedup (x)",
                [f"{r.name} ({r.backend}{', ' + r.dtype if dtypes else ''})" for r in ops],
                [r.speedup for r in ops],
                [span(r, lambda t, r=r: r.speedup * r.seconds / t) for r in ops],
            )
        )
    train = [r for r in rows if r.suite == "train" and r.tokens_per_s]
    if train:
        out.append(
            Chart(
                "train: tokens/s (step: median, hrm train: over its timed steps; lines: fastest-slowest)",
                "tokens/s",
                [_train_label(r) for r in train],
                [r.tokens_per_s for r in train],
                [span(r, lambda t, r=r: r.tokens / t) for r in train],
            )
        )
    return out


def plot(rows: list[Row], path: str | os.PathLike) -> Path:
    """The :func:`charts` of ``rows`` stacked in one PNG, horizontal bars so that every label
    reads in full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = charts(rows)
    heights = [max(2.0, 0.32 * len(c.labels) + 1.2) for c in shown] or [2.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights)), height_ratios=heights, squeeze=False)
    for ax, chart in zip(axes[:, 0], shown):
        y = list(range(len(chart.labels)))[::-1]
        ax.barh(y, chart.values, color="tab:blue" if chart.xlabel.startswith("speedup") else "tab:green")
        for yi, lo_hi in zip(y, chart.spans):
            if lo_hi:
                ax.plot(lo_hi, (yi, yi), color="black", lw=1)
        ax.set_yticks(y, chart.labels, fontsize=9)
        ax.set_xlabel(chart.xlabel)
        ax.set_title(chart.title, fontsize=10)
        if chart.xlabel.startswith("speedup"):
            ax.axvline(1.0, color="gray", lw=0.8)
        ax.grid(axis="x", alpha=0.3)
    if not shown:
        axes[0, 0].set_axis_off()
        axes[0, 0].text(0.5, 0.5, "no rows to plot", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
