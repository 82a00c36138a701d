"""Counting host reads of tensor data: every ``.item()``, ``bool(t)``, ``int(t)`` (they dispatch
``aten._local_scalar_dense``) and every ``Tensor.tolist()`` inside a block."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class HostReads:
    local_scalar_dense: int = 0
    tolist: int = 0

    @property
    def total(self) -> int:
        return self.local_scalar_dense + self.tolist


class _Counter(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.local_scalar_dense += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        reads.tolist += 1
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted
    try:
        with _Counter(reads):
            yield reads
    finally:
        torch.Tensor.tolist = tolist
