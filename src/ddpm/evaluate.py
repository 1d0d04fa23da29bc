"""Measuring a trained model: the eval card and the sweep of samplers by network evaluations.

    import ddpm
    from ddpm.evaluate import evaluate, sweep

    pipe = ddpm.load("runs/mnist")
    card = evaluate(pipe, num=1000, sampler="ancestral", steps=50)        # a dict; card_markdown(card)
    rows = sweep(pipe, samplers=["ancestral", "dpm++2m-sde"], nfes=[10, 50], num=300)

Features: what the data set's record names (:mod:`ddpm.data.records`): for the built-in 28x28 and
8x8 sets a small classifier trained once on the training split (seeded, cached, held-out accuracy in
the card; no download); for other images the Inception-v3 of FID (weights from a file); for 2-D
data, distances on the points themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.build import build_dataset
from ddpm.choices import FEATURES, Features, Spacing, Split, check_choice
from ddpm.config import DataConfig, apply_overrides
from ddpm.data.records import find_dataset
from ddpm.errors import UserError
from ddpm.eval.features import Resize
from ddpm.eval.metrics import frechet_distance, gaussian_stats
from ddpm.eval.stats import FeatureStats, check_compatible, feature_stats, load_stats, stats_description
from ddpm.pipeline import Pipeline


@dataclass
class Reference:
    """Real held-out data and what the metrics need of it."""

    images: torch.Tensor | None  # None when only the statistics are known (a reference statistics file)
    features: torch.Tensor | None
    description: str
    extractor: Any = None  # maps images to features; has .predict for the digit classifier
    feature_info: dict[str, Any] | None = None
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None  # exact, for the 2-D mixture
    labels: torch.Tensor | None = None  # the held-out images' classes, when the data has them
    stats: FeatureStats | None = None  # mu and sigma of the reference features (from `features`, or a file)
    split: str = "test"


def reference_data(pipe: Pipeline, data: str | None = None) -> DataConfig:
    """The data configuration to measure against: the run's own, or the data set ``data`` names."""
    if data is not None:
        return apply_overrides(pipe.config, {"data.dataset": data}).data
    if pipe.config.model.preset == "diffusers":
        raise UserError(f"{pipe.source} is an imported diffusers pipeline and names no data set: pass --data")
    return pipe.config.data


def classifier_for(cfg: DataConfig, data_shape: tuple[int, ...], *, seed: int = 0,
                   epochs: int = 5) -> tuple[Any, dict[str, Any]]:
    """The project's digit classifier for the data set ``cfg``: trained once on its training split,
    cached in the data cache folder, and described (hash, held-out accuracy) for the eval card."""
    from ddpm.data import DATASETS, default_cache_dir
    from ddpm.eval import DigitClassifier, train_classifier

    record = find_dataset(cfg.dataset)
    if record is None or record.features != "classifier":
        with_classifier = [r.name for r in DATASETS.values() if r.features == "classifier"]
        raise UserError(f"the download-free classifier features exist for {', '.join(with_classifier)}; "
                        f"this run's data is {cfg.dataset!r}: use --features inception")
    name = record.name
    shape = "x".join(str(s) for s in data_shape)
    folder = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "classifiers" / f"{name}-{shape}-s{seed}"
    test = build_dataset(cfg, "test")
    test_images, test_labels = test.get_batch(torch.arange(len(test))), _labels(test)
    try:
        clf = DigitClassifier.load(folder)
    except (FileNotFoundError, OSError, ValueError):
        train = build_dataset(cfg, "train")
        print(f"training the {name} feature classifier once ({len(train)} images; cached in {folder})", flush=True)
        clf = train_classifier(train.get_batch(torch.arange(len(train))), _labels(train), epochs=epochs, seed=seed,
                               num_classes=record.num_classes or 10)
        clf.save(folder)
    accuracy = clf.accuracy(test_images, test_labels)
    info = {"name": clf.name, "fingerprint": clf.fingerprint, "heldout_accuracy": round(accuracy, 4),
            "trained_on": f"{name} train split", "seed": seed, "path": str(folder)}
    return clf, info


def _labels(dataset: Any) -> torch.Tensor:
    """The class labels of a split the classifier trains or is checked on (its record says it has them)."""
    if dataset.labels is None:
        raise UserError(f"{dataset.name} ({dataset.split}) has no class labels; the classifier features need them")
    return dataset.labels


def feature_network(cfg: DataConfig, data_shape: tuple[int, ...], *, features: Features = "auto",
                    inception_weights: str | None = None, resize: Resize = "tf1", device: torch.device | str = "cpu",
                    seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The feature network that measures images of ``cfg``'s data and its description for the card.

    ``"auto"``: the data set's own (its record's, e.g. the project's digit classifier), else
    Inception-v3 (FID's, weights from ``inception_weights`` or ``$DDPM_INCEPTION_WEIGHTS``, resized to
    299 with ``resize``: ``"tf1"`` as the TensorFlow graph of the original FID, ``"pytorch"`` as
    pytorch-fid).
    """
    check_choice("features", features, FEATURES)
    if features == "auto":
        record = find_dataset(cfg.dataset)
        features = "classifier" if record is not None and record.features == "classifier" else "inception"
    if features == "classifier":
        return classifier_for(cfg, data_shape, seed=seed)
    from ddpm.eval import InceptionV3Features

    extractor = InceptionV3Features(inception_weights, device=str(device), resize=resize)
    return extractor, {"name": extractor.name, "fingerprint": extractor.fingerprint, "resize": resize}


def make_reference(cfg: DataConfig, data_shape: tuple[int, ...], *, split: Split = "test",
                   features: Features = "auto", inception_weights: str | None = None, resize: Resize = "tf1",
                   device: torch.device | str = "cpu", seed: int = 0,
                   stats_file: str | Path | None = None) -> Reference:
    """The ``split`` of ``cfg``'s data as the reference, with features for images (see :func:`feature_network`).

    With ``stats_file`` the reference is that file's statistics instead (ours, pytorch-fid's,
    clean-fid's or EDM's ``.npz``): only the Frechet distance can be computed against it, and a file
    of another feature dimension or network is refused.
    """
    if stats_file is not None:
        stats = load_stats(stats_file)
        extractor, info = feature_network(cfg, data_shape, features=features, inception_weights=inception_weights,
                                          resize=resize, device=device, seed=seed)
        check_compatible(stats, info, extractor.dim)
        return Reference(None, None, stats_description(stats), extractor, info, stats=stats,
                         split=str(stats.info.get("split", "unknown")))
    dataset = build_dataset(cfg, split)
    if tuple(dataset.shape) != tuple(data_shape):
        raise UserError(f"the reference data {cfg.dataset!r} has shape {list(dataset.shape)}, the model makes "
                        f"{list(data_shape)}")
    images = dataset.get_batch(torch.arange(len(dataset)))
    if len(data_shape) != 3:
        return Reference(images, None, f"{dataset.name} {split} split, {len(dataset)} points",
                         log_density=getattr(dataset, "log_density", None), split=split)
    extractor, info = feature_network(cfg, data_shape, features=features, inception_weights=inception_weights,
                                      resize=resize, device=device, seed=seed)
    feats = extractor(images)
    mu, sigma = gaussian_stats(feats)
    return Reference(images, feats, f"{dataset.name} {split} split, {len(dataset)} images", extractor, info,
                     labels=dataset.labels, stats=FeatureStats(mu, sigma), split=split)


def data_stats(cfg: DataConfig, data_shape: tuple[int, ...], *, split: Split = "train", features: Features = "auto",
               inception_weights: str | None = None, resize: Resize = "tf1", device: torch.device | str = "cpu",
               batch_size: int = 250, seed: int = 0, progress: bool = False) -> FeatureStats:
    """The feature statistics of every image of ``split`` (streamed in batches), with their description."""
    dataset = build_dataset(cfg, split)
    if dataset.kind != "image" or tuple(dataset.shape) != tuple(data_shape):
        raise UserError(f"reference statistics are of images; {cfg.dataset!r} holds {dataset.kind} data of shape "
                        f"{list(dataset.shape)}")
    extractor, info = feature_network(cfg, data_shape, features=features, inception_weights=inception_weights,
                                      resize=resize, device=device, seed=seed)
    starts: Any = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"features of {dataset.name} ({split})")
    batches = (extractor(dataset.get_batch(torch.arange(s, min(s + batch_size, len(dataset))))) for s in starts)
    mu, sigma, count = feature_stats(batches)
    return FeatureStats(mu, sigma, {"features": info, "data": str(cfg.dataset), "split": split, "count": count,
                                    "created_by": "ddpm stats"})


def distances(samples: torch.Tensor, ref: Reference) -> dict[str, Any]:
    """Every distance between ``samples`` and the reference, named by what it measures."""
    from ddpm.eval import (
        class_histogram,
        frechet_distance_from_features,
        kid,
        mean_log_density,
        mmd_rbf,
        precision_recall,
        sliced_wasserstein,
    )

    out: dict[str, Any]
    if ref.features is None and ref.stats is not None:  # a statistics file: the Frechet distance only
        mu, sigma = gaussian_stats(ref.extractor(samples))
        return {"frechet_distance": frechet_distance(mu, sigma, ref.stats.mu, ref.stats.sigma)}
    if ref.features is None or ref.images is None:  # 2-D points
        assert ref.images is not None
        out = {"sliced_wasserstein": sliced_wasserstein(samples, ref.images, num_projections=256, seed=0),
               "mmd_rbf": mmd_rbf(samples[:2000], ref.images[:2000])}
        if ref.log_density is not None:
            out["mean_log_density_samples"] = mean_log_density(samples, ref.log_density)
            out["mean_log_density_data"] = mean_log_density(ref.images, ref.log_density)
        return out
    feats = ref.extractor(samples)
    # ten disjoint subsets, fewer for fewer than 20 samples (each needs two)
    kid_mean, kid_se = kid(feats, ref.features, num_subsets=max(1, min(10, min(len(feats), len(ref.features)) // 2)),
                           seed=0)
    precision, recall = precision_recall(ref.features, feats, k=3)
    out = {"frechet_distance": frechet_distance_from_features(feats, ref.features), "kid": kid_mean,
           "kid_stderr": kid_se, "precision": precision, "recall": recall}
    if hasattr(ref.extractor, "predict"):
        hist = class_histogram(ref.extractor.predict(samples), ref.extractor.config.num_classes)
        out["class_histogram"] = [round(float(h), 4) for h in hist]
        out["classes_present"] = int((hist >= 0.02).sum())  # classes making up at least 2% of the samples
    return out


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels ``[num]`` cycling through the classes (sample i asks for class i mod K)."""
    return torch.arange(num) % num_classes


def label_accuracy(samples: torch.Tensor, requested: torch.Tensor, ref: Reference,
                   num_classes: int) -> dict[str, Any]:
    """How often the feature classifier assigns each sample to the class it was asked for, per class."""
    if not hasattr(ref.extractor, "predict"):
        return {}
    hit = (ref.extractor.predict(samples).cpu() == requested).double()
    by_class = [float(hit[requested == c].mean()) if (requested == c).any() else float("nan")
                for c in range(num_classes)]
    return {"label_accuracy": float(hit.mean()), "label_accuracy_by_class": [round(a, 4) for a in by_class]}


def headline_metric(ref: Reference) -> tuple[str, str]:
    """(key in :func:`distances`, description) of the one number a sweep compares."""
    if ref.extractor is None:
        return "sliced_wasserstein", "sliced Wasserstein distance"
    name = (ref.feature_info or {}).get("name", "features")
    return "frechet_distance", f"Frechet distance ({name})"


# ---------------------------------------------------------------------------------- eval card
def evaluate(
    pipe: Pipeline, *, num: int, sampler: str | None = None, steps: int | None = None, spacing: Spacing | None = None,
    seed: int = 0, batch_size: int = 100, data: str | None = None, features: Features = "auto",
    inception_weights: str | None = None, resize: Resize = "tf1", ref_stats: str | Path | None = None,
    nll_images: int = 0, nll_terms: int = 40, guidance: float = 1.0,
    guidance_scales: Sequence[float] = (), samples: torch.Tensor | None = None, reference: Reference | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Sample (unless ``samples`` are given), measure against held-out data, and return the eval card.

    The reference is the held-out split of the run's data (or of ``data``), or the statistics file
    ``ref_stats`` (the Frechet distance only; see :func:`make_reference`). The card's ``protocol``
    says how the numbers were made: samples, weights, reference, split, feature network, its hash and
    resize mode. A class-conditional model samples balanced classes (sample i asks for class i mod K)
    at ``guidance``; the card then adds how often the feature classifier assigns each sample to its
    class, and, for each of ``guidance_scales``, the distance and that accuracy on the same seeds.
    Its bits/dim are of -log p(x | y) with the true labels.
    """
    t0 = time.perf_counter()
    sampler = pipe.sampler_name(sampler)
    ref = reference or make_reference(reference_data(pipe, data), pipe.data_shape, features=features,
                                      inception_weights=inception_weights, resize=resize, device=pipe.device,
                                      seed=seed, stats_file=ref_stats)
    num_classes = pipe.num_classes
    labels = balanced_labels(num if samples is None else samples.shape[0], num_classes) if num_classes else None

    def draw(w: float) -> torch.Tensor:
        return pipe.sample(num, sampler=sampler, steps=steps, spacing=spacing, seed=seed, batch_size=batch_size,
                           classes=labels, guidance=w, **options)

    if samples is None:
        samples = draw(guidance)
    card: dict[str, Any] = {
        "checkpoint": str(pipe.source), "checkpoint_hash": pipe.fingerprint(), "weights": pipe.weights,
        "num_samples": int(samples.shape[0]), "sampler": sampler,
        "network_evaluations": pipe.network_evaluations(sampler, steps), "spacing": spacing or "default",
        "options": dict(options), "seed": seed, "reference": ref.description, "features": ref.feature_info or {},
        "metrics": distances(samples, ref),
    }
    card["protocol"] = {"samples": int(samples.shape[0]), "weights": pipe.weights, "reference": ref.description,
                        "reference_split": ref.split, **{k: v for k, v in (ref.feature_info or {}).items()
                                                         if k in ("name", "fingerprint", "resize")}}
    if labels is not None:
        card["classes"] = f"balanced: sample i asks for class i mod {pipe.num_classes}, guidance {guidance}"
        card["metrics"].update(label_accuracy(samples, labels, ref, num_classes or 0))
        if guidance_scales:
            card["guidance_sweep"] = guidance_sweep(pipe, ref, draw, labels, guidance_scales)
    if pipe.is_image and nll_images > 0 and ref.images is not None:  # (a statistics file holds no images)
        true_labels = None if labels is None or ref.labels is None else ref.labels[:nll_images]
        bound = pipe.nll(ref.images[:nll_images], estimate=nll_terms, batch_size=batch_size, seed=seed,
                         labels=true_labels)
        card["bits_per_dim"] = bound.to_dict()
    card["seconds"] = round(time.perf_counter() - t0, 1)
    return card


def guidance_sweep(pipe: Pipeline, ref: Reference, draw: Callable[[float], torch.Tensor], labels: torch.Tensor,
                   scales: Sequence[float]) -> list[dict[str, Any]]:
    """Distance and label accuracy at each guidance weight, on the same seeds and labels."""
    key, _ = headline_metric(ref)
    rows = []
    for w in scales:
        x = draw(float(w))
        rows.append({"guidance": float(w), "distance": distances(x, ref)[key],
                     **label_accuracy(x, labels, ref, pipe.num_classes or 0)})
    return rows


def write_eval_card(card: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Write the card as ``eval_card.json`` and ``eval_card.md`` (and ``guidance.png`` for a guidance sweep with
    label accuracy) into ``folder``; returns what was written, by what it is."""
    from ddpm import viz
    from ddpm.outputs import write_json

    written = {"eval card": write_json(folder / "eval_card.json", card)}
    (folder / "eval_card.md").write_text(card_markdown(card), encoding="utf-8")
    written["eval card (Markdown)"] = folder / "eval_card.md"
    if card.get("guidance_sweep") and "label_accuracy" in card["guidance_sweep"][0]:
        written["guidance: distance against label accuracy"] = viz.save_guidance_plot(
            card["guidance_sweep"], folder / "guidance.png",
            metric=f"{card['features'].get('name', 'distance')} Frechet distance")
    return written


def card_markdown(card: dict[str, Any]) -> str:
    """The eval card as a two-column Markdown table."""
    options = ", ".join(f"{k} {v}" for k, v in card.get("options", {}).items())
    rows = [("checkpoint", f"{card['checkpoint']} ({card['weights']} weights, sha256 {card['checkpoint_hash']})"),
            ("samples", f"{card['num_samples']} ({card['sampler']}, {card['network_evaluations']} network "
                        f"evaluations, {card['spacing']} spacing{', ' + options if options else ''}, "
                        f"seed {card['seed']})"),
            ("reference", card["reference"])]
    if card.get("features"):
        f = card["features"]
        acc = f" held-out accuracy {f['heldout_accuracy']:.3f}," if "heldout_accuracy" in f else ""
        rows.append(("features", f"{f['name']} ({acc} sha256 {f['fingerprint']})"))
    for key, value in card["metrics"].items():
        rows.append((key, ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else
                     (f"{value:.4g}" if isinstance(value, float) else str(value))))
    if "classes" in card:
        rows.append(("classes", card["classes"]))
    for r in card.get("guidance_sweep", []):
        acc = f", label accuracy {r['label_accuracy']:.3f}" if "label_accuracy" in r else ""
        rows.append((f"guidance {r['guidance']:g}", f"distance {r['distance']:.3f}{acc}"))
    if "bits_per_dim" in card:
        b = card["bits_per_dim"]
        rows.append(("bits/dim", f"{b['total_bpd']:.3f} +/- {b['stderr_bpd']:.3f} ({b['bound_on']}; {b['mode']}, "
                                 f"{b['images']} held-out images, T={b['timesteps']})"))
    rows.append(("seconds", f"{card['seconds']:.0f}"))
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731 - a | inside a value would split the cell
    lines = ["| quantity | value |", "| --- | --- |"] + [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- sweep
def sweep(
    pipe: Pipeline, *, samplers: Sequence[str], nfes: Sequence[int], num: int, seed: int = 0, batch_size: int = 100,
    data: str | None = None, features: Features = "auto", reference: Reference | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], Reference]:
    """Every sampler at every budget of network evaluations, on the same seeds (so the same x_T).

    Returns one row per (sampler, NFE) that the sampler can run with this T (others are skipped
    with a row whose ``skipped`` says why) and the reference used.
    """
    ref = reference or make_reference(reference_data(pipe, data), pipe.data_shape, features=features,
                                      device=pipe.device, seed=seed)
    key, _ = headline_metric(ref)
    rows: list[dict[str, Any]] = []
    for sampler in samplers:
        for nfe in nfes:
            t0 = time.perf_counter()
            try:
                x = pipe.sample(num, sampler=sampler, steps=nfe, seed=seed, batch_size=batch_size)
            except UserError as exc:  # e.g. more grid points than the chain has timesteps
                row = {"sampler": sampler, "nfe": nfe, "skipped": str(exc)}
            else:
                seconds = time.perf_counter() - t0
                metrics = distances(x, ref)
                row = {"sampler": sampler, "nfe": nfe, "distance": metrics[key], "seconds": round(seconds, 1),
                       **{k: v for k, v in metrics.items() if k not in (key, "class_histogram")}}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows, ref


def sweep_markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The sweep as a Markdown table: one line per (sampler, NFE)."""
    lines = [f"| sampler | network evaluations | {metric} | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['nfe']} | {r['distance']:.3f} | {r['seconds']} |" for r in rows
              if "distance" in r]
    return "\n".join(lines) + "\n"
