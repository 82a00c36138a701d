"""Decode attention (one new token per sequence against its KV cache): every backend here
against an fp64 oracle written from the definition, on random and degenerate shapes; the
cache writes; bad input."""

import math

import pytest
import torch

from hrm.ops import available_backends, decode_attention

BACKENDS = [b for b in ("torch", "cpu") if b in available_backends()]


def oracle(q, k, v, gate, k_cache, v_cache, pos):
    """Loops over (b, h) in fp64: the cache with the new entries, and the output."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    B, H, D = q.shape
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        p = int(pos[b])
        kc[b, :, p], vc[b, :, p] = k[b].double(), v[b].double()
        for h in range(H):
            s = kc[b, h, : p + 1] @ q[b, h].double() / math.sqrt(D)
            w = torch.softmax(s, 0)
            out[b, h] = torch.sigmoid(gate[b, h].double()) * (w @ vc[b, h, : p + 1])
    return out, kc, vc


SHAPES = [  # (B, H, S, D, positions)
    (3, 2, 16, 8, [5, 0, 15]),  # one sequence at the cache's first slot, one at its last
    (1, 1, 1, 1, [0]),  # everything degenerate: one key of one lane
    (2, 3, 9, 5, [8, 3]),  # a head dim that is not a multiple of the vector width
    (2, 2, 11, 20, [10, 6]),  # two blocks of the dot product's 8 partial sums and a tail of 4
    (2, 1, 7, 80, [6, 2]),  # ten blocks of 8, no tail
    (8, 4, 128, 64, [47, 60, 95, 1, 127, 64, 63, 0]),  # the decode shape of preset `small`
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_decode_attention_matches_fp64_oracle(backend, shape):
    B, H, S, D, positions = shape
    g = torch.Generator().manual_seed(B * 100 + S)
    q, k, v, gate = (torch.randn(B, H, D, generator=g) for _ in range(4))
    k_cache, v_cache = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    pos = torch.tensor(positions)
    expected, kc, vc = oracle(q, k, v, gate, k_cache, v_cache, pos)
    with torch.inference_mode():
        out = decode_attention(q, k, v, gate, k_cache, v_cache, pos, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (B, H, D)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # the new entries landed at pos[b] and nothing else in the caches moved
    assert torch.equal(k_cache.double(), kc) and torch.equal(v_cache.double(), vc)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
def test_decode_attention_cpu_equals_reference_and_ignores_positions_past_pos():
    """The kernel reads only positions 0..pos[b]: garbage (even NaN) after them changes nothing."""
    B, H, S, D = 4, 2, 32, 16
    g = torch.Generator().manual_seed(7)
    q, k, v, gate = (torch.randn(B, H, D, generator=g) for _ in range(4))
    cache = torch.randn(2, B, H, S, D, generator=g)
    pos = torch.tensor([3, 31, 0, 17])
    outs = []
    for backend in ("torch", "cpu"):
        kc, vc = cache[0].clone(), cache[1].clone()
        outs.append(decode_attention(q, k, v, gate, kc, vc, pos, backend=backend))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    kc, vc = cache[0].clone(), cache[1].clone()
    for b in range(B):
        kc[b, :, int(pos[b]) + 1 :] = float("nan")
        vc[b, :, int(pos[b]) + 1 :] = float("nan")
    torch.testing.assert_close(decode_attention(q, k, v, gate, kc, vc, pos, backend="cpu"), outs[1])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
def test_decode_attention_cpu_takes_other_dtypes_through_the_reference():
    B, H, S, D = 2, 2, 8, 8
    q, k, v, gate = (torch.randn(B, H, D, dtype=torch.float64) for _ in range(4))
    k_cache, v_cache = torch.zeros(B, H, S, D, dtype=torch.float64), torch.zeros(B, H, S, D, dtype=torch.float64)
    pos = torch.tensor([2, 7])
    expected, _, _ = oracle(q, k, v, gate, k_cache, v_cache, pos)
    out = decode_attention(q, k, v, gate, k_cache, v_cache, pos, backend="cpu")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_takes_strided_views(backend):
    """q, k, v as the model passes them (slices of one [B, 4 * H * D] projection, a row
    stride of 4 * H * D) and a gate that is a transposed view: the same result as contiguous
    copies."""
    B, H, S, D = 3, 2, 12, 16
    g = torch.Generator().manual_seed(11)
    gqkv = torch.randn(B, 4 * H * D, generator=g)
    gate, q, k, v = (t.view(B, H, D) for t in gqkv.split(H * D, dim=1))
    gate = torch.randn(B, D, H, generator=g).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, gate))
    cache = torch.randn(2, B, H, S, D, generator=g)
    pos = torch.tensor([11, 0, 5])
    expected, kc, vc = oracle(q, k, v, gate, cache[0], cache[1], pos)
    k_cache, v_cache = cache[0].clone(), cache[1].clone()
    out = decode_attention(q, k, v, gate, k_cache, v_cache, pos, backend=backend)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache.double(), kc) and torch.equal(v_cache.double(), vc)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
@pytest.mark.parametrize("layout", ["contiguous", "transposed q"])
def test_decode_attention_cpu_custom_op_passes_opcheck(layout):
    """The op torch.compile sees (``hrm::decode_attention``, mutating both caches): schema,
    fake tensor (its output strides equal the kernel's, a contiguous tensor, whatever q's
    strides), and AOT dispatch."""
    B, H, S, D = 2, 3, 8, 4
    q = torch.randn(B, D, H).transpose(1, 2) if layout == "transposed q" else torch.randn(B, H, D)
    k, v, gate = (torch.randn(B, H, D) for _ in range(3))
    args = (q, k, v, gate.sigmoid(), torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.tensor([3, 7]))
    torch.library.opcheck(torch.ops.hrm.decode_attention.default, args)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
def test_decode_attention_cpu_rejects_a_position_outside_the_cache():
    q = torch.randn(2, 1, 4)
    k_cache, v_cache = torch.zeros(2, 1, 6, 4), torch.zeros(2, 1, 6, 4)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="position 6 of sequence 1 is outside the cache"):
        decode_attention(q, q, q, q, k_cache, v_cache, torch.tensor([0, 6]), backend="cpu")
    assert torch.equal(k_cache, before)  # checked before anything is written
