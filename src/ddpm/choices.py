"""Every closed set of choices of the library, declared once.

Open sets, which code outside the package may extend, are registries owned by their module:
schedules (:data:`ddpm.schedules.SCHEDULES`), samplers (:data:`ddpm.samplers.SAMPLERS`), processes
(:data:`ddpm.processes.PROCESSES`) and data sets (:data:`ddpm.data.DATASETS`).

Each set is a ``Literal`` type (for signatures and the typed run configuration) and the tuple of
its values (for validation messages and command-line ``choices``), taken from the same ``Literal``
so the two cannot drift. :func:`check_choice` is the one validator.
"""

from __future__ import annotations

from typing import Literal, get_args

from ddpm.errors import UserError

Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "vlb", "hybrid"]
LossWeighting = Literal["none", "min-snr"]
TimestepSampling = Literal["uniform", "loss-aware"]
Weights = Literal["ema", "raw"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Amp = Literal["auto", "none", "bf16", "fp16"]  # "auto": the runtime policy (ddpm.nn.policy) decides
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
Attention = Literal["auto", "sdpa", "flash", "efficient", "matmul"]  # how the U-Net computes attention
Upsample = Literal["auto", "subpixel", "nearest"]  # how the U-Net computes upsample + conv
Toggle = Literal["auto", "on", "off"]
EMAWarmup = Literal["none", "ratio", "power"]
SampleFormat = Literal["grid", "png", "npz"]  # a grid PNG, one PNG per sample, samples.npz
Loader = Literal["auto", "memory", "stream"]
EstimateMethod = Literal["stratified", "importance"]  # how ddpm.nll_estimate draws its timesteps
Split = Literal["train", "test"]  # a data set's two splits
Features = Literal["auto", "classifier", "inception"]  # the feature network of the eval card's distances
Spacing = Literal["linspace", "uniform", "leading", "trailing", "log-snr", "karras"]  # samplers' time grids

PREDICTIONS: tuple[str, ...] = get_args(Prediction)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)
WEIGHTS: tuple[str, ...] = get_args(Weights)
DEVICES: tuple[str, ...] = get_args(Device)
AMPS: tuple[str, ...] = get_args(Amp)
MEMORY_FORMATS: tuple[str, ...] = get_args(MemoryFormat)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
UPSAMPLES: tuple[str, ...] = get_args(Upsample)
TOGGLES: tuple[str, ...] = get_args(Toggle)
EMA_WARMUPS: tuple[str, ...] = get_args(EMAWarmup)
SAMPLE_FORMATS: tuple[str, ...] = get_args(SampleFormat)
LOADERS: tuple[str, ...] = get_args(Loader)
ESTIMATE_METHODS: tuple[str, ...] = get_args(EstimateMethod)
SPLITS: tuple[str, ...] = get_args(Split)
FEATURES: tuple[str, ...] = get_args(Features)
SPACINGS: tuple[str, ...] = get_args(Spacing)


def check_choice(name: str, value: object, valid: tuple[str, ...] | object) -> None:
    """Raise :class:`~ddpm.errors.UserError` (a ``ValueError``) naming ``name``, ``value`` and the valid
    values unless ``value`` is one of them.

    ``valid`` is a tuple of values or a ``Literal`` type.
    """
    options = valid if isinstance(valid, tuple) else get_args(valid)
    if value not in options:
        raise UserError(f"unknown {name} {value!r}; valid: {', '.join(repr(v) for v in options)}")


def parse_choice_list(name: str, text: str, valid: tuple[str, ...] | object) -> tuple[str, ...]:
    """A comma-separated list of choices (``"grid,npz"``), each checked, in order, without repeats.

    An empty list or an unknown entry raises :class:`~ddpm.errors.UserError` naming it and the
    valid values, so nothing is silently dropped (``--format jpeg`` must not write nothing).
    """
    items = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    options = valid if isinstance(valid, tuple) else get_args(valid)
    if not items:
        raise UserError(f"{name} {text!r} names nothing; valid: {', '.join(repr(v) for v in options)}")
    for item in items:
        check_choice(name, item, options)
    return items
