"""The ``ddpm`` command line: train, sample, nll, forward, eval, sweep and demo.

Every command is a small function over the library; flags map onto the typed run configuration
(:mod:`ddpm.train.config`). Bad input ends with ``ddpm: error: ...`` and exit status 2, never a
traceback; a run stopped by non-finite losses ends with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ddpm.train.config import ConfigError, RunConfig

log = logging.getLogger("ddpm")


class CLIError(Exception):
    """A user error: printed as ``ddpm: error: <message>``, exit status 2."""


# ----------------------------------------------------------------------------------- helpers
def parse_int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def say(message: str) -> None:
    """Print to stdout on the main process only."""
    from ddpm.train.distributed import is_main_process

    if is_main_process():
        print(message, flush=True)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def pick_device(name: str) -> torch.device:
    from ddpm.train.distributed import resolve_device

    return resolve_device(name)


# ------------------------------------------------------------------------- loading a checkpoint
class LoadedModel:
    """A trained network with its diffusion and configuration, read from a checkpoint."""

    def __init__(self, checkpoint: str | Path, *, weights: str = "ema", device: torch.device) -> None:
        from ddpm.build import build_diffusion, model_from_spec, model_spec
        from ddpm.train.checkpoint import load_model_weights, read_config, resolve_checkpoint

        self.path = resolve_checkpoint(checkpoint)
        self.config: RunConfig = read_config(self.path)
        shape = self.config.model.data_shape
        if shape is None:
            raise CLIError(f"{self.path}: the checkpoint's config has no model.data_shape")
        self.data_shape = tuple(shape)
        learned = self.config.diffusion.variance == "learned_range"
        _, self.spec = model_spec(self.config.model, self.data_shape, learned_sigma=learned)
        self.model = model_from_spec(self.spec)
        load_model_weights(self.path, self.model, which=weights)  # type: ignore[arg-type]
        self.model.to(device).eval()
        self.diffusion = build_diffusion(self.config.diffusion)
        self.weights = weights
        self.device = device

    @property
    def is_image(self) -> bool:
        return len(self.data_shape) == 3

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name in ("model.safetensors", "ema.safetensors"):
            digest.update((self.path / name).read_bytes())
        return digest.hexdigest()[:16]


def sample_seeds(seed: int, indices: Sequence[int], stream: str = "sample") -> list[int]:
    """The seed of item i: a function of (seed, stream, i) only, so item i is the same in any batch or process."""
    from ddpm.train.trainer import derive_seed

    return [derive_seed(seed, stream, int(i)) for i in indices]


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    num: int,
    *,
    sampler: str,
    steps: int | None,
    eta: float,
    seed: int,
    batch_size: int,
    clip_denoised: bool = True,
    progress: bool = True,
    trajectory_for: int = 0,
    trajectory_frames: int = 60,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples 0..num-1 (sharded over processes under torchrun, gathered on every rank).

    Sample i draws x_T and every step's noise from its own generator seeded by (seed, i), so it is
    identical whatever the batch size or the number of processes. Returns the samples ``[num, ...]``
    (float, on the CPU) and, if ``trajectory_for`` > 0, the reverse chain of the first ones. The
    predicted x_0 is clipped to [-1, 1] only for images.
    """
    from ddpm.train.distributed import all_gather_tensor, get_rank, get_world_size

    rank, world = get_rank(), get_world_size()
    clip_denoised = clip_denoised and loaded.is_image  # [-1, 1] is the range of images, not of vectors
    per_rank = math.ceil(num / world)
    mine = list(range(rank * per_rank, min(num, (rank + 1) * per_rank)))
    gen_device = loaded.device if loaded.device.type == "cuda" else torch.device("cpu")
    out: list[torch.Tensor] = []
    trajectory = None
    batches = range(0, len(mine), batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampler}, {steps or loaded.diffusion.num_timesteps} steps)")
    for start in batches:
        idx = mine[start : start + batch_size]
        gens = [torch.Generator(device=gen_device).manual_seed(s) for s in sample_seeds(seed, idx)]
        want_traj = trajectory is None and start == 0 and rank == 0 and trajectory_for > 0
        from ddpm.samplers import sample

        result = sample(
            loaded.diffusion, loaded.model, (len(idx), *loaded.data_shape), sampler=sampler, steps=steps,
            **({"eta": eta} if sampler == "ddim" else {}),
            clip_denoised=clip_denoised, generator=gens, device=loaded.device,
            return_trajectory=want_traj, trajectory_frames=trajectory_frames,
        )
        if want_traj:
            x, traj = result
            trajectory = traj[:, :trajectory_for].cpu()
        else:
            x = result
        out.append(x.float().cpu())
    local = torch.cat(out) if out else torch.empty(0, *loaded.data_shape)
    if world > 1:  # rank r holds samples r*per_rank.. in order: pad, gather, and the first num are the samples
        padded = torch.zeros(per_rank, *loaded.data_shape)
        padded[: local.shape[0]] = local
        local = all_gather_tensor(padded.to(loaded.device)).cpu()[:num]
    return local, trajectory


# ---------------------------------------------------------------------------------- train
TRAIN_FLAGS: dict[str, tuple[str, Callable[[str], Any] | None, str]] = {
    # flag: (config key, type, help)
    "--data": ("data.dataset", str, "built-in name (mnist5k, digits, moons, gmm, swissroll, checkerboard, mnist, "
               "fashion-mnist, cifar10), a folder of images, or a .npy/.npz file"),
    "--image-size": ("data.image_size", positive_int, "resize and centre-crop images to this size"),
    "--channels": ("data.channels", positive_int, "convert images to 1, 3 or 4 channels"),
    "--preset": ("model.preset", str, "network preset (auto, mnist-28, digits-8, ddpm-cifar10, ddpm-celebahq256, "
                 "ddpm-lsun256, mlp-2d)"),
    "--steps": ("train.steps", positive_int, "total optimizer steps (a resumed run continues up to this)"),
    "--batch-size": ("train.batch_size", positive_int, "global batch size (split across processes)"),
    "--lr": ("optim.lr", float, "peak learning rate of AdamW"),
    "--warmup-steps": ("optim.warmup_steps", int, "linear learning-rate warm-up steps"),
    "--grad-clip": ("optim.grad_clip", float, "max gradient norm (0 disables clipping)"),
    "--grad-accum": ("optim.grad_accum", positive_int, "micro-batches per optimizer step"),
    "--ema-decay": ("ema.decay", float, "EMA decay once warmed up"),
    "--schedule": ("diffusion.schedule", str, "beta schedule: linear or cosine"),
    "--timesteps": ("diffusion.timesteps", positive_int, "number of diffusion steps T"),
    "--prediction": ("diffusion.prediction", str, "network target: eps, x0 or v"),
    "--variance": ("diffusion.variance", str, "reverse variance: fixed_small, fixed_large or learned_range"),
    "--loss": ("diffusion.loss", str, "simple, vlb or hybrid"),
    "--loss-weighting": ("diffusion.loss_weighting", str, "none or min-snr"),
    "--timestep-sampling": ("diffusion.timestep_sampling", str, "uniform or loss-aware"),
    "--seed": ("train.seed", int, "random seed of the run"),
    "--device": ("train.device", str, "auto, cpu, cuda or mps"),
    "--amp": ("train.amp", str, "autocast on GPUs: none, bf16 or fp16"),
    "--out": ("train.out_dir", str, "run folder: checkpoints, metrics.jsonl, sample grids"),
    "--checkpoint-every": ("train.checkpoint_every", positive_int, "steps between checkpoints"),
    "--keep-last": ("train.keep_last", int, "checkpoints kept (0 = all)"),
    "--log-every": ("train.log_every", positive_int, "steps between metric lines"),
    "--sample-every": ("train.sample_every", int, "steps between sample grids (0 = never)"),
}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML run configuration; flags override it")
    for flag, (key, typ, help_text) in TRAIN_FLAGS.items():
        p.add_argument(flag, dest=key, type=typ, default=None, help=f"{help_text} [{key}]")
    p.add_argument("--no-hflip", dest="data.hflip", action="store_const", const=False, default=None,
                   help="no random horizontal flips [data.hflip]")
    p.add_argument("--skip-bad-images", dest="data.skip_bad_images", action="store_const", const=True, default=None,
                   help="skip undecodable image files and report how many [data.skip_bad_images]")
    p.add_argument("--compile", dest="train.compile", action="store_const", const=True, default=None,
                   help="torch.compile the model [train.compile]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config field, e.g. --set ema.power=0.8 (repeatable)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest checkpoint in --out ('auto', the default when given "
                        "without a value) or from a checkpoint path")


def resolve_run_config(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """Defaults, then the TOML file, then --set, then the named flags."""
    from ddpm.train.config import apply_overrides, load_config

    cfg = base or (load_config(args.config) if args.config else RunConfig())
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        if "=" not in item:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    for key in [k for k in vars(args) if "." in k]:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return apply_overrides(cfg, overrides) if overrides else cfg


def make_sample_fn(out_dir: Path, diffusion: Any, data_shape: tuple[int, ...], reference: torch.Tensor | None,
                   *, num: int = 64, steps: int = 50, seed: int = 0) -> Callable[[torch.nn.Module, int], None]:
    """A callback for the trainer: a grid (or scatter for 2-D data) of samples from the EMA model."""
    from ddpm import viz
    from ddpm.samplers import sample

    def sample_fn(model: torch.nn.Module, step: int) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        gens = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, range(num))]
        with torch.inference_mode():
            x = sample(diffusion, model, (num, *data_shape), sampler="ddim", steps=steps, generator=gens,
                                 device=device, clip_denoised=len(data_shape) == 3)
        model.train(was_training)
        if len(data_shape) == 3:
            viz.save_grid(x, out_dir / "samples" / f"step-{step:08d}.png", nrow=8)
        else:
            viz.save_scatter(x, reference, out_dir / "samples" / f"step-{step:08d}.png", title=f"step {step}")

    return sample_fn


def run_training(cfg: RunConfig, *, resume: str | None, sample_fn_steps: int = 50) -> tuple[dict[str, Any], Any]:
    """Build data, diffusion and network from ``cfg`` and train; returns the trainer's summary and the data."""
    from ddpm.build import build_dataset, build_diffusion, build_model, model_spec
    from ddpm.train import Trainer, validate_config
    from ddpm.train.config import apply_overrides

    dataset = build_dataset(cfg.data, "train")
    try:
        eval_dataset = build_dataset(cfg.data, "test")
    except ValueError:
        eval_dataset = None
    shape = tuple(dataset.shape)
    if dataset.kind == "vector":  # flips mean nothing for vectors
        cfg = apply_overrides(cfg, {"data.hflip": False})
    preset, _ = model_spec(cfg.model, shape, learned_sigma=cfg.diffusion.variance == "learned_range")
    cfg = apply_overrides(cfg, {"model.preset": preset, "model.data_shape": list(shape)})
    validate_config(cfg)
    diffusion = build_diffusion(cfg.diffusion)
    model, spec = build_model(cfg, shape)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"data: {dataset.name} ({len(dataset)} train, shape {list(shape)}); model: {preset} "
        f"({n_params / 1e6:.2f}M parameters); {diffusion}")
    out_dir = Path(cfg.train.out_dir)
    reference = dataset.get_batch(torch.arange(min(len(dataset), 2000))) if dataset.kind == "vector" else None
    sample_fn = make_sample_fn(out_dir, diffusion, shape, reference, steps=sample_fn_steps)
    trainer = Trainer(cfg, model, diffusion, dataset, eval_dataset=eval_dataset, sample_fn=sample_fn)
    summary = trainer.run(resume=resume)
    return summary, dataset


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_run_config(args)
    summary, _ = run_training(cfg, resume=args.resume)
    say(f"trained to step {summary['step']}; checkpoint: {summary['checkpoint']}")
    return 0


# --------------------------------------------------------------------------------- sample
def save_samples(x: torch.Tensor, out: Path, formats: Sequence[str], *, is_image: bool) -> list[Path]:
    """Write samples in the requested formats; returns the files written."""
    from ddpm import viz

    written = []
    out.mkdir(parents=True, exist_ok=True)
    if is_image:
        images = viz.to_uint8(x)  # [N, C, H, W] uint8 on the 256-level grid
        if "npz" in formats:
            import numpy as np

            path = out / "samples.npz"
            np.savez_compressed(path, images=images.permute(0, 2, 3, 1).numpy())  # NHWC uint8
            written.append(path)
        if "grid" in formats:
            written.append(viz.save_grid(x[:256], out / "grid.png"))
        if "png" in formats:
            from PIL import Image

            folder = out / "png"
            folder.mkdir(exist_ok=True)
            for i, img in enumerate(images):
                arr = img.permute(1, 2, 0).numpy()
                Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:05d}.png")
            written.append(folder)
    else:
        import numpy as np

        path = out / "samples.npz"
        np.savez_compressed(path, samples=x.numpy())
        written.append(path)
    return written


def cmd_sample(args: argparse.Namespace) -> int:
    from ddpm import viz
    from ddpm.train.distributed import cleanup_distributed, is_main_process, setup_distributed

    device, _, _ = setup_distributed(args.device)
    try:
        loaded = LoadedModel(args.checkpoint, weights=args.weights, device=device)
        out = Path(args.out) if args.out else loaded.path.parent / "samples"
        t0 = time.perf_counter()
        x, trajectory = generate(
            loaded, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
            batch_size=args.batch_size, clip_denoised=not args.no_clip,
            trajectory_for=min(args.num, 16) if args.animate and loaded.is_image else 0,
        )
        seconds = time.perf_counter() - t0
        if is_main_process():
            formats = [f.strip() for f in args.format.split(",")]
            written = save_samples(x, out, formats, is_image=loaded.is_image)
            if trajectory is not None:
                written.append(viz.save_chain_animation(trajectory, out / "reverse_chain.gif"))
            if not loaded.is_image:
                from ddpm.build import build_dataset

                ref = build_dataset(loaded.config.data, "test")
                written.append(viz.save_scatter(x, ref.get_batch(torch.arange(min(len(ref), 5000))),
                                                out / "scatter.png", title=f"{args.sampler}, {args.num} samples"))
            write_json(out / "sample_info.json", {
                "checkpoint": str(loaded.path), "weights": args.weights, "num": args.num, "sampler": args.sampler,
                "steps": args.steps or loaded.diffusion.num_timesteps, "eta": args.eta, "seed": args.seed,
                "seconds": round(seconds, 2), "layout": "samples.npz: images uint8 [N, H, W, C] on the 256-level "
                "grid (pixel k stands for k / 127.5 - 1); vectors: samples float32 [N, D]",
            })
            for path in written:
                say(f"wrote {path}")
            say(f"{args.num} samples in {seconds:.1f}s")
    finally:
        cleanup_distributed()
    return 0


# ------------------------------------------------------------------------------------ nll
def bound_on_data(loaded: LoadedModel, data: torch.Tensor, *, estimate: int | None, batch_size: int,
                  seed: int, respace: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The bound in bits/dim on ``data`` (sharded over processes), exact or estimated.

    Returns per-image totals gathered on every rank and the averaged parts; the dataset average is
    the mean over all images (each weighted equally), not a mean of per-process means.
    """
    from ddpm.likelihood import nll, nll_estimate
    from ddpm.train.distributed import all_gather_tensor, get_rank, get_world_size

    diffusion = loaded.diffusion if respace is None else loaded.diffusion.respaced(respace)
    rank, world = get_rank(), get_world_size()
    n = data.shape[0]
    per_rank = math.ceil(n / world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    T = diffusion.num_timesteps
    rows = torch.zeros(per_rank, 4 + T, dtype=torch.float64)  # total, prior, stderr, valid, terms...
    gen_device = loaded.device if loaded.device.type == "cuda" else torch.device("cpu")
    batches = range(0, len(mine), batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="bound")
    with torch.inference_mode():
        for start in batches:
            idx = mine[start : start + batch_size]
            x0 = data[idx].to(loaded.device)
            sl = slice(start, start + len(idx))
            # image i draws its noise (and timesteps) from its own seed: results do not depend on the
            # batch size or the number of processes
            gen = [torch.Generator(device=gen_device).manual_seed(s) for s in sample_seeds(seed, idx, "nll")]
            if estimate is None:
                r = nll(diffusion, loaded.model, x0, generator=gen, max_batch_size=max(batch_size, 256))
                rows[sl, 0], rows[sl, 1], rows[sl, 4:] = r.total_bpd.cpu(), r.prior_bpd.cpu(), r.terms_bpd.cpu()
            else:
                e = nll_estimate(diffusion, loaded.model, x0, estimate, generator=gen,
                                 max_batch_size=max(batch_size, 256))
                rows[sl, 0], rows[sl, 1], rows[sl, 2] = e.total_bpd.cpu(), e.prior_bpd.cpu(), e.stderr_bpd.cpu()
            rows[sl, 3] = 1.0
    if world > 1:
        rows = all_gather_tensor(rows.to(loaded.device)).cpu()
    rows = rows[rows[:, 3] == 1]
    total, prior = rows[:, 0], rows[:, 1]
    result: dict[str, Any] = {
        "images": int(rows.shape[0]),
        "timesteps": T,
        "mode": "exact" if estimate is None else f"importance estimate, {estimate} terms per image",
        "total_bpd": float(total.mean()),
        "prior_bpd (L_T)": float(prior.mean()),
    }
    if estimate is None:
        terms = rows[:, 4:]
        result["decoder_bpd (L_0)"] = float(terms[:, 0].mean())
        result["kl_bpd (sum of L_{t-1})"] = float(terms[:, 1:].sum(1).mean())
        # the data set's standard error from the spread of per-image totals
        result["stderr_bpd"] = float(total.std() / math.sqrt(len(total))) if len(total) > 1 else float("nan")
        result["terms_bpd"] = terms.mean(0)
    else:
        # per-image Monte Carlo error plus the spread over images
        between = float(total.std() / math.sqrt(len(total))) if len(total) > 1 else 0.0
        within = float(rows[:, 2].pow(2).sum().sqrt() / len(total))
        result["stderr_bpd"] = math.sqrt(between**2 + within**2)
        result["mc_stderr_bpd"] = within
    return result


def load_eval_images(loaded: LoadedModel, spec: str | None, split: str, num: int) -> torch.Tensor:
    from ddpm.build import build_dataset
    from ddpm.train.config import apply_overrides

    data_cfg = loaded.config.data
    if spec is not None:
        data_cfg = apply_overrides(loaded.config, {"data.dataset": spec}).data
    ds = build_dataset(data_cfg, split)  # type: ignore[arg-type]
    if ds.kind != "image":
        raise CLIError("the bound uses the 256-level decoder of 8-bit images; this data set holds vectors")
    if tuple(ds.shape) != loaded.data_shape:
        raise CLIError(f"data of shape {list(ds.shape)} does not fit a model trained on {list(loaded.data_shape)}")
    return ds.get_batch(torch.arange(min(num, len(ds))))


def cmd_nll(args: argparse.Namespace) -> int:
    from ddpm import viz
    from ddpm.train.distributed import cleanup_distributed, is_main_process, setup_distributed

    device, _, _ = setup_distributed(args.device)
    try:
        loaded = LoadedModel(args.checkpoint, weights=args.weights, device=device)
        data = load_eval_images(loaded, args.data, args.split, args.num_images)
        t0 = time.perf_counter()
        result = bound_on_data(loaded, data, estimate=args.estimate, batch_size=args.batch_size, seed=args.seed,
                               respace=args.respace)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        if is_main_process():
            out = Path(args.out) if args.out else loaded.path.parent / "nll"
            terms = result.pop("terms_bpd", None)
            result.update({"checkpoint": str(loaded.path), "weights": args.weights, "split": args.split,
                           "respaced_steps": args.respace})
            write_json(out / "nll.json", result)
            say(f"bound on {result['images']} {args.split} images ({result['mode']}, T={result['timesteps']}):")
            for key in ("total_bpd", "stderr_bpd", "prior_bpd (L_T)", "kl_bpd (sum of L_{t-1})", "decoder_bpd (L_0)"):
                if key in result:
                    say(f"  {key:26s} {result[key]:.4f}")
            say(f"wrote {out / 'nll.json'}")
            if terms is not None:
                say(f"wrote {viz.save_terms_plot(terms, out / 'terms.png')}")
    finally:
        cleanup_distributed()
    return 0


# -------------------------------------------------------------------------------- forward
def cmd_forward(args: argparse.Namespace) -> int:
    from ddpm import viz
    from ddpm.data.images import load_image
    from ddpm.diffusion import GaussianDiffusion
    from ddpm.schedules import make_betas

    path = Path(args.image)
    if not path.is_file():
        raise CLIError(f"image {str(path)!r} does not exist")
    array = load_image(path, channels=args.channels, image_size=args.image_size)
    x0 = torch.tensor(array, dtype=torch.float32).div(127.5).sub(1).unsqueeze(0)
    diffusion = GaussianDiffusion(make_betas(args.schedule, args.timesteps))
    ts = args.t or sorted({0, *[round(f * (args.timesteps - 1)) for f in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)]})
    if max(ts) >= args.timesteps or min(ts) < 0:
        raise CLIError(f"--t values must lie in 0..{args.timesteps - 1}, got {ts}")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=gen)  # one noise draw: the same static dissolves the image
    frames = [x0] + [diffusion.q_sample(x0, torch.tensor([t]), noise) for t in ts]
    labels = ["x_0"] + [f"t={t + 1}" for t in ts]
    abar = diffusion.schedule.alphas_cumprod
    out = Path(args.out)
    viz.save_strip(torch.stack(frames).clamp(-1, 1), out, labels=labels)
    say(f"wrote {out}")
    for t in ts:
        say(f"  t={t + 1:5d}  signal sqrt(abar)={abar[t].sqrt():.4f}  noise sqrt(1-abar)={(1 - abar[t]).sqrt():.4f}")
    return 0


# ------------------------------------------------------------------------------ argparse
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpm", description="Denoising Diffusion Probabilistic Models: train, sample, measure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("train", help="train a model on a data set", formatter_class=fmt,
                       description="Train a denoising network. Flags override the --config TOML file; every "
                                   "checkpoint saves the resolved config.")
    add_train_flags(p)
    p.set_defaults(func=cmd_train)

    def add_checkpoint_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("checkpoint", help="a checkpoint folder or a run folder (its newest checkpoint)")
        q.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights")
        q.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
        q.add_argument("--seed", type=int, default=0, help="random seed")
        q.add_argument("--out", default=None, help="output folder (default: beside the checkpoint)")

    def add_sampler_flags(q: argparse.ArgumentParser, *, steps_default: int | None) -> None:
        q.add_argument("--sampler", choices=("ancestral", "ddim"), default="ddim", help="reverse-chain sampler")
        q.add_argument("--steps", type=positive_int, default=steps_default,
                       help="sampling steps (respaced chain); default all T")
        q.add_argument("--eta", type=nonnegative_float, default=0.0, help="DDIM noise (0 = deterministic)")
        q.add_argument("--batch-size", type=positive_int, default=64, help="samples per network call")

    p = sub.add_parser("sample", help="generate samples from a checkpoint", formatter_class=fmt)
    add_checkpoint_flags(p)
    p.add_argument("-n", "--num", type=positive_int, default=64, help="number of samples")
    add_sampler_flags(p, steps_default=None)
    p.add_argument("--format", default="grid,npz", help="comma list of: grid (PNG), png (one file each), npz")
    p.add_argument("--animate", action="store_true", help="also write reverse_chain.gif (x_T -> x_0)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("nll", help="the variational bound in bits/dim on held-out images", formatter_class=fmt)
    add_checkpoint_flags(p)
    p.add_argument("--data", default=None, help="data set (default: the run's own)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split")
    p.add_argument("-n", "--num-images", type=positive_int, default=64, help="images evaluated")
    p.add_argument("--estimate", type=positive_int, default=None, metavar="K",
                   help="unbiased Monte Carlo estimate from K timesteps per image instead of all T")
    p.add_argument("--respace", type=positive_int, default=None, metavar="K",
                   help="the bound of the respaced K-step model instead of the T-step one")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("forward", help="the forward chain of one image as a strip", formatter_class=fmt)
    p.add_argument("image", help="an image file")
    p.add_argument("--out", default="forward.png", help="output PNG")
    p.add_argument("--t", type=parse_int_list, default=None, help="0-based timesteps, e.g. 0,50,250,999")
    p.add_argument("--schedule", default="linear", help="beta schedule")
    p.add_argument("--timesteps", type=positive_int, default=1000, help="T")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize and centre-crop")
    p.add_argument("--channels", type=positive_int, default=3, help="1 (grey) or 3 (RGB)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.set_defaults(func=cmd_forward)

    from ddpm import commands

    commands.register(sub, add_checkpoint_flags, add_sampler_flags)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ddpm.data.standard import ChecksumError, DownloadError
    from ddpm.train import CheckpointError, NonFiniteLossError

    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:
        print(f"ddpm: stopped: {exc}", file=sys.stderr)
        return 1
    except (CLIError, ConfigError, CheckpointError, ChecksumError, DownloadError, FileNotFoundError,
            ValueError, TypeError) as exc:
        if args.verbose:
            raise
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpm: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
