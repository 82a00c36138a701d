"""Typed model configuration and named presets.

A :class:`ModelConfig` fully determines a model's parameter shapes and forward semantics
(see docs/design.md, "Model semantics"). Build one with :func:`get_preset` (optionally
overriding fields) or directly; :meth:`ModelConfig.validate` runs on construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from hrm.errors import ConfigError

#: ``hrm``: the H and L stacks in nested loops; ``transformer``: one stack called once;
#: ``ut``: one shared stack looped ``num_stack_calls`` times (universal-transformer style).
Arch = Literal["hrm", "transformer", "ut"]
ARCHS = ("hrm", "transformer", "ut")


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def dataclass_from_dict(cls: type, data: dict[str, Any], what: str) -> Any:
    """``cls(**data)``, naming unknown fields in a :class:`ConfigError` (``what``: "model config")."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"invalid {what}: unknown field(s) {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 260
    hidden_size: int = 64
    num_heads: int = 2
    expansion: float = 4.0
    n_layers: int = 4  # total blocks; HRM splits them evenly between the H and L stacks
    arch: Arch = "hrm"
    H_cycles: int = 2
    L_cycles: int = 3
    bp_min: int = 2
    bp_max: int = 5
    bp_warmup_ratio: float = 0.2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 2048
    vocab_multiple: int = 256  # embedding / LM-head rows are padded up to a multiple of this

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return round_up(self.vocab_size, self.vocab_multiple)

    @property
    def intermediate_size(self) -> int:
        """SwiGLU width: ``round_up(round(expansion * d * 2/3), 256)``."""
        return round_up(round(self.expansion * self.hidden_size * 2 / 3), 256)

    @property
    def layers_per_stack(self) -> int:
        return self.n_layers // 2 if self.arch == "hrm" else self.n_layers

    @property
    def num_stack_calls(self) -> int:
        """Stack invocations per forward: ``H_cycles * (L_cycles + 1)`` for HRM and for the
        universal transformer (as many loops as HRM has stack calls), 1 for the Transformer."""
        return 1 if self.arch == "transformer" else self.H_cycles * (self.L_cycles + 1)

    @property
    def embed_std(self) -> float:
        """``s_in``: the embedding init std (LeCun, ``1/sqrt(d)``); forward scales by ``1/s_in``."""
        return 1.0 / math.sqrt(self.hidden_size)

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid model config: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_heads",
            "n_layers",
            "H_cycles",
            "L_cycles",
            "max_seq_len",
            "vocab_multiple",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.arch not in ARCHS:
            fail(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.hidden_size % self.num_heads:
            fail(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            fail(f"head_dim {self.head_dim} must be even for RoPE")
        if self.arch == "hrm" and self.n_layers % 2:
            fail(f"n_layers {self.n_layers} cannot be split evenly between the H and L stacks")
        if not self.expansion > 0:
            fail(f"expansion must be positive, got {self.expansion}")
        if not 1 <= self.bp_min <= self.bp_max:
            fail(f"need 1 <= bp_min <= bp_max, got bp_min={self.bp_min}, bp_max={self.bp_max}")
        if not 0.0 <= self.bp_warmup_ratio <= 1.0:
            fail(f"bp_warmup_ratio must be in [0, 1], got {self.bp_warmup_ratio}")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            fail("norm_eps and rope_theta must be positive")

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data, "model config")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def bp_steps_at(config: ModelConfig, step: int, total_steps: int) -> int:
    """Truncated-backprop depth at ``step`` of ``total_steps`` (warmup deep credit assignment).

    ``bp = bp_min + int(min(1, step / (total_steps * bp_warmup_ratio)) * (bp_max - bp_min))``:
    grows linearly, as an integer, from ``bp_min`` to ``bp_max`` over the first
    ``bp_warmup_ratio`` of training, then stays at ``bp_max``.
    """
    warmup = total_steps * config.bp_warmup_ratio
    frac = 1.0 if warmup <= 0 else min(1.0, step / warmup)
    return config.bp_min + int(frac * (config.bp_max - config.bp_min))


PRESETS: dict[str, ModelConfig] = {
    # CPU demo: ~0.3M parameters with the byte tokenizer.
    "tiny": ModelConfig(vocab_size=260, hidden_size=64, num_heads=2, n_layers=4, max_seq_len=512),
    "small": ModelConfig(vocab_size=260, hidden_size=256, num_heads=4, n_layers=8, max_seq_len=2048),
    # The reference sizes (head dim 128); vocab of the reference's tokenizer.
    "B": ModelConfig(vocab_size=151808, hidden_size=1024, num_heads=8, n_layers=12, max_seq_len=4096),
    "L": ModelConfig(vocab_size=151808, hidden_size=1280, num_heads=10, n_layers=24, max_seq_len=4096),
    "XL": ModelConfig(vocab_size=151808, hidden_size=1536, num_heads=12, n_layers=32, max_seq_len=4096),
}


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark workload: a model and one packed row of ``tokens`` tokens, about
    ``supervised_fraction`` of them supervised, trained with ``bp_steps`` truncated-backprop
    steps (see :func:`hrm.bench.workloads.train_batch`)."""

    model: ModelConfig
    tokens: int
    supervised_fraction: float = 0.5
    bp_steps: int = 5
    median_seq_len: int = 270  # packed sequence lengths are log-normal around this


BENCH_CONFIGS: dict[str, BenchConfig] = {
    # The train-step benchmark: a 32K vocabulary, where the LM head dominates memory.
    "bench": BenchConfig(
        ModelConfig(vocab_size=32000, hidden_size=256, num_heads=4, n_layers=4, max_seq_len=4096), tokens=4096
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["ARCHS", "BENCH_CONFIGS", "BenchConfig", "ModelConfig", "PRESETS", "get_preset", "bp_steps_at", "round_up"]
