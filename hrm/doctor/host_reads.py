"""Count the host reads of tensor data that a block of code makes.

A host read copies a tensor's value into Python: ``t.item()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``t.tolist()``. On a GPU each one waits for every queued kernel (a device
sync) and none can run inside a CUDA graph, so a train step should make none::

    with count_host_reads() as reads:
        step()
    assert reads.total == 0, reads.sites

What is counted:

- ``local_scalar_dense``: every ``aten._local_scalar_dense`` (what ``item``, ``bool``,
  ``int``, ``float`` and ``__index__`` of a one-element tensor become), seen by a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode`. Below autograd (inside the
  Python body of a custom op with an autograd formula, or under ``inference_mode``)
  ``aten.item`` and ``aten.is_nonzero`` reach the mode before they decompose; they are
  counted there instead, so each read counts once.
- ``tolist``: every call of ``torch.Tensor.tolist`` (a C++ read that no dispatch mode
  sees), through a wrapper installed for the duration of the block.

Custom ops registered with :func:`torch.library.custom_op` for every device (no
``device_types``, as the ``hrm`` ops are) run their Python body with the mode still
active, so reads inside them count too. Reads made inside C++ kernels (``nonzero``,
``repeat_interleave`` without an output size, ...) are not host reads of Python's and are
not counted; on a GPU ``torch.cuda.set_sync_debug_mode("error")`` catches those.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())


@dataclass
class HostReads:
    """What :func:`count_host_reads` counted: reads of one-element tensors
    (``local_scalar_dense``), ``Tensor.tolist`` calls, and where each was made from
    (``sites``: ``"file:line"`` of the innermost caller outside torch -> count)."""

    local_scalar_dense: int = 0
    tolist: int = 0
    sites: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return self.local_scalar_dense + self.tolist

    def _record(self) -> None:
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == _THIS_FILE
        ):
            frame = frame.f_back
        self.sites[f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"] += 1


class _ScalarReadMode(TorchDispatchMode):
    """Counts the scalar reads of :data:`_SCALAR_READS` into ``reads``."""

    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func in _SCALAR_READS:
            self.reads.local_scalar_dense += 1
            self.reads._record()
        key = torch._C.DispatchKey.CompositeExplicitAutograd
        if func.namespace not in ("aten", "prim", "prims") and torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), key
        ):
            # A custom op's Python body: run it with this mode pushed again (the dispatcher
            # pops it while this method runs) so that the reads inside it count too.
            with self:
                return func._op_dk(key, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads() -> Iterator[HostReads]:
    """Count the host reads of tensor data inside the ``with`` block (see the module
    docstring); yields a :class:`HostReads` that fills in as the block runs.
    ``torch.Tensor.tolist`` is restored on exit, also when the block raises."""
    reads = HostReads()
    had_own = "tolist" in torch.Tensor.__dict__
    before = torch.Tensor.tolist

    @functools.wraps(before)
    def tolist(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reads.tolist += 1
        reads._record()
        return before(self, *args, **kwargs)

    torch.Tensor.tolist = tolist
    try:
        with _ScalarReadMode(reads):
            yield reads
    finally:
        if had_own:
            torch.Tensor.tolist = before
        else:
            del torch.Tensor.tolist
