"""Packing samples into fixed-size rows, and the endless training loader built on it.

Row format (one row of exactly ``budget`` tokens, see docs/design.md "Data and the training
objective"): sequences are laid out back to back from position 0. A sample
``(inst, resp)`` contributes

* inputs ``inst ++ resp[:-1]`` (``len(inst) + len(resp) - 1`` tokens),
* labels ``[-100] * (len(inst) - 1) ++ resp`` (the last instruction token predicts
  ``resp[0]``; -100 is ignored by the loss),
* positions ``0 .. len - 1``, and ``prefix_len = len(inst)`` (the bidirectional part).

Trailing padding has input ``pad_id``, label -100 and position 0 and lies past
``cu_seqlens[-1]``.

Steps: a step (the global batch) is ``num_rows`` rows. :func:`multipack` plans
steps from sample lengths: it keeps a window of a few steps' worth of samples (taken in
order), sorts the window longest first, and deals each sample to the row of the step
that has the least attention work (sum of squared lengths; ties: fewest tokens) among the
rows it still fits in; what fits nowhere waits in the window for the next step. Longest
first makes this LPT scheduling: rows come out nearly full and balanced in tokens, and
as balanced in attention work as the window's lengths allow. Samples never split across
rows.

Data parallel: the plan depends on ``num_rows`` (the global batch), never on the number of
ranks. :func:`split_rows` deals each step's rows to the ranks, the same number to each,
again longest-work first to the least loaded rank, so what a step trains on is the same for
any world size and only who computes which row changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numba
import numpy as np
import torch

from hrm.data.sample import Sample
from hrm.data.sources import SourceStats
from hrm.errors import DataError
from hrm.ops import IGNORE_INDEX, AttentionPacking


@numba.njit(cache=False)
def _multipack_kernel(lengths, budget, num_rows, window_tokens):
    """Assign every sample to a global row ``step * num_rows + r``; see :func:`multipack`.

    Returns ``(sample, row, num_steps)``: ``sample[k]`` goes to row ``row[k]``; within a
    row, samples appear in placement order.
    """
    n = lengths.shape[0]
    out_sample = np.empty(n, np.int64)
    out_row = np.empty(n, np.int64)
    pending = np.empty(n, np.int64)  # sample indices waiting for a row, in input order
    taken = np.zeros(n, np.bool_)  # per pending slot, for the current step
    load = np.zeros(num_rows, np.int64)
    work = np.zeros(num_rows, np.int64)
    n_pending = 0
    pending_tokens = 0
    next_in = 0
    n_out = 0
    step = 0
    while next_in < n or n_pending > 0:
        while next_in < n and pending_tokens < window_tokens:
            pending[n_pending] = next_in
            pending_tokens += lengths[next_in]
            n_pending += 1
            next_in += 1
        order = np.argsort(-lengths[pending[:n_pending]], kind="mergesort")  # longest first, stable
        load[:] = 0
        work[:] = 0
        for k in range(n_pending):
            length = lengths[pending[order[k]]]
            best = -1  # among the rows it fits in: least work, then fewest tokens, then first
            for r in range(num_rows):
                if length <= budget - load[r] and (
                    best < 0 or work[r] < work[best] or (work[r] == work[best] and load[r] < load[best])
                ):
                    best = r
            if best >= 0:
                load[best] += length
                work[best] += length * length
                out_sample[n_out] = pending[order[k]]
                out_row[n_out] = step * num_rows + best
                n_out += 1
                taken[order[k]] = True
        kept = 0
        for k in range(n_pending):
            if taken[k]:
                pending_tokens -= lengths[pending[k]]
                taken[k] = False
            else:
                pending[kept] = pending[k]
                kept += 1
        n_pending = kept
        step += 1
    return out_sample, out_row, step


def multipack(
    lengths: Sequence[int] | np.ndarray, budget: int, num_rows: int = 1, window_steps: int = 4
) -> list[list[np.ndarray]]:
    """Plan steps for samples with packed ``lengths`` (each in ``1..budget``), taken in order.

    Returns one entry per step, each a list of ``num_rows`` int64 arrays of sample indices
    whose lengths sum to at most ``budget``. Every index appears exactly once; only the
    last step may leave rows empty (when fewer samples than rows remain). The window holds at
    least ``window_steps`` steps' worth of tokens. Deterministic given its inputs.
    """
    for name, value in (("budget", budget), ("num_rows", num_rows), ("window_steps", window_steps)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise DataError(f"lengths must be 1-D, got shape {lengths.shape}")
    if lengths.size == 0:
        return []
    if lengths.min() < 1 or lengths.max() > budget:
        bad = int(np.argmax((lengths < 1) | (lengths > budget)))
        raise DataError(f"sample {bad} has packed length {lengths[bad]}, outside 1..{budget}")
    sample, row, num_steps = _multipack_kernel(
        lengths, np.int64(budget), np.int64(num_rows), np.int64(window_steps * num_rows * budget)
    )
    counts = np.bincount(row, minlength=num_steps * num_rows)
    rows = np.split(sample[np.argsort(row, kind="stable")], np.cumsum(counts)[:-1])
    return [rows[s * num_rows : (s + 1) * num_rows] for s in range(num_steps)]


def split_rows(work: Sequence[int], tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Deal a step's rows to ``world_size`` ranks, ``len(work) / world_size`` rows each.

    ``work[i]`` and ``tokens[i]`` are row ``i``'s attention work (sum of squared sequence
    lengths) and real tokens. LPT with a cardinality limit: rows in decreasing work (ties:
    tokens, then index) go to the rank with the least work so far (ties: fewest tokens, then
    lowest rank) among the ranks that still take rows. Returns each rank's row indices in
    increasing order: its micro-steps. Deterministic given its inputs.
    """
    n = len(work)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise DataError(f"world_size must be a positive integer, got {world_size!r}")
    if len(tokens) != n or n % world_size:
        raise DataError(f"cannot split {n} rows evenly over {world_size} ranks")
    per_rank = n // world_size
    load = [[0, 0] for _ in range(world_size)]  # (work, tokens) per rank
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(n), key=lambda i: (-work[i], -tokens[i], i)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (load[r], r))
        ranks[r].append(i)
        load[r][0] += work[i]
        load[r][1] += tokens[i]
    return [sorted(rows) for rows in ranks]


def split_balance(
    lengths: Sequence[int] | np.ndarray, budget: int, num_rows: int, world_size: int, window_steps: int = 4
) -> dict[str, float]:
    """How evenly :func:`split_rows` spreads :func:`multipack`'s steps of ``lengths`` over ranks.

    Per step, the busiest rank's tokens and attention work over the mean rank's: returns
    ``tokens_max_over_mean`` and ``work_max_over_mean`` (mean over steps), their worst step
    (``*_worst``), ``steps`` and the rows' fill ``packing_efficiency``. The epoch's last step is
    left out (it holds the window's leftovers, often rows with nothing in them).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    steps = multipack(lengths, budget, num_rows, window_steps)[:-1]
    if not steps:
        raise DataError("split_balance needs at least two steps of samples")
    tokens_ratio, work_ratio = [], []
    for step in steps:
        tokens = [int(lengths[row].sum()) for row in step]
        work = [int((lengths[row] ** 2).sum()) for row in step]
        split = split_rows(work, tokens, world_size)
        per_rank_tokens = [sum(tokens[i] for i in rows) for rows in split]
        per_rank_work = [sum(work[i] for i in rows) for rows in split]
        tokens_ratio.append(max(per_rank_tokens) / np.mean(per_rank_tokens))
        work_ratio.append(max(per_rank_work) / np.mean(per_rank_work))
    return {
        "tokens_max_over_mean": float(np.mean(tokens_ratio)),
        "tokens_max_over_mean_worst": float(np.max(tokens_ratio)),
        "work_max_over_mean": float(np.mean(work_ratio)),
        "work_max_over_mean_worst": float(np.max(work_ratio)),
        "steps": len(steps),
        "packing_efficiency": float(sum(lengths[r].sum() for s in steps for r in s) / (len(steps) * num_rows * budget)),
    }


@dataclass
class PackedBatch:
    """One packed row of ``T = budget`` tokens holding ``N`` sequences (format: module docstring).

    ``input_ids``, ``labels``, ``position_ids``: int64 ``[T]``; ``cu_seqlens``: int32
    ``[N+1]`` sequence boundaries starting at 0; ``prefix_lens``: int32 ``[N]``;
    ``num_tokens``: real tokens (``cu_seqlens[-1]``); ``num_supervised``: labels that are
    not -100 (the sum of response lengths). Derived once, on the host, where the row is
    built: ``attention``, the validated packing with the index tensors attention needs, and
    ``supervised_rows`` (int64 ``[S]``), the rows the LM head runs on; passing both to the
    model keeps every host read out of the train step.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    prefix_lens: torch.Tensor
    num_tokens: int
    num_supervised: int
    attention: AttentionPacking
    supervised_rows: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            move(self.input_ids),
            move(self.labels),
            move(self.position_ids),
            move(self.cu_seqlens),
            move(self.prefix_lens),
            self.num_tokens,
            self.num_supervised,
            self.attention.to(device, non_blocking),
            move(self.supervised_rows),
        )

    def model_inputs(self) -> dict[str, torch.Tensor | AttentionPacking]:
        """The keyword arguments of :meth:`hrm.model.HRMText.forward` for this batch (labels included)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "prefix_lens": self.prefix_lens,
            "labels": self.labels,
            "packing": self.attention,
            "supervised_rows": self.supervised_rows,
        }


def pack_row(samples: Sequence[Sample], budget: int, pad_id: int) -> PackedBatch:
    """Lay ``samples`` out in order in one row of ``budget`` tokens (format: module docstring)."""
    total = sum(s.packed_len for s in samples)
    if total > budget:
        raise DataError(f"{len(samples)} samples need {total} tokens, more than the row budget {budget}")
    inputs: list[int] = []
    labels: list[int] = []
    lens = np.array([s.packed_len for s in samples], dtype=np.int64)
    for s in samples:
        inputs += s.instruction
        inputs += s.response[:-1]
        labels += [IGNORE_INDEX] * (len(s.instruction) - 1)
        labels += s.response
    pad = budget - total
    cu_seqlens = np.zeros(len(samples) + 1, dtype=np.int32)
    cu_seqlens[1:] = np.cumsum(lens)
    # position within the sequence: global index minus the sequence's start
    starts = np.repeat(cu_seqlens[:-1].astype(np.int64), lens)
    positions = np.concatenate([np.arange(total, dtype=np.int64) - starts, np.zeros(pad, np.int64)])
    prefix_lens = [len(s.instruction) for s in samples]
    label_array = np.array(labels + [IGNORE_INDEX] * pad, dtype=np.int64)
    return PackedBatch(
        input_ids=torch.tensor(inputs + [pad_id] * pad, dtype=torch.int64),
        labels=torch.from_numpy(label_array),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        num_tokens=total,
        num_supervised=sum(len(s.response) for s in samples),
        attention=AttentionPacking.build(cu_seqlens.tolist(), prefix_lens, budget),
        supervised_rows=torch.from_numpy(np.flatnonzero(label_array != IGNORE_INDEX)),
    )


def fit_to_budget(
    samples: Sequence[Sample], budget: int, too_long: Literal["skip", "truncate"] = "skip"
) -> tuple[list[Sample], SourceStats]:
    """Keep the samples that fit a row of ``budget`` tokens.

    A longer sample is skipped, or with ``too_long="truncate"`` has its response cut to
    fill exactly ``budget`` tokens (kept only if at least one response token remains).
    Returns the kept samples (in order) and counts (``read`` = samples given).
    """
    if too_long not in ("skip", "truncate"):
        raise DataError(f"too_long must be 'skip' or 'truncate', got {too_long!r}")
    stats = SourceStats(read=len(samples))
    kept: list[Sample] = []
    for s in samples:
        if s.packed_len <= budget:
            kept.append(s)
        elif too_long == "truncate" and len(s.instruction) <= budget:
            kept.append(Sample(s.instruction, s.response[: budget - len(s.instruction) + 1]))
            stats.truncated += 1
        else:
            stats.skipped_too_long += 1
    return kept, stats


@dataclass
class RankStep:
    """One rank's share of a training step (:meth:`PackedLoader.next_step`).

    ``rows``: this rank's packed rows, one micro-step each; ``num_supervised`` and
    ``num_tokens``: supervised and real tokens of the whole step, over every rank's rows
    (the loss divides by the former, so no rank needs another's count).
    """

    rows: list[PackedBatch]
    num_supervised: int
    num_tokens: int


class PackedLoader:
    """An endless iterator of training steps; each step is ``num_rows`` :class:`PackedBatch`.

    :meth:`next_step` gives one data-parallel rank its share of a step instead. Every epoch
    shuffles the samples with a generator seeded by ``(seed, epoch)`` and plans its steps with
    :func:`multipack`, so the sequence of steps depends only on the samples and the arguments
    (not on the world size). Each sample is used once per epoch (the last steps of an epoch
    may be less full, even have empty rows). Samples longer than ``budget`` are handled per
    ``too_long`` (see :func:`fit_to_budget`) and counted in :attr:`stats`. :meth:`state_dict` /
    :meth:`load_state_dict` save and restore the position, so a resumed loader yields exactly
    the steps the original would.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        budget: int,
        *,
        seed: int,
        pad_id: int,
        num_rows: int = 1,
        too_long: Literal["skip", "truncate"] = "skip",
        window_steps: int = 4,
    ):
        for name, value in (("budget", budget), ("num_rows", num_rows), ("window_steps", window_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        self.budget, self.seed, self.pad_id = budget, seed, pad_id
        self.num_rows, self.window_steps, self.too_long = num_rows, window_steps, too_long
        self._samples, self.stats = fit_to_budget(samples, budget, too_long)
        if not self._samples:
            raise DataError(
                f"no sample fits the row budget of {budget} tokens "
                f"({len(samples)} given, {self.stats.skipped_too_long} too long)"
            )
        self._lengths = np.array([s.packed_len for s in self._samples], dtype=np.int64)
        self._supervised = np.array([len(s.response) for s in self._samples], dtype=np.int64)
        self._fingerprint = hashlib.blake2b(self._lengths.tobytes(), digest_size=8).hexdigest()
        self._epoch, self._step = 0, 0
        self._plan = self._make_plan(0)

    def _make_plan(self, epoch: int) -> list[list[np.ndarray]]:
        """Epoch ``epoch``'s steps, each ``num_rows`` arrays of indices into ``self._samples``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._samples))
        steps = multipack(self._lengths[perm], self.budget, self.num_rows, self.window_steps)
        return [[perm[row] for row in step] for step in steps]

    def __iter__(self) -> PackedLoader:
        return self

    def _advance(self) -> list[np.ndarray]:
        rows = self._plan[self._step]
        self._step += 1
        if self._step == len(self._plan):
            self._epoch, self._step = self._epoch + 1, 0
            self._plan = self._make_plan(self._epoch)
        return rows

    def __next__(self) -> list[PackedBatch]:
        return [pack_row([self._samples[i] for i in row], self.budget, self.pad_id) for row in self._advance()]

    def next_step(self, rank: int = 0, world_size: int = 1) -> RankStep:
        """The next step as rank ``rank`` of ``world_size`` sees it: its rows per :func:`split_rows`
        (only those are packed) and the whole step's token counts. Every rank must call this
        once per step, so that all stay at the same position."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        rows = self._advance()
        tokens = [int(self._lengths[row].sum()) for row in rows]
        work = [int((self._lengths[row] ** 2).sum()) for row in rows]
        mine = split_rows(work, tokens, world_size)[rank]
        return RankStep(
            rows=[pack_row([self._samples[i] for i in rows[k]], self.budget, self.pad_id) for k in mine],
            num_supervised=int(sum(self._supervised[row].sum() for row in rows)),
            num_tokens=sum(tokens),
        )

    @property
    def epoch(self) -> int:
        """The epoch the next step comes from."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the current epoch (epochs may differ by a step or so)."""
        return len(self._plan)

    @property
    def num_samples(self) -> int:
        """Samples used per epoch (after :func:`fit_to_budget`)."""
        return len(self._samples)

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (steps * num_rows * budget) over the current epoch's plan."""
        return float(self._lengths.sum()) / (len(self._plan) * self.num_rows * self.budget)

    def _config(self) -> dict:
        return {
            "seed": self.seed,
            "budget": self.budget,
            "num_rows": self.num_rows,
            "window_steps": self.window_steps,
            "too_long": self.too_long,
            "num_samples": len(self._samples),
            "fingerprint": self._fingerprint,
        }

    def state_dict(self) -> dict:
        """The position of the next step (``epoch``, ``step`` within it) and the settings it is valid for."""
        return {"epoch": self._epoch, "step": self._step, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; DataError if it came from different data or settings."""
        mismatched = [key for key, value in self._config().items() if state.get(key) != value]
        if mismatched:
            raise DataError(f"loader state does not match this data/settings: {', '.join(mismatched)} differ")
        epoch, step = state.get("epoch"), state.get("step")
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and step >= 0):
            raise DataError(f"loader state has an invalid position: epoch={epoch!r}, step={step!r}")
        plan = self._plan if epoch == self._epoch else self._make_plan(epoch)
        if step >= len(plan):
            raise DataError(f"loader state step {step} is past the end of epoch {epoch} ({len(plan)} steps)")
        self._epoch, self._step, self._plan = epoch, step, plan
