"""The one place that chooses a compute precision: ``fp32``, ``bf16`` autocast, or ``auto``.

``bf16`` is autocast to bfloat16 with fp32 master weights (norms, softmax and the loss stay
fp32 inside the ops). ``auto`` picks ``bf16`` where the device has fast bf16 for the work at
hand and ``fp32`` elsewhere, and logs what it picked:

- CUDA: bf16 tensor cores, i.e. compute capability 8.0 or newer (``torch.cuda.is_bf16_supported``
  also says yes on older GPUs, where bf16 is emulated and slow), for training and inference.
- CPU, training: bf16 where the CPU has AMX-BF16 tile instructions (Intel Xeon 4th
  generation, Sapphire Rapids, and later), fp32 elsewhere. Measured on such a CPU (2 cores,
  AMX-BF16; a bf16 matmul peak of 2453 GFLOP/s against 350 in fp32 in ``hrm bench``'s
  measurement): the demo's training, ``hrm train --preset tiny`` (1500 steps, backend
  ``cpu``), took 97 s in bf16 against 109 s in fp32, both at 100.0% held-out exact-match;
  ``hrm bench --suite train --quick --precision bf16`` (then ``fp32``) ran ``hrm train`` at
  the ``bench`` config at 4535 tokens/s in bf16 against 2106 in fp32 on backend ``cpu``.
  Without AMX, bf16 is slower: on an AMD EPYC with ``avx512_bf16`` (its bf16 matmul alone
  about 2.2x fp32), an earlier session measured 150 steps of the tiny model (``hrm train
  --preset tiny --steps 150 --eval-every 0 --eval-samples 100 --save-every 0``) at 445 s in
  bf16 against 83 s in fp32 on backend ``cpu`` (a loaded machine: rough times, ratios far
  from 1), and on a CPU without bf16
  instructions (an AMD EPYC with AVX2 only) ``hrm train`` at the ``bench`` config ran more
  than an order of magnitude slower in bf16 than in fp32.
- CPU, inference (``hrm generate``, ``hrm eval``), eager: fp32, AMX or not. Decoding runs a
  few rows per step, so it streams the weights, and autocast converts each one to bf16 at
  every call: on the AMX CPU above, ``hrm eval RUN --ema`` (500 held-out samples of the
  demo's model) took 13.2 s with ``--precision bf16`` against 10.0 s in fp32.
- CPU, inference with the decode step compiled (``--compile``): bf16 where the CPU has
  AMX-BF16. The compiled step freezes the weights, so they are cast to bf16 once, and half
  the bytes stream per step: ``hrm bench --suite generate`` gives the speed (README,
  "Generation and evaluation"), and the tokens that differ from fp32 are near-ties that
  bf16 rounding flips (its parity column counts any other).

``--precision bf16`` or ``fp32`` overrides the choice everywhere.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from hrm.errors import ConfigError

log = logging.getLogger("hrm")

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has the AMX-BF16 tile instructions (oneDNN then runs bf16 matmuls on them)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities and capabilities().get("amx_bf16", False))


def fast_bf16(device: torch.device | str, *, training: bool = True, compiled: bool = False) -> bool:
    """Whether bf16 autocast is the faster choice on ``device`` for training (``training``)
    or for inference, eager or with the decode step compiled (``compiled``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and (training or compiled) and cpu_has_amx_bf16()


def resolve_precision(
    name: str | None, device: torch.device | str, *, training: bool = True, compiled: bool = False
) -> str:
    """Turn ``name`` (``auto``, ``fp32``, ``bf16`` or ``None`` = ``auto``) into ``fp32`` or
    ``bf16`` for training (``training``) or inference (eager, or ``compiled``) on ``device``."""
    if name is None or name == "auto":
        chosen = "bf16" if fast_bf16(device, training=training, compiled=compiled) else "fp32"
        log.info("precision auto: using %s on %s", chosen, torch.device(device).type)
        return chosen
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return name


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (``fp32``: none)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


__all__ = ["PRECISIONS", "autocast", "cpu_has_amx_bf16", "fast_bf16", "resolve_precision"]
