"""Checkpoint interchange: transformers export/import, reference import, their CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hrm.cli
from hrm.checkpoint import load_state, read_config, read_safetensors, save_checkpoint
from hrm.config import ModelConfig
from hrm.errors import HrmError
from hrm.interop import (
    export_hf,
    from_reference_state_dict,
    hf_config_dict,
    import_hf,
    import_reference,
    load_transformers_model,
)
from hrm.model import HRMText

CONFIGS = [
    ModelConfig(vocab_size=260, hidden_size=64, num_heads=2, n_layers=4, H_cycles=2, L_cycles=3, max_seq_len=64),
    ModelConfig(
        vocab_size=300,
        hidden_size=96,
        num_heads=3,
        n_layers=2,
        H_cycles=1,
        L_cycles=2,
        max_seq_len=32,
        rope_theta=500.0,
    ),
    ModelConfig(
        vocab_size=1000,
        hidden_size=128,
        num_heads=4,
        n_layers=6,
        H_cycles=3,
        L_cycles=1,
        max_seq_len=128,
        expansion=3.0,
        norm_eps=1e-5,
    ),
]
IDS = ["d64-h2-l4", "d96-h3-l2", "d128-h4-l6"]


def random_checkpoint(path: Path, config: ModelConfig, seed: int = 0, **kwargs) -> HRMText:
    torch.manual_seed(seed)
    model = HRMText(config).eval()
    save_checkpoint(path, config, model.state_dict(), meta={"tokenizer": "byte", "step": 7}, **kwargs)
    return model


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# -- transformers export ----------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_transformers_logits_match(config: ModelConfig, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    model = random_checkpoint(tmp_path / "ckpt", config)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = load_transformers_model(tmp_path / "hf", dtype=torch.float32)
    assert hf_model.config.num_layers_per_stack == config.layers_per_stack
    assert torch.equal(hf_model.model.z_L_init, model.z_L_init) and not hf_model.model.z_L_init.requires_grad
    n = 13
    ids = torch.randint(0, 260, (n,), generator=torch.Generator().manual_seed(1))  # ids of the byte tokenizer
    for prefix in (1, 5, n):
        with torch.no_grad():
            ours = model(
                ids, torch.arange(n), torch.tensor([0, n], dtype=torch.int32), torch.tensor([prefix], dtype=torch.int32)
            )
            token_type_ids = (torch.arange(n) < prefix).long()[None]  # 1 marks the bidirectional prefix
            theirs = hf_model(input_ids=ids[None], token_type_ids=token_type_ids).logits[0]
        assert theirs.shape == (n, 260)  # one column per id of the byte tokenizer; padding rows are cut
        ours = ours[:, :260]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def test_config_json_fields(tmp_path: Path) -> None:
    config = CONFIGS[0]
    random_checkpoint(tmp_path / "ckpt", config)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf/config.json").read_text())
    assert doc == hf_config_dict(config, {"tokenizer": "byte", "step": 7}, vocab_size=260)
    assert doc["model_type"] == "hrm_text" and doc["architectures"] == ["HrmTextForCausalLM"]
    assert doc["vocab_size"] == 260 and doc["num_hidden_layers"] == 2 and doc["head_dim"] == 32
    assert doc["intermediate_size"] == config.intermediate_size
    assert doc["embedding_scale"] == 8.0 and doc["initializer_range"] == 0.125
    assert doc["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert doc["tie_word_embeddings"] is False and doc["prefix_lm"] is True


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_round_trip_is_bit_exact(config: ModelConfig, tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", config)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert_same_state(load_state(tmp_path / "back"), load_state(tmp_path / "ckpt"))
    back_config, meta = read_config(tmp_path / "back")
    assert back_config == config
    assert meta["tokenizer"] == "byte" and meta["imported_from"] == str((tmp_path / "hf").resolve())


def test_ema_export_and_bf16_weights(tmp_path: Path) -> None:
    config = CONFIGS[0]
    model = HRMText(config).to(torch.bfloat16)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", config, model.state_dict(), ema_state_dict=ema)
    export_hf(tmp_path / "ckpt", tmp_path / "hf", ema=True)
    assert json.loads((tmp_path / "hf/config.json").read_text())["dtype"] == "bfloat16"
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert_same_state(load_state(tmp_path / "back"), ema)


def test_import_without_hrm_entry_takes_the_exported_vocab(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[1])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf/config.json").read_text())
    del doc["hrm"]
    (tmp_path / "hf/config.json").write_text(json.dumps(doc))
    import_hf(tmp_path / "hf", tmp_path / "back")
    config, _ = read_config(tmp_path / "back")
    assert (config.vocab_size, config.vocab_multiple, config.padded_vocab_size) == (260, 1, 260)
    assert config.intermediate_size == CONFIGS[1].intermediate_size
    original = load_state(tmp_path / "ckpt")
    vocab_rows = {"embed_tokens.weight", "lm_head.weight"}
    assert_same_state(
        load_state(tmp_path / "back"), {k: v[:260] if k in vocab_rows else v for k, v in original.items()}
    )


def test_import_sharded_checkpoint(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[0])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "hf/config.json").read_text())
    (sharded / "hrm_vocab_padding.safetensors").write_bytes(
        (tmp_path / "hf/hrm_vocab_padding.safetensors").read_bytes()
    )
    state = read_safetensors(tmp_path / "hf/model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    import_hf(sharded, tmp_path / "back")
    assert_same_state(load_state(tmp_path / "back"), load_state(tmp_path / "ckpt"))


def test_other_embedding_scale_is_folded_into_the_weights(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[0])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    doc = json.loads((tmp_path / "hf/config.json").read_text())
    doc["embedding_scale"] *= 2
    (tmp_path / "hf/config.json").write_text(json.dumps(doc))
    import_hf(tmp_path / "hf", tmp_path / "back")
    original = load_state(tmp_path / "ckpt")["embed_tokens.weight"]
    assert torch.equal(load_state(tmp_path / "back")["embed_tokens.weight"], 2 * original)


# -- errors: one line, nothing left behind --------------------------------------------------------
@pytest.fixture
def exported(tmp_path: Path) -> Path:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[0])
    return export_hf(tmp_path / "ckpt", tmp_path / "hf")


def _edit_config(hf_dir: Path, **changes) -> None:
    doc = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**doc, **changes}))


def test_import_rejects_other_model_type(exported: Path, tmp_path: Path) -> None:
    _edit_config(exported, model_type="llama")
    with pytest.raises(HrmError) as excinfo:
        import_hf(exported, tmp_path / "out")
    assert_one_line_error(excinfo, "model_type is 'llama'", "hrm_text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_import_rejects_shape_mismatch(exported: Path, tmp_path: Path) -> None:
    state = read_safetensors(exported / "model.safetensors")
    key = "model.L_module.layers.1.self_attn.q_proj.weight"
    state[key] = state[key][:-1]
    save_file(state, str(exported / "model.safetensors"))
    with pytest.raises(HrmError) as excinfo:
        import_hf(exported, tmp_path / "out")
    assert_one_line_error(excinfo, key, "(63, 64)", "(64, 64)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"prefix_lm": False}, "prefix_lm=False"),
        ({"intermediate_size": 300}, "intermediate_size 300"),
        ({"hidden_size": "wide"}, "malformed config"),
    ],
)
def test_import_rejects_unsupported_config(exported: Path, tmp_path: Path, change: dict, fragment: str) -> None:
    _edit_config(exported, **change)
    with pytest.raises(HrmError) as excinfo:
        import_hf(exported, tmp_path / "out")
    assert_one_line_error(excinfo, fragment)
    assert not (tmp_path / "out").exists()


def test_no_overwrite_of_non_empty_out_dir(exported: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    for convert in (
        lambda: export_hf(tmp_path / "ckpt", tmp_path / "out"),
        lambda: import_hf(exported, tmp_path / "out"),
    ):
        with pytest.raises(HrmError) as excinfo:
            convert()
        assert_one_line_error(excinfo, "already exists and is not empty")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf", "out"]


def test_transformer_arch_is_not_exported(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[0].replace(arch="transformer"))
    with pytest.raises(HrmError) as excinfo:
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert_one_line_error(excinfo, "arch='transformer'", "HrmTextForCausalLM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# -- reference checkpoints ------------------------------------------------------------------------
def reference_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the reference's naming (the inverse of from_reference_state_dict)."""
    out = {
        "embed_tokens.embedding_weight": state["embed_tokens.weight"],
        "lm_head.weight": state["lm_head.weight"],
        "model.zL_init": state["z_L_init"].bfloat16(),
    }
    for key, tensor in state.items():
        stack, _, rest = key.partition(".")
        if stack in ("H_level", "L_level"):
            out[f"model.{stack}.core.{rest}"] = tensor
    return out


@pytest.fixture
def bf16_exact_model() -> HRMText:
    torch.manual_seed(0)
    model = HRMText(CONFIGS[0])
    model.z_L_init.copy_(model.z_L_init.bfloat16())  # the reference stores z_L_init in bf16
    return model


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod."])
@pytest.mark.parametrize("container", ["file.safetensors", "file.pt", "nested.pth"])
def test_import_reference_wrappers(bf16_exact_model: HRMText, tmp_path: Path, prefix: str, container: str) -> None:
    ref = {prefix + k: v.contiguous() for k, v in reference_state(bf16_exact_model.state_dict()).items()}
    file = tmp_path / container
    if container.endswith(".safetensors"):
        save_file(ref, str(file))
    else:
        torch.save({"model": ref, "step": 3} if container.startswith("nested") else ref, file)
    import_reference(file, CONFIGS[0], tmp_path / "out")
    assert_same_state(load_state(tmp_path / "out"), bf16_exact_model.state_dict())


def test_reference_errors(bf16_exact_model: HRMText, tmp_path: Path) -> None:
    ref = reference_state(bf16_exact_model.state_dict())
    with pytest.raises(HrmError) as excinfo:
        from_reference_state_dict({**ref, "model.H_level.core.layers.0.attn.qkv_proj.weight": torch.zeros(1)})
    assert_one_line_error(excinfo, "unknown tensor", "qkv_proj")
    save_file(ref, str(tmp_path / "ref.safetensors"))
    with pytest.raises(HrmError) as excinfo:
        import_reference(tmp_path / "ref.safetensors", CONFIGS[0].replace(hidden_size=128), tmp_path / "out")
    assert_one_line_error(excinfo, "has shape")
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(HrmError) as excinfo:
        import_reference(tmp_path / "bad.pt", CONFIGS[0], tmp_path / "out")
    assert_one_line_error(excinfo, "not a state dict")
    assert not (tmp_path / "out").exists()


# -- CLI --------------------------------------------------------------------------------------
@pytest.fixture
def cli():
    return hrm.cli.main


def test_cli_commands(cli, bf16_exact_model: HRMText, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_checkpoint(
        tmp_path / "ckpt", CONFIGS[0], bf16_exact_model.state_dict(), ema_state_dict=bf16_exact_model.state_dict()
    )
    assert cli(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--ema"]) == 0
    assert cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert_same_state(load_state(tmp_path / "back"), bf16_exact_model.state_dict())

    save_file(reference_state(bf16_exact_model.state_dict()), str(tmp_path / "ref.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(CONFIGS[0].to_dict()))
    assert (
        cli(
            [
                "import-reference",
                str(tmp_path / "ref.safetensors"),
                str(tmp_path / "from_ref"),
                "--config",
                str(tmp_path / "model.json"),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "import-reference",
                str(tmp_path / "ref.safetensors"),
                str(tmp_path / "from_preset"),
                "--preset",
                "tiny",
                "--max-seq-len",
                "64",
            ]
        )
        == 0
    )
    assert read_config(tmp_path / "from_preset")[0] == CONFIGS[0]
    assert_same_state(load_state(tmp_path / "from_ref"), bf16_exact_model.state_dict())
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(str(tmp_path) in line for line in out)


def test_cli_errors(cli, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["export-hf", str(tmp_path / "ckpt"), str(exported)]) == 2
    assert cli(["import-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert (
        cli(["import-reference", str(exported / "model.safetensors"), str(tmp_path / "out"), "--preset", "tiny"]) == 2
    )
    assert (
        cli(["import-reference", str(exported / "model.safetensors"), str(tmp_path / "out"), "--preset", "nope"]) == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4
    assert err[0].startswith("hrm export-hf: error: ") and "not empty" in err[0]
    assert err[1].startswith("hrm import-hf: error: ") and "model_type is None" in err[1]
    assert err[2].startswith("hrm import-reference: error: ") and "unknown tensor" in err[2]
    assert err[3].startswith("hrm import-reference: error: ") and "unknown preset" in err[3]
    assert not (tmp_path / "out").exists()


# -- no transformers needed -------------------------------------------------------------------------
def test_works_without_transformers(tmp_path: Path) -> None:
    random_checkpoint(tmp_path / "ckpt", CONFIGS[0])
    code = f"""
import sys
import hrm, hrm.interop, hrm.interop.commands
assert "transformers" not in sys.modules
sys.modules["transformers"] = None  # hide it: importing it now raises ImportError
from hrm.errors import HrmError
from hrm.interop import export_hf, import_hf, load_transformers_model
export_hf({str(tmp_path / "ckpt")!r}, {str(tmp_path / "hf")!r})
import_hf({str(tmp_path / "hf")!r}, {str(tmp_path / "back")!r})
try:
    load_transformers_model({str(tmp_path / "hf")!r})
except HrmError as e:
    assert "pip install 'hrm[hf]'" in str(e), e
else:
    raise AssertionError("load_transformers_model worked without transformers")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert_same_state(load_state(tmp_path / "back"), load_state(tmp_path / "ckpt"))
