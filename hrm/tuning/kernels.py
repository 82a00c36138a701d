"""The tunable Triton kernels: their names in tables, the sources their hash covers, their
shape buckets, search spaces, defaults and ahead-of-time specs.

The attention's three tiled kernels (``prefixlm_attention.fwd``, ``.dq``, ``.dkdv``, in
:data:`KERNELS`), tuned per bucket ``hd<head_dim>-<dtype>`` over ``block_m``, ``block_n``,
``num_warps`` and ``num_stages``; and the row-wise kernels (norms, transition, SwiGLU, RoPE
split, cross-entropy chunk, in :data:`ROW_KERNELS`), tuned per bucket ``w<row width>-<dtype>``
over ``block_rows`` and ``num_warps`` (their default: :func:`hrm.ops.common.row_settings`).
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
def source_hash(kernel) -> str:
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


# -- the row-wise kernels -------------------------------------------------------------------------
_OPS = "hrm.ops.impl"


@dataclass(frozen=True)
class RowKernel:
    """A row-wise kernel: ``block_rows`` rows of ``width`` per program, ``num_warps``."""

    name: str  # "<op>.<fwd|bwd|chunk>", the key in tables and what its launcher looks up
    op: str  # module under hrm.ops.impl
    spec: str  # the name (first word) of its aot_specs entry checked by the static report
    width: str  # which preset size is its row width: hidden, intermediate, qkv, vocab
    sources: tuple[str, ...]  # "module:attr" of the kernel, its @jit helpers and its tile picker


def _row(name: str, op: str, spec: str, width: str, *fns: str) -> RowKernel:
    return RowKernel(name, op, spec, width, tuple(f"{_OPS}.{op}:{f}" for f in fns))


ROW_KERNELS = {
    k.name: k
    for k in (
        _row("rms_norm.fwd", "rms_norm", "rms_norm_fwd+residual", "hidden", "_rms_norm_fwd_kernel", "row_tiles"),
        _row("rms_norm.bwd", "rms_norm", "rms_norm_bwd+residual", "hidden", "_rms_norm_bwd_kernel", "row_tiles"),
        _row(
            "magicnorm_transition.fwd",
            "magicnorm_transition",
            "magicnorm_transition_fwd",
            "hidden",
            "_transition_fwd_kernel",
            "row_tiles",
        ),
        _row(
            "magicnorm_transition.bwd",
            "magicnorm_transition",
            "magicnorm_transition_bwd",
            "hidden",
            "_transition_bwd_kernel",
            "row_tiles",
        ),
        _row("swiglu.fwd", "swiglu", "swiglu_fwd", "intermediate", "_swiglu_fwd_kernel", "_swiglu_tile", "_tiles"),
        _row("swiglu.bwd", "swiglu", "swiglu_bwd", "intermediate", "_swiglu_bwd_kernel", "_swiglu_tile", "_tiles"),
        _row(
            "split_rope.fwd",
            "split_rope",
            "split_rope_fwd",
            "qkv",
            "_split_rope_fwd_kernel",
            "_rope_tile",
            "_store_pair",
            "_tiles",
        ),
        _row(
            "split_rope.bwd",
            "split_rope",
            "split_rope_bwd",
            "qkv",
            "_split_rope_bwd_kernel",
            "_rope_tile",
            "_store_pair",
            "_tiles",
        ),
        _row(
            "linear_cross_entropy.chunk",
            "linear_cross_entropy",
            "ce_chunk+grad",
            "vocab",
            "_ce_chunk_kernel",
            "_ce_tiles",
        ),
    )
}
ALL_KERNELS: dict = {**KERNELS, **ROW_KERNELS}
ROW_HEAD_DIM = 128  # split_rope's row width heads x head_dim is tuned as width / 128 heads of 128 (else 64)


@dataclass(frozen=True)
class RowBucket:
    width: int  # the launcher's row width: hidden / SwiGLU / heads x head_dim / vocab
    dtype: str

    @property
    def key(self) -> str:
        return f"w{self.width}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def head_dim(self) -> int:  # for split_rope's inputs
        return ROW_HEAD_DIM if self.width % ROW_HEAD_DIM == 0 else 64


def row_bucket(width: int, dtype: torch.dtype) -> str | None:
    """The table bucket of a row-wise launch (``None``: a dtype no table holds, e.g. fp64)."""
    name = {v: k for k, v in DTYPES.items()}.get(dtype)
    return None if name is None else RowBucket(width, name).key


def row_widths(presets: list[str]) -> dict[str, list[int]]:
    """The row widths of the presets (and benchmark configs), per width kind, in order."""
    from hrm.config import BENCH_CONFIGS, get_preset

    out: dict[str, list[int]] = {"hidden": [], "intermediate": [], "qkv": [], "vocab": []}
    for p in presets:
        cfg = BENCH_CONFIGS[p].model if p in BENCH_CONFIGS else get_preset(p)
        sizes = {
            "hidden": cfg.hidden_size,
            "intermediate": cfg.intermediate_size,
            "qkv": cfg.num_heads * cfg.head_dim,
            "vocab": cfg.padded_vocab_size,
        }
        for kind, w in sizes.items():
            if w not in out[kind]:
                out[kind].append(w)
    return out


def row_preset_buckets(kernel: RowKernel, presets: list[str], dtypes: list[str]) -> list[RowBucket]:
    """``kernel``'s buckets: its row widths in the presets x ``dtypes``."""
    from hrm.errors import HrmError

    for d in dtypes:
        if d not in DTYPES:
            raise HrmError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    return [RowBucket(w, d) for w in row_widths(presets)[kernel.width] for d in dtypes]


def _op_module(op: str):
    """The ``hrm.ops.impl`` module of a row-wise op (imported here: the ops import this package's
    lookup lazily)."""
    from hrm.ops.impl import linear_cross_entropy, magicnorm_transition, rms_norm, split_rope, swiglu

    modules = {
        m.__name__.rsplit(".", 1)[1]: m
        for m in (linear_cross_entropy, magicnorm_transition, rms_norm, split_rope, swiglu)
    }
    return modules[op]


def _row_tiles_fn(kernel: RowKernel, bucket: RowBucket, rows: int, target: str = "gpu") -> tuple[int, int, int]:
    """``(block_rows, block_cols, num_warps)`` the launcher picks for ``rows`` rows today."""
    mod = _op_module(kernel.op)
    w = bucket.width
    if kernel.op in ("rms_norm", "magicnorm_transition"):
        _, br, bc, nw = mod.row_tiles(rows, w, target)
    elif kernel.op == "swiglu":
        _, br, bc, nw = mod._tiles(rows, w, target)
    elif kernel.op == "split_rope":
        hd = bucket.head_dim
        _, br, bj, nw = mod._tiles(rows, w // hd, hd, target)
        bc = 2 * bj
    else:
        _, br, bc, nw = mod._ce_tiles(mod.default_chunk_rows(w), w, target)
    return br, bc, nw


ROW_DEFAULT_ROWS = 8192  # the rows the defaults (and the AOT specs) are taken at


def default_row_config(kernel: RowKernel, bucket: RowBucket) -> dict:
    """What the launcher picks today on a GPU (``row_settings``) at many rows."""
    br, _, nw = _row_tiles_fn(kernel, bucket, ROW_DEFAULT_ROWS)
    return {"block_rows": br, "num_warps": nw}


def row_search_space(kernel: RowKernel, bucket: RowBucket) -> list[dict]:
    """``block_rows`` a power of two from 1 to 64 with at most 16K elements per program
    (a program of one row always stays), ``num_warps`` 2, 4, 8, 16; the static report
    prunes what spills. Default first."""
    _, bc, _ = _row_tiles_fn(kernel, bucket, ROW_DEFAULT_ROWS)
    out = [default_row_config(kernel, bucket)]
    for br in (1, 2, 4, 8, 16, 32, 64):
        if br > 1 and br * bc > 16384:
            continue
        for w in (2, 4, 8, 16):
            c = {"block_rows": br, "num_warps": w}
            if c not in out:
                out.append(c)
    return out


def row_aot_spec(kernel: RowKernel, bucket: RowBucket, config: dict, capability: int = 80):
    """The :class:`hrm.ops.aot.KernelSpec` of ``kernel`` at ``config`` (the launcher's block
    columns; ``block_rows`` / ``num_warps`` from ``config``)."""
    from dataclasses import replace

    mod = _op_module(kernel.op)
    w, dt = bucket.width, bucket.torch_dtype
    if kernel.op == "split_rope":
        specs = mod.aot_specs(w // bucket.head_dim, bucket.head_dim, dt)
    else:
        specs = mod.aot_specs(w, dt)
    spec = next(s for s in specs if s.name.split()[0] == kernel.spec)
    rows_key = "BLOCK_T" if "BLOCK_T" in spec.constexprs else "BLOCK_ROWS"
    return replace(
        spec,
        constexprs={**spec.constexprs, rows_key: int(config["block_rows"])},
        num_warps=int(config["num_warps"]),
    )


__all__ = [
    "ALL_KERNELS",
    "DTYPES",
    "KERNELS",
    "ROW_KERNELS",
    "RowBucket",
    "RowKernel",
    "default_row_config",
    "row_aot_spec",
    "row_bucket",
    "row_preset_buckets",
    "row_search_space",
    "row_widths",
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
