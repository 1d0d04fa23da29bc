"""Reference statistics: the mean and covariance of a data set's features, in the file format the field shares.

The Frechet distance compares the Gaussian fitted to the samples' features with the one fitted to
the reference data's, so the reference can be kept as its statistics alone: ``mu`` ``[F]`` and
``sigma`` ``[F, F]`` in an ``.npz`` file, the format that pytorch-fid, clean-fid and EDM write and
read (float64 here). Beside ours, a JSON sidecar (``<file>.json``) names what they were computed
with: the feature network and its weights' hash, the resize mode, the data set, the split and the
number of images. Two statistics are only comparable when those agree; :func:`check_compatible`
refuses what is known to differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.errors import UserError


@dataclass(frozen=True)
class FeatureStats:
    """The statistics of one set of features, float64: ``mu`` ``[F]``, ``sigma`` ``[F, F]`` (1 / (N - 1)),
    and what they were computed with (``info``: feature network, its hash, resize, data, split, count)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.numel())


def feature_stats(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mu, sigma, N) of features streamed in batches ``[b, F]``, in float64, without holding them all.

    sigma uses the unbiased 1 / (N - 1) normalisation, as ``numpy.cov`` and the reference FID code do;
    it equals :func:`ddpm.eval.gaussian_stats` of the concatenated features up to float64 rounding.
    """
    count, total, outer, shift = 0, None, None, None
    for batch in batches:
        x = batch.detach().to("cpu", torch.float64).reshape(batch.shape[0], -1)
        if shift is None:  # centring on the first batch's mean keeps the sums well conditioned
            shift = x.mean(dim=0)
            total, outer = torch.zeros_like(shift), torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        assert total is not None and outer is not None
        centred = x - shift
        total += centred.sum(dim=0)
        outer += centred.T @ centred
        count += x.shape[0]
    if shift is None or total is None or outer is None or count < 2:
        raise UserError(f"feature statistics need at least 2 images, got {count}")
    mean = total / count
    sigma = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return shift + mean, sigma, count


def save_stats(path: str | Path, stats: FeatureStats) -> Path:
    """Write ``mu`` and ``sigma`` (float64) to ``path`` (.npz) and ``info`` beside it (``path`` + ``.json``),
    atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"reference statistics are written as .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, mu=stats.mu.numpy(), sigma=stats.sigma.numpy())
    sidecar = sidecar_path(path)
    tmp_json = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp_json.write_text(json.dumps(stats.info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    os.replace(tmp_json, sidecar)
    return path


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def load_stats(path: str | Path) -> FeatureStats:
    """Statistics from an ``.npz`` holding ``mu`` and ``sigma`` (ours, pytorch-fid's, clean-fid's, EDM's).

    The sidecar JSON, when there is one (ours), becomes ``info``; otherwise ``info`` only names the
    file. A missing file or key, or values of the wrong shape or not finite, is a
    :class:`~ddpm.errors.UserError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics {str(path)!r} do not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise UserError(f"{path} holds no {' or '.join(missing)} (keys: {', '.join(data.files)}); reference "
                                "statistics are an .npz with mu [F] and sigma [F, F]")
            mu = torch.from_numpy(np.asarray(data["mu"], dtype=np.float64)).reshape(-1)
            sigma = torch.from_numpy(np.asarray(data["sigma"], dtype=np.float64))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable .npz of reference statistics ({exc})") from None
    if sigma.shape != (mu.numel(), mu.numel()):
        raise UserError(f"{path}: sigma has shape {tuple(sigma.shape)}, expected [{mu.numel()}, {mu.numel()}] for "
                        f"mu of {mu.numel()} features")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise UserError(f"{path}: mu or sigma holds NaN or infinite values")
    info: dict[str, Any] = {"file": str(path)}
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        try:
            info = {**json.loads(sidecar.read_text(encoding="utf-8")), **info}
        except json.JSONDecodeError as exc:
            raise UserError(f"{sidecar} is not valid JSON ({exc})") from None
    return FeatureStats(mu, sigma, info)


def check_compatible(reference: FeatureStats, features: dict[str, Any], dim: int) -> None:
    """Refuse a reference whose feature dimension differs from ``dim``, or whose sidecar names another feature
    network or weights (``features``: the extractor's ``name`` and ``fingerprint``) or resize mode."""
    where = reference.info.get("file", "the reference statistics")
    if reference.dim != dim:
        raise UserError(f"{where} has {reference.dim} features per image, the feature network "
                        f"{features.get('name', '?')} makes {dim}: they were computed with another network")
    for key in ("name", "fingerprint", "resize"):
        theirs, ours = reference.info.get("features", {}).get(key), features.get(key)
        if theirs is not None and ours is not None and theirs != ours:
            raise UserError(f"{where} was computed with features {key}={theirs!r}, this evaluation uses {ours!r}")


def stats_description(stats: FeatureStats) -> str:
    """One line for the eval card: the file, and what its sidecar says."""
    info = stats.info
    parts = [f"statistics {info.get('file')}"]
    if "count" in info:
        parts.append(f"{info['count']:,} images of {info.get('data', '?')} ({info.get('split', '?')} split)")
    return ", ".join(parts)

