"""Training: typed run configuration, atomic checkpoints, EMA, and a torchrun-ready Trainer."""

from ddpm.train.checkpoint import (
    ArchitectureMismatchError,
    CheckpointError,
    find_latest,
    load_checkpoint,
    load_model_weights,
    load_weights,
    read_config,
    save_checkpoint,
)
from ddpm.train.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    EMAConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    model_overrides,
    to_toml,
    validate_config,
)
from ddpm.train.distributed import cleanup_distributed, is_main_process, setup_distributed
from ddpm.train.ema import ExponentialMovingAverage, ema_decay
from ddpm.train.trainer import NonFiniteLossError, Trainer

__all__ = [
    "ArchitectureMismatchError",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EMAConfig",
    "ExponentialMovingAverage",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "apply_overrides",
    "cleanup_distributed",
    "config_to_dict",
    "ema_decay",
    "find_latest",
    "is_main_process",
    "load_checkpoint",
    "load_config",
    "load_model_weights",
    "load_weights",
    "model_overrides",
    "read_config",
    "save_checkpoint",
    "setup_distributed",
    "to_toml",
    "validate_config",
]
