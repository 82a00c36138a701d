"""The run's ``metrics.jsonl`` and the plot drawn from it.

Every line is one JSON object with a ``step`` (optimizer steps done): training lines carry
``loss``, ``lr``, ``bp_steps``, ``tokens_per_s`` and ``tokens`` (this rank's real tokens
since the previous training line, the count that rate is of), ``accuracy`` (token accuracy),
``exact_accuracy`` (whole responses right under teacher forcing), ``grad_norm`` and
``params`` (the model's parameter count); evaluation lines carry ``eval_loss``,
``eval_accuracy`` and ``eval_exact_match``. Both carry ``flops``: the training FLOPs of
all steps so far, all ranks together (:mod:`hrm.flops`; ``null`` in a run resumed from a
checkpoint written before they were counted).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hrm.errors import ConfigError


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


class Backends:
    """The optional logging backends beside ``metrics.jsonl`` (``--log-to``): TensorBoard
    (``torch.utils.tensorboard``, event files in ``OUT/tensorboard``) and Weights & Biases
    (project ``hrm``, the run named after ``OUT``, its id in ``OUT/wandb_run_id``; ``WANDB_*``
    environment variables apply).
    Each is imported only when asked for; one that is not installed is a ConfigError saying what
    to install. Every numeric field of a metrics line is logged at its ``step``."""

    @staticmethod
    def check(names: tuple[str, ...]) -> None:
        """ConfigError naming the package to install for the first backend that is missing."""
        for name in names:
            _import(name)

    def __init__(self, names: tuple[str, ...], out: Path, config: dict[str, Any], start: int = 0) -> None:
        self._tb = self._wandb = None
        if "tensorboard" in names:
            # resuming after step ``start``: events a killed run wrote past it are dropped, as in metrics.jsonl
            self._tb = _import("tensorboard")(log_dir=str(out / "tensorboard"), purge_step=start + 1 if start else None)
        if "wandb" in names:
            # the W&B run's id is kept in OUT, so that a resumed run continues the same W&B run
            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if start and id_file.is_file() else None
            self._wandb = _import("wandb").init(
                project=os.environ.get("WANDB_PROJECT", "hrm"),
                name=out.name,
                dir=str(out),
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
            )
            id_file.write_text(self._wandb.id + "\n")

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _import(backend: str) -> Any:
    """TensorBoard's ``SummaryWriter`` or the ``wandb`` module."""
    try:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        import wandb

        return wandb
    except ImportError:
        raise ConfigError(f"--log-to {backend} needs the {backend} package: pip install {backend}") from None


class ProgressLines:
    """Plain progress lines for a log file (stderr not a terminal: nohup, SLURM, CI), where a
    progress bar prints nothing useful: at a logged step, one line when ``every`` seconds have
    passed since the last (0: at every logged step), and at the last step::

        step 120/1500 (8%) | loss 1.2345 | lr 3.00e-03 | 2450 tok/s | elapsed 0:00:25 | ETA 0:04:48
    """

    def __init__(self, total: int, start: int, every: float, stream: TextIO | None = None) -> None:
        self.total, self.start, self.every = total, start, every
        self.stream = stream or sys.stderr
        self.begin = self.last = time.perf_counter()
        self.printed = False

    def update(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        step = record["step"]
        if step != self.total and self.printed and now - self.last < self.every:
            return
        self.last, self.printed = now, True
        elapsed = now - self.begin
        eta = elapsed / (step - self.start) * (self.total - step) if step > self.start else 0.0
        print(
            f"step {step}/{self.total} ({step / self.total:.0%}) | loss {record['loss']:.4f} | lr {record['lr']:.2e} "
            f"| {record['tokens_per_s']:.0f} tok/s | elapsed {_clock(elapsed)} | ETA {_clock(eta)}",
            file=self.stream,
            flush=True,
        )


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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


__all__ = ["Backends", "MetricsLog", "ProgressLines", "read_metrics", "plot_metrics"]
