"""Training FLOPs: the useful floating-point work of one train step, for every architecture.

One accounting serves the training loop (``metrics.jsonl`` logs the cumulative ``flops``),
``hrm compare`` (it spends a FLOP budget) and the benchmark suite (its model GFLOP/s and
MFU). Only matrix products count, 2 FLOPs per multiply-add; norms, RoPE, the SwiGLU and
attention-gate products, softmax, cross-entropy and the embedding lookup are elementwise
work and are left out. The formula (docs/design.md, "Training FLOPs"), for one packed row
with ``T`` real tokens (padding excluded), ``P`` (query, key) pairs that the PrefixLM mask
allows and ``S`` supervised rows, ``w = nh * hd``, ``I`` the SwiGLU width, ``V`` the padded
vocabulary:

* one stack call, forward: ``layers_per_stack * (2 T (4 d w + w d + 2 d I + I d) + 4 P w)``
  (the projections, then ``q k^T`` and ``p v`` on the allowed pairs only);
* its backward, only for the calls that run with gradients (:func:`hrm.model.stack_calls`:
  the last ``bp_steps`` ones, split between H and L as the model does) and whose output
  reaches the loss (:func:`backward_calls`): twice the forward (the gradient of each
  product's input and of its weight), less the input gradient of the first block's
  ``gqkv`` projection, ``2 T d 4w``, when the call's input carries no gradient -- autograd
  does not compute it. In HRM that is the first call with gradients while ``bp_steps`` is 2
  (its input depends only on no-grad states); a Transformer's and a universal
  transformer's input always includes the embedding, which is trained;
* the LM head on the supervised rows only: ``2 S d V`` forward, ``2 S d V`` for the weight
  gradient and ``2 S d V`` for the input gradient (when the last call has gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from hrm.config import ModelConfig
from hrm.model import stack_calls


@dataclass(frozen=True)
class RowWork:
    """What the FLOPs of a packed row depend on: real ``tokens``, allowed attention ``pairs``
    and ``supervised`` rows."""

    tokens: int
    pairs: int
    supervised: int

    @classmethod
    def of(cls, batch) -> RowWork:
        """The work of a :class:`~hrm.data.PackedBatch` (reads its packing on the host): the
        allowed pairs are the widths of the key intervals its packing already holds."""
        packing = batch.attention
        pairs = int((packing.row_hi - packing.row_lo).sum(dtype=torch.int64))
        return cls(batch.num_tokens, pairs, batch.num_supervised)


@dataclass(frozen=True)
class StepFlops:
    """The FLOPs of one train step (forward + backward) by kind of product."""

    projections: int  # the blocks' linear layers
    attention: int  # q k^T and p v on the allowed pairs
    lm_head: int

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.lm_head

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(
            self.projections + other.projections, self.attention + other.attention, self.lm_head + other.lm_head
        )


def backward_calls(config: ModelConfig, bp_steps: int | None) -> list[tuple[bool, bool]]:
    """Per stack call of a train step: ``(its backward runs, its input carries a gradient)``.

    Follows :meth:`hrm.model.HRMText._recurrence`: the input of a call with gradients is
    ``state + other`` (``other``: the other level's state; for ``ut`` always the embedding);
    a state carries the graph of the calls that made it while they had gradients, and
    ``z_H`` starts as the trained embedding. A call's backward runs when its output reaches
    the loss through calls with gradients: every call with gradients, except when the last
    call has none (``hrm`` with ``bp_steps = 1``: the one L-step with gradients feeds only
    the no-grad H-step, so nothing is backpropagated through the stacks).
    """
    calls = stack_calls(config, bp_steps)
    embedding = -1
    state: dict[str, set[int]] = {"H": {embedding}, "L": set()}  # what each state's graph holds
    inputs: list[set[int]] = []
    for call, (level, with_grad) in enumerate(calls):
        other = "H" if level == "L" else "L"
        inputs.append(state[level] | state[other] if with_grad else set())
        state[level] = inputs[-1] | {call} if with_grad else set()
    reached: set[int] = set()
    todo = [len(calls) - 1] if calls[-1][1] else []
    while todo:
        call = todo.pop()
        if call not in reached:
            reached.add(call)
            todo += [c for c in inputs[call] if c != embedding]
    return [(call in reached, bool(inputs[call])) for call in range(len(calls))]


def train_step_flops(config: ModelConfig, rows: RowWork | Iterable[RowWork], bp_steps: int | None) -> StepFlops:
    """The FLOPs of one train step with ``bp_steps`` over ``rows`` (one :class:`RowWork`, or
    one per data-parallel rank: the step's total); see the module docstring."""
    rows = [rows] if isinstance(rows, RowWork) else list(rows)
    T, P, S = (sum(getattr(r, k) for r in rows) for k in ("tokens", "pairs", "supervised"))
    d, I, V = config.hidden_size, config.intermediate_size, config.padded_vocab_size
    w = config.num_heads * config.head_dim
    layers = config.layers_per_stack
    proj_fwd = layers * 2 * T * (4 * d * w + w * d + 2 * d * I + I * d)
    attn_fwd = layers * 4 * P * w
    first_input_grad = 2 * T * d * 4 * w

    backward = backward_calls(config, bp_steps)
    runs = sum(b for b, _ in backward)
    skipped_input_grads = sum(b and not needs for b, needs in backward)
    projections = (len(backward) + 2 * runs) * proj_fwd - skipped_input_grads * first_input_grad
    attention = (len(backward) + 2 * runs) * attn_fwd
    lm_head = 2 * S * d * V * (2 + backward[-1][0])
    return StepFlops(projections, attention, lm_head)


def num_parameters(config: ModelConfig) -> int:
    """Trained parameters of a model of ``config`` (what :meth:`HRMText.num_parameters` counts),
    without building it."""
    d, I, V = config.hidden_size, config.intermediate_size, config.padded_vocab_size
    w = config.num_heads * config.head_dim
    block = d * 4 * w + w * d + d * 2 * I + I * d
    stacks = 2 if config.arch == "hrm" else 1
    return 2 * V * d + stacks * config.layers_per_stack * block


__all__ = ["RowWork", "StepFlops", "backward_calls", "train_step_flops", "num_parameters"]
