"""Public ops used by the model. Each op lives in its own file with its PyTorch reference
(registered as the ``torch`` backend) and its fused implementations (``compile``,
``triton``); the backend is chosen in :mod:`hrm.ops.dispatch`."""

from hrm.ops.adam_atan2 import adam_atan2_
from hrm.ops.cross_entropy import IGNORE_INDEX, cross_entropy
from hrm.ops.dispatch import BACKENDS, available_backends, resolve_backend
from hrm.ops.embedding import embedding
from hrm.ops.linear_cross_entropy import linear_cross_entropy
from hrm.ops.magicnorm import magicnorm_transition
from hrm.ops.prefixlm_attention import prefixlm_attention
from hrm.ops.rmsnorm import add_rms_norm, rms_norm
from hrm.ops.rope import rope, rope_cos_sin, split_rope
from hrm.ops.swiglu import swiglu

__all__ = [
    "BACKENDS", "IGNORE_INDEX", "adam_atan2_", "add_rms_norm", "available_backends", "cross_entropy", "embedding",
    "linear_cross_entropy", "magicnorm_transition", "prefixlm_attention", "resolve_backend", "rms_norm", "rope",
    "rope_cos_sin", "split_rope", "swiglu",
]
