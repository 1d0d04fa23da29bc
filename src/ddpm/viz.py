"""Pictures of the chains: image grids, reverse-chain animations, forward-chain strips, plots.

Images are tensors in [-1, 1], ``[B, C, H, W]`` with C in {1, 3} (other channel counts show their
first channel). Plots use matplotlib, imported only when a plot is drawn (extra ``plot``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.processes import DiffusionProcess


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to the 256-level grid as uint8, same shape: k = round((x + 1) * 127.5)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile ``[B, C, H, W]`` images into one uint8 array ``[rows*(H+p)+p, cols*(W+p)+p, 3]``."""
    if images.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    x = to_uint8(images).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, _, H, W = x.shape
    cols = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / cols)
    grid = np.full((rows * (H + padding) + padding, cols * (W + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, cols)
        y0, x0 = padding + r * (H + padding), padding + c * (W + padding)
        grid[y0 : y0 + H, x0 : x0 + W] = x[i].permute(1, 2, 0).numpy()
    return grid


def auto_scale(size: int, target: int = 64) -> int:
    """An integer upscaling that makes small images (8x8, 28x28) visible."""
    return max(1, target // size)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write a PNG grid of ``images`` and return its path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, scale=auto_scale(images.shape[-1]))).save(path)
    return path


def save_chain_animation(
    trajectory: torch.Tensor, path: str | Path, *, nrow: int | None = None, duration_ms: int = 80, hold_ms: int = 1500
) -> Path:
    """Animate a chain ``[F, B, C, H, W]`` (x_T ... x_0) as a GIF, holding the last frame."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = auto_scale(trajectory.shape[-1])
    frames = [Image.fromarray(make_grid(f, nrow=nrow, scale=scale)) for f in trajectory]
    durations = [duration_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def save_strip(frames: torch.Tensor, path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """One row per example and one column per frame: ``frames`` ``[F, B, C, H, W]`` -> PNG.

    With ``labels`` (one per frame) and matplotlib available, the columns are titled (e.g. t=...).
    """
    F, B = frames.shape[:2]
    grid_images = frames.transpose(0, 1).reshape(F * B, *frames.shape[2:])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(grid_images, nrow=F, scale=auto_scale(frames.shape[-1], 96))
    if labels is None:
        from PIL import Image

        Image.fromarray(grid).save(path)
        return path
    plt = _pyplot()
    fig, axes = plt.subplots(B, F, figsize=(1.4 * F, 1.4 * B + 0.3), squeeze=False)
    images = to_uint8(frames).cpu()
    for j in range(F):
        for i in range(B):
            img = images[j, i]
            ax = axes[i][j]
            if img.shape[0] == 3:
                ax.imshow(img.permute(1, 2, 0).numpy())
            else:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[j], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib: pip install 'ddpm[plot]'") from exc
    return plt


def save_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """Training loss against step (raw and a moving average), log-scaled y."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(plt.FormatStrFormatter("%g"))  # plain numbers, not 6x10^0
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_eval_curve(steps: Sequence[int], values: Sequence[float], path: str | Path, *, metric: str,
                    best_step: int | None = None, title: str = "") -> Path:
    """An evaluation while training: ``metric`` against step, the best checkpoint's step marked."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, marker="o")
    if best_step is not None and best_step in steps:
        best = values[list(steps).index(best_step)]
        ax.scatter([best_step], [best], s=120, facecolors="none", edgecolors="C3", label=f"best: step {best_step}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_yscale("log")
    for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_format(plt.FormatStrFormatter("%g"))  # plain numbers, not 6x10^0
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_terms_plot(terms_bpd: torch.Tensor, path: str | Path, *, title: str = "") -> Path:
    """The bound's per-timestep terms ``[T]`` (bits/dim) against t, log-log."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = np.arange(1, terms_bpd.numel() + 1)
    ax.plot(t, terms_bpd.double().cpu().numpy())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("paper step t (index + 1)")
    ax.set_ylabel("L_{t-1} (bits/dim)")
    ax.set_title(title or "per-timestep terms of the bound")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_scatter(samples: torch.Tensor, reference: torch.Tensor | None, path: str | Path, *, title: str = "") -> Path:
    """2-D samples over the data they should reproduce."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if reference is not None:
        r = reference.cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.3, label="data")
    s = samples.cpu().numpy()
    ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5, label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_sweep_plot(rows: Sequence[dict], path: str | Path, *, metric: str) -> Path:
    """Quality (``row["distance"]``) against network evaluations (``row["nfe"]``), one line per sampler."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r["distance"]) for r in rows if r["sampler"] == sampler)
        ax.plot(*zip(*pts, strict=True), marker="o", label=sampler)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_guidance_plot(rows: Sequence[dict], path: str | Path, *, metric: str) -> Path:
    """Quality (``row["distance"]``) against label accuracy, one point per guidance weight, annotated with w."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    acc = [r["label_accuracy"] for r in rows]
    dist = [r["distance"] for r in rows]
    ax.plot(acc, dist, marker="o")
    for r in rows:
        ax.annotate(f"w={r['guidance']:g}", (r["label_accuracy"], r["distance"]), textcoords="offset points",
                    xytext=(4, 4), fontsize="small")
    ax.set_xlabel("label accuracy (classifier agrees with the requested class)")
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def forward_chain(process: DiffusionProcess, x0: torch.Tensor, timesteps: Sequence[int], *,
                  seed: int = 0) -> torch.Tensor:
    """x_0 and x_t ~ q(x_t | x_0) at each of ``timesteps`` with one noise draw (the same static
    dissolving the image): ``[1 + len(timesteps), B, ...]``, clamped to [-1, 1] for display."""
    noise = process.draw_noise(x0.shape, torch.Generator().manual_seed(seed), device=x0.device)
    frames = [x0] + [process.q_sample(x0, torch.full((x0.shape[0],), t), noise) for t in timesteps]
    return torch.stack(frames).clamp(-1, 1)
