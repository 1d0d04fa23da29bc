"""From a :class:`~ddpm.train.config.RunConfig` to the objects a run needs: data, diffusion, network.

The one place where configuration meets construction, so the trainer, the CLI and a checkpoint
reader all build the same thing from the same config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ddpm.data import ArrayDataset, load_dataset
from ddpm.diffusion import GaussianDiffusion
from ddpm.nn import MLP_PRESETS, PRESETS, MLPDenoiser, UNet, mlp_preset, unet_preset
from ddpm.schedules import make_betas
from ddpm.train.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig

UNET_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
               "scale_shift_norm", "num_groups", "dropout")
MLP_FIELDS = ("hidden", "num_blocks", "dropout")


def build_dataset(cfg: DataConfig, split: Literal["train", "test"] = "train", *, seed: int = 0) -> ArrayDataset:
    """Load one split of ``cfg.dataset`` into memory."""
    return load_dataset(
        cfg.dataset,
        split=split,
        image_size=cfg.image_size,
        channels=cfg.channels,
        skip_bad_images=cfg.skip_bad_images,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        num_points=cfg.num_points,
        holdout_fraction=cfg.holdout_fraction,
        array_key=cfg.data_key,
        seed=seed,
    )


def build_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(
        make_betas(cfg.schedule, cfg.timesteps),
        prediction=cfg.prediction,
        variance=cfg.variance,
        loss=cfg.loss,
        loss_weighting=cfg.loss_weighting,
        min_snr_gamma=cfg.min_snr_gamma,
    )


def auto_preset(data_shape: tuple[int, ...]) -> str:
    """The preset that fits data of this per-example shape."""
    if len(data_shape) == 1:
        return "mlp-2d"
    if len(data_shape) != 3:
        raise ValueError(f"cannot pick a network for data of shape {data_shape}; expected [C, H, W] or [D]")
    _, h, w = data_shape
    if h != w:
        raise ValueError(f"images must be square for the U-Net presets, got {h}x{w}; set data.image_size")
    if h <= 8:
        return "digits-8"
    if h <= 28:
        return "mnist-28"
    if h <= 64:
        return "ddpm-cifar10"
    return "ddpm-celebahq256"


def model_spec(cfg: ModelConfig, data_shape: tuple[int, ...], *, learned_sigma: bool) -> tuple[str, dict[str, Any]]:
    """The resolved preset name and the full architecture dict of the network for this data."""
    preset = auto_preset(data_shape) if cfg.preset == "auto" else cfg.preset
    if preset in MLP_PRESETS:
        if len(data_shape) != 1:
            raise ValueError(f"model preset {preset!r} is for vector data, but the data has shape {data_shape}")
        overrides = {k: getattr(cfg, k) for k in MLP_FIELDS if getattr(cfg, k) is not None}
        arch = mlp_preset(preset, dim=data_shape[0], learned_sigma=learned_sigma, **overrides).to_dict()
        return preset, {"kind": "mlp", **arch}
    if preset not in PRESETS:
        valid = ", ".join(["auto", *sorted(PRESETS), *sorted(MLP_PRESETS)])
        raise ValueError(f"unknown model preset {preset!r}; valid: {valid}")
    if len(data_shape) != 3:
        raise ValueError(f"model preset {preset!r} is for images, but the data has shape {data_shape}")
    overrides = {k: getattr(cfg, k) for k in UNET_FIELDS if getattr(cfg, k) is not None}
    c, h, _ = data_shape
    base = PRESETS[preset]
    # Keep the preset's attention placement valid when the image size differs from the preset's.
    if "attention_resolutions" not in overrides and h != base.image_size:
        levels = [h // 2**i for i in range(len(base.channel_mult))]
        overrides["attention_resolutions"] = tuple(r for r in levels if r <= 16)[:1]
    arch = unet_preset(preset, in_channels=c, image_size=h, learned_sigma=learned_sigma, **overrides).to_dict()
    return preset, {"kind": "unet", **arch}


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Build the network an architecture dict (from :func:`model_spec`) describes."""
    from ddpm.nn import MLPConfig, UNetConfig

    arch = dict(spec)
    kind = arch.pop("kind")
    if kind == "mlp":
        return MLPDenoiser(MLPConfig(**arch))
    if kind == "unet":
        return UNet(UNetConfig.from_dict(arch))
    raise ValueError(f"unknown model kind {kind!r} in the architecture description")


def build_model(cfg: RunConfig, data_shape: tuple[int, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """The network for ``cfg`` and data of ``data_shape``, with its architecture dict."""
    _, spec = model_spec(cfg.model, data_shape, learned_sigma=cfg.diffusion.variance == "learned_range")
    torch.manual_seed(cfg.train.seed)  # initial weights follow the run's seed
    return model_from_spec(spec), spec
