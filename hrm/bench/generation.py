"""The ``generate`` suite of ``hrm bench``: greedy generation against ``transformers``.

One case: a randomly initialised model of a preset (default ``small``), ``batch`` prompts of
``prompt_len`` random tokens, ``new_tokens`` greedy tokens each (no end token, so every row
decodes every step). The same weights are exported to ``HrmTextForCausalLM`` and its
``generate`` is timed in the same run, interleaved rep by rep with ours:

- ``transformers``: ``HrmTextForCausalLM.generate`` (its dynamic KV cache) in fp32, the reference;
- ``eager``: our decoder with the step run eagerly on the model's backend, fp32;
- ``compiled``: the same step compiled as one graph (:func:`hrm.inference.compile_step`:
  inductor with the weights frozen in on a CPU; a CUDA graph on a GPU), fp32;
- ``compiled-bf16``: the compiled step under bf16 autocast (the frozen weights cast to bf16
  once), what ``hrm generate --compile`` runs at ``--precision auto`` where bf16 is fast
  (:func:`hrm.precision.fast_bf16`); in the default variants only there.

A compiled variant's first call (which compiles) is timed apart, as ``compile_s``.

Parity: every variant's tokens are checked against ``transformers``' *full* fp32 forward over
prompt + generated tokens (the greedy choice at every generated position, padding rows of
the vocabulary excluded), not against its cached ``generate``: ``mismatched`` counts the
generated tokens that differ from that argmax. fp32 variants must match exactly. A bf16
variant rounds, so where two logits are closer than its rounding error it may pick the other
one: its row also counts ``beyond_tolerance``, the tokens whose fp32 logit trails the fp32
argmax by more than twice the largest logit error of ``transformers``' own forward under bf16
autocast on the same sequences (``logit_tolerance``). A correct bf16 decoder has none.
"""

from __future__ import annotations

import functools
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
from hrm.precision import autocast, fast_bf16

VARIANTS = ("transformers", "eager", "compiled", "compiled-bf16")
PRECISION = {"transformers": "fp32", "eager": "fp32", "compiled": "fp32", "compiled-bf16": "bf16"}
TARGET_SPEEDUP = 3.0  # a compiled variant vs transformers' generate, tokens/s (the issue's target on a CPU)


def default_variants(device: torch.device | str) -> tuple[str, ...]:
    """Every variant, ``compiled-bf16`` only where bf16 is the faster compiled decode."""
    bf16 = fast_bf16(device, training=False, compiled=True)
    return tuple(v for v in VARIANTS if bf16 or PRECISION[v] == "fp32")


def _full_forward_logits(hf_model, prompts: torch.Tensor, tokens: torch.Tensor, vocab_size: int, precision: str):
    """``hf_model``'s logits ``[B, new, V]`` (fp32, padding rows -inf) at the positions that
    predict ``tokens``, from its full forward over prompt + tokens at ``precision``."""
    batch, n = prompts.shape
    ids = torch.cat([prompts, tokens], 1)
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, :n] = 1  # the prompt is the bidirectional prefix
    with torch.no_grad(), autocast(precision, ids.device):
        logits = hf_model(input_ids=ids, token_type_ids=token_type_ids).logits.float()
    logits[..., vocab_size:] = float("-inf")
    return logits[:, n - 1 : -1]  # position p predicts token p + 1


def _parity(hf_model, prompts: torch.Tensor, tokens: torch.Tensor, vocab_size: int, precision: str) -> dict:
    """``mismatched``: tokens that differ from the fp32 full forward's argmax; for a bf16 run
    also ``beyond_tolerance`` (those whose fp32 logit trails the argmax by more than
    ``logit_tolerance``, twice the largest error of the same forward under bf16 autocast)."""
    logits = _full_forward_logits(hf_model, prompts, tokens, vocab_size, "fp32")
    out = {"mismatched": int((logits.argmax(-1) != tokens).sum())}
    if precision == "bf16":
        rounded = _full_forward_logits(hf_model, prompts, tokens, vocab_size, "bf16")
        finite = logits.isfinite()
        tol = 2 * float((rounded - logits)[finite].abs().max())
        trail = logits.max(-1).values - logits.gather(-1, tokens[..., None])[..., 0]
        out.update(beyond_tolerance=int((trail > tol).sum()), logit_tolerance=tol)
    return out


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
    variants: tuple[str, ...] | None = None,
) -> list[Row]:
    """Rows of suite ``generate`` (mode ``greedy``), one per variant of ``variants`` (default:
    :func:`default_variants`), timed interleaved."""
    device = torch.device(device)
    variants = variants or default_variants(device)
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

    decoders = {v: Decoder(model, compile=v.startswith("compiled")) for v in variants if v != "transformers"}

    def ours(variant: str) -> torch.Tensor:  # each decoder keeps its cache and its compiled step
        with autocast(PRECISION[variant], device):
            steps = decoders[variant].stream(prompt_lists, max_new_tokens=new_tokens, eos_id=no_eos)
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

    run = {v: (theirs if v == "transformers" else functools.partial(ours, v)) for v in variants}

    def timed(variant: str) -> tuple[float, torch.Tensor]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        tokens = run[variant]()
        tokens = tokens.cpu()  # the host has every token: the run is over
        return time.perf_counter() - start, tokens

    compile_s = {v: timed(v)[0] for v in variants if v.startswith("compiled")}  # the first call compiles
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
        parity = _parity(hf_model, prompts.cpu(), tokens[variant], cfg.vocab_size, PRECISION[variant])
        rows.append(
            Row(
                suite="generate",
                name=preset,
                backend=variant,
                mode="greedy",
                shape=shape,
                dtype={"fp32": "float32", "bf16": "bfloat16"}[PRECISION[variant]],
                seconds=statistics.median(times),
                tokens=batch * new_tokens,
                parity=float(parity.pop("mismatched")),
                tolerance=0.0,
                extra={
                    "min_s": min(times),
                    "max_s": max(times),
                    "reps": reps,
                    "model_backend": model.backend if variant != "transformers" else None,
                    **parity,
                    **({"compile_s": compile_s[variant] - statistics.median(times)} if variant in compile_s else {}),
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
        "| preset | shape | variant | precision | tokens/s (median) | min..max tokens/s | vs transformers | "
        "tokens != transformers' fp32 full forward | of those, beyond bf16 rounding |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sel:
        n = r.tokens or 0
        ratio = f"{ref.seconds / r.seconds:.2f}x" if ref else ""
        beyond = ""
        if "beyond_tolerance" in r.extra:
            beyond = f"{r.extra['beyond_tolerance']} (logit tol {r.extra['logit_tolerance']:.2g})"
        lines.append(
            f"| {r.name} | {r.shape} | {r.backend} | {PRECISION.get(r.backend, '')} | {n / r.seconds:.0f} | "
            f"{n / r.extra['max_s']:.0f}..{n / r.extra['min_s']:.0f} | {ratio} | {r.parity:.0f} of {n} | {beyond} |"
        )
    compiled = [r for r in sel if "compile_s" in r.extra]
    if compiled:
        lines.append("")
        for r in compiled:
            lines.append(
                f"{r.backend} decode step: first call compiles in {r.extra['compile_s']:.1f} s"
                + (f"; {ref.seconds / r.seconds:.2f}x transformers' tokens/s" if ref else "")
            )
        lines.append(f"target: >= {TARGET_SPEEDUP:.0f}x transformers' tokens/s")
    return lines


__all__ = ["run_generate", "generate_lines", "default_variants", "VARIANTS", "TARGET_SPEEDUP"]
