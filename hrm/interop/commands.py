"""``hrm export-hf``, ``hrm import-hf`` and ``hrm import-reference``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hrm.config import ModelConfig, get_preset
from hrm.errors import ConfigError
from hrm.interop.hf import export_hf, import_hf
from hrm.interop.reference import import_reference


def _export_hf(args: argparse.Namespace) -> None:
    out = export_hf(args.ckpt_dir, args.out_dir, ema=args.ema, tokenizer=args.tokenizer)
    print(f"exported {'EMA weights of ' if args.ema else ''}{args.ckpt_dir} to transformers model {out}")


def _import_hf(args: argparse.Namespace) -> None:
    out = import_hf(args.hf_dir, args.out_dir)
    print(f"imported transformers model {args.hf_dir} as checkpoint {out}")


def _config_file(path: str) -> ModelConfig:
    """A JSON object of ``ModelConfig`` fields, or one of our checkpoint ``config.json`` files."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        doc = doc["model"]
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object of model config fields")
    return ModelConfig.from_dict(doc)


def _import_reference(args: argparse.Namespace) -> None:
    overrides = {k: v for k, v in (("vocab_size", args.vocab_size), ("max_seq_len", args.max_seq_len)) if v is not None}
    config = get_preset(args.preset) if args.preset else _config_file(args.config)
    out = import_reference(args.file, config.replace(**overrides), args.out_dir)
    print(f"imported reference checkpoint {args.file} as checkpoint {out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-hf",
        help="write a checkpoint as a transformers HrmTextForCausalLM directory",
        description="Write a checkpoint as a directory that transformers' AutoModelForCausalLM and AutoTokenizer "
        "load as they are: weights (one row per token id), config, generation config and tokenizer files.",
    )
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a checkpoint, or a training run's directory (its latest)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="must not exist or be empty")
    p.add_argument("--ema", action="store_true", help="export the parameter EMA instead of the raw weights")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="'byte' or a tokenizer.json (default: the checkpoint's own copy, or what it recorded)",
    )
    p.set_defaults(func=_export_hf)

    p = subparsers.add_parser("import-hf", help="convert a transformers HrmTextForCausalLM directory to a checkpoint")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="must not exist or be empty")
    p.set_defaults(func=_import_hf)

    p = subparsers.add_parser(
        "import-reference", help="convert a sapientinc/HRM-Text state dict (.safetensors/.pt) to a checkpoint"
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("out_dir", metavar="OUT_DIR", help="must not exist or be empty")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", metavar="NAME", help="model preset the weights belong to (tiny, small, B, L, XL)")
    source.add_argument("--config", metavar="JSON", help="JSON file of model config fields")
    p.add_argument("--vocab-size", type=int, help="override the config's vocab size")
    p.add_argument("--max-seq-len", type=int, help="override the config's maximum sequence length")
    p.set_defaults(func=_import_reference)
