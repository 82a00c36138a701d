"""Data parallel training (docs/distributed.md): the rank split of the packed global batch, and
``torchrun`` runs on CPU/gloo where only the number of processes changes -- DDP and FSDP2 must
reach the parameters one process reaches, and sharded checkpoints resume with another world size."""

import contextlib
import os
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

from hrm.checkpoint import consolidate, is_sharded, load_state, read_config
from hrm.cli import main
from hrm.data import ByteTokenizer, PackedLoader, multipack, split_balance, split_rows, task_samples
from hrm.errors import DataError
from hrm.training.metrics import read_metrics

STEPS = 5
# four rows of 128 tokens per step whatever the world size (one process accumulates gradients
# over 4 rows, each of two ranks over 2 and synchronises on the last); checkpoints after steps 3 and 5;
# fp32 on every machine (auto trains in bf16 on CPUs with AMX, where the two summation orders differ
# by more than TOLERANCE)
RUN_ARGS = [
    "--precision",
    "fp32",
    "--task",
    "add",
    "--steps",
    str(STEPS),
    "--batch-tokens",
    "128",
    "--global-rows",
    "4",
    "--train-samples",
    "400",
    "--warmup-steps",
    "2",
    "--eval-every",
    "0",
    "--eval-samples",
    "4",
    "--save-every",
    "3",
    "--log-every",
    "1",
]
TOLERANCE = 1e-5  # relative, per tensor


# -- the rank split -----------------------------------------------------------------------------


def test_split_rows_is_an_even_deterministic_partition():
    rng = np.random.default_rng(0)
    work = rng.integers(1, 10_000, 12).tolist()
    tokens = rng.integers(1, 100, 12).tolist()
    for world in (1, 2, 3, 4, 6, 12):
        split = split_rows(work, tokens, world)
        assert split == split_rows(work, tokens, world)
        assert [len(rows) for rows in split] == [12 // world] * world
        assert sorted(i for rows in split for i in rows) == list(range(12))
        assert all(rows == sorted(rows) for rows in split)
    # LPT: the two heaviest rows go to different ranks, and the heaviest rank gets the lightest rows
    split = split_rows([100, 90, 10, 5], [1, 1, 1, 1], 2)
    assert split == [[0, 3], [1, 2]]
    with pytest.raises(DataError, match="cannot split 5 rows evenly over 2 ranks"):
        split_rows([1] * 5, [1] * 5, 2)


def test_global_batch_does_not_depend_on_the_world_size():
    tok = ByteTokenizer()
    samples = task_samples("add", 300, "train", tok) + task_samples("reverse", 300, "train", tok)
    whole = PackedLoader(samples, 96, seed=3, pad_id=tok.pad_id, num_rows=4)
    steps = [[(b.input_ids.tolist(), b.labels.tolist()) for b in next(whole)] for _ in range(6)]
    for world in (1, 2, 4):
        ranks = [PackedLoader(samples, 96, seed=3, pad_id=tok.pad_id, num_rows=4) for _ in range(world)]
        for step in steps:
            shares = [loader.next_step(r, world) for r, loader in enumerate(ranks)]
            rows = [(b.input_ids.tolist(), b.labels.tolist()) for share in shares for b in share.rows]
            assert all(len(share.rows) == 4 // world for share in shares)
            assert sorted(rows) == sorted(step)  # the same rows, only dealt differently
            supervised = sum(sum(label != -100 for label in labels) for _, labels in step)
            assert all(share.num_supervised == supervised for share in shares)
            assert all(share.num_tokens == shares[0].num_tokens for share in shares)


def test_split_balance_on_log_normal_lengths():
    """Figures quoted in docs/distributed.md come from ``hrm pack-balance`` with these settings
    (40000 samples there; fewer here)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.9, 12_000)), 2, 4096).astype(np.int64)
    for world, bound in ((2, 1.08), (4, 1.3)):
        report = split_balance(lengths, 4096, 16, world)
        assert report["packing_efficiency"] > 0.99
        assert 1.0 <= report["tokens_max_over_mean"] <= report["tokens_max_over_mean_worst"] <= 1.01
        assert 1.0 <= report["work_max_over_mean"] <= bound
        # dealing rows in order, without LPT, is measurably worse in attention work
        contiguous = []
        for step in multipack(lengths, 4096, 16)[:-1]:
            work = [int((lengths[row] ** 2).sum()) for row in step]
            per_rank = [sum(work[r * (16 // world) : (r + 1) * (16 // world)]) for r in range(world)]
            contiguous.append(max(per_rank) / np.mean(per_rank))
        assert report["work_max_over_mean"] < np.mean(contiguous) - 0.05


def test_pack_balance_command(capsys):
    code = main(["pack-balance", "--samples", "4000", "--global-rows", "8", "--world-sizes", "1", "2", "8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0].startswith("4000 log-normal lengths (median 300, sigma 0.9")
    rows = [line.split() for line in out[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "8"), ("2", "4"), ("8", "1")]
    assert rows[0][4:] == ["1.0000,", "1.0000", "1.000,", "1.000"]  # one rank: nothing to balance
    assert main(["pack-balance", "--global-rows", "6", "--world-sizes", "4"]) == 2
    assert "does not split evenly over 4 ranks" in capsys.readouterr().err


def test_clip_grad_norm_is_torchs_on_whole_tensors():
    from hrm.training.loop import clip_grad_norm

    for max_norm in (0.5, float("inf")):
        ours = [torch.nn.Parameter(torch.randn(5, 7)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4))]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        for a, b in zip(ours[:-1], theirs[:-1]):  # the last one has no gradient
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        before = [a.grad.clone() for a in ours[:-1]]
        norm, factor = clip_grad_norm(ours, max_norm)
        assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm))
        assert all(torch.equal(a.grad, g) for a, g in zip(ours[:-1], before))  # left for the step to scale
        assert all(torch.equal(factor * a.grad, b.grad) for a, b in zip(ours[:-1], theirs[:-1]))


# -- torchrun -------------------------------------------------------------------------------------


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run(
        [*command, "-m", "hrm", "train", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def final_weights(run: Path, tmp_path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{STEPS:08d}"
    if is_sharded(ckpt):
        ckpt = consolidate(ckpt, tmp_path / f"{run.name}-{'ema' if ema else 'model'}")
    return load_state(ckpt, ema=ema)


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in a)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same 5 steps by one process, two DDP ranks and two FSDP2 ranks."""
    base = tmp_path_factory.mktemp("dist")
    out = {"single": base / "single", "ddp": base / "ddp", "fsdp": base / "fsdp"}
    torchrun(1, *RUN_ARGS, "--out", str(out["single"]))
    ddp = torchrun(2, *RUN_ARGS, "--parallel", "ddp", "--out", str(out["ddp"]))
    # truncated backprop leaves the embedding without a gradient at first: DDP must not warn about it
    assert "find_unused_parameters" not in ddp.stderr, ddp.stderr[-2000:]
    torchrun(2, *RUN_ARGS, "--parallel", "fsdp", "--out", str(out["fsdp"]))
    return out


def rewind(run: Path, to: Path, step: int) -> Path:
    """A copy of ``run`` as a kill right after the checkpoint of ``step`` would have left it."""
    shutil.copytree(run, to)
    (to / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    for later in (to / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    return to


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_reach_the_single_process_parameters(runs, tmp_path, parallel):
    run = runs[parallel]
    _, meta = read_config(run / "checkpoints" / f"step_{STEPS:08d}")
    assert meta["sharded"] and meta["world_size"] == 2 and meta["parallel"] == parallel
    assert meta["train_config"]["global_rows"] == 4
    single = final_weights(runs["single"], tmp_path)
    assert max_relative_difference(final_weights(run, tmp_path), single) <= TOLERANCE
    single_ema = final_weights(runs["single"], tmp_path, ema=True)
    assert max_relative_difference(final_weights(run, tmp_path, ema=True), single_ema) <= TOLERANCE
    reference = losses(runs["single"])
    assert list(losses(run)) == list(range(1, STEPS + 1))
    assert all(abs(loss - reference[step]) <= TOLERANCE * reference[step] for step, loss in losses(run).items())
    # Adam-atan2 is blind to a constant factor in the gradients; the gradient norm is not
    norms = losses(runs["single"], "grad_norm")
    assert all(abs(norm - norms[step]) <= TOLERANCE * norms[step] for step, norm in losses(run, "grad_norm").items())
    # training moved the parameters: the comparison is not between two copies of the initialisation
    assert reference[STEPS] < reference[1] - 0.5
    # the training FLOPs of a step are all ranks' together (hrm.flops), whatever the world size
    assert losses(run, "flops") == losses(runs["single"], "flops")


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_rank(runs, tmp_path):
    resumed = rewind(runs["fsdp"], tmp_path / "resumed", 3)
    torchrun(1, "--resume", str(resumed))
    expected, got = losses(runs["fsdp"]), losses(resumed)
    assert list(got) == list(range(1, STEPS + 1))
    for step in (4, 5):
        assert abs(got[step] - expected[step]) <= TOLERANCE * expected[step]
    assert losses(resumed, "flops") == losses(runs["fsdp"], "flops")  # the count continues from the checkpoint
    final = resumed / "checkpoints" / f"step_{STEPS:08d}"
    assert not is_sharded(final)  # one process writes the single-file form
    assert max_relative_difference(load_state(final), final_weights(runs["fsdp"], tmp_path)) <= TOLERANCE


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:100])


SHARDED_DAMAGE = {
    "metadata truncated": (lambda c: _truncate(c / "dcp" / ".metadata"), "cannot load the sharded checkpoint"),
    "shard deleted": (lambda c: (c / "dcp" / "__1_0.distcp").unlink(), "__1_0.distcp"),
    "dcp deleted": (lambda c: shutil.rmtree(c / "dcp"), "written sharded, but its dcp/ is missing"),
    "train_state deleted": (lambda c: (c / "train_state.pt").unlink(), "train_state.pt is missing"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(SHARDED_DAMAGE))
def test_damaged_sharded_checkpoint_is_one_line_and_exit_2(runs, tmp_path, capsys, damage):
    """The first case as a subprocess; the others through the same entry point in this process."""
    resumed = rewind(runs["fsdp"], tmp_path / "resumed", 3)
    ckpt = resumed / "checkpoints" / "step_00000003"
    spoil, message = SHARDED_DAMAGE[damage]
    spoil(ckpt)
    argv = ["train", "--resume", str(resumed)]
    if damage == next(iter(SHARDED_DAMAGE)):
        result = subprocess.run(
            [sys.executable, "-m", "hrm", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
        )
        code, err = result.returncode, result.stderr
    else:
        code, err = main(argv), capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"hrm train: error: {ckpt}") and message in lines[0]


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_fsdp(runs, tmp_path):
    resumed = rewind(runs["single"], tmp_path / "resumed", 3)
    torchrun(2, "--resume", str(resumed), "--parallel", "fsdp")
    expected = final_weights(runs["single"], tmp_path)
    assert max_relative_difference(final_weights(resumed, tmp_path), expected) <= TOLERANCE


@pytest.mark.slow
def test_generate_needs_a_consolidated_checkpoint(runs, tmp_path, capsys):
    code = main(["generate", str(runs["ddp"]), "--prompt", "1+2="])
    err = capsys.readouterr().err
    assert code == 2 and "is a sharded checkpoint" in err and "hrm consolidate" in err
    assert main(["consolidate", str(runs["ddp"]), "--out", str(tmp_path / "whole")]) == 0
    whole = str(tmp_path / "whole")
    assert main(["generate", whole, "--prompt", "1+2=", "--max-new-tokens", "4", "--backend", "torch"]) == 0
    assert "1+2= -> " in capsys.readouterr().out


def worker_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes torchrun ``parent`` started (from /proc)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), None)
        if ppid == parent and rank is not None:
            ranks[rank] = int(stat.parent.name)
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes in /proc")
def test_a_stalled_rank_ends_the_job_with_one_line(tmp_path):
    out = tmp_path / "stall"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--task", "add", "--steps", "100000", "--batch-tokens", "128", "--train-samples", "400", "--log-every", "1"]
    proc = subprocess.Popen(
        [*command, "-m", "hrm", "train", *args, "--dist-timeout", "5", "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(out / "metrics.jsonl"):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.1)
        ranks = worker_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGSTOP)
        stalled = time.monotonic()
        while Path(f"/proc/{ranks[0]}").exists():  # rank 0 times out in its next collective and exits
            assert time.monotonic() < stalled + 60, "rank 0 hangs"
            time.sleep(0.1)
        os.kill(ranks[1], signal.SIGCONT)  # lets torchrun's SIGTERM end it
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a failed check: end this test's own processes
            for pid in ranks.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    message = [line for line in stderr.splitlines() if line.startswith("hrm train: error: rank 0 of 2")]
    assert len(message) == 1 and "lost contact with the other ranks" in message[0]
    assert "stalled for longer than --dist-timeout 5 s" in message[0]
