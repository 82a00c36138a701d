"""``count_host_reads``: what it counts and what it leaves alone."""

from __future__ import annotations

import pytest
import torch

from hrm.doctor import count_host_reads


# -- count_host_reads ------------------------------------------------------------------------
def test_count_host_reads_counts_item_bool_int_and_tolist():
    t = torch.tensor([1.5, -2.0, 3.0])
    before = torch.Tensor.tolist
    with count_host_reads() as reads:
        t[0].item()
        bool(t[1] > 0)
        int(t[2])
        t.tolist()
    assert (reads.local_scalar_dense, reads.tolist, reads.total) == (3, 1, 4)
    assert sum(reads.sites.values()) == 4 and all(__file__ in site for site in reads.sites)
    assert torch.Tensor.tolist is before


def test_count_host_reads_is_zero_for_tensor_ops_and_restores_tolist_after_an_error():
    t = torch.randn(4, 3, requires_grad=True)
    before = torch.Tensor.tolist
    with count_host_reads() as reads:
        y = (t.sin() @ t.T).softmax(-1).sum()
        y.backward()
        torch.where(t > 0, t, 0).cumsum(0)
    assert reads.total == 0
    with pytest.raises(RuntimeError), count_host_reads():
        raise RuntimeError("boom")
    assert torch.Tensor.tolist is before
    assert t.tolist() == t.detach().numpy().tolist()


@torch.library.custom_op("hrm_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    if bool(x.sum() > 0):  # a host read inside a custom op's body
        return x * 2
    return x * 3


_reads_inside.register_autograd(lambda ctx, g: g * float(g.abs().max()))  # and one in its backward


def test_count_host_reads_sees_inside_custom_ops():
    """A custom op's body runs below autograd; its reads count too (forward and backward)."""
    x = torch.ones(3, requires_grad=True)
    with count_host_reads() as reads:
        _reads_inside(x).sum().backward()
    assert reads.local_scalar_dense == 2 and reads.tolist == 0
