"""The Triton PrefixLM attention kernels against the fp64 oracle, under ``TRITON_INTERPRET=1``
on a CPU (for real on a GPU): forward, dq, dk, dv, dgate; fp32 and fp16 inputs, and bf16 on a
GPU (the interpreter mishandles bf16 arithmetic). Same tolerance rule as test_prefixlm_attention.py.
"""

import pytest
import torch
from attention_oracle import DEGENERATE, attention, dense_attention, make_packing, packing
from hypothesis import given, settings
from hypothesis import strategies as st
from test_prefixlm_attention import assert_within, attention_errors

from hrm import ops
from hrm.ops import dispatch
from hrm.ops.impl.prefixlm_attention import packing as layout
from hrm.ops.impl.prefixlm_attention import triton_kernels as tk

pytestmark = pytest.mark.skipif(
    dispatch.unavailable_reason("triton") is not None, reason=f"triton backend: {dispatch.unavailable_reason('triton')}"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16 under the interpreter (it mishandles bf16 arithmetic); bf16 too on a GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def run_triton(q, k, v, cu, pl, gate):
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return attention(dev(q), dev(k), dev(v), dev(cu), dev(pl), gate=dev(gate), backend="triton").cpu()


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_triton_matches_fp64(data):
    cu, pl, T = packing(data.draw, max_seqs=5, max_len=40, max_pad=20)
    H, D = data.draw(st.sampled_from([(1, 16), (2, 32)]))
    dtype = data.draw(st.sampled_from(DTYPES))
    err, err_torch, out = attention_errors(
        run_triton, cu, pl, T, H, D, dtype, gated=data.draw(st.booleans()), seed=data.draw(st.integers(0, 2**16))
    )
    assert_within(err, err_torch, dtype)
    assert torch.all(out[int(cu[-1]) :] == 0)


@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_degenerate_packings(name, dtype):
    cu, pl, T = make_packing(*DEGENERATE[name])
    err, err_torch, out = attention_errors(run_triton, cu, pl, T, 1, 16, dtype)
    assert_within(err, err_torch, dtype)
    assert torch.all(out[int(cu[-1]) :] == 0)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_model_head_dims(head_dim):
    cu, pl, T = make_packing([23, 1, 40], [10, 1, 40], 6)
    err, err_torch, _ = attention_errors(run_triton, cu, pl, T, 1, head_dim, torch.float32)
    assert_within(err, err_torch, torch.float32)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 16)])
def test_triton_other_tile_shapes(blocks):
    # the launchers take any config; full and partial tiles must agree whatever the shapes
    bm, bn = blocks
    kc = tk.KernelConfig(bm, bn, 4, 1)
    config = tk.AttentionConfig(kc, kc, tk.KernelConfig(bn, bm, 4, 1))
    cu, pl, T = make_packing([32, 5, 1, 50, 8], [32, 2, 1, 17, 8], 9)
    q, k, v, gate, go = (torch.randn(T, 2, 16, dtype=torch.float64) for _ in range(5))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gate)]
    ref = dense_attention(*leaves[:3], cu, pl, leaves[3])
    want = [ref, *torch.autograd.grad(ref, leaves, go)]
    dev = lambda x: x.to(DEVICE, torch.float32)  # noqa: E731
    lo, hi = layout.row_intervals(cu.to(DEVICE), pl.to(DEVICE), T)
    col_lo, col_hi = layout.col_intervals(lo, hi)
    out, lse = tk.prefixlm_attention_triton_forward(dev(q), dev(k), dev(v), lo, hi, dev(gate), config=config)
    grads = tk.prefixlm_attention_triton_backward(
        dev(go), dev(q), dev(k), dev(v), out, lse, lo, hi, col_lo, col_hi, dev(gate), config=config
    )
    for got, exp in zip([out, *grads], want):
        torch.testing.assert_close(got.cpu().double(), exp.detach(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_triton_custom_ops_opcheck(gated):
    cu, pl, T = make_packing([9, 1, 14], [3, 1, 14], 4)
    pk = ops.AttentionPacking.build(cu, pl, T, DEVICE)
    index = (pk.row_lo, pk.row_hi, pk.col_lo, pk.col_hi)
    q, k, v, gate = (torch.randn(T, 2, 16, device=DEVICE, requires_grad=True) for _ in range(4))
    tiles = pk.tile_ranges(*tk.kernel_config(q).blocks())
    args = (q, k, v, *index, tiles.fwd, tiles.dq, tiles.dkdv, gate if gated else None, "triton")
    torch.library.opcheck(torch.ops.hrm.prefixlm_attention_fwd.default, args)
    out, lse = torch.ops.hrm.prefixlm_attention_fwd(*args)
    bwd_args = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        *index,
        tiles.dq,
        tiles.dkdv,
        gate.detach() if gated else None,
        "triton",
    )
    torch.library.opcheck(torch.ops.hrm.prefixlm_attention_bwd.default, bwd_args)
