"""HRM-Text: a hierarchical recurrent language model (and a plain Transformer baseline).

Reads top to bottom: Attention, MLP, Block, Stack (MagicNorm: pre-norm blocks + exit
RMSNorm), then the model. All tensors are *packed*: ``T`` tokens of several sequences back
to back, described by ``cu_seqlens [N+1]`` and ``prefix_lens [N]`` (DESIGN.md, "Data and
the training objective"). The exact semantics are in DESIGN.md, "Model semantics".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hrm import ops
from hrm.config import ModelConfig
from hrm.errors import ConfigError
from hrm.ops.cross_entropy import IGNORE_INDEX


class AttentionCache(Protocol):
    """Replaces packed PrefixLM attention during generation (see :mod:`hrm.inference`)."""

    def attend(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               gate: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Packing:
    """Per-forward context shared by every block: the packing, RoPE tables, backend, cache."""

    cu_seqlens: torch.Tensor  # int32 [N+1]
    prefix_lens: torch.Tensor  # int32 [N]
    cos: torch.Tensor  # fp32 [T, head_dim]
    sin: torch.Tensor  # fp32 [T, head_dim]
    backend: str
    cache: AttentionCache | None = None


def trunc_normal_(w: torch.Tensor, std: float) -> torch.Tensor:
    """Normal truncated at +-3 std, rescaled so that the result has standard deviation ``std``."""
    with torch.no_grad():
        nn.init.trunc_normal_(w, mean=0.0, std=1.0, a=-3.0, b=3.0)
        return w.mul_(1.014762601732121 * std)  # 1 / std of the unit normal truncated at 3


class Linear(nn.Linear):
    """Bias-free linear layer with truncated LeCun-normal init (std ``1/sqrt(fan_in)``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, 1.0 / math.sqrt(self.in_features))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        width = config.num_heads * config.head_dim
        self.gqkv_proj = Linear(config.hidden_size, 4 * width)  # rows [gate | q | k | v]
        self.o_proj = Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: Packing, slot: int) -> torch.Tensor:
        T = x.shape[0]
        gqkv = self.gqkv_proj(x).view(T, 4 * self.num_heads, self.head_dim)  # [T, 4*nh, hd]
        gate, q, k, v = gqkv.split(self.num_heads, dim=1)  # each [T, nh, hd]
        q = ops.rope(q, ctx.cos, ctx.sin, backend=ctx.backend)
        k = ops.rope(k, ctx.cos, ctx.sin, backend=ctx.backend)
        if ctx.cache is not None:
            o = ctx.cache.attend(slot, q, k, v, gate)
        else:
            o = ops.prefixlm_attention(q, k, v, ctx.cu_seqlens, ctx.prefix_lens, gate=gate, backend=ctx.backend)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)  # rows [gate | up]
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: Packing) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_up_proj(x), backend=ctx.backend))


class Block(nn.Module):
    """Pre-norm block: ``x += Attn(rms(x)); x += MLP(rms(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: Packing, slot: int) -> torch.Tensor:
        x = x + self.attn(ops.rms_norm(x, self.eps, backend=ctx.backend), ctx, slot)
        return x + self.mlp(ops.rms_norm(x, self.eps, backend=ctx.backend), ctx)


class Stack(nn.Module):
    """MagicNorm module: pre-norm blocks, then one parameterless RMSNorm at the exit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers_per_stack))

    def forward(self, x: torch.Tensor, ctx: Packing, call: int) -> torch.Tensor:
        """``call`` numbers the stack invocations of one forward; it names KV-cache slots."""
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, call * len(self.layers) + i)
        return ops.rms_norm(x, self.eps, backend=ctx.backend)


def grad_steps(config: ModelConfig, bp_steps: int | None) -> tuple[int, int]:
    """``(H_bp, L_bp)``: how many of the last H-steps and last L-steps run with gradients.

    ``H_bp = min(H_cycles, bp - 1)``, ``L_bp = bp - H_bp``; ``None`` means every step.
    """
    if bp_steps is None:
        return config.H_cycles, config.H_cycles * config.L_cycles
    if bp_steps < 1:
        raise ConfigError(f"bp_steps must be >= 1, got {bp_steps}")
    h_bp = min(config.H_cycles, bp_steps - 1)
    return h_bp, bp_steps - h_bp


class HRMText(nn.Module):
    """HRM-Text language model on packed batches.

    ``forward(input_ids, position_ids, cu_seqlens, prefix_lens)`` returns logits
    ``[T, padded_vocab]``; with ``labels`` it returns ``(loss, metrics)`` where ``loss`` is
    the cross-entropy summed over supervised tokens divided by their count (or by
    ``loss_divisor``, e.g. the mean count across data-parallel ranks) and the LM head runs
    only on supervised rows.
    """

    def __init__(self, config: ModelConfig, *, backend: str | None = "torch") -> None:
        super().__init__()
        self.config = config
        self.backend = ops.resolve_backend(backend)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, d)
        if config.arch == "hrm":
            self.H_level = Stack(config)
            self.L_level = Stack(config)
            self.register_buffer("z_L_init", torch.empty(d))
        else:
            self.H_level = Stack(config)
        self.lm_head = Linear(d, config.padded_vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.embed_tokens.weight, self.config.embed_std)
        if self.config.arch == "hrm":
            trunc_normal_(self.z_L_init, 1.0)
        for module in self.modules():
            if isinstance(module, Linear):
                module.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ---------------------------------------------------------------------------
    def packing(self, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                cache: AttentionCache | None = None) -> Packing:
        cos, sin = ops.rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        return Packing(cu_seqlens, prefix_lens, cos, sin, self.backend, cache)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                      prefix_lens: torch.Tensor, *, bp_steps: int | None = None,
                      cache: AttentionCache | None = None) -> torch.Tensor:
        """The final state ``z_H`` ``[T, d]`` (the LM head's input)."""
        ctx = self.packing(position_ids, cu_seqlens, prefix_lens, cache)
        x = self.embed_tokens(input_ids) * (1.0 / self.config.embed_std)  # [T, d]
        if self.config.arch == "transformer":
            return self.H_level(x, ctx, 0)
        return self._recurrence(x, ctx, bp_steps)

    def _recurrence(self, x: torch.Tensor, ctx: Packing, bp_steps: int | None) -> torch.Tensor:
        """``for h: (repeat L: z_L = L(z_L + z_H)); z_H = H(z_H + z_L)`` with truncated backprop:
        only the last ``L_bp`` L-steps and last ``H_bp`` H-steps (counted over the whole
        forward) run with gradients."""
        cfg = self.config
        h_bp, l_bp = grad_steps(cfg, bp_steps)
        grad = torch.is_grad_enabled()
        z_H, z_L = x, self.z_L_init.to(x.dtype)  # z_L broadcasts over tokens until the first step
        call = 0
        for h in range(cfg.H_cycles):
            for l in range(cfg.L_cycles):
                with torch.set_grad_enabled(grad and h * cfg.L_cycles + l >= cfg.H_cycles * cfg.L_cycles - l_bp):
                    z_L = self.L_level(z_L + z_H, ctx, call)
                call += 1
            with torch.set_grad_enabled(grad and h >= cfg.H_cycles - h_bp):
                z_H = self.H_level(z_H + z_L, ctx, call)
            call += 1
        return z_H

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                prefix_lens: torch.Tensor, labels: torch.Tensor | None = None, *, bp_steps: int | None = None,
                loss_divisor: torch.Tensor | float | None = None) -> Any:
        z = self.hidden_states(input_ids, position_ids, cu_seqlens, prefix_lens, bp_steps=bp_steps)
        if labels is None:
            return self.lm_head(z)
        return self.loss(z, labels, cu_seqlens, loss_divisor)

    def loss(self, z: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
             loss_divisor: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Response-only loss: the LM head runs on supervised rows only."""
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # [S]
        targets = labels[rows]
        logits = self.lm_head(z[rows])  # [S, V]
        loss_sum = ops.cross_entropy(logits, targets, reduction="sum", backend=self.backend)
        count = rows.numel()
        divisor = loss_divisor if loss_divisor is not None else max(count, 1)
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
            seq = torch.searchsorted(cu_seqlens[1:].to(rows.dtype), rows, right=True)  # sequence of each row
            n_seq = cu_seqlens.numel() - 1
            supervised = torch.zeros(n_seq, dtype=torch.long, device=z.device).index_add_(0, seq, torch.ones_like(seq))
            right = torch.zeros_like(supervised).index_add_(0, seq, correct.long())
            has = supervised > 0
            metrics = {
                "loss_sum": loss_sum.detach().float(),
                "num_supervised": torch.tensor(count, device=z.device),
                "num_correct": correct.sum(),
                "num_sequences": has.sum(),
                "num_exact": ((right == supervised) & has).sum(),
            }
        return loss_sum / divisor, metrics


__all__ = ["HRMText", "Packing", "AttentionCache", "grad_steps"]
