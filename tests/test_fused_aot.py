"""The fused norm / SwiGLU / RoPE / cross-entropy kernels compile ahead of time for sm_80 and
sm_90a at the tiles their launchers pick on a GPU (no GPU needed), without register spills."""

from __future__ import annotations

import shutil

import pytest
import torch

from hrm.ops.aot import compile_report, format_rows
from hrm.tuning.report import row_kernel_specs

pytest.importorskip("triton")


def _ptxas_missing() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return shutil.which(get_ptxas(90).path) is None
    except Exception:
        return True


@pytest.mark.skipif(_ptxas_missing(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_default_configs_compile_without_spills():
    # the benchmark config (d 256, head dim 64, 32K vocabulary) and the largest preset
    # (d 1536, SwiGLU width 4096, head dim 128, 152K vocabulary): the widest tiles
    all_specs = row_kernel_specs((torch.float32, torch.bfloat16))
    rows = compile_report(all_specs, (80, 90))
    table = format_rows(rows)
    assert len(rows) == 2 * len(all_specs) and {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    assert all(r["error"] is None for r in rows), table
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    assert all(0 < r["registers"] <= 255 for r in rows), table
