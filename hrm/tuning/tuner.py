"""The tuner: for each tunable kernel and shape bucket, prune the candidates the static
report rejects, run the rest against the reference (a wrong result discards a candidate,
however fast), time the survivors and keep the fastest, with the runner-up.

:func:`select` is the decision for one (kernel, bucket) and takes its three steps as
functions (``static``, ``check``, ``time``), so that tests drive it with an injected timer;
:func:`tune` loops over kernels and buckets, writing the table after every bucket and
skipping buckets already in it (resumable); before a bucket's checks it has the case compile
the surviving candidates' kernels on a thread pool (:mod:`hrm.tuning.precompile`). The GPU
side (:class:`AttentionCase`) times with ``triton.testing.do_bench`` medians.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from hrm.tuning.kernels import Bucket, RowBucket, RowKernel, TunableKernel, search_space, source_hash
from hrm.tuning.table import load_table, new_table, save_table

MAX_REASONS = 5  # discarded / pruned configs listed per entry


def select(
    candidates: list[dict],
    static: Callable[[dict], str | None],
    check: Callable[[dict], bool],
    time: Callable[[dict], float],
) -> dict | None:
    """The table entry for one (kernel, bucket), or ``None`` when no candidate survives.

    In candidate order: ``static(c)`` returns a problem (spills, too much shared memory,
    does not compile) -> pruned, never run; ``check(c)`` False or raising -> discarded,
    never timed; else ``time(c)`` in ms. The fastest wins; on equal times the earlier
    candidate (``tie`` records that the runner-up measured the same)."""
    timed: list[tuple[float, int, dict]] = []
    pruned: list[dict] = []
    discarded: list[dict] = []
    for i, c in enumerate(candidates):
        problem = static(c)
        if problem:
            pruned.append({"config": c, "reason": problem})
            continue
        try:
            ok, reason = bool(check(c)), "output differs from the reference"
        except Exception as e:  # a config that fails to launch is no candidate
            ok, reason = False, f"{type(e).__name__}: {str(e).strip()[:200]}"
        if not ok:
            discarded.append({"config": c, "reason": reason})
            continue
        timed.append((float(time(c)), i, c))
    if not timed:
        return None
    timed.sort(key=lambda t: (t[0], t[1]))
    best, runner = timed[0], (timed[1] if len(timed) > 1 else None)
    return {
        "config": best[2],
        "time_ms": best[0],
        "runner_up": None if runner is None else {"config": runner[2], "time_ms": runner[0]},
        "tie": runner is not None and runner[0] == best[0],
        "candidates": len(candidates),
        "timed": len(timed),
        "pruned": len(pruned),
        "discarded": len(discarded),
        "discarded_examples": discarded[:MAX_REASONS],
        "pruned_examples": pruned[:MAX_REASONS],
    }


class Case:
    """What :func:`tune` needs of one (kernel, bucket) on the device."""

    def static(self, configs: list[dict]) -> list[str | None]:  # one problem (or None) per config
        raise NotImplementedError

    def precompile(self, configs: list[dict], log: Callable[[str], None] | None = None) -> int:
        """Compile the kernels ``configs`` will launch ahead of their checks (a speed-up only);
        returns how many compiled."""
        return 0

    def check(self, config: dict) -> bool:
        raise NotImplementedError

    def time(self, config: dict) -> float:
        raise NotImplementedError


def tune(
    kernels: list,
    buckets: list | Callable[[Any], list],
    table_path: str | Path,
    device: dict,
    make_case: Callable[[TunableKernel, Bucket], Case],
    *,
    space: Callable[[Any, Any], list[dict]] = search_space,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Tune every (kernel, bucket) not yet in the table at ``table_path``; return the table.
    ``buckets``: one list for every kernel, or ``buckets(kernel)`` (row-wise kernels have
    buckets of their own row widths)."""
    from tqdm import tqdm

    path = Path(table_path)
    table = load_table(path) if resume and path.exists() else new_table(device)
    if table["device"].get("name") != device.get("name"):
        table = new_table(device)  # another device's table: start over rather than mix
    table["device"] = {**table["device"], **device}
    work = [(k, b) for k in kernels for b in (buckets(k) if callable(buckets) else buckets)]
    bar = tqdm(total=len(work), desc="hrm tune", unit="bucket", disable=not progress)
    for k, b in work:
        h = source_hash(k)
        entry = table["kernels"].setdefault(k.name, {"source_hash": h, "buckets": {}})
        if entry["source_hash"] != h:  # the kernel changed since: its old measurements are void
            entry.update(source_hash=h, buckets={})
        bar.set_postfix_str(f"{k.name} {b.key}")
        if b.key in entry["buckets"]:
            bar.update()
            continue
        case = make_case(k, b)
        cands = space(k, b)
        problems = dict(zip(map(_key, cands), case.static(cands)))
        case.precompile([c for c in cands if not problems[_key(c)]], log)
        result = select(cands, lambda c, problems=problems: problems[_key(c)], case.check, case.time)
        if result is None:
            log(f"{k.name} {b.key}: no candidate survived; the heuristic default stays")
        else:
            entry["buckets"][b.key] = result
            save_table(table, path)
        bar.update()
    bar.close()
    return table


def _key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


# -- the attention on a GPU -------------------------------------------------------------------
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2, "fp32": 5e-3}  # max abs error / max(1, max |reference|)


def _matches(got: dict, ref: dict, dtype: str) -> bool:
    """Whether every output of a candidate is within :data:`TOLERANCE` of the reference's."""
    import torch

    if got and next(iter(got.values())).is_cuda:
        torch.cuda.synchronize()
    tol = TOLERANCE[dtype]
    return all(
        (g.float() - ref[name]).abs().max().item() <= tol * max(1.0, ref[name].abs().max().item())
        for name, g in got.items()
    )


class AttentionCase(Case):
    """One attention kernel at one bucket on a CUDA device: a packed row of ``tokens`` tokens
    (sequences of 256 to 1024 tokens, half instruction), the fp32 reference's output and
    gradients, each candidate run through the launchers with the other two kernels at their
    defaults, timed with ``triton.testing.do_bench`` (median)."""

    def __init__(
        self,
        kernel: TunableKernel,
        bucket: Bucket,
        device,
        tokens: int = 8192,
        heads: int = 8,
        capability: tuple[int, int] | None = None,
    ):
        import torch

        from hrm.ops.arch import arch_for_capability
        from hrm.ops.impl.prefixlm_attention import triton_kernels as tk

        self.kernel, self.bucket, self.tk = kernel, bucket, tk
        # capability: the device's; given, for tests of check() under the interpreter on a CPU
        self.capability = capability or torch.cuda.get_device_capability(device)
        self.arch = arch_for_capability(self.capability).arch
        self.base = tk.default_attention_config(bucket.head_dim, bucket.torch_dtype, self.arch.name)
        self._setup_args: tuple | None = (device, tokens, heads)
        self.inputs: tuple = ()

    def _setup(self) -> None:
        """Inputs and the reference, on first use: after :meth:`static`, whose compiles run in
        forked workers, so that those fork before this process allocates on the GPU."""
        if self._setup_args is None:
            return
        import torch

        from hrm.ops.impl.prefixlm_attention.packing import AttentionPacking
        from hrm.ops.impl.prefixlm_attention.reference import prefixlm_attention_reference

        (device, tokens, heads), self._setup_args = self._setup_args, None
        bucket = self.bucket
        gen = torch.Generator().manual_seed(0)
        lengths, total = [], 0
        while total < tokens:
            n = min(int(torch.randint(256, 1025, (1,), generator=gen)), tokens - total)
            lengths.append(n)
            total += n
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        self.packing = AttentionPacking.build(cu, [max(1, n // 2) for n in lengths], tokens, device=device)
        dt, D = bucket.torch_dtype, bucket.head_dim
        q, k, v, gate, do = (torch.randn(tokens, heads, D, generator=gen).to(device, dt) for _ in range(5))
        self.inputs = (q, k, v, gate, do)
        ref_in = [x.float().requires_grad_() for x in (q, k, v, gate)]
        p = self.packing
        ref = prefixlm_attention_reference(*ref_in[:3], p, gate=ref_in[3])
        ref.backward(do.float())
        self.ref = {"out": ref.detach(), "dq": ref_in[0].grad, "dk": ref_in[1].grad, "dv": ref_in[2].grad}

    def _config(self, config: dict):
        return replace(self.base, **{self.kernel.field: self.tk.KernelConfig(**config)})

    def _run(self, config: dict):
        """A callable running what the candidate changes: the forward, or the backward."""
        self._setup()
        q, k, v, gate, do = self.inputs
        p, cfg, tk = self.packing, self._config(config), self.tk
        out, lse = tk.prefixlm_attention_triton_forward(q, k, v, p.row_lo, p.row_hi, gate, cfg)
        if self.kernel.field == "fwd":
            ranges = p.tile_ranges(*cfg.blocks()).fwd
            fn = lambda: tk.prefixlm_attention_triton_forward(q, k, v, p.row_lo, p.row_hi, gate, cfg, ranges)
            return fn, (lambda: {"out": fn()[0]})
        tiles = p.tile_ranges(*cfg.blocks())
        args = (do, q, k, v, out, lse, p.row_lo, p.row_hi, p.col_lo, p.col_hi, gate, cfg, tiles.dq, tiles.dkdv)
        fn = lambda: tk.prefixlm_attention_triton_backward(*args)

        def grads():
            dq, dk, dv, _ = fn()
            return {"dq": dq} if self.kernel.field == "dq" else {"dk": dk, "dv": dv}

        return fn, grads

    def static(self, configs: list[dict]) -> list[str | None]:
        from hrm.ops.aot import compile_report
        from hrm.tuning.kernels import aot_spec
        from hrm.tuning.report import annotate

        cap = self.capability[0] * 10 + self.capability[1]  # the device's own target, its arch's limits
        rows = compile_report([aot_spec(self.kernel, self.bucket, c, cap) for c in configs], (cap,))
        return [annotate(r, self.arch)["problem"] for r in rows]

    def precompile(self, configs: list[dict], log: Callable[[str], None] | None = None) -> int:
        from hrm.tuning.precompile import precompile

        self._setup()
        return precompile([lambda c=c: self._run(c)[0]() for c in configs], log=log)

    def check(self, config: dict) -> bool:
        _, outputs = self._run(config)
        return _matches(outputs(), self.ref, self.bucket.dtype)

    def time(self, config: dict) -> float:
        from triton.testing import do_bench

        fn, _ = self._run(config)
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# -- the row-wise kernels on a GPU ----------------------------------------------------------------
class RowCase(Case):
    """One row-wise kernel at one bucket: ``rows`` random rows of the bucket's width, the
    candidate forced on the kernel's launcher (:func:`hrm.ops.common.forced_row_config`),
    its outputs compared with the op's torch reference in fp32 (forward outputs, or the
    gradients autograd takes through the reference), timed with ``do_bench`` (median)."""

    def __init__(
        self,
        kernel: RowKernel,
        bucket: RowBucket,
        device,
        rows: int = 8192,
        capability: tuple[int, int] | None = None,
    ):
        import torch

        from hrm.ops.arch import arch_for_capability

        self.kernel, self.bucket = kernel, bucket
        self.capability = capability or torch.cuda.get_device_capability(device)
        self.arch = arch_for_capability(self.capability).arch
        self._setup_args: tuple | None = (device, rows)
        self.ref: dict = {}

    def _setup(self) -> None:  # after static(), as AttentionCase._setup
        if self._setup_args is None:
            return
        import torch

        (device, rows), self._setup_args = self._setup_args, None
        gen = torch.Generator().manual_seed(0)
        dt, w, op = self.bucket.torch_dtype, self.bucket.width, self.kernel.op
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dt)
        direction = self.kernel.name.rsplit(".", 1)[1]
        if op == "rms_norm":
            from hrm.ops.impl import rms_norm as m

            x, r, dy, dh = (rand(rows, w) for _ in range(4))
            hf = (x + r).float().requires_grad_()
            y = m.rms_norm_reference(hf)
            y.backward(dy.float())
            self.ref = {"h": (x + r).float(), "y": y.detach(), "dx": hf.grad + dh.float()}
            _, y_s, rstd = m.rms_norm_forward(x, r, 1e-6)
            fwd = lambda: dict(zip(("h", "y"), m.rms_norm_forward(x, r, 1e-6)[:2]))
            bwd = lambda: {"dx": m.rms_norm_backward(dy, y_s, rstd, dh)}
        elif op == "magicnorm_transition":
            from hrm.ops.impl import magicnorm_transition as m

            x, delta, other, dz, du, dn = (rand(rows, w) for _ in range(6))
            xf, of = x.float().requires_grad_(), other.float().requires_grad_()
            outs = m.magicnorm_transition_reference(xf, delta.float(), of)
            torch.autograd.backward(outs, [g.float() for g in (dz, du, dn)])
            self.ref = {"z": outs[0].detach(), "u": outs[1].detach(), "n": outs[2].detach()}
            self.ref.update(dh=xf.grad, dother=of.grad)
            z, _, n_, rh, ru = m.magicnorm_transition_forward(x, delta, other, 1e-6)
            fwd = lambda: dict(zip("zun", m.magicnorm_transition_forward(x, delta, other, 1e-6)[:3]))
            bwd = lambda: dict(zip(("dh", "dother"), m.magicnorm_transition_backward(dz, du, dn, z, n_, rh, ru)))
        elif op == "swiglu":
            from hrm.ops.impl import swiglu as m

            gu, dy = rand(rows, 2 * w), rand(rows, w)
            gf = gu.float().requires_grad_()
            y = m.swiglu_reference(gf)
            y.backward(dy.float())
            self.ref = {"y": y.detach(), "dgu": gf.grad}
            fwd = lambda: {"y": m.swiglu_forward(gu)}
            bwd = lambda: {"dgu": m.swiglu_backward(gu, dy)}
        elif op == "split_rope":
            from hrm.ops.impl import split_rope as m

            hd = self.bucket.head_dim
            heads = w // hd
            gqkv = rand(rows, 4 * heads, hd)
            grads = [rand(rows, heads, hd) for _ in range(4)]
            cos, sin = m.rope_cos_sin(torch.arange(rows, device=device) % 1024, hd, 10000.0)
            gf = gqkv.float().requires_grad_()
            outs = m.split_rope_reference(gf, cos, sin)
            torch.autograd.backward(outs, [g.float() for g in grads])
            self.ref = {**{n: o.detach() for n, o in zip("gqkv", outs)}, "dgqkv": gf.grad}
            fwd = lambda: dict(zip("gqkv", m.split_rope_forward(gqkv, cos, sin)))
            bwd = lambda: {"dgqkv": m.split_rope_backward(*grads, cos, sin)}
        else:
            from hrm.ops.impl import linear_cross_entropy as m

            logits = rand(min(rows, m.default_chunk_rows(w, device=device)), w)
            targets = torch.randint(0, w, (logits.shape[0],), generator=gen).to(device)
            lf = logits.float()
            grad = torch.softmax(lf, -1)
            grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0  # softmax - onehot
            self.ref = {"loss": torch.logsumexp(lf, -1) - lf.gather(1, targets[:, None])[:, 0], "grad": grad}
            del lf
            scratch = logits.clone()

            def fwd():
                g = logits.clone()
                loss, _ = m.ce_chunk_forward(g, targets, True)
                return {"loss": loss, "grad": g}

            self._time_fn = lambda: m.ce_chunk_forward(scratch, targets, True)
            self._outputs = fwd
            return
        self._outputs = fwd if direction == "fwd" else bwd
        self._time_fn = self._outputs

    def _forced(self, fn, config: dict):
        from hrm.ops.common import forced_row_config

        def run():
            with forced_row_config(self.kernel.name, config):
                return fn()

        return run

    def static(self, configs: list[dict]) -> list[str | None]:
        from hrm.ops.aot import compile_report
        from hrm.tuning.kernels import row_aot_spec
        from hrm.tuning.report import annotate

        cap = self.capability[0] * 10 + self.capability[1]
        rows = compile_report([row_aot_spec(self.kernel, self.bucket, c, cap) for c in configs], (cap,))
        return [annotate(r, self.arch)["problem"] for r in rows]

    def precompile(self, configs: list[dict], log: Callable[[str], None] | None = None) -> int:
        from hrm.tuning.precompile import precompile

        self._setup()
        return precompile([self._forced(self._outputs, c) for c in configs], log=log)

    def check(self, config: dict) -> bool:
        self._setup()
        return _matches(self._forced(self._outputs, config)(), self.ref, self.bucket.dtype)

    def time(self, config: dict) -> float:
        from triton.testing import do_bench

        self._setup()
        return float(do_bench(self._forced(self._time_fn, config), warmup=25, rep=100, return_mode="median"))


__all__ = ["AttentionCase", "Case", "RowCase", "TOLERANCE", "select", "tune"]
