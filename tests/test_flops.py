"""Training-FLOPs accounting (hrm.flops): a hand count for a tiny config, including the
effect of bp_steps, and a cross-check against PyTorch's FLOP counter on the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hrm import HRMText, ModelConfig
from hrm.config import bp_steps_at
from hrm.data import Sample, pack_row
from hrm.flops import RowWork, backward_calls, num_parameters, train_step_flops

# d = 32, 4 heads of 8 (w = 32), SwiGLU width I = round_up(round(4 * 32 * 2/3), 256) = 256,
# vocabulary 40 (a multiple of 8: no padding); HRM: one block per stack, 8 stack calls.
CFG = ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=4, n_layers=2)
# Three sequences, 14 tokens, no padding: (instruction, response) -> packed length, prefix length
#   [1 2 3],[4 5 6 7]       -> 6 tokens, prefix 3: pairs 3*3 + (4 + 5 + 6) = 24
#   [3 4],[5]               -> 2 tokens, prefix 2: pairs 2*2                = 4
#   [7 8 9 10 11],[12 13]   -> 6 tokens, prefix 5: pairs 5*5 + 6            = 31
SAMPLES = [Sample([1, 2, 3], [4, 5, 6, 7]), Sample([3, 4], [5]), Sample([7, 8, 9, 10, 11], [12, 13])]
T, PAIRS, S = 14, 59, 7

PER_TOKEN_BLOCK = 2 * (32 * 128 + 32 * 32 + 32 * 512 + 256 * 32)  # gqkv, o, gate_up, down
CALL = T * PER_TOKEN_BLOCK  # one block per stack call (HRM)
ATTN = 4 * PAIRS * 32  # q k^T and p v over the allowed pairs, all heads
GQKV_INPUT_GRAD = 2 * T * 32 * 128
HEAD = 2 * S * 32 * 40


def test_row_work_of_a_packed_row():
    assert RowWork.of(pack_row(SAMPLES, 14, 0)) == RowWork(T, PAIRS, S)
    assert RowWork.of(pack_row(SAMPLES, 20, 0)) == RowWork(T, PAIRS, S)  # padding is not work


# (forward calls, calls with a backward, of those: calls whose input carries no gradient,
#  LM-head input gradient), written out by hand. HRM call order L0 L1 L2 H0 L3 L4 L5 H1.
HAND = {
    ("hrm", 1): (8, 0, 0, False),  # only L5 has gradients; it feeds the no-grad H1: no backward at all
    ("hrm", 2): (8, 2, 1, True),  # L5, H1; L5's input (no-grad L4 + no-grad H0) carries none
    ("hrm", 3): (8, 3, 0, True),  # L5, H0, H1; H0's input holds the embedding
    ("hrm", 5): (8, 5, 0, True),  # the warm-up's end: L3 L4 L5 H0 H1
    ("hrm", None): (8, 8, 0, True),
    ("transformer", 2): (1, 1, 0, True),  # one call; bp_steps does not apply
    ("ut", 2): (8, 2, 0, True),  # the last 2 loops; the injection always holds the embedding
    ("ut", 5): (8, 5, 0, True),
}


@pytest.mark.parametrize(("arch", "bp"), list(HAND))
def test_hand_count(arch, bp):
    cfg = CFG.replace(arch=arch)
    call = CALL * (2 if arch in ("transformer", "ut") else 1)  # one stack of both blocks
    attn = ATTN * (2 if arch in ("transformer", "ut") else 1)
    fwd, bwd, no_input_grad, head_input_grad = HAND[arch, bp]
    got = train_step_flops(cfg, RowWork(T, PAIRS, S), bp)
    assert got.projections == (fwd + 2 * bwd) * call - no_input_grad * GQKV_INPUT_GRAD
    assert got.attention == (fwd + 2 * bwd) * attn
    assert got.lm_head == HEAD * (2 + head_input_grad)
    assert got.total == got.projections + got.attention + got.lm_head


def test_bp_warmup_changes_the_count_per_step():
    """The warm-up from bp_min = 2 to bp_max = 5 over the first 20% of steps: step 0 costs the
    bp = 2 count, step 50 of 100 the bp = 5 count, and an HRM step at bp = 5 costs
    8 + 2 * 5 = 18 stack calls against 8 + 2 * 2 = 12 (less one input gradient) at bp = 2."""
    work = RowWork(T, PAIRS, S)
    assert [bp_steps_at(CFG, s, 100) for s in (0, 7, 14, 19, 50)] == [2, 3, 4, 4, 5]
    first, late = train_step_flops(CFG, work, bp_steps_at(CFG, 0, 100)), train_step_flops(CFG, work, 5)
    assert late.projections - first.projections == 6 * CALL + GQKV_INPUT_GRAD
    assert train_step_flops(CFG, work, bp_steps_at(CFG, 50, 100)) == late
    # data-parallel rows add up
    assert train_step_flops(CFG, [work, work], 5).total == 2 * late.total


@pytest.mark.parametrize("arch", ["hrm", "transformer", "ut"])
def test_matmul_flops_equal_pytorch_flop_counter(arch):
    """On the real model (torch backend), forward + backward, for every bp_steps: PyTorch's
    counter of matrix products (aten.mm) sees exactly our projections + LM head (its
    attention, inside scaled_dot_product_attention, it does not count on a CPU)."""
    cfg = CFG.replace(arch=arch)
    torch.manual_seed(0)
    model = HRMText(cfg)
    assert model.num_parameters() == num_parameters(cfg)
    batch = pack_row(SAMPLES, T, 0)  # a full row: the model's matrices see only real tokens
    for bp in [1, 2, 3, 4, 5, 6, 8, 9, None]:
        model.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            loss, _ = model(**batch.model_inputs(), bp_steps=bp)
            loss.backward()
        counts = counter.get_flop_counts()["Global"]
        matmuls = counts.get(torch.ops.aten.mm, 0) + counts.get(torch.ops.aten.addmm, 0)
        want = train_step_flops(cfg, RowWork.of(batch), bp)
        assert matmuls == want.projections + want.lm_head, (arch, bp)
        if arch != "transformer":  # the L stack gets gradients exactly when a stack call runs a backward
            reached = any(p.grad is not None for p in model.L_level.parameters())
            assert reached == any(runs for runs, _ in backward_calls(cfg, bp)), (arch, bp)
