"""``hrm compare``: step planning from a FLOP budget, parameter matching, and a tiny study
end to end (table, plot, resumability)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from hrm.cli import build_parser, main
from hrm.config import ModelConfig
from hrm.flops import RowWork, num_parameters
from hrm.study.compare import StudySpec, matched_configs, plan_steps, run_flops, train_argv
from hrm.training.commands import build_config

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=40, vocab_multiple=8, hidden_size=32, num_heads=4, n_layers=2)


def works(step: int) -> RowWork:
    return RowWork(100 + step % 7, 900 + 13 * (step % 5), 20 + step % 3)


@pytest.mark.parametrize("arch", ["hrm", "transformer", "ut"])
def test_plan_steps_spends_the_budget(arch):
    cfg = CFG.replace(arch=arch)
    for budget in (3e8, 2.5e9, 4e10):
        steps, flops = plan_steps(cfg, works, budget)
        assert flops == run_flops(cfg, works, steps) <= budget < run_flops(cfg, works, steps + 1)
    with pytest.raises(Exception, match="less than one training step"):
        plan_steps(cfg, works, 1e6)


def test_matched_configs_keep_the_blocks():
    models = matched_configs(CFG, ("hrm", "transformer", "ut"))
    assert {a: m.n_layers for a, m in models.items()} == {"hrm": 2, "transformer": 2, "ut": 2}
    assert len({num_parameters(m) for m in models.values()}) == 1


def test_train_argv_reproduces_the_config():
    cfg = StudySpec(task="chain", budget_flops=1e9, model_overrides={"hidden_size": 32}).train_config(
        "ut", 1, 40, "runs/x"
    )
    args = build_parser().parse_args(["train", *train_argv(cfg)])
    assert build_config(args) == cfg


STUDY = [
    "compare",
    "--task",
    "chain",
    "--budget-flops",
    "3e9",
    "--archs",
    "hrm",
    "transformer",
    "--seeds",
    "1",
    "--override",
    "hidden_size=32",
    "--batch-tokens",
    "128",
    "--train-samples",
    "400",
    "--evals",
    "2",
    "--eval-samples",
    "8",
    "--backend",  # passed to every run, fresh or resumed
    "torch",
]


def test_compare_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "study"
    assert main([*STUDY, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| hrm | 151,552 | 2 x 8 |" in stdout and "| transformer | 151,552 | 4 x 1 |" in stdout
    assert (out / "exact_match_vs_flops.png").stat().st_size > 10_000
    first = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in first["runs"]] == ["hrm-seed0", "transformer-seed0"]
    for run in first["runs"]:
        # the loop logs exactly the FLOPs the plan spent, within the budget
        assert run["logged_flops"] == run["flops"] <= 3e9 and run["logged_params"] == run["params"]
        assert len(run["curve"]) == 2 and run["curve"][-1][0] == run["flops"]
    steps = {r["arch"]: r["steps"] for r in first["runs"]}
    assert steps["transformer"] > 2 * steps["hrm"]  # one stack call a step against eight

    # rerun: nothing left to train
    assert main([*STUDY, "--out", str(out)]) == 0
    assert "hrm-seed0: skipped" in capsys.readouterr().err

    # a run killed after its first checkpoint resumes from it and ends where it ended
    hrm_run = out / "runs" / "hrm-seed0" / "checkpoints"
    first_ckpt, last_ckpt = sorted(p.name for p in hrm_run.glob("step_*"))
    shutil.rmtree(hrm_run / last_ckpt)
    (hrm_run / "latest").write_text(first_ckpt + "\n")
    assert main([*STUDY, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "hrm-seed0: resumed" in err and "transformer-seed0: skipped" in err
    log = (out / "runs" / "hrm-seed0" / "train.log").read_text()
    assert f"$ hrm train --resume {out / 'runs' / 'hrm-seed0'} --backend torch" in log
    again = json.loads((out / "results.json").read_text())
    for a, b in zip(first["runs"], again["runs"]):
        assert a["curve"] == b["curve"] and a["logged_flops"] == b["logged_flops"]

    # another budget in the same directory is an error, not a silent mix
    assert main([*STUDY[:4], "4e9", *STUDY[5:], "--out", str(out)]) == 2
    assert "holds a study with other settings (budget_flops differ)" in capsys.readouterr().err
