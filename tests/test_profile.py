"""Named ranges (:mod:`hrm.profiling`) and ``hrm profile`` on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hrm import HRMText, cli, profiling
from hrm.bench import profile
from hrm.bench.workloads import train_batch

STEP_RANGES = {"forward", "backward", "optimizer"}
# Added to hrm/model.py by the lead's ranges patch: stack calls named by H cycle and L step.
MODEL_RANGES = {"embed", "L0.0", "L0.1", "L0.2", "H0", "L1.0", "L1.1", "L1.2", "H1", "attn", "mlp", "norm", "loss"}
ARGS = ["profile", "--steps", "2", "--preset", "tiny", "--tokens", "128", "--backend", "torch"]


def _model_emits_ranges() -> bool:
    bench = profile.bench_config("tiny", 32)
    model, batch = HRMText(bench.model), train_batch(bench)
    with torch.profiler.profile() as prof, torch.no_grad():
        model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.prefix_lens)
    return "embed" in {e.name for e in prof.events()}


def test_range_is_free_without_a_profiler():
    assert profiling.range("x") is profiling.range("y")  # the shared no-op
    with torch.profiler.profile() as prof:
        with profiling.range("outer"), profiling.range("inner"):
            torch.ones(2).sum()
    stats = {(s.name, s.depth) for s in profile.range_stats(prof.events())}
    assert {("outer", 0), ("inner", 1)} <= stats


def test_stack_range_names():
    names = [profiling.stack_range_name(level, call, 3) for call, level in enumerate("LLLHLLLH")]
    assert names == ["L0.0", "L0.1", "L0.2", "H0", "L1.0", "L1.1", "L1.2", "H1"]


def _run(tmp_path):
    args = cli.build_parser().parse_args([*ARGS, "--out", str(tmp_path)])
    result = profile.main(args)
    trace = json.loads(result["trace"].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    return result, names


def test_profile_step_ranges_cover_the_step(tmp_path):
    result, names = _run(tmp_path)
    assert STEP_RANGES <= names
    assert (tmp_path / "ranges.md").read_text().count("| forward |") == 1
    assert abs(result["ranges_seconds"] / result["step_seconds"] - 1) <= 0.10


@pytest.mark.skipif(
    not _model_emits_ranges(), reason="hrm/model.py does not emit named ranges yet (apply the model ranges patch)"
)
def test_profile_model_ranges(tmp_path):
    result, names = _run(tmp_path)
    assert STEP_RANGES | MODEL_RANGES <= names
    table = {s.name for s in result["stats"]}
    assert STEP_RANGES | MODEL_RANGES <= table
    assert abs(result["ranges_seconds"] / result["step_seconds"] - 1) <= 0.10


@pytest.mark.skipif(shutil.which("nsys") is not None and torch.cuda.is_available(), reason="Nsight is installed")
def test_nsys_without_nsight_prints_the_command(tmp_path, capsys):
    assert cli.main(["profile", "--nsys", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nsys profile" in err and "--capture-range=cudaProfilerApi" in err and "cannot run --nsys" in err
