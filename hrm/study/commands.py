"""``hrm compare``: argument parsing and wiring only (the study is :mod:`hrm.study.compare`)."""

from __future__ import annotations

import argparse
import sys

from hrm.config import ARCHS, PRESETS
from hrm.data import TASKS
from hrm.training.config import parse_override


def register(subparsers: argparse._SubParsersAction) -> None:
    from hrm.study.compare import StudySpec

    d = StudySpec(task="add", budget_flops=1.0)
    p = subparsers.add_parser(
        "compare",
        help="train architectures at matched parameters and FLOPs; table and plot of exact match vs FLOPs",
        description="Train every --archs architecture with matched parameter counts and the same budget of "
        "training FLOPs, --seeds seeds each, evaluating held-out exact match along the way; write a table "
        "(results.md, results.json) and a plot (exact_match_vs_flops.png) into --out. Each run is an "
        "ordinary `hrm train` run in OUT/runs/ARCH-seedS; rerunning the same command skips finished runs "
        "and resumes a partial one from its latest checkpoint.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="built-in task, e.g. chain")
    p.add_argument("--budget-flops", type=float, required=True, metavar="F", help="training FLOPs per run, e.g. 3e12")
    p.add_argument("--archs", nargs="+", default=list(d.archs), choices=ARCHS, help="(default: all)")
    p.add_argument("--seeds", type=int, default=d.seeds, metavar="N", help=f"seeds 0..N-1 (default: {d.seeds})")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (resumable)")
    p.add_argument("--preset", default=d.preset, choices=list(PRESETS), help=f"base model (default: {d.preset})")
    p.add_argument(
        "--override",
        dest="model_overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ModelConfig field over the preset for every architecture (repeatable)",
    )
    p.add_argument(
        "--batch-tokens", type=int, default=d.batch_tokens, help=f"tokens per packed row (default: {d.batch_tokens})"
    )
    p.add_argument(
        "--train-samples",
        type=int,
        default=d.train_samples,
        help=f"samples drawn from the task (default: {d.train_samples})",
    )
    p.add_argument("--evals", type=int, default=d.evals, help=f"held-out evaluations per run (default: {d.evals})")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=d.eval_samples,
        help=f"held-out samples per evaluation (default: {d.eval_samples})",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="kernel backend of every run, e.g. auto on a GPU (not part of the study's settings; default: hrm train's)",
    )
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from hrm.study.compare import StudySpec, run_study
    from hrm.study.report import PLOT, TABLE_MD, write_report

    spec = StudySpec(
        task=args.task,
        budget_flops=args.budget_flops,
        archs=tuple(args.archs),
        seeds=args.seeds,
        preset=args.preset,
        model_overrides=dict(parse_override(text) for text in args.model_overrides),
        batch_tokens=args.batch_tokens,
        train_samples=args.train_samples,
        evals=args.evals,
        eval_samples=args.eval_samples,
    )
    runs = []
    for run, what in run_study(spec, args.out, backend=args.backend):
        print(f"{run['name']}: {what} ({run['steps']} steps, {run['flops']:.3g} FLOPs)", file=sys.stderr)
        runs.append(run)
    table = write_report(args.out, spec, runs)
    print(table, end="")
    print(f"table: {args.out}/{TABLE_MD}; plot: {args.out}/{PLOT}")
    return 0
