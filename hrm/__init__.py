"""hrm: kernel-first pretraining of HRM-Text hierarchical recurrent language models."""

from hrm.config import PRESETS, ModelConfig, bp_steps_at, get_preset
from hrm.errors import HrmError
from hrm.model import HRMText

__version__ = "0.1.0"

__all__ = ["HRMText", "HrmError", "ModelConfig", "PRESETS", "bp_steps_at", "get_preset", "__version__"]
