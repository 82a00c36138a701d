"""Model semantics: packing, response-only loss, truncated backprop, configs, checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from saved_tensors import saved_bytes

from hrm import HRMText, ModelConfig, bp_steps_at, get_preset
from hrm.checkpoint import load_model, read_config, save_checkpoint
from hrm.errors import CheckpointError, ConfigError

CFG = ModelConfig(vocab_size=50, vocab_multiple=16, hidden_size=24, num_heads=3, n_layers=4, H_cycles=2, L_cycles=3)


def packed(seqs):
    """Pack (tokens, prefix_len) pairs back to back with 3 pad tokens at the end."""
    ids = torch.tensor([t for s, _ in seqs for t in s] + [0, 0, 0])
    pos = torch.tensor([i for s, _ in seqs for i in range(len(s))] + [0, 0, 0])
    cu = torch.tensor([0] + [len(s) for s, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    pl = torch.tensor([p for _, p in seqs], dtype=torch.int32)
    return ids, pos, cu, pl


def model(cfg=CFG):
    return HRMText(cfg).double()


@pytest.mark.parametrize("arch", ["hrm", "transformer", "ut"])
def test_packed_batch_equals_each_sequence_alone(arch):
    m = model(CFG.replace(arch=arch))
    seqs = [([3, 4, 5, 6, 7], 3), ([8], 1), ([9, 10, 11], 3), ([12, 13, 14, 15, 16, 17, 18], 2)]
    with torch.no_grad():
        logits = m(*packed(seqs))
        start = 0
        for s, p in seqs:
            alone = m(
                torch.tensor(s),
                torch.arange(len(s)),
                torch.tensor([0, len(s)], dtype=torch.int32),
                torch.tensor([p], dtype=torch.int32),
            )
            torch.testing.assert_close(logits[start : start + len(s)], alone, rtol=1e-10, atol=1e-10)
            start += len(s)
    assert logits.shape == (start + 3, CFG.padded_vocab_size)


def test_loss_is_mean_over_response_tokens_only():
    m = model()
    ids, pos, cu, pl = packed([([3, 4, 5, 6], 2), ([7, 8, 9], 3)])
    labels = torch.full_like(ids, -100)
    labels[1:4] = torch.tensor([5, 6, 1])  # last prefix token predicts the first response token
    loss, metrics = m(ids, pos, cu, pl, labels)
    logits = m(ids, pos, cu, pl)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=-100))
    assert int(metrics["num_supervised"]) == 3 and int(metrics["num_sequences"]) == 1
    # the second sequence has no supervised token: changing its tokens' labels to ignore changes nothing,
    # and the loss does not depend on instruction-only positions' logits
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    rows = labels != -100
    F.cross_entropy(m(ids, pos, cu, pl)[rows], labels[rows]).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])


def test_loss_with_no_supervised_token_is_zero():
    m = model()
    ids, pos, cu, pl = packed([([3, 4, 5], 3)])
    loss, metrics = m(ids, pos, cu, pl, torch.full_like(ids, -100))
    assert loss.item() == 0 and int(metrics["num_supervised"]) == 0


# Which of the 8 stack calls (order L0 L1 L2 H0 L3 L4 L5 H1 for H=2, L=3) run with
# gradients, written out by hand from H_bp = min(H, bp-1), L_bp = bp - H_bp.
GRAD_CALLS = {
    1: {"L5"},
    2: {"L5", "H1"},
    3: {"L5", "H0", "H1"},
    4: {"L4", "L5", "H0", "H1"},
    5: {"L3", "L4", "L5", "H0", "H1"},
    6: {"L2", "L3", "L4", "L5", "H0", "H1"},
    7: {"L1", "L2", "L3", "L4", "L5", "H0", "H1"},
    8: {"L0", "L1", "L2", "L3", "L4", "L5", "H0", "H1"},
}


def unrolled_loss(m, ids, pos, cu, pl, labels, grad_calls):
    """The recurrence written out call by call; calls outside ``grad_calls`` are detached."""
    ctx = m.packing(pos, cu, pl)
    x = m.embed_tokens(ids) * (1 / m.config.embed_std)
    z_H, z_L = x, m.z_L_init.double()
    order = ["L0", "L1", "L2", "H0", "L3", "L4", "L5", "H1"]
    for call, name in enumerate(order):
        if name[0] == "L":
            out = m.L_level(z_L + z_H, ctx, call)
            z_L = out if name in grad_calls else out.detach()
        else:
            out = m.H_level(z_H + z_L, ctx, call)
            z_H = out if name in grad_calls else out.detach()
    rows = labels != -100
    return F.cross_entropy(m.lm_head(z_H[rows]), labels[rows])


@pytest.mark.parametrize("bp", range(1, 9))
def test_truncated_backprop_reaches_only_allowed_steps(bp):
    m = model()
    ids, pos, cu, pl = packed([([3, 4, 5, 6, 7], 2), ([8, 9, 10], 1)])
    labels = torch.full_like(ids, -100)
    labels[1:5] = torch.tensor([5, 6, 7, 2])
    labels[5:8] = torch.tensor([9, 10, 2])
    loss, _ = m(ids, pos, cu, pl, labels, bp_steps=bp)
    loss.backward()
    got = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    ref = unrolled_loss(m, ids, pos, cu, pl, labels, GRAD_CALLS[bp])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    ref.backward()
    for n, p in m.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[n], want, rtol=1e-9, atol=1e-12)
    reached_L = any(got[n].abs().sum() > 0 for n in got if n.startswith("L_level"))
    reached_H = any(got[n].abs().sum() > 0 for n in got if n.startswith("H_level"))
    # every path to the loss crosses the last H call: with it detached (bp=1) only the head learns
    calls = GRAD_CALLS[bp]
    assert reached_H == ("H1" in calls)
    assert reached_L == ("H1" in calls and any(c.startswith("L") for c in calls))


def test_no_grad_steps_do_not_store_activations():
    m = HRMText(CFG)
    ids, pos, cu, pl = packed([([3, 4, 5, 6], 2)])
    labels = torch.full_like(ids, -100)
    labels[1:4] = torch.tensor([5, 6, 2])

    def saved(bp):
        return saved_bytes(lambda: m(ids, pos, cu, pl, labels, bp_steps=bp))

    assert saved(2) < saved(5) < saved(8)


def test_bp_warmup_schedule():
    cfg = CFG  # bp 2 -> 5 over the first 20% of training
    assert bp_steps_at(cfg, 0, 1000) == 2
    assert bp_steps_at(cfg, 66, 1000) == 2  # 0.33 * 3 = 0.99 -> int 0
    assert bp_steps_at(cfg, 100, 1000) == 3  # middle of warmup: 2 + int(0.5 * 3)
    assert bp_steps_at(cfg, 199, 1000) == 4
    assert bp_steps_at(cfg, 200, 1000) == 5
    assert bp_steps_at(cfg, 999, 1000) == 5
    assert bp_steps_at(cfg.replace(bp_warmup_ratio=0.0), 0, 1000) == 5


def test_presets_and_config_errors():
    tiny = HRMText(get_preset("tiny"))
    assert 100_000 < tiny.num_parameters() < 1_000_000
    assert get_preset("XL").layers_per_stack == 16 and get_preset("XL").head_dim == 128
    assert get_preset("B").head_dim == get_preset("L").head_dim == 128
    assert get_preset("tiny").padded_vocab_size % 256 == 0
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        ModelConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="cannot be split evenly"):
        ModelConfig(n_layers=3)
    ModelConfig(n_layers=3, arch="transformer")  # a single stack needs no split
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({"hidden_size": 64, "colour": "red"})
    with pytest.raises(ConfigError, match="bp_steps must be >= 1"):
        ids, pos, cu, pl = packed([([3, 4], 1)])
        tiny(ids, pos, cu, pl, torch.full_like(ids, -100), bp_steps=0)


def test_checkpoint_round_trip_and_errors(tmp_path):
    m = HRMText(CFG)
    path = save_checkpoint(tmp_path / "ck", CFG, m.state_dict(), meta={"tokenizer": "byte"})
    assert read_config(path) == (CFG, {"tokenizer": "byte"})
    loaded = load_model(path)
    for (k, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(path, CFG, m.state_dict())
    assert (path / "model.safetensors").read_bytes() == before
    # a config whose shapes do not match the weights
    wrong = tmp_path / "wrong"
    save_checkpoint(wrong, CFG.replace(hidden_size=30), m.state_dict())
    with pytest.raises(CheckpointError, match="has shape .* but the config expects"):
        load_model(wrong)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "wrong"]  # no temp dirs left behind
