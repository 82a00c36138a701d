"""KV-cache generation equals full recomputation (every backend here, eager and compiled);
the finished-sequence mask; sampling; exact-match; the precision choice."""

import pytest
import torch

from hrm import HRMText, ModelConfig, precision
from hrm.data import Sample
from hrm.inference import Decoder, exact_match, generate, generate_uncached, weights_key
from hrm.ops import available_backends
from hrm.precision import resolve_precision

CONFIGS = [
    ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=2, n_layers=4),
    ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=24, num_heads=3, n_layers=2, H_cycles=1, L_cycles=2),
    ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=4, n_layers=3, arch="transformer"),
    ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=2, n_layers=2, H_cycles=1, arch="ut"),
]
PROMPTS = [[1, 5, 7, 9], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["hrm", "hrm-1x2", "transformer", "ut"])
def test_kv_cache_generation_equals_recomputation(cfg):
    torch.manual_seed(1)
    model = HRMText(cfg).double().eval()
    eos = 39
    cached = generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
    for prompt, tokens in zip(PROMPTS, cached):
        assert tokens == generate_uncached(model, prompt, max_new_tokens=10, eos_id=eos)


def boost_logits(model, columns):
    """Make ``columns`` of the LM head's output win every argmax."""

    def hook(module, inputs, output):
        output[..., columns] += 1e4
        return output

    return model.lm_head.register_forward_hook(hook)


def test_generation_stops_at_eos_and_never_emits_vocab_padding():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, vocab_multiple=64, hidden_size=16, num_heads=2, n_layers=2)
    model = HRMText(cfg).eval()
    with boost_logits(model, slice(10, None)):  # padding rows would win an unmasked argmax
        out = generate(model, PROMPTS, max_new_tokens=6, eos_id=9)
    assert all(t < 10 for seq in out for t in seq) and sum(map(len, out)) > 0
    with boost_logits(model, 9):  # now the end token always wins
        assert generate(model, PROMPTS, max_new_tokens=6, eos_id=9) == [[], [], []]


def test_sampling_is_seeded():
    model = HRMText(CONFIGS[0]).eval()

    def sample(seed):
        return generate(
            model, PROMPTS, max_new_tokens=8, eos_id=39, temperature=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_exact_match_counts_whole_answers():
    torch.manual_seed(0)
    model = HRMText(CONFIGS[0]).double().eval()
    prompts = PROMPTS[:2]
    answers = generate(model, prompts, max_new_tokens=3, eos_id=39)
    right = [Sample(p, a[:3] + [39]) for p, a in zip(prompts, answers)]
    # the model never stops within 3 tokens, so the first answer cannot match "a then stop";
    # the cut answer matches only if the model emitted eos exactly there
    assert exact_match(model, right, eos_id=39) == 0.0
    with boost_logits(model, 39):  # always stop at once: the empty answer is right
        assert exact_match(model, [Sample(p, [39]) for p in prompts], eos_id=39) == 1.0
        assert exact_match(model, [Sample(prompts[0], [5, 39]), Sample(prompts[1], [39])], eos_id=39) == 0.5


def endings(model, prompts, steps):
    """An end token that the free-running greedy answers (no end token) reach at different
    steps, or never: ``(eos, first step of eos per prompt or None)``."""
    free = generate(model, prompts, max_new_tokens=steps, eos_id=-1)
    for eos in sorted({t for row in free for t in row}):
        first = [row.index(eos) if eos in row else None for row in free]
        if len(set(first)) == len(first):  # all different (None at most once)
            return eos, first
    raise AssertionError("no token ends the answers at different steps; change the seed")


MIXED = [[1, 5, 7, 9], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [6, 6, 6, 6, 6, 6, 6]]


@pytest.mark.parametrize("backend", available_backends())
def test_cached_decode_equals_recomputation_on_every_backend(backend):
    """Prompts of different lengths in one packed batch, answers that end at different steps."""
    torch.manual_seed(3)
    # 4 stack calls per token (the Triton interpreter is slow); head_dim 16 (Triton's smallest)
    cfg = ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=2, n_layers=2, H_cycles=1, L_cycles=2)
    model = HRMText(cfg, backend=backend).eval()
    oracle = HRMText(cfg).eval()
    oracle.load_state_dict(model.state_dict())
    eos, first = endings(oracle, MIXED, 10)
    cached = generate(model, MIXED, max_new_tokens=10, eos_id=eos, compile=False)
    assert [len(a) for a in cached] == [10 if f is None else f for f in first]
    for prompt, tokens in zip(MIXED, cached):
        assert tokens == generate_uncached(oracle, prompt, max_new_tokens=10, eos_id=eos)


def test_compiled_decode_equals_recomputation_and_follows_new_weights():
    """The decode step compiled as one graph, on the fastest CPU backend (its weights frozen in
    on a CPU); after an in-place update of the weights the same decoder compiles again and
    follows them. Twice here only: compiling takes tens of seconds."""
    torch.manual_seed(3)
    backend = "cpu" if "cpu" in available_backends() else "torch"
    model = HRMText(CONFIGS[1], backend=backend).eval()
    oracle = HRMText(CONFIGS[1]).eval()
    oracle.load_state_dict(model.state_dict())
    eos, first = endings(oracle, MIXED, 12)
    decoder = Decoder(model, compile=True)

    def decode() -> list[list[int]]:
        steps = torch.stack(list(decoder.stream(MIXED, max_new_tokens=12, eos_id=eos)), 1).tolist()
        return [row[: row.index(eos)] if eos in row else row for row in steps]

    compiled = decode()
    assert [len(a) for a in compiled] == [12 if f is None else f for f in first]
    for prompt, tokens in zip(MIXED, compiled):
        assert tokens == generate_uncached(oracle, prompt, max_new_tokens=12, eos_id=eos)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # an optimizer-like in-place update
    oracle.load_state_dict(model.state_dict())
    again = decode()
    assert again != compiled
    for prompt, tokens in zip(MIXED, again):
        assert tokens == generate_uncached(oracle, prompt, max_new_tokens=12, eos_id=eos)


def _logits_at(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The full forward's fp32 logits ``[len(answer), V]`` at the positions that predict ``answer``."""
    seq = prompt + answer
    n = len(seq)
    logits = model(
        torch.tensor(seq),
        torch.arange(n),
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([len(prompt)], dtype=torch.int32),
    ).float()
    logits[:, model.config.vocab_size :] = float("-inf")
    return logits[len(prompt) - 1 : n - 1]


@pytest.mark.skipif("cpu" not in available_backends(), reason="the cpu backend needs a C++ toolchain")
def test_compiled_bf16_decode_stays_within_bf16_rounding_of_the_fp32_forward():
    """The compiled step under bf16 autocast (weights frozen as bf16, the C++ decode kernel on
    bf16 caches): every token it picks is the fp32 full forward's argmax or trails it by no
    more than twice the largest logit error of the same forward under bf16 autocast, so a
    different token is a near-tie that bf16 rounding can flip, never a wrong computation."""
    torch.manual_seed(5)
    model = HRMText(CONFIGS[1], backend="cpu").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = list(Decoder(model, compile=True).stream(MIXED, max_new_tokens=10, eos_id=-1))
    answers = torch.stack(steps, 1).tolist()
    with torch.inference_mode():
        for prompt, answer in zip(MIXED, answers):
            exact = _logits_at(model, prompt, answer)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rounded = _logits_at(model, prompt, answer)
            finite = exact.isfinite()
            tol = 2 * (rounded - exact)[finite].abs().max()
            trail = exact.max(-1).values - exact[torch.arange(len(answer)), answer]
            assert (trail <= tol).all(), (trail, tol)


def test_weights_key_sees_in_place_updates_and_takes_inference_tensors():
    model = HRMText(CONFIGS[0])
    key = weights_key(model)
    assert weights_key(model) == key
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert weights_key(model) != key
    with torch.inference_mode():  # no version counters: the storage alone
        frozen = HRMText(CONFIGS[0])
    assert weights_key(frozen) == weights_key(frozen)


def test_finished_mask_is_read_every_check_every_steps():
    """Finished rows emit the end token; the host looks at the mask only every N steps."""
    model = HRMText(CONFIGS[0]).eval()
    with boost_logits(model, 39):  # every row ends at once
        for check_every, expected in ((1, 1), (4, 4), (100, 10)):
            steps = list(
                Decoder(model, compile=False).stream(PROMPTS, max_new_tokens=10, eos_id=39, check_every=check_every)
            )
            assert len(steps) == expected
            assert all(s.tolist() == [39] * len(PROMPTS) for s in steps)


@pytest.mark.parametrize("amx", [False, True])
def test_precision_auto_on_cpu_is_bf16_only_with_amx_for_training_and_compiled_decoding(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": amx})
    assert precision.cpu_has_amx_bf16() is amx
    assert resolve_precision("auto", "cpu") == ("bf16" if amx else "fp32")
    assert resolve_precision(None, "cpu") == ("bf16" if amx else "fp32")
    assert resolve_precision("auto", "cpu", training=False) == "fp32"  # eager autocast casts every weight per call
    assert resolve_precision("auto", "cpu", training=False, compiled=True) == ("bf16" if amx else "fp32")
    assert resolve_precision("bf16", "cpu", training=False) == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(Exception, match="unknown precision"):
        resolve_precision("fp16", "cpu")


def test_precision_auto_without_capability_query_is_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert not precision.cpu_has_amx_bf16()
    assert resolve_precision("auto", "cpu") == "fp32"


def test_generate_command_streams_one_prompt_and_batches_several(tmp_path, capsys):
    from hrm.checkpoint import save_checkpoint
    from hrm.cli import main
    from hrm.data import load_tokenizer

    tok = load_tokenizer("byte")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, n_layers=2, H_cycles=1, L_cycles=2)
    torch.manual_seed(0)
    model = HRMText(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict(), meta={"tokenizer": "byte"})
    prompts = ["12+345", "7+8"]
    expected = generate(model, [tok.encode_instruction(p) for p in prompts], max_new_tokens=6, eos_id=tok.eoa_id)
    base = ["generate", str(tmp_path / "ckpt"), "--max-new-tokens", "6", "--backend", "torch"]
    assert main([*base, "--prompt", prompts[0]]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == f"{prompts[0]} -> {tok.decode(expected[0])}\n"
    assert "backend torch, precision fp32" in streamed.err
    assert main([*base, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    assert capsys.readouterr().out == "".join(f"{p} -> {tok.decode(e)}\n" for p, e in zip(prompts, expected))


def test_eval_command_scores_a_jsonl_file(tmp_path, capsys, monkeypatch):
    import json

    import hrm.inference_commands
    from hrm.checkpoint import save_checkpoint
    from hrm.cli import main
    from hrm.data import load_tokenizer

    tok = load_tokenizer("byte")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, n_layers=2, H_cycles=1, L_cycles=2)
    model = HRMText(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", cfg, model.state_dict(), meta={"tokenizer": "byte"})
    monkeypatch.setattr(hrm.inference_commands, "load_model", lambda *a, **k: model)
    data = tmp_path / "dev.jsonl"
    lines = [("1+2", "42"), ("33+4", "42"), ("5+666", "43")]
    data.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in lines))
    script, calls = [ord("4"), ord("2"), tok.eoa_id], [0]

    def answer_42(module, inputs, output):  # one batch: the prefill, then one call per step
        output[..., script[min(calls[0], 2)]] += 1e4
        calls[0] += 1
        return output

    with model.lm_head.register_forward_hook(answer_42):
        assert main(["eval", str(tmp_path / "ckpt"), "--data", str(data), "--backend", "torch"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == f"exact-match on 3 samples of {data}: 0.6667"
    assert "backend torch, precision fp32" in out.err
