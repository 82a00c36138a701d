"""Checkpoint interchange: Hugging Face ``transformers`` (``HrmTextForCausalLM``) export and
import (:mod:`hrm.interop.hf`) and the reference implementation's checkpoints
(:mod:`hrm.interop.reference`). Importing this package does not import ``transformers``."""

from hrm.interop.hf import (
    config_from_hf_dict,
    export_hf,
    from_hf_state_dict,
    hf_config_dict,
    import_hf,
    load_transformers_model,
    to_hf_state_dict,
)
from hrm.interop.reference import from_reference_state_dict, import_reference, load_reference_state_dict

__all__ = [
    "config_from_hf_dict",
    "export_hf",
    "from_hf_state_dict",
    "from_reference_state_dict",
    "hf_config_dict",
    "import_hf",
    "import_reference",
    "load_reference_state_dict",
    "load_transformers_model",
    "to_hf_state_dict",
]
