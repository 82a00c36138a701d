"""SwiGLU on the fused ``[gate | up]`` projection output: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrm.ops.dispatch import get_impl, register


@register("swiglu", "torch")
def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up``: ``[..., 2I]`` laid out ``[gate | up]``; returns ``[..., I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    return get_impl("swiglu", backend)(gate_up)
