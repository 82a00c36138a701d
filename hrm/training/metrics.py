"""The run's ``metrics.jsonl`` and the plot drawn from it.

Every line is one JSON object with a ``step`` (optimizer steps done): training lines carry
``loss``, ``lr``, ``bp_steps``, ``tokens_per_s``, ``accuracy`` (token accuracy),
``exact_accuracy`` (whole responses right under teacher forcing), ``grad_norm`` and
``params`` (the model's parameter count); evaluation lines carry ``eval_loss``,
``eval_accuracy`` and ``eval_exact_match``. Both carry ``flops``: the training FLOPs of
all steps so far, all ranks together (:mod:`hrm.flops`; ``null`` in a run resumed from a
checkpoint written before they were counted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a metrics file; a torn last line (a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """Appends lines to ``metrics.jsonl``, flushed at once so a kill loses nothing written.

    ``keep_through=N`` (resuming from the checkpoint of step ``N``) first rewrites the file
    to the lines with ``step <= N``, so it reads as if the run had never been interrupted.
    """

    def __init__(self, path: str | os.PathLike, keep_through: int | None = None) -> None:
        self.path = Path(path)
        if keep_through is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_through]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Loss and accuracy against step, with the evaluation points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss (EMA)")
    ax_loss.set_yscale("log")
    ax_acc.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train token accuracy")
    ax_acc.plot(
        [r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="held-out token accuracy (EMA)"
    )
    ax_acc.plot(
        [r["step"] for r in evals], [r["eval_exact_match"] for r in evals], "s-", label="held-out exact match (EMA)"
    )
    ax_acc.set_ylim(0, 1.02)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


__all__ = ["MetricsLog", "read_metrics", "plot_metrics"]
