"""The Triton attention kernels compile ahead of time for sm_80 and sm_90a at their default
configurations (no GPU needed), and none of them spills registers."""

import shutil

import pytest

from hrm.ops.aot import format_rows
from hrm.ops.impl.prefixlm_attention import triton_kernels

triton = pytest.importorskip("triton")


def _ptxas_missing() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return shutil.which(get_ptxas(90).path) is None
    except Exception:
        return True


@pytest.mark.skipif(_ptxas_missing(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_default_configs_compile_without_spills():
    import torch

    # bf16 shares fp16's tiles and code shape; fp16 stands for both here (aot_report covers all three)
    rows = triton_kernels.aot_report(head_dims=(64, 128), dtypes=(torch.float16, torch.float32), capabilities=(80, 90))
    table = format_rows(rows)
    assert len(rows) == 2 * 2 * 2 * 4
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90a"}
    assert all(r["error"] is None for r in rows), table
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    assert all(0 < r["registers"] <= 255 and r["shared_bytes"] <= 227 * 1024 for r in rows), table
