"""A user's first hour, as command lines (``python -m hrm ...`` in a subprocess): a damaged
training state, a run used from elsewhere, the transformers export used as it is, fine-tuning
and extending a run. The runs train on a small JSONL corpus with a trained BPE tokenizer."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_env import ENV, ROOT
from safetensors.torch import save_file
from test_interop import reference_state

from hrm.checkpoint import load_model, load_state, read_config, save_checkpoint
from hrm.cli import main
from hrm.config import ModelConfig
from hrm.data import HFTokenizer, load_tokenizer, read_jsonl
from hrm.inference import generate
from hrm.model import HRMText
from hrm.training.loop import evaluate
from hrm.training.metrics import read_metrics
from hrm.training.optim import lr_at

STEPS = 30
TRAIN = [
    "--batch-tokens",
    "256",
    "--warmup-steps",
    "2",
    "--lr",
    "3e-3",
    "--log-every",
    "1",
    "--eval-every",
    "0",
    "--eval-samples",
    "8",
    "--save-every",
    "10",
]
PROMPTS = ["12+34", "907+88", "5+7"]

pytest.importorskip("tokenizers")


@pytest.fixture(autouse=True)
def one_thread():
    """In-process models use one thread, as the subprocesses do (see ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hrm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrm", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a command that failed with exit code 2."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hrm {command}: error: ")
    return lines[0]


def write_jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """``data/``: a BPE tokenizer (304 ids with our special tokens), train/dev JSONL of sums
    and a fine-tuning JSONL of differences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    data = tmp_path_factory.mktemp("project") / "data"
    data.mkdir()
    rng = random.Random(0)
    pairs = [(rng.randrange(1000), rng.randrange(100)) for _ in range(440)]
    write_jsonl(data / "train.jsonl", [(f"{a}+{b}", str(a + b)) for a, b in pairs[:360]])
    write_jsonl(data / "dev.jsonl", [(f"{a}+{b}", str(a + b)) for a, b in pairs[360:400]])
    write_jsonl(data / "ft.jsonl", [(f"{a}-{b}", str(a - b)) for a, b in pairs[400:]])  # the fine-tuning task
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([f"{a}+{b} {a + b} {a}-{b} {a - b}" for a, b in pairs], trainer)
    tok.save(str(data / "tokenizer.json"))
    return data


@pytest.fixture(scope="module")
def project(data) -> Path:
    """A project directory: ``data/`` and ``runs/bpe``, a finished 30-step run trained with
    paths relative to the project."""
    root = data.parent
    result = hrm(
        "train",
        "--data",
        "data/train.jsonl",
        "--eval-data",
        "data/dev.jsonl",
        "--tokenizer",
        "data/tokenizer.json",
        "--steps",
        str(STEPS),
        *TRAIN,
        "--out",
        "runs/bpe",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory from which the project's relative paths do not resolve."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def answers(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if " -> " in line]


# -- 1. a damaged or missing training state ------------------------------------------------------


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:5000])


DAMAGE = {
    "deleted": (lambda f: f.unlink(), "train_state.pt is missing"),
    "truncated": (_truncate, "train_state.pt: cannot read the training state (truncated or damaged"),
    "garbage": (lambda f: f.write_bytes(os.urandom(3000)), "train_state.pt: cannot read the training state"),
    "not a training state": (lambda f: torch.save({"step": 3}, f), "train_state.pt: not a training state"),
    "weights truncated": (
        lambda f: _truncate(f.with_name("model.safetensors")),
        "model.safetensors: cannot read safetensors",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_one_line_and_exit_2(project, tmp_path, capsys, monkeypatch, damage):
    """The first case as a subprocess; the others through the same entry point in this process."""
    run = shutil.copytree(project / "runs/bpe", tmp_path / "run")
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    spoil, message = DAMAGE[damage]
    spoil(ckpt / "train_state.pt")
    before = sorted(p.name for p in ckpt.iterdir())
    argv = ["train", "--resume", str(run), "--steps", "40"]
    if damage == next(iter(DAMAGE)):
        result = hrm(*argv, cwd=project)
    else:
        monkeypatch.chdir(project)  # where the run's relative data paths resolve
        code = main(argv)
        result = subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)
    error = one_line_error(result, "train")
    assert message in error and str(ckpt) in error
    assert sorted(p.name for p in ckpt.iterdir()) == before  # nothing written, nothing lost
    assert (run / "checkpoints/latest").read_text().strip() == ckpt.name


# -- 2. runs travel ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_works_from_another_directory(project, tmp_path, elsewhere):
    ckpt = project / "runs/bpe/checkpoints" / f"step_{STEPS:08d}"
    assert read_config(ckpt)[1]["tokenizer"] == "tokenizer.json"
    assert (ckpt / "tokenizer.json").read_bytes() == (project / "data/tokenizer.json").read_bytes()
    prompts = [arg for p in PROMPTS for arg in ("--prompt", p)]
    here = answers(
        hrm("generate", "runs/bpe", *prompts, "--backend", "torch", "--tokenizer", "data/tokenizer.json", cwd=project)
    )
    moved = shutil.copytree(project / "runs/bpe", tmp_path / "moved")  # the tokenizer travels with the run
    assert answers(hrm("generate", str(moved), *prompts, "--backend", "torch", cwd=elsewhere)) == here
    assert [line.split(" -> ")[0] for line in here] == PROMPTS

    result = hrm("eval", str(moved), "--backend", "torch", "--samples", "8", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    dev = project / "data/dev.jsonl"
    assert re.fullmatch(
        rf"exact-match on 8 samples of {re.escape(str(dev))} \(the run's --eval-data\): [01]\.\d{{4}}\n", result.stdout
    )


# -- 3. the transformers export, used as it is ---------------------------------------------------


def readme_transformers_example() -> str:
    """The README's transformers example (the python block that loads ``hf_out``)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "AutoModelForCausalLM.from_pretrained" in b]
    return block


@pytest.mark.slow
def test_transformers_export_reproduces_hrm_generate(project, elsewhere):
    pytest.importorskip("transformers")
    example = readme_transformers_example()
    prompts = json.loads(re.search(r"for prompt in (\[.*?\]):", example).group(1))
    result = hrm("export-hf", str(project / "runs/bpe"), "hf_out", cwd=elsewhere)  # a run directory
    assert result.returncode == 0, result.stderr
    hf_out = elsewhere / "hf_out"
    tok = HFTokenizer(project / "data/tokenizer.json")
    generation = json.loads((hf_out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eoa_id
    assert json.loads((hf_out / "config.json").read_text())["vocab_size"] == tok.vocab_size == 304

    theirs = subprocess.run(
        [sys.executable, "-c", example], cwd=elsewhere, env=ENV, capture_output=True, text=True, timeout=300
    )
    ours = hrm(
        "generate",
        str(project / "runs/bpe"),
        *[a for p in prompts for a in ("--prompt", p)],
        "--backend",
        "torch",
        cwd=elsewhere,
    )
    assert answers(theirs) == answers(ours)
    assert [line.split(" -> ")[0] for line in answers(ours)] == prompts


def test_export_tokenizer_frames_prompts_as_training_does(data, tmp_path):
    """``AutoTokenizer`` on the export gives our prompt ids, ``token_type_ids`` 1 over the whole
    prompt, keeps special-token strings inside a text as text, and decodes as we do; the
    byte tokenizer too."""
    transformers = pytest.importorskip("transformers")
    from hrm.interop import export_hf

    config = ModelConfig(vocab_size=304, hidden_size=32, num_heads=2, n_layers=2, max_seq_len=64)
    save_checkpoint(tmp_path / "bpe", config, HRMText(config).state_dict(), meta={"tokenizer": "tokenizer.json"})
    shutil.copyfile(data / "tokenizer.json", tmp_path / "bpe/tokenizer.json")
    byte_config = config.replace(vocab_size=260)
    save_checkpoint(tmp_path / "byte", byte_config, HRMText(byte_config).state_dict(), meta={"tokenizer": "byte"})
    texts = ["907+88", "héllo <|eoa|> wörld", " 12 + 3 "]
    for name, ours in (("bpe", HFTokenizer(tmp_path / "bpe/tokenizer.json")), ("byte", load_tokenizer("byte"))):
        export_hf(tmp_path / name, tmp_path / f"hf_{name}")
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / f"hf_{name}"))
        for text in texts:
            encoded = theirs(text)
            assert encoded["input_ids"] == ours.encode_instruction(text), (name, text)
            assert encoded["token_type_ids"] == [1] * len(encoded["input_ids"])
            assert theirs.decode(ours.encode_response(text), skip_special_tokens=True) == ours.decode(
                ours.encode_response(text)
            )
        assert theirs.eos_token_id == ours.eoa_id and theirs.pad_token_id == ours.pad_id


@pytest.mark.slow
def test_byte_export_generates_our_tokens(tmp_path):
    """Greedy ``generate`` of the export with the README's recipe gives ``hrm.inference.generate``'s
    ids on a random model (long answers: many tokens to agree on), and no id past the tokenizer's."""
    transformers = pytest.importorskip("transformers")
    from hrm.interop import export_hf

    config = ModelConfig(vocab_size=260, hidden_size=64, num_heads=2, n_layers=4, max_seq_len=128)
    torch.manual_seed(3)
    model = HRMText(config).eval()
    save_checkpoint(tmp_path / "ckpt", config, model.state_dict(), meta={"tokenizer": "byte"})
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = load_tokenizer("byte")
    for prompt in ["12+345", "reverse:abc", "x"]:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = hf_model.generate(**inputs, max_new_tokens=24)[0, inputs["input_ids"].shape[1] :].tolist()
        (expected,) = generate(model, [tok.encode_instruction(prompt)], max_new_tokens=24, eos_id=tok.eoa_id)
        assert out[: len(expected)] == expected and out[len(expected) :] in ([], [tok.eoa_id]), prompt
        assert max(out) < 260


def test_init_from_a_transformers_export_takes_its_weights(tmp_path):
    from hrm.interop import export_hf
    from hrm.training.init_from import init_weights

    config = ModelConfig(vocab_size=260, hidden_size=32, num_heads=2, n_layers=2, max_seq_len=64)
    save_checkpoint(tmp_path / "ckpt", config, HRMText(config).state_dict(), meta={"tokenizer": "byte"})
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    weights, _ = init_weights(str(tmp_path / "hf"), config)
    original = load_state(tmp_path / "ckpt")
    assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in original)
    with pytest.raises(Exception, match="hidden_size 32 but this run's model has 64"):
        init_weights(str(tmp_path / "hf"), config.replace(hidden_size=64))


# -- 4. fine-tuning and longer runs --------------------------------------------------------------


def jsonl_loss(ckpt: Path, data: Path, tokenizer: HFTokenizer) -> float:
    samples, _ = read_jsonl(data, tokenizer)
    model = load_model(ckpt).eval()
    return evaluate(model, samples, budget=256, pad_id=tokenizer.pad_id, eos_id=tokenizer.eoa_id)["eval_loss"]


@pytest.mark.slow
def test_fine_tune_an_imported_reference_state_dict(project, tmp_path):
    trained = load_state(project / "runs/bpe/checkpoints" / f"step_{STEPS:08d}")
    save_file(reference_state(trained), str(tmp_path / "ref.safetensors"))
    model_json = str(project / "runs/bpe/model_config.json")
    result = hrm(
        "import-reference", str(tmp_path / "ref.safetensors"), "imported", "--config", model_json, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr

    tok = HFTokenizer(project / "data/tokenizer.json")
    ft_data = project / "data/ft.jsonl"
    imported_loss = jsonl_loss(tmp_path / "imported", ft_data, tok)
    common = ["--tokenizer", str(project / "data/tokenizer.json"), "--data", str(ft_data), *TRAIN]
    result = hrm("train", "--init-from", "imported", *common, "--steps", "8", "--out", "ft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "weights from checkpoint imported" in result.stderr
    losses = [r["loss"] for r in read_metrics(tmp_path / "ft/metrics.jsonl") if "loss" in r]
    # step 1 is the imported model on one row of the data: near its loss on the whole file, far
    # below a fresh model's (about ln 304 = 5.7)
    assert abs(losses[0] - imported_loss) < 0.25 * imported_loss and imported_loss < 0.7 * math.log(304)
    tuned_loss = jsonl_loss(tmp_path / "ft/checkpoints/step_00000008", ft_data, tok)
    assert tuned_loss < 0.9 * imported_loss

    # the reference file itself is a source too, and gives the same first step
    result = hrm("train", "--init-from", "ref.safetensors", *common, "--steps", "1", "--out", "ft_ref", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["loss"] for r in read_metrics(tmp_path / "ft_ref/metrics.jsonl") if "loss" in r] == losses[:1]


@pytest.mark.slow
def test_extend_a_finished_run(project, tmp_path):
    copy = shutil.copytree(project, tmp_path / "project")
    (copy / "data/tokenizer.json").unlink()  # the resumed run reads the checkpoint's copy
    error = one_line_error(hrm("train", "--resume", "runs/bpe", cwd=copy), "train")
    assert "already finished its 30 steps; give more with --steps N" in error
    result = hrm("train", "--resume", "runs/bpe", "--steps", "36", cwd=copy)
    assert result.returncode == 0, result.stderr
    train = [r for r in read_metrics(copy / "runs/bpe/metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 37))
    # steps 1-30 ran on the 30-step schedule; from step 31 on, the schedule of 36 steps
    original = [r for r in read_metrics(project / "runs/bpe/metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in train[:30]] == [r["lr"] for r in original]
    for record in train[30:]:
        assert record["lr"] == pytest.approx(lr_at(record["step"] - 1, 36, 3e-3, 2, 0.1), rel=1e-12)
    assert train[30]["lr"] > original[-1]["lr"] and train[-1]["bp_steps"] == 5
    error = one_line_error(hrm("train", "--resume", "runs/bpe", "--steps", "20", cwd=copy), "train")
    assert "is at step 36; --steps 20 would not continue it" in error
