"""The universal-transformer baseline (``arch="ut"``): one shared stack looped as often as
HRM calls its stacks, ``z = L(z + x)``, with truncated backprop over the last loops."""

import pytest
import torch
import torch.nn.functional as F

from hrm import HRMText, ModelConfig
from hrm.cli import build_parser
from hrm.inference import generate, generate_uncached
from hrm.model import stack_calls
from hrm.training.commands import build_config

CFG = ModelConfig(vocab_size=50, vocab_multiple=16, hidden_size=24, num_heads=3, n_layers=2, arch="ut")


def batch():
    ids = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 0])
    pos = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0])
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    pl = torch.tensor([2, 1], dtype=torch.int32)
    labels = torch.full_like(ids, -100)
    labels[1:5] = torch.tensor([5, 6, 7, 2])
    labels[5:8] = torch.tensor([9, 10, 2])
    return ids, pos, cu, pl, labels


def test_shape_and_parameters_match_hrm():
    model = HRMText(CFG)
    hrm = HRMText(CFG.replace(arch="hrm"))
    assert CFG.num_stack_calls == 8 and CFG.layers_per_stack == 2
    assert len(model.L_level.layers) == 2 and not hasattr(model, "H_level")
    assert model.num_parameters() == hrm.num_parameters()
    assert stack_calls(CFG, 3) == [("L", i >= 5) for i in range(8)]
    assert stack_calls(CFG, None) == [("L", True)] * 8


@pytest.mark.parametrize("bp", [1, 2, 5, 8])
def test_loop_and_truncated_backprop_equal_the_unrolled_loop(bp):
    torch.manual_seed(0)
    m = HRMText(CFG).double()
    ids, pos, cu, pl, labels = batch()
    loss, _ = m(ids, pos, cu, pl, labels, bp_steps=bp)
    loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    ctx = m.packing(pos, cu, pl)
    x = m.embed_tokens(ids) * (1 / CFG.embed_std)
    z = m.z_L_init.double()
    for call in range(8):
        out = m.L_level(z + x, ctx, call)
        z = out if call >= 8 - bp else out.detach()
    rows = labels != -100
    ref = F.cross_entropy(m.lm_head(z[rows]), labels[rows])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    ref.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12)
    assert got["embed_tokens.weight"].abs().sum() > 0  # the injection reaches the embedding at any bp


def test_kv_cache_generation_equals_recomputation():
    torch.manual_seed(1)
    model = HRMText(CFG).double().eval()
    prompts = [[1, 5, 7, 9], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    for prompt, tokens in zip(prompts, generate(model, prompts, max_new_tokens=8, eos_id=49)):
        assert tokens == generate_uncached(model, prompt, max_new_tokens=8, eos_id=49)


def test_train_selects_the_arch():
    args = build_parser().parse_args(["train", "--arch", "ut", "--override", "hidden_size=32"])
    cfg = build_config(args)
    assert cfg.model_overrides == {"hidden_size": 32, "arch": "ut"} and cfg.model_config(260).arch == "ut"
