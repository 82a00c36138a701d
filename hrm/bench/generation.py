"""The ``generate`` suite of ``hrm bench``: greedy generation against ``transformers``.

One case: a randomly initialised model of a preset (default ``small``), ``batch`` prompts of
``prompt_len`` random tokens, ``new_tokens`` greedy tokens each (no end token, so every row
decodes every step). The same weights are exported to ``HrmTextForCausalLM`` and its
``generate`` is timed in the same run, interleaved rep by rep with ours:

- ``transformers``: ``HrmTextForCausalLM.generate`` (its dynamic KV cache), the reference;
- ``eager``: our decoder with the step run eagerly on the model's backend;
- ``compiled``: the same step compiled as one graph (:func:`hrm.inference.compile_step`:
  inductor with the weights frozen in on a CPU; a CUDA graph on a GPU). Its first call
  (which compiles) is timed apart, as ``compile_s``.

Parity: every variant's tokens are checked against ``transformers``' *full* forward over
prompt + generated tokens (the greedy choice at every generated position, padding rows of
the vocabulary excluded), not against its cached ``generate``: ``mismatched`` counts the
generated tokens that differ from that argmax.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from hrm.bench.report import Row
from hrm.checkpoint import save_checkpoint
from hrm.config import get_preset
from hrm.inference import Decoder
from hrm.interop import export_hf, load_transformers_model
from hrm.model import HRMText

VARIANTS = ("transformers", "eager", "compiled")
TARGET_SPEEDUP = 3.0  # compiled vs transformers' generate, tokens/s (the issue's target on a CPU)


def _full_forward_mismatches(hf_model, prompts: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> int:
    """Generated tokens that differ from the argmax of ``hf_model``'s full forward over prompt + tokens."""
    batch, n = prompts.shape
    ids = torch.cat([prompts, tokens], 1)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, :n] = 1  # the prompt is the bidirectional prefix
    with torch.no_grad():
        logits = hf_model(input_ids=ids, token_type_ids=token_type_ids).logits.float()
    logits[..., vocab_size:] = float("-inf")
    expected = logits[:, n - 1 : -1].argmax(-1)  # position p predicts token p + 1
    return int((expected != tokens).sum())


def run_generate(
    preset: str = "small",
    *,
    batch: int = 8,
    prompt_len: int = 48,
    new_tokens: int = 48,
    reps: int = 5,
    device: torch.device | str = "cpu",
    backend: str | None = "auto",
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
) -> list[Row]:
    """Rows of suite ``generate`` (mode ``greedy``), one per variant of ``variants``, timed interleaved."""
    device = torch.device(device)
    cfg = get_preset(preset)
    torch.manual_seed(seed)
    model = HRMText(cfg, backend=backend).eval()
    g = torch.Generator().manual_seed(seed + 1)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
    padding = list(range(cfg.vocab_size, cfg.padded_vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", cfg, model.state_dict(), meta={})
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf")
        hf_model = load_transformers_model(Path(tmp) / "hf", dtype=torch.float32).to(device)
    model.to(device)
    prompts = prompts.to(device)
    prompt_lists = prompts.tolist()
    no_eos = -1  # never emitted: every row decodes new_tokens tokens

    decoders = {compile: Decoder(model, compile=compile) for compile in (False, True)}  # each keeps its cache

    def ours(compile: bool) -> torch.Tensor:
        steps = decoders[compile].stream(prompt_lists, max_new_tokens=new_tokens, eos_id=no_eos)
        return torch.stack(list(steps), 1)

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=prompts,
                token_type_ids=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                suppress_tokens=padding,
                pad_token_id=0,
                eos_token_id=None,
            )
        return out[:, prompt_len:]

    run = {"transformers": theirs, "eager": lambda: ours(False), "compiled": lambda: ours(True)}

    def timed(variant: str) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tokens = run[variant]()
        tokens = tokens.cpu()  # the host has every token: the run is over
        return time.perf_counter() - start, tokens

    compile_s = timed("compiled")[0] if "compiled" in variants else 0.0  # the first compiled call compiles
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for variant in variants:
            s, tokens[variant] = timed(variant)
            seconds[variant].append(s)

    rows = []
    shape = f"{batch}x{prompt_len}+{new_tokens}"
    for variant in variants:
        times = seconds[variant]
        rows.append(
            Row(
                suite="generate",
                name=preset,
                backend=variant,
                mode="greedy",
                shape=shape,
                dtype="float32",
                seconds=statistics.median(times),
                tokens=batch * new_tokens,
                parity=float(_full_forward_mismatches(hf_model, prompts.cpu(), tokens[variant], cfg.vocab_size)),
                tolerance=0.0,
                extra={
                    "min_s": min(times),
                    "max_s": max(times),
                    "reps": reps,
                    "model_backend": model.backend if variant != "transformers" else None,
                    **({"compile_s": compile_s - statistics.median(times)} if variant == "compiled" else {}),
                },
            )
        )
    return rows


def generate_lines(rows: list[Row]) -> list[str]:
    """The suite's table: tokens/s per variant (median of the reps, with the spread), the
    ratio to ``transformers``, and the parity count."""
    sel = [r for r in rows if r.suite == "generate"]
    if not sel:
        return []
    ref = next((r for r in sel if r.backend == "transformers"), None)
    lines = [
        "| preset | shape | variant | tokens/s (median) | min..max tokens/s | vs transformers | "
        "tokens != transformers' full forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sel:
        n = r.tokens or 0
        ratio = f"{ref.seconds / r.seconds:.2f}x" if ref else ""
        lines.append(
            f"| {r.name} | {r.shape} | {r.backend} | {n / r.seconds:.0f} | "
            f"{n / r.extra['max_s']:.0f}..{n / r.extra['min_s']:.0f} | {ratio} | {r.parity:.0f} of {n} |"
        )
    compiled = next((r for r in sel if r.backend == "compiled"), None)
    if compiled is not None:
        lines.append("")
        lines.append(
            f"compiled decode step: first call compiles in {compiled.extra['compile_s']:.1f} s; "
            f"target >= {TARGET_SPEEDUP:.0f}x transformers' tokens/s"
            + (f": {ref.seconds / compiled.seconds:.2f}x" if ref else "")
        )
    return lines


__all__ = ["run_generate", "generate_lines", "VARIANTS", "TARGET_SPEEDUP"]
