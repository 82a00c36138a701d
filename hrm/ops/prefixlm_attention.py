"""PrefixLM attention over packed variable-length sequences.

Inputs ``q, k, v``: ``[T, heads, head_dim]``; sequence ``i`` occupies rows
``cu_seqlens[i] : cu_seqlens[i+1]`` and its first ``prefix_lens[i]`` tokens are the
instruction. Inside sequence ``i`` a query at local position ``p`` may attend to key ``j``
iff ``j < prefix_lens[i]`` (the whole instruction, bidirectionally) or ``j <= p`` (causal
over the response). Nothing crosses a sequence boundary. With ``scale = head_dim**-0.5``:

    out[t] = sigmoid(gate[t]) * softmax_j(scale * q[t] . k[j] | allowed(t, j)) @ v

Rows past ``cu_seqlens[-1]`` are padding and come out zero. Every legal sequence has
``1 <= prefix_lens[i] <= length`` (the instruction predicts the first response token), so
every real query sees at least key 0; one-token sequences and sequences with no causal
part (``prefix_len == length``) are ordinary inputs.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from hrm.errors import HrmError
from hrm.ops.dispatch import get_impl, register


def check_packing(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, num_tokens: int) -> tuple[list[int], list[int]]:
    """Validate a packing; return ``cu_seqlens`` and ``prefix_lens`` as Python lists."""
    if cu_seqlens.dim() != 1 or prefix_lens.dim() != 1 or cu_seqlens.numel() != prefix_lens.numel() + 1:
        raise HrmError(f"cu_seqlens must be [N+1] and prefix_lens [N]; got {tuple(cu_seqlens.shape)} "
                       f"and {tuple(prefix_lens.shape)}")
    cu, pl = cu_seqlens.tolist(), prefix_lens.tolist()
    if cu[0] != 0 or cu[-1] > num_tokens:
        raise HrmError(f"cu_seqlens must start at 0 and end at most at T={num_tokens}; got {cu[0]}..{cu[-1]}")
    for i, p in enumerate(pl):
        length = cu[i + 1] - cu[i]
        if length < 1:
            raise HrmError(f"sequence {i} has length {length}; cu_seqlens must be strictly increasing")
        if not 1 <= p <= length:
            raise HrmError(f"sequence {i}: prefix length {p} must be in [1, {length}] (a sample needs an "
                           "instruction: its last token predicts the first response token)")
    return cu, pl


def prefixlm_dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The ``[T, T]`` boolean mask (``True`` = may attend); padding rows are all False.

    For tests and small oracles only: it is quadratic in ``T``.
    """
    cu, pl = check_packing(cu_seqlens, prefix_lens, num_tokens)
    mask = torch.zeros(num_tokens, num_tokens, dtype=torch.bool)
    for i, p in enumerate(pl):
        s, e = cu[i], cu[i + 1]
        n = e - s
        pos = torch.arange(n)
        mask[s:e, s:e] = (pos[None, :] < p) | (pos[None, :] <= pos[:, None])
    return mask.to(cu_seqlens.device)


def _sequence_buckets(cu: list[int], pl: list[int]) -> dict[int, list[int]]:
    """Group sequences by their length rounded up to a power of two (bounds padding at 2x)."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pl)):
        length = cu[i + 1] - cu[i]
        buckets[1 << (length - 1).bit_length()].append(i)
    return dict(sorted(buckets.items()))


@register("prefixlm_attention", "torch")
def prefixlm_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 prefix_lens: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Readable reference: sequences of similar length are padded into one batch and run
    through ``scaled_dot_product_attention`` with a per-sequence PrefixLM mask. Memory is
    at most ``4 * sum(len_i**2)`` scores, never ``T**2``."""
    T, H, D = q.shape
    cu, pl = check_packing(cu_seqlens, prefix_lens, T)
    out = q.new_zeros(T, H, D)
    for width, seqs in _sequence_buckets(cu, pl).items():
        dev = q.device
        starts = torch.tensor([cu[i] for i in seqs], device=dev)
        lengths = torch.tensor([cu[i + 1] - cu[i] for i in seqs], device=dev)
        prefixes = torch.tensor([pl[i] for i in seqs], device=dev)
        pos = torch.arange(width, device=dev)
        valid = pos[None, :] < lengths[:, None]  # [n, W]
        rows = torch.where(valid, starts[:, None] + pos[None, :], 0)  # [n, W] token index (0 for slack)
        allowed = valid[:, None, :] & ((pos[None, None, :] < prefixes[:, None, None])
                                       | (pos[None, None, :] <= pos[None, :, None]))  # [n, Wq, Wk]
        qb, kb, vb = (t[rows].transpose(1, 2) for t in (q, k, v))  # [n, H, W, D]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None])  # [n, H, W, D]
        out = out.index_copy(0, rows[valid], ob.transpose(1, 2)[valid])
    if gate is not None:
        out = torch.sigmoid(gate) * out
    return out


def prefixlm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       prefix_lens: torch.Tensor, *, gate: torch.Tensor | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """PrefixLM attention on a packed row; ``[T, heads, head_dim]`` in and out."""
    return get_impl("prefixlm_attention", backend)(q, k, v, cu_seqlens, prefix_lens, gate)
