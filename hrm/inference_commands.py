"""``hrm generate`` and ``hrm eval``: talk to a checkpoint and measure exact-match."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hrm.checkpoint import load_checkpoint_tokenizer, load_model, read_config, resolve_checkpoint
from hrm.data import read_jsonl, read_pretokenized, task_samples
from hrm.errors import HrmError
from hrm.inference import Decoder, exact_match, generate
from hrm.precision import PRECISIONS, autocast, resolve_precision

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _load(path: str, ema: bool, backend: str | None, tokenizer: str | None = None):
    """``(model, tokenizer, meta)`` of a checkpoint or run directory (``tokenizer``: ``--tokenizer``)."""
    ckpt = resolve_checkpoint(path)
    _, meta = read_config(ckpt)
    tokenizer = load_checkpoint_tokenizer(ckpt, meta, tokenizer)
    model = load_model(ckpt, ema=ema, backend=backend).eval()
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise HrmError(
            f"{ckpt}: tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.padded_vocab_size}"
        )
    return model, tokenizer, meta


def _generate(args: argparse.Namespace) -> int:
    if args.temperature < 0:
        raise HrmError(f"--temperature must be >= 0, got {args.temperature}")
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.rstrip("\n") for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise HrmError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
    if not prompts or any(not p for p in prompts):
        raise HrmError("give at least one non-empty --prompt (or --prompts-file)")
    model, tok, _ = _load(args.checkpoint, args.ema, args.backend, args.tokenizer)
    device = next(model.parameters()).device
    precision = _announce("generate", model, args.precision, device, args.compile)
    generator = torch.Generator(device).manual_seed(args.seed)
    encoded = [tok.encode_instruction(p) for p in prompts]
    options = dict(max_new_tokens=args.max_new_tokens, eos_id=tok.eoa_id, temperature=args.temperature)
    with autocast(precision, device):
        if len(prompts) == 1:  # stream the answer as it comes
            print(f"{prompts[0]} -> ", end="", flush=True)
            answer: list[int] = []
            decoder = Decoder(model, compile=args.compile)
            for token in decoder.stream(encoded, **options, generator=generator, check_every=1):
                t = int(token[0])
                if t == tok.eoa_id:
                    break
                shown = tok.decode(answer)
                answer.append(t)
                print(tok.decode(answer)[len(shown) :], end="", flush=True)
            print()
            return 0
        answers = generate(model, encoded, **options, generator=generator, compile=args.compile)
    for prompt, answer in zip(prompts, answers):
        print(f"{prompt} -> {tok.decode(answer)}")
    return 0


def _announce(command: str, model, precision: str, device: torch.device, compiled: bool) -> str:
    """Resolve ``precision`` and say which backend and precision the command runs."""
    chosen = resolve_precision(precision, device, training=False, compiled=compiled)
    print(f"hrm {command}: {device.type}, backend {model.backend}, precision {chosen}", file=sys.stderr)
    return chosen


def _eval(args: argparse.Namespace) -> int:
    model, tok, meta = _load(args.checkpoint, args.ema, args.backend, args.tokenizer)
    recorded = meta.get("eval_data") or meta.get("train_config", {}).get("eval_data")
    data = args.data or (None if args.task else recorded)
    if data:
        vocab = model.config.vocab_size
        samples, _ = read_pretokenized(data, 0, vocab) if Path(data).is_dir() else read_jsonl(data, tok)
        samples = samples[: args.samples]
        source = data if args.data else f"{data} (the run's --eval-data)"
    else:
        task = args.task or meta.get("task")
        if not task:
            raise HrmError(
                "the checkpoint records neither a task nor --eval-data; pass --task NAME or --data FILE.jsonl"
            )
        samples = task_samples(task, args.samples, "heldout", tok, seed=args.seed)
        source = f"task {task} (held-out)"
    if not samples:
        raise HrmError(f"no samples to evaluate in {source}")
    device = next(model.parameters()).device
    precision = _announce("eval", model, args.precision, device, args.compile)
    with autocast(precision, device):
        score = exact_match(
            model,
            samples,
            eos_id=tok.eoa_id,
            batch_size=args.batch_size,
            compile=args.compile,
            progress=True,
        )
    print(f"exact-match on {len(samples)} samples of {source}: {score:.4f}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory, or a training run's --out directory (uses its latest)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--backend", default="auto", help="kernel backend: auto, torch, compile, cpu, triton, cuda")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="'byte' or a tokenizer.json (default: the checkpoint's own copy, or what it recorded)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="fp32, bf16 autocast, or auto (bf16 on GPUs with bf16 tensor cores and, with --compile, on CPUs "
        "with AMX-BF16; fp32 elsewhere)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the decode step compiled as one graph (on a CPU with the weights frozen in, a CUDA graph on a GPU); "
        "compiling takes minutes on a CPU",
    )


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="answer instructions with a trained model", formatter_class=_FORMATTER)
    _common(g)
    g.add_argument("--prompt", action="append", default=[], help="an instruction (repeat for a batch)")
    g.add_argument("--prompts-file", help="a text file with one instruction per line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.set_defaults(func=_generate)

    e = sub.add_parser(
        "eval", help="exact-match of greedy answers on a task or a JSONL file", formatter_class=_FORMATTER
    )
    _common(e)
    src = e.add_mutually_exclusive_group()
    src.add_argument("--task", help="a built-in task (its held-out split); default: the task the model was trained on")
    src.add_argument(
        "--data",
        help='a JSONL file of {"instruction", "response"} objects (default: the run\'s --eval-data, if it had one)',
    )
    e.add_argument("--samples", type=int, default=500, help="how many samples to evaluate")
    e.add_argument("--seed", type=int, default=0, help="seed of the held-out task split")
    e.add_argument("--batch-size", type=int, default=64)
    e.set_defaults(func=_eval)
