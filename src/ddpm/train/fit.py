"""Training from a configuration, as one library call: ``ddpm.fit(config)``.

    import ddpm
    from ddpm.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), {"data.dataset": "mnist5k", "train.steps": 2000, "optim.lr": 2e-3,
                                        "train.out_dir": "runs/mnist"})
    result = ddpm.fit(cfg)                  # builds data, diffusion and network, trains, checkpoints
    pipe = ddpm.load(result.checkpoint)     # the EMA weights, ready to sample

The configuration is resolved before training (the network preset picked for the data, the data
shape, flips) and saved beside every checkpoint, so a checkpoint always says how it was made.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.build import build_dataset, build_model, model_spec, resolve_hflip
from ddpm.config import RunConfig, apply_overrides, validate_config
from ddpm.distributed import is_main_process
from ddpm.errors import ConfigError, DataError
from ddpm.nn.policy import RuntimePolicy
from ddpm.processes import DiffusionProcess, build_process
from ddpm.train.run_folder import check_run_folder
from ddpm.train.trainer import EvalFn, EvalResult, Trainer

logger = logging.getLogger("ddpm")


@dataclass
class TrainResult:
    """What :func:`fit` leaves behind."""

    step: int  # optimizer steps done
    checkpoint: Path | None  # the newest checkpoint written (or resumed from)
    nonfinite_total: int  # steps skipped for a non-finite loss or gradient
    config: RunConfig  # the resolved configuration the run used
    set_aside: Path | None = None  # where newer checkpoints were moved when resuming from an older one
    stopped: str | None = None  # why training stopped before train.steps (a signal, "time limit"); None: it did not


def resolve_config(cfg: RunConfig, dataset: Any) -> RunConfig:
    """``cfg`` with everything decided from the data written in: data shape, flips, classes, preset."""
    shape = tuple(dataset.shape)
    updates: dict[str, Any] = {"model.data_shape": list(shape), "data.hflip": resolve_hflip(cfg.data, dataset)}
    if cfg.model.class_cond:
        classes = getattr(dataset, "num_classes", None)
        if not classes:
            raise ConfigError(f"model.class_cond needs labelled data; {cfg.data.dataset!r} has no class labels "
                              "(use a built-in digit set, one sub-folder per class, an .npz with 'labels', or a "
                              "datasets set with a label column)")
        if cfg.model.num_classes not in (None, classes):
            raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {classes} classes")
        updates["model.num_classes"] = int(classes)
        names = getattr(dataset, "class_names", None)
        updates["model.class_names"] = list(names) if names else [str(c) for c in range(classes)]
    cfg = apply_overrides(cfg, updates)
    out_channels = build_process(cfg.diffusion).output_channels(shape[0])
    preset, _ = model_spec(cfg.model, shape, out_channels=out_channels)
    return apply_overrides(cfg, {"model.preset": preset})


def grid_callback(out_dir: Path, process: DiffusionProcess, data_shape: tuple[int, ...],
                  reference: torch.Tensor | None, *, num: int = 64, seed: int = 0) -> Callable[[nn.Module, int], None]:
    """A trainer callback writing ``out_dir/samples/step-XXXXXXXX.png``: samples of the EMA model with the
    process's default sampler (a grid for images, a scatter over the data for 2-D points), the same seeds
    every time."""
    from ddpm import viz
    from ddpm.samplers import sample
    from ddpm.seeding import item_seeds

    def sample_fn(model: nn.Module, step: int) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        gens = [torch.Generator().manual_seed(s) for s in item_seeds(seed, range(num))]
        with torch.inference_mode():
            x = sample(process, model, (num, *data_shape), sampler=process.default_sampler, generator=gens,
                       device=device, clip_denoised=len(data_shape) == 3)
        model.train(was_training)
        path = out_dir / "samples" / f"step-{step:08d}.png"
        if len(data_shape) == 3:
            viz.save_grid(x, path, nrow=8)
        else:
            viz.save_scatter(x, reference, path, title=f"step {step}")

    return sample_fn


def eval_callback(cfg: RunConfig, process: DiffusionProcess, data_shape: tuple[int, ...]) -> EvalFn:
    """The evaluation while training (``train.eval_every``): ``train.eval_samples`` samples of the EMA model,
    the same seeds every time, measured as the eval card measures them (:func:`ddpm.evaluate.evaluate`):
    Frechet distance and KID on the data's feature network for images, the 2-D distances for points.

    The reference (the held-out split and its features) is built here, once per run, so a run that
    cannot be measured (no Inception weights, say) fails before its first step.
    """
    from ddpm.distributed import get_local_rank, resolve_device
    from ddpm.evaluate import evaluate, headline_metric, make_reference
    from ddpm.pipeline import Pipeline

    tc = cfg.train
    device = resolve_device(tc.device, local_rank=get_local_rank())
    reference = make_reference(cfg.data, data_shape, device=device, seed=tc.seed)
    metric, _ = headline_metric(reference)

    def eval_fn(model: nn.Module, step: int, policy: RuntimePolicy) -> EvalResult:
        pipe = Pipeline(model, process, cfg, source=Path(tc.out_dir), weights="ema", policy=policy)
        card = evaluate(pipe, num=tc.eval_samples, sampler=tc.eval_sampler, steps=tc.eval_steps, seed=tc.seed,
                        reference=reference)
        scores = {k: v for k, v in card["metrics"].items() if isinstance(v, (int, float))}
        return EvalResult(metric, scores)

    return eval_fn


def fit(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
        progress: bool = True) -> TrainResult:
    """Build data, the diffusion process and the network from ``cfg`` and train to ``cfg.train.steps``.

    ``resume``: ``"auto"`` (the newest good checkpoint in ``cfg.train.out_dir`` if there is one, else
    a new run: what a requeued job repeats), ``"latest"`` (that checkpoint, which must exist) or a
    checkpoint / run folder; without it, a folder that holds another run's checkpoints is refused
    unless ``overwrite`` (delete that run and start over). The run folder is checked before any data
    is loaded (:func:`ddpm.train.run_folder.check_run_folder`). Under torchrun every process calls
    this; only rank 0 writes.
    """
    started = time.monotonic()  # what train.time_limit counts from
    if is_main_process():
        check_run_folder(cfg.train.out_dir, resume=resume, overwrite=overwrite)
    dataset = build_dataset(cfg.data, "train")
    try:
        eval_dataset = build_dataset(cfg.data, "test")
    except DataError:  # a data set without a held-out split trains without eval losses
        eval_dataset = None
    shape = tuple(dataset.shape)
    cfg = resolve_config(cfg, dataset)
    validate_config(cfg)
    process = build_process(cfg.diffusion)
    model, _ = build_model(cfg, shape, process)
    if is_main_process() and progress:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {dataset.name} ({len(dataset)} train, shape {list(shape)}); model: {cfg.model.preset} "
              f"({n_params / 1e6:.2f}M parameters); {process}", flush=True)
    out_dir = Path(cfg.train.out_dir)
    reference = dataset.get_batch(torch.arange(min(len(dataset), 2000))) if dataset.kind == "vector" else None
    sample_fn = grid_callback(out_dir, process, shape, reference)
    measure = cfg.train.eval_every > 0 and cfg.train.eval_samples > 0
    eval_fn = eval_callback(cfg, process, shape) if measure else None
    trainer = Trainer(cfg, model, process, dataset, eval_dataset=eval_dataset, sample_fn=sample_fn, eval_fn=eval_fn,
                      started=started)
    summary = trainer.run(resume=resume, overwrite=overwrite)
    return TrainResult(step=summary["step"], checkpoint=summary["checkpoint"],
                       nonfinite_total=summary["nonfinite_total"], config=cfg, set_aside=summary.get("set_aside"),
                       stopped=summary.get("stopped"))
