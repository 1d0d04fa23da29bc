"""From a :class:`~ddpm.config.RunConfig` to the objects a run needs: data and network (the process is
:func:`ddpm.processes.build_process` of its ``[diffusion]`` table).

The one place where configuration meets construction, so the trainer, the CLI and a checkpoint
reader all build the same thing from the same config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.choices import Split
from ddpm.config import DataConfig, ModelConfig, RunConfig
from ddpm.data import ArrayDataset, LazyImages, load_dataset
from ddpm.data.hf import HFStream
from ddpm.data.records import find_dataset
from ddpm.errors import ConfigError
from ddpm.nn import MLP_PRESETS, PRESETS, MLPDenoiser, UNet, mlp_preset, unet_preset
from ddpm.processes import DiffusionProcess

UNET_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
               "scale_shift_norm", "num_groups", "dropout")
MLP_FIELDS = ("hidden", "num_blocks", "dropout")


def build_dataset(cfg: DataConfig, split: Split = "train", *, seed: int = 0) -> ArrayDataset | LazyImages | HFStream:
    """One split of ``cfg.dataset``: in memory, or on demand for large image data (``cfg.loader``).

    Problems with the data are :class:`~ddpm.errors.DataError` (raised by the data layer, naming the file,
    option or value); anything else is a bug and keeps its traceback.
    """
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
        loader=cfg.loader,
        prepared_dir=Path(cfg.prepared_dir).expanduser() if cfg.prepared_dir else None,
        cache_images=cfg.cache_images,
        workers=cfg.workers,
        hf_streaming=cfg.hf_streaming,
    )


def resolve_hflip(cfg: DataConfig, dataset: ArrayDataset | LazyImages | HFStream) -> bool:
    """``cfg.hflip`` when set; otherwise flips for images, except built-in sets whose record says a mirrored
    example means something else (digits), and never for vectors."""
    if dataset.kind != "image":
        return False
    if cfg.hflip is not None:
        return cfg.hflip
    record = find_dataset(cfg.dataset)
    return record is None or record.flippable


def auto_preset(data_shape: tuple[int, ...]) -> str:
    """The preset that fits data of this per-example shape."""
    if len(data_shape) == 1:
        return "mlp-2d"
    if len(data_shape) != 3:
        raise ConfigError(f"cannot pick a network for data of shape {data_shape}; expected [C, H, W] or [D]")
    _, h, w = data_shape
    if h != w:
        raise ConfigError(f"images must be square for the U-Net presets, got {h}x{w}; set data.image_size")
    if h <= 8:
        return "digits-8"
    if h <= 28:
        return "mnist-28"
    if h <= 64:
        return "ddpm-cifar10"
    return "ddpm-celebahq256"


def model_spec(cfg: ModelConfig, data_shape: tuple[int, ...], *, out_channels: int) -> tuple[str, dict[str, Any]]:
    """The resolved preset name and the full architecture dict of the network for this data.

    ``out_channels``: what the process needs the network to output per example, in channels (images)
    or dimensions (vectors): :meth:`~ddpm.processes.protocol.DiffusionProcess.output_channels`.
    """
    preset = auto_preset(data_shape) if cfg.preset == "auto" else cfg.preset
    if cfg.class_cond and cfg.num_classes is None:
        raise ConfigError("model.class_cond is set but model.num_classes is not (ddpm.fit takes it from the data)")
    classes = {"num_classes": cfg.num_classes} if cfg.class_cond else {}
    if preset in MLP_PRESETS:
        if len(data_shape) != 1:
            raise ConfigError(f"model preset {preset!r} is for vector data, but the data has shape {data_shape}")
        overrides = {k: getattr(cfg, k) for k in MLP_FIELDS if getattr(cfg, k) is not None}
        arch = mlp_preset(preset, dim=data_shape[0], out_dim=out_channels, **classes, **overrides).to_dict()
        return preset, {"kind": "mlp", **arch}
    if preset not in PRESETS:
        valid = ", ".join(["auto", *sorted(PRESETS), *sorted(MLP_PRESETS)])
        raise ConfigError(f"unknown model.preset {preset!r}; valid: {valid}")
    if len(data_shape) != 3:
        raise ConfigError(f"model preset {preset!r} is for images, but the data has shape {data_shape}")
    overrides = {k: getattr(cfg, k) for k in UNET_FIELDS if getattr(cfg, k) is not None}
    c, h, _ = data_shape
    base = PRESETS[preset]
    # Keep the preset's attention placement valid when the image size differs from the preset's.
    if "attention_resolutions" not in overrides and h != base.image_size:
        levels = [h // 2**i for i in range(len(base.channel_mult))]
        overrides["attention_resolutions"] = tuple(r for r in levels if r <= 16)[:1]
    # A ConfigError of the U-Net's own checks names the field: num_groups not dividing a width, an image
    # size the levels cannot halve, ...
    arch = unet_preset(preset, in_channels=c, out_channels=out_channels, image_size=h, **classes,
                       **overrides).to_dict()
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
    raise ConfigError(f"unknown model kind {kind!r} in the architecture description")


def build_model(cfg: RunConfig, data_shape: tuple[int, ...], process: DiffusionProcess) -> tuple[nn.Module,
                                                                                                dict[str, Any]]:
    """The network for ``cfg``, ``process`` and data of ``data_shape``, with its architecture dict."""
    _, spec = model_spec(cfg.model, data_shape, out_channels=process.output_channels(data_shape[0]))
    torch.manual_seed(cfg.train.seed)  # initial weights follow the run's seed
    return model_from_spec(spec), spec
