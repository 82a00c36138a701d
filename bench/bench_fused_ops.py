"""The fused ops and the train step on this machine, each backend next to the ``torch``
reference measured in the same run: a thin entry point over :mod:`hrm.bench` (the same as
``hrm bench``, whose suites this script's logic now lives in).

    python bench/bench_fused_ops.py [--suite ops|train|all] [--backends torch,compile,...] [--quick]
                                    [--config bench] [--reps N] [--out DIR]

Results go to ``DIR/<device-slug>.json``, ``.md`` and ``.png`` (default ``bench/results``
next to this file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hrm.bench.run import run_bench
from hrm.config import BENCH_CONFIGS


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=["ops", "train", "all"], default="all")
    parser.add_argument(
        "--backends",
        help="comma-separated subset (default: every available backend, and torch+compile for the train step)",
    )
    parser.add_argument("--config", default="bench", choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--quick", action="store_true", help="smaller op shapes, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b] if args.backends else None
    paths = run_bench(args.suite, config=args.config, quick=args.quick, out=args.out, reps=args.reps, backends=backends)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
