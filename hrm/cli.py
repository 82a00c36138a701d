"""The ``hrm`` command line (also ``python -m hrm``).

Each feature area adds its own subcommands through a ``register(subparsers)`` function
(``hrm.training.commands``, ``hrm.inference_commands``, ``hrm.interop.commands``,
``hrm.bench.commands``, ``hrm.doctor.commands``, ``hrm.tuning.commands``,
``hrm.study.commands``);
this module only wires them and turns user errors (:class:`~hrm.errors.HrmError`) into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from hrm.errors import HrmError

_COMMAND_MODULES = (
    "hrm.training.commands",
    "hrm.inference_commands",
    "hrm.interop.commands",
    "hrm.bench.commands",
    "hrm.doctor.commands",
    "hrm.tuning.commands",
    "hrm.study.commands",
)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default
    or there is none to show (``None``, a flag that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if (
            "default" in help
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction)
        ):
            return help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{help} (default: {shown})"


class _Parser(argparse.ArgumentParser):
    """Every subcommand's parser shows option defaults (:class:`DefaultsHelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="hrm", description="Train, run and convert HRM-Text models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log which backends and settings are used")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from hrm.heap import retain_freed_memory

    retain_freed_memory()  # every command: freed buffers stay for the next step (hrm.heap)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except HrmError as e:
        print(f"hrm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hrm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
