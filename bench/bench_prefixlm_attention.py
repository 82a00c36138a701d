"""PrefixLM varlen attention on this CPU: every way of computing it, side by side in one run.

    python bench/bench_prefixlm_attention.py [--quick] [--threads N] [--out results.json]

One packed row of T = 4096 tokens, 4 heads, head dim 64, fp32; sequence lengths drawn
log-normally around 270 tokens, prefixes half of each sequence, trailing padding. Timed
(median of repeated runs, wall clock) in forward and forward+backward:

- ``sdpa_dense``: one ``scaled_dot_product_attention`` over the dense [T, T] mask;
- ``sdpa_loop``: a Python loop of ``scaled_dot_product_attention``, one call per sequence;
- ``torch``: the readable reference (``prefixlm_attention_reference``);
- ``cpu``: the block-sparse C++ backend;
- ``cpu_bf16``: the same on the inputs rounded to bf16 (as under bf16 autocast): bf16
  products with fp32 accumulation where the CPU has AVX512_BF16 (on AMX tiles where it has
  AMX-BF16, unless ``HRM_CPU_AMX=0``), else the fp32 path;
- ``flex``: ``torch.compile``d ``flex_attention`` with the equivalent block mask (forward
  only; the mask build is timed on its own).

GFLOP/s count only the useful (unmasked) work: forward ``4 * pairs * head_dim`` per head,
forward+backward 3.5 times that (flash-attention's convention: the backward is 2.5 forward
passes, the recomputation of ``q k^T`` included). They sit next to this CPU's own matmul
GFLOP/s in the method's dtype (fp32, or bf16 for ``cpu_bf16``), measured in the same run.
Parity is the max abs error of the output against the fp64 reference (of the fp32 inputs)
over the real rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics

import torch
import torch.nn.functional as F

from hrm.bench.timing import matmul_peak_gflops, measure
from hrm.ops import AttentionPacking
from hrm.ops.impl.prefixlm_attention import cpu as attention_cpu
from hrm.ops.impl.prefixlm_attention import packing as layout
from hrm.ops.impl.prefixlm_attention.op import prefixlm_attention_cpu
from hrm.ops.impl.prefixlm_attention.reference import prefixlm_attention_reference


def lognormal_packing(T: int, median: float = 270.0, sigma: float = 0.5, seed: int = 0):
    """Sequences of log-normal length (at least 2) with half-length prefixes, packed first-come
    until the next one would overflow ``T``; the rest of the row is padding."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while True:
        L = max(2, round(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item())))
        if sum(lengths) + L > T:
            break
        lengths.append(L)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    prefixes = torch.tensor([max(1, L // 2) for L in lengths], dtype=torch.int32)
    return cu, prefixes


def sdpa_dense(q, k, v, cu, pl, mask):
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1).nan_to_num(0.0)  # padding rows see no key


def sdpa_loop(q, k, v, cu, pl, masks):
    """One SDPA call per sequence, with that sequence's PrefixLM mask (built once, outside the timing)."""
    out = torch.zeros_like(q)
    for (s, e), m in masks:
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=m
        ).transpose(0, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, rounds = (3, 1) if args.quick else (3, 5)
    T, H, D = args.tokens, args.heads, args.head_dim

    cu, pl = lognormal_packing(T)
    total = int(cu[-1])
    cu_l, pl_l = cu.tolist(), pl.tolist()
    packing = AttentionPacking.build(cu_l, pl_l, T)
    pairs = layout.allowed_pairs(cu, pl, T)
    fwd_flops = 4.0 * pairs * D * H
    tiles = layout.tile_counts(cu, pl, T, 64, 64)
    lo, hi = packing.row_lo, packing.row_hi

    g = torch.Generator().manual_seed(1)
    q, k, v, go = (torch.randn(T, H, D, generator=g) for _ in range(4))
    want = prefixlm_attention_reference(q.double(), k.double(), v.double(), packing)
    inputs = {dt: [x.to(dt) for x in (q, k, v, go)] for dt in (torch.float32, torch.bfloat16)}

    dense_mask = layout.prefixlm_dense_mask(cu, pl, T)
    loop_masks = []
    for i, p in enumerate(pl_l):
        s, e = cu_l[i], cu_l[i + 1]
        pos = torch.arange(e - s)
        loop_masks.append(((s, e), (pos[None, :] < p) | (pos[None, :] <= pos[:, None])))

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lo64, hi64 = lo.long(), hi.long()

    def prefixlm_mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo64[q_idx]) & (kv_idx < hi64[q_idx])

    mask_build_s = measure(
        lambda: create_block_mask(prefixlm_mask_mod, None, None, T, T, device="cpu"), warmup=1, reps=reps
    )
    block_mask = create_block_mask(prefixlm_mask_mod, None, None, T, T, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_fn(q, k, v, cu, pl):
        out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask)
        return out[0].transpose(0, 1)

    f32, bf16 = torch.float32, torch.bfloat16
    methods = {  # name: (fn, has a backward, input dtype)
        "sdpa_dense": (lambda q, k, v, cu, pl: sdpa_dense(q, k, v, cu, pl, dense_mask), True, f32),
        "sdpa_loop": (lambda q, k, v, cu, pl: sdpa_loop(q, k, v, cu, pl, loop_masks), True, f32),
        "torch": (lambda q, k, v, cu, pl: prefixlm_attention_reference(q, k, v, packing), True, f32),
        "cpu": (lambda q, k, v, cu, pl: prefixlm_attention_cpu(q, k, v, packing), True, f32),
        "cpu_bf16": (lambda q, k, v, cu, pl: prefixlm_attention_cpu(q, k, v, packing), True, bf16),
        "flex": (flex_fn, False, f32),
    }

    def forward(fn, dtype):
        with torch.no_grad():
            return fn(*inputs[dtype][:3], cu, pl)

    leaves = {dt: [x.clone().requires_grad_() for x in xs[:3]] for dt, xs in inputs.items()}

    def forward_backward(fn, dtype):
        out = fn(*leaves[dtype], cu, pl)
        return torch.autograd.grad(out, leaves[dtype], inputs[dtype][3])

    parity = {
        name: (forward(fn, dt)[:total].double() - want[:total]).abs().max().item()
        for name, (fn, _, dt) in methods.items()
    }  # also compiles flex and builds the CPU kernel

    peaks, times = {f32: [], bf16: []}, {}
    for _ in range(rounds):  # interleave everything, take medians: other processes may share the cores
        for dt in peaks:
            peaks[dt].append(matmul_peak_gflops(dt, reps=reps))
        for name, (fn, has_bwd, dt) in methods.items():
            times.setdefault((name, "forward"), []).append(
                measure(lambda fn=fn, dt=dt: forward(fn, dt), warmup=1, reps=reps)
            )
            if has_bwd:
                times.setdefault((name, "forward+backward"), []).append(
                    measure(lambda fn=fn, dt=dt: forward_backward(fn, dt), warmup=1, reps=reps)
                )
    peak = {dt: max(p) for dt, p in peaks.items()}  # the least disturbed measurement of the matmul peak

    rows = []
    for (name, mode), ts in times.items():
        sec, dt = statistics.median(ts), methods[name][2]
        flops = fwd_flops * (1.0 if mode == "forward" else 3.5)
        rows.append(
            {
                "method": name,
                "mode": mode,
                "dtype": str(dt).removeprefix("torch."),
                "ms": sec * 1e3,
                "best_ms": min(ts) * 1e3,
                "gflops": flops / sec / 1e9,
                "frac_peak": flops / sec / 1e9 / peak[dt],
                "best_frac_peak": flops / min(ts) / 1e9 / peak[dt],
                "parity": parity[name],
            }
        )
    by = {(r["method"], r["mode"]): r for r in rows}
    for r in rows:
        base = by.get(("sdpa_loop", r["mode"]))
        r["speedup_vs_sdpa_loop"] = base["ms"] / r["ms"] if base else None

    cpu_fb, loop_fb, cpu_f, flex_f = (
        by[("cpu", "forward+backward")],
        by[("sdpa_loop", "forward+backward")],
        by[("cpu", "forward")],
        by[("flex", "forward")],
    )
    bf16_fb = by[("cpu_bf16", "forward+backward")]
    targets = {  # on medians; the best rounds are reported next to them
        "cpu fwd+bwd >= 2x faster than the per-sequence SDPA loop": (
            loop_fb["ms"] / cpu_fb["ms"] >= 2.0,
            loop_fb["best_ms"] / cpu_fb["best_ms"] >= 2.0,
        ),
        "cpu fwd+bwd >= 40% of the matmul peak on useful work": (
            cpu_fb["frac_peak"] >= 0.40,
            cpu_fb["best_frac_peak"] >= 0.40,
        ),
        "cpu forward faster than compiled flex_attention": (
            cpu_f["ms"] < flex_f["ms"],
            cpu_f["best_ms"] < flex_f["best_ms"],
        ),
        "cpu fwd+bwd on bf16 inputs >= 2x faster than on fp32": (
            cpu_fb["ms"] / bf16_fb["ms"] >= 2.0,
            cpu_fb["best_ms"] / bf16_fb["best_ms"] >= 2.0,
        ),
    }
    bf16_dots = attention_cpu.cpu_ops().bf16_dots()
    amx = attention_cpu.cpu_ops().amx_tiles()
    result = {
        "shape": {
            "tokens": T,
            "real_tokens": total,
            "sequences": len(pl_l),
            "heads": H,
            "head_dim": D,
            "dtype": "float32",
        },
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peak[f32],
        "matmul_peak_samples": peaks[f32],
        "bf16_matmul_peak_gflops": peak[bf16],
        "bf16_matmul_peak_samples": peaks[bf16],
        "cpu_bf16_products": bf16_dots,
        "cpu_bf16_amx_tiles": amx,
        "cpu_bf16_speedup": cpu_fb["ms"] / bf16_fb["ms"],
        "useful_pairs": pairs,
        "tiles_64x64": tiles,
        "tiles_skipped": tiles["empty"] / tiles["total"],
        "flex_mask_build_ms": mask_build_s * 1e3,
        "flex_mask_sparsity_pct": block_mask.sparsity(),
        "rows": rows,
        "targets": targets,
    }

    products = (
        ("bf16 products on AMX tiles" if amx else "bf16 products (AVX512_BF16)")
        if bf16_dots
        else "fp32 path (no AVX512_BF16)"
    )
    print(
        f"T={T} ({total} real, {len(pl_l)} sequences) heads={H} head_dim={D} fp32 (cpu_bf16: bf16), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"tiles 64x64: {tiles['empty']}/{tiles['total']} empty (skipped {result['tiles_skipped']:.1%}), "
        f"{tiles['full']} full, {tiles['partial']} partial; useful pairs {pairs} "
        f"({pairs / total**2:.1%} of the real rows' T^2)"
    )
    print(
        f"matmul peak (2048^3, best of {len(peaks[f32])}): fp32 {peak[f32]:.1f}, bf16 {peak[bf16]:.1f} GFLOP/s; "
        f"flex block mask build {mask_build_s * 1e3:.1f} ms ({block_mask.sparsity():.1f}% sparse)"
    )
    print(f"cpu_bf16 runs the {products}: fwd+bwd {result['cpu_bf16_speedup']:.2f}x faster than cpu on fp32")
    print(f"median of {rounds} rounds x median of {reps} runs; 'best' is the fastest round")
    print(
        f"{'method':<11} {'mode':<17} {'ms':>9} {'best ms':>9} {'GFLOP/s':>8} {'%peak':>6} {'best%pk':>7} "
        f"{'vs loop':>8} {'parity':>9}"
    )
    for r in sorted(rows, key=lambda r: (r["mode"], r["ms"])):
        sp = f"{r['speedup_vs_sdpa_loop']:.2f}x" if r["speedup_vs_sdpa_loop"] else ""
        print(
            f"{r['method']:<11} {r['mode']:<17} {r['ms']:9.2f} {r['best_ms']:9.2f} {r['gflops']:8.1f} "
            f"{r['frac_peak']:6.1%} {r['best_frac_peak']:7.1%} {sp:>8} {r['parity']:9.2e}"
        )
    for what, (ok, ok_best) in targets.items():
        print(f"target {'MET' if ok else 'NOT MET'} (best round: {'met' if ok_best else 'not met'}): {what}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
