"""Fused ops (``compile``, ``triton`` under the interpreter) against an fp64 evaluation of
their ``torch`` references: every output and every input gradient.

Tolerance rule (flash-attention's): a backend's error against the fp64 oracle may be at
most ``2 x`` the error of the ``torch`` reference run in the same dtype, plus a floor of
``FLOOR[dtype] * max(1, |oracle|)``. Shapes are odd on purpose: hidden sizes that are not
powers of two, row counts that are not multiples of any tile, vocabularies that are not
multiples of the vocabulary block or the token chunk, rows with no supervised token.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import DEVICE
from saved_tensors import saved_bytes
from torch import Tensor

from hrm import ops
from hrm.ops import common, cpp_extension, dispatch, rope_cos_sin
from hrm.ops.impl import linear_cross_entropy as linear_cross_entropy_module
from hrm.ops.impl.linear_cross_entropy import ce_chunk_forward

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
K_REF = 2.0
# Every case runs on DEVICE: the GPU when there is one, else the CPU (Triton under its
# interpreter). The interpreter mishandles bf16 arithmetic, so there triton runs fp32 and
# fp16; on a GPU bf16 too. The compile backend runs fp32 and bf16 (the dtype the model trains
# in). Every shape runs in fp32; the low-precision cases take the first shape of each test
# (each new dtype costs the compile backend one inductor compilation per function).
CASES = [("compile", torch.float32), ("triton", torch.float32)]
LOW_PRECISION = [("compile", torch.bfloat16), ("triton", torch.float16)]
if DEVICE.type == "cuda":
    LOW_PRECISION.append(("triton", torch.bfloat16))
FUSED = ["compile", "triton"]
needs_cpu_kernel = pytest.mark.skipif(  # as in test_prefixlm_attention.py, on CPU runs only
    DEVICE.type != "cpu" or dispatch.unavailable_reason("cpu") is not None,
    reason=f"cpu backend on CPU tensors: {dispatch.unavailable_reason('cpu')}",
)


def cases(shapes):
    """``(backend, dtype, shape)``: every shape in fp32, the first one in low precision too."""
    runs = [(b, dt, s) for s in shapes for b, dt in CASES] + [(b, dt, shapes[0]) for b, dt in LOW_PRECISION]
    return [pytest.param(b, dt, s, id=f"{b}-{str(dt)[6:]}-{'x'.join(map(str, s))}") for b, dt, s in runs]


def _cast(args, dtype, grad):
    """Copies of the float tensors of ``args`` on DEVICE in ``dtype`` (leaves requiring grad when
    ``grad``)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(DEVICE, dtype).requires_grad_(grad and a.requires_grad)
        out.append(a)
    return out


def _run(fn, args, backend, dtype, upstream):
    """Outputs of ``fn(*args, backend=...)`` in ``dtype`` and the gradients of its float outputs,
    weighted by ``upstream``, with respect to every input that requires grad."""
    xs = _cast(args, dtype, grad=True)
    out = fn(*xs, backend=backend)
    out = out if isinstance(out, tuple) else (out,)
    leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(o, u) for o, u in zip(out, upstream) if u is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u.to(o.dtype) for o, u in pairs])
    return [o.detach() for o in out], list(grads)


def check_against_oracle(fn, args, backend, dtype):
    """``args``: fp64 tensors (``requires_grad`` marks the differentiable inputs) and others."""
    oracle_out = fn(*_cast(args, torch.float64, grad=False), backend="torch")
    oracle_out = oracle_out if isinstance(oracle_out, tuple) else (oracle_out,)
    g = torch.Generator().manual_seed(1)
    upstream = [
        torch.randn(o.shape, dtype=torch.float64, generator=g).to(DEVICE) if o.is_floating_point() else None
        for o in oracle_out
    ]
    oracle = _run(fn, args, "torch", torch.float64, upstream)
    ref = _run(fn, args, "torch", dtype, upstream)
    got = _run(fn, args, backend, dtype, upstream)
    for kind in (0, 1):  # outputs, then gradients
        for i, (o, r, x) in enumerate(zip(oracle[kind], ref[kind], got[kind])):
            what = f"{'output' if kind == 0 else 'gradient'} {i} ({backend}, {dtype})"
            assert x.shape == o.shape and x.dtype == r.dtype, what
            if not o.is_floating_point():  # argmax: the same logits give the same index
                assert torch.equal(x, r), what
                continue
            err = (x.double() - o).abs().max().item() if o.numel() else 0.0
            ref_err = (r.double() - o).abs().max().item() if o.numel() else 0.0
            bound = K_REF * ref_err + FLOOR[dtype] * max(1.0, o.abs().max().item() if o.numel() else 0.0)
            assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (reference in {dtype}: {ref_err:.3g})"


def randn(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(grad)


# -- RMSNorm, residual add + RMSNorm, MagicNorm transition -----------------------------------
NORM_SHAPES = [(37, 24), (2, 65, 100), (3, 123)]


@pytest.mark.parametrize("backend,dtype,shape", cases(NORM_SHAPES))
def test_rms_norm(backend, dtype, shape):
    check_against_oracle(
        lambda x, backend: ops.rms_norm(x, 1e-6, backend=backend), [randn(*shape, scale=3)], backend, dtype
    )


@pytest.mark.parametrize("backend,dtype,shape", cases(NORM_SHAPES))
def test_add_rms_norm(backend, dtype, shape):
    check_against_oracle(
        lambda x, r, backend: ops.add_rms_norm(x, r, 1e-6, backend=backend),
        [randn(*shape), randn(*shape, scale=2)],
        backend,
        dtype,
    )


@pytest.mark.parametrize("backend,dtype,shape", cases(NORM_SHAPES))
def test_magicnorm_transition(backend, dtype, shape):
    check_against_oracle(
        lambda x, d, o, backend: ops.magicnorm_transition(x, d, o, 1e-6, backend=backend),
        [randn(*shape, scale=2), randn(*shape), randn(*shape)],
        backend,
        dtype,
    )


def test_magicnorm_transition_with_outputs_that_get_no_gradient():
    """After a grad step followed by a no-grad step only ``z`` carries a gradient (``u``, ``n``
    are cut); the fused backward must then skip the missing ones."""
    x, d, o = randn(19, 40), randn(19, 40), randn(19, 40)
    z_ref = ops.magicnorm_transition(x, d, o, backend="torch")[0]
    want = torch.autograd.grad(z_ref.sum(), (x, d, o), allow_unused=True)
    for backend in FUSED:
        xs = _cast([x, d, o], torch.float32, grad=True)
        z = ops.magicnorm_transition(*xs, backend=backend)[0]
        got = torch.autograd.grad(z.sum(), xs)
        torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1].double().cpu(), want[1], rtol=1e-5, atol=1e-5)
        assert torch.all(got[2] == 0)


NORMS = {  # op, number of inputs, the index of the output that out_dtype sets
    "rms_norm": (lambda *a, **k: ops.rms_norm(*a, 1e-6, **k), 1, 0),
    "add_rms_norm": (lambda *a, **k: ops.add_rms_norm(*a, 1e-6, **k), 2, 1),
    "magicnorm_transition": (lambda *a, **k: ops.magicnorm_transition(*a, 1e-6, **k), 3, 2),
}


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_norm_out_dtype_is_the_cast_of_the_output(name, backend):
    """``out_dtype`` (the linear layers' dtype under autocast) gives exactly the cast of the
    normalised output, and the same gradients as casting after the op, a bf16 input (a block's
    output under autocast) getting its gradient in bf16 (the compile backend fuses the casts and
    recomputes the rounded output from its input in the backward)."""
    op, n_in, idx = NORMS[name]
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(29, 48, generator=g, dtype=torch.float64) * 2 for _ in range(n_in)]
    # the block output (x of add_rms_norm, delta of the transition) in bf16, the streams fp32
    dtypes = [torch.float32] * n_in if n_in == 1 else [torch.bfloat16, torch.float32, torch.float32][:n_in]
    if name == "magicnorm_transition":
        dtypes = [torch.float32, torch.bfloat16, torch.float32]
    cot = [torch.randn(29, 48, generator=g).to(DEVICE) for _ in range(3)]

    def run(fused: bool):
        xs = [b.to(dt).to(DEVICE).requires_grad_() for b, dt in zip(base, dtypes)]
        out = op(*xs, backend=backend, out_dtype=torch.bfloat16) if fused else op(*xs, backend=backend)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if not fused:
            out = tuple(o.to(torch.bfloat16) if i == idx else o for i, o in enumerate(out))
        loss = sum((o.float() * c).sum() for o, c in zip(out, cot))
        return out, torch.autograd.grad(loss, xs)

    (out_f, grads_f), (out_c, grads_c) = run(True), run(False)
    assert out_f[idx].dtype == torch.bfloat16
    for a, b in zip(out_f, out_c):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b, dt in zip(grads_f, grads_c, dtypes):
        assert a.dtype == b.dtype == dt
        if backend == "compile":  # two inductor graphs: their reductions may round apart
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
        else:
            assert torch.equal(a, b)


def test_compile_norm_recomputes_its_output_bit_for_bit():
    """What the backward of a fused cast renormalises (:func:`rms_norm.normed` on h and rstd) is
    the forward's fp32 output exactly."""
    from hrm.ops.impl import rms_norm as rms_norm_module

    x, r = randn(37, 100, scale=3).detach().cpu(), randn(37, 100).detach().cpu()
    h, y, rstd = rms_norm_module._add_rms_norm_fwd_compiled(x, r, 1e-6, None)
    assert torch.equal(rms_norm_module.normed(h, rstd, True), y)
    assert torch.equal(rms_norm_module.normed(y, rstd, False), y)


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_out_dtype_saves_no_more(name):
    """With a fused cast the compile backend keeps the norm's input, not its rounded output: as
    many bytes as without it."""
    op, n_in, _ = NORMS[name]
    xs = [torch.randn(16, 32, device=DEVICE, requires_grad=True) for _ in range(n_in)]
    plain = saved_bytes(lambda: op(*xs, backend="compile"))
    assert saved_bytes(lambda: op(*xs, backend="compile", out_dtype=torch.bfloat16)) == plain


def cpu_cases(shapes):
    """``("cpu", dtype, shape)``: the C++ kernels of the cpu backend on every shape, fp32 and bf16."""
    return [
        pytest.param("cpu", dt, s, id=f"cpu-{str(dt)[6:]}-{'x'.join(map(str, s))}", marks=needs_cpu_kernel)
        for s in shapes
        for dt in (torch.float32, torch.bfloat16)
    ]


# -- SwiGLU ----------------------------------------------------------------------------------
SWIGLU_SHAPES = [(37, 2 * 40), (2, 9, 2 * 123), (1, 2), (0, 2 * 17)]


@pytest.mark.parametrize("backend,dtype,shape", cases(SWIGLU_SHAPES[:2]) + cpu_cases(SWIGLU_SHAPES))
def test_swiglu(backend, dtype, shape):
    check_against_oracle(lambda gu, backend: ops.swiglu(gu, backend=backend), [randn(*shape, scale=2)], backend, dtype)


# -- RoPE on the fused [gate | q | k | v] projection -------------------------------------------
def _positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


ROPE_SHAPES = [(37, 3, 8, False), (23, 2, 6, False), (17, 2, 10, True)]


@pytest.mark.parametrize(
    "backend,dtype,shape", cases(ROPE_SHAPES) + cpu_cases([*ROPE_SHAPES, (65, 4, 64, False), (1, 1, 2, True)])
)
def test_split_rope(backend, dtype, shape):
    T, H, hd, general = shape
    if general:  # arbitrary cos/sin halves: the kernels must not assume the duplicated-frequency layout
        cos, sin = (torch.rand(T, hd, device=DEVICE) * 2 - 1 for _ in range(2))
    else:  # positions restart per packed sequence
        cos, sin = rope_cos_sin(_positions([5, 1, T - 6]).to(DEVICE), hd, 10000.0)
    check_against_oracle(
        lambda gqkv, backend: ops.split_rope(gqkv, cos, sin, backend=backend), [randn(T, 4 * H, hd)], backend, dtype
    )


# -- response-only linear cross-entropy -------------------------------------------------------
def _labels(T, V, every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::every] = -100
    return labels.to(DEVICE)


# -- token embedding -------------------------------------------------------------------------
def _embedding(ids, scale):
    return lambda w, backend: ops.embedding(ids, w, scale, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 300, 24), (1, 5, 3), (200, 7, 65)], ids=lambda s: "x".join(map(str, s)))
def test_embedding(dtype, shape):
    """Repeated ids (more tokens than rows), rows that never occur, 2-d ids, one token."""
    T, V, d = shape
    ids = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    check_against_oracle(_embedding(ids, 1.7), [randn(V, d)], "cpu", dtype)
    check_against_oracle(_embedding(ids.view(1, T), 0.5), [randn(V, d)], "cpu", dtype)


@needs_cpu_kernel
def test_embedding_cpu_backward_is_index_add_bit_for_bit():
    """The C++ backward writes each row once: the same bits as zeros plus ``index_add_`` (token
    order), rows no token reads exactly zero, at a 32K vocabulary with a byte tokenizer's ids."""
    g = torch.Generator().manual_seed(1)
    V, T, d = 32000, 4096, 64
    ids = torch.randint(0, 260, (T,), generator=g)
    w = torch.randn(V, d, generator=g, requires_grad=True)
    up = torch.randn(T, d, generator=g)
    ops.embedding(ids, w, 1.3, backend="cpu").backward(up)
    assert torch.equal(w.grad, torch.zeros(V, d).index_add_(0, ids, up, alpha=1.3))


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_cpu_forward_is_the_reference_bit_for_bit(dtype):
    """The C++ gather scales in fp32 and rounds once, as ``F.embedding`` then the multiply do:
    the same bits, at a width that is not a multiple of any vector and with 2-d ids."""
    g = torch.Generator().manual_seed(2)
    V, d = 50, 37
    ids = torch.randint(0, V, (3, 11), generator=g)
    w = torch.randn(V, d, generator=g).to(dtype)
    got = ops.embedding(ids, w, 1.3, backend="cpu")
    assert got.dtype == dtype and got.shape == (3, 11, d)
    assert torch.equal(got, ops.embedding(ids, w, 1.3, backend="torch"))


@needs_cpu_kernel
def test_embedding_cpu_rejects_ids_outside_the_table():
    w = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"id 10 of token 2 is outside \[0, 10\)"):
        ops.embedding(torch.tensor([0, 9, 10]), w, 1.0, backend="cpu")
    with pytest.raises(RuntimeError, match=r"id -1 of token 0 is outside \[0, 10\)"):
        torch.ops.hrm_ew.embedding_bwd(torch.tensor([-1]), torch.randn(1, 4), 10, 1.0)


def _lce(labels, chunk_rows):
    return lambda z, w, backend: ops.linear_cross_entropy(z, w, labels, chunk_rows=chunk_rows, backend=backend)


@pytest.mark.parametrize("backend,dtype,shape", cases([(37, 24, 300, 8), (50, 40, 1000, 7)]))
def test_linear_cross_entropy(backend, dtype, shape):
    T, d, V, chunk = shape
    check_against_oracle(_lce(_labels(T, V), chunk), [randn(T, d), randn(V, d, scale=0.3)], backend, dtype)


@pytest.mark.parametrize("backend", [*FUSED, pytest.param("cpu", marks=needs_cpu_kernel)])
def test_linear_cross_entropy_without_supervised_rows(backend):
    z, w = randn(11, 24), randn(260, 24)
    labels = torch.full((11,), -100, device=DEVICE)
    check_against_oracle(_lce(labels, 4), [z, w], backend, torch.float32)
    loss, pred = ops.linear_cross_entropy(z.float().to(DEVICE), w.float().to(DEVICE), labels, backend=backend)
    assert loss.item() == 0 and torch.all(pred == -100)


@pytest.mark.parametrize("backend", [*FUSED, pytest.param("cpu", marks=needs_cpu_kernel)])
def test_linear_cross_entropy_default_chunks_and_no_grad(backend):
    z, w, labels = randn(64, 32).detach().to(DEVICE), randn(700, 32, scale=0.3).detach().to(DEVICE), _labels(64, 700, 2)
    ref_loss, ref_pred = ops.linear_cross_entropy(z.detach(), w.detach(), labels, backend="torch")
    with torch.no_grad():
        loss, pred = ops.linear_cross_entropy(z.float(), w.float(), labels, backend=backend)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    assert torch.equal(pred, ref_pred)


@pytest.mark.parametrize("backend", ["compile", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_linear_cross_entropy_follows_autocast(backend):
    """Under bf16 autocast the fused head multiplies in bf16, as ``F.linear`` in the reference
    does (a custom op runs below autocast, so the op applies it itself): the loss matches the
    reference's to float rounding, far closer than an fp32 head does (~90x here); the
    weight gradient comes back in the weight's dtype."""
    z, w, labels = randn(300, 64), randn(1000, 64, scale=0.3), _labels(300, 1000, every=2).cpu()
    runs = {}
    for b in ("torch", backend):
        zz, ww = z.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred = ops.linear_cross_entropy(zz, ww, labels, chunk_rows=64, backend=b)
        loss.backward()
        runs[b] = loss.detach(), pred, zz.grad, ww.grad
    (ref_loss, ref_pred, ref_dz, ref_dw), (loss, pred, dz, dw) = runs["torch"], runs[backend]
    with torch.no_grad():
        fp32_loss, _ = ops.linear_cross_entropy(z.float(), w.float(), labels, backend="torch")
    assert (fp32_loss - ref_loss).abs() > 20 * (loss - ref_loss).abs()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert torch.equal(pred, ref_pred)
    assert dz.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(dz, ref_dz, rtol=0, atol=1e-2 * ref_dz.abs().max().item())
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=1e-2 * ref_dw.abs().max().item())


# -- the cpu backend's C++ chunk (fp32 and bf16 logits) -----------------------------------------


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(37, 24, 300, 8), (50, 40, 1000, 7), (9, 16, 1, 4), (6, 8, 33, 64)], ids=lambda s: "x".join(map(str, s))
)
def test_linear_cross_entropy_cpu(dtype, shape):
    # a vocabulary of one, one not a multiple of the vector width, a chunk larger than the rows
    T, d, V, chunk = shape
    check_against_oracle(_lce(_labels(T, V), chunk), [randn(T, d), randn(V, d, scale=0.3)], "cpu", dtype)


def _transposed_chunk(logits: Tensor, dtype, cols: int) -> Tensor:
    """``[V, cols]``: the chunk's rows as columns, then zero padding columns (as the cpu loop
    makes them)."""
    C, V = logits.shape
    out = torch.zeros(V, cols, dtype=dtype)
    out[:, :C] = logits.to(dtype).t()
    return out


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_chunk_cpu_kernel(dtype):
    """``hrm_ce::ce_chunk_t`` on transposed logits: ties go to the first maximum (as ``argmax``),
    -inf logits count as zero probability (a column whose first tiles are all -inf too), the
    gradient lands over the logits as g^T and in the grad buffer as g, zero in the padding
    columns; vocabularies of one, of an odd size and a large one; no gradient pass without
    ``with_grad``."""
    for C, V, cols in ((13, 300, 32), (3, 151_808, 32), (40, 1, 64), (5, 70, 32)):
        logits = torch.randn(C, V, dtype=torch.float64) * 4
        if V > 8:
            logits[1, [7, V - 5]] = 50.0  # a tie: the first index wins
            logits[2, : V // 2] = float("-inf")
        targets = torch.randint(V // 2, V, (C,), generator=torch.Generator().manual_seed(V))
        x = logits.to(dtype).double()  # what the kernel sees
        want_loss = torch.logsumexp(x, -1) - x.gather(1, targets[:, None]).squeeze(1)
        want_grad = torch.softmax(x, -1) - torch.nn.functional.one_hot(targets, V)
        lt = _transposed_chunk(logits, dtype, cols)
        grad = torch.full((cols, V), float("nan"), dtype=dtype)
        loss, pred = linear_cross_entropy_module._ce_chunk_cpu(lt, targets, grad, True)
        assert loss.dtype == torch.float32 and pred.dtype == torch.int64 and loss.shape == pred.shape == (C,)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        assert torch.equal(pred, x.argmax(-1))
        if V > 8:
            assert pred[1] == 7
        want = want_grad.to(dtype).double()
        torch.testing.assert_close(grad[:C].double(), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(lt[:, :C].t().double(), want, rtol=0, atol=1e-6)
        assert torch.equal(lt[:, :C].t(), grad[:C]) and torch.all(grad[C:] == 0) and torch.all(lt[:, C:] == 0)
        untouched = _transposed_chunk(logits, dtype, cols)
        loss2, pred2 = linear_cross_entropy_module._ce_chunk_cpu(untouched, targets, None, False)
        assert torch.equal(untouched, _transposed_chunk(logits, dtype, cols))
        assert torch.equal(loss2, loss) and torch.equal(pred2, pred)


@needs_cpu_kernel
def test_cross_entropy_chunk_cpu_kernel_does_not_depend_on_the_thread_count():
    """The vocabulary's parts merge in a fixed order: one thread and two give the same bits."""
    g = torch.Generator().manual_seed(0)
    lt = (torch.randn(5000, 64, generator=g) * 3).bfloat16()
    targets = torch.randint(0, 5000, (50,), generator=g)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            buf, grad = lt.clone(), torch.empty(64, 5000, dtype=torch.bfloat16)
            runs.append((*linear_cross_entropy_module._ce_chunk_cpu(buf, targets, grad, True), buf, grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["compile", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_linear_cross_entropy_chunk_logits_in_several_products(backend, monkeypatch):
    """A chunk's logits are computed ``_MATMUL_ROWS`` rows per matmul: a last partial product too."""
    monkeypatch.setattr(linear_cross_entropy_module, "_MATMUL_ROWS", 3)
    T, V, d = 40, 70, 16
    check_against_oracle(_lce(_labels(T, V), 16), [randn(T, d), randn(V, d, scale=0.3)], backend, torch.float32)


@pytest.mark.parametrize(
    "loop",
    [
        "compile",
        pytest.param("cpu", marks=needs_cpu_kernel),
    ],
)
def test_linear_cross_entropy_products_take_whole_row_buckets_on_cpu(loop, monkeypatch):
    """On a CPU every product of the chunk loop runs on a multiple of ``_CPU_ROW_BUCKET`` rows
    (oneDNN compiles a kernel for each new shape), whatever the supervised rows' count: the
    zero rows added change nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mms = (torch.ops.aten.mm.default, torch.ops.aten.mm.out)

    class ProductShapes(TorchDispatchMode):
        dims: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mms:
                self.dims += [*args[0].shape, *args[1].shape]
            return func(*args, **(kwargs or {}))

    T, V, d = 150, 300, 16
    z, w, labels = randn(T, d).detach().cpu(), randn(V, d, scale=0.3).detach().cpu(), _labels(T, V).cpu()
    rows = ops.supervised_rows(labels)  # 100 rows: chunks of 40, 40 and 20
    if loop == "compile":
        chunked = functools.partial(
            linear_cross_entropy_module.linear_cross_entropy_chunked,
            ce_chunk=linear_cross_entropy_module._ce_chunk_compile,
        )
    else:
        chunked = linear_cross_entropy_module.linear_cross_entropy_chunked_cpu
    z = z.bfloat16() if loop == "cpu" else z  # the cpu loop's path: bf16 products, fp32 dW slabs

    def run():
        return chunked(z, w, labels, rows, 40, with_grad=True)

    with ProductShapes() as log:
        bucketed = run()
    assert 64 in log.dims and set(log.dims) <= {64, V, d}, log.dims  # never 40 or 20 rows
    monkeypatch.setattr(linear_cross_entropy_module, "_CPU_ROW_BUCKET", 32 if loop == "cpu" else 1)
    exact = run()
    assert torch.equal(bucketed[1], exact[1])  # pred
    for i in (0, 2, 3):  # loss, dz, dW
        torch.testing.assert_close(bucketed[i], exact[i], rtol=1e-5, atol=1e-6)


@needs_cpu_kernel
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 70000])
def test_cpu_dw_slab_accumulate(n):
    """``hrm_ce::accumulate``: an fp32 slab of dW plus a bf16 product in one pass (overwrite, then
    add), exact in fp32 (bf16 to fp32 is exact, the one add rounds as torch's)."""
    cpp_extension.load()
    g = torch.Generator().manual_seed(n)
    part, base = torch.randn(n, generator=g).bfloat16(), torch.randn(n, generator=g)
    out = torch.full((n,), float("nan"))
    torch.ops.hrm_ce.accumulate(out, part, True)
    assert torch.equal(out, part.float())
    out = base.clone()
    torch.ops.hrm_ce.accumulate(out, part, False)
    assert torch.equal(out, base + part.float())
    with pytest.raises(RuntimeError, match="part must be a contiguous bf16"):
        torch.ops.hrm_ce.accumulate(torch.zeros(n + 1), torch.zeros(n + 1), False)


@needs_cpu_kernel
def test_linear_cross_entropy_cpu_dw_in_slabs(monkeypatch):
    """bf16 products added to fp32 dW slab by slab (a last partial slab too), over several chunks."""
    monkeypatch.setattr(linear_cross_entropy_module, "_DW_SLAB_ROWS", 7)
    T, V, d = 40, 30, 16
    check_against_oracle(_lce(_labels(T, V), 8), [randn(T, d), randn(V, d, scale=0.3)], "cpu", torch.bfloat16)


@needs_cpu_kernel
def test_cross_entropy_chunk_cpu_rejects_bad_input_before_writing():
    """Targets outside the vocabulary, columns that are not whole blocks of 32 and a gradient
    buffer of the wrong shape are errors, and nothing is written."""
    lt, grad = torch.randn(10, 32), torch.zeros(32, 10)
    before = lt.clone()
    for bad in (10, -100):
        with pytest.raises(RuntimeError, match="outside"):
            linear_cross_entropy_module._ce_chunk_cpu(lt, torch.tensor([1, 2, bad, 3]), grad, True)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        linear_cross_entropy_module._ce_chunk_cpu(torch.randn(10, 20), torch.tensor([1]), torch.zeros(20, 10), True)
    with pytest.raises(RuntimeError, match="grad must be"):
        linear_cross_entropy_module._ce_chunk_cpu(lt, torch.tensor([1]), torch.zeros(10, 32), True)
    assert torch.equal(lt, before) and torch.all(grad == 0)


@pytest.mark.parametrize("block_v", [16, 64, 512])
def test_cross_entropy_chunk_kernel_vocabulary_blocks(block_v):
    """The online log-sum-exp across vocabulary blocks (the last one partial), ties resolved to
    the first maximum as ``argmax`` does, and the in-place gradient."""
    logits = (torch.randn(13, 300, dtype=torch.float64) * 4).to(DEVICE)
    logits[3, [7, 200]] = 50.0  # a tie across two blocks: the first index wins
    targets = _labels(13, 300, every=100)
    targets[0] = 0
    targets[targets < 0] = 299
    lse = torch.logsumexp(logits, -1)
    want_loss = lse - logits.gather(1, targets[:, None]).squeeze(1)
    want_grad = torch.softmax(logits, -1) - torch.nn.functional.one_hot(targets, 300)
    buf = logits.float().contiguous()
    loss, pred = ce_chunk_forward(buf, targets, True, block_v=block_v)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, logits.argmax(-1)) and pred[3] == 7
    torch.testing.assert_close(buf.double(), want_grad, rtol=1e-5, atol=1e-6)


# -- the GPU tiling (many programs, partial tiles) under the interpreter ------------------------
def test_gpu_tiling_matches_reference(monkeypatch):
    """The launchers' GPU tile sizes: several programs per op, the last tile partial, a
    vocabulary spread over several blocks."""
    monkeypatch.setenv("HRM_TRITON_TILES", "gpu")
    assert common.tile_target() == "gpu"
    check_against_oracle(
        lambda x, r, backend: ops.add_rms_norm(x, r, backend=backend),
        [randn(70, 100), randn(70, 100)],
        "triton",
        torch.float32,
    )
    check_against_oracle(
        lambda x, d, o, backend: ops.magicnorm_transition(x, d, o, backend=backend),
        [randn(70, 100), randn(70, 100), randn(70, 100)],
        "triton",
        torch.float32,
    )
    check_against_oracle(
        lambda gu, backend: ops.swiglu(gu, backend=backend), [randn(9, 2 * 1100)], "triton", torch.float32
    )
    cos, sin = rope_cos_sin(torch.arange(70, device=DEVICE), 16, 10000.0)
    check_against_oracle(
        lambda g, backend: ops.split_rope(g, cos, sin, backend=backend), [randn(70, 4 * 3, 16)], "triton", torch.float32
    )
    check_against_oracle(_lce(_labels(9, 4500), 4), [randn(9, 16), randn(4500, 16, scale=0.3)], "triton", torch.float32)


# -- forward-only without gradients; what the backward keeps -----------------------------------
@pytest.mark.parametrize("backend", [*FUSED, pytest.param("cpu", marks=needs_cpu_kernel)])
def test_saved_tensors(backend):
    T, d, I, H, hd = 16, 32, 48, 2, 8
    x, r = (torch.randn(T, d, device=DEVICE, requires_grad=True) for _ in range(2))
    gu = torch.randn(T, 2 * I, device=DEVICE, requires_grad=True)
    gqkv = torch.randn(T, 4 * H, hd, device=DEVICE, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T, device=DEVICE), hd, 10000.0)
    rows = T * 4  # one fp32 rstd per row
    # SwiGLU keeps only its input; RoPE only cos/sin; the norms their output and rstd
    assert saved_bytes(lambda: ops.swiglu(gu, backend=backend)) == gu.numel() * 4
    assert saved_bytes(lambda: ops.split_rope(gqkv, cos, sin, backend=backend)) == 2 * cos.numel() * 4
    assert saved_bytes(lambda: ops.add_rms_norm(x, r, backend=backend)) == x.numel() * 4 + rows
    assert saved_bytes(lambda: ops.magicnorm_transition(x, r, x, backend=backend)) == 2 * x.numel() * 4 + 2 * rows
    with torch.no_grad():  # forward-only: nothing is kept
        for fn in (
            lambda: ops.swiglu(gu, backend=backend),
            lambda: ops.add_rms_norm(x, r, backend=backend),
            lambda: ops.magicnorm_transition(x, r, x, backend=backend),
            lambda: ops.split_rope(gqkv, cos, sin, backend=backend),
            lambda: ops.linear_cross_entropy(x, gu[:, :d].contiguous(), _labels(T, T), backend=backend),
        ):
            assert saved_bytes(fn) == 0


# -- custom-op registrations -------------------------------------------------------------------
def _opcheck_cases():
    T, d, H, hd, V = 9, 12, 2, 6, 40
    x, r, o = (torch.randn(T, d, device=DEVICE, requires_grad=True) for _ in range(3))
    gu = torch.randn(T, 2 * d, device=DEVICE, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T, device=DEVICE), hd, 10000.0)
    gqkv = torch.randn(T, 4 * H, hd, device=DEVICE, requires_grad=True)
    w = torch.randn(V, d, device=DEVICE, requires_grad=True)
    labels = _labels(T, V)
    hrm = torch.ops.hrm
    return [
        (hrm.rms_norm, (x, 1e-6)),
        (hrm.add_rms_norm, (x, r, 1e-6)),
        (hrm.magicnorm_transition, (x, r, o, 1e-6)),
        (hrm.swiglu, (gu,)),
        (hrm.split_rope, (gqkv, cos, sin)),
        (hrm.linear_cross_entropy_triton, (x, w, labels, None, 4, True)),
        (hrm.linear_cross_entropy_compile, (x, w, labels, (labels != -100).nonzero().squeeze(1), 4, True)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_custom_op_registrations(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@needs_cpu_kernel
def test_cpu_loss_and_embedding_custom_op_registrations():
    """The cpu backend's loss loop (transposed logits, C++ chunk) and the embedding's C++
    forward and backward as custom ops: schema, fakes and autograd."""
    T, d, V = 9, 12, 40
    x, w = torch.randn(T, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    labels = _labels(T, V).cpu()
    torch.library.opcheck(torch.ops.hrm.linear_cross_entropy_cpu, (x, w, labels, None, 4, True))
    torch.library.opcheck(torch.ops.hrm.linear_cross_entropy_cpu, (x.bfloat16(), w, labels, None, 4, True))
    ids = torch.randint(0, V, (T,))
    torch.library.opcheck(torch.ops.hrm.embedding_cpu_backward, (ids, torch.randn(T, d), V, 1.5))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.hrm.embedding_cpu_forward, (ids, torch.randn(V, d, dtype=dtype), 1.5))


@needs_cpu_kernel
def test_cpu_elementwise_kernels_reject_bad_shapes():
    ew = torch.ops.hrm_ew
    with pytest.raises(RuntimeError, match="width must be even"):
        ops.swiglu(torch.randn(3, 7), backend="cpu")
    with pytest.raises(RuntimeError, match=r"dy must be \[3, 4\]"):
        ew.swiglu_bwd(torch.randn(3, 8), torch.randn(3, 5))
    cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0)
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous fp32"):
        ops.split_rope(torch.randn(4, 8, 8), cos, sin, backend="cpu")  # 4 tokens, 5 positions
    with pytest.raises(RuntimeError, match="one shape"):
        ew.split_rope_bwd(*(torch.randn(5, 2, 8) for _ in range(3)), torch.randn(5, 3, 8), cos, sin)
    half = torch.randn(5, 8, 8, dtype=torch.float16)  # a dtype the kernels do not take: the fallback runs it
    torch.testing.assert_close(
        ops.split_rope(half, cos, sin, backend="cpu")[1], ops.split_rope(half, cos, sin, backend="torch")[1]
    )


@needs_cpu_kernel
def test_cpu_custom_op_registrations():
    T, H, hd = 9, 2, 6
    gu = torch.randn(T, 2 * 10, requires_grad=True)
    gqkv = torch.randn(T, 4 * H, hd, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T), hd, 10000.0)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.hrm.swiglu_cpu, (gu.to(dtype).detach().requires_grad_(),))
        torch.library.opcheck(torch.ops.hrm.split_rope_cpu, (gqkv.to(dtype).detach().requires_grad_(), cos, sin))
