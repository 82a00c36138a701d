"""The README's short examples run as written from an empty directory.

A ```` ```bash ```` block that follows a ``<!-- readme-test -->`` line is run: each of its
``hrm ...`` lines (continuation lines joined, ``#`` comments dropped), in README order, all in
one fresh directory, so a block may use what the blocks before it made (``runs/add``). To keep
each command to seconds, the flags in :data:`SHRINK` are appended to it (argparse takes the last
of a repeated flag, so the README's own values are overridden, not removed). Mark a block only
when its commands need nothing but the marked blocks before it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_env import ENV, ROOT

README = ROOT / "README.md"
MARKER = "<!-- readme-test -->"
# subcommand -> flags appended to keep it to seconds
SHRINK = {
    "train": ["--steps", "4", "--batch-tokens", "128", "--train-samples", "64", "--eval-samples", "4"],
    "eval": ["--samples", "4"],
    "bench": ["--suite", "ops", "--backends", "torch"],
    "profile": ["--steps", "1", "--preset", "tiny", "--tokens", "128"],
}


def marked_blocks(text: str) -> list[tuple[int, list[list[str]]]]:
    """``(line number, commands)`` of every marked block; a command is its argv after ``hrm``."""
    blocks = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert lines[i + 1].startswith("```"), f"README.md:{i + 1}: {MARKER} must come right before a code block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        body = re.sub(r"\\\n\s*", " ", "\n".join(lines[i + 2 : end]))
        commands = [shlex.split(ln, comments=True) for ln in body.splitlines()]
        commands = [argv[1:] for argv in commands if argv and argv[0] == "hrm"]
        assert commands, f"README.md:{i + 1}: a marked block without hrm commands"
        blocks.append((i + 1, commands))
    return blocks


BLOCKS = marked_blocks(README.read_text())


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory) -> Path:
    """One empty directory for every block, as after a fresh clone (no runs/, no data)."""
    return tmp_path_factory.mktemp("readme")


def test_the_readme_has_marked_blocks():
    assert len(BLOCKS) >= 2 and any(argv[0] == "train" for _, cmds in BLOCKS for argv in cmds)


@pytest.mark.slow
@pytest.mark.parametrize("line, commands", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(fresh_dir, line, commands):
    for argv in commands:
        full = [*argv, *SHRINK.get(argv[0], [])]
        result = subprocess.run(
            [sys.executable, "-m", "hrm", *full],
            cwd=fresh_dir,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, f"README.md:{line}: hrm {shlex.join(full)}\n{result.stderr[-3000:]}"
