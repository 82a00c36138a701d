"""HRM-Text: a hierarchical recurrent language model, and its baselines (a plain Transformer,
and a universal-transformer-style model: one shared stack looped).

Reads top to bottom: Attention, MLP, Block, Stack (MagicNorm: pre-norm blocks + exit
RMSNorm), then the model. All tensors are *packed*: ``T`` tokens of several sequences back
to back, described by ``cu_seqlens [N+1]`` and ``prefix_lens [N]`` (docs/design.md, "Data
and the training objective"). The exact semantics are in docs/design.md, "Model semantics".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hrm import ops, profiling
from hrm.config import ModelConfig
from hrm.errors import ConfigError
from hrm.ops import IGNORE_INDEX


class AttentionCache(Protocol):
    """Replaces packed PrefixLM attention during generation (see :mod:`hrm.inference`)."""

    def attend(
        self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class Packing:
    """Per-forward context shared by every block: the packing, RoPE tables, backend, cache."""

    attention: ops.AttentionPacking | None  # None when a cache does the attending
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
        with profiling.range("attn"):
            return self._forward(x, ctx, slot)

    def _forward(self, x: torch.Tensor, ctx: Packing, slot: int) -> torch.Tensor:
        T = x.shape[0]
        gqkv = self.gqkv_proj(x).view(T, 4 * self.num_heads, self.head_dim)  # [T, 4*nh, hd]
        gate, q, k, v = ops.split_rope(gqkv, ctx.cos, ctx.sin, backend=ctx.backend)  # each [T, nh, hd]; q, k rotated
        if ctx.cache is not None:
            o = ctx.cache.attend(slot, q, k, v, gate)
        else:
            o = ops.prefixlm_attention(q, k, v, ctx.attention, gate=gate, backend=ctx.backend)
        return self.o_proj(o.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)  # rows [gate | up]
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: Packing) -> torch.Tensor:
        with profiling.range("mlp"):
            # the up-projection and its activation as one op: the `cuda` backend's GEMM applies
            # the SwiGLU in its epilogue, so [T, 2I] never reaches memory; others run F.linear + swiglu
            return self.down_proj(ops.swiglu_linear(x, self.gate_up_proj.weight, backend=ctx.backend))


class Block(nn.Module):
    """Pre-norm block: ``x += Attn(rms(x)); x += MLP(rms(x))``.

    Every add is fused with the norm that follows it, so the block takes the residual
    stream with its norm ``n = rms(x)`` and leaves its last add pending: it returns
    ``(x + Attn(n), MLP(rms(x + Attn(n))))`` and the caller adds the second part. A norm
    that only feeds linear layers comes out in their dtype (:func:`hrm.ops.linear_dtype`:
    autocast's), the cast they would make fused into it.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, n: torch.Tensor, ctx: Packing, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(n, ctx, slot)
        with profiling.range("norm"):
            x, n = ops.add_rms_norm(a, x, self.eps, backend=ctx.backend, out_dtype=ops.linear_dtype(x))
        return x, self.mlp(n, ctx)


class Stack(nn.Module):
    """MagicNorm module: pre-norm blocks, then one parameterless RMSNorm at the exit."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers_per_stack))

    def forward(self, x: torch.Tensor, ctx: Packing, call: int) -> torch.Tensor:
        """``rms(blocks(x))``; ``call`` numbers the stack invocations of one forward (it names
        KV-cache slots)."""
        with profiling.range("norm"):
            n = ops.rms_norm(x, self.eps, backend=ctx.backend, out_dtype=ops.linear_dtype(x))
        x, delta = self.run(x, n, ctx, call)
        with profiling.range("norm"):
            return ops.add_rms_norm(delta, x, self.eps, backend=ctx.backend)[1]

    def run(self, x: torch.Tensor, n: torch.Tensor, ctx: Packing, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks on the residual stream ``x`` with ``n = rms(x)``. Returns ``(x, delta)``:
        the stream before the last block's MLP add, and that MLP's output. The caller fuses
        ``rms(x + delta)`` (the exit norm) with whatever comes next."""
        delta = None
        for i, layer in enumerate(self.layers):
            if delta is not None:
                with profiling.range("norm"):
                    x, n = ops.add_rms_norm(delta, x, self.eps, backend=ctx.backend, out_dtype=ops.linear_dtype(x))
            x, delta = layer(x, n, ctx, call * len(self.layers) + i)
        return x, delta


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


def stack_calls(config: ModelConfig, bp_steps: int | None, grad: bool = True) -> list[tuple[str, bool]]:
    """The stack invocations of one forward in call order: ``(level, runs with gradients)``.

    ``hrm``: ``for h: (repeat L: "L"); "H"`` with the last ``L_bp`` L-steps and the last
    ``H_bp`` H-steps (:func:`grad_steps`) under gradients. ``ut``: the one stack ``"L"``
    looped ``num_stack_calls`` times, the last ``bp_steps`` loops under gradients.
    ``transformer``: one ``"H"`` call. ``grad=False``: every call without gradients.
    """
    if config.arch == "transformer":
        return [("H", grad)]
    n = config.num_stack_calls
    if config.arch == "ut":
        with_grad = sum(grad_steps(config, bp_steps))  # bp_steps (None: n)
        return [("L", grad and i >= n - with_grad) for i in range(n)]
    h_bp, l_bp = grad_steps(config, bp_steps)
    steps: list[tuple[str, bool]] = []
    for h in range(config.H_cycles):
        steps += [
            ("L", grad and h * config.L_cycles + l >= config.H_cycles * config.L_cycles - l_bp)
            for l in range(config.L_cycles)
        ]
        steps.append(("H", grad and h >= config.H_cycles - h_bp))
    return steps


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
        if config.arch != "ut":
            self.H_level = Stack(config)
        if config.arch != "transformer":
            self.L_level = Stack(config)  # ut: the one shared stack
            self.register_buffer("z_L_init", torch.empty(d))
        self.lm_head = Linear(d, config.padded_vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.embed_tokens.weight, self.config.embed_std)
        if self.config.arch != "transformer":
            trunc_normal_(self.z_L_init, 1.0)
        for module in self.modules():
            if isinstance(module, Linear):
                module.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------------
    def packing(
        self,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        prefix_lens: torch.Tensor,
        cache: AttentionCache | None = None,
        attention: ops.AttentionPacking | None = None,
        backend: str | None = None,
    ) -> Packing:
        """The per-forward context. ``attention`` is the batch's prebuilt packing; without it one
        is built here from ``cu_seqlens`` / ``prefix_lens`` (a host read of both), unless a
        cache does the attending. What the backend's attention derives from the packing for
        this forward's dtype (the Triton tile ranges) is computed here, once. ``backend``
        overrides the model's for this forward (a compiled decode step runs the references)."""
        T = position_ids.shape[0]
        backend = backend or self.backend
        if attention is None and cache is None:
            attention = ops.AttentionPacking.build(cu_seqlens, prefix_lens, T)
        if attention is not None:
            if attention.num_tokens != T:
                raise ConfigError(f"the packing describes {attention.num_tokens} tokens, the batch has {T}")
            device = position_ids.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.lm_head.weight.dtype
            attention = ops.prepare_packing(attention, self.config.head_dim, dtype, backend)
        cos, sin = ops.rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        return Packing(attention, cos, sin, backend, cache)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        prefix_lens: torch.Tensor,
        *,
        bp_steps: int | None = None,
        cache: AttentionCache | None = None,
        packing: ops.AttentionPacking | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """The final state ``z_H`` ``[T, d]`` (the LM head's input); ``backend`` as in :meth:`packing`."""
        with profiling.range("embed"):
            ctx = self.packing(position_ids, cu_seqlens, prefix_lens, cache, packing, backend)
            x = ops.embedding(
                input_ids, self.embed_tokens.weight, 1.0 / self.config.embed_std, backend=ctx.backend
            )  # [T, d]
        if self.config.arch == "transformer":
            with profiling.range("H0"):
                return self.H_level(x, ctx, 0)
        return self._recurrence(x, ctx, bp_steps)

    def _recurrence(self, x: torch.Tensor, ctx: Packing, bp_steps: int | None) -> torch.Tensor:
        """``for h: (repeat L: z_L = L(z_L + z_H)); z_H = H(z_H + z_L)`` with truncated backprop:
        only the last ``L_bp`` L-steps and last ``H_bp`` H-steps (counted over the whole
        forward) run with gradients; the others run forward-only under no-grad. ``ut`` runs
        only L-steps, ``z_L = L(z_L + x)`` (``z_H`` stays the embedding), and returns ``z_L``
        (see :func:`stack_calls`).

        Each seam between two stack calls is one fused MagicNorm transition: the finished
        stack's last residual add and exit norm, the next injection add and the next
        block's pre-norm. A transition runs with gradients when either side does; the new
        state is cut from the graph when its own step had none, the next input when the
        next step has none.
        """
        cfg, eps, backend = self.config, self.config.norm_eps, ctx.backend
        steps = stack_calls(cfg, bp_steps, torch.is_grad_enabled())
        z = {"H": x, "L": self.z_L_init.to(x.dtype).expand_as(x)}  # z_L broadcasts over tokens
        lowp = ops.linear_dtype(x)  # the pre-norms' dtype: the first block's projections'
        with torch.set_grad_enabled(steps[0][1]), profiling.range("norm"):
            u, n = ops.add_rms_norm(z["L"], z["H"], eps, backend=backend, out_dtype=lowp)  # first injection, pre-norm
        for call, (level, with_grad) in enumerate(steps):
            stack = self.L_level if level == "L" else self.H_level
            name = f"U{call}" if cfg.arch == "ut" else profiling.stack_range_name(level, call, cfg.L_cycles)
            with torch.set_grad_enabled(with_grad), profiling.range(name):
                x, delta = stack.run(u, n, ctx, call)
            if call == len(steps) - 1:
                break
            next_grad = steps[call + 1][1]
            other = z["H" if level == "L" else "L"]
            with torch.set_grad_enabled(with_grad or next_grad), profiling.range("norm"):
                new, u, n = ops.magicnorm_transition(x, delta, other, eps, backend=backend, out_dtype=lowp)
            z[level] = new if with_grad else new.detach()
            if not next_grad:
                u, n = u.detach(), n.detach()
        with torch.set_grad_enabled(steps[-1][1]), profiling.range("norm"):
            return ops.add_rms_norm(delta, x, eps, backend=backend)[1]  # the last H step's exit norm: z_H

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        prefix_lens: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        bp_steps: int | None = None,
        loss_divisor: torch.Tensor | float | None = None,
        packing: ops.AttentionPacking | None = None,
        supervised_rows: torch.Tensor | None = None,
    ) -> Any:
        """``packing`` (the batch's :class:`~hrm.ops.AttentionPacking`) and ``supervised_rows``
        (:func:`~hrm.ops.supervised_rows` of ``labels``) are derived once per batch where it is
        built (:class:`hrm.data.PackedBatch` carries both); without them the forward derives
        them itself, which reads the packing and the labels' count back to the host."""
        z = self.hidden_states(input_ids, position_ids, cu_seqlens, prefix_lens, bp_steps=bp_steps, packing=packing)
        with profiling.range("loss"):
            if labels is None:
                return self.lm_head(z)
            return self.loss(z, labels, cu_seqlens, loss_divisor, supervised_rows)

    def loss(
        self,
        z: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor,
        loss_divisor: torch.Tensor | float | None = None,
        supervised_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Response-only loss: the LM head runs on supervised rows only (fused with the
        cross-entropy, in token chunks, on the fused backends)."""
        loss_sum, pred = ops.linear_cross_entropy(
            z, self.lm_head.weight, labels, rows=supervised_rows, backend=self.backend
        )
        supervised = labels != IGNORE_INDEX  # [T]
        count = supervised.sum()
        divisor = loss_divisor if loss_divisor is not None else count.clamp(min=1)
        with torch.no_grad():
            correct = supervised & (pred == labels)
            n_seq = cu_seqlens.numel() - 1
            positions = torch.arange(labels.numel(), device=z.device)
            seq = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)  # padding: n_seq
            per_seq = torch.zeros(n_seq + 1, dtype=torch.long, device=z.device)
            sup_per_seq = per_seq.index_add(0, seq, supervised.long())[:n_seq]
            right_per_seq = per_seq.index_add(0, seq, correct.long())[:n_seq]
            has = sup_per_seq > 0
            metrics = {
                "loss_sum": loss_sum.detach().float(),
                "num_supervised": count,
                "num_correct": correct.sum(),
                "num_sequences": has.sum(),
                "num_exact": ((right_per_seq == sup_per_seq) & has).sum(),
            }
        return loss_sum / divisor, metrics


__all__ = ["HRMText", "Packing", "AttentionCache", "grad_steps", "stack_calls"]
