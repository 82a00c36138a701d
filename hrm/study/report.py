"""The results of an ``hrm compare`` study: a table (markdown + JSON) and a plot.

Everything is read back from the runs' ``metrics.jsonl``: the evaluation lines give the
curve (held-out exact match against the training FLOPs spent so far), the last training
line the FLOPs and parameters actually logged. Seeds are summarised per architecture: the
mean curve on the union of the seeds' evaluation points (each seed interpolated linearly),
with the band between the lowest and the highest seed.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from hrm.errors import HrmError
from hrm.study.compare import RUN_TIME_FILE, RUNS, StudySpec
from hrm.training.metrics import read_metrics

TABLE_MD = "results.md"
TABLE_JSON = "results.json"
PLOT = "exact_match_vs_flops.png"


def collect(out: str | os.PathLike, spec: StudySpec, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: the plan's fields plus ``curve`` ``[[flops, exact_match], ...]``, ``final``
    (the last evaluation's exact match), ``logged_flops``, ``logged_params`` and ``seconds``."""
    results = []
    for run in runs:
        run_dir = Path(out) / RUNS / run["name"]
        records = read_metrics(run_dir / "metrics.jsonl")
        evals = [r for r in records if "eval_exact_match" in r]
        train = [r for r in records if "loss" in r]
        if not evals or not train or train[-1]["step"] != run["steps"]:
            raise HrmError(f"{run_dir}: the run has not finished (rerun the same hrm compare command)")
        timing = run_dir / RUN_TIME_FILE
        results.append(
            {
                **run,
                "curve": [[r["flops"], r["eval_exact_match"]] for r in evals],
                "final": evals[-1]["eval_exact_match"],
                "logged_flops": train[-1]["flops"],
                "logged_params": train[-1]["params"],
                "seconds": json.loads(timing.read_text())["seconds"] if timing.is_file() else None,
            }
        )
    return results


def summarise(spec: StudySpec, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per architecture (in ``spec.archs`` order)."""
    base = spec.base_model()
    rows = []
    for arch in spec.archs:
        mine = [r for r in results if r["arch"] == arch]
        model = base.replace(arch=arch, **mine[0]["model"])
        finals = [r["final"] for r in mine]
        seconds = [r["seconds"] for r in mine if r["seconds"] is not None]
        rows.append(
            {
                "arch": arch,
                "params": mine[0]["logged_params"],
                "n_layers": model.n_layers,
                "layers_per_stack": model.layers_per_stack,
                "stack_calls": model.num_stack_calls,
                "steps": [r["steps"] for r in mine],
                "flops": [r["logged_flops"] for r in mine],
                "flops_per_step": statistics.mean(r["logged_flops"] / r["steps"] for r in mine),
                "final_exact_match": finals,
                "mean_final_exact_match": statistics.mean(finals),
                "best_exact_match": max(max(em for _, em in r["curve"]) for r in mine),
                "seconds": statistics.mean(seconds) if seconds else None,
            }
        )
    return rows


def markdown_table(spec: StudySpec, rows: list[dict[str, Any]]) -> str:
    seeds = ", ".join(str(s) for s in range(spec.seeds))
    lines = [
        f"Task `{spec.task}`, budget {spec.budget_flops:.3g} training FLOPs per run, seeds {seeds}, "
        f"held-out exact match on {spec.eval_samples} samples (EMA weights).",
        "",
        "| arch | params | blocks x stack calls | steps | FLOPs/step | training FLOPs | final exact match "
        "(mean; per seed) | best | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{em:.3f}" for em in r["final_exact_match"])
        steps = "/".join(str(s) for s in sorted(set(r["steps"])))
        wall = f"{r['seconds']:.0f}" if r["seconds"] is not None else "n/a"
        lines.append(
            f"| {r['arch']} | {r['params']:,} | {r['layers_per_stack']} x {r['stack_calls']} | {steps} | "
            f"{r['flops_per_step']:.3g} | {max(r['flops']):.3g} | **{r['mean_final_exact_match']:.3f}** "
            f"({per_seed}) | {r['best_exact_match']:.3f} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def band(curves: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, mean, low, high)`` of several curves ``[[x, y], ...]`` on the union of their x,
    each interpolated linearly, from the largest first x to the smallest last x (where
    every curve has data)."""
    xs = np.unique(np.concatenate([np.asarray(c, dtype=float)[:, 0] for c in curves]))
    lo_x = max(c[0][0] for c in curves)
    hi_x = min(c[-1][0] for c in curves)
    xs = xs[(xs >= lo_x) & (xs <= hi_x)]
    ys = np.stack([np.interp(xs, *np.asarray(c, dtype=float).T) for c in curves])
    return xs, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def plot(spec: StudySpec, results: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 0.0
    for row in rows:
        curves = [r["curve"] for r in results if r["arch"] == row["arch"]]
        x, mean, low, high = band(curves)
        label = (
            f"{row['arch']} ({row['params'] / 1e6:.2f}M params, {row['layers_per_stack']} blocks x "
            f"{row['stack_calls']} calls)"
        )
        (line,) = ax.plot(x, mean, "o-", ms=3, label=label)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)
        top = max(top, float(high.max()))
    ax.set_xlim(left=0)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, min(1.0, np.ceil(10 * top + 1) / 10))
    ax.set_title(
        f"task {spec.task}, {spec.budget_flops:.3g} FLOPs per run: mean of {spec.seeds} seed(s), band min..max",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out: str | os.PathLike, spec: StudySpec, runs: list[dict[str, Any]]) -> str:
    """Write the table (markdown and JSON) and the plot into ``out``; returns the markdown."""
    out = Path(out)
    results = collect(out, spec, runs)
    rows = summarise(spec, results)
    table = markdown_table(spec, rows)
    (out / TABLE_MD).write_text(table)
    (out / TABLE_JSON).write_text(json.dumps({"spec": spec.to_dict(), "archs": rows, "runs": results}, indent=2) + "\n")
    plot(spec, results, rows, out / PLOT)
    return table


__all__ = ["collect", "summarise", "markdown_table", "band", "plot", "write_report", "TABLE_MD", "TABLE_JSON", "PLOT"]
