"""The training run's configuration: one typed dataclass, serialised with every checkpoint.

Defaults are the CPU demo (the README's ``make demo``): the ``tiny`` preset learns the built-in
``add`` task (operands of up to 3 digits) to 100% held-out exact match (seeds 0-3) in 1500 steps,
2.5-3 minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from hrm.config import PRESETS, ModelConfig, dataclass_from_dict, get_preset
from hrm.data import TASKS
from hrm.errors import ConfigError
from hrm.precision import PRECISIONS

Precision = Literal["auto", "fp32", "bf16"]
TooLong = Literal["skip", "truncate"]
Parallel = Literal["ddp", "fsdp"]
LOGGERS = ("tensorboard", "wandb")

DEFAULT_TASK = "add"

#: Fields a resumed run may change; every other field must equal the checkpoint's.
RESUMABLE_CHANGES = frozenset(
    {
        "out",
        "backend",
        "save_every",
        "eval_every",
        "eval_samples",
        "eval_data",
        "log_every",
        "parallel",
        "dist_timeout",
        "steps",  # more steps extend the run; the schedules follow the new length (README, "Fine-tuning")
        "keep_checkpoints",
        "log_to",
        "progress_every",
    }
)
#: A warm-up capped because it would take the whole run becomes this fraction of the run.
CAPPED_WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (the CLI flags are these fields)."""

    # model
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json
    backend: str = "auto"  # the fastest available (hrm.ops.dispatch), logged
    init_from: str | None = None  # start from these weights (a checkpoint, run, transformers dir or reference file)
    # data: exactly one of task / data / pretokenized
    task: str | None = None  # a built-in task; DEFAULT_TASK when no other source is given
    data: str | None = None  # a JSONL file of {"instruction", "response"}
    pretokenized: str | None = None  # a directory in the reference's pre-tokenized layout
    eval_data: str | None = None  # held-out JSONL file or pre-tokenized directory (tasks: their heldout split)
    train_samples: int = 200_000  # samples drawn from a task (other sources use the whole file)
    too_long: TooLong = "skip"
    # optimisation
    steps: int = 1500
    batch_tokens: int = 1024  # tokens per packed row
    global_rows: int | None = None  # rows per optimizer step over all ranks; None: one per rank (set at start)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    warmup_fraction: float | None = None  # warm-up as a fraction of ``steps``; replaces warmup_steps when set
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    ema_decay: float = 0.9999  # a ceiling: the EMA's warmup keeps it below 0.999 for the first 9000 steps
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: Precision = "auto"  # bf16: autocast with fp32 master weights; auto: hrm.precision
    seed: int = 0
    # data parallel (under torchrun)
    parallel: Parallel = "ddp"  # ddp: replicate the model; fsdp: FSDP2, parameters sharded over the ranks
    dist_timeout: int = 1800  # seconds a collective may wait for the other ranks before the job fails
    # bookkeeping
    out: str = "runs/train"
    log_every: int = 10
    eval_every: int = 500  # 0: only the final evaluation
    eval_samples: int = 500
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # the newest N checkpoints are kept, older ones deleted
    log_to: tuple[str, ...] = ()  # logging backends beside metrics.jsonl: "tensorboard", "wandb"
    progress_every: float = 30.0  # seconds between plain progress lines when stderr is not a terminal

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "log_to", tuple(dict.fromkeys(self.log_to)))
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        if self.task is None and self.data is None and self.pretokenized is None:
            object.__setattr__(self, "task", DEFAULT_TASK)
        self.validate()

    @property
    def source(self) -> tuple[str, str]:
        """``(kind, value)`` of the training data: ``("task", "add")``, ``("data", path)``, ..."""
        return next((k, getattr(self, k)) for k in ("task", "data", "pretokenized") if getattr(self, k) is not None)

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid training config: {msg}")

        if self.preset not in PRESETS:
            fail(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        if self.task is not None and self.task not in TASKS:
            fail(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        sources = [k for k in ("task", "data", "pretokenized") if getattr(self, k) is not None]
        if len(sources) > 1:
            fail(f"give one data source, not {' and '.join('--' + k for k in sources)}")
        for name in (
            "steps",
            "batch_tokens",
            "train_samples",
            "log_every",
            "eval_samples",
            "dist_timeout",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            fail(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            fail(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.weight_decay >= 0 or not self.grad_clip >= 0:
            fail("weight_decay and grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.ema_decay < 1:
            fail(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in PRECISIONS:
            fail(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.global_rows is not None and (
            not isinstance(self.global_rows, int) or isinstance(self.global_rows, bool) or self.global_rows < 1
        ):
            fail(f"global_rows must be a positive integer, got {self.global_rows!r}")
        if self.parallel not in ("ddp", "fsdp"):
            fail(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.too_long not in ("skip", "truncate"):
            fail(f"too_long must be 'skip' or 'truncate', got {self.too_long!r}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            fail(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        unknown = [name for name in self.log_to if name not in LOGGERS]
        if unknown:
            fail(f"unknown logging backend {unknown[0]!r}; known: {', '.join(LOGGERS)}")
        if not self.progress_every >= 0:
            fail(f"progress_every must be >= 0 seconds, got {self.progress_every}")

    def warmup(self) -> tuple[int, str | None]:
        """``(warm-up steps, warning or None)``: ``warmup_fraction * steps`` when the fraction is
        set, else ``warmup_steps``. A warm-up that would take the whole run (the learning rate
        never decays, or never reaches its peak) is capped to ``CAPPED_WARMUP_FRACTION`` of the
        run; one longer than half the run is kept, with a warning."""
        asked = round(self.warmup_fraction * self.steps) if self.warmup_fraction is not None else self.warmup_steps
        what = (
            f"--warmup-fraction {self.warmup_fraction:g} ({asked} steps)"
            if self.warmup_fraction is not None
            else f"--warmup-steps {asked}"
        )
        if asked >= self.steps:
            capped = round(CAPPED_WARMUP_FRACTION * self.steps)
            return capped, (
                f"warm-up {what} would take the whole {self.steps}-step run (the learning rate would never "
                f"{'reach its peak' if asked > self.steps else 'decay'}); using {capped} steps "
                f"({CAPPED_WARMUP_FRACTION:.0%} of the run) instead"
            )
        if asked > self.steps / 2:
            return asked, (
                f"warm-up {what} is more than half the {self.steps}-step run; the learning rate decays only "
                f"over the last {self.steps - asked} steps"
            )
        return asked, None

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with the tokenizer's ``vocab_size`` and then ``model_overrides`` applied."""
        return get_preset(self.preset, **{"vocab_size": vocab_size, **self.model_overrides})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        data["log_to"] = list(self.log_to)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data, "training config")


def parse_override(text: str) -> tuple[str, Any]:
    """``"hidden_size=128"`` -> ``("hidden_size", 128)``, typed like the ModelConfig field."""
    key, sep, raw = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if not sep or key not in fields:
        raise ConfigError(f"bad model override {text!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
    kind = type(getattr(ModelConfig(), key))
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"bad model override {text!r}: {raw!r} is not a valid {kind.__name__}") from None
    return key, value


__all__ = ["TrainConfig", "RESUMABLE_CHANGES", "DEFAULT_TASK", "LOGGERS", "parse_override"]
