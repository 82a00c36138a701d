"""The PyTorch references of every op against fp64 oracles written independently here."""

import math

import pytest
import torch
from attention_oracle import attention, dense_attention, packing, reference
from hypothesis import given, settings
from hypothesis import strategies as st

from hrm import ops
from hrm.errors import BackendUnavailable, HrmError
from hrm.ops import dispatch


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_attention_reference_matches_dense_fp64(data):
    cu, pl, T = packing(data.draw)
    H, D = data.draw(st.sampled_from([(1, 8), (2, 16), (3, 6)]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v, gate = (torch.randn(T, H, D, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(4))
    out = reference(q, k, v, cu, pl, gate)
    ref = dense_attention(q, k, v, cu, pl, gate)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.all(out[cu[-1] :] == 0)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gate), go)
    grads_ref = torch.autograd.grad(ref, (q, k, v, gate), go)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_attention_degenerate_packings_fp32():
    # one-token sequence, a response of one token (causal length 0), a sequence ending on
    # a 16-token edge, trailing padding.
    cu = torch.tensor([0, 1, 4, 16, 19], dtype=torch.int32)
    pl = torch.tensor([1, 3, 5, 2], dtype=torch.int32)
    q, k, v, gate = (torch.randn(23, 2, 8, dtype=torch.float64) for _ in range(4))
    ref = dense_attention(q, k, v, cu, pl, gate)
    out = attention(q.float(), k.float(), v.float(), cu, pl, gate=gate.float())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cu,pl", [([0, 3], [0]), ([0, 3], [4]), ([0, 3, 3], [1, 1]), ([1, 3], [1]), ([0, 9], [1])])
def test_attention_rejects_illegal_packing(cu, pl):
    q = torch.randn(8, 1, 4)
    with pytest.raises(HrmError):
        attention(q, q, q, torch.tensor(cu, dtype=torch.int32), torch.tensor(pl, dtype=torch.int32))


def test_attention_sees_nothing_across_sequences():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    pl = torch.tensor([2, 3], dtype=torch.int32)
    q, k, v = (torch.randn(9, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, cu, pl)
    (gk,) = torch.autograd.grad(out[:5].sum(), k, retain_graph=True)
    assert torch.all(gk[5:] == 0)  # the first sequence never reads the second one's keys
    (gk,) = torch.autograd.grad(out[5 + 1].sum(), k)  # a prefix query reads the whole prefix only
    assert torch.all(gk[:5] == 0) and torch.all(gk[5 + 3 :] == 0) and torch.all(gk[5:8] != 0)


def test_rms_norm_matches_fp64():
    x = torch.randn(7, 123) * 5
    y = ops.rms_norm(x, 1e-6)
    xd = x.double()
    ref = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    assert ops.rms_norm(torch.zeros(2, 5), 1e-6).abs().max() == 0
    assert ops.rms_norm(x.half(), 1e-6).dtype == torch.float16


def test_rope_rotates_pairs_and_is_relative():
    D = 8
    pos = torch.arange(6)
    cos, sin = ops.rope_cos_sin(pos, D, 10000.0)
    x = torch.randn(6, 3, D, dtype=torch.float64)
    y = ops.rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    # pair (i, i + D/2) rotated by angle pos * theta**(-2i/D)
    i, t = 1, 4
    ang = t * 10000.0 ** (-2 * i / D)
    a, b = x[t, 0, i], x[t, 0, i + D // 2]
    torch.testing.assert_close(y[t, 0, i], a * math.cos(ang) - b * math.sin(ang), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y[t, 0, i + D // 2], b * math.cos(ang) + a * math.sin(ang), rtol=1e-6, atol=1e-6)
    # q.k depends only on the position difference
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def dot(pq, pk):
        c, s = ops.rope_cos_sin(torch.tensor([pq, pk]), D, 10000.0)
        r = ops.rope(torch.stack([q, k])[:, None], c, s)[:, 0]
        return (r[0] * r[1]).sum()

    torch.testing.assert_close(dot(3, 1), dot(7, 5), rtol=1e-6, atol=1e-6)


def test_swiglu_and_cross_entropy_match_fp64():
    gu = torch.randn(5, 2 * 37, dtype=torch.float64)
    g, u = gu[:, :37], gu[:, 37:]
    torch.testing.assert_close(ops.swiglu(gu), g / (1 + torch.exp(-g)) * u)
    logits = torch.randn(6, 11, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 10, -100, 5])
    keep = labels != -100
    lse = torch.logsumexp(logits[keep], -1)
    ref = (lse - logits[keep, labels[keep]]).sum()
    torch.testing.assert_close(ops.cross_entropy(logits, labels), ref)
    torch.testing.assert_close(ops.cross_entropy(logits, labels, reduction="mean"), ref / 4)
    none = torch.full((6,), -100)
    assert ops.cross_entropy(logits, none, reduction="mean") == 0


def test_backend_dispatch():
    assert ops.resolve_backend("torch") == "torch"
    assert ops.resolve_backend(None) in ops.available_backends()
    assert ops.available_backends()[-1] == "torch"
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        ops.resolve_backend("tpu")
    missing = [b for b in ops.BACKENDS if dispatch.unavailable_reason(b) is not None]
    for name in missing:
        with pytest.raises(BackendUnavailable, match=f"backend '{name}' cannot run here"):
            ops.resolve_backend(name)


def test_an_op_probes_its_backend_before_the_first_call(monkeypatch):
    """The ``cuda`` backend loads ``libhrm_cuda.so`` in its probe: an op called with an explicit
    backend before anything else asked about it must run the probe first (on the first H200 run
    it did not, and ``torch.ops.hrm_cuda`` had no ops), and only once; an unavailable backend
    is an error naming why, not a call into its kernels."""
    probed = []
    monkeypatch.setattr(dispatch, "_REASONS", {})
    monkeypatch.setitem(dispatch._PROBES, "compile", [lambda: probed.append("compile")])
    monkeypatch.setitem(dispatch._PROBES, "cpu", [lambda: "no kernels today"])
    x = torch.randn(3, 8)
    for _ in range(2):
        torch.testing.assert_close(ops.rms_norm(x, backend="compile"), ops.rms_norm(x, backend="torch"))
    assert probed == ["compile"]
    with pytest.raises(BackendUnavailable, match="backend 'cpu' cannot run here: no kernels today"):
        ops.rms_norm(x, backend="cpu")
