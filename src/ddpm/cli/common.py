"""What the commands share: argument types, the flag groups for loading and sampling, and printing.

Defaults shown in ``--help`` are the real ones: sampling defaults come from the sampler registry,
training defaults from the typed run configuration (see :mod:`ddpm.cli.train`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ddpm.choices import DEVICES, WEIGHTS
from ddpm.samplers import SAMPLERS, SPACINGS, check_options


def _int_at_least(low: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers >= 0 (empty: none)."""
    return [nonnegative_float(v) for v in text.split(",") if v.strip()]


def name_list(valid: tuple[str, ...]) -> Any:
    """An argument type for a comma list of names from ``valid`` (``all`` = every one)."""

    def parse(text: str) -> list[str]:
        names = list(valid) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown name(s) {bad or '(none)'}; valid: all, {', '.join(valid)}")
        return names

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults (``%(default)s``) except where the help text already says it or it is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return super()._get_help_string(action)


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """Which model to load and where: the positional checkpoint, --weights, --device, --seed."""
    p.add_argument("checkpoint", help="a run folder (its newest complete checkpoint), a checkpoint folder, "
                                      "or a diffusers pipeline folder")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA or raw weights")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA, else MPS, else CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (sample i uses its own seed derived from it)")


def add_output_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, type=Path,
                   help=f"output folder (default: a new '{what}' folder beside the checkpoint; never overwritten)")
    p.add_argument("--force", action="store_true", help="replace earlier results in --out")


def add_sampler_flags(p: argparse.ArgumentParser, *, sampler: str, steps: int | None) -> None:
    """--sampler, --steps (network evaluations), --spacing, --eta and --batch-size."""
    described = "; ".join(f"{name}: {spec.description}" for name, spec in SAMPLERS.items())
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=sampler, help=f"reverse-chain sampler ({described})")
    default = "the sampler's default (all T for ancestral and ddim)" if steps is None else str(steps)
    p.add_argument("--steps", type=positive_int, default=steps, metavar="NFE",
                   help=f"network evaluations per sample (default: {default})")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="time grid of the sampler (default: the sampler's own, see ddpm.samplers)")
    p.add_argument("--eta", type=nonnegative_float, default=None,
                   help="noise scale of samplers that have one (ddim: 0 = deterministic; default: the sampler's)")
    p.add_argument("--churn", type=nonnegative_float, default=None,
                   help="heun: EDM's S_churn, noise added before each step (default 0 = deterministic)")
    p.add_argument("--order", type=positive_int, default=None,
                   help="unipc: order of the predictor (default 2, the corrector adds one)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per network call")


def class_choice(text: str) -> int | str:
    """``--class``: a class label (an integer >= 0) or ``all``."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class label (an integer) or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"class labels are >= 0, got {value}")
    return value


def add_class_flags(p: argparse.ArgumentParser, *, all_help: str) -> None:
    """--class and --guidance of class-conditional models."""
    p.add_argument("--class", dest="class_label", type=class_choice, default=None, metavar="LABEL|all",
                   help=f"class-conditional models: the class to draw, or 'all' ({all_help}); default: unconditional")
    p.add_argument("--guidance", type=nonnegative_float, default=1.0,
                   help="classifier-free guidance weight w (0: unconditional, 1: conditional, more: sharper)")


def sampler_options(args: argparse.Namespace) -> dict[str, float]:
    """The sampler options given on the command line (only those set), checked against ``--sampler``."""
    given = {"eta": args.eta, "churn": args.churn, "order": args.order}
    options = {name: float(value) for name, value in given.items() if value is not None}
    check_options(args.sampler, options)
    return options


def say(message: str) -> None:
    """Print to stdout on the main process only."""
    from ddpm.distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def default_out(source: Path, name: str) -> Path:
    """A fresh ``name`` folder beside the run of ``source`` (a checkpoint) or in the working folder."""
    from ddpm.outputs import fresh_folder

    base = source.parent if source.name.startswith("ckpt-") else Path.cwd()
    return fresh_folder(base / name)
