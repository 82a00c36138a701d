"""What autograd keeps for backward: shared by the tests that bound activation memory."""

import torch


def saved_bytes(fn) -> int:
    """Bytes of every tensor autograd saves for backward while ``fn()`` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
