"""``hrm doctor``: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import sys

from hrm.doctor import SECTIONS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine: backends, op parity in every dtype, host reads, CUDA graphs, attention speed",
        description="Report the device, versions and kernel backends; check every op on every "
        "backend and dtype against the fp64 oracle; count a train step's host reads; "
        "capture it in a CUDA graph; check attention past 32-bit offsets; time attention "
        "against SDPA, FlexAttention and FlashAttention. Writes OUT/doctor.json and "
        "OUT/doctor.md and prints the markdown. Exit code 0: every check passed; 1: one "
        "failed (named at the end); 2: bad arguments.",
    )
    p.add_argument("--quick", action="store_true", help="small shapes (a few minutes on a 2-core CPU)")
    p.add_argument("--out", default="doctor", help="report directory (default: ./doctor)")
    p.add_argument("--backends", help="comma-separated subset of backends to check (default: all)")
    p.add_argument(
        "--sections",
        help=f"comma-separated subset of {', '.join(SECTIONS[1:])} (default: all; the device section always runs)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if a CUDA device is visible, else cpu)")
    p.add_argument(
        "--section-timeout",
        type=float,
        metavar="SECONDS",
        help="cap each section process's timeout (default: 120 to 600 s by section); the report is "
        "rewritten after every section, so an interrupted run keeps what finished",
    )
    p.set_defaults(func=run_doctor)


def _names(value: str | None) -> list[str] | None:
    return [n for n in value.split(",") if n] if value is not None else None


def run_doctor(args: argparse.Namespace) -> int:
    from hrm.doctor.run import run_doctor as run

    report, paths = run(
        device=args.device,
        quick=args.quick,
        out=args.out,
        backends=_names(args.backends),
        sections=_names(args.sections),
        section_timeout=args.section_timeout,
    )
    print(paths["md"].read_text())
    print(f"hrm doctor: wrote {paths['json']} and {paths['md']}")
    if report["failures"]:
        print(f"hrm doctor: {len(report['failures'])} check(s) failed:", file=sys.stderr)
        for line in report["failures"]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0
