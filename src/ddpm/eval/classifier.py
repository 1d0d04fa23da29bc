"""A small digit classifier whose penultimate features stand in for Inception on the built-in data.

Inception-v3 features need a 92 MB download and were trained on natural photographs; for 8x8 and 28x28
grey digits a CNN trained here, once, on the training split measures sample quality with no download
(a "Frechet classifier distance"). The same network also labels samples, so
:func:`class_histogram` shows whether a model drops digits.

Training is seeded and runs on the CPU, once per data set (the result is cached). Checkpoints are a
``.safetensors`` file plus a JSON config, never a pickle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.eval.features import check_images, weights_fingerprint

FORMAT_VERSION = 1
WEIGHTS_FILENAME = "classifier.safetensors"
CONFIG_FILENAME = "classifier.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`DigitClassifier` (everything needed to rebuild it before loading weights)."""

    image_size: int  # H = W of the training images
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32  # channels of the first convolution; later stages use 2x and 4x
    feature_dim: int = 128  # size of the penultimate layer, the features used by the metrics


class _DigitNet(nn.Module):
    """conv-BN-ReLU x3 (two 2x2 max pools between) -> global average pool -> linear-ReLU -> linear.

    The global average pool makes the same network work for any image size.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        w = cfg.width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.body = nn.Sequential(
            block(cfg.in_channels, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w)
        )
        self.embed = nn.Sequential(nn.Linear(4 * w, cfg.feature_dim), nn.ReLU())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TrainingInfo:
    """How a classifier was trained; saved in its JSON config for the eval card."""

    epochs: int
    seed: int
    num_train: int
    train_accuracy: float
    seconds: float
    extra: dict = field(default_factory=dict)


class DigitClassifier:
    """A trained :class:`_DigitNet` in eval mode; also a :class:`~ddpm.eval.features.FeatureExtractor`.

    Calling it returns the penultimate-layer features (float64 ``[B, feature_dim]``) of images in
    ``[-1, 1]``, ``[B, 1, H, W]``.
    """

    def __init__(self, config: ClassifierConfig, net: _DigitNet, *, info: TrainingInfo | None = None) -> None:
        self.config = config
        self.net = net.eval().requires_grad_(False)
        self.info = info
        self.batch_size = 512
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        s = self.config.image_size
        return f"digit-classifier-{s}x{s}-f{self.config.feature_dim}"

    @property
    def dim(self) -> int:
        return self.config.feature_dim

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.net)
        return self._fingerprint

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, channels=(self.config.in_channels,))
        if x.shape[-2:] != (self.config.image_size, self.config.image_size):
            s = self.config.image_size
            raise ValueError(f"this classifier was trained on {s}x{s} images, got {tuple(x.shape[-2:])}")
        return x

    @torch.no_grad()
    def _batched(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = self._check(images)
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, float64 ``[B, feature_dim]``."""
        return self._batched(images, self.net.features).double()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores, ``[B, num_classes]``."""
        return self._batched(images, self.net)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Most likely class per image, LongTensor ``[B]``."""
        return self.logits(images).argmax(dim=1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` whose predicted class equals ``labels``."""
        return (self.predict(images) == torch.as_tensor(labels).long()).double().mean().item()

    def save(self, directory: str | Path) -> None:
        """Write ``classifier.safetensors`` and ``classifier.json`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILENAME))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": asdict(self.config),
            "fingerprint": self.fingerprint,
            "training": asdict(self.info) if self.info is not None else None,
        }
        (directory / CONFIG_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> DigitClassifier:
        """Rebuild a classifier saved with :meth:`save`; checks the weights against the saved fingerprint."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILENAME).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported classifier format_version {meta.get('format_version')!r}")
        config = ClassifierConfig(**meta["config"])
        net = _DigitNet(config)
        net.load_state_dict(load_file(str(directory / WEIGHTS_FILENAME)))
        info = TrainingInfo(**meta["training"]) if meta.get("training") else None
        model = cls(config, net, info=info)
        if meta.get("fingerprint") not in (None, model.fingerprint):
            raise ValueError(f"weights in {directory} do not match the fingerprint in {CONFIG_FILENAME}")
        return model


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    num_classes: int = 10,
    width: int = 32,
    feature_dim: int = 128,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``images`` ``[N, 1, H, W]`` in ``[-1, 1]`` with integer ``labels``.

    AdamW with a one-cycle (cosine) learning rate, cross-entropy, no augmentation (every eval card
    reports the held-out accuracy of the classifier it used). Deterministic for a
    given ``seed`` on a given machine and thread count: initialisation and shuffling use their own
    generator and the global RNG is left as it was.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    x = check_images(images, channels=(1,))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square, got {tuple(x.shape[-2:])}")
    y = torch.as_tensor(labels).long().reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min().item()}, {y.max().item()}]")

    config = ClassifierConfig(
        image_size=x.shape[-1], in_channels=1, num_classes=num_classes, width=width, feature_dim=feature_dim
    )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _DigitNet(config)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-x.shape[0] // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for idx in order.split(batch_size):
            if idx.numel() < 2:  # batch norm needs more than one example per batch
                continue
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    model = DigitClassifier(config, net)
    info = TrainingInfo(
        epochs=epochs, seed=seed, num_train=x.shape[0], train_accuracy=model.accuracy(x, y), seconds=seconds
    )
    model.info = info
    return model


def class_histogram(predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of ``predictions`` (class ids ``[N]``) in each class: float64 ``[num_classes]``, sums to 1.

    Compare with the data's class frequencies to see dropped or over-produced classes.
    """
    p = torch.as_tensor(predictions).long().reshape(-1)
    if p.numel() == 0:
        raise ValueError("predictions is empty")
    if p.min() < 0 or p.max() >= num_classes:
        raise ValueError(
            f"predictions must lie in [0, {num_classes}), got [{p.min().item()}, {p.max().item()}]"
        )
    return torch.bincount(p, minlength=num_classes).double() / p.numel()
