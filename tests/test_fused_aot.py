"""The fused norm / SwiGLU / RoPE / cross-entropy kernels compile ahead of time for sm_80 and
sm_90a at the tiles their launchers pick on a GPU (no GPU needed), without register spills."""

from __future__ import annotations

import shutil

import pytest
import torch

from hrm.config import BENCH_CONFIGS, get_preset
from hrm.ops.aot import compile_report, format_rows
from hrm.ops.impl import linear_cross_entropy, magicnorm_transition, rms_norm, split_rope, swiglu

pytest.importorskip("triton")


def _ptxas_missing() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return shutil.which(get_ptxas(90).path) is None
    except Exception:
        return True


def specs(config) -> list:
    """Every kernel at the shapes of ``config`` (a ModelConfig), in fp32 and bf16."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out += rms_norm.aot_specs(config.hidden_size, dtype)
        out += magicnorm_transition.aot_specs(config.hidden_size, dtype)
        out += swiglu.aot_specs(config.intermediate_size, dtype)
        out += split_rope.aot_specs(config.num_heads, config.head_dim, dtype)
        out += linear_cross_entropy.aot_specs(config.padded_vocab_size, dtype)
    return out


@pytest.mark.skipif(_ptxas_missing(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_default_configs_compile_without_spills():
    # the benchmark config (d 256, head dim 64, 32K vocabulary) and the largest preset
    # (d 1536, SwiGLU width 4096, head dim 128, 152K vocabulary): the widest tiles
    all_specs = specs(BENCH_CONFIGS["bench"].model) + specs(get_preset("XL"))
    rows = compile_report(all_specs, (80, 90))
    table = format_rows(rows)
    assert len(rows) == 2 * len(all_specs) and {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    assert all(r["error"] is None for r in rows), table
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    assert all(0 < r["registers"] <= 255 for r in rows), table
