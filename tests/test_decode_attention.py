"""Decode attention (one new token per sequence against its KV cache): every backend here
against an fp64 oracle written from the definition, on random and degenerate shapes; the
cache writes; bad input."""

import math

import pytest
import torch

from hrm.ops import available_backends, decode_attention
from hrm.ops.impl.decode_attention import load_kernel

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
    (2, 2, 40, 128, [39, 17]),  # the reference sizes' head dim
    (1, 2, 24, 200, [23]),  # a head of 13 vectors: the kernel's 16-vector variant, its tail masked
    (1, 1, 20, 256, [19]),  # the largest head the kernel takes
    (1, 1, 6, 257, [5]),  # one lane more: the cpu backend's fallback
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # bf16: the output's rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_decode_attention_matches_fp64_oracle(backend, dtype, shape):
    """Every backend, in fp32 and bf16 (q, k, v, gate and both caches of that dtype, as
    under bf16 autocast), against the fp64 oracle over the same (rounded) inputs."""
    B, H, S, D, positions = shape
    g = torch.Generator().manual_seed(B * 100 + S)
    q, k, v, gate = (torch.randn(B, H, D, generator=g).to(dtype) for _ in range(4))
    k_cache, v_cache = (torch.randn(B, H, S, D, generator=g).to(dtype) for _ in range(2))
    pos = torch.tensor(positions)
    expected, kc, vc = oracle(q, k, v, gate, k_cache, v_cache, pos)
    with torch.inference_mode():
        out = decode_attention(q, k, v, gate, k_cache, v_cache, pos, backend=backend)
    assert out.dtype == dtype and out.shape == (B, H, D)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # the new entries landed at pos[b] and nothing else in the caches moved
    assert torch.equal(k_cache.double(), kc) and torch.equal(v_cache.double(), vc)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_cpu_equals_reference_and_ignores_positions_past_pos(dtype):
    """The kernel reads only positions 0..pos[b]: garbage (even NaN) after them changes nothing
    (the reference masks them out, so NaN there would reach its output)."""
    B, H, S, D = 4, 2, 32, 16
    g = torch.Generator().manual_seed(7)
    q, k, v, gate = (torch.randn(B, H, D, generator=g).to(dtype) for _ in range(4))
    cache = torch.randn(2, B, H, S, D, generator=g).to(dtype)
    pos = torch.tensor([3, 31, 0, 17])
    outs = []
    for backend in ("torch", "cpu"):
        kc, vc = cache[0].clone(), cache[1].clone()
        outs.append(decode_attention(q, k, v, gate, kc, vc, pos, backend=backend))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
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
    """The op torch.compile sees (``hrm_decode::decode_attention``, mutating both caches): schema,
    fake tensor (its output strides equal the kernel's, a contiguous tensor, whatever q's
    strides), and AOT dispatch."""
    B, H, S, D = 2, 3, 8, 4
    q = torch.randn(B, D, H).transpose(1, 2) if layout == "transposed q" else torch.randn(B, H, D)
    k, v, gate = (torch.randn(B, H, D) for _ in range(3))
    args = (q, k, v, gate.sigmoid(), torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.tensor([3, 7]))
    load_kernel()
    torch.library.opcheck(torch.ops.hrm_decode.decode_attention.default, args)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
def test_decode_attention_cpu_rejects_a_position_outside_the_cache():
    q = torch.randn(2, 1, 4)
    k_cache, v_cache = torch.zeros(2, 1, 6, 4), torch.zeros(2, 1, 6, 4)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="position 6 of sequence 1 is outside the cache"):
        decode_attention(q, q, q, q, k_cache, v_cache, torch.tensor([0, 6]), backend="cpu")
    assert torch.equal(k_cache, before)  # checked before anything is written


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend needs a C++ toolchain")
def test_decode_attention_kernel_rejects_what_the_backend_routes_elsewhere():
    """The C++ op itself refuses mixed dtypes and heads past 256 lanes (the ``cpu`` backend
    sends those to the reference), before it writes anything."""
    load_kernel()
    op = torch.ops.hrm_decode.decode_attention
    pos = torch.tensor([1])
    q = torch.randn(1, 1, 8)
    k_cache, v_cache = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(q, q, q, q, k_cache, v_cache, pos)
    q = torch.randn(1, 1, 264)
    with pytest.raises(RuntimeError, match="head dim 264 > 256"):
        op(q, q, q, q, torch.zeros(1, 1, 4, 264), torch.zeros(1, 1, 4, 264), pos)
    assert not k_cache.any() and not v_cache.any()
