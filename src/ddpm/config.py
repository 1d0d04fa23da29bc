"""Typed run configuration: one nested dataclass tree, the single source of defaults.

A run is described by a :class:`RunConfig` with six sections (``data``, ``model``, ``diffusion``,
``optim``, ``ema``, ``train``). The ``diffusion`` section is the table of the run's process: its
``process`` field names a registered process (:mod:`ddpm.processes`) and the class of the table,
e.g. :class:`~ddpm.processes.gaussian.GaussianConfig` (the default). It is read from TOML with
:func:`load_config`, changed from the command line with :func:`apply_overrides` (dotted keys such
as ``"train.steps"``), checked by :func:`validate_config`, and written back with :func:`to_toml`
beside every checkpoint, so a checkpoint always says how it was made.

TOML has no null: an ``Optional`` field that is ``None`` is simply left out of the file, which is
why every ``Optional`` field defaults to ``None``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ddpm.choices import (  # noqa: E402 - the Literal types must be module globals for get_type_hints
    Amp,
    Attention,
    Device,
    EMAWarmup,
    Loader,
    MemoryFormat,
    Toggle,
    Upsample,
)
from ddpm.errors import ConfigError  # noqa: E402 - re-exported: ddpm.config.ConfigError
from ddpm.processes import GaussianConfig, ProcessConfig, process_entry  # noqa: E402


@dataclass
class DataConfig:
    """Where the training data comes from and how it is shaped (see ddpm.data.load_dataset)."""

    dataset: str = "cifar10"  # a built-in name, a folder of images, or a .npy/.npz file
    image_size: int | None = None  # resize and centre-crop images to this square size; None = native
    channels: int | None = None  # 1, 3 or 4; None = the source's
    hflip: bool | None = None  # random horizontal flips; None: on, except for digits (mirrored digits are not digits)
    skip_bad_images: bool = False  # folders: skip undecodable files instead of stopping
    num_points: int | None = None  # 2-D toy sets: points in the training split; None = their default
    holdout_fraction: float | None = None  # share held out as the eval split; None = the data set's default
    cache_dir: str | None = None  # where downloads are kept; None = $DDPM_CACHE or ~/.cache/ddpm
    loader: Loader = "auto"  # memory: decode all up front; stream: read batches in workers; auto: by size
    workers: int | None = None  # DataLoader workers per process (and cache builders); None = from the CPUs
    prepared_dir: str | None = None  # where folders' prepared caches live; None = <cache dir>/prepared
    cache_images: bool = True  # streamed folders: write a prepared cache once and read it (false: decode files)
    hf_streaming: bool = False  # hf: data sets: read as a stream (for sets larger than the disk)
    data_key: str | None = None  # .npz files: the array to train on; None = the one named images, x, data or arr_0


@dataclass
class ModelConfig:
    """A model preset and optional overrides of its fields (None = the preset's value).

    U-Net fields apply to image data and MLP fields to vector data (see :func:`ddpm.build.model_spec`).
    """

    preset: str = "auto"  # a name in ddpm.nn.PRESETS / MLP_PRESETS; "auto" picks one from the data
    base_channels: int | None = None  # U-Net
    channel_mult: tuple[int, ...] | None = None  # U-Net
    num_res_blocks: int | None = None  # U-Net
    attention_resolutions: tuple[int, ...] | None = None  # U-Net
    num_heads: int | None = None  # U-Net
    scale_shift_norm: bool | None = None  # U-Net
    num_groups: int | None = None  # U-Net: GroupNorm groups (must divide every width)
    hidden: int | None = None  # MLP
    num_blocks: int | None = None  # MLP
    dropout: float | None = None  # both
    data_shape: tuple[int, ...] | None = None  # per-example shape the network is built for; set by `ddpm train`
    class_cond: bool = False  # condition on the data's class labels (classifier-free guidance needs cond_drop > 0)
    num_classes: int | None = None  # classes of a class-conditional network; set from the data by `ddpm train`
    class_names: tuple[str, ...] | None = None  # the name of each class (folders: sub-folder names), from the data
    cond_drop: float = 0.1  # class-conditional training: share of labels replaced by the null class


@dataclass
class OptimConfig:
    """AdamW with a linear learning-rate warm-up."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 5000  # lr rises linearly from lr/warmup_steps to lr over these steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    grad_accum: int = 1  # micro-batches per optimizer step; the global batch is unchanged


@dataclass
class EMAConfig:
    """Exponential moving average of the weights; see ddpm.train.ema for the warm-up formulas."""

    decay: float = 0.9999  # the decay once warmed up
    warmup: EMAWarmup = "power"  # "none", "ratio": (1+n)/(10+n), "power": 1-(1+n/inv_gamma)^-power
    inv_gamma: float = 1.0
    power: float = 0.75


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, and what is written how often."""

    steps: int = 800_000  # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 128  # GLOBAL batch: summed over processes and micro-batches
    seed: int = 0
    device: Device = "auto"
    # How the network runs (ddpm.nn.policy): "auto" is the device's rule, recorded in metrics.jsonl.
    amp: Amp = "auto"  # autocast dtype of the forward: none, bf16, fp16 (CUDA only: it uses a GradScaler)
    memory_format: MemoryFormat = "auto"  # channels_last (NHWC) or contiguous (NCHW)
    attention: Attention = "auto"  # U-Net attention: sdpa, flash, efficient (PyTorch kernels) or matmul
    upsample: Upsample = "auto"  # U-Net upsampling conv: subpixel (4 phase convs, fewer FLOPs) or nearest
    fused_optimizer: Toggle = "auto"  # fused AdamW: on, off; auto: where PyTorch has the kernel
    compile: bool = False  # torch.compile the model (never automatic: it has not paid back its compile time)
    checkpoint_every: int = 5000
    keep_last: int = 3  # checkpoints kept in out_dir; 0 keeps all
    log_every: int = 100
    sample_every: int = 10_000  # call sample_fn every this many steps; 0 never
    eval_every: int = 0  # every this many steps: the EMA model's eval loss and its samples measured; 0 never
    eval_batches: int = 4  # batches of the eval loss
    eval_samples: int = 500  # samples measured at each evaluation (Frechet distance, KID...; 0: the loss only)
    eval_sampler: str | None = None  # their sampler (None: the process's default)
    eval_steps: int | None = None  # its network evaluations (None: the sampler's default)
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    time_limit: float | None = None  # seconds: stop (with a checkpoint) before this much time has passed; None: none
    grace_period: float = 20.0  # seconds from a stop signal to exit: the step and its checkpoint must fit in it
    out_dir: str = "runs/ddpm"
    tensorboard: bool = True  # also log to TensorBoard when the tensorboard package is installed


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: ProcessConfig = field(default_factory=GaussianConfig)  # the table of diffusion.process
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))

# Fields that say how a run is executed or recorded rather than what it computes: a resumed run may
# change them without a warning (every other change is logged and recorded, see hyperparameter_changes).
RUN_BOOKKEEPING: frozenset[str] = frozenset({
    "train.steps", "train.device", "train.compile", "train.checkpoint_every", "train.keep_last",
    "train.log_every", "train.sample_every", "train.eval_every", "train.eval_batches", "train.max_nonfinite",
    "train.time_limit", "train.grace_period", "train.eval_samples", "train.eval_sampler", "train.eval_steps",
    "train.out_dir", "train.tensorboard", "data.cache_dir",
    # the runtime policy's layout and kernels compute the same function (train.amp does not: it stays listed)
    "train.memory_format", "train.attention", "train.upsample", "train.fused_optimizer",
})


# --------------------------------------------------------------------------------------------
# Reading values: one coercion routine for TOML values and command-line strings.


def _section_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
    return False, tp


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} or none"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is dict:
        return "a table of names and numbers (name=value,...)"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {args[0].__name__}"
        return f"a list of {len(args)} numbers"
    return getattr(tp, "__name__", str(tp))


def _parse_string(text: str, tp: Any) -> Any:
    """Turn a command-line string into a TOML-like value for field type ``tp``."""
    optional, inner = _is_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    tp = inner
    if tp is str or typing.get_origin(tp) is Literal:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean")
    if typing.get_origin(tp) is tuple:
        parts = [p for p in text.replace("[", "").replace("]", "").replace("(", "").replace(")", "")
                 .split(",") if p.strip()]
        return [_parse_scalar(p.strip()) for p in parts]
    if typing.get_origin(tp) is dict:  # "s=0.01,max_beta=0.99"
        pairs = [p.split("=", 1) for p in text.replace("{", "").replace("}", "").split(",") if p.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(text)
        return {k.strip(): _parse_scalar(v.strip()) for k, v in pairs}
    return _parse_scalar(text.strip())


def _parse_scalar(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return float(text)  # raises ValueError with the text in it


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` (from TOML or a parsed string) against the field type and normalise it."""

    def bad() -> ConfigError:
        return ConfigError(f"{key}={value!r} is not valid: expected {_type_name(tp)}")

    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise bad()
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid: expected {_type_name(inner)}")
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad()
        return value
    if inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if typing.get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise bad()
        key_type, value_type = typing.get_args(inner)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if typing.get_origin(inner) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(inner)
        elem_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(elem_types) != len(value):
            raise bad()
        try:
            return tuple(_coerce(v, et, key) for v, et in zip(value, elem_types, strict=True))
        except ConfigError:
            raise bad() from None
    raise bad()  # pragma: no cover - a field type this module does not know


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts; unknown sections/keys and bad values raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    sections = {}
    for f in dataclasses.fields(RunConfig):
        values = data.get(f.name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{f.name}] must be a table, got {values!r}")
        cls = section_class(f.name, values)
        hints = _section_types(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            keys = ", ".join(f"{f.name}.{k}" for k in unknown)
            raise ConfigError(f"{source}: unknown key(s) {keys}; valid keys in [{f.name}]: {sorted(hints)}")
        kwargs = {k: _coerce(v, hints[k], f"{f.name}.{k}") for k, v in values.items()}
        sections[f.name] = cls(**kwargs)
    return RunConfig(**sections)


def section_class(section: str, values: dict[str, Any]) -> type[Any]:
    """The dataclass of ``section`` whose table holds ``values``: for ``diffusion``, that of its ``process``."""
    if section == "diffusion":
        name = values.get("process", ProcessConfig.process)
        if not isinstance(name, str):
            raise ConfigError(f"diffusion.process={name!r} is not valid: expected the name of a process")
        return process_entry(name).config
    factory = next(f for f in dataclasses.fields(RunConfig) if f.name == section).default_factory
    if not isinstance(factory, type):  # every other section's factory is its dataclass
        raise TypeError(f"RunConfig.{section} has no dataclass as its default factory")
    return factory


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML file into a validated :class:`RunConfig` (missing keys take the defaults)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    config = config_from_dict(data, source=str(path))
    validate_config(config)
    return config


def apply_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``config`` with dotted keys replaced, e.g. ``{"train.steps": 100}``.

    Values may be typed (``100``) or strings from the command line (``"100"``, ``"0.9,0.99"``,
    ``"true"``, ``"none"``); ``None`` values are ignored, so unset CLI flags can be passed through.
    """
    data = config_to_dict(config)
    process = overrides.get("diffusion.process")
    if process is not None and process != config.diffusion.process:  # another process: its own table
        common = {f.name for f in dataclasses.fields(ProcessConfig)}
        data["diffusion"] = {k: v for k, v in data["diffusion"].items() if k in common} | {"process": process}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"override {key!r}: expected 'section.key' with section in {list(SECTIONS)}")
        hints = _section_types(section_class(section, data[section]))
        if name not in hints:
            raise ConfigError(f"override {key!r}: unknown key; valid keys in [{section}]: {sorted(hints)}")
        if isinstance(value, str) and hints[name] is not str:
            try:
                value = _parse_string(value, hints[name])
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not valid: expected {_type_name(hints[name])}") from None
        data[section][name] = value
    new = config_from_dict(data, source="overrides")
    validate_config(new)
    return new


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dicts (tuples become lists), in field order."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(config, section)
        out[section] = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return out


def _plain(value: Any) -> Any:
    """A field value as plain data: tuples become lists, tables are copied."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table keeps each section one flat table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: RunConfig) -> str:
    """The config as TOML text: one flat table per section; ``None`` fields are left out."""
    lines: list[str] = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def config_from_toml(text: str, *, source: str = "config") -> RunConfig:
    """Parse TOML text (as written by :func:`to_toml`) into a :class:`RunConfig`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    return config_from_dict(data, source=source)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the config as TOML, atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_toml(config), encoding="utf-8")
    tmp.replace(path)


def hyperparameter_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{"optim.lr": (old, new), ...}``: the fields that differ, except those in :data:`RUN_BOOKKEEPING`."""
    a, b = config_to_dict(old), config_to_dict(new)
    return {
        f"{section}.{key}": (a[section].get(key), b[section].get(key))
        for section in SECTIONS
        for key in dict.fromkeys([*a[section], *b[section]])  # a changed process has other keys
        if a[section].get(key) != b[section].get(key) and f"{section}.{key}" not in RUN_BOOKKEEPING
    }


FLOAT32_MAX = 3.4028234663852886e38  # the training maths is float32: a larger number overflows to inf there


def _nonfinite_fields(config: RunConfig) -> list[str]:
    """``"key=value"`` for every float field (or list entry) that is NaN, infinite or beyond the float32 range."""
    bad = []
    for section, values in config_to_dict(config).items():
        for key, value in values.items():
            items = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
            if any(isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX) for v in items):
                bad.append(f"{section}.{key}={value}")
    return bad


def validate_config(config: RunConfig, *, world_size: int = 1) -> None:
    """Check ranges and divisibility; raise :class:`ConfigError` naming the offending key."""
    tr, op, ema = config.train, config.optim, config.ema

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise ConfigError(message)

    nonfinite = _nonfinite_fields(config)
    need(not nonfinite, f"{', '.join(nonfinite)}: every number must be finite (not nan or inf) and within the "
                        f"float32 range (|x| <= {FLOAT32_MAX:.4g})")
    need(tr.steps >= 0, f"train.steps={tr.steps} must be >= 0")
    need(tr.batch_size >= 1, f"train.batch_size={tr.batch_size} must be >= 1")
    for name in ("checkpoint_every", "log_every", "keep_last", "sample_every", "eval_every", "eval_batches",
                 "eval_samples"):
        value = getattr(tr, name)
        need(value >= 0, f"train.{name}={value} must be >= 0")
    need(tr.max_nonfinite >= 1, f"train.max_nonfinite={tr.max_nonfinite} must be >= 1")
    need(tr.time_limit is None or tr.time_limit > 0, f"train.time_limit={tr.time_limit} must be > 0 seconds")
    need(tr.grace_period > 0, f"train.grace_period={tr.grace_period} must be > 0 seconds")
    need(tr.eval_steps is None or tr.eval_steps >= 1, f"train.eval_steps={tr.eval_steps} must be >= 1")
    need(tr.eval_samples == 0 or tr.eval_samples >= 2, f"train.eval_samples={tr.eval_samples} must be 0 or >= 2")
    need(op.lr > 0, f"optim.lr={op.lr} must be > 0")
    need(op.weight_decay >= 0, f"optim.weight_decay={op.weight_decay} must be >= 0")
    need(all(0 <= b < 1 for b in op.betas), f"optim.betas={op.betas} must lie in [0, 1)")
    need(op.warmup_steps >= 0, f"optim.warmup_steps={op.warmup_steps} must be >= 0")
    need(op.grad_clip >= 0, f"optim.grad_clip={op.grad_clip} must be >= 0 (0 disables clipping)")
    need(op.grad_accum >= 1, f"optim.grad_accum={op.grad_accum} must be >= 1")
    need(0 <= ema.decay < 1, f"ema.decay={ema.decay} must lie in [0, 1)")
    need(ema.inv_gamma > 0, f"ema.inv_gamma={ema.inv_gamma} must be > 0")
    need(ema.power > 0, f"ema.power={ema.power} must be > 0")
    config.diffusion.validate()
    for name in ("image_size", "channels", "num_points"):
        value = getattr(config.data, name)
        need(value is None or value >= 1, f"data.{name}={value} must be >= 1")
    workers = config.data.workers
    need(workers is None or workers >= 0, f"data.workers={workers} must be >= 0 (0 reads in the training process)")
    hf = config.data.holdout_fraction
    need(hf is None or 0 <= hf < 1, f"data.holdout_fraction={hf} must lie in [0, 1)")
    dropout = config.model.dropout
    need(dropout is None or 0 <= dropout < 1, f"model.dropout={dropout} must lie in [0, 1)")
    need(0 <= config.model.cond_drop < 1, f"model.cond_drop={config.model.cond_drop} must lie in [0, 1)")
    nc = config.model.num_classes
    need(nc is None or nc >= 1, f"model.num_classes={nc} must be >= 1")
    per_rank_batch(config, world_size)


def per_rank_batch(config: RunConfig, world_size: int) -> tuple[int, int]:
    """(examples per process per step, examples per micro-batch); raises if they do not divide."""
    bs, accum = config.train.batch_size, config.optim.grad_accum
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    if bs % world_size:
        raise ConfigError(
            f"train.batch_size={bs} is not divisible by world size {world_size}; "
            f"use a multiple of {world_size} (train.batch_size is the global batch)"
        )
    local = bs // world_size
    if local % accum:
        raise ConfigError(
            f"the per-process batch {local} (train.batch_size={bs} / world size {world_size}) "
            f"is not divisible by optim.grad_accum={accum}"
        )
    return local, local // accum
