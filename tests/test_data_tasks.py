"""The synthetic task suite: correct answers, determinism, disjoint splits, errors."""

import pytest

from hrm.data import TASKS, ByteTokenizer, encode_pair, is_heldout, make_task, task_samples
from hrm.errors import DataError


def answer(instruction: str) -> str:
    """An independent solver for every task's instruction format."""
    if instruction.startswith("reverse:"):
        return instruction[len("reverse:") :][::-1]
    if instruction.startswith("sort:"):
        return "".join(sorted(instruction[len("sort:") :]))
    if instruction.startswith("copy:"):
        return instruction[len("copy:") :]
    if instruction.startswith("chain:"):
        expr = instruction[len("chain:") :]
        value = int(expr[0])
        for op, digit in zip(expr[1::2], map(int, expr[2::2]), strict=True):
            value = {"+": value + digit, "-": value - digit, "*": value * digit}[op] % 10
        return str(value)
    if "*" in instruction:
        a, b = instruction.split("*")
        return str(int(a) * int(b))
    a, b = instruction.split("+")
    return str(int(a) + int(b))


def test_examples():
    assert answer("123+4567") == "4690"
    assert answer("chain:3+4*2-9") == "5" and answer("12*34") == "408"
    assert set(TASKS) >= {"add", "reverse", "sort"}


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_task_answers_and_sizes(name, split):
    pairs = make_task(name, 300, split, seed=3)
    assert len(pairs) == 300
    for instruction, response in pairs:
        assert response == answer(instruction)
        assert 1 <= len(instruction) <= 24 and response
        assert is_heldout(instruction) == (split == "heldout")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_seeded(name):
    assert make_task(name, 50, "train", seed=1) == make_task(name, 50, "train", seed=1)
    assert make_task(name, 50, "train", seed=1) != make_task(name, 50, "train", seed=2)
    assert make_task(name, 50, "train", seed=1) != make_task(name, 50, "heldout", seed=1)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_disjoint_from_train(name):
    train = {inst for inst, _ in make_task(name, 5000, "train", seed=0)}
    heldout = {inst for inst, _ in make_task(name, 500, "heldout", seed=0)}
    assert len(heldout) > 100
    assert not train & heldout


def test_difficulty_parameters():
    long_add = make_task("add", 200, "train", max_digits=6)
    assert max(len(a) for inst, _ in long_add for a in inst.split("+")) == 6
    assert max(len(inst) for inst, _ in make_task("sort", 200, "train", max_len=3)) == len("sort:") + 3


def test_task_samples():
    tok = ByteTokenizer()
    samples = task_samples("add", 20, "train", tok, seed=5)
    assert samples == [encode_pair(tok, i, r) for i, r in make_task("add", 20, "train", seed=5)]


def test_task_errors():
    with pytest.raises(DataError, match="unknown task 'div'; known tasks: add, reverse, sort, mul, chain"):
        make_task("div", 1, "train")
    with pytest.raises(DataError, match="unknown split 'test'"):
        make_task("add", 1, "test")
    with pytest.raises(DataError, match="has no parameter max_len; known: max_digits"):
        make_task("add", 1, "train", max_len=3)
    with pytest.raises(DataError, match="max_digits must be a positive integer"):
        make_task("add", 1, "train", max_digits=0)
    with pytest.raises(DataError, match="n must be a non-negative integer"):
        make_task("add", -1, "train")


def test_task_space_without_heldout_instructions(monkeypatch):
    monkeypatch.setattr("hrm.data.tasks.is_heldout", lambda instruction: False)
    assert len(make_task("sort", 5, "train", max_len=1)) == 5
    with pytest.raises(DataError, match="too few distinct instructions for a heldout split"):
        make_task("sort", 5, "heldout", max_len=1)
