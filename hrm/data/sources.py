"""Readers that turn training files into :class:`~hrm.data.sample.Sample` lists.

Two formats:

* **JSONL**: one JSON object per line, ``{"instruction": str, "response": str}``; other
  keys are ignored and blank lines skipped. Texts are framed by the tokenizer
  (``encode_instruction`` / ``encode_response``).
* **Pre-tokenized** (the reference implementation's layout, written by its
  ``scripts/prepare_sft_data.py`` and read by its ``dataset_new.py``)::

      DIR/metadata.json   {"tokenizer_info": {..., "vocab_size": V}, "vocab_size": null,
                           "max_seq_len": C, "total_length": ...}
      DIR/tokens.npy      1-D int32: every sample's tokens, back to back
      DIR/epoch_K/inst_start.npy, inst_len.npy, resp_start.npy, resp_len.npy
                          1-D int64, one entry per sample, in epoch K's shuffled order

  Entry ``i`` of epoch ``K`` is ``instruction = tokens[inst_start[i] : inst_start[i] +
  inst_len[i]]`` and ``response = tokens[resp_start[i] : resp_start[i] + resp_len[i]]``,
  used as stored: the reference already framed them (the instruction is ``[boq, condition,
  ..., eoq]`` and the response ends with its ``eoa`` token). ``tokenizer_info.vocab_size``
  is the tokenizer's unpadded vocab size including added tokens. The layout stores no pad
  id (the reference pads inputs with id 0; padding is masked out anyway).

Readers never print: they return :class:`SourceStats` for the caller to report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrm.data.sample import Sample
from hrm.data.tokenizer import Tokenizer
from hrm.errors import DataError

_INDEX_FIELDS = ("inst_start", "inst_len", "resp_start", "resp_len")


@dataclass
class SourceStats:
    """Sample counts.

    ``read``: records read from the source (or samples given to a loader);
    ``skipped_empty_response``: dropped because the response was empty;
    ``skipped_too_long``: dropped because they do not fit a packed row;
    ``truncated``: kept with their response cut to fit a packed row.
    """

    read: int = 0
    skipped_empty_response: int = 0
    skipped_too_long: int = 0
    truncated: int = 0


# -- JSONL ------------------------------------------------------------------------------


def _json_column(e: json.JSONDecodeError) -> str:
    """Where on its line a JSON error is, as an editor counts (1-based characters)."""
    end = e.doc.find("\n", e.pos)
    if e.pos >= (len(e.doc) if end < 0 else end):
        return "at the end of the line"
    return f"at column {e.colno}"


def read_jsonl(path: str | Path, tokenizer: Tokenizer) -> tuple[list[Sample], SourceStats]:
    """Read ``{"instruction": ..., "response": ...}`` lines; see the module docstring.

    Raises :class:`DataError` (prefixed ``path:line:``) for invalid UTF-8, malformed JSON,
    a line that is not an object, a missing or non-string ``instruction`` / ``response``,
    and an empty instruction. Pairs with an empty response are skipped and counted.
    """
    stats = SourceStats()
    samples: list[Sample] = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}:"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where} invalid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # so that an error at the end of the line is not "line 2, column 1"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} malformed JSON: {e.msg} {_json_column(e)}") from None
            except RecursionError:
                raise DataError(f"{where} malformed JSON: nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} expected a JSON object, got {type(record).__name__}")
            for key in ("instruction", "response"):
                if key not in record:
                    raise DataError(f"{where} missing key {key!r}")
                if not isinstance(record[key], str):
                    raise DataError(f"{where} {key!r} must be a string, got {type(record[key]).__name__}")
            stats.read += 1
            if not record["instruction"]:
                raise DataError(f"{where} empty instruction")
            if not record["response"]:
                stats.skipped_empty_response += 1
                continue
            try:
                samples.append(
                    Sample(
                        tokenizer.encode_instruction(record["instruction"]),
                        tokenizer.encode_response(record["response"]),
                    )
                )
            except DataError as e:
                raise DataError(f"{where} {e}") from None
    return samples, stats


# -- pre-tokenized (reference layout) ---------------------------------------------------


def _load_json_object(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} {_json_column(e)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _metadata_vocab_size(meta: dict, path: Path) -> int:
    info = meta.get("tokenizer_info") or {}
    vocab = info.get("vocab_size") if isinstance(info, dict) else None
    if vocab is None:
        vocab = meta.get("vocab_size")
    if vocab is None:
        raise DataError(f"{path}: no tokenizer_info.vocab_size; pass vocab_size explicitly")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise DataError(f"{path}: vocab_size must be a positive integer, got {vocab!r}")
    return vocab


def _load_int_array(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy array: {e}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def read_pretokenized(
    directory: str | Path, epoch: int = 0, vocab_size: int | None = None
) -> tuple[list[Sample], SourceStats]:
    """Read epoch ``epoch`` of a dataset in the reference's pre-tokenized layout.

    Samples come back in that epoch's stored order, mapped as described in the module
    docstring. ``vocab_size`` defaults to ``metadata.json``'s ``tokenizer_info.vocab_size``;
    a token id outside ``[0, vocab_size)`` raises :class:`DataError` naming ``tokens.npy``
    and the entry. Entries with ``resp_len == 0`` are skipped and counted.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: pre-tokenized dataset directory not found")
    meta_path = root / "metadata.json"
    meta = _load_json_object(meta_path)
    if vocab_size is None:
        vocab_size = _metadata_vocab_size(meta, meta_path)
    tokens_path = root / "tokens.npy"
    tokens = _load_int_array(tokens_path)

    epoch_dir = root / f"epoch_{epoch}"
    if not epoch_dir.is_dir():
        have = sorted((p.name for p in root.glob("epoch_*") if p.is_dir()), key=lambda name: (len(name), name))
        raise DataError(f"{epoch_dir}: epoch directory not found (have: {', '.join(have) or 'none'})")
    index = {name: _load_int_array(epoch_dir / f"{name}.npy").astype(np.int64) for name in _INDEX_FIELDS}
    n = len(index["inst_start"])
    for name, arr in index.items():
        if len(arr) != n:
            raise DataError(f"{epoch_dir / (name + '.npy')}: has {len(arr)} entries, inst_start.npy has {n}")

    bad_ids = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    for part in ("inst", "resp"):
        start, length = index[f"{part}_start"], index[f"{part}_len"]
        problems = [
            ("negative length", length < 0),
            (f"span outside tokens.npy ({len(tokens)} tokens)", (start < 0) | (start + length > len(tokens))),
        ]
        if part == "inst":
            problems.append(("empty instruction", length == 0))
        for what, mask in problems:
            if mask.any():
                i = int(np.argmax(mask))
                raise DataError(
                    f"{epoch_dir}/{part}_{{start,len}}.npy: entry {i}: {what} (start {start[i]}, len {length[i]})"
                )
        hits = np.searchsorted(bad_ids, start + length) - np.searchsorted(bad_ids, start)
        if hits.any():
            i = int(np.argmax(hits > 0))
            pos = int(bad_ids[np.searchsorted(bad_ids, start[i])])
            raise DataError(
                f"{tokens_path}: entry {i} of {epoch_dir.name} ({part}) has token id "
                f"{int(tokens[pos])} at position {pos}, outside the vocab [0, {vocab_size})"
            )

    stats = SourceStats(read=n)
    samples: list[Sample] = []
    for i in range(n):
        if index["resp_len"][i] == 0:
            stats.skipped_empty_response += 1
            continue
        s, l = index["inst_start"][i], index["inst_len"][i]
        rs, rl = index["resp_start"][i], index["resp_len"][i]
        samples.append(Sample(tokens[s : s + l].tolist(), tokens[rs : rs + rl].tolist()))
    return samples, stats
