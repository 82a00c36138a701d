"""Generation with a static-shape KV cache per (stack invocation, layer).

The recurrence runs ``H_cycles * (L_cycles + 1)`` stack invocations per token and each
invocation sees different hidden states, so every (invocation, layer) pair -- a *slot* --
keeps its own keys and values. A prompt is the instruction: the prompts of a batch are
prefilled as one packed PrefixLM batch (bidirectional over each prompt, on the model's
attention backend); every generated token is then a causal query that sees its own
sequence's cached keys and itself.

Decoding is built so that a token costs no Python work beyond the loop:

- the cache is preallocated ``[B, heads, S, head_dim]`` per slot with ``S`` rounded up to a
  bucket, and each decode step's attention (:func:`hrm.ops.decode_attention`) takes the whole
  cache and the positions ``[B]`` as tensors, so every step has the same shapes (no
  ``lengths.max()`` read, no growing slices); the ``cpu`` backend's kernel reads only the
  visible positions;
- one step (embedding, the whole recurrence, LM head, greedy or sampled choice, the
  finished-sequence mask) is one function of device tensors; :class:`Decoder` runs it
  eagerly or compiled as one graph (``torch.compile``; on a CPU with the weights frozen in,
  on CUDA with ``mode="reduce-overhead"``, which captures it as a CUDA graph);
- sampling happens on the device (exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)``
  drawn from the caller's generator), finished sequences keep emitting the end token, and
  the host reads the finished mask only every ``check_every`` tokens to stop early.

Greedy decoding with the cache gives the same tokens as recomputing the full sequence
each step (:func:`generate_uncached`, the oracle of the tests).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from hrm import ops
from hrm.model import HRMText
from hrm.ops.impl.decode_attention import prepare as prepare_decode_attention

log = logging.getLogger("hrm")

CHECK_EVERY = 8  # decode steps between two host reads of the finished mask
LENGTH_BUCKET = 64  # cache lengths round up to a multiple of this (compiled steps: one graph per bucket)


class KVCache:
    """Static cache, one ``[B, heads, S, head_dim]`` key and value tensor per slot.

    The model calls :meth:`attend` in place of packed attention. :meth:`prefill` writes
    the packed prompts (every prompt token a prefix token); in decode mode each sequence's
    one new token is written at its position ``pos[b]`` and attends to positions
    ``0..pos[b]`` (:func:`hrm.ops.decode_attention`), so a decode step's shapes never change. The
    layout is the one attention reads (no transposed copy); one tensor per slot, so that a
    compiled step writes each in place.
    """

    def __init__(self, model: HRMText, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = model.config
        slots = cfg.num_stack_calls * cfg.layers_per_stack
        shape = (batch, cfg.num_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # where each sequence's next token goes
        self.one_each = torch.arange(batch + 1, device=device, dtype=torch.int32)  # cu_seqlens of one token each
        self.ones = torch.ones(batch, dtype=torch.int32, device=device)
        self.backend = model.backend
        prepare_decode_attention(self.backend, device)  # before any compiled step is traced
        self._prompts: ops.AttentionPacking | None = None  # set while prefilling

    def prefill(self, prompts: ops.AttentionPacking) -> None:
        """Prefill mode: the prompts are packed as ``prompts`` (every token a prefix token)."""
        self._prompts = prompts

    def decode(self) -> None:
        self._prompts = None

    def attend(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self._prompts is not None:  # prefill: q/k/v packed [T, H, D]; every token is prefix
            cu = self._prompts.cu_seqlens
            lens = cu[1:] - cu[:-1]
            seq = torch.repeat_interleave(torch.arange(lens.numel(), device=q.device), lens, output_size=q.shape[0])
            pos = torch.arange(q.shape[0], device=q.device) - cu[:-1].long()[seq]
            self.k[slot][seq, :, pos] = k.to(self.k[slot].dtype)
            self.v[slot][seq, :, pos] = v.to(self.v[slot].dtype)
            return ops.prefixlm_attention(q, k, v, self._prompts, gate=gate, backend=self.backend)
        # decode: one new token per sequence, q/k/v [B, H, D], written at position pos[b]
        return ops.decode_attention(q, k, v, gate, self.k[slot], self.v[slot], self.pos, backend=self.backend)


def _pick(logits: torch.Tensor, vocab_size: int, temperature: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Greedy (``temperature == 0``) or sampled next tokens ``[B]``, never a padding row.

    Sampling is the exponential race: ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` (``noise``)
    draws ``i`` with probability ``p_i = softmax(logits / temperature)_i``."""
    logits = logits.float()
    logits[:, vocab_size:] = float("-inf")  # never emit vocabulary padding rows
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return (probs / noise).argmax(-1)


def _decode_step(
    model: HRMText,
    cache: KVCache,
    token: torch.Tensor,
    done: torch.Tensor,
    noise: torch.Tensor | None,
    eos_id: int,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token for every sequence: feed ``token`` ``[B]`` at ``cache.pos``, return the next
    tokens and the updated finished mask. Finished sequences keep emitting ``eos_id``."""
    z = model.hidden_states(token, cache.pos, cache.one_each, cache.ones, cache=cache, backend=backend)
    cache.pos.add_(1)
    nxt = _pick(model.lm_head(z), model.config.vocab_size, temperature, noise)
    nxt = torch.where(done, eos_id, nxt)
    return nxt, done | (nxt == eos_id)


# A compiled step on a CPU: the weights frozen into the graph as constants, so that inductor's
# C++ GEMM template runs the projections (a few rows each) on weights packed once, where a
# BLAS call repacks them every time (under bf16 autocast the cast to bf16 happens once, at
# freezing); cpp_wrapper: the graph's hundreds of kernel calls per step are made from C++, not from a
# Python wrapper (README, "Generation and evaluation", gives the speed).
CPU_COMPILE = {"cpp_wrapper": True, "freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


class _Step(nn.Module):
    """:func:`_decode_step` of one model as a module: compiled, the model's weights are this
    module's parameters, which freezing folds into the graph."""

    def __init__(self, model: HRMText) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return _decode_step(self.model, *args)


def weights_key(model: nn.Module) -> tuple:
    """What a frozen decode step depends on: every parameter's and buffer's storage and version
    counter (an in-place update -- an optimizer step, ``load_state_dict`` -- bumps it; a write
    through ``.data`` does not, and tensors made under ``torch.inference_mode`` have no
    counter, so only their storage counts)."""
    return tuple(
        (t.data_ptr(), 0 if t.is_inference() else t._version)
        for t in itertools.chain(model.parameters(), model.buffers())
    )


_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()  # model -> weights_key


def compile_step(model: HRMText, device: torch.device) -> Callable:
    """The decode step of ``model`` as one graph (each new shape bucket compiles once).

    CUDA: ``mode="reduce-overhead"`` (a CUDA graph, which reads the live weights). CPU: frozen
    weights and the C++ GEMM template (:data:`CPU_COMPILE`), so a graph holds the weights of
    its compile, and dynamo would hand it out again after they change (its guards do not look
    at values). So every call compares the model's :func:`weights_key` with the one its graphs
    were frozen with and, when they differ, drops every compiled graph
    (``torch.compiler.reset()``) before running: the step then compiles afresh."""
    step = _Step(model)
    if device.type == "cuda":
        return torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead")
    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def run(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key = weights_key(model)
        if _FROZEN.get(model, key) != key:
            log.info("the weights changed since the decode step was frozen: compiling it again")
            torch.compiler.reset()
        _FROZEN[model] = key
        with torch._inductor.config.patch(CPU_COMPILE):  # read when a call compiles
            return compiled(*args)

    return run


def _bucket(n: int) -> int:
    return LENGTH_BUCKET * math.ceil(n / LENGTH_BUCKET)


class Decoder:
    """Batched decoding of one model: prefill, then the same-shape step per token.

    ``compile``: ``True`` runs the step compiled (:func:`compile_step`: the references fused
    by inductor around the backend's decode attention, on a CPU with the weights frozen in; a
    CUDA graph on a GPU), ``False`` (the default) eagerly on the model's backend. Compiling is
    opt-in: on this project's CPU it takes about a minute at preset ``small`` (README,
    "Generation and evaluation", gives the speed it buys); the CUDA graph path has not run on
    a GPU yet. ``batch``: pad every call to this many rows so that
    the compiled step keeps one shape across calls (evaluation batches).
    """

    def __init__(self, model: HRMText, *, compile: bool = False, batch: int | None = None) -> None:
        self.model = model
        self.compile = compile
        self.batch = batch
        self._cache: KVCache | None = None
        self._compiled: Callable | None = None

    def _step(self, device: torch.device) -> Callable:
        if not self.compile:
            return lambda *args: _decode_step(self.model, *args)
        if self._compiled is None:
            self._compiled = compile_step(self.model, device)
        return self._compiled

    def _cache_for(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The previous call's cache when the shape matches (stale entries are never visible:
        a position is written before any query sees it), else a new one. Keeping it keeps
        the addresses a CUDA graph was captured with."""
        c = self._cache
        if c is None or c.k[0].shape[0] != batch or c.k[0].shape[2] != max_len or c.k[0].dtype != dtype:
            c = self._cache = KVCache(self.model, batch, max_len, dtype, device)
        return c

    @torch.inference_mode()
    def stream(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        eos_id: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        check_every: int = CHECK_EVERY,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every prompt ``[len(prompts)]`` (on the device), step by
        step, until every sequence has emitted ``eos_id`` (checked every ``check_every``
        steps; finished sequences emit ``eos_id``) or after ``max_new_tokens`` tokens."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        if max_new_tokens < 1:
            return
        model = self.model
        device = next(model.parameters()).device
        n = len(prompts)
        compiled = self.compile
        batch = max(n, self.batch or 0) if compiled else n  # one compiled shape across calls
        rows = [*prompts, *[prompts[0]] * (batch - n)]  # padding rows repeat the first prompt
        lengths = [len(p) for p in rows]
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        dtype = dtype or next(model.parameters()).dtype
        max_len = max(lengths) + max_new_tokens
        cache = self._cache_for(batch, _bucket(max_len) if compiled else max_len, dtype, device)

        packing = ops.AttentionPacking.build([0, *itertools.accumulate(lengths)], lengths, sum(lengths), device)
        cu = packing.cu_seqlens
        ids = torch.tensor([t for p in rows for t in p], device=device)
        positions = torch.cat([torch.arange(m, device=device) for m in lengths])
        cache.prefill(packing)
        z = model.hidden_states(ids, positions, cu, packing.prefix_lens, cache=cache, packing=packing)
        cache.decode()
        cache.pos.copy_(torch.tensor(lengths, device=device))

        def noise() -> torch.Tensor | None:
            if temperature <= 0:
                return None
            shape = (batch, model.config.padded_vocab_size)
            return torch.empty(shape, device=device).exponential_(generator=generator)

        # the last prompt token predicts the first answer token
        token = _pick(model.lm_head(z[cu[1:].long() - 1]), model.config.vocab_size, temperature, noise())
        done = token == eos_id
        step = self._step(device)
        backend = "torch" if compiled else model.backend  # compiled: inductor fuses the references
        on_cuda_graph = compiled and device.type == "cuda"
        if on_cuda_graph:  # mutated in place by the graph: their addresses must not change
            for t in (*cache.k, *cache.v, cache.pos):
                torch._dynamo.mark_static_address(t)
        yield token[:n]
        for i in range(1, max_new_tokens):
            if i % check_every == 0 and bool(done.all()):
                return
            if on_cuda_graph:
                torch.compiler.cudagraph_mark_step_begin()
            token, done = step(cache, token, done, noise(), eos_id, temperature, backend)
            if on_cuda_graph:  # the graph's output buffers are reused by the next replay
                token, done = token.clone(), done.clone()
            yield token[:n]


def _cut(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row


def generate(
    model: HRMText,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt (an encoded instruction) until ``eos_id`` or ``max_new_tokens``.

    Returns the generated ids per prompt, without the end token. ``temperature == 0`` is
    greedy; otherwise tokens are sampled from ``softmax(logits / temperature)``. The host
    reads the tokens once, at the end.
    """
    steps = list(
        Decoder(model, compile=compile).stream(
            prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature, generator=generator
        )
    )
    if not steps:
        return [[] for _ in prompts]
    return [_cut(row, eos_id) for row in torch.stack(steps, 1).tolist()]


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
        token = int(_pick(logits[-1:], model.config.vocab_size, 0.0, None))
        if token == eos_id:
            break
        out.append(token)
        seq.append(token)
    return out


def exact_match(
    model: HRMText,
    samples: list,
    *,
    eos_id: int,
    batch_size: int = 64,
    compile: bool = False,
    progress: bool = False,
) -> float:
    """Fraction of samples whose greedy answer equals the reference response exactly.

    ``samples`` are :class:`hrm.data.Sample` (``response`` ends with ``eos_id``); an answer
    matches when the model emits the response tokens and then stops. Batches of
    ``batch_size`` prompts of any lengths are prefilled packed and decoded together; with
    ``progress`` a progress bar shows the running exact-match and generated tokens/s.
    """
    if not samples:
        raise ValueError("exact_match needs at least one sample")
    from tqdm import tqdm

    decoder = Decoder(model, compile=compile, batch=min(batch_size, len(samples)))
    bar = tqdm(total=len(samples), unit="sample", dynamic_ncols=True, disable=not progress or None)
    hits = tokens = 0
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        targets = [
            list(s.response[:-1]) if s.response and s.response[-1] == eos_id else list(s.response) for s in chunk
        ]
        steps = list(
            decoder.stream(
                [list(s.instruction) for s in chunk], max_new_tokens=max(len(t) for t in targets) + 1, eos_id=eos_id
            )
        )
        answers = [_cut(row, eos_id) for row in torch.stack(steps, 1).tolist()]
        hits += sum(a == t for a, t in zip(answers, targets))
        tokens += len(steps) * len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(exact=f"{hits / (i + len(chunk)):.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    return hits / len(samples)
