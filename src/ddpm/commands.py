"""The measuring commands of the CLI: ``eval`` (an eval card), ``sweep`` (quality against steps)
and ``demo`` (train on built-in MNIST, then sample, animate and measure, in one folder)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.cli import (
    CLIError,
    LoadedModel,
    bound_on_data,
    generate,
    positive_int,
    say,
    write_json,
)

DIGIT_SETS = ("mnist5k", "digits", "mnist", "fashion-mnist")


# ----------------------------------------------------------------------------- features
def classifier_for(loaded: LoadedModel, *, seed: int = 0, epochs: int = 5) -> tuple[Any, dict[str, Any]]:
    """The project's digit classifier for this run's data set: trained once on its training split,
    cached in the data cache folder, and described (hash, held-out accuracy) for the eval card."""
    from ddpm.build import build_dataset
    from ddpm.data import default_cache_dir
    from ddpm.data.registry import resolve_name
    from ddpm.eval import DigitClassifier, train_classifier

    cfg = loaded.config.data
    name = resolve_name(cfg.dataset) if isinstance(cfg.dataset, str) else None
    if name not in DIGIT_SETS:
        raise CLIError(f"the download-free classifier features exist for {', '.join(DIGIT_SETS)}; "
                       f"this run's data is {cfg.dataset!r}: use --features inception")
    shape = "x".join(str(s) for s in loaded.data_shape)
    folder = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "classifiers" / f"{name}-{shape}-s{seed}"
    test = build_dataset(cfg, "test")
    test_images, test_labels = test.get_batch(torch.arange(len(test))), test.labels
    try:
        clf = DigitClassifier.load(folder)
    except (FileNotFoundError, OSError, ValueError):
        train = build_dataset(cfg, "train")
        say(f"training the {name} feature classifier once ({len(train)} images; cached in {folder})")
        clf = train_classifier(train.get_batch(torch.arange(len(train))), train.labels, epochs=epochs, seed=seed)
        clf.save(folder)
    accuracy = clf.accuracy(test_images, test_labels)
    info = {"name": clf.name, "fingerprint": clf.fingerprint, "heldout_accuracy": round(accuracy, 4),
            "trained_on": f"{name} train split", "seed": seed, "path": str(folder)}
    return clf, info


@dataclass
class Reference:
    """Real held-out data and whatever the metrics need of it."""

    images: torch.Tensor
    features: torch.Tensor | None
    description: str


def distance_report(loaded: LoadedModel, samples: torch.Tensor, ref: Reference, extractor: Any,
                    log_density: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any]:
    """Every distance between ``samples`` and the reference, with the protocol in the keys."""
    from ddpm.eval import (
        class_histogram,
        frechet_distance_from_features,
        kid,
        mean_log_density,
        mmd_rbf,
        precision_recall,
        sliced_wasserstein,
    )

    if not loaded.is_image:
        out = {"sliced_wasserstein": sliced_wasserstein(samples, ref.images, num_projections=256, seed=0),
               "mmd_rbf": mmd_rbf(samples[:2000], ref.images[:2000])}
        if log_density is not None:
            out["mean_log_density_samples"] = mean_log_density(samples, log_density)
            out["mean_log_density_data"] = mean_log_density(ref.images, log_density)
        return out
    feats = extractor(samples)
    kid_mean, kid_se = kid(feats, ref.features, num_subsets=10, seed=0)
    precision, recall = precision_recall(ref.features, feats, k=3)
    out = {"frechet_distance": frechet_distance_from_features(feats, ref.features), "kid": kid_mean,
           "kid_stderr": kid_se, "precision": precision, "recall": recall}
    if hasattr(extractor, "predict"):
        hist = class_histogram(extractor.predict(samples), 10)
        out["class_histogram"] = [round(float(h), 4) for h in hist]
        out["classes_present"] = int((hist >= 0.02).sum())  # classes making up at least 2% of the samples
    return out


def make_reference(loaded: LoadedModel, features: str, inception_weights: str | None, seed: int
                   ) -> tuple[Reference, Any, dict[str, Any], Any]:
    """The held-out reference, the feature extractor, its description and the data's log-density."""
    from ddpm.build import build_dataset

    test = build_dataset(loaded.config.data, "test")
    images = test.get_batch(torch.arange(len(test)))
    if not loaded.is_image:
        return Reference(images, None, f"{test.name} test split, {len(test)} points"), None, {}, test.log_density
    if features == "auto":
        features = "classifier" if (loaded.data_shape[0] == 1) else "inception"
    if features == "classifier":
        extractor, info = classifier_for(loaded, seed=seed)
    else:
        from ddpm.eval import InceptionV3Features

        extractor = InceptionV3Features(inception_weights, device=str(loaded.device))
        info = {"name": extractor.name, "fingerprint": extractor.fingerprint}
    ref = Reference(images, extractor(images), f"{test.name} test split, {len(test)} images")
    return ref, extractor, info, None


# ---------------------------------------------------------------------------------- eval
def eval_card_markdown(card: dict[str, Any]) -> str:
    rows = [("checkpoint", f"{card['checkpoint']} ({card['weights']} weights, sha256 {card['checkpoint_hash']})"),
            ("samples", f"{card['num_samples']} ({card['sampler']}, {card['steps']} steps, eta {card['eta']}, "
                        f"seed {card['seed']})"),
            ("reference", card["reference"])]
    if card.get("features"):
        f = card["features"]
        acc = f" held-out accuracy {f['heldout_accuracy']:.3f}," if "heldout_accuracy" in f else ""
        rows.append(("features", f"{f['name']} ({acc} sha256 {f['fingerprint']})"))
    for key, value in card["metrics"].items():
        rows.append((key, ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else
                     (f"{value:.4g}" if isinstance(value, float) else str(value))))
    if "bits_per_dim" in card:
        b = card["bits_per_dim"]
        rows.append(("bits/dim", f"{b['total_bpd']:.3f} +/- {b['stderr_bpd']:.3f} ({b['mode']}, {b['images']} "
                                 f"held-out images, T={b['timesteps']})"))
    rows.append(("seconds", f"{card['seconds']:.0f}"))
    lines = ["| quantity | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def evaluate(loaded: LoadedModel, *, num: int, sampler: str, steps: int | None, eta: float, seed: int,
             batch_size: int, features: str = "auto", inception_weights: str | None = None,
             nll_images: int = 0, nll_terms: int = 40, samples: torch.Tensor | None = None) -> dict[str, Any]:
    """Sample, measure against held-out data, and return the eval card."""
    t0 = time.perf_counter()
    ref, extractor, feat_info, log_density = make_reference(loaded, features, inception_weights, seed)
    if samples is None:
        samples, _ = generate(loaded, num, sampler=sampler, steps=steps, eta=eta, seed=seed, batch_size=batch_size)
    card: dict[str, Any] = {
        "checkpoint": str(loaded.path), "checkpoint_hash": loaded.fingerprint(), "weights": loaded.weights,
        "num_samples": int(samples.shape[0]), "sampler": sampler, "steps": steps or loaded.diffusion.num_timesteps,
        "eta": eta, "seed": seed, "reference": ref.description, "features": feat_info,
        "metrics": distance_report(loaded, samples, ref, extractor, log_density),
    }
    if loaded.is_image and nll_images > 0:
        data = ref.images[:nll_images]
        card["bits_per_dim"] = bound_on_data(loaded, data, estimate=nll_terms, batch_size=batch_size, seed=seed,
                                             progress=False)
    card["seconds"] = round(time.perf_counter() - t0, 1)
    return card


def cmd_eval(args: argparse.Namespace) -> int:
    from ddpm.cli import pick_device

    loaded = LoadedModel(args.checkpoint, weights=args.weights, device=pick_device(args.device))
    card = evaluate(loaded, num=args.num, sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed,
                    batch_size=args.batch_size, features=args.features, inception_weights=args.inception_weights,
                    nll_images=args.nll_images, nll_terms=args.nll_terms)
    out = Path(args.out) if args.out else loaded.path.parent / "eval"
    write_json(out / "eval_card.json", card)
    (out / "eval_card.md").write_text(eval_card_markdown(card), encoding="utf-8")
    say(eval_card_markdown(card))
    say(f"wrote {out / 'eval_card.json'} and {out / 'eval_card.md'}")
    return 0


# --------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> int:
    from ddpm import viz
    from ddpm.cli import pick_device

    loaded = LoadedModel(args.checkpoint, weights=args.weights, device=pick_device(args.device))
    ref, extractor, feat_info, log_density = make_reference(loaded, args.features, None, args.seed)
    T = loaded.diffusion.num_timesteps
    rows = []
    for sampler in args.samplers.split(","):
        for steps in args.steps:
            if steps > T:
                continue
            t0 = time.perf_counter()
            x, _ = generate(loaded, args.num, sampler=sampler, steps=steps, eta=0.0, seed=args.seed,
                            batch_size=args.batch_size, progress=False)
            seconds = time.perf_counter() - t0
            metrics = distance_report(loaded, x, ref, extractor, log_density)
            key = "frechet_distance" if loaded.is_image else "sliced_wasserstein"
            rows.append({"sampler": sampler, "steps": steps, "distance": metrics[key], "seconds": round(seconds, 1),
                         **{k: v for k, v in metrics.items() if k not in (key, "class_histogram")}})
            say(f"{sampler:9s} {steps:5d} steps  {key} {metrics[key]:.4g}  ({seconds:.1f}s)")
    out = Path(args.out) if args.out else loaded.path.parent / "sweep"
    metric = "Frechet distance (classifier features)" if loaded.is_image else "sliced Wasserstein distance"
    write_json(out / "sweep.json", {"checkpoint": str(loaded.path), "num_samples": args.num, "seed": args.seed,
                                    "metric": metric, "features": feat_info, "rows": rows})
    lines = [f"| sampler | steps | {metric} | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['steps']} | {r['distance']:.3f} | {r['seconds']} |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plt = viz._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = [(r["steps"], r["distance"]) for r in rows if r["sampler"] == sampler]
        ax.plot(*zip(*pts, strict=True), marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
    say("\n".join(lines))
    say(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


# ---------------------------------------------------------------------------------- demo
def demo_config(out_dir: str, steps: int, seed: int) -> Any:
    """The built-in MNIST recipe tuned for quality per CPU minute (see the README for the measurements)."""
    from ddpm.train.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), {
        "data.dataset": "mnist5k", "data.hflip": False,
        "model.preset": "mnist-28",
        # v-prediction with min-SNR weighting: eps-prediction at this budget gave speckled blobs
        # (Frechet distance 385-617 vs 8.5 at 1000 steps; README "The demo recipe")
        "diffusion.schedule": "cosine", "diffusion.timesteps": 1000, "diffusion.prediction": "v",
        "diffusion.loss_weighting": "min-snr",
        "optim.lr": 2e-3, "optim.warmup_steps": 100, "optim.grad_clip": 1.0, "optim.weight_decay": 0.0,
        "ema.decay": 0.999, "ema.warmup": "power", "ema.power": 0.75,
        "train.steps": steps, "train.batch_size": 64, "train.seed": seed, "train.device": "cpu",
        "train.checkpoint_every": 250, "train.keep_last": 2, "train.log_every": 25, "train.sample_every": 0,
        "train.out_dir": out_dir, "train.tensorboard": False,
    })


def loss_curve(run_dir: Path, out: Path) -> Path | None:
    from ddpm import viz

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and r.get("loss") is not None]
    if not rows:
        return None
    return viz.save_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], out, title="training loss")


def cmd_demo(args: argparse.Namespace) -> int:
    from ddpm import viz
    from ddpm.cli import run_training, save_samples

    out = Path(args.out)
    t_start = time.perf_counter()
    cfg = demo_config(str(out / "run"), args.steps, args.seed)
    say(f"ddpm demo: training on built-in MNIST-5k for {args.steps} steps (CPU), then sampling and measuring")
    run_training(cfg, resume="auto" if args.resume else None)
    train_seconds = time.perf_counter() - t_start
    loaded = LoadedModel(out / "run", weights="ema", device=torch.device("cpu"))
    files: dict[str, Path] = {}

    t0 = time.perf_counter()
    x, trajectory = generate(loaded, args.num_samples, sampler=args.sampler, steps=args.sample_steps, eta=0.0,
                             seed=args.seed, batch_size=100, trajectory_for=36, trajectory_frames=args.sample_steps + 1)
    sample_seconds = time.perf_counter() - t0
    written = save_samples(x, out, ["npz"], is_image=True)
    files["samples (uint8 [N, 28, 28, 1], k/127.5 - 1)"] = written[0]
    files["sample grid"] = viz.save_grid(x[:100], out / "samples.png", nrow=10)
    files["reverse chain animation"] = viz.save_chain_animation(trajectory, out / "reverse_chain.gif", nrow=6)
    files["reverse chain strip"] = viz.save_strip(trajectory[:: max(1, len(trajectory) // 8)][:, :6],
                                                  out / "reverse_chain.png")
    curve = loss_curve(out / "run", out / "loss.png")
    if curve is not None:
        files["loss curve"] = curve
    forward = _forward_strip(loaded, out / "forward_chain.png")
    files["forward chain"] = forward

    card = evaluate(loaded, num=args.num_samples, sampler=args.sampler, steps=args.sample_steps, eta=0.0,
                    seed=args.seed, batch_size=100, nll_images=args.nll_images, nll_terms=40, samples=x)
    card["train_seconds"] = round(train_seconds, 1)
    card["sample_seconds"] = round(sample_seconds, 1)
    card["total_seconds"] = round(time.perf_counter() - t_start, 1)
    files["eval card"] = write_json(out / "eval_card.json", card)
    (out / "eval_card.md").write_text(eval_card_markdown(card), encoding="utf-8")
    m = card["metrics"]
    say(f"\nFrechet distance (classifier features) {m['frechet_distance']:.2f}, KID {m['kid']:.4f} +/- "
        f"{m['kid_stderr']:.4f}, classes present {m['classes_present']}/10, histogram {m['class_histogram']}")
    if "bits_per_dim" in card:
        b = card["bits_per_dim"]
        say(f"bits/dim on {b['images']} held-out images: {b['total_bpd']:.3f} +/- {b['stderr_bpd']:.3f}")
    say(f"minutes: training {train_seconds / 60:.1f}, total {card['total_seconds'] / 60:.1f}")
    for what, path in files.items():
        say(f"  {what:45s} {path}")
    return 0


def _forward_strip(loaded: LoadedModel, path: Path) -> Path:
    """A held-out digit dissolving into static under the forward chain."""
    from ddpm import viz
    from ddpm.build import build_dataset

    test = build_dataset(loaded.config.data, "test")
    x0 = test.get_batch(torch.arange(4))
    T = loaded.diffusion.num_timesteps
    ts = [0, T // 50, T // 10, T // 5, 2 * T // 5, 3 * T // 5, 4 * T // 5, T - 1]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    frames = [x0] + [loaded.diffusion.q_sample(x0, torch.full((4,), t), noise) for t in ts]
    return viz.save_strip(torch.stack(frames).clamp(-1, 1), path, labels=["x_0"] + [f"t={t + 1}" for t in ts])


# ------------------------------------------------------------------------------ register
def register(sub: Any, add_checkpoint_flags: Callable[..., None], add_sampler_flags: Callable[..., None]) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("eval", help="sample and measure: an eval card (JSON and Markdown)", formatter_class=fmt)
    add_checkpoint_flags(p)
    p.add_argument("-n", "--num", type=positive_int, default=1000, help="samples generated")
    add_sampler_flags(p, steps_default=50)
    p.add_argument("--features", choices=("auto", "classifier", "inception"), default="auto",
                   help="feature network: the project's digit classifier (offline) or Inception-v3")
    p.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--nll-images", type=int, default=100, help="held-out images for the bits/dim estimate (0: skip)")
    p.add_argument("--nll-terms", type=positive_int, default=40, help="timesteps per image of the estimate")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="quality against sampling steps for each sampler", formatter_class=fmt)
    add_checkpoint_flags(p)
    p.add_argument("-n", "--num", type=positive_int, default=500, help="samples per setting (same seeds)")
    p.add_argument("--samplers", default="ancestral,ddim", help="comma list of samplers")
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50, 100, 1000],
                   help="comma list of step counts")
    p.add_argument("--batch-size", type=positive_int, default=100, help="samples per network call")
    p.add_argument("--features", choices=("auto", "classifier", "inception"), default="auto",
                   help="feature network for images")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("demo", help="train on built-in MNIST on the CPU, then sample, animate and measure",
                       formatter_class=fmt)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=positive_int, default=1500, help="training steps")
    p.add_argument("--num-samples", type=positive_int, default=500, help="samples drawn and measured")
    p.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral",
                   help="sampler (ancestral measured better than DDIM at equal steps on this model)")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="sampling steps (respaced chain)")
    p.add_argument("--nll-images", type=int, default=100, help="held-out images for the bits/dim estimate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.set_defaults(func=cmd_demo)

