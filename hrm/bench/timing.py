"""Timing and the device's own peaks (measured here, never datasheet constants)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    reps: int = 5,
    min_time: float = 0.0,
) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, wall clock on a CPU.

    At least ``reps`` timed calls, more until ``min_time`` seconds have been spent timing.
    """
    return statistics.median(measure_all(fn, device=device, warmup=warmup, reps=reps, min_time=min_time))


def spread(times: list[float]) -> tuple[float, float, float]:
    """``(min, median, max)`` of timed calls."""
    return min(times), statistics.median(times), max(times)


def measure_all(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    reps: int = 5,
    min_time: float = 0.0,
) -> list[float]:
    """The seconds of every timed call of :func:`measure`."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < reps or spent < min_time:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        times.append(t)
        spent += t
    return times


def matmul_peak_gflops(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int = 2048, reps: int = 5
) -> float:
    """Achieved GFLOP/s of a square ``n x n`` matmul: this device's practical GEMM peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / measure(lambda: a @ b, device=device, reps=reps) / 1e9


def copy_bandwidth_gbps(
    device: torch.device | str = "cpu", mib: float = 256, reps: int = 5, min_time: float = 0.0
) -> float:
    """Achieved GB/s of a tensor copy of ``mib`` MiB (bytes read + written): at 256 MiB the
    device's memory bandwidth; at an op's working-set size (src + dst = its bytes) what a plain
    copy of that much data reaches, caches included."""
    src = torch.empty(max(1, int(mib * 2**20) // 4), device=device)
    src.normal_()
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), device=device, reps=reps, min_time=min_time)
    return 2 * src.numel() * 4 / seconds / 1e9
