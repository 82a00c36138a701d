"""Inputs of the named benchmark workloads (:data:`hrm.config.BENCH_CONFIGS`)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from hrm.config import BenchConfig
from hrm.data import PackedBatch, Sample, pack_row
from hrm.errors import ConfigError


def train_batch(bench: BenchConfig, seed: int = 0) -> PackedBatch:
    """One packed row of ``bench.tokens`` random tokens: sequences of log-normal length
    around ``bench.median_seq_len`` (at least 2), each with a supervised response of
    ``supervised_fraction`` of its tokens, packed until the next one would overflow;
    the rest of the row is padding. A first sequence longer than the row is cut to it (the
    row is then that one sequence), so a short row is never empty."""
    if bench.tokens < 1:
        raise ConfigError(f"a benchmark row needs at least 1 token, got {bench.tokens}")
    g = torch.Generator().manual_seed(seed)
    vocab = bench.model.vocab_size
    samples: list[Sample] = []
    used = 0
    while True:
        length = max(2, round(math.exp(math.log(bench.median_seq_len) + 0.5 * torch.randn(1, generator=g).item())))
        if used + length > bench.tokens:
            if samples:
                break
            length = bench.tokens
        response = max(1, round(bench.supervised_fraction * length))
        ids = torch.randint(0, vocab, (length + 1,), generator=g).tolist()
        samples.append(Sample(ids[: length + 1 - response], ids[length + 1 - response :]))
        used += length
    return pack_row(samples, bench.tokens, pad_id=0)


# -- the shipped SFT-like JSONL of the loop case -----------------------------------------------------

SFT_JSONL = Path(__file__).parent / "data" / "sft_lognormal.jsonl"
SFT_RECORDS = 512
_WORDS = (
    "the a model layer step token state cycle loop kernel norm query key value head block stack row batch "
    "packed prefix causal response question answer explain why how what when compute sum product number list "
    "train learn recurrent hidden slow fast input output gradient loss memory cache thread core vector matrix"
).split()


def sft_records(count: int = SFT_RECORDS, median_tokens: int = 270, seed: int = 0) -> list[dict[str, str]]:
    """``count`` instruction-response pairs of English-like word salad whose packed length under
    the byte tokenizer (``Sample.packed_len``: text bytes + 2 framing tokens) is log-normal
    around ``median_tokens`` (sigma 0.5, at least 8), half of it the response: the length mix of
    an SFT set, for timing the training loop on real JSONL. Deterministic in ``seed``; this is
    what :data:`SFT_JSONL` holds (``python -m hrm.bench.workloads`` rewrites it)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < n + 1:
            words.append(rng.choice(_WORDS))
        out = " ".join(words)[:n]
        return out[:-1] + "." if out.endswith(" ") else out

    records = []
    for _ in range(count):
        length = max(8, round(math.exp(math.log(median_tokens) + 0.5 * rng.gauss(0.0, 1.0))))
        response = max(2, round(0.5 * length))
        records.append({"instruction": text(length - response - 1), "response": text(response - 1)})
    return records


def write_sft_jsonl(path: Path = SFT_JSONL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_records()))


if __name__ == "__main__":
    write_sft_jsonl()
