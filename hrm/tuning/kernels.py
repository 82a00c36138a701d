"""The tunable Triton kernels: their names in tables, the sources their hash covers, their
shape buckets, search spaces, defaults and ahead-of-time specs.

Scope: the attention's three tiled kernels (``prefixlm_attention.fwd``, ``.dq``, ``.dkdv``),
tuned per bucket ``hd<head_dim>-<dtype>`` over ``block_m``, ``block_n``, ``num_warps`` and
``num_stages``. The row-wise kernels are not tuned (their tiles follow
:func:`hrm.ops.common.row_settings`); the static report covers them at their defaults.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import pkgutil
from dataclasses import dataclass

import torch

_ATTN = "hrm.ops.impl.prefixlm_attention.triton_kernels"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class TunableKernel:
    name: str  # "<op>.<kernel>", the key in tables
    field: str  # the AttentionConfig field it configures
    sources: tuple[str, ...]  # "module:attr" of the kernel and every @jit helper it calls


KERNELS = {
    k.name: k
    for k in (
        TunableKernel(
            "prefixlm_attention.fwd",
            "fwd",
            tuple(f"{_ATTN}:{f}" for f in ("_prefixlm_fwd_kernel", "_fwd_tiles", "_tile_range", "_tile_offset")),
        ),
        TunableKernel(
            "prefixlm_attention.dq",
            "dq",
            tuple(f"{_ATTN}:{f}" for f in ("_prefixlm_dq_kernel", "_dq_tiles", "_block_rows", "_tile_range")),
        ),
        TunableKernel(
            "prefixlm_attention.dkdv",
            "dkdv",
            tuple(f"{_ATTN}:{f}" for f in ("_prefixlm_dkdv_kernel", "_dkdv_tiles", "_block_rows", "_tile_range")),
        ),
    )
}


@functools.cache
def source_hash(kernel: TunableKernel) -> str:
    """sha256 (16 hex digits) of the Python source of the kernel and its helpers: a table
    entry measured for other source is stale."""
    h = hashlib.sha256()
    for ref in kernel.sources:
        fn = pkgutil.resolve_name(ref)
        h.update(inspect.getsource(getattr(fn, "fn", fn)).encode())
    return h.hexdigest()[:16]


# -- buckets ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    head_dim: int
    dtype: str  # a key of DTYPES

    @property
    def key(self) -> str:
        return f"hd{self.head_dim}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def attention_bucket(head_dim: int, dtype: torch.dtype) -> str:
    """The table bucket of an attention call (what :func:`attention_config` looks up)."""
    name = {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")
    return Bucket(head_dim, name).key


def preset_buckets(presets: list[str], dtypes: list[str]) -> list[Bucket]:
    """The attention buckets of the named model presets (and benchmark configs), in order."""
    from hrm.config import BENCH_CONFIGS, get_preset
    from hrm.errors import HrmError
    from hrm.ops.impl.prefixlm_attention.triton_kernels import TRITON_HEAD_DIMS

    out: list[Bucket] = []
    for p in presets:
        cfg = BENCH_CONFIGS[p].model if p in BENCH_CONFIGS else get_preset(p)
        if cfg.head_dim not in TRITON_HEAD_DIMS:
            continue
        for d in dtypes:
            if d not in DTYPES:
                raise HrmError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
            b = Bucket(cfg.head_dim, d)
            if b not in out:
                out.append(b)
    return out


# -- search spaces ----------------------------------------------------------------------------
def search_space(kernel: TunableKernel, bucket: Bucket) -> list[dict]:
    """Candidate configs, in a fixed order (ties go to the earlier one). Tiles of 16 to 128
    rows/keys, 4 or 8 warps, 1 to 3 stages; fp32 (exact dots, register-hungry) and head dim
    256 are capped at smaller tiles. The static report prunes what spills or overflows."""
    fp32 = bucket.dtype == "fp32"
    cap = 64 * 64 if fp32 else 128 * 64
    if bucket.head_dim >= 128 and fp32:
        cap //= 4
    if bucket.head_dim >= 256:
        cap //= 4
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (16, 32, 64, 128):
            if bm * bn > cap:
                continue
            for w in (4, 8):
                for s in (1, 2, 3):
                    out.append({"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": s})
    return out


def space_with_default(kernel: TunableKernel, bucket: Bucket, arch: str) -> list[dict]:
    """The search space with the architecture's default first (the tuner never loses it)."""
    default = default_config(kernel, bucket, arch)
    return [default] + [c for c in search_space(kernel, bucket) if c != default]


def default_config(kernel: TunableKernel, bucket: Bucket, arch: str) -> dict:
    from dataclasses import asdict

    from hrm.ops.impl.prefixlm_attention.triton_kernels import default_attention_config

    return asdict(getattr(default_attention_config(bucket.head_dim, bucket.torch_dtype, arch), kernel.field))


def aot_spec(kernel: TunableKernel, bucket: Bucket, config: dict, capability: int):
    """The :class:`hrm.ops.aot.KernelSpec` of ``kernel`` at ``config``."""
    from dataclasses import replace

    from hrm.ops.arch import arch_for_capability
    from hrm.ops.impl.prefixlm_attention import triton_kernels as tk

    base = tk.default_attention_config(bucket.head_dim, bucket.torch_dtype, arch_for_capability(capability).arch.name)
    cfg = replace(base, **{kernel.field: tk.KernelConfig(**config)})
    specs = tk.aot_specs(bucket.head_dim, bucket.torch_dtype, capability, cfg)
    return next(s for s in specs if s.name.split()[0] == kernel.field)


__all__ = [
    "DTYPES",
    "KERNELS",
    "Bucket",
    "TunableKernel",
    "aot_spec",
    "attention_bucket",
    "default_config",
    "preset_buckets",
    "search_space",
    "source_hash",
    "space_with_default",
]
