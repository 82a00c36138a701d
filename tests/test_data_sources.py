"""JSONL and pre-tokenized readers: happy paths and every DataError case."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from hrm.data import ByteTokenizer, Sample, SourceStats, read_jsonl, read_pretokenized
from hrm.errors import DataError

FIXTURE = Path(__file__).parent / "fixtures" / "pretok_small"
BOQ, EOQ, EOA, DIRECT = 256, 257, 258, 259  # the fixture's special ids (see make_fixture.py)


def write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return path


# -- JSONL ------------------------------------------------------------------------------


def test_jsonl_reads_and_skips(tmp_path):
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            '\ufeff{"instruction": "1+1", "response": "2", "condition": "direct"}',
            "",
            "   ",
            '{"instruction": "no answer", "response": ""}',
            '{"response": "ok", "instruction": "héllo"}',
        ],
    )
    samples, stats = read_jsonl(path, ByteTokenizer())
    assert samples == [
        Sample([257, 49, 43, 49, 258], [50, 259]),
        Sample([257, *"héllo".encode(), 258], [111, 107, 259]),
    ]
    assert stats == SourceStats(read=3, skipped_empty_response=1)


def test_jsonl_empty_file(tmp_path):
    assert read_jsonl(write_lines(tmp_path / "e.jsonl", []), ByteTokenizer()) == ([], SourceStats())


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"instruction": "a", "response": ', "malformed JSON"),
        ('["instruction", "response"]', "expected a JSON object, got list"),
        ('{"instruction": "a"}', "missing key 'response'"),
        ('{"response": "a"}', "missing key 'instruction'"),
        ('{"instruction": 3, "response": "a"}', "'instruction' must be a string, got int"),
        ('{"instruction": "a", "response": null}', "'response' must be a string, got NoneType"),
        ('{"instruction": "", "response": "a"}', "empty instruction"),
        ('{"instruction": "a\\ud800", "response": "b"}', "not encodable as UTF-8"),
        (b'{"instruction": "\xff", "response": "b"}\n', "invalid UTF-8"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"instruction": "ok", "response": "ok"}', line])
    with pytest.raises(DataError, match=message) as info:
        read_jsonl(path, ByteTokenizer())
    assert str(info.value).startswith(f"{path}:2: ")
    assert "\n" not in str(info.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl", ByteTokenizer())
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path, ByteTokenizer())


# -- pre-tokenized ----------------------------------------------------------------------


def fixture_sample(inst: str, resp: str) -> Sample:
    return Sample([BOQ, DIRECT, *inst.encode(), EOQ], [*resp.encode(), EOA])


PAIRS = [
    fixture_sample("2+2?", "4"),
    fixture_sample("Capital of France?", "Paris"),
    fixture_sample("Hi", "Hello there"),
    fixture_sample("sort:312", "123"),
]


def test_pretokenized_fixture():
    samples, stats = read_pretokenized(FIXTURE)
    assert samples == [PAIRS[i] for i in (0, 3, 2, 1)]  # epoch_0's stored order
    assert stats == SourceStats(read=4)
    samples, _ = read_pretokenized(FIXTURE, epoch=1, vocab_size=300)
    assert samples == [PAIRS[i] for i in (2, 3, 0, 1)]


def test_pretokenized_fixture_is_reproducible(tmp_path):
    runpy.run_path(str(FIXTURE / "make_fixture.py"))["write"](tmp_path)
    for path in FIXTURE.rglob("*"):
        if path.is_file() and path.suffix in (".npy", ".json"):
            assert (tmp_path / path.relative_to(FIXTURE)).read_bytes() == path.read_bytes(), path


@pytest.fixture
def pretok_copy(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(FIXTURE, target)
    return target


def test_pretokenized_bad_token_id(pretok_copy):
    tokens = np.load(pretok_copy / "tokens.npy")
    tokens[37] = 260  # inside "Hi" (sample 2), which is entry 2 of epoch_0
    np.save(pretok_copy / "tokens.npy", tokens)
    with pytest.raises(
        DataError,
        match=r"tokens\.npy: entry 2 of epoch_0 \(inst\) has token id 260 "
        r"at position 37, outside the vocab \[0, 260\)",
    ):
        read_pretokenized(pretok_copy)
    assert read_pretokenized(pretok_copy, vocab_size=261)[0][2].instruction[1] == 260
    tokens[37] = -1
    np.save(pretok_copy / "tokens.npy", tokens)
    with pytest.raises(DataError, match="entry 2 of epoch_0 .* token id -1"):
        read_pretokenized(pretok_copy, vocab_size=261)


def test_pretokenized_bad_response_id(pretok_copy):
    tokens = np.load(pretok_copy / "tokens.npy")
    tokens[tokens == EOA] = 999
    np.save(pretok_copy / "tokens.npy", tokens)
    with pytest.raises(DataError, match=r"entry 0 of epoch_0 \(resp\) has token id 999"):
        read_pretokenized(pretok_copy)


@pytest.mark.parametrize("missing", ["metadata.json", "tokens.npy", "epoch_0/resp_len.npy"])
def test_pretokenized_missing_files(pretok_copy, missing):
    (pretok_copy / missing).unlink()
    with pytest.raises(DataError, match=f"{missing}: file not found"):
        read_pretokenized(pretok_copy)


def test_pretokenized_bad_layout(pretok_copy, tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        read_pretokenized(tmp_path / "nope")
    with pytest.raises(DataError, match=r"epoch_7: epoch directory not found \(have: epoch_0, epoch_1\)"):
        read_pretokenized(pretok_copy, epoch=7)

    np.save(pretok_copy / "epoch_1/inst_len.npy", np.array([1, 2], dtype=np.int64))
    with pytest.raises(DataError, match="inst_len.npy: has 2 entries, inst_start.npy has 4"):
        read_pretokenized(pretok_copy, epoch=1)

    np.save(pretok_copy / "epoch_1/inst_len.npy", np.array([3, 0, 3, 3], dtype=np.int64))
    with pytest.raises(DataError, match=r"inst_\{start,len\}.npy: entry 1: empty instruction"):
        read_pretokenized(pretok_copy, epoch=1)

    np.save(pretok_copy / "epoch_1/inst_len.npy", np.array([3, 3, 3, 1000], dtype=np.int64))
    with pytest.raises(DataError, match="entry 3: span outside tokens.npy"):
        read_pretokenized(pretok_copy, epoch=1)

    np.save(pretok_copy / "epoch_1/inst_len.npy", np.array([[3]], dtype=np.int64))
    with pytest.raises(DataError, match="expected a 1-D integer array"):
        read_pretokenized(pretok_copy, epoch=1)

    (pretok_copy / "tokens.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable .npy array"):
        read_pretokenized(pretok_copy)

    meta = json.loads((pretok_copy / "metadata.json").read_text())
    del meta["tokenizer_info"]["vocab_size"]
    (pretok_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="no tokenizer_info.vocab_size"):
        read_pretokenized(pretok_copy)
    (pretok_copy / "metadata.json").write_text("[1]")
    with pytest.raises(DataError, match="metadata.json: expected a JSON object"):
        read_pretokenized(pretok_copy, vocab_size=260)


def test_pretokenized_skips_empty_response(pretok_copy):
    np.save(pretok_copy / "epoch_0/resp_len.npy", np.array([2, 0, 12, 6], dtype=np.int64))
    samples, stats = read_pretokenized(pretok_copy)
    assert samples == [PAIRS[i] for i in (0, 2, 1)]
    assert stats == SourceStats(read=4, skipped_empty_response=1)
