"""The sampler registry: each sampler's step function, typed options and the facts the driver needs.

A sampler module declares its options as a frozen dataclass of :class:`SamplerOptions` whose
fields are made with :func:`option` (default, help, and the values it may take), and registers a
:class:`SamplerSpec` at import time::

    @dataclass(frozen=True)
    class DDIMOptions(SamplerOptions):
        eta: float = option(0.0, "noise scale: 0 deterministic, 1 ancestral", low=0.0)

    register_sampler(SamplerSpec("ddim", ddim_step, "DDIM (Song et al. 2021)", options=DDIMOptions))

The command line's flags and help are generated from the registered options (a new sampler with
a new option needs no edit elsewhere), and :func:`make_options` turns keyword arguments into the
typed options, refusing unknown names and values outside their range with a message that names
the sampler, the option and the value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ddpm.choices import Spacing
from ddpm.errors import UserError
from ddpm.samplers.state import SamplerState

StepFn = Callable[[SamplerState, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def option(default: float, help: str, *, low: float | None = None, high: float | None = None,
           choices: tuple[float, ...] | None = None) -> Any:
    """A field of a :class:`SamplerOptions` dataclass: its default, one line of help, and its allowed values
    (``low`` <= value <= ``high``, or one of ``choices``)."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass(frozen=True)
class SamplerOptions:
    """The options of a sampler: subclasses add fields made with :func:`option`.

    Construction checks every field: ints must be integers, floats finite numbers, and each value
    within its declared range or choices (:class:`ValueError` naming the option; :func:`make_options`
    adds the sampler's name).
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if f.type in (int, "int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    if isinstance(value, float) and value.is_integer():
                        object.__setattr__(self, f.name, int(value))
                        value = int(value)
                    else:
                        raise ValueError(f"{f.name} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if meta.get("choices") is not None and value not in meta["choices"]:
                listing = ", ".join(f"{c:g}" for c in meta["choices"])
                raise ValueError(f"{f.name} must be one of {listing}, got {value!r}")
            if meta.get("low") is not None and value < meta["low"]:
                raise ValueError(f"{f.name} must be >= {meta['low']:g}, got {value!r}")
            if meta.get("high") is not None and value > meta["high"]:
                raise ValueError(f"{f.name} must be <= {meta['high']:g}, got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoOptions(SamplerOptions):
    """A sampler without options."""


def _one_point_per_evaluation(nfe: int) -> int:
    return nfe


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its step function and what the driver must know about it.

    Attributes:
        name: the name users pass (``sampler="ddim"``, ``--sampler ddim``).
        step: the step function, ``step(state, x, index) -> (x at index - 1, x0_hat)``.
        description: one line for listings and ``--help``.
        family: the process it walks (:attr:`DiffusionProcess.name`, e.g. ``"gaussian"``), or None
            for a sampler that only uses the protocol (``p_sample``) and walks every process.
        options: its options dataclass (:class:`NoOptions` when it has none).
        default_spacing: the time grid used when the caller names none.
        default_steps: network evaluations when the caller gives none (``None``: every timestep).
        points_for_nfe: how many grid points K network evaluations buy (K for one evaluation per point).
    """

    name: str
    step: StepFn
    description: str
    family: str | None = "gaussian"
    options: type[SamplerOptions] = NoOptions
    default_spacing: Spacing = "linspace"
    default_steps: int | None = None
    points_for_nfe: Callable[[int], int] = _one_point_per_evaluation


SAMPLERS: dict[str, SamplerSpec] = {}
"""Every registered sampler by name, in registration order."""


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` to :data:`SAMPLERS` (a name may be registered once)."""
    if spec.name in SAMPLERS and SAMPLERS[spec.name] is not spec:
        raise ValueError(f"a sampler named {spec.name!r} is registered already")
    SAMPLERS[spec.name] = spec
    return spec


def get_spec(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def sampler_names() -> tuple[str, ...]:
    """The registered samplers, in registration order (used for validation and CLI choices)."""
    return tuple(SAMPLERS)


def make_options(sampler: str, options: Mapping[str, object] | SamplerOptions | None = None) -> SamplerOptions:
    """The typed options of ``sampler`` from keyword values (or an options object, checked to be its kind).

    Raises :class:`~ddpm.errors.UserError` for an unknown sampler, an option it does not have, or a
    value outside the option's range, naming each.
    """
    spec = get_spec(sampler)
    if isinstance(options, SamplerOptions):
        if not isinstance(options, spec.options):
            raise UserError(f"sampler {sampler!r} takes {spec.options.__name__}, got {type(options).__name__}")
        return options
    given = dict(options or {})
    valid = [f.name for f in dataclasses.fields(spec.options)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise UserError(f"sampler {sampler!r} has no option(s) {unknown}; its options: {', '.join(valid) or 'none'}")
    try:
        return spec.options(**given)
    except (TypeError, ValueError) as exc:
        raise UserError(f"sampler {sampler!r}: {exc}") from None


@dataclass(frozen=True)
class OptionInfo:
    """One option name across the samplers that have it (what a command-line flag is generated from)."""

    name: str
    type: type  # int or float
    help: str
    defaults: dict[str, float]  # sampler -> its default


def all_options() -> list[OptionInfo]:
    """Every option of every registered sampler, merged by name (first declaration's type and help)."""
    merged: dict[str, OptionInfo] = {}
    for spec in SAMPLERS.values():
        for f in dataclasses.fields(spec.options):
            if f.name not in merged:
                merged[f.name] = OptionInfo(f.name, int if f.type in (int, "int") else float, f.metadata["help"], {})
            if f.default is not dataclasses.MISSING:  # option() always gives one
                merged[f.name].defaults[spec.name] = f.default
    return list(merged.values())
