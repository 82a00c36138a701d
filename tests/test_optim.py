"""Adam-atan2 (multi-tensor vs per-tensor reference vs hand computation, the fused ``compile``
backend vs an fp64 reference, compiling once), EMA, LR schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from hrm import ops
from hrm.config import get_preset
from hrm.errors import BackendUnavailable
from hrm.model import HRMText
from hrm.ops import adam_atan2_, available_backends, dispatch
from hrm.ops.common import compiled
from hrm.ops.impl import adam_atan2 as adam_atan2_module
from hrm.training.optim import EMA, AdamAtan2, adam_atan2_reference, lr_at, param_groups

BETAS = (0.9, 0.95)


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(5, 3), (7,), (2, 3, 4), (1,), (123, 5)]]


def test_foreach_step_matches_per_tensor_reference():
    lr, wd = 0.01, 0.1
    params = [nn.Parameter(p) for p in _params(0)]
    ref = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in ref]
    ref_v = [torch.zeros_like(p) for p in ref]
    opt = AdamAtan2(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=BETAS,
    )
    g = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=g) * 10 ** (i - 2) for i, p in enumerate(params)]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for p, grad, m, v in zip(ref, grads, ref_m, ref_v):
            adam_atan2_reference(p, grad, m, v, step, lr=lr, betas=BETAS, weight_decay=wd if p.dim() >= 2 else 0.0)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)


def test_two_steps_by_hand():
    lr, wd = 0.1, 0.1
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdamAtan2([p], lr=lr, betas=BETAS, weight_decay=wd)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    # m = 0.05, v = 0.0125; m_hat = 0.5, v_hat = 0.25: the update is atan2(0.5, 0.5) = pi/4
    expected = 1.0 * (1 - lr * wd) - lr * math.pi / 4
    assert p.item() == pytest.approx(expected, rel=1e-12)
    p.grad = torch.tensor([-1.0], dtype=torch.float64)
    opt.step()
    m = 0.9 * 0.05 + 0.1 * -1.0
    v = 0.95 * 0.0125 + 0.05 * 1.0
    expected = expected * (1 - lr * wd) - lr * math.atan2(m / (1 - 0.9**2), math.sqrt(v / (1 - 0.95**2)))
    assert p.item() == pytest.approx(expected, rel=1e-12)


def test_update_is_invariant_to_gradient_scale_and_needs_no_epsilon():
    results = []
    for scale in (1e-8, 1.0, 1e8):  # within fp32 range of g**2
        p = nn.Parameter(torch.tensor([0.0, 0.0, 0.0]))
        opt = AdamAtan2([p], lr=1.0, weight_decay=0.0)
        p.grad = torch.tensor([1.0, -2.0, 0.0]) * scale
        opt.step()
        results.append(p.detach().clone())
    for r in results:
        torch.testing.assert_close(r, torch.tensor([-math.pi / 4, math.pi / 4, 0.0]))


def test_parameters_without_gradient_are_untouched():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt = AdamAtan2([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.ones(2, 2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2, 2)) and not opt.state[b]
    assert opt.state[a]["step"] == 1


def test_state_dict_round_trip_continues_identically():
    def make():
        params = [nn.Parameter(p) for p in _params(2)]
        return params, AdamAtan2(params, lr=0.01)

    def step(params, opt, seed):
        g = torch.Generator().manual_seed(seed)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()

    params, opt = make()
    for s in range(3):
        step(params, opt, s)
    params2, opt2 = make()
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as through torch.save / torch.load
    step(params, opt, 3)
    step(params2, opt2, 3)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


# -- backends of the step ------------------------------------------------------------------
# Every shape AdamAtan2 accepts: 0-d, 1-element, empty, odd 1-d/2-d/3-d, and a non-contiguous
# (transposed) parameter; the last one never gets a gradient.
SHAPES = [(), (1,), (0, 3), (7,), (5, 3), (2, 3, 4), (123, 5), "transposed", (4, 4)]
LRS = [1e-2, 3e-2, 5e-3, 2e-2, 1e-3]  # changes every step, as under the schedule


def _odd_params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 5, generator=g).t() if s == "transposed" else torch.randn(s, generator=g) for s in SHAPES]


def _run_steps(backend: str, dtype: torch.dtype, wd: float, steps: int = len(LRS)):
    """``steps`` AdamAtan2 steps in ``dtype`` on ``backend`` over :data:`SHAPES` (decay on the
    matrices only); gradients of mixed scales; returns the parameters and the optimizer."""
    params = [nn.Parameter(p.to(dtype)) for p in _odd_params(0)]
    assert not params[SHAPES.index("transposed")].is_contiguous()
    opt = AdamAtan2(param_groups(nn.ParameterList(params), wd), lr=LRS[0], betas=BETAS, backend=backend)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        for i, p in enumerate(params[:-1]):  # the last parameter never has a gradient
            p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0 ** (i % 5 - 2)).to(dtype)
        opt.step()
    return params, opt


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error relative to the reference tensor's largest magnitude (op_parity's measure)."""
    if ref.numel() == 0:
        return 0.0
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


# fp32 rounds each of the step's ~10 elementwise operations to 2**-24 = 6e-8 (atan2 is well
# conditioned: its angle moves by at most the relative error of its arguments), so 5 steps
# stay within a few 1e-7 of the tensor's scale in parameters and moments; the foreach
# reference in fp32 lands at the same level (checked below), 1e-6 leaves room for FMAs.
FP32_TOLERANCE = 1e-6


NEEDS_CPU = pytest.mark.skipif(
    dispatch.unavailable_reason("cpu") is not None, reason=f"cpu backend: {dispatch.unavailable_reason('cpu')}"
)
BACKENDS = ["torch", "compile", pytest.param("cpu", marks=NEEDS_CPU)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_fp64_reference(backend, wd):
    ref_params, ref_opt = _run_steps("torch", torch.float64, wd)
    params, opt = _run_steps(backend, torch.float32, wd)
    start = _odd_params(0)
    for p, r, p0 in zip(params, ref_params, start):
        assert _rel_err(p.detach(), r.detach()) <= FP32_TOLERANCE
        if r.grad is None:  # skipped: untouched, no state
            assert torch.equal(p.detach(), p0) and not opt.state[p] and not ref_opt.state[r]
            continue
        if p.numel():
            assert not torch.equal(p.detach(), p0)
        s, rs = opt.state[p], ref_opt.state[r]
        assert s["step"] == rs["step"] == len(LRS)
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg"].shape == p.shape
        assert _rel_err(s["exp_avg"], rs["exp_avg"]) <= FP32_TOLERANCE
        assert _rel_err(s["exp_avg_sq"], rs["exp_avg_sq"]) <= FP32_TOLERANCE


def test_fp64_reference_is_the_per_tensor_step():
    """The fp64 oracle above (the foreach ``torch`` backend) against the per-tensor formula,
    with per-parameter step counts that differ (one parameter misses a step)."""
    params = [p.double() for p in _odd_params(3) if p.is_contiguous()]
    ref = [p.clone() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    rm, rv = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [0] * len(params)
    g = torch.Generator().manual_seed(4)
    for k, lr in enumerate(LRS):
        live = [i for i in range(len(params)) if not (k == 2 and i == 1)]
        grads = [torch.randn(params[i].shape, generator=g, dtype=torch.float64) for i in live]
        for i in live:
            steps[i] += 1
        adam_atan2_(
            [params[i] for i in live],
            grads,
            [m[i] for i in live],
            [v[i] for i in live],
            [steps[i] for i in live],
            lr=lr,
            betas=BETAS,
            weight_decay=0.1,
            backend="torch",
        )
        for i, grad in zip(live, grads):
            adam_atan2_reference(ref[i], grad, rm[i], rv[i], steps[i], lr=lr, betas=BETAS, weight_decay=0.1)
    for a, b in zip(params + m + v, ref + rm + rv):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_compile_backend_compiles_once(monkeypatch):
    """One graph for every shape (1-element and 0-d included), every step (lr and the bias
    corrections change each time) and both parameter groups (weight decay on and off)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # dynamo caches graphs per code object: start from none
    fresh = compiled(adam_atan2_module._adam_atan2_math)
    monkeypatch.setattr(adam_atan2_module, "_adam_atan2_compiled", fresh)
    before = counters["stats"]["unique_graphs"]
    recompiles = sum(counters["recompiles"].values())
    _run_steps("compile", torch.float32, 0.1)
    assert fresh._compiled is not None
    assert counters["stats"]["unique_graphs"] - before == 1
    assert sum(counters["recompiles"].values()) == recompiles


def test_compile_step_on_a_differing_step_count_per_tensor():
    """Per-tensor step counts (a parameter that missed a step) give per-tensor bias corrections."""
    params = [p.double() for p in _odd_params(5) if p.is_contiguous()]
    p32 = [p.float() for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    m32, v32 = [torch.zeros_like(p) for p in p32], [torch.zeros_like(p) for p in p32]
    steps = [1 + i % 3 for i in range(len(params))]
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    adam_atan2_(params, grads, m, v, steps, lr=0.01, betas=BETAS, weight_decay=0.1, backend="torch")
    adam_atan2_(
        p32, [x.float() for x in grads], m32, v32, steps, lr=0.01, betas=BETAS, weight_decay=0.1, backend="compile"
    )
    for a, b in zip(p32 + m32 + v32, params + m + v):
        assert _rel_err(a, b) <= FP32_TOLERANCE


def test_optimizer_backends_share_the_state_dict():
    """A checkpoint written with one backend resumes on the other: same state dict format
    (no backend in it), and the continued runs agree."""
    params, opt = _run_steps("torch", torch.float32, 0.1, steps=3)
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdamAtan2(param_groups(nn.ParameterList(params2), 0.1), lr=LRS[0], betas=BETAS, backend="compile")
    state = copy.deepcopy(opt.state_dict())
    assert all("backend" not in g for g in state["param_groups"])
    opt2.load_state_dict(state)
    assert opt2.backend == "compile"
    g = torch.Generator().manual_seed(9)
    for p, q in zip(params[:-1], params2[:-1]):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert _rel_err(q.detach(), p.detach().double()) <= FP32_TOLERANCE
        if opt.state[p]:
            assert opt2.state[q]["step"] == opt.state[p]["step"] == 4


def test_optimizer_backend_names():
    p = nn.Parameter(torch.ones(3))
    assert AdamAtan2([p]).backend == "torch"
    assert AdamAtan2([p], backend="auto").backend in available_backends()
    with pytest.raises(BackendUnavailable):
        AdamAtan2([p], backend="no-such-backend")


def test_param_groups_decay_matrices_only():
    model = HRMText(get_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# -- EMA ---------------------------------------------------------------------------------


def test_ema_math_buffers_and_key_order():
    model = HRMText(get_preset("tiny"))
    ema = EMA(model, decay=0.5)
    assert list(ema.state_dict()) == list(model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.lm_head.weight
    expected = start["lm_head.weight"].clone()
    for n in range(4):
        with torch.no_grad():
            w.add_(1.0)
        d = min(0.5, (1 + n) / (10 + n))  # warmup: 0.1, 0.1818, 0.25, 0.3077
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        expected = d * expected + (1 - d) * w.detach()
    torch.testing.assert_close(ema.state_dict()["lm_head.weight"], expected)
    assert torch.equal(ema.state_dict()["z_L_init"], start["z_L_init"])  # a buffer: copied, not averaged
    assert ema.num_updates == 4


def _twin_runs(backend: str) -> list[tuple[nn.Module, AdamAtan2, EMA]]:
    """Two copies of one tiny model, each with its optimizer on ``backend`` and its EMA: the
    fused run first, the run it must equal second."""
    torch.manual_seed(0)
    first = HRMText(get_preset("tiny"))
    runs = []
    for model in (first, copy.deepcopy(first)):
        optimizer = AdamAtan2(param_groups(model, 0.1), lr=1e-2, betas=BETAS, backend=backend)
        runs.append((model, optimizer, EMA(model, decay=0.9)))
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_fused_into_the_step_equals_a_step_then_an_update(backend):
    """``AdamAtan2.step(ema=ema)`` moves the averages of the stepped parameters in the
    optimizer's pass and leaves the rest (a parameter without a gradient, the buffers) to
    ``ema.update``: the same averages, optimizer state and weights as a step followed by an
    update, over steps whose EMA decay changes (its warm-up)."""
    runs = _twin_runs(backend)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(p.shape, generator=g) for n, p in runs[0][0].named_parameters()}
        for fused, (model, optimizer, ema) in zip((True, False), runs):
            for n, p in model.named_parameters():
                p.grad = None if n == "embed_tokens.weight" else grads[n].clone()  # one without a gradient
            with torch.no_grad():
                model.z_L_init.add_(1.0)  # a buffer: copied
            if fused:
                optimizer.step(ema=ema)
            else:
                optimizer.step()
                ema.update()
    (fused_model, fused_opt, fused_ema), (split_model, split_opt, split_ema) = runs
    assert fused_ema.num_updates == split_ema.num_updates == 3
    exact = backend == "torch"  # the same foreach ops; the compiled kernel rounds its own way
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-6, "atol": 1e-7}
    for k, v in split_ema.state_dict().items():
        torch.testing.assert_close(fused_ema.state_dict()[k], v, **tol, msg=k)
    for k, v in split_model.state_dict().items():
        torch.testing.assert_close(fused_model.state_dict()[k], v, **tol, msg=k)
    moved = fused_ema.state_dict()["embed_tokens.weight"] - fused_model.embed_tokens.weight
    assert moved.abs().max() == 0  # never stepped: its average stays on it


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_is_the_step_on_scaled_gradients(backend):
    """``AdamAtan2.step(grad_scale=s)`` (gradient clipping fused into the step) is the step on
    gradients multiplied by ``s`` beforehand, bit for bit: the same fp32 product, made in the
    step's read of the gradient; the gradients themselves are left as they are. Over steps
    whose factor changes (one of them 1), with an EMA on the fused backends' EMA kernel too."""
    runs = _twin_runs(backend)
    for step, factor in enumerate((0.37, 1.0, 0.011)):
        g = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(p.shape, generator=g) for n, p in runs[0][0].named_parameters()}
        scale = torch.tensor(factor)
        for fused, (model, optimizer, ema) in zip((True, False), runs):
            for n, p in model.named_parameters():
                p.grad = grads[n].clone() if fused else grads[n] * scale
            if fused:
                optimizer.step(ema=ema if step else None, grad_scale=scale)
                assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
            else:
                optimizer.step(ema=ema if step else None)
    (fused_model, fused_opt, fused_ema), (scaled_model, scaled_opt, scaled_ema) = runs
    for k, v in scaled_model.state_dict().items():
        assert torch.equal(fused_model.state_dict()[k], v), k
    for k, v in scaled_ema.state_dict().items():
        assert torch.equal(fused_ema.state_dict()[k], v), k
    for sa, sb in zip(fused_opt.state.values(), scaled_opt.state.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@NEEDS_CPU
def test_cpu_global_norm_is_the_fp64_norm_whatever_the_thread_count():
    """``global_norm`` on the cpu backend: within fp32 rounding of the fp64 norm over tensors of
    odd sizes (empty, one element, past a chunk of 65536, the model's largest), the same bits on
    one thread and two. Inputs the kernel does not take (bf16, a transposed view) run on the
    reference."""
    g = torch.Generator().manual_seed(0)
    shapes = [(32000, 256), (1536, 256), (7,), (1,), (0,), (65537,), (3, 5, 2)]
    tensors = [torch.randn(shape, generator=g) * 10.0 ** (i % 3 - 1) for i, shape in enumerate(shapes)]
    exact = torch.cat([t.double().flatten() for t in tensors]).norm()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.global_norm(tensors, backend="cpu")
        torch.set_num_threads(2)
        two = ops.global_norm(tensors, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == torch.float32 and one.dim() == 0 and torch.equal(one, two)
    assert abs(one.double() - exact) <= 1e-7 * exact
    others = [tensors[0].bfloat16(), tensors[1].t()]
    assert torch.equal(ops.global_norm(others, backend="cpu"), ops.global_norm(others, backend="torch"))
    assert ops.global_norm([], backend="cpu").item() == 0.0


@NEEDS_CPU
def test_cpu_step_on_edge_values():
    """The C++ step's atan2 (Cephes' atanf on min/max) against the fp64 formula where the
    moments are zero (atan2(+-0, 0) = +-0: the parameter only decays), tiny, huge, of either
    sign, and where ``|m|`` crosses ``sqrt(v)``; and an EMA in the same pass."""
    g = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of the vector width
    scale = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 8)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * scale
    m = torch.randn(n, generator=g, dtype=torch.float64) * scale
    v = torch.rand(n, generator=g, dtype=torch.float64) * scale**2
    grad[:8], m[:8], v[:8] = 0.0, 0.0, 0.0
    m[8:12] = -0.0
    m[12:20], v[12:20], grad[12:20] = 1.0, 1.0, 1.0  # |m_hat| vs sqrt(v_hat) near each other
    p, e = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    kw = dict(lr=0.5, betas=(0.9, 0.95), weight_decay=0.1, ema_weight=0.3)

    def step(backend, dtype):
        state = [t.to(dtype) for t in (p, m, v, e)]
        adam_atan2_(state[:1], [grad.to(dtype)], state[1:2], state[2:3], [3], ema_avgs=state[3:], backend=backend, **kw)
        return state

    want, ref, got = step("torch", torch.float64), step("torch", torch.float32), step("cpu", torch.float32)
    for name, w, r, x in zip(("param", "exp_avg", "exp_avg_sq", "ema"), want, ref, got):
        # per element, within twice the fp32 reference's error (the decay and the update cancel
        # in places, so a relative bound per element would not hold for the reference either)
        bound = 2 * (r.double() - w).abs() + 1e-7 * w.abs()
        assert torch.all((x.double() - w).abs() <= bound), name
    decayed = p[:8].float() * torch.tensor(1 - 0.5 * 0.1, dtype=torch.float32)
    assert torch.equal(got[0][:8], decayed)  # zero moments: no update


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ema_avgs": _params(0)[:1], "ema_weight": 0.5}, "one average per parameter"),  # an EMA list of another length
        ({"grad_scale": torch.ones(2)}, "one-element tensor"),
    ],
)
def test_adam_atan2_rejects_bad_arguments(bad, message):
    params = _params(0)
    with pytest.raises(ValueError, match=message):
        adam_atan2_(params, params, params, params, [1] * len(params), lr=1e-3, betas=BETAS, weight_decay=0.0, **bad)


def test_ema_decay_reaches_its_ceiling():
    ema = EMA(nn.Linear(2, 2), decay=0.9)
    ema.num_updates = 1000
    assert ema.current_decay() == 0.9


def test_ema_swapped_restores_the_live_weights():
    model = HRMText(get_preset("tiny"))
    ema = EMA(model)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for v in ema.shadow.values():
            v.zero_()
    with ema.swapped() as swapped:
        assert swapped is model
        assert all(not v.any() for v in model.state_dict().values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])


# -- schedule ------------------------------------------------------------------------------


def test_lr_schedule_values():
    lr, warmup, total, r = 1e-3, 10, 110, 0.1
    assert lr_at(0, total, lr, warmup, r) == 0.0
    assert lr_at(5, total, lr, warmup, r) == pytest.approx(lr / 2)
    assert lr_at(warmup, total, lr, warmup, r) == pytest.approx(lr)  # warmup end: the peak
    assert lr_at(60, total, lr, warmup, r) == pytest.approx(lr * (r + (1 - r) / 2))  # half way down the cosine
    assert lr_at(total, total, lr, warmup, r) == pytest.approx(lr * r)
    assert lr_at(total - 1, total, lr, warmup, r) > lr * r
    assert lr_at(0, total, lr, 0, r) == pytest.approx(lr)  # no warmup
    values = [lr_at(s, total, lr, warmup, r) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
