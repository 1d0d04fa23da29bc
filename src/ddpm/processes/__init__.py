"""Diffusion processes: the protocol the library uses (:mod:`.protocol`) and the registry of processes.

A process is registered with the configuration class of its ``[diffusion]`` table and a function
that builds it from that table::

    register_process("gaussian", GaussianConfig, GaussianDiffusion.from_config,
                     "Gaussian diffusion of Ho et al. 2020")

After that, ``diffusion.process = "gaussian"`` in a configuration file (``--process gaussian`` on
the command line) trains, checkpoints, loads, samples and bounds it: nothing else in the library
names the process. A process defined outside the package registers itself the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ddpm.errors import ConfigError
from ddpm.processes.categorical import CategoricalConfig, CategoricalDiffusion
from ddpm.processes.gaussian import GaussianConfig, GaussianDiffusion, PMeanVariance
from ddpm.processes.protocol import DiffusionProcess, ProcessConfig, TrainingLosses


@dataclass(frozen=True)
class ProcessEntry:
    """A registered process: the class of its ``[diffusion]`` table and how to build it from one."""

    name: str
    config: type[ProcessConfig]
    build: Callable[[Any], DiffusionProcess]
    description: str


PROCESSES: dict[str, ProcessEntry] = {}


def register_process(name: str, config: type[ProcessConfig], build: Callable[[Any], DiffusionProcess],
                     description: str) -> None:
    """Make process ``name`` available to configurations, the trainer, ``ddpm.load`` and the command line."""
    if name in PROCESSES and PROCESSES[name].config is not config:
        raise ValueError(f"a different process named {name!r} is registered already")
    default = getattr(config, "process", None)
    if default != name:
        raise ValueError(f"{config.__name__}.process defaults to {default!r}; it must default to {name!r}")
    PROCESSES[name] = ProcessEntry(name, config, build, description)


def process_entry(name: str) -> ProcessEntry:
    """The registry entry of ``name``; an unknown name is a :class:`~ddpm.errors.ConfigError` listing the valid ones."""
    if name not in PROCESSES:
        raise ConfigError(f"diffusion.process={name!r} is not valid: expected one of "
                          f"{', '.join(repr(p) for p in PROCESSES)}")
    return PROCESSES[name]


def build_process(cfg: ProcessConfig) -> DiffusionProcess:
    """The process a ``[diffusion]`` table describes."""
    entry = process_entry(cfg.process)
    if not isinstance(cfg, entry.config):
        raise ConfigError(f"the [diffusion] table is a {type(cfg).__name__}, but process {cfg.process!r} reads a "
                          f"{entry.config.__name__}")
    cfg.validate()
    return entry.build(cfg)


register_process("gaussian", GaussianConfig, GaussianDiffusion.from_config,
                 "Gaussian diffusion of Ho et al. 2020 (the default)")
register_process("categorical", CategoricalConfig, CategoricalDiffusion.from_config,
                 "categorical diffusion over K states per dimension (D3PM, Austin et al. 2021)")

__all__ = [
    "PROCESSES",
    "CategoricalConfig",
    "CategoricalDiffusion",
    "DiffusionProcess",
    "GaussianConfig",
    "GaussianDiffusion",
    "PMeanVariance",
    "ProcessConfig",
    "ProcessEntry",
    "TrainingLosses",
    "build_process",
    "process_entry",
    "register_process",
]
