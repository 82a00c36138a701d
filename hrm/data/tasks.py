"""The built-in synthetic instruction suite: small deterministic tasks for training out of the box.

Each task maps a random instance to ``(instruction text, response text)``, e.g.
``add``: ``"123+4567" -> "4690"``; ``mul``: ``"12*34" -> "408"``; ``chain``:
``"chain:3+4*2-9" -> "5"``; ``reverse``: ``"reverse:ab3" -> "3ba"``; ``sort``:
``"sort:3141" -> "1134"``; ``copy``: ``"copy:xy7" -> "xy7"``. Difficulty is set by keyword
parameters (``max_digits`` / ``max_len`` / ``max_terms``) whose defaults suit a tiny CPU
model (instructions of at most ~16 characters).

``chain`` (multi-step arithmetic: a digit, then up to ``max_terms - 1`` operations ``+d``,
``-d`` or ``*d`` applied left to right, mod 10) is there because it needs depth: each
operation depends on the result of all before it, so the answer is a composition of up to
five maps rather than something read off the prompt in one step. The ``tiny`` HRM, which
learns ``add`` to 100% in about 1500 steps, is at 31% held-out exact match after 600 steps
of ``chain`` (``mul``: 59%; ``hrm train --task chain --steps 600 --eval-every 300
--eval-samples 200``), so architectures have room to differ (see ``hrm compare``).

Splits: ``"train"`` and ``"heldout"`` draw from separate seeded streams, and every
instruction belongs to exactly one split by a hash of its text (about 1 in 10 is held
out), so no held-out instruction can ever appear in a train set, whatever ``n`` or seed.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Callable

from hrm.data.sample import Sample, encode_pair
from hrm.data.tokenizer import Tokenizer
from hrm.errors import DataError

SPLITS = ("train", "heldout")
_HELDOUT_BUCKETS = 10  # one hash bucket of this many is held out
_ALNUM = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Task:
    """A generator of ``(instruction, response)`` texts with tunable difficulty ``params``."""

    name: str
    description: str
    make: Callable[..., tuple[str, str]]  # make(rng, **params)
    params: dict[str, int] = field(default_factory=dict)


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _text(rng: random.Random, alphabet: str, max_len: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))


def _add(rng: random.Random, max_digits: int) -> tuple[str, str]:
    a, b = _number(rng, max_digits), _number(rng, max_digits)
    return f"{a}+{b}", str(a + b)


def _reverse(rng: random.Random, max_len: int) -> tuple[str, str]:
    s = _text(rng, _ALNUM, max_len)
    return f"reverse:{s}", s[::-1]


def _sort(rng: random.Random, max_len: int) -> tuple[str, str]:
    s = _text(rng, string.digits, max_len)
    return f"sort:{s}", "".join(sorted(s))


def _mul(rng: random.Random, max_digits: int) -> tuple[str, str]:
    a, b = _number(rng, max_digits), _number(rng, max_digits)
    return f"{a}*{b}", str(a * b)


def _chain(rng: random.Random, max_terms: int) -> tuple[str, str]:
    value = rng.randrange(10)
    text = str(value)
    for _ in range(rng.randint(1, max_terms - 1)):
        op, d = rng.choice("+-*"), rng.randrange(10)
        value = (value + d if op == "+" else value - d if op == "-" else value * d) % 10
        text += f"{op}{d}"
    return f"chain:{text}", str(value)


def _copy(rng: random.Random, max_len: int) -> tuple[str, str]:
    s = _text(rng, _ALNUM, max_len)
    return f"copy:{s}", s


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("add", "sum of two non-negative integers of 1..max_digits digits", _add, {"max_digits": 3}),
        Task("reverse", "reverse a string of 1..max_len letters and digits", _reverse, {"max_len": 8}),
        Task("sort", "sort a string of 1..max_len digits", _sort, {"max_len": 8}),
        Task("mul", "product of two non-negative integers of 1..max_digits digits", _mul, {"max_digits": 2}),
        Task("chain", "2..max_terms digits joined by + - *, evaluated left to right, mod 10", _chain, {"max_terms": 6}),
        Task("copy", "repeat a string of 1..max_len letters and digits", _copy, {"max_len": 8}),
    )
}


def is_heldout(instruction: str) -> bool:
    """Whether ``instruction`` belongs to the held-out split (a fixed hash partition)."""
    digest = hashlib.blake2b(instruction.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _HELDOUT_BUCKETS == 0


def make_task(name: str, n: int, split: str, seed: int = 0, **params: int) -> list[tuple[str, str]]:
    """``n`` deterministic ``(instruction, response)`` pairs of task ``name`` from ``split``.

    ``params`` override the task's difficulty defaults (see :data:`TASKS`). Pairs are drawn
    with replacement, so a small task space repeats instructions.
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    unknown = sorted(set(params) - set(task.params))
    if unknown:
        raise DataError(f"task {name!r} has no parameter {', '.join(unknown)}; known: {', '.join(task.params)}")
    settings = {**task.params, **params}
    for key, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"task {name!r}: {key} must be a positive integer, got {value!r}")
    if not isinstance(n, int) or n < 0:
        raise DataError(f"task {name!r}: n must be a non-negative integer, got {n!r}")

    rng = random.Random(f"hrm-task:{name}:{split}:{seed}")
    want_heldout = split == "heldout"
    pairs: list[tuple[str, str]] = []
    max_draws, draws = 1000 + 100 * n, 0
    while len(pairs) < n:
        if draws == max_draws:
            raise DataError(
                f"task {name!r} with {settings} has too few distinct instructions for a {split} split; make it harder"
            )
        draws += 1
        instruction, response = task.make(rng, **settings)
        if is_heldout(instruction) == want_heldout:
            pairs.append((instruction, response))
    return pairs


def task_samples(name: str, n: int, split: str, tokenizer: Tokenizer, seed: int = 0, **params: int) -> list[Sample]:
    """:func:`make_task` pairs encoded with :func:`~hrm.data.sample.encode_pair`."""
    return [encode_pair(tokenizer, inst, resp) for inst, resp in make_task(name, n, split, seed, **params)]
