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

The package, one concern per module (docs/design.md has the index):

- :mod:`.packing`: the packing (:class:`AttentionPacking`, validated once per batch on the
  host), its row/column intervals and tile ranges, shared by every backend and the bench;
- :mod:`.reference`: the ``torch`` backend, the oracle;
- :mod:`.triton_kernels`: the ``triton`` backend's kernels, tile configurations, launchers
  and ahead-of-time specs;
- :mod:`.cpu`: the ``cpu`` backend's binding of the C++ kernel in ``csrc/prefixlm_attention``;
- :mod:`.op`: the custom ops with autograd, and the public :func:`prefixlm_attention`.
"""

from hrm.ops.impl.prefixlm_attention.op import prefixlm_attention, prepare_packing
from hrm.ops.impl.prefixlm_attention.packing import AttentionPacking, allowed_pairs, tile_counts
from hrm.ops.impl.prefixlm_attention.reference import prefixlm_attention_reference

__all__ = [
    "AttentionPacking",
    "allowed_pairs",
    "prefixlm_attention",
    "prefixlm_attention_reference",
    "prepare_packing",
    "tile_counts",
]
