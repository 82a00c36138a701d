"""Training data: tokenizers, sources (JSONL, the reference's pre-tokenized layout, the
built-in synthetic tasks) and packing into fixed-size PrefixLM rows.

Typical use::

    tok = load_tokenizer("byte")
    samples, stats = read_jsonl("train.jsonl", tok)        # or task_samples(...)
    loader = PackedLoader(samples, budget=2048, seed=0, pad_id=tok.pad_id, num_rows=8)
    for step in loader:                                     # endless: 8 PackedBatch rows a step
        ...
    mine = loader.next_step(rank, world_size)               # or: this rank's rows of the next step
"""

from hrm.data.packing import (
    IGNORE_INDEX,
    PackedBatch,
    PackedLoader,
    RankStep,
    fit_to_budget,
    multipack,
    pack_row,
    split_balance,
    split_rows,
)
from hrm.data.sample import Sample, encode_pair
from hrm.data.sources import SourceStats, read_jsonl, read_pretokenized
from hrm.data.tasks import SPLITS, TASKS, Task, is_heldout, make_task, task_samples
from hrm.data.tokenizer import HF_SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackedBatch",
    "PackedLoader",
    "RankStep",
    "fit_to_budget",
    "multipack",
    "pack_row",
    "split_balance",
    "split_rows",
    "Sample",
    "encode_pair",
    "SourceStats",
    "read_jsonl",
    "read_pretokenized",
    "SPLITS",
    "TASKS",
    "Task",
    "is_heldout",
    "make_task",
    "task_samples",
    "HF_SPECIAL_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
]
