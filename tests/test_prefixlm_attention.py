"""PrefixLM attention: tile classification, the CPU backend against the fp64 oracle, the
custom ops (opcheck, torch.compile) and backend selection.

Tolerance rule (flash-attention's): for the output and every gradient,
``max|kernel - fp64| <= K * max|torch reference in the same dtype - fp64| + FLOOR[dtype]``.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from attention_oracle import (
    DEGENERATE,
    attention,
    bf16_products_emulation,
    dense_attention,
    make_packing,
    packing,
    reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm import ops
from hrm.errors import BackendUnavailable
from hrm.ops import cpp_extension, dispatch
from hrm.ops.impl.prefixlm_attention import cpu as attention_cpu
from hrm.ops.impl.prefixlm_attention import op as attention_op
from hrm.ops.impl.prefixlm_attention import packing as layout
from hrm.ops.impl.prefixlm_attention import triton_kernels

K = 2.0
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

needs_cpu_kernel = pytest.mark.skipif(
    dispatch.unavailable_reason("cpu") is not None, reason=f"cpu backend: {dispatch.unavailable_reason('cpu')}"
)


def attention_errors(run, cu, pl, T, H, D, dtype, gated=True, seed=0):
    """Max abs errors vs the fp64 oracle of ``run`` and of the torch reference, both in
    ``dtype``, for (out, dq, dk, dv[, dgate]); also returns the kernel's output."""
    g = torch.Generator().manual_seed(seed)
    x64 = [torch.randn(T, H, D, dtype=torch.float64, generator=g) for _ in range(4 if gated else 3)]
    go = torch.randn(T, H, D, dtype=torch.float64, generator=g)
    leaves = [x.clone().requires_grad_() for x in x64]
    ref = dense_attention(*leaves[:3], cu, pl, leaves[3] if gated else None)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, go)]

    def errors(fn):
        xs = [x.to(dtype).requires_grad_() for x in x64]
        out = fn(*xs[:3], cu, pl, xs[3] if gated else None)
        got = [out.detach(), *torch.autograd.grad(out, xs, go.to(dtype))]
        assert all(a.dtype == dtype for a in got)
        return [(a.double() - b).abs().max().item() for a, b in zip(got, want)], out.detach()

    err, out = errors(run)
    err_torch, _ = errors(reference)
    return err, err_torch, out


def assert_within(err, err_torch, dtype):
    names = ["out", "dq", "dk", "dv", "dgate"]
    for name, e, et in zip(names, err, err_torch):
        assert e <= K * et + FLOOR[dtype], f"{name}: error {e:.3g} vs torch {et:.3g} ({dtype})"


def run_cpu(q, k, v, cu, pl, gate):
    return attention(q, k, v, cu, pl, gate=gate, backend="cpu")


# -- tile classification ---------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_tile_ranges_classify_every_tile(data):
    cu, pl, T = packing(data.draw, max_seqs=8, max_len=50, max_pad=20)
    bm, bn = data.draw(st.sampled_from([(16, 16), (16, 32), (32, 16), (64, 64), (4, 8)]))
    mask = layout.prefixlm_dense_mask(cu, pl, T)
    lo, hi = layout.row_intervals(cu, pl, T)
    # the intervals are the mask
    cols = torch.arange(T)
    assert torch.equal(mask, (cols[None, :] >= lo[:, None].long()) & (cols[None, :] < hi[:, None].long()))
    col_lo, col_hi = layout.col_intervals(lo, hi)
    assert torch.equal(mask.T, (cols[None, :] >= col_lo[:, None].long()) & (cols[None, :] < col_hi[:, None].long()))
    for ranges, m, b_rows, b_cols in (
        (layout.tile_ranges(lo, hi, bm, bn), mask, bm, bn),
        (layout.tile_ranges(col_lo, col_hi, bn, bm), mask.T, bn, bm),
    ):
        for blk, (first, full_first, full_end, end) in enumerate(ranges.tolist()):
            assert first <= full_first <= full_end <= end
            for other in range(-(-T // b_cols)):
                tile = m[blk * b_rows : (blk + 1) * b_rows, other * b_cols : (other + 1) * b_cols]
                whole = tile.shape == (b_rows, b_cols)
                if not first <= other < end:
                    assert not tile.any(), "an empty tile must be skipped, never a non-empty one"
                elif full_first <= other < full_end:
                    assert whole and tile.all(), "a tile classified full must be entirely visible"
                else:
                    assert tile.any() and not (whole and tile.all()), "partial means partly visible"
    counts = layout.tile_counts(cu, pl, T, bm, bn)
    assert counts["empty"] + counts["full"] + counts["partial"] == counts["total"]


def test_tile_ranges_find_full_tiles():
    # one sequence of 64 with a 32-token prefix, 16 x 16 tiles: every row sees the prefix
    # (full tiles); the response's diagonal tiles are partial, the tiles above them empty.
    cu, pl, T = make_packing([64], [32])
    lo, hi = layout.row_intervals(cu, pl, T)
    assert layout.tile_ranges(lo, hi, 16, 16).tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 3], [0, 0, 3, 4]]
    assert layout.tile_counts(cu, pl, T, 16, 16) == {"total": 16, "empty": 5, "full": 9, "partial": 2}


# -- CPU backend parity ------------------------------------------------------------------------
@needs_cpu_kernel
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_cpu_matches_fp64(data):
    cu, pl, T = packing(data.draw, max_seqs=8, max_len=80)
    H, D = data.draw(st.sampled_from([(1, 8), (2, 16), (3, 24), (2, 64)]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    err, err_torch, out = attention_errors(
        run_cpu, cu, pl, T, H, D, dtype, gated=data.draw(st.booleans()), seed=data.draw(st.integers(0, 2**16))
    )
    assert_within(err, err_torch, dtype)
    assert torch.all(out[int(cu[-1]) :] == 0)


@needs_cpu_kernel
@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_degenerate_packings(name, dtype):
    cu, pl, T = make_packing(*DEGENERATE[name])
    err, err_torch, out = attention_errors(run_cpu, cu, pl, T, 2, 32, dtype)
    assert_within(err, err_torch, dtype)
    assert torch.all(out[int(cu[-1]) :] == 0)


@needs_cpu_kernel
def test_cpu_strided_inputs_and_head_dim_128():
    # q, k, v, gate as the model makes them: views into one [T, 4 * heads, hd] projection
    cu, pl, T = make_packing([70, 1, 57], [20, 1, 57], 5)
    gqkv = torch.randn(T, 4 * 2, 128, dtype=torch.float64)
    gate, q, k, v = gqkv.split(2, dim=1)
    want = dense_attention(q, k, v, cu, pl, gate)
    got = attention(*(x.float() for x in (q, k, v)), cu, pl, gate=gate.float(), backend="cpu")
    f = gqkv.float()
    got_strided = attention(*f.split(2, dim=1)[1:], cu, pl, gate=f.split(2, dim=1)[0], backend="cpu")
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_strided, got, rtol=0, atol=0)


# -- CPU backend: the bf16 products -----------------------------------------------------------
# bf16 q, k, v take vdpbf16ps products with fp32 accumulation where the CPU has AVX512_BF16
# (otherwise the fp32 path, which the tests above cover). Two checks: against the fp64 oracle,
# the flash-attention rule above plus a relative-norm bound (measured: at most 9e-3, the bf16
# torch reference's at most 7e-3); against an fp64 emulation of the bf16 path's own rounding
# points (rounded to bf16 like the outputs), a relative-norm bound that only fp32-level
# differences meet: the kernel stays below 5e-4, while the fp32 path on the same bf16 inputs
# misses dq, dk, dv and dgate by 2e-3 or more, and a stray nonzero past a span or a missed
# rounding by far more. ds = p (dp - delta) cancels where a row sees few keys (exactly for a
# row that sees one), so a bf16 rounding of dO or out that lands on the other side of a tie
# than the emulation's moves dq and dk by up to ~1e-3 of their norm (one causal sequence):
# the bound is the larger of REL_EMULATION and half the fp32 path's difference from the same
# emulation (the kernel on the same values in fp32, which skips the roundings). When every
# sequence has one token, dq and dk are pure rounding noise: not compared.
REL_BF16 = 2e-2
REL_EMULATION = 1e-3
HEAD_DIMS_BF16 = [(2, 16), (2, 17), (1, 48), (2, 64), (1, 80)]


def bf16_inputs(T, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, dtype=torch.float64, generator=g) for _ in range(5)]  # q, k, v, gate, grad_out


def cpu_bf16_grads(q, k, v, gate, go, cu, pl, dtype=torch.bfloat16):
    """(out, dq, dk, dv, dgate) of the cpu backend on leaves in ``dtype`` (dgate None without a
    gate)."""
    xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    g = gate.to(dtype).requires_grad_() if gate is not None else None
    out = attention(*xs, cu, pl, gate=g, backend="cpu")
    grads = torch.autograd.grad(out, xs + ([g] if g is not None else []), go.to(dtype))
    return [out.detach(), *grads] + ([] if g is not None else [None])


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item() if b.norm() > 0 else (a.double() - b).norm().item()


def check_bf16_against_fp64(cu, pl, T, H, D, gated, seed):
    q, k, v, gate, go = bf16_inputs(T, H, D, seed)
    gate = gate if gated else None
    err, err_torch, out = attention_errors(run_cpu, cu, pl, T, H, D, torch.bfloat16, gated=gated, seed=seed)
    assert_within(err, err_torch, torch.bfloat16)
    assert torch.all(out[int(cu[-1]) :] == 0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v) + ((gate,) if gated else ())]
    ref = dense_attention(*leaves[:3], cu, pl, leaves[3] if gated else None)
    want = [ref.detach(), *torch.autograd.grad(ref, leaves, go)]
    got = [x for x in cpu_bf16_grads(q, k, v, gate, go, cu, pl) if x is not None]
    # ds = p (dp - delta) cancels where rows see few keys (exactly for one key): dq and dk are
    # then bf16 rounding noise against a near-zero fp64 value (a hypothesis find: one sequence of
    # one token and one of two, dq at 3% of dv's norm), which only the rule above bounds. Usual
    # packings have dq and dk at 30% or more of dv's norm.
    cancelled = {name for name, g in zip(["dq", "dk"], want[1:3]) if g.norm() < 0.1 * want[3].norm()}
    for name, a, b in zip(["out", "dq", "dk", "dv", "dgate"], got, want):
        assert a.dtype == torch.bfloat16
        if name not in cancelled:
            assert rel(a, b) <= REL_BF16, f"{name}: relative error {rel(a, b):.3g} vs fp64"


def check_bf16_against_emulation(cu, pl, T, H, D, seed):
    q, k, v, gate, go = (x.to(torch.bfloat16) for x in bf16_inputs(T, H, D, seed))
    got = cpu_bf16_grads(q, k, v, gate, go, cu, pl)
    want = bf16_products_emulation(q, k, v, gate, go, cu, pl)
    fp32_path = cpu_bf16_grads(q, k, v, gate, go, cu, pl, dtype=torch.float32)  # no bf16 roundings
    noise = bool((cu.diff() == 1).all())
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "dgate"], got, want, fp32_path):
        if not (noise and name in ("dq", "dk")):
            e, e_fp32 = rel(a, b.to(torch.bfloat16).double()), rel(c, b)
            assert e <= max(REL_EMULATION, e_fp32 / 2), (
                f"{name}: relative difference {e:.3g} from the emulation (the fp32 path's: {e_fp32:.3g})"
            )


def needs_bf16_dots():
    if not attention_cpu.cpu_ops().bf16_dots():
        pytest.skip("this CPU build has no AVX512_BF16: bf16 inputs take the fp32 path")


@needs_cpu_kernel
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_cpu_bf16_matches_fp64(data):
    cu, pl, T = packing(data.draw, max_seqs=8, max_len=150)
    H, D = data.draw(st.sampled_from(HEAD_DIMS_BF16))
    check_bf16_against_fp64(cu, pl, T, H, D, data.draw(st.booleans()), data.draw(st.integers(0, 2**16)))


@needs_cpu_kernel
@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("D", [17, 64])
def test_cpu_bf16_degenerate_packings_match_fp64(name, D):
    cu, pl, T = make_packing(*DEGENERATE[name])
    check_bf16_against_fp64(cu, pl, T, 2, D, gated=True, seed=D)


@needs_cpu_kernel
@settings(max_examples=15, deadline=None)
@given(st.data())
def test_cpu_bf16_matches_its_emulation(data):
    needs_bf16_dots()
    cu, pl, T = packing(data.draw, max_seqs=8, max_len=150)
    H, D = data.draw(st.sampled_from(HEAD_DIMS_BF16))
    check_bf16_against_emulation(cu, pl, T, H, D, data.draw(st.integers(0, 2**16)))


# The bf16 products run on AMX tiles where the CPU has AMX-BF16, else (and with HRM_CPU_AMX=0)
# on vdpbf16ps register blocks: both are checked where both exist.
PRODUCTS = ["amx", "vdpbf16ps"]


def use_products(products, monkeypatch):
    needs_bf16_dots()
    if products == "amx":
        monkeypatch.delenv("HRM_CPU_AMX", raising=False)
        if not attention_cpu.cpu_ops().amx_tiles():
            pytest.skip("no AMX tiles here (CPU, build or kernel permission)")
    else:
        monkeypatch.setenv("HRM_CPU_AMX", "0")
        assert not attention_cpu.cpu_ops().amx_tiles()


@needs_cpu_kernel
@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("name", sorted(DEGENERATE))
@pytest.mark.parametrize("D", [17, 64])
def test_cpu_bf16_degenerate_packings_match_emulation(name, D, products, monkeypatch):
    use_products(products, monkeypatch)
    cu, pl, T = make_packing(*DEGENERATE[name])
    check_bf16_against_emulation(cu, pl, T, 2, D, seed=D)


@needs_cpu_kernel
@pytest.mark.parametrize("products", PRODUCTS)
@pytest.mark.parametrize("H, D", HEAD_DIMS_BF16)
def test_cpu_bf16_long_spans_match_emulation(H, D, products, monkeypatch):
    # spans of several hundred keys: reductions of many tiles, 1-4 accumulator tiles per pass
    use_products(products, monkeypatch)
    cu, pl, T = make_packing([300, 5, 181, 77], [40, 5, 181, 1], 9)
    check_bf16_against_emulation(cu, pl, T, H, D, seed=H * D)


@needs_cpu_kernel
def test_cpu_bf16_amx_tiles_agree_with_register_blocks(monkeypatch):
    # same roundings, fp32 accumulation in another order: outputs within a bf16 ulp or two
    use_products("amx", monkeypatch)
    cu, pl, T = make_packing([70, 1, 57, 130], [20, 1, 57, 3], 5)
    q, k, v, gate, go = (x.to(torch.bfloat16) for x in bf16_inputs(T, 2, 64, seed=3))
    tiles = cpu_bf16_grads(q, k, v, gate, go, cu, pl)
    monkeypatch.setenv("HRM_CPU_AMX", "0")
    registers = cpu_bf16_grads(q, k, v, gate, go, cu, pl)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dgate"], tiles, registers):
        assert rel(a, b.double()) < 5e-3, name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backward_heads_in_groups_or_one_at_a_time(dtype, monkeypatch):
    # the backward takes as many heads per pass as its ds budget holds (all of them here) or one
    # at a time (a budget of 1 byte): each head's arithmetic is the same either way
    cu, pl, T = make_packing([70, 1, 57, 130], [20, 1, 57, 3], 5)
    q, k, v, gate, go = (x.to(dtype) for x in bf16_inputs(T, 3, 64, seed=5))
    grouped = cpu_bf16_grads(q, k, v, gate, go, cu, pl, dtype=dtype)
    monkeypatch.setenv("HRM_CPU_ATTN_DS_BYTES", "1")
    one_by_one = cpu_bf16_grads(q, k, v, gate, go, cu, pl, dtype=dtype)
    for a, b in zip(grouped, one_by_one):
        assert torch.equal(a, b)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_padding_rows_are_written_not_left_to_the_allocator(dtype):
    # out, lse, dq, dk and dv come from uninitialised memory: the kernel itself zeroes the
    # padding rows no micro-block reaches. Freed NaN blocks of the same sizes just before each
    # call make the allocator hand garbage back if a row were missed.
    cu, pl, T = make_packing([21, 40, 3], [5, 40, 1], 27)  # padding in a partial and in whole blocks
    H, D = 2, 64
    q, k, v, gate, go = (x.to(dtype) for x in bf16_inputs(T, H, D, seed=6))
    pk = ops.AttentionPacking.build(cu, pl, T)

    def poison():
        junk = [torch.full((T, H, D), float("nan"), dtype=dtype) for _ in range(4)]
        junk += [torch.full((H, T), float("nan")) for _ in range(2)]
        del junk

    poison()
    out, lse = attention_cpu.prefixlm_attention_cpu_forward(q, k, v, pk.row_lo, pk.row_hi, gate)
    poison()
    dq, dk, dv, _ = attention_cpu.prefixlm_attention_cpu_backward(
        go, q, k, v, out, lse, pk.row_lo, pk.row_hi, pk.col_lo, pk.col_hi, gate
    )
    real = int(cu[-1])
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not x.isnan().any(), name
        assert torch.all(x[real:] == 0), name
    assert torch.all(lse[:, real:] == 0) and not lse.isnan().any()


@needs_cpu_kernel
def test_cpu_bf16_attention_leaves_the_tiles_to_onednn(monkeypatch):
    # the kernel configures AMX tiles on every thread of a pass and releases them at its end: a
    # bf16 matmul of oneDNN (which runs on AMX too) after it computes what it did before it
    use_products("amx", monkeypatch)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g).to(torch.bfloat16) for shape in ((96, 256), (256, 160)))
    before = a @ b
    cu, pl, T = make_packing([70, 1, 57, 130], [20, 1, 57, 3], 5)
    q, k, v, gate, go = (x.to(torch.bfloat16) for x in bf16_inputs(T, 2, 64, seed=4))
    cpu_bf16_grads(q, k, v, gate, go, cu, pl)
    assert torch.equal(a @ b, before)
    torch.testing.assert_close((a @ b).float(), a.float() @ b.float(), rtol=2e-2, atol=0.5)


@needs_cpu_kernel
def test_cpu_bf16_strided_inputs_match_contiguous():
    # q, k, v, gate as the model makes them: views into one [T, 4 * heads, hd] projection
    cu, pl, T = make_packing([70, 1, 57, 130], [20, 1, 57, 3], 5)
    gqkv = torch.randn(T, 4 * 2, 80).to(torch.bfloat16)
    go = torch.randn(T, 2, 80).to(torch.bfloat16)
    views = gqkv.split(2, dim=1)
    strided = cpu_bf16_grads(*views[1:], views[0], go, cu, pl)
    contiguous = cpu_bf16_grads(*(x.contiguous() for x in views[1:]), views[0].contiguous(), go, cu, pl)
    for a, b in zip(strided, contiguous):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- custom ops ----------------------------------------------------------------------------------
@needs_cpu_kernel
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_custom_ops_opcheck(gated, dtype):
    cu, pl, T = make_packing([9, 1, 14], [3, 1, 14], 4)
    pk = ops.AttentionPacking.build(cu, pl, T)
    index = (pk.row_lo, pk.row_hi, pk.col_lo, pk.col_hi)
    q, k, v, gate = (torch.randn(T, 2, 16).to(dtype).requires_grad_() for _ in range(4))
    args = (q, k, v, *index, None, None, None, gate if gated else None, "cpu")
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
        None,
        None,
        gate.detach() if gated else None,
        "cpu",
    )
    torch.library.opcheck(torch.ops.hrm.prefixlm_attention_bwd.default, bwd_args)


@needs_cpu_kernel
def test_model_compiles_fullgraph_with_cpu_attention():
    from hrm.config import get_preset
    from hrm.model import HRMText

    cu, pl, T = make_packing([11, 1, 17], [4, 1, 6], 3)
    pos = torch.cat([torch.arange(L) for L in (11, 1, 17)] + [torch.zeros(3, dtype=torch.long)])
    ids = torch.randint(0, 250, (T,))
    model = HRMText(get_preset("tiny"), backend="cpu")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pk = ops.AttentionPacking.build(cu, pl, T)  # built with the batch: the forward reads nothing back
    torch.testing.assert_close(compiled(ids, pos, cu, pl, packing=pk), model(ids, pos, cu, pl), rtol=1e-5, atol=1e-5)

    def attention_loss(q, k, v, gate):
        return ops.prefixlm_attention(q, k, v, pk, gate=gate, backend="cpu").square().sum()

    xs = [torch.randn(T, 2, 16, requires_grad=True) for _ in range(4)]
    grads = torch.autograd.grad(torch.compile(attention_loss, fullgraph=True, backend="aot_eager")(*xs), xs)
    for a, b in zip(grads, torch.autograd.grad(attention_loss(*xs), xs)):
        torch.testing.assert_close(a, b)


# -- backend selection ---------------------------------------------------------------------------
def test_auto_never_picks_triton_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "triton" not in dispatch._auto_candidates()
    assert ops.resolve_backend(None) != "triton"


@needs_cpu_kernel
def test_auto_uses_the_cpu_kernel_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device prefers the GPU backends")
    assert dispatch.get_impl("prefixlm_attention", None) is attention_op.prefixlm_attention_cpu
    # the model passes the resolved name to every op: ops without a CPU kernel fall back to
    # the compile backend (where it has them), not to the slow references
    for op in dispatch.registered_ops():
        impls = dispatch.implementations(op)
        if "cpu" not in impls and "compile" in impls and dispatch.unavailable_reason("compile") is None:
            assert dispatch.get_impl(op, "cpu") is impls["compile"]


def test_cpu_probe_reports_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-hrm")
    assert "no C++ compiler" in cpp_extension.toolchain_missing()


@pytest.mark.slow
def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load(tmp_path):
    """torch's extension build guards its directory with a plain ``lock`` file; a build killed
    halfway leaves it, and every later load used to wait on it forever. The next load (in a
    fresh process, on a copy of this machine's built cache) removes it and says so."""
    cpp_extension.load()  # built (or cached) here first: the copy below needs no compile
    built = cpp_extension._build_dir(cpp_extension.NAME, tuple(cpp_extension.CSRC / s for s in cpp_extension.SOURCES))
    copy = tmp_path / "cache" / "extensions" / built.name
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", "*.flock"))
    (copy / "lock").touch()  # what a killed build leaves
    env = {**os.environ, "HRM_CACHE_DIR": str(tmp_path / "cache")}
    code = "from hrm.ops import cpp_extension; cpp_extension.load(); print('loaded')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr
    assert f"removing {copy / 'lock'}, left by a build that was interrupted" in run.stderr
    assert not (copy / "lock").exists()


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cu, pl, T = make_packing([4], [2])
    q = torch.randn(T, 1, 16)
    lo, hi = layout.row_intervals(cu, pl, T)
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        triton_kernels.prefixlm_attention_triton_forward(q, q, q, lo, hi)
