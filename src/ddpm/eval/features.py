"""Feature extractors: networks that map images to the feature vectors the metrics compare.

Every extractor follows :class:`FeatureExtractor`: it takes images in ``[-1, 1]`` of shape
``[B, C, H, W]`` and returns float64 features ``[B, F]``, in eval mode and without gradients. Its
``fingerprint`` (a hash of its weights, :func:`weights_fingerprint`) goes on the eval card so that two
scores are only compared when they were measured with the same network.

Two extractors exist:

- :class:`InceptionV3Features`: the 2048-d pool features of the Inception-v3 graph that FID is defined
  with (the TensorFlow "2015-12-05" weights, ported to PyTorch). The network is written out in this
  file so that neither torchvision nor an FID package is needed; only the weights file is, and it is
  never fetched unless asked (``download=True``).
- :class:`ddpm.eval.classifier.DigitClassifier`: a small CNN trained on the built-in digits, which
  needs no download at all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a feature network."""

    name: str  # short identifier, e.g. "inception-v3-pool3"
    dim: int  # F, the feature dimension

    @property
    def fingerprint(self) -> str:
        """Hex digest of the weights (see :func:`weights_fingerprint`)."""
        ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]``, ``[B, C, H, W]`` -> float64 features ``[B, F]``; no grad, eval mode."""
        ...


def weights_fingerprint(module: nn.Module, *, length: int = 16) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order), hex-truncated.

    Buffers such as batch-norm running statistics are included: they change the features.
    """
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


def check_images(images: torch.Tensor, *, channels: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validate a batch ``[B, C, H, W]`` of images in ``[-1, 1]`` and return it as float32.

    A small tolerance above 1 in magnitude is allowed for round-off; larger values almost always mean
    images in ``[0, 1]`` or ``[0, 255]`` were passed by mistake.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {tuple(images.shape)}")
    if channels is not None and images.shape[1] not in channels:
        raise ValueError(
            f"images must have {' or '.join(map(str, channels))} channels, got {images.shape[1]}"
        )
    x = images.detach().float()
    if x.numel() and x.abs().max() > 1.0 + 1e-3:
        raise ValueError(
            f"images must lie in [-1, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]"
        )
    return x


# --------------------------------------------------------------------------------------------------
# Inception-v3 as used by FID
# --------------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
INCEPTION_INPUT_SIZE = 299  # the graph's input resolution; other sizes are resized to it
INCEPTION_NUM_CLASSES = 1008  # the 2015 graph's classifier has 1008 outputs, not 1000

Resize = Literal["tf1", "pytorch"]  # how Inception's input is resized to 299 (see InceptionV3Features)
RESIZES: tuple[str, ...] = get_args(Resize)


def default_inception_weights_path() -> Path:
    """Where the Inception weights are looked for when no path is given.

    ``$DDPM_INCEPTION_WEIGHTS`` if set, otherwise ``<torch hub dir>/checkpoints/pt_inception-2015-12-05-
    6726825d.pth`` (``~/.cache/torch/hub/checkpoints/...`` by default), which is also where
    pytorch-fid stores the file, so an existing download is reused.
    """
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[B, C, H, W]`` to ``[B, C, size, size]`` as TensorFlow 1's ``resize_bilinear``.

    The FID graph resized its input with the TF1 op (``align_corners=False`` and no half-pixel
    centres): output pixel ``o`` samples the input at ``o * in / out``, with the last pixel repeated past
    the edge. This differs from ``F.interpolate(..., align_corners=False)``, which samples at
    ``(o + 0.5) * in / out - 0.5``. Written as two small interpolation matrices, one per axis.
    """

    def matrix(n_in: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = src - lo.double()
        w = torch.zeros(size, n_in, dtype=torch.float64)
        w[torch.arange(size), lo] += 1.0 - frac
        w[torch.arange(size), hi] += frac
        return w.to(images.dtype).to(images.device)

    w_h, w_w = matrix(images.shape[-2]), matrix(images.shape[-1])
    return torch.einsum("oh,bchw,pw->bcop", w_h, images, w_w)


class _ConvBN(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3, as in the TF graph) and ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages over valid pixels only at the border, hence count_include_pad=False.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


# Submodule names below are those of the published state dict, so the weights file loads as is.
class _MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_3x3(x)),
            ],
            dim=1,
        )


class _ReductionB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1) of width ``c7``."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), **row)
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), **col)
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), **row)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_3x3(x))], dim=1)


class _ReductionD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches.

    The FID graph pools the last block (Mixed_7c) with a 3x3 max pool instead of an average pool, a
    quirk of the 2015 TF graph that the features depend on; ``max_pool`` selects it.
    """

    def __init__(self, c_in: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        row, col = {"padding": (0, 1)}, {"padding": (1, 0)}
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), **row)
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), **col)
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), **row)
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), **col)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(s),
                self.branch3x3_2b(s),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class FIDInceptionV3(nn.Module):
    """The Inception-v3 graph of the FID reference code, up to the 2048-d global average pool.

    Input ``[B, 3, 299, 299]`` in ``[-1, 1]``; :meth:`forward` returns the pool features ``[B, 2048]``.
    The 1008-way ``fc`` layer is kept so the published state dict loads strictly, but is not used.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, c7=128)
        self.Mixed_6c = _MixedC(768, c7=160)
        self.Mixed_6d = _MixedC(768, c7=160)
        self.Mixed_6e = _MixedC(768, c7=192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, INCEPTION_NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def reset_random(self, seed: int) -> None:
        """Seeded random weights (He-normal convolutions) for tests that must not download anything."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    fan_in = m.weight[0].numel()
                    m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
                    if m.bias is not None:
                        m.bias.zero_()


def _missing_weights_message(path: Path) -> str:
    return (
        f"Inception-v3 FID weights not found at {path}.\n"
        f"Download them once (about 92 MB) from\n    {INCEPTION_WEIGHTS_URL}\n"
        f"and either save the file as {default_inception_weights_path()} , set "
        f"${INCEPTION_WEIGHTS_ENV} to its path, or pass weights_path=... ; "
        "or construct with download=True on a machine with internet access."
    )


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an Inception state dict from ``.safetensors`` or a tensors-only ``.pth`` (no code unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class InceptionV3Features:
    """FID's Inception-v3 pool features (2048-d) as a :class:`FeatureExtractor`.

    Args:
        weights_path: the weights file (``.pth`` state dict as published, or ``.safetensors``); default
            :func:`default_inception_weights_path`. A missing file is a ``FileNotFoundError`` that says
            where to download it and where to put it.
        pretrained: ``False`` builds the network with seeded random weights instead (for tests).
        download: fetch the weights to the default path if missing (needs internet).
        resize: ``"tf1"`` resizes to 299x299 as the TF reference graph did
            (:func:`resize_bilinear_tf1`); ``"pytorch"`` uses ``F.interpolate`` (pytorch-fid's default).
        batch_size: images per forward pass.
        device: where the network runs.
        seed: seed of the random weights when ``pretrained=False``.

    Grey-scale images ``[B, 1, H, W]`` are repeated to three channels. Images are taken in ``[-1, 1]``
    as they are (the graph's own input scaling); quantise samples to 8 bits first if the reference
    images were 8-bit, as FID implementations compare saved images.
    """

    dim = 2048

    def __init__(
        self,
        weights_path: str | Path | None = None,
        *,
        pretrained: bool = True,
        download: bool = False,
        resize: Resize = "tf1",
        batch_size: int = 50,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if resize not in get_args(Resize):
            raise ValueError(f"resize must be one of {get_args(Resize)}, got {resize!r}")
        if not pretrained and weights_path is not None:
            raise ValueError("weights_path was given with pretrained=False")
        self.resize: Resize = resize
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net = FIDInceptionV3()
        if pretrained:
            path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
            if download and not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(path))
            self._load(load_inception_state_dict(path))
            self.name = "inception-v3-fid-pool3"
        else:
            self.net.reset_random(seed)
            self.name = f"inception-v3-fid-pool3-random{seed}"
        self.net.eval().requires_grad_(False).to(self.device)
        self._fingerprint: str | None = None

    def _load(self, state_dict: dict[str, torch.Tensor]) -> None:
        # Checkpoints converted with an auxiliary head carry AuxLogits.*; that head does not affect
        # the pool features. num_batches_tracked is a training counter absent from some files.
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
        result = self.net.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                "not an FID Inception-v3 state dict: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.net)
        return self._fingerprint

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            if self.resize == "tf1":
                x = resize_bilinear_tf1(x, INCEPTION_INPUT_SIZE)
            else:
                size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images, channels=(1, 3))
        out = [
            self.net(self._prepare(chunk.to(self.device))).double().cpu()
            for chunk in x.split(self.batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.dim, dtype=torch.float64)
