"""Public ops used by the model. Each op lives in its own file with its PyTorch reference
(registered as the ``torch`` backend) and, as they land, its fused kernels; the backend is
chosen in :mod:`hrm.ops.dispatch`."""

from hrm.ops.cross_entropy import IGNORE_INDEX, cross_entropy
from hrm.ops.dispatch import BACKENDS, available_backends, resolve_backend
from hrm.ops.prefixlm_attention import prefixlm_attention
from hrm.ops.rmsnorm import rms_norm
from hrm.ops.rope import rope, rope_cos_sin
from hrm.ops.swiglu import swiglu

__all__ = [
    "BACKENDS", "IGNORE_INDEX", "available_backends", "cross_entropy", "prefixlm_attention", "resolve_backend",
    "rms_norm", "rope", "rope_cos_sin", "swiglu",
]
