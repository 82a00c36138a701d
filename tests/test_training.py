"""The training loop and ``hrm train``: outputs, bad input, non-finite loss, kill-and-resume, torchrun."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_env import ENV, ROOT

from hrm.checkpoint import load_model, read_config
from hrm.cli import main
from hrm.model import HRMText
from hrm.training import TrainConfig
from hrm.training.metrics import read_metrics

STEPS = 60
# small and fast: 60 steps of 256-token rows, a checkpoint every 2 steps, an evaluation every 20;
# the reference backend in fp32 (these runs check the bookkeeping; `auto` would compile kernels first)
RUN_ARGS = [
    "--backend",
    "torch",
    "--precision",
    "fp32",
    "--task",
    "add",
    "--steps",
    str(STEPS),
    "--batch-tokens",
    "256",
    "--train-samples",
    "3000",
    "--warmup-steps",
    "5",
    "--lr",
    "3e-3",
    "--eval-every",
    "20",
    "--eval-samples",
    "16",
    "--save-every",
    "2",
    "--log-every",
    "1",
]
TRAIN_KEYS = {"step", "loss", "lr", "bp_steps", "tokens_per_s", "tokens", "accuracy", "grad_norm"}
EVAL_KEYS = {"step", "eval_loss", "eval_accuracy", "eval_exact_match"}
LAST_LINE = re.compile(r"^held-out exact-match: [01]\.\d{4}$")


def hrm_train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hrm", "train", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run, shared by the output checks and the kill-and-resume comparison."""
    out = tmp_path_factory.mktemp("full") / "run"
    result = hrm_train(*RUN_ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread too (see ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- configuration ---------------------------------------------------------------------------


def test_config_round_trip_and_default_source():
    cfg = TrainConfig(model_overrides={"hidden_size": 32}, betas=(0.8, 0.9))
    assert cfg.source == ("task", "add")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TrainConfig(data="x.jsonl").source == ("data", "x.jsonl")
    assert (cfg.backend, cfg.precision) == ("auto", "auto")  # the fastest correct path by default
    assert cfg.model_config(vocab_size=300).vocab_size == 300 and cfg.model_config(300).hidden_size == 32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--data", "does/not/exist.jsonl"], "does/not/exist.jsonl: file not found"),
        (["--task", "add", "--data", "x.jsonl"], "give one data source"),
        (["--override", "hidden=3"], "bad model override 'hidden=3'"),
        (["--override", "hidden_size=big"], "'big' is not a valid int"),
        (["--steps", "0"], "steps must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("hrm train: error: ") and message in err


def test_cpu_backend_on_a_gpu_run_is_a_config_error(capsys, tmp_path, monkeypatch):
    """On a machine with a GPU the run goes to cuda, where the cpu kernels cannot run: one
    line before anything is read or written, not an error from inside the first step."""
    from hrm.training import loop

    monkeypatch.setattr(loop, "setup_distributed", lambda timeout_s: loop.Dist(0, 1, torch.device("cuda", 0)))
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--backend", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--backend cpu runs CPU tensors, and this run is on cuda:0" in err
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no checkpoint to resume from" in err


def test_non_finite_loss_stops_and_names_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = HRMText.loss

    def poisoned(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), metrics) if calls["n"] == 5 else (loss, metrics)

    monkeypatch.setattr(HRMText, "loss", poisoned)
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--out",
        str(out),
        "--steps",
        "10",
        "--batch-tokens",
        "128",
        "--train-samples",
        "200",
        "--save-every",
        "2",
        "--eval-every",
        "0",
    )
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last == f"hrm train: error: non-finite loss at step 5; last good checkpoint: {out}/checkpoints/step_00000004"
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()


def test_jsonl_and_pretokenized_sources(capsys, tmp_path):
    rows = [{"instruction": f"{a}+{b}", "response": str(a + b)} for a in range(20) for b in range(10)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--eval-samples",
        "8",
        "--steps",
        "3",
        "--batch-tokens",
        "128",
        "--out",
        str(tmp_path / "jsonl"),
    )
    assert code == 0, err
    assert LAST_LINE.match(out.strip().splitlines()[-1])

    # the reference's pre-tokenized layout with the same pairs, byte ids already framed
    from hrm.data import ByteTokenizer

    tok = ByteTokenizer()
    pairs = [(tok.encode_instruction(r["instruction"]), tok.encode_response(r["response"])) for r in rows]
    pre = tmp_path / "pre"
    (pre / "epoch_0").mkdir(parents=True)
    tokens = np.array([t for inst, resp in pairs for t in inst + resp], dtype=np.int32)
    lens = np.array([[len(i), len(r)] for i, r in pairs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens.sum(1))[:-1]])
    np.save(pre / "tokens.npy", tokens)
    for name, arr in (
        ("inst_start", starts),
        ("inst_len", lens[:, 0]),
        ("resp_start", starts + lens[:, 0]),
        ("resp_len", lens[:, 1]),
    ):
        np.save(pre / "epoch_0" / f"{name}.npy", arr.astype(np.int64))
    (pre / "metadata.json").write_text(json.dumps({"tokenizer_info": {"vocab_size": 260}, "max_seq_len": 64}))
    code, out, err = run_cli(
        capsys,
        "train",
        "--pretokenized",
        str(pre),
        "--steps",
        "3",
        "--batch-tokens",
        "128",
        "--out",
        str(tmp_path / "pre_run"),
    )
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "held-out exact-match: n/a (no held-out data; pass --eval-data)"


# -- a real run ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_outputs(full_run, capsys):
    out, result = full_run
    assert LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert [r["step"] for r in evals] == [20, 40, 60] and all(EVAL_KEYS <= set(r) for r in evals)
    first, last = np.mean([r["loss"] for r in train[:5]]), np.mean([r["loss"] for r in train[-5:]])
    assert last < 0.6 * first
    assert [r["bp_steps"] for r in train[:2]] == [2, 2] and train[-1]["bp_steps"] == 5
    assert (out / "metrics.png").stat().st_size > 10_000
    assert json.loads((out / "train_config.json").read_text())["steps"] == STEPS
    assert json.loads((out / "model_config.json").read_text())["hidden_size"] == 64

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["latest", f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]
    final = out / "checkpoints" / f"step_{STEPS:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == final.name
    _, meta = read_config(final)
    assert meta["step"] == STEPS and meta["tokenizer"] == "byte" and meta["task"] == "add"
    assert TrainConfig.from_dict(meta["train_config"]).steps == STEPS
    load_model(final, ema=True)

    code, _, err = run_cli(capsys, "train", *RUN_ARGS, "--out", str(out))  # the directory holds a run
    assert code == 2 and "already holds a training run" in err
    code, _, err = run_cli(capsys, "train", "--resume", str(out))
    assert code == 2 and "already finished" in err


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(full_run, tmp_path, capsys):
    reference, _ = full_run
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hrm", "train", *RUN_ARGS, "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step_00000010"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().removeprefix("step_"))
    assert killed_at < STEPS

    # a resumed run may not change what it trains
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--lr", "0.5")
    assert code == 2 and "cannot resume: lr is 0.5 but the checkpoint was trained with 0.003" in err
    code, _, err = run_cli(capsys, "train", "--resume", str(out), "--task", "sort")
    assert code == 2 and "cannot resume: the data source is --task sort" in err

    result = hrm_train("--resume", str(out), "--log-every", "1")
    assert result.returncode == 0, result.stderr
    assert LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    resumed = without_timing(read_metrics(out / "metrics.jsonl"))
    assert resumed == without_timing(read_metrics(reference / "metrics.jsonl"))
    assert result.stdout.strip().splitlines()[-1] == full_run[1].stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun is not installed"
)
def test_torchrun_two_ranks(tmp_path):
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hrm",
            "train",
            *RUN_ARGS,
            "--steps",
            "8",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
