"""Public ops used by the model: ``hrm.ops.<op>`` is the function. Each op's code (reference,
fused backends, custom-op registration) lives in ``hrm.ops.impl.<op>``; the backend is
chosen in :mod:`hrm.ops.dispatch`; :mod:`hrm.ops.common` holds what they share."""

from hrm.ops import cpp_extension  # noqa: F401  (registers the cpu backend's probe)
from hrm.ops.common import linear_dtype
from hrm.ops.dispatch import BACKENDS, available_backends, resolve_backend
from hrm.ops.impl.adam_atan2 import adam_atan2_
from hrm.ops.impl.cross_entropy import IGNORE_INDEX, cross_entropy
from hrm.ops.impl.decode_attention import decode_attention
from hrm.ops.impl.embedding import embedding
from hrm.ops.impl.global_norm import global_norm
from hrm.ops.impl.linear_cross_entropy import linear_cross_entropy, supervised_rows
from hrm.ops.impl.magicnorm_transition import magicnorm_transition
from hrm.ops.impl.prefixlm_attention import AttentionPacking, allowed_pairs, prefixlm_attention, prepare_packing
from hrm.ops.impl.rms_norm import add_rms_norm, rms_norm
from hrm.ops.impl.split_rope import rope, rope_cos_sin, split_rope
from hrm.ops.impl.swiglu import swiglu, swiglu_linear

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "AttentionPacking",
    "adam_atan2_",
    "add_rms_norm",
    "allowed_pairs",
    "available_backends",
    "cross_entropy",
    "decode_attention",
    "embedding",
    "global_norm",
    "linear_cross_entropy",
    "linear_dtype",
    "magicnorm_transition",
    "prefixlm_attention",
    "prepare_packing",
    "resolve_backend",
    "rms_norm",
    "rope",
    "rope_cos_sin",
    "split_rope",
    "supervised_rows",
    "swiglu",
    "swiglu_linear",
]
