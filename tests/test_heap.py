"""hrm.heap: with the thresholds set, a step that frees and reallocates large buffers stops
faulting their pages in again (fresh processes, glibc's defaults against ours)."""

import subprocess
import sys

import pytest

from hrm.heap import retain_freed_memory

# A "step": four 24 MiB blocks from malloc (what torch's CPU allocator calls), written, freed.
# With the defaults the freed top of the heap (96 MiB) is past the dynamic trim threshold
# (twice the largest block), so it goes back to the kernel and every step faults it in again.
STEP_FAULTS = """
import ctypes, resource, sys
from hrm.heap import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "1" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 24 << 20
def step():
    blocks = [libc.malloc(SIZE) for _ in range(4)]
    for p in blocks:
        ctypes.memset(p, 1, SIZE)
    for p in blocks:
        libc.free(p)
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def step_faults(retain: bool) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", STEP_FAULTS, "1" if retain else "0"], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_heap_stops_the_page_faults_of_each_step():
    default_applied, default_faults = step_faults(retain=False)
    applied, faults = step_faults(retain=True)
    assert default_applied == "None" and applied == "True"
    assert default_faults > 10_000  # 96 MiB: 24,576 pages of 4 KiB a step
    assert faults < 100


def test_retain_is_applied_once_per_process():
    assert retain_freed_memory() is retain_freed_memory()
