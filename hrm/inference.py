"""Generation with a KV cache per (stack invocation, layer).

The recurrence runs ``H_cycles * (L_cycles + 1)`` stack invocations per token and each
invocation sees different hidden states, so every (invocation, layer) pair -- a *slot* --
keeps its own keys and values. A prompt is the instruction: it is prefilled as one packed
PrefixLM batch (bidirectional over the whole prompt); every generated token is then a
causal query that sees its own sequence's cached keys and itself. Greedy decoding with
the cache gives the same tokens as recomputing the full sequence each step.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from hrm import ops
from hrm.model import HRMText


class KVCache:
    """Padded per-slot cache ``[B, max_len, heads, head_dim]`` for a batch of prompts.

    The model calls :meth:`attend` in place of packed attention. Between forwards,
    :meth:`prefill` / :meth:`decode` set the phase; :meth:`advance` commits the tokens just
    processed (one length update per forward, shared by all slots).
    """

    def __init__(self, model: HRMText, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = model.config
        slots = cfg.num_stack_calls * cfg.layers_per_stack
        shape = (slots, batch, max_len, cfg.num_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.backend = model.backend
        self._prompts: ops.AttentionPacking | None = None  # set while prefilling

    def prefill(self, prompts: ops.AttentionPacking) -> None:
        """Prefill mode: the prompts are packed as ``prompts`` (every token a prefix token)."""
        self._prompts = prompts

    def decode(self) -> None:
        self._prompts = None

    def advance(self, num_new: torch.Tensor | int) -> None:
        self.lengths += num_new

    def attend(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self._prompts is not None:  # prefill: q/k/v packed [T, H, D]; every token is prefix
            cu = self._prompts.cu_seqlens
            lens = cu[1:] - cu[:-1]
            seq = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens, output_size=q.shape[0])
            pos = torch.arange(q.shape[0], device=q.device) - cu[:-1].long()[seq]
            self.k[slot, seq, pos] = k
            self.v[slot, seq, pos] = v
            return ops.prefixlm_attention(q, k, v, self._prompts, gate=gate, backend=self.backend)
        # decode: one new token per sequence, q/k/v [B, H, D], written at position lengths[b]
        b = torch.arange(q.shape[0], device=q.device)
        self.k[slot, b, self.lengths] = k
        self.v[slot, b, self.lengths] = v
        span = int(self.lengths.max()) + 1
        keys = self.k[slot, :, :span].transpose(1, 2)  # [B, H, S, D]
        values = self.v[slot, :, :span].transpose(1, 2)
        visible = torch.arange(span, device=q.device)[None, :] <= self.lengths[:, None]  # [B, S]
        o = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=visible[:, None, None, :])
        return torch.sigmoid(gate) * o[:, :, 0, :]


def _next_tokens(
    logits: torch.Tensor, vocab_size: int, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    logits = logits.float()
    logits[:, vocab_size:] = float("-inf")  # never emit vocabulary padding rows
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate(
    model: HRMText,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt (an encoded instruction) until ``eos_id`` or ``max_new_tokens``.

    Returns the generated ids per prompt, without the end token. ``temperature == 0`` is
    greedy; otherwise tokens are sampled from ``softmax(logits / temperature)``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    lens = torch.tensor(lengths, device=device)
    packing = ops.AttentionPacking.build([0, *itertools.accumulate(lengths)], lengths, sum(lengths), device)
    cu = packing.cu_seqlens
    cache = KVCache(model, batch, max(lengths) + max_new_tokens, dtype, device)

    ids = torch.tensor([t for p in prompts for t in p], device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    cache.prefill(packing)
    z = model.hidden_states(ids, positions, cu, packing.prefix_lens, cache=cache, packing=packing)
    cache.advance(lens)
    logits = model.lm_head(z[cu[1:].long() - 1])  # [B, V]: the last prompt token predicts the answer

    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    one_each = torch.arange(batch + 1, device=device, dtype=torch.int32)
    cache.decode()
    for step in range(max_new_tokens):
        token = _next_tokens(logits, model.config.vocab_size, temperature, generator)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                if t == eos_id:
                    done[b] = True
                else:
                    out[b].append(t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        z = model.hidden_states(
            token, cache.lengths.clone(), one_each, torch.ones(batch, dtype=torch.int32, device=device), cache=cache
        )
        cache.advance(1)
        logits = model.lm_head(z)
    return out


@torch.inference_mode()
def generate_uncached(model: HRMText, prompt: list[int], *, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence every step (the cache's oracle)."""
    device = next(model.parameters()).device
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        n = len(seq)
        logits = model(
            torch.tensor(seq, device=device),
            torch.arange(n, device=device),
            torch.tensor([0, n], dtype=torch.int32, device=device),
            torch.tensor([len(prompt)], dtype=torch.int32, device=device),
        )
        token = int(_next_tokens(logits[-1:], model.config.vocab_size, 0.0, None))
        if token == eos_id:
            break
        out.append(token)
        seq.append(token)
    return out


def exact_match(model: HRMText, samples: list, *, eos_id: int, batch_size: int = 64) -> float:
    """Fraction of samples whose greedy answer equals the reference response exactly.

    ``samples`` are :class:`hrm.data.Sample` (``response`` ends with ``eos_id``); an answer
    matches when the model emits the response tokens and then stops.
    """
    if not samples:
        raise ValueError("exact_match needs at least one sample")
    hits = 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        targets = [
            list(s.response[:-1]) if s.response and s.response[-1] == eos_id else list(s.response) for s in chunk
        ]
        answers = generate(
            model, [list(s.instruction) for s in chunk], max_new_tokens=max(len(t) for t in targets) + 1, eos_id=eos_id
        )
        hits += sum(a == t for a, t in zip(answers, targets))
    return hits / len(samples)
