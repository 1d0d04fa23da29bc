"""``ddpm train``: flags map onto the typed run configuration; the library call is :func:`ddpm.fit`.

Precedence: the configuration's defaults, then ``--config FILE``, then ``--set KEY=VALUE``, then the
named flags. Every flag's help shows the real default, read from :class:`~ddpm.config.RunConfig`.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddpm.cli.common import HelpFormatter, add_process_flags, nonnegative_int, positive_float, positive_int, say
from ddpm.config import RunConfig
from ddpm.data.records import DATASETS
from ddpm.errors import ConfigError
from ddpm.nn import MLP_PRESETS, PRESETS
from ddpm.train.stopping import EXIT_STOPPED, parse_duration


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None

# flag: (config key, argument type, help, or a function returning the help when it lists a registry); choices
# come from the field's Literal type. Ranges and finiteness are checked once, by the configuration's validation,
# whatever sets the value.
TRAIN_FLAGS: dict[str, tuple[str, Callable[[str], Any], str | Callable[[], str]]] = {
    "--data": ("data.dataset", str, lambda: f"built-in name ({', '.join(DATASETS)}), a folder of images (one "
               "sub-folder per class: labelled), a prepared cache folder, a .npy/.npz file, or hf:NAME_OR_PATH[:split] "
               "(a Hugging Face datasets set)"),
    "--image-size": ("data.image_size", positive_int, "resize and centre-crop images to this size"),
    "--channels": ("data.channels", positive_int, "convert images to 1, 3 or 4 channels"),
    "--loader": ("data.loader", str, "memory: decode all images up front; stream: read each batch in DataLoader "
                 "workers (large folders); auto: stream image data over 1 GiB decoded"),
    "--workers": ("data.workers", nonnegative_int, "DataLoader workers per process when streaming (0: read in the "
                  "training process); also the processes that build a prepared cache"),
    "--prepared-dir": ("data.prepared_dir", str, "where streamed folders' prepared caches live"),
    "--data-key": ("data.data_key", str, ".npz files: the array to train on (default: the one named images, x, "
                   "data or arr_0)"),
    "--preset": ("model.preset", str, lambda: f"network preset ({', '.join(['auto', *PRESETS, *MLP_PRESETS])})"),
    "--cond-drop": ("model.cond_drop", float, "class-conditional runs: share of labels replaced by the "
                    "null class (what classifier-free guidance needs)"),
    "--steps": ("train.steps", nonnegative_int, "total optimizer steps (a resumed run continues up to this)"),
    "--batch-size": ("train.batch_size", positive_int, "global batch size (split across processes)"),
    "--lr": ("optim.lr", float, "peak learning rate of AdamW"),
    "--warmup-steps": ("optim.warmup_steps", nonnegative_int, "linear learning-rate warm-up steps"),
    "--grad-clip": ("optim.grad_clip", float, "max gradient norm (0 disables clipping)"),
    "--grad-accum": ("optim.grad_accum", positive_int, "micro-batches per optimizer step"),
    "--ema-decay": ("ema.decay", float, "EMA decay once warmed up"),
    "--seed": ("train.seed", int, "random seed of the run"),
    "--device": ("train.device", str, "where to train"),
    # How the network runs (ddpm.nn.policy); auto: the rule for this device and CPU, recorded in metrics.jsonl.
    "--amp": ("train.amp", str, "autocast dtype of the forward pass; weights stay float32 (fp16: CUDA only). For this "
              "and the next four, auto is the rule for this device and CPU (README 'Speed')"),
    "--memory-format": ("train.memory_format", str, "layout of weights and activations: channels_last (NHWC) "
                        "or contiguous (NCHW)"),
    "--attention": ("train.attention", str, "U-Net attention kernel: PyTorch's sdpa (or only its flash / "
                    "efficient kernel) or two bf16-friendly matmuls"),
    "--upsample": ("train.upsample", str, "U-Net upsampling conv: subpixel (same function, 2.25x fewer "
                   "multiply-adds) or nearest then 3x3 conv"),
    "--fused-optimizer": ("train.fused_optimizer", str, "one fused AdamW kernel (auto: where PyTorch has one)"),
    "--out": ("train.out_dir", str, "run folder: checkpoints, metrics.jsonl, sample grids"),
    "--checkpoint-every": ("train.checkpoint_every", positive_int, "steps between checkpoints"),
    "--keep-last": ("train.keep_last", nonnegative_int, "checkpoints kept (0 = all)"),
    "--log-every": ("train.log_every", positive_int, "steps between metric lines"),
    "--sample-every": ("train.sample_every", nonnegative_int, "steps between sample grids (0 = never)"),
    "--eval-every": ("train.eval_every", nonnegative_int, "steps between evaluations of the EMA model: its loss on the "
                     "held-out split and --eval-samples samples measured (Frechet distance, KID) into metrics.jsonl; "
                     "the best is kept as the run's best checkpoint (0 = never)"),
    "--eval-samples": ("train.eval_samples", nonnegative_int, "samples measured at each evaluation (0: the loss only)"),
    "--eval-sampler": ("train.eval_sampler", str, "their sampler (default: the process's)"),
    "--eval-steps": ("train.eval_steps", positive_int, "their network evaluations (default: the sampler's)"),
    "--time-limit": ("train.time_limit", duration, "stop with a checkpoint before this much time has passed "
                     "since the command started (seconds, 90m, 1h30m, 2d or [D-]HH:MM:SS; leave a minute for "
                     f"start-up); exit status {EXIT_STOPPED}"),
    "--grace-period": ("train.grace_period", positive_float, "seconds from SIGTERM, SIGUSR1 or SIGINT to exit: the "
                       "step in progress and its checkpoint are written within it, else the run exits without them "
                       "(keep it below the scheduler's: Slurm's KillWait and torchrun give 30)"),
}


# What an unset (None) field means, for --help.
NONE_MEANS = {"data.image_size": "the images' own size", "data.channels": "the source's",
              "data.data_key": "images, x, data or arr_0",
              "data.workers": "from the CPU count", "data.prepared_dir": "$DDPM_CACHE/prepared"}


def field_default_and_choices(key: str) -> tuple[Any, tuple[Any, ...] | None]:
    """The default of config field ``key`` ("section.name") and its choices if it is a Literal."""
    section_name, name = key.split(".")
    section = getattr(RunConfig(), section_name)
    hint = typing.get_type_hints(type(section))[name]
    choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
    return getattr(section, name), choices


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model on a data set", formatter_class=HelpFormatter,
                       description="Train a denoising network. Flags override the --config TOML file and "
                                   "--set; every checkpoint saves the resolved config.")
    p.add_argument("--config", type=Path, help="TOML run configuration; --set and flags override it")
    add_process_flags(p)
    for flag, (key, typ, described) in TRAIN_FLAGS.items():
        text = described() if callable(described) else described
        default, choices = field_default_and_choices(key)
        shown = NONE_MEANS.get(key, "unset") if default is None else default
        metavar = None if choices else flag.lstrip("-").upper().replace("-", "_")
        p.add_argument(flag, dest=key, type=typ, choices=choices, default=None, metavar=metavar,
                       help=f"{text} (default: {shown}) [{key}]")
    unflippable = ", ".join(r.name for r in DATASETS.values() if r.kind == "image" and not r.flippable)
    p.add_argument("--hflip", dest="data.hflip", action=argparse.BooleanOptionalAction, default=None,
                   help=f"random horizontal flips (default: on for images, except {unflippable}) [data.hflip]")
    p.add_argument("--class-cond", dest="model.class_cond", action="store_const", const=True, default=None,
                   help="condition the network on the data's class labels (the number of classes is taken from "
                        "the data) [model.class_cond]")
    p.add_argument("--skip-bad-images", dest="data.skip_bad_images", action="store_const", const=True, default=None,
                   help="skip undecodable image files and report how many [data.skip_bad_images]")
    p.add_argument("--no-cache-images", dest="data.cache_images", action="store_const", const=False, default=None,
                   help="streamed folders: decode the files every epoch instead of writing a prepared cache once "
                        "[data.cache_images]")
    p.add_argument("--hf-streaming", dest="data.hf_streaming", action="store_const", const=True, default=None,
                   help="read an hf: data set as a stream, for sets larger than the disk [data.hf_streaming]")
    compile_default, _ = field_default_and_choices("train.compile")
    p.add_argument("--compile", dest="train.compile", action=argparse.BooleanOptionalAction, default=None,
                   help=f"torch.compile the model; never automatic, it has not yet repaid its compile time "
                        f"(default: {'on' if compile_default else 'off'}) [train.compile]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field, e.g. --set ema.power=0.8 (repeatable)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT|auto",
                       help="continue the newest good checkpoint in --out (without a value: an error if there is "
                            "none), the given one (newer checkpoints are moved to set-aside/, never deleted), or with "
                            "'auto' the run in --out if it holds this run, else start it: the command line a "
                            "requeued job repeats")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the previous run in --out and start over (a new run is otherwise refused in a "
                            "folder holding checkpoints)")
    p.set_defaults(func=run)


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the TOML file, then --set, then the named flags."""
    from ddpm.config import apply_overrides, load_config

    cfg = load_config(args.config) if args.config else RunConfig()
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    for key in [k for k in vars(args) if "." in k]:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return apply_overrides(cfg, overrides) if overrides else cfg


def run(args: argparse.Namespace) -> int:
    from ddpm.train.fit import fit

    result = fit(resolve_run_config(args), resume=args.resume, overwrite=args.overwrite)
    if result.set_aside is not None:
        say(f"checkpoints newer than the one resumed from were moved to {result.set_aside}")
    if result.stopped is not None:
        say(f"stopped at step {result.step} of {result.config.train.steps} ({result.stopped}); checkpoint: "
            f"{result.checkpoint}. Run the same command with --resume auto to continue.")
        return EXIT_STOPPED
    say(f"trained to step {result.step}; checkpoint: {result.checkpoint}")
    return 0
