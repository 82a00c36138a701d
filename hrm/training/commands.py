"""``hrm train``: argument parsing and wiring only (the loop is :func:`hrm.training.loop.train`).

Every option maps to a :class:`~hrm.training.config.TrainConfig` field. Options are
``None`` unless given, so that ``--resume DIR`` can start from the run's saved config and
apply only what the command line states (a changed setting that a resumed run may not
change is an error naming it). ``--config FILE`` (TOML, or YAML with PyYAML installed) gives
the same fields as a file; flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from hrm.config import ARCHS, PRESETS
from hrm.data import TASKS
from hrm.errors import ConfigError
from hrm.ops.dispatch import BACKENDS
from hrm.precision import PRECISIONS
from hrm.training.config import DEFAULT_TASK, LOGGERS, TrainConfig, parse_override

_DEFAULTS = TrainConfig()
_SOURCES = ("task", "data", "pretokenized")


def _option(parser: argparse._ActionGroup, field: str, help: str, **kwargs: Any) -> None:
    """``--field-name`` for TrainConfig ``field``; the help shows the dataclass default."""
    default = getattr(_DEFAULTS, field)
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    shown = "none" if shown is None or shown == "" else shown
    parser.add_argument(
        "--" + field.replace("_", "-"), dest=field, default=None, help=f"{help} (default: {shown})", **kwargs
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (single process or under torchrun)",
        description="Train an HRM-Text model. Writes metrics.jsonl, metrics.png and checkpoints to --out; "
        "the last line printed is the held-out exact match. Under torchrun the ranks share each step's "
        "--global-rows rows (DDP or FSDP2, see --parallel).",
    )
    p.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="read the run's settings from a TOML (or, with PyYAML installed, YAML) file whose keys are these "
        "options' names (preset = 'tiny', batch_tokens = 256, override = ['hidden_size=128']); flags given too "
        "override it",
    )
    model = p.add_argument_group("model")
    _option(model, "preset", f"model size: {', '.join(PRESETS)}")
    model.add_argument(
        "--override",
        dest="model_overrides",
        action="append",
        metavar="FIELD=VALUE",
        help="set a ModelConfig field over the preset, e.g. hidden_size=128 (repeatable)",
    )
    model.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="hrm; transformer (its one stack called once); ut (its one stack looped as often as HRM calls "
        "its stacks); same as --override arch=NAME (default: the preset's, hrm)",
    )
    _option(model, "tokenizer", "'byte' or a path to a tokenizer.json")
    _option(model, "backend", f"kernel backend: auto, {', '.join(BACKENDS)} (auto: the first that runs here)")
    _option(
        model,
        "init_from",
        "start from these weights with a fresh optimizer (fine-tuning): a checkpoint or run directory, a "
        "transformers export, or a reference state dict file (.safetensors/.pt); the tokenizer defaults to theirs",
        metavar="PATH",
    )

    data = p.add_argument_group("data (one source; the default is the task " + DEFAULT_TASK + ")")
    _option(data, "task", f"built-in task: {', '.join(TASKS)}")
    _option(data, "data", 'JSONL file of {"instruction", "response"} objects', metavar="FILE")
    _option(data, "pretokenized", "directory in the reference's pre-tokenized layout", metavar="DIR")
    _option(
        data,
        "eval_data",
        "held-out JSONL file or pre-tokenized directory (a task uses its held-out split)",
        metavar="PATH",
    )
    _option(data, "train_samples", "samples drawn from a task", type=int)
    _option(data, "too_long", "what to do with a sample longer than a row", choices=["skip", "truncate"])

    opt = p.add_argument_group("optimisation")
    _option(opt, "steps", "optimizer steps", type=int)
    _option(opt, "batch_tokens", "tokens per packed row", type=int)
    _option(
        opt,
        "global_rows",
        "packed rows per optimizer step over all ranks, a multiple of the number of ranks; each rank "
        "accumulates gradients over its share; none means one row per rank",
        type=int,
        metavar="N",
    )
    _option(opt, "lr", "peak learning rate", type=float)
    _option(opt, "min_lr_ratio", "final learning rate as a fraction of --lr (cosine decay)", type=float)
    _option(
        opt,
        "warmup_steps",
        "linear learning-rate warm-up steps; one that would take the whole run is cut to 10%% of it, with a warning",
        type=int,
    )
    _option(
        opt,
        "warmup_fraction",
        "warm-up as a fraction of --steps instead, e.g. 0.05",
        type=float,
        metavar="F",
    )
    _option(opt, "weight_decay", "decoupled weight decay on matrices", type=float)
    _option(opt, "betas", "Adam-atan2 betas", type=float, nargs=2, metavar=("B1", "B2"))
    _option(opt, "ema_decay", "parameter EMA decay (evaluation and export use the EMA)", type=float)
    _option(opt, "grad_clip", "max gradient norm (0: no clipping)", type=float)
    _option(
        opt,
        "precision",
        "fp32, bf16 autocast with fp32 master weights, or auto (bf16 on GPUs with bf16 tensor cores and on "
        "CPUs with AMX-BF16, fp32 elsewhere)",
        choices=list(PRECISIONS),
    )
    _option(opt, "seed", "seed for initialisation, task data and data order", type=int)

    par = p.add_argument_group("data parallel (under torchrun)")
    _option(par, "parallel", "ddp (replicated model) or fsdp (FSDP2, sharded parameters)", choices=["ddp", "fsdp"])
    _option(par, "dist_timeout", "seconds a rank waits for the others before the job fails", type=int, metavar="S")

    run = p.add_argument_group("run")
    _option(run, "out", "output directory", metavar="DIR")
    _option(run, "log_every", "write a metrics line every N steps", type=int, metavar="N")
    _option(run, "eval_every", "evaluate on held-out data every N steps (0: only at the end)", type=int, metavar="N")
    _option(run, "eval_samples", "held-out samples per evaluation", type=int, metavar="N")
    _option(run, "save_every", "checkpoint every N steps (0: only at the end)", type=int, metavar="N")
    _option(run, "keep_checkpoints", "keep the newest N checkpoints, delete older ones", type=int, metavar="N")
    _option(
        run,
        "log_to",
        "also log metrics to these backends (each optional, installed separately: pip install tensorboard / "
        "wandb); metrics.jsonl is always written",
        nargs="+",
        choices=LOGGERS,
    )
    _option(
        run,
        "progress_every",
        "when stderr is not a terminal (nohup, SLURM, CI): seconds between plain progress lines, printed at "
        "logged steps (0: every logged step)",
        type=float,
        metavar="S",
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the run in DIR from its latest checkpoint (default: start a new run)",
    )
    p.set_defaults(func=run_train)

    presets = subparsers.add_parser(
        "presets",
        help="list the model presets with their sizes",
        description="The named model sizes hrm train --preset takes, with their shapes and parameter counts "
        "(at the preset's vocabulary; the byte tokenizer's is 260).",
    )
    presets.set_defaults(func=run_presets)

    c = subparsers.add_parser(
        "consolidate",
        help="turn a sharded (torchrun) checkpoint into a single-file one for generate and export-hf",
        description="Read a sharded checkpoint (or a run directory's latest) in one process and write its model "
        "and EMA weights as a single-file checkpoint directory.",
    )
    c.add_argument("checkpoint", metavar="CHECKPOINT", help="a sharded checkpoint, or a training run directory")
    c.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
    c.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    c.set_defaults(func=run_consolidate)

    b = subparsers.add_parser(
        "pack-balance",
        help="how evenly the packed global batch splits over data-parallel ranks",
        description="Plan steps of --global-rows rows of --batch-tokens tokens and report, per world size, the "
        "busiest rank's tokens and attention work (sum of squared lengths) over the mean rank's. Lengths come from "
        "--data (byte tokenizer) or a log-normal distribution.",
    )
    b.add_argument("--data", metavar="FILE", help='JSONL file of {"instruction", "response"} objects')
    b.add_argument(
        "--lognormal",
        type=float,
        nargs=2,
        default=(300.0, 0.9),
        metavar=("MEDIAN", "SIGMA"),
        help="without --data: sample lengths log-normal with this median and sigma (default: 300 0.9)",
    )
    b.add_argument("--samples", type=int, default=40_000, help="log-normal sample count (default: 40000)")
    b.add_argument("--batch-tokens", type=int, default=4096, help="tokens per packed row (default: 4096)")
    b.add_argument("--global-rows", type=int, default=16, help="rows per step (default: 16)")
    b.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8, 16], help="(default: 2 4 8 16)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_pack_balance)


def read_config_file(path: str) -> dict[str, Any]:
    """The TrainConfig fields a ``--config`` file sets (keys as the flags' names, ``-`` or ``_``;
    ``override`` a list of ``FIELD=VALUE`` or a table)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: a YAML config needs PyYAML (pip install pyyaml), or write it as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
    elif file.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(f"{path}: reading TOML on Python 3.10 needs tomli (pip install tomli)") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: malformed TOML: {e}") from None
    else:
        raise ConfigError(f"{path}: a config file is .toml (or .yaml / .yml with PyYAML installed)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if "override" in data:
        data["model_overrides"] = data.pop("override")
    if isinstance(data.get("model_overrides"), list):
        data["model_overrides"] = dict(parse_override(str(text)) for text in data["model_overrides"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; see hrm train --help")
    return data


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments describe: the ``--config`` file's settings, the flags over
    them (on ``--resume``: the saved config, updated with both)."""
    from hrm.training.loop import resume_config

    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    if "model_overrides" in flags:
        flags["model_overrides"] = dict(parse_override(text) for text in flags["model_overrides"])
    if getattr(args, "arch", None) is not None:
        flags["model_overrides"] = {**flags.get("model_overrides", {}), "arch": args.arch}
    config_file = getattr(args, "config_file", None)
    given = read_config_file(config_file) if config_file else {}
    if any(k in flags for k in _SOURCES):  # a source flag replaces the file's source
        given = {k: v for k, v in given.items() if k not in _SOURCES}
    if "warmup_steps" in flags or "warmup_fraction" in flags:  # so does a warm-up flag
        given = {k: v for k, v in given.items() if k not in ("warmup_steps", "warmup_fraction")}
    if "model_overrides" in flags:  # model overrides add up, the flags' last
        flags["model_overrides"] = {**given.get("model_overrides", {}), **flags["model_overrides"]}
    given.update(flags)
    if given.get("warmup_fraction") is not None and given.get("warmup_steps") is not None:
        raise ConfigError("give the warm-up as --warmup-steps or --warmup-fraction, not both")
    if "warmup_steps" in given:
        given["warmup_fraction"] = None
    if any(k in given for k in _SOURCES):
        given.update({k: None for k in _SOURCES if k not in given})
    if args.resume is None:
        if "init_from" in given and "tokenizer" not in given:
            from hrm.training.init_from import init_tokenizer

            given["tokenizer"] = init_tokenizer(given["init_from"]) or _DEFAULTS.tokenizer
        return TrainConfig(**given)
    given.setdefault("out", args.resume)
    return resume_config(args.resume).replace(**given)


def run_train(args: argparse.Namespace) -> int:
    from hrm.training.loop import train

    cfg = build_config(args)
    result = train(cfg, resume=args.resume)
    if result["rank"] == 0:
        print(
            f"ran {result['steps_run']} steps in {result['seconds']:.0f} s; final loss {result['loss']:.4f}, "
            f"token accuracy {result['accuracy']:.4f}; checkpoint {result['checkpoint']}; metrics and plot in "
            f"{cfg.out}"
        )
        if "eval_exact_match" in result:
            print(f"held-out exact-match: {result['eval_exact_match']:.4f}")
        else:
            print("held-out exact-match: n/a (no held-out data; pass --eval-data)")
    if result["world_size"] > 1:
        # gloo can abort in its teardown at interpreter exit; the process group is already destroyed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def run_presets(args: argparse.Namespace) -> int:
    import torch

    from hrm.model import HRMText

    print("preset  layers (H+L)  hidden  heads x dim  FFN    vocab   max seq  parameters")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            params = HRMText(cfg).num_parameters()
        half = cfg.n_layers // 2 if cfg.arch == "hrm" else cfg.n_layers
        layers = f"{cfg.n_layers} ({half}+{cfg.n_layers - half})" if cfg.arch == "hrm" else str(cfg.n_layers)
        size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
        print(
            f"{name:6s}  {layers:12s}  {cfg.hidden_size:6d}  {cfg.num_heads:>3d} x {cfg.head_dim:<4d}  "
            f"{cfg.intermediate_size:<5d}  {cfg.vocab_size:<6d}  {cfg.max_seq_len:<7d}  {size}"
        )
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    from hrm.checkpoint import consolidate

    out = consolidate(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (model and EMA weights; hrm generate / export-hf read it)")
    return 0


def run_pack_balance(args: argparse.Namespace) -> int:
    import numpy as np

    from hrm.data import ByteTokenizer, read_jsonl, split_balance
    from hrm.errors import ConfigError

    rng = np.random.default_rng(args.seed)
    if args.data is not None:
        samples, _ = read_jsonl(args.data, ByteTokenizer())
        lengths = np.array([s.packed_len for s in samples], dtype=np.int64)
        lengths = lengths[lengths <= args.batch_tokens]
        source = f"{args.data}: {len(lengths)} samples that fit"
    else:
        median, sigma = args.lognormal
        lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, args.samples)), 2, args.batch_tokens)
        source = (
            f"{args.samples} log-normal lengths (median {median:g}, sigma {sigma:g}, clipped to 2..{args.batch_tokens})"
        )
    lengths = rng.permutation(lengths.astype(np.int64))
    bad = [w for w in args.world_sizes if w < 1 or args.global_rows % w]
    if bad:
        raise ConfigError(f"--global-rows {args.global_rows} does not split evenly over {bad[0]} ranks")
    print(
        f"{source}; mean {lengths.mean():.0f}, p99 {np.percentile(lengths, 99):.0f} tokens; "
        f"{args.global_rows} rows of {args.batch_tokens} tokens per step"
    )
    print("ranks  rows/rank  steps  fill    tokens max/mean (mean, worst)  attention work max/mean (mean, worst)")
    for world in args.world_sizes:
        r = split_balance(lengths, args.batch_tokens, args.global_rows, world)
        print(
            f"{world:5d}  {args.global_rows // world:9d}  {r['steps']:5d}  {r['packing_efficiency']:.1%}  "
            f"{r['tokens_max_over_mean']:.4f}, {r['tokens_max_over_mean_worst']:.4f}"
            f"{'':17s}{r['work_max_over_mean']:.3f}, {r['work_max_over_mean_worst']:.3f}"
        )
    return 0
