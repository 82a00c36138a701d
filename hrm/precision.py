"""The one place that chooses a compute precision: ``fp32``, ``bf16`` autocast, or ``auto``.

``bf16`` is autocast to bfloat16 with fp32 master weights (norms, softmax and the loss stay
fp32 inside the ops). ``auto`` picks ``bf16`` where the device has fast bf16 and ``fp32``
elsewhere, and logs what it picked:

- CUDA: bf16 tensor cores, i.e. compute capability 8.0 or newer (``torch.cuda.is_bf16_supported``
  also says yes on older GPUs, where bf16 is emulated and slow).
- CPU: never. Measured on the development CPU (an AMD EPYC with ``avx512_bf16``; a bf16
  matmul alone runs about 2.2x fp32 there), ``hrm train --preset tiny --steps 150
  --eval-every 0 --eval-samples 100 --save-every 0`` (the demo's model) trained in 16 s on
  ``--backend torch --precision fp32`` and 903 s on ``--precision bf16``; 83 s (compiling
  included) on ``--backend cpu`` in fp32 and 445 s in bf16 (a shared machine, load about 5,
  so the times are rough; the ratios are far from 1). Why bf16 is that slow at these widths
  was not profiled; wide models may gain from ``--precision bf16`` (the README's benchmark
  table runs the ``bench`` config in bf16), so it stays one flag away.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from hrm.errors import ConfigError

log = logging.getLogger("hrm")

PRECISIONS = ("auto", "fp32", "bf16")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 autocast is the faster choice on ``device``."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(name: str | None, device: torch.device | str) -> str:
    """Turn ``name`` (``auto``, ``fp32``, ``bf16`` or ``None`` = ``auto``) into ``fp32`` or ``bf16``."""
    if name is None or name == "auto":
        chosen = "bf16" if fast_bf16(device) else "fp32"
        log.info("precision auto: using %s on %s", chosen, torch.device(device).type)
        return chosen
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return name


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (``fp32``: none)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


__all__ = ["PRECISIONS", "autocast", "fast_bf16", "resolve_precision"]
