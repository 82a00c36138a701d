"""``hrm doctor``: one command that checks a machine (typically a new GPU) end to end.

It reports the device and the software around it, which kernel backends run here and
why not, checks every op on every backend and dtype against the fp64 oracle, counts the
host reads of a train step, captures it in a CUDA graph, checks attention past 32-bit
offsets, times PrefixLM attention next to the best attention kernels this machine has and
the csrc/ CUDA kernels next to the Triton ones.
Each section runs in its own process (:mod:`hrm.doctor.run`); the checks themselves are in
:mod:`hrm.doctor.checks`. :func:`count_host_reads` is usable on its own, e.g. in tests.
"""

from hrm.doctor.host_reads import HostReads, count_host_reads

# Every section after "device" (which always runs: the others are planned from it).
SECTIONS = ("device", "parity", "long_attention", "host_reads", "cuda_graph", "attention_timing", "cuda_kernels")
CUDA_ONLY = ("long_attention", "cuda_graph", "cuda_kernels")  # on a CPU these report "skipped: needs a CUDA device"

__all__ = ["CUDA_ONLY", "SECTIONS", "HostReads", "count_host_reads"]
