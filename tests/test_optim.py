"""Adam-atan2 (multi-tensor vs per-tensor reference vs hand computation), EMA, LR schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from hrm.config import get_preset
from hrm.model import HRMText
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
    opt = AdamAtan2([{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                     {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=BETAS)
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
    expected = expected * (1 - lr * wd) - lr * math.atan2(m / (1 - 0.9 ** 2), math.sqrt(v / (1 - 0.95 ** 2)))
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
