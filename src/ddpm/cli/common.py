"""What the commands share: argument types, the flag groups for loading, sampling and the process, and printing.

Defaults shown in ``--help`` are the real ones, and the flags themselves are generated from the
registries: the sampler options (``--eta``, ``--order``, ...) from the sampler registry, the
process flags (``--process``, ``--schedule``, ...) from the registered processes' configuration
tables, training defaults from the typed run configuration (see :mod:`ddpm.cli.train`). A new
sampler option or a new process field needs no edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

from ddpm.choices import DEVICES, SPACINGS, WEIGHTS
from ddpm.processes import PROCESSES, ProcessConfig
from ddpm.samplers import SAMPLERS, SamplerOptions, all_options, check_options


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
    p.add_argument("--best", dest="which", action="store_const", const="best", default="latest",
                   help="a run folder's best checkpoint (the evaluation while training's, best.json) instead of "
                        "its newest")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (auto: CUDA, else MPS, else CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (sample i uses its own seed derived from it)")


def add_output_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, type=Path,
                   help=f"output folder (default: a new '{what}' folder beside the checkpoint; never overwritten)")
    p.add_argument("--force", action="store_true", help="replace earlier results in --out")


def add_sampler_flags(p: argparse.ArgumentParser, *, steps: int | None = None) -> None:
    """--sampler, --steps (network evaluations), --spacing, one flag per sampler option, and --batch-size."""
    described = "; ".join(f"{name}: {spec.description}" for name, spec in SAMPLERS.items())
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help=f"reverse-chain sampler (default: the model's process's, dpm++2m-sde for Gaussian diffusion; "
                        f"{described})")
    default = "the sampler's default (all T for ancestral and ddim)" if steps is None else str(steps)
    p.add_argument("--steps", type=positive_int, default=steps, metavar="NFE",
                   help=f"network evaluations per sample (default: {default})")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="time grid of the sampler (default: the sampler's own, see ddpm.samplers)")
    for opt in all_options():
        defaults = ", ".join(f"{name} {value:g}" for name, value in opt.defaults.items())
        p.add_argument(f"--{opt.name.replace('_', '-')}", dest=f"option_{opt.name}", default=None,
                       type=int_value if opt.type is int else finite_float, metavar=opt.name.upper(),
                       help=f"{opt.help} (default: {defaults})")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per network call")


def class_label(text: str) -> int:
    """``--class`` of the editing commands: a class label, an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class label (an integer), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"class labels are >= 0, got {value}")
    return value


def class_choice(text: str) -> int | str:
    """``--class`` of sampling: a class label (an integer >= 0) or ``all``."""
    return text if text == "all" else class_label(text)


def add_class_flags(p: argparse.ArgumentParser, *, all_help: str | None = None) -> None:
    """--class and --guidance of class-conditional models; ``all_help`` (what ``--class all`` does) allows 'all'."""
    if all_help is None:
        p.add_argument("--class", dest="class_label", type=class_label, default=None, metavar="LABEL",
                       help="class-conditional models: the class to aim every image at; default: unconditional")
    else:
        p.add_argument("--class", dest="class_label", type=class_choice, default=None, metavar="LABEL|all",
                       help=f"class-conditional models: the class to draw, or 'all' ({all_help}); "
                            "default: unconditional")
    p.add_argument("--guidance", type=nonnegative_float, default=1.0,
                   help="classifier-free guidance weight w (0: unconditional, 1: conditional, more: sharper)")


def int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def sampler_options(args: argparse.Namespace, sampler: str) -> dict[str, Any]:
    """The sampler options given on the command line (only those set), checked against ``sampler``."""
    options = {opt.name: value for opt in all_options() if (value := getattr(args, f"option_{opt.name}")) is not None}
    checked: SamplerOptions = check_options(sampler, options)
    return {k: v for k, v in checked.as_dict().items() if k in options}


def add_process_flags(p: argparse.ArgumentParser) -> None:
    """``--process`` and one flag per field of every registered process's ``[diffusion]`` table.

    Each flag sets ``diffusion.<field>`` (the help says which process reads it); values are parsed
    and checked by the configuration (:func:`ddpm.config.apply_overrides`).
    """
    seen: set[str] = set()
    for entry in PROCESSES.values():
        hints = typing.get_type_hints(entry.config)
        for f in dataclasses.fields(entry.config):
            if f.name in seen:
                continue
            seen.add(f.name)
            flag, key = f"--{f.name.replace('_', '-')}", f"diffusion.{f.name}"
            factory = f.default_factory
            default = f.default if factory is dataclasses.MISSING else factory()
            owner = "" if f.name in ProcessConfig.__dataclass_fields__ else f"; process {entry.name}"
            if f.name == "process":
                choices: tuple[Any, ...] | None = tuple(PROCESSES)
                extra = "; ".join(f"{e.name}: {e.description}" for e in PROCESSES.values())
                help_text = f"{f.metadata['help']} ({extra})"
            else:
                literal = next((a for a in [hints[f.name], *typing.get_args(hints[f.name])]
                                if typing.get_origin(a) is typing.Literal), None)
                choices = typing.get_args(literal) if literal is not None else None
                described = f.metadata.get("help", "")
                help_text = described() if callable(described) else described
            shown = "unset" if default in (None, {}) else default
            if hints[f.name] in (bool, bool | None):
                p.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} [{key}{owner}]")
                continue
            p.add_argument(flag, dest=key, choices=choices, default=None,
                           metavar=None if choices else f.name.upper(),
                           help=f"{help_text} (default: {shown}) [{key}{owner}]")


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


def add_images_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, nargs="+", required=True, metavar="FILES|FOLDER|NPZ",
                   help="the images to work on: image files, folders of them, or .npz / .npy arrays (uint8 "
                        "[N, H, W, C]); they must have the model's size")


def read_inputs(sources: list[Path], pipe: Any) -> tuple[Any, list[str]]:
    """The images of ``--images`` as floats ``[N, C, H, W]`` in [-1, 1] for ``pipe``'s model, and their names.

    Raises :class:`~ddpm.errors.UserError` for a model of vectors or images of another size than the model's.
    """
    import torch

    from ddpm.data.arrays import uint8_to_float
    from ddpm.data.images import read_images
    from ddpm.errors import UserError

    if not pipe.is_image:
        raise UserError(f"{pipe.source} models vectors of shape {list(pipe.data_shape)}, not images")
    channels, height, width = pipe.data_shape
    images, names = read_images(sources, channels=channels)
    if images.shape[2:] != (height, width):
        raise UserError(f"{names[0]} is {images.shape[3]}x{images.shape[2]} pixels; the model of {pipe.source} "
                        f"works on {width}x{height} images")
    return uint8_to_float(torch.from_numpy(images)), names


def edit_record(args: argparse.Namespace, pipe: Any, names: list[str], seconds: float) -> dict[str, Any]:
    """What every editing command records of its run (the command's own settings are added by it)."""
    return {"checkpoint": str(pipe.source), "weights": args.weights, "images": names, "class": args.class_label,
            "guidance": args.guidance, "seed": args.seed, "seconds": round(seconds, 2)}


def save_edits(out: Path, result: Any, columns: list[Any], *, info_name: str, record: dict[str, Any]) -> None:
    """Write an editing command's results and print their paths: ``samples.npz`` (the results in the input's
    order), ``grid.png`` (one row per image, ``columns`` ``[N, C, H, W]`` side by side, the first 64 rows) and
    ``info_name`` (``record`` and the layout)."""
    import torch

    from ddpm import viz
    from ddpm.outputs import SAMPLES_LAYOUT, save_samples, write_json

    written = save_samples(result, out, ["npz"], is_image=True)
    grid = torch.stack(columns, dim=1)[:64].flatten(0, 1)
    written.append(viz.save_grid(grid, out / "grid.png", nrow=len(columns)))
    written.append(write_json(out / info_name, {**record, "layout": SAMPLES_LAYOUT + "; in the order of the images"}))
    for path in written:
        say(f"wrote {path}")
