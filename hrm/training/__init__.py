"""Training: Adam-atan2 + EMA + schedule (:mod:`.optim`), the run's config (:mod:`.config`),
the loop (:mod:`.loop`), its metrics file and plot (:mod:`.metrics`) and ``hrm train``
(:mod:`.commands`)."""

from hrm.training.config import TrainConfig
from hrm.training.loop import resume_config, train
from hrm.training.optim import EMA, AdamAtan2, lr_at, param_groups

__all__ = ["TrainConfig", "train", "resume_config", "AdamAtan2", "EMA", "lr_at", "param_groups"]
