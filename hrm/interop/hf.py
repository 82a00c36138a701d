"""Export to and import from the Hugging Face ``transformers`` format (``HrmTextForCausalLM``).

A Hugging Face model directory holds ``config.json`` (``"model_type": "hrm_text"``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Both
directions read and write these files directly; only :func:`load_transformers_model`
needs ``transformers`` (``pip install 'hrm[hf]'``).

Weights, for each stack ``S`` in ``H``, ``L`` and block ``i`` (``w = num_heads * head_dim``,
``I = intermediate_size``); fused projections split by rows::

    ours                                      transformers
    embed_tokens.weight                       model.embed_tokens.weight
    z_L_init  (buffer)                        model.z_L_init  (non-trained parameter)
    lm_head.weight                            lm_head.weight
    S_level.layers.i.attn.gqkv_proj.weight    rows [0:w]   model.S_module.layers.i.self_attn.gate_proj.weight
                                              rows [w:2w]  ....self_attn.q_proj.weight
                                              rows [2w:3w] ....self_attn.k_proj.weight
                                              rows [3w:4w] ....self_attn.v_proj.weight
    S_level.layers.i.attn.o_proj.weight       model.S_module.layers.i.self_attn.o_proj.weight
    S_level.layers.i.mlp.gate_up_proj.weight  rows [0:I]   model.S_module.layers.i.mlp.gate_proj.weight
                                              rows [I:2I]  ....mlp.up_proj.weight
    S_level.layers.i.mlp.down_proj.weight     model.S_module.layers.i.mlp.down_proj.weight

Vocabulary: the export keeps the tokenizer's ids only. ``HrmTextConfig.vocab_size`` sizes
both ``nn.Embedding`` and the LM head, so the exported ``vocab_size`` is the tokenizer's
(the rows our padding adds up to a multiple of 256 are cut): the model's logits then have
exactly one column per token the tokenizer knows, for ``generate``, ``pipeline`` and raw
forwards alike, which a ``suppress_tokens`` list in the generation config would give only to
``generate``. Our generation masks those rows to ``-inf``, so greedy answers and sampling
distributions are the same. The cut rows go to ``hrm_vocab_padding.safetensors`` (transformers
ignores it), from which :func:`import_hf` restores them.

Config: ``vocab_size`` = the tokenizer's vocab (see above); ``num_hidden_layers`` = blocks per stack
(``transformers`` remembers it as ``num_layers_per_stack`` and inflates
``num_hidden_layers`` to one KV-cache slot per stack call); ``embedding_scale`` =
``1/s_in`` = ``sqrt(d)``; ``initializer_range`` = ``s_in``; ``max_position_embeddings`` =
``max_seq_len``; ``rope_parameters`` = ``{"rope_type": "default", "rope_theta": theta}``;
untied LM head; ``prefix_lm`` (``token_type_ids == 1`` marks the bidirectional
instruction). Only ``arch="hrm"`` has an ``HrmTextForCausalLM`` counterpart.

Tokenizer and generation: the export writes ``tokenizer.json`` (the run's tokenizer in
the ``tokenizers`` format, the byte tokenizer as a byte-level BPE without merges) with the
special tokens ``<|pad|>``, ``<|boi|>``, ``<|eoi|>``, ``<|eoa|>`` and a post-processor that
frames a text as ``<|boi|> text <|eoi|>`` with ``token_type_ids`` 1 on every token -- the
prompt our ``hrm generate`` builds -- ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``
(special-token strings inside a text stay text, as in training), and
``generation_config.json`` (greedy, ``eos_token_id`` = ``<|eoa|>``, the end of an answer;
``max_new_tokens`` 64 as ``hrm generate``). So ``model.generate(**tokenizer(prompt,
return_tensors="pt"))`` reproduces ``hrm generate``'s answer.

An ``"hrm"`` entry in the exported ``config.json`` keeps what ``transformers`` cannot
express (the unpadded vocab size, the truncated-backprop schedule) and the checkpoint's
``meta``; import restores them when they describe the same model as the rest of the file,
so that ``import_hf(export_hf(ckpt))`` gives back the same config and bit-identical weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hrm.checkpoint import (
    TOKENIZER_FILE,
    check_state_dict,
    load_checkpoint_tokenizer,
    load_state,
    model_shapes,
    read_config,
    read_json,
    read_safetensors,
    resolve_checkpoint,
    save_checkpoint,
    write_dir_atomically,
)
from hrm.config import ModelConfig
from hrm.errors import CheckpointError, ConfigError, HrmError

MODEL_TYPE = "hrm_text"
ARCHITECTURE = "HrmTextForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
VOCAB_PADDING_FILE = "hrm_vocab_padding.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
#: Our keys of the tensors with one row per vocabulary id, and their transformers names.
_VOCAB_ROWS = {"embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}

#: ``ModelConfig`` fields that the transformers config determines (vocab and SwiGLU width as padded sizes).
_HF_DETERMINED = (
    "arch",
    "hidden_size",
    "num_heads",
    "n_layers",
    "H_cycles",
    "L_cycles",
    "rope_theta",
    "norm_eps",
    "max_seq_len",
    "padded_vocab_size",
    "intermediate_size",
)


def _require_hrm_arch(config: ModelConfig) -> None:
    if config.arch != "hrm":
        raise ConfigError(
            f"only arch='hrm' models can be exported to transformers (HrmTextForCausalLM); "
            f"this one has arch={config.arch!r}"
        )


# -- weights --------------------------------------------------------------------------------
def _key_map(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Our key -> the transformers keys its rows split into, in row order (one key: a rename)."""
    keys = {
        "embed_tokens.weight": ("model.embed_tokens.weight",),
        "z_L_init": ("model.z_L_init",),
        "lm_head.weight": ("lm_head.weight",),
    }
    for stack in ("H", "L"):
        for i in range(config.layers_per_stack):
            ours, hf = f"{stack}_level.layers.{i}", f"model.{stack}_module.layers.{i}"
            keys[f"{ours}.attn.gqkv_proj.weight"] = tuple(
                f"{hf}.self_attn.{p}_proj.weight" for p in ("gate", "q", "k", "v")
            )
            keys[f"{ours}.attn.o_proj.weight"] = (f"{hf}.self_attn.o_proj.weight",)
            keys[f"{ours}.mlp.gate_up_proj.weight"] = (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight")
            keys[f"{ours}.mlp.down_proj.weight"] = (f"{hf}.mlp.down_proj.weight",)
    return keys


def _split(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return {
        hf_key: part
        for key, hf_keys in _key_map(config).items()
        for hf_key, part in zip(hf_keys, state[key].chunk(len(hf_keys), dim=0))
    }


def to_hf_state_dict(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], *, where: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Our state dict -> ``HrmTextForCausalLM``'s (contiguous CPU tensors, dtypes kept)."""
    _require_hrm_arch(config)
    check_state_dict(state_dict, model_shapes(config), where)
    return {k: v.detach().cpu().contiguous() for k, v in _split(state_dict, config).items()}


def from_hf_state_dict(
    config: ModelConfig, hf_state_dict: dict[str, torch.Tensor], *, where: str = "state dict"
) -> dict[str, torch.Tensor]:
    """``HrmTextForCausalLM``'s state dict -> ours; keys and shapes must match ``config`` exactly."""
    _require_hrm_arch(config)
    check_state_dict(hf_state_dict, _split(model_shapes(config), config), where)
    return {
        key: torch.cat([hf_state_dict[k] for k in hf_keys]) if len(hf_keys) > 1 else hf_state_dict[hf_keys[0]]
        for key, hf_keys in _key_map(config).items()
    }


# -- config ---------------------------------------------------------------------------------
def hf_config_dict(
    config: ModelConfig,
    meta: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` that ``transformers`` loads as ``HrmTextForCausalLM``, with
    ``vocab_size`` rows of embedding and LM head (default: our padded vocab)."""
    _require_hrm_arch(config)
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "vocab_size": vocab_size or config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.layers_per_stack,
        "H_cycles": config.H_cycles,
        "L_cycles": config.L_cycles,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "embedding_scale": 1.0 / config.embed_std,
        "initializer_range": config.embed_std,
        "max_position_embeddings": config.max_seq_len,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "prefix_lm": True,
        "dtype": str(dtype).removeprefix("torch."),
        "hrm": {"model": config.to_dict(), "meta": meta or {}},
    }


def _restore_hrm_fields(derived: ModelConfig, block: Any) -> ModelConfig:
    """The exporter's own config from the ``"hrm"`` entry, if it describes the same model as ``derived``."""
    try:
        saved = ModelConfig.from_dict(block["model"])
    except (HrmError, KeyError, TypeError):
        return derived
    same = all(getattr(saved, f) == getattr(derived, f) for f in _HF_DETERMINED if f != "padded_vocab_size")
    # an export holds the padded vocab (older exports) or the tokenizer's ids, at most the model's
    rows = derived.vocab_size
    return saved if same and (rows == saved.padded_vocab_size or rows <= saved.vocab_size) else derived


def config_from_hf_dict(doc: dict[str, Any], where: str = CONFIG_FILE) -> tuple[ModelConfig, dict[str, Any], float]:
    """``(config, meta, embedding_scale)`` for a transformers ``config.json``.

    The padded vocab becomes ``vocab_size`` with ``vocab_multiple`` 256 when it divides it,
    else 1 (unless the ``"hrm"`` entry restores the exporter's config). Settings this
    project's model cannot reproduce raise :class:`CheckpointError`.
    """
    if not isinstance(doc, dict) or doc.get("model_type") != MODEL_TYPE:
        found = doc.get("model_type") if isinstance(doc, dict) else None
        raise CheckpointError(f"{where}: model_type is {found!r}, expected {MODEL_TYPE!r} (HrmTextForCausalLM)")
    rope = doc.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{where}: rope_parameters must be an object, got {rope!r}")
    settings = {
        "prefix_lm": (doc.get("prefix_lm", True), True),
        "tie_word_embeddings": (doc.get("tie_word_embeddings", False), False),
        "attention_bias": (doc.get("attention_bias", False), False),
        "mlp_bias": (doc.get("mlp_bias", False), False),
        "hidden_act": (doc.get("hidden_act", "silu"), "silu"),
        "rope_type": (rope.get("rope_type", "default"), "default"),
    }
    for name, (value, supported) in settings.items():
        if value != supported:
            raise CheckpointError(f"{where}: {name}={value!r} is not supported (only {supported!r})")
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
        if k not in doc
    ]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    vocab, hidden, intermediate = doc["vocab_size"], doc["hidden_size"], doc["intermediate_size"]
    try:
        config = ModelConfig(
            vocab_size=vocab,
            vocab_multiple=256 if vocab % 256 == 0 else 1,
            hidden_size=hidden,
            num_heads=doc["num_attention_heads"],
            expansion=intermediate * 3 / (2 * hidden),  # gives back intermediate when it is a multiple of 256
            n_layers=2 * (doc.get("num_layers_per_stack") or doc["num_hidden_layers"]),
            H_cycles=doc.get("H_cycles", 2),
            L_cycles=doc.get("L_cycles", 3),
            rope_theta=float(rope.get("rope_theta", doc.get("rope_theta", 10000.0))),
            norm_eps=float(doc.get("rms_norm_eps", 1e-6)),
            max_seq_len=doc.get("max_position_embeddings", 2048),
        )
        embedding_scale = float(doc.get("embedding_scale") or 1.0 / doc.get("initializer_range", 0.02))
    except HrmError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: malformed config ({e})") from None
    if config.intermediate_size != intermediate:
        raise CheckpointError(
            f"{where}: intermediate_size {intermediate} is not supported (this model's SwiGLU "
            "width is a multiple of 256)"
        )
    head_dim = doc.get("head_dim", config.head_dim)
    if head_dim != config.head_dim:
        raise CheckpointError(
            f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads = {config.head_dim} is not supported"
        )
    block = doc.get("hrm")
    meta = block.get("meta") if isinstance(block, dict) and isinstance(block.get("meta"), dict) else {}
    return _restore_hrm_fields(config, block), meta, embedding_scale


# -- directories ----------------------------------------------------------------------------
def _read_hf_dir(hf_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a transformers model directory (single file or shards)."""
    if not (hf_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{hf_dir} is not a transformers model directory: {CONFIG_FILE} is missing")
    doc = read_json(hf_dir / CONFIG_FILE)
    if (hf_dir / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    elif (hf_dir / WEIGHTS_INDEX_FILE).is_file():
        index = read_json(hf_dir / WEIGHTS_INDEX_FILE)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f'{hf_dir / WEIGHTS_INDEX_FILE}: no "weight_map" object')
        files = sorted(set(index["weight_map"].values()))
    else:
        raise CheckpointError(
            f"{hf_dir}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found (only safetensors weights are supported)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(read_safetensors(hf_dir / name))
    return doc, state


def tokenizer_files(tokenizer, max_length: int) -> dict[str, Any]:
    """The JSON documents (file name -> object) that make ``AutoTokenizer`` load ``tokenizer``
    as a ``PreTrainedTokenizerFast`` framing a text as our prompts (see the module docstring)."""
    from hrm.data.tokenizer import HF_SPECIAL_TOKENS, hf_tokenizer_json

    boi, eoi = HF_SPECIAL_TOKENS["boi"], HF_SPECIAL_TOKENS["eoi"]
    prompt = [{"SpecialToken": {"id": boi, "type_id": 1}}, {"Sequence": {"id": "A", "type_id": 1}}]
    end = [{"SpecialToken": {"id": eoi, "type_id": 1}}]
    doc = hf_tokenizer_json(tokenizer)
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": prompt + end,
        "pair": prompt + [{"Sequence": {"id": "B", "type_id": 1}}] + end,
        "special_tokens": {
            name: {"id": name, "ids": [i], "tokens": [name]}
            for name, i in ((boi, tokenizer.boi_id), (eoi, tokenizer.eoi_id))
        },
    }
    special = {
        "bos_token": boi,
        "eos_token": HF_SPECIAL_TOKENS["eoa"],
        "pad_token": HF_SPECIAL_TOKENS["pad"],
        "additional_special_tokens": [eoi],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        "padding_side": "left",
        "split_special_tokens": True,  # "<|eoa|>" inside a text is text, as in training
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    return {TOKENIZER_FILE: doc, TOKENIZER_CONFIG_FILE: config, SPECIAL_TOKENS_FILE: special}


def generation_config_dict(tokenizer) -> dict[str, Any]:
    """``generation_config.json``: greedy, ending at the end-of-answer token, as ``hrm generate``."""
    return {
        "bos_token_id": tokenizer.boi_id,
        "eos_token_id": tokenizer.eoa_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": False,
        "max_new_tokens": 64,
    }


def export_hf(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, ema: bool = False, tokenizer: str | None = None
) -> Path:
    """Write our checkpoint ``ckpt_dir`` (or a run directory's latest; its EMA weights with
    ``ema``) as a transformers model directory ``out_dir`` with its tokenizer (``tokenizer``
    overrides the one the checkpoint records) and generation config (atomically; an existing
    non-empty ``out_dir`` is an error)."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    config, meta = read_config(ckpt_dir)
    _require_hrm_arch(config)  # before reading the weights
    tok = load_checkpoint_tokenizer(ckpt_dir, meta, tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{ckpt_dir}: the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size}; "
            "pass the --tokenizer it was trained with"
        )
    state = to_hf_state_dict(config, load_state(ckpt_dir, ema=ema), where=str(ckpt_dir))
    padding = {ours: state[theirs][tok.vocab_size :].contiguous() for ours, theirs in _VOCAB_ROWS.items()}
    for theirs in _VOCAB_ROWS.values():
        state[theirs] = state[theirs][: tok.vocab_size].contiguous()
    meta = {**meta, "tokenizer": "byte" if tok.spec == "byte" else TOKENIZER_FILE}
    doc = hf_config_dict(config, meta, dtype=state["lm_head.weight"].dtype, vocab_size=tok.vocab_size)
    documents = {
        CONFIG_FILE: doc,
        GENERATION_CONFIG_FILE: generation_config_dict(tok),
        **tokenizer_files(tok, config.max_seq_len),
    }

    def fill(tmp: Path) -> None:
        for name, document in documents.items():
            (tmp / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if padding["lm_head.weight"].shape[0]:
            save_file(padding, str(tmp / VOCAB_PADDING_FILE))

    return write_dir_atomically(out_dir, fill)


def _pad_vocab(hf_dir: Path, config: ModelConfig, hf_state: dict[str, torch.Tensor]) -> None:
    """Give an export's embedding and LM head (the tokenizer's rows) their padding rows back:
    from ``hrm_vocab_padding.safetensors`` when it fits, else zeros (never a label, masked when
    generating)."""
    if any(k not in hf_state for k in _VOCAB_ROWS.values()):
        return  # from_hf_state_dict names what is missing
    rows = hf_state["lm_head.weight"].shape[0]
    if rows >= config.padded_vocab_size:
        return
    saved = read_safetensors(hf_dir / VOCAB_PADDING_FILE) if (hf_dir / VOCAB_PADDING_FILE).is_file() else {}
    for ours, theirs in _VOCAB_ROWS.items():
        weight = hf_state[theirs]
        pad = saved.get(ours)
        if pad is None or pad.shape != (config.padded_vocab_size - rows, weight.shape[1]):
            pad = weight.new_zeros(config.padded_vocab_size - rows, weight.shape[1])
        hf_state[theirs] = torch.cat([weight, pad.to(weight.dtype)])


def read_hf_model(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """``(config, our state dict, meta)`` of the transformers ``HrmTextForCausalLM`` directory ``hf_dir``.

    An ``embedding_scale`` other than ``sqrt(hidden_size)`` is folded into the embedding
    weights (our forward always scales by ``sqrt(hidden_size)``); otherwise every tensor is
    copied bit for bit, vocabulary padding included (see the module docstring).
    """
    hf_dir = Path(hf_dir)
    doc, hf_state = _read_hf_dir(hf_dir)
    config, meta, embedding_scale = config_from_hf_dict(doc, str(hf_dir / CONFIG_FILE))
    _pad_vocab(hf_dir, config, hf_state)
    state = from_hf_state_dict(config, hf_state, where=str(hf_dir))
    if not math.isclose(embedding_scale, 1.0 / config.embed_std, rel_tol=1e-9):
        embed = state["embed_tokens.weight"]
        state["embed_tokens.weight"] = (embed.double() * (embedding_scale * config.embed_std)).to(embed.dtype)
    return config, state, meta


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the transformers ``HrmTextForCausalLM`` directory ``hf_dir`` as our checkpoint
    ``out_dir`` (atomically; an existing non-empty ``out_dir`` is an error), with a copy of
    its ``tokenizer.json`` unless it was exported with the byte tokenizer (see :func:`read_hf_model`)."""
    hf_dir = Path(hf_dir)
    config, state, meta = read_hf_model(hf_dir)
    tokenizer = hf_dir / TOKENIZER_FILE
    copy = meta.get("tokenizer") != "byte" and tokenizer.is_file()
    if copy:
        meta = {**meta, "tokenizer": TOKENIZER_FILE}
    return save_checkpoint(
        out_dir,
        config,
        state,
        meta={**meta, "imported_from": str(hf_dir.resolve())},
        extra=(lambda tmp: shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)) if copy else None,
    )


def load_transformers_model(hf_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
    """``transformers.AutoModelForCausalLM.from_pretrained(hf_dir)`` in ``dtype``, in eval mode."""
    try:
        import transformers
    except ImportError:
        raise HrmError("loading a transformers model needs the 'transformers' package: pip install 'hrm[hf]'") from None
    return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()


__all__ = [
    "config_from_hf_dict",
    "export_hf",
    "from_hf_state_dict",
    "hf_config_dict",
    "import_hf",
    "load_transformers_model",
    "read_hf_model",
    "to_hf_state_dict",
]
