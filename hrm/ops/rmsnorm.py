"""Parameterless RMSNorm (every norm in HRM-Text has no learned scale).

``y = x / sqrt(mean(x**2, -1) + eps)``, computed in at least fp32 and returned in the
input dtype.
"""

from __future__ import annotations

import torch

from hrm.ops.dispatch import get_impl, register


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms, RoPE and losses compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@register("rms_norm", "torch")
def rms_norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.to(compute_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """Parameterless RMSNorm over the last dimension."""
    return get_impl("rms_norm", backend)(x, eps)
