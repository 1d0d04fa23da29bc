"""Pipeline folders in the diffusers format: export a trained model, import one whole.

A diffusers pipeline folder (what ``diffusers.DDPMPipeline.save_pretrained`` writes and
``DDPMPipeline.from_pretrained`` reads) holds

- ``model_index.json``: the pipeline class and its parts,
- ``unet/config.json`` and ``unet/diffusion_pytorch_model.safetensors``: a ``UNet2DModel``
  (class-conditional: ``num_class_embeds``, called with ``class_labels``),
- ``scheduler/scheduler_config.json``: the diffusion (betas, what the network predicts, the
  reverse variance, clipping) plus a scheduler's inference settings.

Export maps our diffusion onto the scheduler config: the linear schedule of Ho et al. with T = 1000
is diffusers' ``"linear"`` (1e-4 .. 0.02), the cosine schedule is ``"squaredcos_cap_v2"`` (the same
formula), anything else is written as ``trained_betas``; predictions eps / x0 / v are
``epsilon`` / ``sample`` / ``v_prediction``; variances keep their names. Import does the inverse
and refuses, naming the field, anything that would change the model's meaning and that we cannot
honour (dynamic thresholding, zero-terminal-SNR rescaling, an unknown schedule or field). Fields that
only configure a scheduler's inference (its spacing, solver order, ...) do not change the model and
are ignored: our samplers take those as arguments.

diffusers itself is not needed to read or write these folders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.choices import Prediction, Variance
from ddpm.errors import UserError
from ddpm.nn import UNet, load_pretrained
from ddpm.nn.pretrained import NULL_CLASS_KEY, config_to_diffusers, to_diffusers_state_dict
from ddpm.processes import GaussianConfig
from ddpm.schedules import make_betas, make_schedule

DIFFUSERS_VERSION = "0.25.0"  # the oldest diffusers whose config format we write and have tested against
PREDICTION_TO_DIFFUSERS: dict[Prediction, str] = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PREDICTION_FROM_DIFFUSERS: dict[str, Prediction] = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
VARIANCE_FROM_DIFFUSERS: dict[str, Variance] = {
    "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
# Schedulers of discrete-time variance-preserving diffusion: their config describes the same
# forward process with the same fields, whatever sampler they implement.
KNOWN_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
})
# Fields that only set up a scheduler's own sampling; the model's diffusion does not depend on them.
INFERENCE_FIELDS = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "solver_order",
    "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "final_sigmas_type",
    "lambda_min_clipped", "disable_corrector", "solver_p", "predict_x0", "interpolation_type",
    "timestep_type", "sigma_min", "sigma_max", "flow_shift", "sample_max_value",
    "dynamic_thresholding_ratio", "use_dynamic_shifting", "time_shift_type", "rescale_betas_zero_snr",
    "thresholding", "clip_sample", "clip_sample_range", "shift", "shift_terminal",
})
MODEL_FIELDS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "variance_type",
})


class DiffusersFormatError(UserError):
    """A pipeline folder or scheduler config that cannot be read or written exactly; the message says which field."""


@dataclass
class PipelineParts:
    """What a diffusers pipeline folder holds, in our terms."""

    model: UNet
    diffusion: GaussianConfig  # with clip_denoised set from the scheduler's clip_sample
    data_shape: tuple[int, int, int]
    scheduler_class: str


# ----------------------------------------------------------------------------------- detection
def is_pipeline_folder(path: str | Path) -> bool:
    """True for a folder with ``model_index.json``, or with ``unet/`` and ``scheduler/`` configs."""
    path = Path(path)
    return path.is_dir() and (
        (path / "model_index.json").is_file()
        or ((path / "unet" / "config.json").is_file() and (path / "scheduler" / "scheduler_config.json").is_file())
    )


# ------------------------------------------------------------------------------------- export
def scheduler_config(diffusion: GaussianConfig, *, clip_sample: bool) -> dict[str, Any]:
    """The ``DDPMScheduler`` config of ``diffusion`` (see the module docstring for the mapping)."""
    T = diffusion.timesteps
    if diffusion.betas is not None:
        betas = make_betas(diffusion.betas, T)
    else:
        betas = make_betas(diffusion.schedule, T, **diffusion.schedule_options)
    # diffusers names our schedules only with their default parameters (and linear only at T = 1000)
    default = diffusion.betas is None and make_schedule(diffusion.schedule, diffusion.schedule_options) == \
        make_schedule(diffusion.schedule)
    cfg: dict[str, Any] = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
                           "num_train_timesteps": T, "beta_start": 0.0001, "beta_end": 0.02}
    if default and diffusion.schedule == "cosine":
        cfg.update(beta_schedule="squaredcos_cap_v2", trained_betas=None)
    elif default and diffusion.schedule == "linear" and T == 1000:
        cfg.update(beta_schedule="linear", trained_betas=None)
    else:  # a schedule diffusers cannot name (e.g. our linear schedule rescaled to T != 1000)
        cfg.update(beta_schedule="linear", trained_betas=[float(b) for b in betas])
    cfg.update(
        variance_type=diffusion.variance,
        prediction_type=PREDICTION_TO_DIFFUSERS[diffusion.prediction],
        clip_sample=bool(clip_sample),
        clip_sample_range=1.0,
        thresholding=False,
        rescale_betas_zero_snr=False,
        timestep_spacing="leading",
        steps_offset=0,
    )
    return cfg


def write_pipeline_folder(
    folder: str | Path, model: torch.nn.Module, diffusion: GaussianConfig, *, clip_sample: bool,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` and ``diffusion`` as a diffusers ``DDPMPipeline`` folder; returns the folder.

    The folder is assembled beside its destination and renamed into place, so a failure leaves no
    half-written pipeline. An existing non-empty folder is refused unless ``overwrite``.
    """
    if not isinstance(model, UNet):
        raise DiffusersFormatError(
            f"only U-Net models can be exported to the diffusers format (diffusers has no counterpart of "
            f"{type(model).__name__}); this model stays in ddpm's checkpoint format"
        )
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DiffusersFormatError(f"export destination {folder} exists and is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise DiffusersFormatError(f"export destination {folder} is not empty; choose another folder or overwrite it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        from safetensors.torch import save_file

        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        unet_cfg = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
                    **config_to_diffusers(model.config)}
        if model.config.num_classes is not None and model.config.null_class:
            unet_cfg[NULL_CLASS_KEY] = model.config.num_classes  # diffusers ignores it; our import reads it
        _write_json(tmp / "unet" / "config.json", unet_cfg)
        save_file(to_diffusers_state_dict(model), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(diffusion, clip_sample=clip_sample))
        _write_json(tmp / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
        })
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------- import
def diffusion_from_scheduler(cfg: Mapping[str, Any], *, source: str = "scheduler_config.json") -> GaussianConfig:
    """Our :class:`GaussianConfig` of a diffusers scheduler config; refuses what it cannot honour.

    ``clip_denoised`` is set from ``clip_sample``; ``betas`` holds the schedule when it is not one
    of ours exactly, computed in float64 (diffusers computes them in float32).
    """

    def fail(field: str, message: str) -> DiffusersFormatError:
        return DiffusersFormatError(f"{source}: field {field!r} {message}")

    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in KNOWN_SCHEDULERS:
        raise fail("_class_name", f"is {cls!r}, not a scheduler of discrete-time DDPM diffusion "
                                  f"(known: {', '.join(sorted(KNOWN_SCHEDULERS))})")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in MODEL_FIELDS | INFERENCE_FIELDS)
    if unknown:
        raise fail(unknown[0], f"is not known to ddpm (unknown fields {unknown}); refusing to guess its meaning")
    if cfg.get("thresholding"):
        raise fail("thresholding", "is true: dynamic thresholding of x_0 is not supported by ddpm's samplers")
    if cfg.get("rescale_betas_zero_snr"):
        raise fail("rescale_betas_zero_snr", "is true: a schedule with abar_T = 0 (zero terminal SNR) is not "
                                             "supported (its final log-SNR is -inf)")
    clip = bool(cfg.get("clip_sample", True))
    if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise fail("clip_sample_range", f"is {cfg['clip_sample_range']}; ddpm clips x_0 to [-1, 1] only")

    T = int(cfg.get("num_train_timesteps", 1000))
    schedule, betas = _schedule_from_scheduler(cfg, T, fail)
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_FROM_DIFFUSERS:
        raise fail("prediction_type", f"is {prediction_type!r}; supported: {', '.join(PREDICTION_FROM_DIFFUSERS)}")
    variance_type = cfg.get("variance_type", "fixed_small") or "fixed_small"
    if variance_type not in VARIANCE_FROM_DIFFUSERS:
        raise fail("variance_type", f"is {variance_type!r}; supported: {', '.join(VARIANCE_FROM_DIFFUSERS)}")
    variance = VARIANCE_FROM_DIFFUSERS[variance_type]
    return GaussianConfig(
        schedule=schedule,
        timesteps=T,
        prediction=PREDICTION_FROM_DIFFUSERS[prediction_type],
        variance=variance,
        loss="hybrid" if variance == "learned_range" else "simple",  # training only; learned variances need a vlb
        betas=betas,
        clip_denoised=clip,
    )


def _schedule_from_scheduler(cfg: Mapping[str, Any], T: int, fail: Any) -> tuple[str, tuple[float, ...] | None]:
    """(schedule name, explicit betas or None) of a scheduler config, computed as diffusers does."""
    trained = cfg.get("trained_betas")
    if trained is not None:  # kept in float64 as written (diffusers rounds them to float32: a 1e-8 difference)
        if not isinstance(trained, list) or len(trained) != T:
            raise fail("trained_betas", f"must be a list of num_train_timesteps={T} numbers")
        return "linear", tuple(float(b) for b in trained)
    name = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    if name == "squaredcos_cap_v2":
        return "cosine", None  # the cosine schedule of Nichol & Dhariwal with s = 0.008 and max beta 0.999
    if name == "linear":
        if T == 1000 and start == 0.0001 and end == 0.02:
            return "linear", None
        betas = torch.linspace(start, end, T, dtype=torch.float64)
    elif name == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    else:
        raise fail("beta_schedule", f"is {name!r}; supported: linear, scaled_linear, squaredcos_cap_v2 "
                                    "or explicit trained_betas")
    return "linear", tuple(float(b) for b in betas)


def read_pipeline_folder(path: str | Path) -> PipelineParts:
    """The U-Net (float32, CPU, eval mode) and the diffusion of a diffusers pipeline folder."""
    path = Path(path)
    index_file = path / "model_index.json"
    unet_dir, scheduler_dir = path / "unet", path / "scheduler"
    if index_file.is_file():
        index = _read_json(index_file)
        for part in ("unet", "scheduler"):
            if part not in index:
                raise DiffusersFormatError(f"{index_file}: no {part!r} entry; ddpm reads DDPM-style pipelines "
                                           f"(a unet and a scheduler), found {sorted(index)}")
    scheduler_file = scheduler_dir / "scheduler_config.json"
    if not scheduler_file.is_file():
        raise DiffusersFormatError(f"{path}: no scheduler/scheduler_config.json; without it the diffusion "
                                   "(betas, prediction type) is unknown")
    if not (unet_dir / "config.json").is_file():
        raise DiffusersFormatError(f"{path}: no unet/config.json")
    scheduler_cfg = _read_json(scheduler_file)
    diffusion = diffusion_from_scheduler(scheduler_cfg, source=str(scheduler_file))
    model = load_pretrained(unet_dir)
    cfg = model.config
    expected_out = cfg.in_channels * (2 if diffusion.variance == "learned_range" else 1)
    if cfg.output_channels != expected_out:
        raise DiffusersFormatError(
            f"{unet_dir / 'config.json'}: the U-Net outputs {cfg.output_channels} channels, but variance_type "
            f"{diffusion.variance!r} with {cfg.in_channels} input channels needs {expected_out}"
        )
    if diffusion.variance == "learned_range":  # our U-Net marks learned variances in its config
        model.config = cfg.replace(out_channels=cfg.in_channels, learned_sigma=True)
    return PipelineParts(model, diffusion, (cfg.in_channels, cfg.image_size, cfg.image_size),
                         str(scheduler_cfg.get("_class_name", "DDPMScheduler")))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffusersFormatError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
