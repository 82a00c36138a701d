"""Rotary position embedding, rotate-half convention, fp32 cos/sin.

For a head vector ``x`` of even size ``hd`` at position ``p``:
``inv_freq[i] = theta ** (-2i / hd)``, ``angle = p * [inv_freq, inv_freq]`` and
``rope(x) = x * cos(angle) + rotate_half(x) * sin(angle)`` with
``rotate_half([a, b]) = [-b, a]``. Positions restart at 0 for every packed sequence.
"""

from __future__ import annotations

import torch

from hrm.ops.dispatch import get_impl, register
from hrm.ops.rmsnorm import compute_dtype


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` of shape ``[T, head_dim]`` for the given positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@register("rope", "torch")
def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x``: ``[T, heads, hd]``; ``cos``/``sin``: ``[T, hd]``. Computes in fp32 (fp64 for fp64)."""
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    c, s = cos.to(dt)[:, None, :], sin.to(dt)[:, None, :]
    return (xf * c + rotate_half(xf) * s).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Apply RoPE to ``x`` of shape ``[T, heads, head_dim]``."""
    return get_impl("rope", backend)(x, cos, sin)
