"""Inputs of the named benchmark workloads (:data:`hrm.config.BENCH_CONFIGS`)."""

from __future__ import annotations

import math

import torch

from hrm.config import BenchConfig
from hrm.data import PackedBatch, Sample, pack_row


def train_batch(bench: BenchConfig, seed: int = 0) -> PackedBatch:
    """One packed row of ``bench.tokens`` random tokens: sequences of log-normal length
    around ``bench.median_seq_len`` (at least 2), each with a supervised response of
    ``supervised_fraction`` of its tokens, packed until the next one would overflow;
    the rest of the row is padding."""
    g = torch.Generator().manual_seed(seed)
    vocab = bench.model.vocab_size
    samples: list[Sample] = []
    used = 0
    while True:
        length = max(2, round(math.exp(math.log(bench.median_seq_len) + 0.5 * torch.randn(1, generator=g).item())))
        if used + length > bench.tokens:
            break
        response = max(1, round(bench.supervised_fraction * length))
        ids = torch.randint(0, vocab, (length + 1,), generator=g).tolist()
        samples.append(Sample(ids[: length + 1 - response], ids[length + 1 - response :]))
        used += length
    return pack_row(samples, bench.tokens, pad_id=0)
