"""The packing of a row and everything attention derives from it, computed once per batch.

A packing of ``T`` tokens is ``cu_seqlens [N+1]`` (sequence ``i`` occupies rows
``cu_seqlens[i] : cu_seqlens[i+1]``) and ``prefix_lens [N]`` (its first ``prefix_lens[i]``
tokens are the instruction). Every legal sequence has ``1 <= prefix_lens[i] <= length``.

**Row intervals.** The PrefixLM mask is one key interval per query: query ``t`` sees exactly
the keys ``[row_lo[t], row_hi[t])`` with ``row_lo = start of t's sequence`` and
``row_hi = start + max(prefix, pos + 1)``; padding rows get the empty interval
``[total, total)``. Both arrays are non-decreasing in ``t``, so (transposed) key ``j`` is
seen by the queries ``[col_lo[j], col_hi[j])``, found by binary search, and any run of
consecutive rows sees one contiguous span of keys.

**Tiles.** For a block of rows the keys split into: the union of the rows' intervals
(anything outside is an *empty* tile, never visited) and their intersection (*full* tiles:
every row sees every key, no mask); the rest of the union is *partial*, masked by the
interval test ``row_lo <= j < row_hi``. Because the intervals are monotone, both sets are
contiguous, so each block needs four numbers (:func:`tile_ranges`) and no index lists; a
query block may span several short sequences (its intersection is then empty).

:class:`AttentionPacking` holds all of it. :meth:`AttentionPacking.build` validates the
packing on the host -- where the batch is built, so reading it costs nothing -- and derives
the intervals and the reference's length buckets; the tile ranges of the Triton kernels
are added once per forward (:meth:`AttentionPacking.with_tiles`). The attention op itself
never reads tensor data back to the host.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hrm.errors import HrmError
from hrm.ops.common import cdiv


def check_packing(cu_seqlens: Sequence[int], prefix_lens: Sequence[int], num_tokens: int) -> None:
    """Raise :class:`~hrm.errors.HrmError` unless ``cu_seqlens`` / ``prefix_lens`` (host values)
    describe a legal packing of ``num_tokens`` tokens."""
    cu, pl = list(cu_seqlens), list(prefix_lens)
    if len(cu) != len(pl) + 1:
        raise HrmError(f"cu_seqlens must be [N+1] and prefix_lens [N]; got {len(cu)} and {len(pl)} entries")
    if cu[0] != 0 or cu[-1] > num_tokens:
        raise HrmError(f"cu_seqlens must start at 0 and end at most at T={num_tokens}; got {cu[0]}..{cu[-1]}")
    for i, p in enumerate(pl):
        length = cu[i + 1] - cu[i]
        if length < 1:
            raise HrmError(f"sequence {i} has length {length}; cu_seqlens must be strictly increasing")
        if not 1 <= p <= length:
            raise HrmError(
                f"sequence {i}: prefix length {p} must be in [1, {length}] (a sample needs an "
                "instruction: its last token predicts the first response token)"
            )


def _host_list(x: Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1:
            raise HrmError(f"{name} must be 1-d, got shape {tuple(x.shape)}")
        return x.tolist()
    return [int(v) for v in x]


# -- intervals and tile ranges (device tensors, no host sync) ------------------------------------
def row_intervals(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """int32 ``[T]`` arrays: query ``t`` sees the keys ``[row_lo[t], row_hi[t])``.

    Padding rows get ``[total, total)`` so that both arrays stay non-decreasing."""
    dev = cu_seqlens.device
    t = torch.arange(num_tokens, device=dev)
    if prefix_lens.numel() == 0:  # nothing but padding
        return torch.zeros_like(t, dtype=torch.int32), torch.zeros_like(t, dtype=torch.int32)
    cu = cu_seqlens.to(torch.int64)
    seq = torch.searchsorted(cu[1:], t, right=True).clamp_(max=prefix_lens.numel() - 1)  # [T]
    start, prefix, total = cu[seq], prefix_lens.to(torch.int64)[seq], cu[-1]
    real = t < total
    lo = torch.where(real, start, total)
    hi = torch.where(real, start + torch.maximum(prefix, t - start + 1), total)
    return lo.to(torch.int32), hi.to(torch.int32)


def col_intervals(row_lo: Tensor, row_hi: Tensor) -> tuple[Tensor, Tensor]:
    """int32 ``[T]`` arrays: key ``j`` is seen by the queries ``[col_lo[j], col_hi[j])``
    (``row_lo <= j < row_hi`` with both non-decreasing; keys nobody sees get ``[T, T)``)."""
    j = torch.arange(row_lo.numel(), device=row_lo.device, dtype=torch.int32)
    col_lo = torch.searchsorted(row_hi, j, right=True)  # first query whose interval ends after j
    col_hi = torch.searchsorted(row_lo, j, right=True)  # queries whose interval starts at or before j
    return col_lo.to(torch.int32), col_hi.to(torch.int32)


def tile_ranges(lo: Tensor, hi: Tensor, block: int, other_block: int) -> Tensor:
    """int32 ``[cdiv(T, block), 4]``: for each block of ``block`` rows with intervals
    ``[lo, hi)`` over the other axis, ``(first, full_first, full_end, end)`` in units of
    ``other_block``-sized tiles. Tiles ``[first, end)`` are non-empty; of those,
    ``[full_first, full_end)`` are full (every row sees every column) and the others partial;
    a block with no full tile has ``full_first == full_end == end``. Rows past ``T`` count
    as empty, so a block cut by the end of the row is never full."""
    T = lo.numel()
    nb = cdiv(T, block)
    pad = nb * block - T
    lo = F.pad(lo.to(torch.int64), (0, pad), value=T).view(nb, block)
    hi = F.pad(hi.to(torch.int64), (0, pad), value=0).view(nb, block)
    nonempty = lo < hi
    any_row = nonempty.any(1)
    first = torch.where(nonempty, lo, T).amin(1) // other_block
    end = -(-torch.where(nonempty, hi, 0).amax(1) // other_block)
    first, end = torch.where(any_row, first, 0), torch.where(any_row, end, 0)
    full_first = -(-lo.amax(1) // other_block)  # the intersection [max lo, min hi), in whole tiles
    full_end = hi.amin(1) // other_block
    no_full = full_first >= full_end
    full_first, full_end = torch.where(no_full, end, full_first), torch.where(no_full, end, full_end)
    return torch.stack([first, full_first, full_end, end], 1).to(torch.int32)


# -- the reference's length buckets ------------------------------------------------------------
@dataclass(frozen=True)
class Bucket:
    """Sequences of similar length padded into one ``[n, width]`` batch for the reference.

    ``rows``: token index of each slot (0 for slack), ``valid``: real slots, ``prefixes``:
    prefix length per sequence, ``src``/``dst``: flat slot index and token index of every
    real slot (scatter the batch's output back with ``out[dst] = flat[src]``)."""

    width: int
    rows: Tensor  # int64 [n, width]
    valid: Tensor  # bool [n, width]
    prefixes: Tensor  # int64 [n]
    src: Tensor  # int64 [m]
    dst: Tensor  # int64 [m]


def _buckets(cu: list[int], pl: list[int]) -> tuple[Bucket, ...]:
    """Group sequences by their length rounded up to a power of two (bounds padding at 2x)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pl)):
        groups[1 << (cu[i + 1] - cu[i] - 1).bit_length()].append(i)
    out = []
    for width, seqs in sorted(groups.items()):
        starts = torch.tensor([cu[i] for i in seqs], dtype=torch.int64)
        lengths = torch.tensor([cu[i + 1] - cu[i] for i in seqs], dtype=torch.int64)
        pos = torch.arange(width)
        valid = pos[None, :] < lengths[:, None]  # [n, W]
        rows = torch.where(valid, starts[:, None] + pos[None, :], 0)
        src = valid.flatten().nonzero().squeeze(1)
        out.append(
            Bucket(width, rows, valid, torch.tensor([pl[i] for i in seqs], dtype=torch.int64), src, rows.flatten()[src])
        )
    return tuple(out)


# -- the packing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileRanges:
    """The tile ranges of the three Triton kernels for one tile configuration: ``fwd`` and
    ``dq`` per query block over key tiles, ``dkdv`` per key block over query tiles."""

    blocks: tuple[tuple[int, int], ...]  # (block_m, block_n) of fwd, dq and dkdv
    fwd: Tensor
    dq: Tensor
    dkdv: Tensor


@dataclass(frozen=True, eq=False)
class AttentionPacking:
    """A validated packing of ``num_tokens`` tokens with the index tensors attention derives
    from it (module docstring). Build it with :meth:`build` where the batch is built; it
    travels with the batch (:meth:`to`)."""

    cu_seqlens: Tensor  # int32 [N+1]
    prefix_lens: Tensor  # int32 [N]
    row_lo: Tensor  # int32 [T]
    row_hi: Tensor  # int32 [T]
    col_lo: Tensor  # int32 [T]
    col_hi: Tensor  # int32 [T]
    buckets: tuple[Bucket, ...]
    num_sequences: int
    total: int  # real tokens: cu_seqlens[-1]
    tiles: TileRanges | None = None

    @property
    def num_tokens(self) -> int:
        return self.row_lo.numel()

    @property
    def device(self) -> torch.device:
        return self.row_lo.device

    @classmethod
    def build(
        cls,
        cu_seqlens: Tensor | Sequence[int],
        prefix_lens: Tensor | Sequence[int],
        num_tokens: int,
        device: torch.device | str | None = None,
    ) -> AttentionPacking:
        """Validate the packing (on the host: a device sync when the tensors live on a GPU, so
        build it where the batch is assembled) and derive every index tensor, on ``device``
        (default: ``cu_seqlens``'s device, or the CPU for lists)."""
        if device is None:
            device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else "cpu"
        cu, pl = _host_list(cu_seqlens, "cu_seqlens"), _host_list(prefix_lens, "prefix_lens")
        check_packing(cu, pl, num_tokens)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        pl_t = torch.tensor(pl, dtype=torch.int32)
        lo, hi = row_intervals(cu_t, pl_t, num_tokens)
        col_lo, col_hi = col_intervals(lo, hi)
        host = cls(cu_t, pl_t, lo, hi, col_lo, col_hi, _buckets(cu, pl), len(pl), cu[-1])
        return host.to(device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AttentionPacking:
        """A copy with every tensor on ``device`` (tile ranges included)."""

        def move(x):
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, (Bucket, TileRanges)):
                return dataclasses.replace(
                    x,
                    **{
                        f.name: move(getattr(x, f.name))
                        for f in dataclasses.fields(x)
                        if isinstance(getattr(x, f.name), Tensor)
                    },
                )
            if isinstance(x, tuple):
                return tuple(move(b) for b in x)
            return x

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def tensors(self) -> list[Tensor]:
        """Every tensor the packing holds (for memory accounting)."""
        out = [self.cu_seqlens, self.prefix_lens, self.row_lo, self.row_hi, self.col_lo, self.col_hi]
        for b in self.buckets:
            out += [b.rows, b.valid, b.prefixes, b.src, b.dst]
        if self.tiles is not None:
            out += [self.tiles.fwd, self.tiles.dq, self.tiles.dkdv]
        return out

    def tile_ranges(self, fwd: tuple[int, int], dq: tuple[int, int], dkdv: tuple[int, int]) -> TileRanges:
        """The Triton kernels' tile ranges for ``(block_m, block_n)`` of each kernel: the ones
        this packing carries when they match, else computed now (device ops, no host read)."""
        blocks = (fwd, dq, dkdv)
        if self.tiles is not None and self.tiles.blocks == blocks:
            return self.tiles
        return TileRanges(
            blocks,
            tile_ranges(self.row_lo, self.row_hi, *fwd),
            tile_ranges(self.row_lo, self.row_hi, *dq),
            tile_ranges(self.col_lo, self.col_hi, dkdv[1], dkdv[0]),
        )

    def with_tiles(self, fwd: tuple[int, int], dq: tuple[int, int], dkdv: tuple[int, int]) -> AttentionPacking:
        """This packing carrying the tile ranges for these block sizes (computed once here
        rather than in every attention call of a forward)."""
        return dataclasses.replace(self, tiles=self.tile_ranges(fwd, dq, dkdv))


# -- for tests and benchmark reports ------------------------------------------------------------
def prefixlm_dense_mask(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int) -> Tensor:
    """The ``[T, T]`` boolean mask (``True`` = may attend), built sequence by sequence from the
    definition (not from the intervals); padding rows are all False.

    For tests and small oracles only: it is quadratic in ``T``."""
    cu, pl = _host_list(cu_seqlens, "cu_seqlens"), _host_list(prefix_lens, "prefix_lens")
    check_packing(cu, pl, num_tokens)
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for i, p in enumerate(pl):
        s, e = cu[i], cu[i + 1]
        pos = torch.arange(e - s)
        mask[s:e, s:e] = (pos[None, :] < p) | (pos[None, :] <= pos[:, None])
    return mask.to(cu_seqlens.device)


def tile_counts(
    cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int, block_m: int = 64, block_n: int = 64
) -> dict[str, int]:
    """How many ``block_m x block_n`` tiles of the ``[T, T]`` score matrix are empty, full
    and partial (for benchmark reports)."""
    lo, hi = row_intervals(cu_seqlens, prefix_lens, num_tokens)
    r = tile_ranges(lo, hi, block_m, block_n).to(torch.int64)
    full = int((r[:, 2] - r[:, 1]).sum())
    nonempty = int((r[:, 3] - r[:, 0]).sum())
    total = cdiv(num_tokens, block_m) * cdiv(num_tokens, block_n)
    return {"total": total, "empty": total - nonempty, "full": full, "partial": nonempty - full}


def allowed_pairs(cu_seqlens: Tensor, prefix_lens: Tensor, num_tokens: int) -> int:
    """Number of (query, key) pairs the mask allows: the useful work is ``4 * pairs * head_dim``
    FLOPs per head forward."""
    lo, hi = row_intervals(cu_seqlens, prefix_lens, num_tokens)
    return int((hi - lo).to(torch.int64).sum())
