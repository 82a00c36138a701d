"""The thin training loop: one process, or one process per rank under ``torchrun``.

Each step: take this rank's packed rows of the global batch, ``bp = bp_steps_at(...)``, for
each row forward with labels and backward (gradients accumulate), clip, Adam-atan2 step, EMA
update; the learning rate follows :func:`lr_at`. Metrics, FLOPs and the non-finite checks
stay on the device and are read back only on steps that log, evaluate or save: a step
between them reads nothing back (on a GPU, each read waits for all queued work). A
non-finite loss or gradient norm stops the run at the next such step, naming the step it
first appeared at, before anything is evaluated or saved.

Output directory::

    OUT/train_config.json, model_config.json   the run's TrainConfig and resolved ModelConfig
    OUT/metrics.jsonl                           see hrm.training.metrics
    OUT/metrics.png                             loss / accuracy / exact-match against step
    OUT/checkpoints/step_NNNNNNNN/              hrm checkpoints (model, EMA, config + meta)
                     .../train_state.pt         optimizer, EMA count, loader, RNG, metric window
                     .../tokenizer.json         a copy of --tokenizer (not for the byte tokenizer)
    OUT/checkpoints/latest                      the name of the newest complete checkpoint

Under ``torchrun`` the checkpoints are sharded (hrm.checkpoint): ``dcp/`` holds model,
optimizer and EMA, and ``train_state.pt`` the rest (rank 0's RNG).

A checkpoint is written to a temporary directory and renamed into place, then ``latest``
is replaced atomically, then all but the newest ``keep_checkpoints`` are deleted: a kill at
any moment leaves a complete checkpoint. Resuming restores everything the next step
depends on, so on the CPU a resumed run's losses equal an uninterrupted run's bit for bit.

Data parallel (docs/distributed.md): under ``torchrun`` (``WORLD_SIZE`` > 1) the loop joins
the process group (NCCL on GPUs, gloo on CPUs, ``dist_timeout``), and :func:`parallelize`
wraps the model in DDP or applies FSDP2. A step is ``global_rows`` packed rows whatever the
world size: the loader plans them as one batch and deals ``global_rows / world_size`` to each
rank (:func:`hrm.data.split_rows`), which accumulates gradients over them, synchronising only
on the last. Each rank divides its loss sums by the step's supervised count over all rows
(known to every rank from the plan) times ``1 / world_size`` (DDP and FSDP average the
ranks' gradients), so the update is the one a single process computes over the same rows.
A checkpoint resumes with any world size and either wrapping. Rank 0 alone writes files and
progress.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from hrm import ops, profiling
from hrm.checkpoint import (
    LATEST_FILE,
    SHARDED_DIR,
    TOKENIZER_FILE,
    check_state_dict,
    is_sharded,
    load_checkpoint_tokenizer,
    load_sharded,
    load_state,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
    save_sharded,
)
from hrm.config import bp_steps_at
from hrm.data import (
    PackedLoader,
    Sample,
    load_tokenizer,
    multipack,
    pack_row,
    read_jsonl,
    read_pretokenized,
    task_samples,
)
from hrm.errors import CheckpointError, ConfigError, DataError, HrmError
from hrm.flops import RowWork, train_step_flops
from hrm.inference import exact_match
from hrm.model import Block, HRMText
from hrm.precision import autocast as precision_autocast
from hrm.precision import resolve_precision
from hrm.training.config import RESUMABLE_CHANGES, TrainConfig
from hrm.training.metrics import Backends, MetricsLog, ProgressLines, plot_metrics
from hrm.training.optim import EMA, AdamAtan2, local, lr_at, param_groups

CHECKPOINTS = "checkpoints"
# what gloo and NCCL errors say when a peer died or stalled past the timeout (DDP's reducer and
# gloo raise plain RuntimeErrors, not DistError)
_COMM_FAILURE = re.compile(r"timeout|timed out|closure|connection (closed|reset)|peer|nccl|gloo", re.IGNORECASE)
TRAIN_STATE = "train_state.pt"


# -- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: its rank, the number of ranks and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_s: int = 1800) -> Dist:
    """Join the process group ``torchrun`` describes (if any) and pick this rank's device.

    A collective that waits longer than ``timeout_s`` for the other ranks raises (NCCL: its
    watchdog aborts the process), so a stalled rank ends the job instead of hanging it; a
    rank that dies ends it at once (torchrun stops the others)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def parallelize(model: HRMText, env: Dist, parallel: str = "ddp", precision: str = "fp32") -> torch.nn.Module:
    """The module the loop runs forward and backward through; one process: ``model`` itself.

    ``ddp``: ``model`` wrapped in DDP. Truncated backprop leaves the embedding without a
    gradient while ``bp_steps`` is 2 (every block too at 1), on every rank alike, since the
    bp schedule depends only on the step. DDP is not asked to find unused parameters (a
    traversal of the graph every step, and a warning from every rank once none are unused):
    the embedding is left out of DDP, its gradient averaged by :func:`reduce_unsynced_grads`
    when it has one; only ``bp_min`` 1 falls back to ``find_unused_parameters``. ``fsdp``: FSDP2
    applied in place, ``fully_shard`` on every block and then on the root (embedding, LM head),
    returns ``model``; with ``precision="bf16"`` blocks compute in bf16 from fp32 master
    weights and gradients are reduced in fp32. Every block's parameters are gathered for each
    of its calls in the recurrence and freed after it (``reshard_after_forward``)."""
    if env.world_size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    DDP = torch.nn.parallel.DistributedDataParallel
    all_blocks_used = model.config.arch != "hrm" or model.config.bp_min >= 2
    if all_blocks_used:
        DDP._set_params_and_buffers_to_ignore_for_model(model, [_UNSYNCED])
        dist.broadcast(model.get_parameter(_UNSYNCED).detach(), 0)  # what DDP does for the others
    return DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=not all_blocks_used,
    )


_UNSYNCED = "embed_tokens.weight"  # left out of DDP: see parallelize


def reduce_unsynced_grads(net: torch.nn.Module, world_size: int) -> None:
    """Average over the ranks the gradients that DDP leaves to the loop (see :func:`parallelize`),
    as DDP does (divide, then sum); a parameter without a gradient has none on every rank."""
    if not isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return
    for name in sorted(net.parameters_to_ignore):
        param = net.module.get_parameter(name)
        if param.grad is not None:
            param.grad.div_(world_size)
            dist.all_reduce(param.grad)


def sync_context(net: torch.nn.Module, sync: bool):
    """Around a micro-step's forward and backward: reduce gradients across ranks only when
    ``sync`` (the step's last micro-step); earlier ones accumulate locally."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(
    params: list[torch.nn.Parameter], max_norm: float, backend: str | None = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, factor)`` of ``torch.nn.utils.clip_grad_norm_``, which multiplies the gradients by
    ``factor = min(max_norm / (norm + 1e-6), 1)``; here the gradients are left as they are and
    the optimizer step takes the factor (``AdamAtan2.step(grad_scale=factor)``), so that the
    clipping costs no pass over the gradients of its own. The norm is :func:`hrm.ops.global_norm`
    on ``backend`` (``torch``: torch's own), over the whole gradients, FSDP2's sharded ones too
    (DTensor norms are reduced across ranks); both stay on the device."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = ops.global_norm(grads, backend=backend)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0).to(local(grads[0]).device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()  # plain lists load with weights_only
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- data ----------------------------------------------------------------------------------


def load_samples(cfg: TrainConfig, tokenizer, vocab_size: int) -> tuple[list[Sample], list[Sample], str]:
    """``(train, heldout, description)``; ``heldout`` is empty when the source has none."""
    kind, value = cfg.source
    if kind == "task":
        train = task_samples(value, cfg.train_samples, "train", tokenizer, seed=cfg.seed)
        heldout = task_samples(value, cfg.eval_samples, "heldout", tokenizer, seed=cfg.seed)
        return train, heldout, f"task {value!r}"
    if kind == "data":
        train, stats = read_jsonl(value, tokenizer)
    else:
        train, stats = read_pretokenized(value, 0, vocab_size)
    if not stats.read:
        raise DataError(f"{value}: empty (no samples in it)")
    if not train:
        raise DataError(f"{value}: every one of its {stats.read} records has an empty response; nothing to train on")
    skipped = f", {stats.skipped_empty_response} with an empty response skipped" if stats.skipped_empty_response else ""
    heldout: list[Sample] = []
    if cfg.eval_data is not None:
        heldout, _ = (
            read_pretokenized(cfg.eval_data, 0, vocab_size)
            if Path(cfg.eval_data).is_dir()
            else read_jsonl(cfg.eval_data, tokenizer)
        )
        heldout = heldout[: cfg.eval_samples]
    return train, heldout, f"{value} ({stats.read} records{skipped})"


def check_fits(samples: list[Sample], described: str, budget: int, too_long: str) -> None:
    """A DataError saying what to change when no sample fits a row (a loader would only say
    that none does)."""
    truncatable = [s for s in samples if len(s.instruction) <= budget]
    if any(s.packed_len <= budget for s in samples) or (too_long == "truncate" and truncatable):
        return
    longest = max(s.packed_len for s in samples)
    way_out = f"--batch-tokens {longest} or more"
    if truncatable:
        way_out = f"--too-long truncate (responses cut to fit), or {way_out}"
    raise DataError(
        f"{described}: every sample is longer than a row of --batch-tokens {budget} (the longest has {longest} "
        f"tokens); pass {way_out}"
    )


# -- checkpoints ---------------------------------------------------------------------------


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint ``OUT/checkpoints/latest`` names, or ``None`` before the first one."""
    return resolve_checkpoint(out) if (Path(out) / CHECKPOINTS / LATEST_FILE).is_file() else None


def resume_config(out: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of the run in ``out``, from its latest checkpoint."""
    path = latest_checkpoint(out)
    if path is None:
        raise CheckpointError(f"{out}: no checkpoint to resume from ({CHECKPOINTS}/{LATEST_FILE} is missing)")
    _, meta = read_config(path)
    if "train_config" not in meta:
        raise CheckpointError(f"{path}: not a training checkpoint (its meta has no train_config)")
    return TrainConfig.from_dict(meta["train_config"])


def checkpoint_step(path: Path) -> int:
    """The step a training checkpoint was written at."""
    step = read_config(path)[1].get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: not a training checkpoint (its meta has no step)")
    return step


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    """ConfigError naming the first setting that a resumed run may not change."""
    if saved.source != cfg.source:
        raise ConfigError(
            f"cannot resume: the data source is --{cfg.source[0]} {cfg.source[1]} but the checkpoint "
            f"was trained on --{saved.source[0]} {saved.source[1]}"
        )
    for f in dataclasses.fields(TrainConfig):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if f.name not in RESUMABLE_CHANGES and old != new:
            raise ConfigError(f"cannot resume: {f.name} is {new!r} but the checkpoint was trained with {old!r}")


def write_latest(checkpoints: Path, name: str) -> None:
    tmp = checkpoints / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoints / LATEST_FILE)


def _optimizer_state_by_name(saved: dict, optimizer: AdamAtan2, model: HRMText) -> dict:
    """``optimizer.state_dict()`` of a single-process run (keyed by position) keyed by
    parameter name instead, as :func:`set_optimizer_state_dict` takes it; parameters that had
    no state yet get zero state (what :meth:`AdamAtan2.init_state` gives them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state, groups = {}, []
    for old, group in zip(saved["param_groups"], optimizer.param_groups):
        fqns = [names[id(p)] for p in group["params"]]
        for index, fqn, p in zip(old["params"], fqns, group["params"]):
            zeros = torch.zeros(p.shape, dtype=p.dtype)
            state[fqn] = saved["state"].get(index, {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros})
        groups.append({**old, "params": fqns})
    return {"state": state, "param_groups": groups}


def prune_checkpoints(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and temporaries left by a kill."""
    for leftover in checkpoints.glob(".step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for old in sorted(checkpoints.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# -- evaluation ----------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: HRMText, samples: list[Sample], *, budget: int, pad_id: int, eos_id: int) -> dict[str, float]:
    """Held-out loss and token accuracy (teacher forcing, every recurrence step) and greedy
    exact match (:func:`hrm.inference.exact_match`), with the model as it is."""
    device = next(model.parameters()).device
    fitting = [s for s in samples if s.packed_len <= budget]
    loss_sum, supervised, correct = 0.0, 0, 0
    for step in multipack([s.packed_len for s in fitting], budget):
        batch = pack_row([fitting[i] for i in step[0]], budget, pad_id).to(device)
        _, m = model(**batch.model_inputs())
        loss_sum += float(m["loss_sum"])
        supervised += int(m["num_supervised"])
        correct += int(m["num_correct"])
    return {
        "eval_loss": loss_sum / max(supervised, 1),
        "eval_accuracy": correct / max(supervised, 1),
        "eval_exact_match": exact_match(model, samples, eos_id=eos_id),
    }


# -- the loop ------------------------------------------------------------------------------


class _Window:
    """Metric sums since the last logged step (saved in checkpoints so resumed logs match)."""

    KEYS = ("loss_sum", "num_supervised", "num_correct", "num_sequences", "num_exact")

    def __init__(self, sums: dict[str, float] | None = None) -> None:
        self.sums = dict(sums) if sums else dict.fromkeys(self.KEYS, 0.0)

    def add(self, values: list[float]) -> None:
        for k, v in zip(self.KEYS, values):
            self.sums[k] += v

    def summary(self) -> dict[str, float]:
        s = self.sums
        return {
            "loss": s["loss_sum"] / max(s["num_supervised"], 1),
            "accuracy": s["num_correct"] / max(s["num_supervised"], 1),
            "exact_accuracy": s["num_exact"] / max(s["num_sequences"], 1),
        }


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run (or, with ``resume`` = the run's directory, continue) training; see the module docstring.

    Returns, on rank 0, the last metrics line (``step``, ``loss``, ``accuracy``, ...), the
    final evaluation (``eval_*``, when there is held-out data), ``checkpoint``,
    ``steps_run``, ``seconds``, ``rank`` and ``world_size``; on other ranks only the last two.
    """
    out = Path(cfg.out)
    ckpt_path = None
    if resume is not None:
        if Path(resume).resolve() != out.resolve():
            raise ConfigError(f"--resume {resume} and --out {cfg.out} must name the same directory")
        check_resumable(resume_config(out), cfg)
        ckpt_path = latest_checkpoint(out)
        step = checkpoint_step(ckpt_path)
        if step == cfg.steps:
            raise HrmError(f"{out}: the run already finished its {cfg.steps} steps; give more with --steps N")
        if step > cfg.steps:
            raise ConfigError(f"{out} is at step {step}; --steps {cfg.steps} would not continue it")
    elif (out / CHECKPOINTS / LATEST_FILE).exists():
        raise ConfigError(f"{out} already holds a training run; continue it with --resume {out} or pick another --out")

    Backends.check(cfg.log_to)  # before anything slow
    env = setup_distributed(cfg.dist_timeout)
    try:
        if cfg.backend == "cpu" and env.device.type != "cpu":
            raise ConfigError(
                f"--backend cpu runs CPU tensors, and this run is on {env.device} (a CUDA device is visible): "
                "pick --backend auto, cuda, triton, compile or torch, or hide the GPU (CUDA_VISIBLE_DEVICES=)"
            )
        if cfg.global_rows is None:
            cfg = cfg.replace(global_rows=env.world_size)  # recorded in the run's config and checkpoints
        if cfg.global_rows % env.world_size:
            raise ConfigError(
                f"global_rows {cfg.global_rows} is not a multiple of the number of ranks ({env.world_size}); "
                "every rank takes the same number of rows per step"
            )
        warmup_warning = None
        if ckpt_path is None:  # resolved once: a resumed run, extended or not, keeps its warm-up
            warmup, warmup_warning = cfg.warmup()
            cfg = cfg.replace(warmup_steps=warmup, warmup_fraction=None)
        return _train(cfg, out, ckpt_path, env, warmup_warning)
    except (dist.DistError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if env.world_size == 1 or not (isinstance(e, dist.DistError) or _COMM_FAILURE.search(reason)):
            raise
        raise HrmError(
            f"rank {env.rank} of {env.world_size}: lost contact with the other ranks ({reason}); another rank "
            f"failed (see its output) or stalled for longer than --dist-timeout {cfg.dist_timeout} s"
        ) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _restore(
    path: Path, model: HRMText, optimizer: AdamAtan2, ema: EMA, loader: PackedLoader, env: Dist
) -> tuple[int, _Window]:
    """Load a training checkpoint into the run's objects (after :func:`parallelize`); returns
    ``(step, metric window)``. A sharded checkpoint loads into any world size and wrapping; a
    single-process one is loaded whole on every rank and, under FSDP, sharded. A damaged or
    missing training state is a :class:`CheckpointError`."""
    saved_model_cfg, meta = read_config(path)
    if meta.get("sharded") and not is_sharded(path):
        raise CheckpointError(f"{path}: written sharded, but its {SHARDED_DIR}/ is missing; {_OTHER_CHECKPOINT}")
    if saved_model_cfg != model.config:
        field = next(k for k, v in model.config.to_dict().items() if saved_model_cfg.to_dict()[k] != v)
        raise ConfigError(
            f"cannot resume: model {field} is {getattr(model.config, field)!r} but the checkpoint "
            f"has {getattr(saved_model_cfg, field)!r}"
        )
    state = read_train_state(path, env.device)
    try:
        _apply_train_state(path, state, model, optimizer, ema, env)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        window = _Window(state["window"])
    except HrmError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and env.world_size > 1:
            raise  # may be a lost rank: train() names it
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path / TRAIN_STATE}: damaged training state ({reason}); {_OTHER_CHECKPOINT}") from e
    return int(meta["step"]), window


_OTHER_CHECKPOINT = "resume from an earlier checkpoint named in checkpoints/latest, or start anew with --init-from"
_TRAIN_STATE_KEYS = ("ema_updates", "loader", "window", "rng")


def read_train_state(path: Path, device: torch.device) -> dict[str, Any]:
    """``train_state.pt`` of checkpoint ``path``; missing, unreadable or incomplete is a
    :class:`CheckpointError` (one line)."""
    file = path / TRAIN_STATE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing, so the run cannot continue from it; {_OTHER_CHECKPOINT}")
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises many types (zip, pickle, OS, EOF) for damaged files
        raise CheckpointError(
            f"{file}: cannot read the training state (truncated or damaged: {type(e).__name__}); {_OTHER_CHECKPOINT}"
        ) from None
    keys = _TRAIN_STATE_KEYS if is_sharded(path) else (*_TRAIN_STATE_KEYS, "optimizer")
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a training state (no {', '.join(missing)}); {_OTHER_CHECKPOINT}")
    return state


def _apply_train_state(
    path: Path, state: dict[str, Any], model: HRMText, optimizer: AdamAtan2, ema: EMA, env: Dist
) -> None:
    """Model, optimizer and EMA of checkpoint ``path`` into the run's objects (see :func:`_restore`)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if is_sharded(path):
        optimizer.init_state()
        sharded = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "ema": ema.state_dict(),  # the averages themselves: loaded in place
        }
        load_sharded(path, sharded)
        set_model_state_dict(model, sharded["model"])
        set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
        ema.num_updates = state["ema_updates"]
    else:
        weights = load_state(path)
        check_state_dict(weights, model.state_dict(), str(path))
        if env.world_size == 1:
            model.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
        else:
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, weights, options=whole)
            optimizer.init_state()
            by_name = _optimizer_state_by_name(state["optimizer"], optimizer, model)
            set_optimizer_state_dict(model, optimizer, by_name, options=whole)
        ema.load_state_dict({k: v.to(env.device) for k, v in load_state(path, ema=True).items()}, state["ema_updates"])


def _train(
    cfg: TrainConfig, out: Path, ckpt_path: Path | None, env: Dist, warmup_warning: str | None
) -> dict[str, Any]:
    seed_everything(cfg.seed)
    # a resumed run reads the copy of its tokenizer in the checkpoint: it works from any directory
    tokenizer = load_checkpoint_tokenizer(ckpt_path, read_config(ckpt_path)[1]) if ckpt_path else None
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    tokenizer_file = None if tokenizer.spec == "byte" else Path(tokenizer.spec).read_bytes()
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    train_samples, heldout, described = load_samples(cfg, tokenizer, model_cfg.vocab_size)
    check_fits(train_samples, described, cfg.batch_tokens, cfg.too_long)
    loader = PackedLoader(
        train_samples,
        cfg.batch_tokens,
        seed=cfg.seed,
        pad_id=tokenizer.pad_id,
        num_rows=cfg.global_rows,
        too_long=cfg.too_long,
    )
    model = HRMText(model_cfg, backend=cfg.backend).to(env.device)
    initialised = ""
    if cfg.init_from is not None and ckpt_path is None:
        from hrm.training.init_from import init_weights

        weights, described_init = init_weights(cfg.init_from, model_cfg)
        model.load_state_dict(weights)
        initialised = f"; weights from {described_init}"
    precision = resolve_precision(cfg.precision, env.device)
    net = parallelize(model, env, cfg.parallel, precision)
    sharded_params = env.world_size > 1 and cfg.parallel == "fsdp"
    optimizer = AdamAtan2(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        backend=model.backend,
    )
    ema = EMA(model, cfg.ema_decay)
    start, window = 0, _Window()
    if ckpt_path is not None:
        start, window = _restore(ckpt_path, model, optimizer, ema, loader, env)
    # cumulative training FLOPs (hrm.flops), all ranks; None when resuming a checkpoint that lacks them
    flops = 0 if ckpt_path is None else read_config(ckpt_path)[1].get("train_flops")
    num_params = model.num_parameters()

    log = progress = lines = backends = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
        log = MetricsLog(out / "metrics.jsonl", keep_through=start)
        backends = Backends(cfg.log_to, out, cfg.to_dict(), start=start)
        parallel = f" ({cfg.parallel}, {cfg.global_rows // env.world_size} rows per rank)" if env.world_size > 1 else ""
        threads = f" ({torch.get_num_threads()} threads)" if env.device.type == "cpu" else ""
        print(
            f"hrm train: {cfg.preset} ({model.num_parameters() / 1e6:.2f}M parameters), {described}: "
            f"{loader.num_samples} samples in rows of {cfg.batch_tokens} tokens "
            f"({loader.packing_efficiency:.1%} full, {loader.stats.skipped_too_long} too long), "
            f"{cfg.global_rows} rows per step, {env.world_size} x {env.device.type}{threads}{parallel}, "
            f"backend {model.backend}"
            f", precision {precision}"
            + (" (chosen by auto)" if "auto" in (cfg.backend, cfg.precision) else "")
            + initialised
            + (f"; resuming after step {start}" if start else ""),
            file=sys.stderr,
        )
        if warmup_warning:
            print(f"hrm train: warning: {warmup_warning}", file=sys.stderr)
        progress = tqdm(total=cfg.steps, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True, disable=None)
        if progress.disable:  # not a terminal: plain lines instead of a bar
            lines = ProgressLines(cfg.steps, start, cfg.progress_every)

    checkpoints = out / CHECKPOINTS

    def save(step: int) -> None:
        """Every rank calls this: one process writes the single-file form, several a sharded one."""
        train_state = {
            "step": step,
            "ema_updates": ema.num_updates,
            "loader": loader.state_dict(),
            "window": window.sums,
            "rng": rng_state(),
        }
        meta = {
            "step": step,
            "tokenizer": "byte" if tokenizer_file is None else TOKENIZER_FILE,
            "task": cfg.task,
            "eval_data": cfg.eval_data and str(Path(cfg.eval_data).resolve()),  # what hrm eval falls back to
            "train_config": cfg.to_dict(),
            "train_flops": flops,
        }
        name = f"step_{step:08d}"

        def extra(tmp: Path) -> None:
            torch.save(train_state, tmp / TRAIN_STATE)
            if tokenizer_file is not None:
                (tmp / TOKENIZER_FILE).write_bytes(tokenizer_file)

        if env.world_size == 1:
            train_state["optimizer"] = optimizer.state_dict()
            save_checkpoint(
                checkpoints / name,
                model_cfg,
                model.state_dict(),
                ema_state_dict=ema.state_dict(),
                meta=meta,
                extra=extra,
                overwrite=True,
            )
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            optimizer.init_state()
            sharded = {
                "model": get_model_state_dict(model),
                "optimizer": get_optimizer_state_dict(model, optimizer),
                "ema": ema.state_dict(),
            }
            save_sharded(
                checkpoints / name,
                model_cfg,
                sharded,
                meta={**meta, "world_size": env.world_size, "parallel": cfg.parallel},
                extra=extra,
                is_main=env.is_main,
            )
        if env.is_main:
            write_latest(checkpoints, name)
            prune_checkpoints(checkpoints, cfg.keep_checkpoints)
        if env.world_size > 1:
            dist.barrier()

    def run_evaluation() -> dict[str, float]:
        """The EMA's held-out metrics, computed on rank 0 (every rank calls this; others get {})."""
        if not sharded_params:
            if not env.is_main:
                return {}
            with ema.swapped(model):
                return evaluate(
                    model, heldout, budget=cfg.batch_tokens, pad_id=tokenizer.pad_id, eos_id=tokenizer.eoa_id
                )
        averages = ema.full_state_dict()  # a collective: the whole EMA, on every rank
        if not env.is_main:
            return {}
        with torch.device("meta"):
            whole = HRMText(model_cfg, backend=cfg.backend)
        whole = whole.to_empty(device=env.device)
        whole.load_state_dict(averages)
        return evaluate(whole, heldout, budget=cfg.batch_tokens, pad_id=tokenizer.pad_id, eos_id=tokenizer.eoa_id)

    def stop(step: int, what: str) -> None:
        last = latest_checkpoint(out)
        raise HrmError(f"non-finite {what} at step {step}; last good checkpoint: {last or 'none (none written yet)'}")

    autocast = precision_autocast(precision, env.device)
    params = list(model.parameters())
    begin = timer = time.perf_counter()
    timer_tokens = 0
    record: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    # Kept on the device and read back only where a step logs, evaluates or saves (one host
    # read there, none in between: on a GPU each read waits for the queued work): the metric
    # sums and this rank's FLOPs since the last read, and the first step (from 1; 0: none yet)
    # whose loss, or gradient norm, was not finite.
    sums = torch.zeros(len(_Window.KEYS) + 1, dtype=torch.float64, device=env.device)  # + FLOPs
    first_bad = torch.zeros(2, dtype=torch.int64, device=env.device)
    for step in range(start, cfg.steps):
        done = step + 1
        mine = loader.next_step(env.rank, env.world_size)
        bp = bp_steps_at(model_cfg, step, cfg.steps)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # DDP and FSDP average the ranks' gradients: each rank's loss sums count world_size times
        divisor = max(mine.num_supervised, 1) / env.world_size
        step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, row in enumerate(mine.rows):
            batch = row.to(env.device, non_blocking=True)
            with sync_context(net, i == len(mine.rows) - 1):
                with autocast:
                    loss, m = net(**batch.model_inputs(), bp_steps=bp, loss_divisor=divisor)
                loss.backward()
            sums[:-1] += torch.stack([m[k].to(torch.float64) for k in _Window.KEYS])
            step_loss += loss.detach()
        sums[-1] += sum(train_step_flops(model_cfg, RowWork.of(row), bp).total for row in mine.rows)
        reduce_unsynced_grads(net, env.world_size)
        grad_norm, clip = clip_grad_norm(params, cfg.grad_clip or math.inf, model.backend)
        finite = torch.stack([step_loss.isfinite(), grad_norm.isfinite()])
        first_bad.copy_(torch.where((first_bad == 0) & ~finite, done, first_bad))
        with profiling.range("optimizer"):
            optimizer.step(ema=ema, grad_scale=clip)  # the clipping and the EMA update fused into its pass
            optimizer.zero_grad(set_to_none=True)

        logs = done % cfg.log_every == 0 or done == cfg.steps
        evaluates = heldout and (done == cfg.steps or cfg.eval_every and done % cfg.eval_every == 0)
        saves = done == cfg.steps or cfg.save_every and done % cfg.save_every == 0
        if env.is_main:
            timer_tokens += mine.num_tokens
        if not (logs or evaluates or saves):
            if env.is_main:
                progress.update()
            continue
        if env.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)  # a step that failed on any rank
        *values, step_flops = sums.tolist()
        bad_loss, bad_grad = first_bad.tolist()
        if bad_loss:
            stop(bad_loss, "loss")
        if bad_grad:
            stop(bad_grad, "gradient norm")
        sums.zero_()
        if flops is not None:
            flops += int(step_flops)

        if env.is_main:
            window.add(values)
            if logs:
                now = time.perf_counter()
                record = {
                    "step": done,
                    **window.summary(),
                    "lr": lr,
                    "bp_steps": bp,
                    "tokens_per_s": timer_tokens / (now - timer),
                    "tokens": timer_tokens,
                    "grad_norm": float(grad_norm),
                    "epoch": loader.epoch,
                    "flops": flops,
                    "params": num_params,
                }
                log.write(record)
                backends.write(record)
                if lines is not None:
                    lines.update(record)
                progress.set_postfix(
                    loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", bp=bp, refresh=False
                )
                window, timer, timer_tokens = _Window(), now, 0
            progress.update()
        if evaluates:
            last_eval = run_evaluation()
            if env.is_main:
                log.write({"step": done, **last_eval, "flops": flops})
                backends.write({"step": done, **last_eval})
                progress.write(
                    f"step {done}: held-out loss {last_eval['eval_loss']:.4f}, exact-match "
                    f"{last_eval['eval_exact_match']:.4f} (EMA)",
                    file=sys.stderr,
                )
        if saves:
            save(done)

    if not env.is_main:
        return {"rank": env.rank, "world_size": env.world_size}
    progress.close()
    log.close()
    backends.close()
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    return {
        **record,
        **last_eval,
        "checkpoint": str(latest_checkpoint(out)),
        "steps_run": cfg.steps - start,
        "seconds": time.perf_counter() - begin,
        "rank": env.rank,
        "world_size": env.world_size,
    }
