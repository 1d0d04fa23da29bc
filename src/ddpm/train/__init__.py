"""Training: :func:`fit` (``ddpm.fit``), the Trainer, and what only training needs (data feed, EMA,
timestep sampling, run folders, stopping on signals).

The run configuration (:mod:`ddpm.config`), checkpoints (:mod:`ddpm.checkpoint`), seeding
(:mod:`ddpm.seeding`) and the torchrun helpers (:mod:`ddpm.distributed`) live below, shared with
inference, which never imports this package.
"""

from ddpm.errors import NonFiniteLossError
from ddpm.train.ema import ExponentialMovingAverage, ema_decay
from ddpm.train.fit import TrainResult, fit
from ddpm.train.run_folder import RunFolder, RunFolderInUseError, RunStart, check_run_folder
from ddpm.train.stopping import EXIT_STOPPED, StopRequest
from ddpm.train.trainer import Trainer

__all__ = [
    "EXIT_STOPPED",
    "ExponentialMovingAverage",
    "NonFiniteLossError",
    "RunFolder",
    "RunFolderInUseError",
    "RunStart",
    "StopRequest",
    "TrainResult",
    "Trainer",
    "check_run_folder",
    "ema_decay",
    "fit",
]
