"""Cross-entropy over supervised tokens, in fp32 (fp64 for fp64 logits).

``loss = sum_{t: labels[t] != ignore} (logsumexp(logits[t]) - logits[t, labels[t]])``,
optionally divided by the number of supervised tokens (``reduction="mean"``; 0 when
there are none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrm.ops.common import compute_dtype
from hrm.ops.dispatch import get_impl, register

IGNORE_INDEX = -100


@register("cross_entropy", "torch")
def cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    total = F.cross_entropy(
        logits.to(compute_dtype(logits.dtype)), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "sum", backend: str | None = None
) -> torch.Tensor:
    """``logits [N, V]``, ``labels [N]`` with ``-100`` = ignore."""
    return get_impl("cross_entropy", backend)(logits, labels, reduction)
