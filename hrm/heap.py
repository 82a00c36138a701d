"""glibc malloc settings for the processes that train: keep freed memory for reuse.

A train step allocates and frees the same large buffers every step (activations, the
loss's logits chunks, gradients, the optimizer's temporaries: megabytes each). With glibc's
defaults, blocks past the dynamic mmap threshold are ``mmap``-ed and unmapped when freed,
and the heap's top is trimmed back whenever it exceeds twice that threshold, so every step
faults the same pages in again, the kernel zeroing each one: a visible share of a train
step on the 2-core machines this project measures on, on every backend.
:func:`retain_freed_memory` fixes the thresholds with ``mallopt``: blocks up to
32 MiB (glibc's largest mmap threshold) come from the heap, which is trimmed only past
1 GiB of free top and grows 64 MiB at a time. Freed memory then stays in the process for
the next step, as PyTorch's CUDA caching allocator keeps it on a GPU; the peak resident set
is still about one step's.

``hrm`` applies it once per process at the start of every command (:func:`hrm.cli.main`) and
in the benchmark's train-step children, to every backend alike, so ratios stay fair. A
Python program that trains through the library can call it itself. Elsewhere (not glibc,
not Linux) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


@functools.cache
def retain_freed_memory() -> bool:
    """Set the thresholds above (once per process); ``True`` when glibc took all three."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all([mallopt(param, value) == 1 for param, value in settings])
