"""What a GPU run must get right, checked here: no host reads inside a train step, output
dtypes that promote like the references (the residual stream stays fp32 under autocast),
64-bit offsets, the cross-entropy kernel's read-before-overwrite order, launches on the
tensors' own device, and tests that run on the real device when there is one."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

from hrm import HRMText, ModelConfig, ops
from hrm.data import Sample, pack_row
from hrm.doctor import count_host_reads
from hrm.errors import HrmError
from hrm.ops import common, dispatch
from hrm.ops.common import jit, tl
from hrm.ops.impl.linear_cross_entropy import ce_chunk_forward
from hrm.ops.impl.prefixlm_attention import triton_kernels
from hrm.training.optim import AdamAtan2

CFG = ModelConfig(vocab_size=70, vocab_multiple=16, hidden_size=48, num_heads=3, n_layers=4)
# Backends whose kernels take DEVICE's tensors (triton: under the interpreter without CUDA)
AVAILABLE = [b for b in dispatch.available_backends() if not (DEVICE.type == "cuda" and b == "cpu")]


def packed_batch(seed: int = 0):
    """Seven samples of assorted lengths, a one-token response among them, and padding."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (1, 1), (9, 4), (3, 2), (7, 1), (2, 6), (4, 3)]
    samples = [
        Sample(torch.randint(3, 70, (i,), generator=g).tolist(), torch.randint(3, 70, (r,), generator=g).tolist())
        for i, r in shapes
    ]
    return pack_row(samples, sum(s.packed_len for s in samples) + 5, pad_id=0).to(DEVICE)


# -- 3: no host reads in a train step ---------------------------------------------------------------
@pytest.mark.parametrize("backend", AVAILABLE)
def test_train_step_reads_nothing_back_to_the_host(backend):
    """Forward (truncated backprop), loss, backward and optimizer step after a warm-up step:
    no ``.item()`` / ``bool()`` / ``int()`` of a tensor and no ``tolist()`` anywhere inside. The
    batch's packing and supervised rows are derived where it is built, outside the step."""
    torch.manual_seed(0)
    model = HRMText(CFG, backend=backend).to(DEVICE)
    optimizer = AdamAtan2(model.parameters(), lr=1e-3, backend=backend)
    batch = packed_batch()

    def step():
        loss, metrics = model(**batch.model_inputs(), bp_steps=3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), metrics

    step()  # warm-up: compiles, builds extensions
    with count_host_reads() as reads:
        loss, _ = step()
    assert reads.total == 0, f"{backend}: {reads.sites}"
    assert torch.isfinite(loss)


def test_packing_is_validated_where_the_batch_is_built():
    with pytest.raises(HrmError, match="prefix length"):
        ops.AttentionPacking.build([0, 3], [4], 3)


# -- 1: output dtypes promote like the references ----------------------------------------------------
LOW = torch.float16  # the interpreter mishandles bf16 arithmetic; a GPU runs bf16 too
MIXES = [(LOW, torch.float32), (torch.float32, LOW), (LOW, LOW), (torch.float32, torch.float32)]
if DEVICE.type == "cuda":
    MIXES += [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
FUSED = [b for b in ("compile", "cpu", "triton") if b in AVAILABLE]


def _dtypes(out):
    return [o.dtype for o in (out if isinstance(out, tuple) else (out,))]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("a,b", MIXES, ids=lambda d: str(d)[6:])
def test_output_dtypes_follow_the_reference(backend, a, b):
    x, r = (torch.randn(6, 40, device=DEVICE) for _ in range(2))
    cases = [
        (ops.add_rms_norm, (x.to(a), r.to(b))),
        (ops.magicnorm_transition, (x.to(a), r.to(b), x.to(torch.float32))),
        (ops.magicnorm_transition, (x.to(torch.float32), r.to(a), x.to(b))),
    ]
    for fn, args in cases:
        want = fn(*args, backend="torch")
        got = fn(*args, backend=backend)
        assert _dtypes(got) == _dtypes(want), (fn.__name__, backend, [t.dtype for t in args])
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", FUSED)
def test_mixed_dtype_gradients_reach_each_input_in_its_dtype(backend):
    x = torch.randn(5, 32, device=DEVICE, dtype=LOW, requires_grad=True)
    r = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    grads = {}
    for b in ("torch", backend):
        h, y = ops.add_rms_norm(x, r, backend=b)
        grads[b] = torch.autograd.grad((h.float() * 0.5 + y.float()).sum(), (x, r))
    for g, w, leaf in zip(grads[backend], grads["torch"], (x, r)):
        assert g.dtype == w.dtype == leaf.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=5e-3, atol=5e-3)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available here")
def test_triton_model_keeps_fp32_states_under_autocast(monkeypatch):
    """The model on ``triton`` under reduced-precision autocast (fp16 where the interpreter runs
    it): the residual stream and the recurrent states z_H / z_L stay fp32 after every stack
    call, as on the ``torch`` backend, the pre-norms that feed linear layers come out in the
    autocast dtype (their ``out_dtype``), and the loss matches the reference's."""
    seen: dict[str, list] = {"torch": [], "triton": []}
    current = ["torch"]
    for name in ("add_rms_norm", "magicnorm_transition"):
        fn = getattr(ops, name)

        def record(*args, _fn=fn, _name=name, **kwargs):
            out = _fn(*args, **kwargs)
            seen[current[0]].append((_name, [o.dtype for o in out], kwargs.get("out_dtype")))
            return out

        monkeypatch.setattr(ops, name, record)
    torch.manual_seed(0)
    ref = HRMText(CFG, backend="torch").to(DEVICE)
    fused = HRMText(CFG, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    batch = packed_batch()
    low = torch.bfloat16 if DEVICE.type == "cuda" else LOW
    losses = {}
    for backend, model in (("torch", ref), ("triton", fused)):
        current[0] = backend
        with torch.autocast(DEVICE.type, dtype=low):
            losses[backend], _ = model(**batch.model_inputs(), bp_steps=3)
    assert seen["triton"] == seen["torch"]
    assert seen["triton"] and all(
        dtypes[:-1] == [torch.float32] * (len(dtypes) - 1) and dtypes[-1] == (out_dtype or torch.float32)
        for _, dtypes, out_dtype in seen["triton"]
    ), seen
    assert {out_dtype for _, _, out_dtype in seen["triton"]} == {low, None}  # the pre-norms, the exit norm
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-2, atol=0)


# -- 2: 64-bit offsets ---------------------------------------------------------------------------------
@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available here")
def test_attention_key_offsets_are_64_bit():
    """The forward kernel steps its key/value pointers by ``tile * BLOCK_N * stride_t``. For k as
    the strided view of a fused [300K, 4 * 64, 128] projection (what the model passes) the
    last tile's offset passes 2**31; the kernel's offset helper, run on the launcher's own
    stride and tile size, must return it exactly."""
    T, H, D = 300_000, 64, 128
    gqkv = torch.empty(T, 4 * H, D, dtype=torch.bfloat16, device="meta")
    k = gqkv.split(H, dim=1)[2]
    cfg = triton_kernels.attention_config(D, torch.bfloat16, (9, 0)).fwd
    last_tile = (T - 1) // cfg.block_n
    want = last_tile * cfg.block_n * k.stride(0)
    assert want > 2**31
    got = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _offset_probe[(1,)](got, last_tile, k.stride(0), BLOCK=cfg.block_n)
    assert int(got) == want


@jit
def _offset_probe(OUT, tile, stride, BLOCK: tl.constexpr):
    tl.store(OUT, triton_kernels._tile_offset(tile, BLOCK, stride))


# -- 4: the cross-entropy kernel reads the target logit before the in-place gradient -----------------
@pytest.mark.skipif("triton" not in AVAILABLE, reason="the triton backend is not available here")
def test_ce_kernel_loss_on_many_rows_with_in_place_gradient(monkeypatch):
    """Hundreds of rows, a vocabulary of several GPU blocks, the gradient written over the
    logits: every row's loss equals ``lse - x[target]`` of the original logits."""
    monkeypatch.setenv("HRM_TRITON_TILES", "gpu")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 9000, generator=g) * 3).to(DEVICE)
    targets = torch.randint(0, 9000, (300,), generator=g).to(DEVICE)
    targets[:4] = torch.tensor([0, 4095, 4096, 8999])  # first / last column of a block
    want = torch.logsumexp(logits.double(), -1) - logits.double().gather(1, targets[:, None]).squeeze(1)
    buf = logits.clone()
    loss, _ = ce_chunk_forward(buf, targets, True)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    grad = torch.softmax(logits.double(), -1) - torch.nn.functional.one_hot(targets, 9000)
    torch.testing.assert_close(buf.double(), grad, rtol=1e-5, atol=1e-6)


def test_ce_kernel_takes_the_target_logit_in_its_read_only_pass():
    """Structure of the fix: no load of the target logit after the reductions (other warps may
    already be storing gradients over the logits then)."""
    import inspect

    from hrm.ops.impl import linear_cross_entropy as lce

    src = inspect.getsource(lce._ce_chunk_kernel.fn if hasattr(lce._ce_chunk_kernel, "fn") else lce._ce_chunk_kernel)
    assert "+ target" not in src  # the old separate load: LOGITS + row * n_cols + target
    assert src.index("x_target +=") < src.index("if WRITE_GRAD")


# -- 5: launches on the tensors' device ------------------------------------------------------------------
def test_device_of_makes_the_tensor_device_current(monkeypatch):
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)

    class FakeCuda:
        device = torch.device("cuda", 1)

    with common.device_of(FakeCuda()):
        pass
    with common.device_of(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def _launches_outside_guard(path: Path) -> list[str]:
    """``kernel[grid](...)`` calls not inside a ``with device_of(...)`` block."""
    tree = ast.parse(path.read_text())
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "device_of"
                for i in node.items
            )
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and not guarded:
            bad.append(f"{path.name}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return bad


def test_every_kernel_launch_is_device_guarded():
    root = Path(ops.__file__).parent / "impl"
    files = sorted(root.rglob("*.py"))
    launches = [f for f in files if "](" in f.read_text()]
    assert len(launches) >= 6
    assert [b for f in files for b in _launches_outside_guard(f)] == []


# -- 6: tests run on the real device -------------------------------------------------------------------
def test_interpreter_only_without_cuda(device):
    if torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") != "1" and device.type == "cuda"
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA devices only")
def test_triton_attention_fp32_with_tf32(monkeypatch):
    """With TF32 allowed the fp32 kernels use TF32 dots: within TF32's own tolerance of fp64."""
    from attention_oracle import attention, dense_attention, make_packing

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    cu, pl, T = make_packing([200, 1, 57], [80, 1, 57], 7)
    q, k, v, gate = (torch.randn(T, 2, 64, dtype=torch.float64) for _ in range(4))
    want = dense_attention(q, k, v, cu, pl, gate)
    got = attention(*(x.float().to(DEVICE) for x in (q, k, v)), cu, pl, gate=gate.float().to(DEVICE), backend="triton")
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=5e-3)


# -- 7: linear cross-entropy sized for the device ------------------------------------------------------
def test_chunk_rows_come_from_the_device(monkeypatch):
    """On a GPU: 1/64 of its memory in logits, at least 4 rows per SM (rounded up to a power of
    two); on a CPU: 32 MiB of logits."""
    from hrm.ops.impl import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_gpu_limits", lambda index: (80 * 2**30 // 64, 132))
    assert lce.default_chunk_rows(151_808, 2, "cuda:0") == 4096  # 1.25 GiB / (2 B x 151,808) = 4420 -> 4096
    assert lce.default_chunk_rows(8192, 4, "cuda:0") == 32768
    assert lce.default_chunk_rows(10**8, 4, "cuda:0") >= 4 * 132  # a huge vocabulary still fills the SMs
    assert lce.default_chunk_rows(32_000, 4, "cpu") == 256
    assert lce.default_chunk_rows(151_808, 2, "cpu") == 64


@pytest.mark.parametrize("backend", [b for b in ("compile", "triton") if b in AVAILABLE])
def test_weight_gradient_accumulates_slab_by_slab(backend, monkeypatch):
    """A 16-bit head with fp32 dW over several chunks and several vocabulary slabs: dW matches
    the reference's gradient (fp32 accumulation of 16-bit products)."""
    from hrm.ops.impl import linear_cross_entropy as lce

    monkeypatch.setattr(lce, "_DW_SLAB_ROWS", 48)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 16, generator=g).to(DEVICE, LOW).requires_grad_()
    w = (torch.randn(130, 16, generator=g) * 0.3).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 130, (40,), generator=g).to(DEVICE)
    labels[::3] = -100
    grads = {}
    for b in ("torch", backend):
        loss, _ = ops.linear_cross_entropy(z, w.to(LOW) if b == "torch" else w, labels, chunk_rows=8, backend=b)
        grads[b] = torch.autograd.grad(loss, (z, w))
    assert grads[backend][1].dtype == torch.float32
    torch.testing.assert_close(grads[backend][1], grads["torch"][1].float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[backend][0].float(), grads["torch"][0].float(), rtol=2e-2, atol=2e-3)
