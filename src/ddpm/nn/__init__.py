"""Denoising networks: the DDPM U-Net, a small MLP for 2-D data, and a diffusers checkpoint loader.

Every network is called as ``model(x_t, t)`` with ``t`` the 0-based timestep indices ``[B]``.
"""

from ddpm.nn.embedding import timestep_embedding
from ddpm.nn.mlp import MLP_PRESETS, MLPConfig, MLPDenoiser, mlp_preset
from ddpm.nn.pretrained import PretrainedError, config_from_diffusers, load_pretrained
from ddpm.nn.unet import PRESETS, UNet, UNetConfig, param_count, unet_preset

__all__ = [
    "MLPConfig",
    "MLPDenoiser",
    "MLP_PRESETS",
    "PRESETS",
    "PretrainedError",
    "UNet",
    "UNetConfig",
    "config_from_diffusers",
    "load_pretrained",
    "mlp_preset",
    "param_count",
    "timestep_embedding",
    "unet_preset",
]
