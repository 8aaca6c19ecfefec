"""Training: the shared loop (``fit``), its objectives (cross-entropy, label-free distillation), configuration,
checkpoints and NaN/Inf guards."""

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_exists,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from .config import TrainConfig, build_optimizer, build_scheduler
from .distill import Distill
from .guards import NonFiniteError, check_finite
from .loop import (
    LossTerm,
    StandardStep,
    StepContext,
    StepStrategy,
    StopTraining,
    TrainResult,
    fit,
    seed_everything,
)
from .objective import CrossEntropy, Objective

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CrossEntropy",
    "Distill",
    "LossTerm",
    "NonFiniteError",
    "Objective",
    "StandardStep",
    "StepContext",
    "StepStrategy",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "check_finite",
    "checkpoint_exists",
    "fit",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "seed_everything",
]
