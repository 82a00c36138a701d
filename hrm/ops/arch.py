"""Per-architecture limits of the NVIDIA GPUs the Triton kernels target: one table that the tile
pickers (:func:`hrm.ops.impl.prefixlm_attention.triton_kernels.attention_config`), the
ahead-of-time checks (:mod:`hrm.ops.aot`, ``hrm kernels report``) and the tuner
(:mod:`hrm.tuning`) all read.

Sources: the CUDA C++ Programming Guide, "Compute Capabilities", table "Technical
Specifications per Compute Capability" (rows: maximum number of resident blocks / threads
per SM, number of 32-bit registers per SM, maximum number of 32-bit registers per thread,
maximum amount of shared memory per SM, maximum amount of shared memory per thread block
(opt-in, the ``cudaFuncAttributeMaxDynamicSharedMemorySize`` limit that Triton uses)).
Register allocation granularity (256 registers per warp) and the 1 KB of shared memory the
driver reserves per resident block are from the CUDA Occupancy Calculator for these
architectures.

Capabilities map to an entry by :func:`arch_for_capability`: the exact entry, else the
nearest lower known one (its limits are then a guess, which :attr:`ArchMatch.note` says).
"""

from __future__ import annotations

from dataclasses import dataclass

from hrm.errors import HrmError

KB = 1024


@dataclass(frozen=True)
class Arch:
    """Limits of one compute capability. ``name`` is the ptxas target (``sm_90a``: Hopper's
    arch-specific features, which Triton compiles for on capability 9.0)."""

    name: str
    capability: int  # 80, 86, 89, 90, 120
    smem_per_block: int  # bytes, opt-in maximum per thread block
    smem_per_sm: int  # bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256  # registers, allocated per warp in units of this
    smem_reserved_per_block: int = 1 * KB  # the driver's per-block reservation (sm_80 and later)
    examples: str = ""

    @property
    def major_minor(self) -> tuple[int, int]:
        return self.capability // 10, self.capability % 10


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sm_80", 80, 166912, 164 * KB, 2048, 32, examples="A100, A30"),
        Arch("sm_86", 86, 101376, 100 * KB, 1536, 16, examples="RTX 30xx, A10, A40, RTX A6000"),
        Arch("sm_89", 89, 101376, 100 * KB, 1536, 24, examples="RTX 40xx, L4, L40S, RTX 6000 Ada"),
        Arch("sm_90a", 90, 232448, 228 * KB, 2048, 32, examples="H100, H200, GH200"),
        Arch("sm_120", 120, 101376, 100 * KB, 1536, 32, examples="RTX 50xx, RTX PRO 6000 Blackwell"),
    )
}
_BY_CAPABILITY = {a.capability: a for a in ARCHS.values()}


@dataclass(frozen=True)
class ArchMatch:
    arch: Arch
    exact: bool
    note: str  # empty when exact


def arch_for_capability(capability: tuple[int, int] | int) -> ArchMatch:
    """The table entry for a device capability (``(9, 0)`` or ``90``): the exact one, else the
    nearest lower known capability (say sm_87 -> sm_86, sm_100 -> sm_90a), else the lowest."""
    cap = capability[0] * 10 + capability[1] if isinstance(capability, tuple) else int(capability)
    if cap in _BY_CAPABILITY:
        return ArchMatch(_BY_CAPABILITY[cap], True, "")
    lower = [c for c in _BY_CAPABILITY if c < cap]
    arch = _BY_CAPABILITY[max(lower)] if lower else _BY_CAPABILITY[min(_BY_CAPABILITY)]
    note = f"capability {cap // 10}.{cap % 10} is not in the arch table; using the limits of {arch.name}"
    return ArchMatch(arch, False, note)


def parse_arch(name: str) -> Arch:
    """``sm_80``, ``sm_90``, ``sm_90a``, ``90`` or ``9.0`` -> its :class:`Arch` (exact entries only)."""
    s = name.strip().lower()
    if s in ARCHS:
        return ARCHS[s]
    s = s.removeprefix("sm_").removesuffix("a")
    try:
        cap = int(round(float(s) * 10)) if "." in s else int(s)
    except ValueError:
        cap = -1
    if cap not in _BY_CAPABILITY:
        raise HrmError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    return _BY_CAPABILITY[cap]


def parse_archs(names: str) -> list[Arch]:
    """A comma-separated list of :func:`parse_arch` names."""
    return [parse_arch(n) for n in names.split(",") if n.strip()]


def occupancy(arch: Arch, registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM of a kernel using ``registers`` per thread, ``shared_bytes`` per
    block and ``num_warps`` warps, and what limits it (``threads``, ``registers``,
    ``shared``, ``blocks``); 0 blocks when it cannot launch at all."""
    threads = num_warps * 32
    by_threads = arch.max_threads_per_sm // threads
    regs_per_warp = -(-max(registers, 1) * 32 // arch.reg_alloc_unit) * arch.reg_alloc_unit
    by_regs = (arch.regs_per_sm // regs_per_warp) // num_warps if registers <= arch.max_regs_per_thread else 0
    if shared_bytes > arch.smem_per_block:
        by_smem = 0
    elif shared_bytes > 0:
        by_smem = arch.smem_per_sm // (shared_bytes + arch.smem_reserved_per_block)
    else:
        by_smem = arch.max_blocks_per_sm
    limits = {"threads": by_threads, "registers": by_regs, "shared": by_smem, "blocks": arch.max_blocks_per_sm}
    which = min(limits, key=lambda k: limits[k])
    return limits[which], which


__all__ = ["ARCHS", "Arch", "ArchMatch", "arch_for_capability", "occupancy", "parse_arch", "parse_archs"]
