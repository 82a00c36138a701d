"""Import checkpoints of the reference implementation (``sapientinc/HRM-Text``).

The reference names its HRM model's tensors as below; the fused layouts are the same as
ours (``gqkv_proj`` rows ``[gate | q | k | v]``, ``gate_up_proj`` rows ``[gate | up]``), so
the import is a rename (for each stack ``S`` in ``H``, ``L`` and block ``i``)::

    reference                                       ours
    embed_tokens.embedding_weight                   embed_tokens.weight
    lm_head.weight                                  lm_head.weight
    model.zL_init  (bfloat16)                       z_L_init  (cast, exactly, to the embedding's dtype)
    model.S_level.core.layers.i.attn.gqkv_proj.weight    S_level.layers.i.attn.gqkv_proj.weight
    model.S_level.core.layers.i.attn.o_proj.weight       S_level.layers.i.attn.o_proj.weight
    model.S_level.core.layers.i.mlp.gate_up_proj.weight  S_level.layers.i.mlp.gate_up_proj.weight
    model.S_level.core.layers.i.mlp.down_proj.weight     S_level.layers.i.mlp.down_proj.weight

Wrappers are tolerated: a leading ``module.`` (DDP), ``_orig_mod.`` segments
(``torch.compile``), and a torch file that nests the state dict under ``state_dict``,
``model``, ``model_state_dict`` or ``module``. The reference's plain-Transformer baseline
uses other names and is not supported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from hrm.checkpoint import check_state_dict, model_shapes, read_safetensors, save_checkpoint
from hrm.config import ModelConfig
from hrm.errors import CheckpointError, ConfigError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_RENAMES = {
    "embed_tokens.embedding_weight": "embed_tokens.weight",
    "lm_head.weight": "lm_head.weight",
    "model.zL_init": "z_L_init",
}
_BLOCK_TENSOR = re.compile(
    r"model\.([HL])_level\.core\.layers\.(\d+)\."
    r"(attn\.gqkv_proj|attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)\.weight"
)


def _strip_wrappers(name: str) -> str:
    """Drop a leading ``module.`` (DDP) and every ``_orig_mod.`` segment (``torch.compile``)."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    return ".".join(parts[1:] if parts[:1] == ["module"] else parts)


def _our_name(reference_name: str) -> str:
    name = _strip_wrappers(reference_name)
    if name in _RENAMES:
        return _RENAMES[name]
    match = _BLOCK_TENSOR.fullmatch(name)
    if match is None:
        raise CheckpointError(
            f"unknown tensor {reference_name!r}: not in the reference's HRM naming "
            "(its Transformer baseline is not supported)"
        )
    stack, layer, tensor = match.groups()
    return f"{stack}_level.layers.{layer}.{tensor}.weight"


def from_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's tensors under our names (see the module docstring); unknown names are an error.

    Works on any subset (for example a dict of gradients); completeness and shapes are
    checked against a config by :func:`import_reference`.
    """
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        key = _our_name(name)
        if key in ours:
            raise CheckpointError(f"tensor {name!r} duplicates another tensor once wrapper prefixes are removed")
        ours[key] = tensor
    if "z_L_init" in ours and "embed_tokens.weight" in ours:
        ours["z_L_init"] = ours["z_L_init"].to(ours["embed_tokens.weight"].dtype)
    return ours


def _unwrap(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{file}: not a state dict (no tensors at the top level nor under any of {', '.join(_WRAPPER_KEYS)})"
            )
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    return obj


def load_reference_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw state dict of a reference ``.safetensors`` or torch ``.pt`` / ``.pth`` / ``.bin`` file."""
    file = Path(path)
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    if file.suffix not in (".pt", ".pth", ".bin"):
        raise CheckpointError(f"{file}: unsupported file type (expected .safetensors, .pt, .pth or .bin)")
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types (pickle, zip, runtime) for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: cannot read torch file ({reason})") from None
    return _unwrap(obj, file)


def import_reference(path: str | os.PathLike, config: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write the reference checkpoint ``path`` as our checkpoint ``out_dir`` for ``config``
    (atomically; an existing non-empty ``out_dir`` is an error). Tensors are copied unchanged
    except ``z_L_init``'s exact cast to the weights' dtype."""
    if config.arch != "hrm":
        raise ConfigError(f"only arch='hrm' reference checkpoints can be imported; the config has arch={config.arch!r}")
    state = from_reference_state_dict(load_reference_state_dict(path))
    check_state_dict(state, model_shapes(config), str(path))
    return save_checkpoint(out_dir, config, state, meta={"imported_from": str(Path(path).resolve())})


__all__ = ["from_reference_state_dict", "import_reference", "load_reference_state_dict"]
