"""One module per op (a package where an op has grown several concerns), named after it. Each
reads top to bottom: the PyTorch reference (the ``torch`` backend and the oracle), the
Triton kernels, their launchers, the custom ops with autograd, the ahead-of-time specs,
the ``compile`` backend, and the public function that :mod:`hrm.ops` re-exports. The index
of ops, kernels, tests and bench cases is in docs/design.md."""
