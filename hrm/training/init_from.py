"""``hrm train --init-from PATH``: the weights a new run starts from (fine-tuning).

``PATH`` is one of

* our checkpoint, or a run directory (its latest checkpoint): the model weights
  (``model.safetensors``, not the EMA; a sharded checkpoint's ``model``);
* a transformers ``HrmTextForCausalLM`` directory (what ``hrm export-hf`` writes);
* a reference-format state dict file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, what
  ``hrm import-reference`` reads), whose shapes must fit the run's ``--preset`` and
  ``--override``\\s.

The first two carry their model config, which must equal the run's (the error names the
first field that differs); they also carry their tokenizer, which the run uses unless
``--tokenizer`` is given. Only the weights are taken: the optimizer, EMA, step count and
schedules start afresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hrm.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    TOKENIZER_FILE,
    check_state_dict,
    is_sharded,
    load_sharded,
    load_state,
    model_shapes,
    read_config,
    read_json,
    resolve_checkpoint,
)
from hrm.config import ModelConfig
from hrm.errors import CheckpointError, ConfigError


def _kind(path: Path) -> str:
    """``"hf"``, ``"checkpoint"`` (ours or a run directory) or ``"reference"`` (a state dict file)."""
    if path.is_file():
        return "reference"
    if not path.exists():
        raise CheckpointError(f"--init-from {path}: no such file or directory")
    if (path / CONFIG_FILE).is_file():
        doc = read_json(path / CONFIG_FILE)
        if isinstance(doc, dict) and doc.get("format") != FORMAT and "model_type" in doc:
            return "hf"
    return "checkpoint"


def init_tokenizer(path: str) -> str | None:
    """The tokenizer spec the weights at ``path`` were trained with (``None``: they record none)."""
    source = Path(path)
    kind = _kind(source)
    if kind == "reference":
        return None
    if kind == "hf":
        from hrm.interop.hf import config_from_hf_dict

        _, meta, _ = config_from_hf_dict(read_json(source / CONFIG_FILE), str(source / CONFIG_FILE))
        if meta.get("tokenizer", "byte") == "byte":
            return "byte"
        return str(source / TOKENIZER_FILE) if (source / TOKENIZER_FILE).is_file() else None
    ckpt = resolve_checkpoint(source)
    spec = read_config(ckpt)[1].get("tokenizer")
    if spec is None or spec == "byte":
        return spec
    return str((ckpt / spec).resolve()) if (ckpt / spec).is_file() else spec


def init_weights(path: str, config: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, description)`` of the weights at ``path`` for a model of ``config``."""
    source = Path(path)
    kind = _kind(source)
    if kind == "reference":
        from hrm.interop.reference import from_reference_state_dict, load_reference_state_dict

        state = from_reference_state_dict(load_reference_state_dict(source))
        check_state_dict(state, model_shapes(config), f"--init-from {source} (for the run's model config)")
        return state, f"reference state dict {source}"
    if kind == "hf":
        from hrm.interop.hf import read_hf_model

        saved, state, _ = read_hf_model(source)
        described = f"transformers model {source}"
    else:
        ckpt = resolve_checkpoint(source)
        saved, _ = read_config(ckpt)
        if is_sharded(ckpt):
            shapes = model_shapes(saved)
            sharded = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}}
            load_sharded(ckpt, sharded)
            state = sharded["model"]
        else:
            state = load_state(ckpt)
        described = f"checkpoint {ckpt}"
    if saved != config:
        field = next(k for k, v in config.to_dict().items() if saved.to_dict()[k] != v)
        raise ConfigError(
            f"--init-from {source} has model {field} {getattr(saved, field)!r} but this run's model has "
            f"{getattr(config, field)!r}; give the --preset / --override (and --tokenizer) it was made with"
        )
    check_state_dict(state, model_shapes(config), f"--init-from {source}")
    return state, described


__all__ = ["init_tokenizer", "init_weights"]
