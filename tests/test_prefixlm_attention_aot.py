"""The Triton attention kernels compile ahead of time for every architecture of
:data:`hrm.ops.arch.ARCHS` (sm_80, sm_86, sm_89, sm_90a, sm_120) at their default
configurations (no GPU needed): none of them spills registers, and each fits ITS
architecture's shared memory per block (163 KB on sm_80, 227 KB on sm_90a, 99 KB on the
others)."""

import shutil

import pytest

from hrm.ops.aot import format_rows
from hrm.ops.arch import ARCHS
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

    caps = tuple(a.capability for a in ARCHS.values())
    # bf16 shares fp16's tiles and code shape; fp16 stands for both here (aot_report covers all three)
    rows = triton_kernels.aot_report(head_dims=(64, 128), dtypes=(torch.float16, torch.float32), capabilities=caps)
    table = format_rows(rows)
    assert len(rows) == len(caps) * 2 * 2 * 4
    assert {r["arch"] for r in rows} == set(ARCHS)
    assert all(r["error"] is None for r in rows), table
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in rows), table
    assert all(0 < r["registers"] <= ARCHS[r["arch"]].max_regs_per_thread for r in rows), table
    over = [r for r in rows if r["shared_bytes"] > ARCHS[r["arch"]].smem_per_block]
    assert not over, format_rows(over)


def test_each_capability_gets_tiles_that_fit_its_shared_memory():
    """The 99 KB parts no longer get sm_90a's tiles; unknown capabilities take the nearest lower arch."""
    import torch

    from hrm.ops.arch import arch_for_capability

    assert arch_for_capability((8, 6)).arch.name == "sm_86"
    assert arch_for_capability((12, 0)).arch.name == "sm_120"
    m = arch_for_capability((8, 7))
    assert m.arch.name == "sm_86" and not m.exact and "not in the arch table" in m.note
    assert arch_for_capability((10, 0)).arch.name == "sm_90a"
    for cap in ((8, 6), (8, 9), (12, 0)):
        assert triton_kernels.attention_config(128, torch.bfloat16, cap) == triton_kernels.default_attention_config(
            128, torch.bfloat16, "sm_80"
        )
        assert triton_kernels.attention_config(128, torch.bfloat16, cap) != triton_kernels.default_attention_config(
            128, torch.bfloat16, "sm_90a"
        )
    assert triton_kernels.attention_config(128, torch.bfloat16, (9, 0)) == triton_kernels.default_attention_config(
        128, torch.bfloat16, "sm_90a"
    )
