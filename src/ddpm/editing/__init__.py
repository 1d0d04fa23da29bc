"""Working on existing images with a trained model: inpainting, SDEdit, inversion and interpolation.

Each edit walks the reverse chain that sampling walks, so it needs nothing but the network:

* :mod:`.inpaint`: RePaint (Lugmayr et al. 2022): fill masked pixels, with resampling and jumps;
* :mod:`.sdedit`: SDEdit (Meng et al. 2022): noise an image part way, denoise with any sampler;
* :mod:`.inversion`: an image to x_T through the probability-flow ODE and back, and the great
  circle between two encodings;
* :mod:`.masks`: which pixels are known, from a name, a box or a PNG.

:class:`ddpm.Pipeline` wraps them with per-image seeds (``pipe.inpaint``, ``pipe.edit``,
``pipe.encode``, ``pipe.decode``, ``pipe.interpolate``); the commands are ``ddpm inpaint``,
``ddpm edit`` and ``ddpm interpolate``.
"""

from ddpm.editing.inpaint import (
    REPAINT_SAMPLERS,
    check_repaint_sampler,
    inpaint,
    repaint_evaluations,
    repaint_schedule,
)
from ddpm.editing.inversion import INVERSION_ORDERS, check_inversion_sampler, encode, interpolation_weights, slerp
from ddpm.editing.masks import MASK_NAMES, check_mask, parse_mask
from ddpm.editing.sdedit import edit_timesteps, sdedit, sdedit_plan, start_timestep

__all__ = [
    "INVERSION_ORDERS",
    "MASK_NAMES",
    "REPAINT_SAMPLERS",
    "check_inversion_sampler",
    "check_mask",
    "check_repaint_sampler",
    "edit_timesteps",
    "encode",
    "inpaint",
    "interpolation_weights",
    "parse_mask",
    "repaint_evaluations",
    "repaint_schedule",
    "sdedit",
    "sdedit_plan",
    "slerp",
    "start_timestep",
]
