"""What a new user hits in the first hour (issue 16, defects 5-8), each as the command line they
type: warm-up schedules, progress off a terminal, checkpoints kept, logging backends, config
files, help text, presets, data errors, profiler output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_env import ENV, ROOT

from hrm.cli import build_parser
from hrm.training.metrics import read_metrics
from hrm.training.optim import lr_at

# a run of seconds: 128-token rows of the add task, 4 held-out samples
TINY = ["--batch-tokens", "128", "--train-samples", "200", "--eval-samples", "4"]
PROGRESS_LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\) \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| \d+ tok/s \| "
    r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


def hrm(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m hrm ARGS`` with stdout and stderr captured (so neither is a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "hrm", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (exit code 2, nothing else on stderr)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- defects 5 and 6: a short run -------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """20 steps with the default warm-up (100 steps), a progress line per logged step, three
    checkpoints kept of four written, metrics also to TensorBoard."""
    out = tmp_path_factory.mktemp("short") / "run"
    args = ["train", *TINY, "--steps", "20", "--log-every", "2", "--progress-every", "0", "--save-every", "5"]
    args += ["--keep-checkpoints", "3", "--out", str(out)]
    if _has_tensorboard():
        args += ["--log-to", "tensorboard"]
    result = hrm(*args)
    assert result.returncode == 0, result.stderr
    return out, result


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_warmup_longer_than_the_run_is_capped_with_a_warning(short_run):
    out, result = short_run
    assert (
        "hrm train: warning: warm-up --warmup-steps 100 would take the whole 20-step run (the learning rate would "
        "never reach its peak); using 2 steps (10% of the run) instead" in result.stderr
    )
    lrs = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    peak = 3e-3  # the default --lr
    # a logged step's lr is that of its last update (0-based step - 1): the peak right after warm-up
    assert lrs[2] == pytest.approx(peak / 2)
    assert lrs[4] == pytest.approx(lr_at(3, 20, peak, 2))
    assert lrs[4] < peak and lrs[20] == pytest.approx(lr_at(19, 20, peak, 2)) and lrs[20] < 0.2 * peak


def test_warmup_steps_past_half_the_run_warn_but_stay(tmp_path):
    result = hrm("train", *TINY, "--steps", "4", "--warmup-steps", "3", "--log-every", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warm-up --warmup-steps 3 is more than half the 4-step run" in result.stderr
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([lr_at(s, 4, 3e-3, 3) for s in range(4)])


def test_plain_progress_lines_when_stderr_is_not_a_terminal(short_run):
    _, result = short_run
    lines = [m for m in map(PROGRESS_LINE.match, result.stderr.splitlines()) if m]
    assert [int(m[1]) for m in lines] == list(range(2, 21, 2))  # every logged step (--progress-every 0)
    assert all(m[2] == "20" for m in lines)
    assert "it/s" not in result.stderr and "\r" not in result.stderr  # no progress bar in a log file


def test_keep_checkpoints(short_run):
    out, _ = short_run
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000010", "step_00000015", "step_00000020"]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["keep_checkpoints"] == 3


def test_tensorboard_logs_what_metrics_jsonl_holds(short_run):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = short_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "lr", "grad_norm", "eval_exact_match"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r[key] for r in records if key in r}
        assert logged.keys() == expected.keys() and expected, key
        assert all(logged[s] == pytest.approx(v, rel=1e-6, abs=1e-9) for s, v in expected.items()), key


def test_wandb_logs_offline_and_a_resumed_run_continues_it(tmp_path):
    pytest.importorskip("wandb", reason="the wandb package is not installed (pip install wandb)")
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    out = tmp_path / "run"
    args = ["--backend", "torch", "--log-every", "1", "--save-every", "3"]
    for steps in ("3", "5"):  # a run, then the same run resumed and extended
        again = ["--resume", str(out)] if steps == "5" else [*TINY, "--log-to", "wandb", *args]
        result = subprocess.run(
            [sys.executable, "-m", "hrm", "train", *again, "--steps", steps, "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    run_id = (out / "wandb_run_id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)  # one W&B run, continued
    for r in runs:
        log = (r / f"run-{run_id}.wandb").read_bytes()
        assert b"loss" in log and b"grad_norm" in log and b"_step" in log


def test_a_logging_backend_that_is_not_installed_is_one_line(tmp_path):
    command = (
        "import sys; sys.modules['wandb'] = None; from hrm.cli import main; "
        f"sys.exit(main(['train', '--steps', '1', '--out', {str(tmp_path)!r}, '--log-to', 'wandb']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert one_error_line(result) == "hrm train: error: --log-to wandb needs the wandb package: pip install wandb"


# -- config files -----------------------------------------------------------------------------


def test_config_file_with_flags_over_it(tmp_path):
    """A TOML file describes the run, a flag overrides one setting, train_config.json keeps the
    resolved config; the warm-up comes as a fraction of the run."""
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            """\
            preset = "tiny"
            task = "reverse"
            steps = 100
            warmup-fraction = 0.25
            batch_tokens = 128
            train_samples = 200
            eval_samples = 2
            log_every = 1
            override = ["hidden_size=32"]
            """
        )
    )
    out = tmp_path / "run"
    result = hrm("train", "--config", str(config), "--steps", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["steps"] == 8 and saved["task"] == "reverse" and saved["batch_tokens"] == 128
    # the warm-up is recorded resolved (0.25 of 8 steps), so an extended run keeps it
    assert saved["warmup_fraction"] is None and saved["warmup_steps"] == 2
    assert saved["model_overrides"] == {"hidden_size": 32}
    assert json.loads((out / "model_config.json").read_text())["hidden_size"] == 32
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([lr_at(s, 8, 3e-3, 2) for s in range(8)])  # 0.25 of 8 steps: 2
    # extended to 16 steps, the run keeps its 2 warm-up steps (0.25 of 16 would be 4)
    result = hrm("train", "--resume", str(out), "--out", str(out), "--steps", "16")
    assert result.returncode == 0, result.stderr
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert lrs[8:] == pytest.approx([lr_at(s, 16, 3e-3, 2) for s in range(8, 16)])


def test_yaml_config_and_bad_config_files(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML is not installed")
    config = tmp_path / "run.yaml"
    config.write_text("steps: 2\nbatch-tokens: 128\ntrain_samples: 50\neval_samples: 1\nwarmup_steps: 0\n")
    result = hrm("train", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2

    bad = tmp_path / "bad.toml"
    bad.write_text("steps = 2\nbatch_size = 8\n")
    assert one_error_line(hrm("train", "--config", str(bad))) == (
        f"hrm train: error: {bad}: unknown setting(s) batch_size; see hrm train --help"
    )
    both = hrm("train", "--config", str(config), "--warmup-fraction", "0.1", "--warmup-steps", "5")
    assert one_error_line(both) == "hrm train: error: give the warm-up as --warmup-steps or --warmup-fraction, not both"


def test_yaml_config_without_pyyaml_says_so(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 2\n")
    command = (
        "import sys; sys.modules['yaml'] = None; from hrm.cli import main; "
        f"sys.exit(main(['train', '--config', {str(config)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert one_error_line(result) == (
        f"hrm train: error: {config}: a YAML config needs PyYAML (pip install pyyaml), or write it as TOML"
    )


# -- defect 8: help, presets, data errors, profiler output ------------------------------------


def test_train_help_lists_every_backend():
    from hrm.ops.dispatch import BACKENDS

    result = hrm("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert f"kernel backend: auto, {', '.join(BACKENDS)}" in text and "cpu" in BACKENDS


def test_every_option_with_a_default_shows_it():
    """In every subcommand's help: an option whose default is not None / off names it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    missing = []
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings or action.help in (None, "==SUPPRESS==") or action.dest == "help":
                continue
            if action.default in (None, False, "==SUPPRESS=="):
                continue
            if "default" not in command._get_formatter()._format_action(action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


def test_presets_command_lists_sizes():
    result = hrm("presets")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert list(rows) == ["tiny", "small", "B", "L", "XL"]
    assert rows["tiny"].endswith("0.34M")  # the README's figure for the demo model
    assert " 1536 " in rows["XL"] and rows["XL"].endswith("B")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "{path}: empty (no samples in it)"),
        ("\n\n", "{path}: empty (no samples in it)"),
        (
            '{"instruction": "a", "response": "b"\n',
            "{path}:1: malformed JSON: Expecting ',' delimiter at the end of the line",
        ),
        ('{"instruction": "é", "response": }\n', "{path}:1: malformed JSON: Expecting value at column 34"),
        (
            '{"instruction": "a", "response": ""}\n',
            "{path}: every one of its 1 records has an empty response; nothing to train on",
        ),
        (
            json.dumps({"instruction": "x", "response": "y" * 300}) + "\n",
            "{path} (1 records): every sample is longer than a row of --batch-tokens 128 (the longest has 303 "
            "tokens); pass --too-long truncate (responses cut to fit), or --batch-tokens 303 or more",
        ),
        (
            json.dumps({"instruction": "x" * 300, "response": "y"}) + "\n",
            "{path} (1 records): every sample is longer than a row of --batch-tokens 128 (the longest has 303 "
            "tokens); pass --batch-tokens 303 or more",
        ),
    ],
    ids=[
        "empty",
        "blank-lines",
        "unclosed-object",
        "column",
        "empty-responses",
        "all-too-long",
        "instructions-too-long",
    ],
)
def test_data_file_errors_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    result = hrm("train", "--data", str(path), "--batch-tokens", "128", "--steps", "1", "--out", str(tmp_path / "r"))
    assert one_error_line(result) == "hrm train: error: " + message.format(path=path)


def test_too_long_truncate_is_the_way_out(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "x", "response": "y" * 300}) + "\n")
    result = hrm(
        "train", "--data", str(path), "--batch-tokens", "128", "--too-long", "truncate", "--steps", "1",
        "--warmup-steps", "0", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_profile_prints_no_profiler_chatter(tmp_path):
    result = hrm("profile", "--steps", "1", "--preset", "tiny", "--tokens", "128", "--backend", "torch",
                 "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not re.search(r"^(USDT|STAGE):", result.stdout + result.stderr, re.MULTILINE), result.stderr
    assert "1 step after 1 warm-up" in result.stdout
