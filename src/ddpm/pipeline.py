"""The public run API: a trained model, ready to sample, measure and export.

    import ddpm

    pipe = ddpm.load("runs/mnist", weights="ema", device="auto")   # a run, a checkpoint or a diffusers folder
    images = pipe.sample(64, sampler="ancestral", steps=50, seed=0)  # [64, 1, 28, 28] in [-1, 1], on the CPU
    bound = pipe.nll(images_in_minus1_1, estimate=40)              # bits/dim with its standard error
    pipe.save_pretrained("export/mnist")                           # a folder diffusers.DDPMPipeline loads

A :class:`Pipeline` holds the network (``pipe.model``, called as ``model(x_t, t)``), the diffusion
process (``pipe.process``: a :class:`~ddpm.processes.protocol.DiffusionProcess`, e.g. a
:class:`~ddpm.GaussianDiffusion`) and the resolved configuration (``pipe.config``, a
:class:`~ddpm.config.RunConfig`). Sampling and the bound are sharded over
the processes of a torchrun job (every process gets all results); sample i and image i draw their
noise from their own seed, so results do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ddpm.build import model_from_spec, model_spec
from ddpm.checkpoint import CheckpointName, load_model_weights, read_config, resolve_checkpoint
from ddpm.choices import AMPS, WEIGHTS, Amp, Toggle, Weights, check_choice
from ddpm.config import ModelConfig, RunConfig
from ddpm.diffusers_format import DiffusersFormatError, is_pipeline_folder, read_pipeline_folder, write_pipeline_folder
from ddpm.distributed import all_gather_tensor, get_rank, get_world_size, resolve_device
from ddpm.editing import (
    check_inversion_sampler,
    check_mask,
    check_repaint_sampler,
    encode,
    inpaint,
    interpolation_weights,
    repaint_evaluations,
    sdedit,
    sdedit_plan,
    slerp,
)
from ddpm.errors import CheckpointError, UserError
from ddpm.guidance import Guided
from ddpm.likelihood import nll as exact_bound
from ddpm.likelihood import nll_estimate
from ddpm.nn.policy import RuntimePolicy, resolve_policy
from ddpm.processes import DiffusionProcess, GaussianConfig, GaussianDiffusion, build_process
from ddpm.processes.protocol import check_images_in_range
from ddpm.samplers import Spacing, nfe_budget, sample, sampling_chain
from ddpm.seeding import item_seeds
from ddpm.tensors import bind_condition, check_finite

# The defaults of editing (steps at most T), measured on the demo model (benchmarks/results/inpainting-*.md, two
# seeds, two masks): RePaint at 8 points with U = 8, j = 2 (50 evaluations) completed digits as well as 25 points
# with U = 5, j = 5 at 105 (Frechet 2.63 against 2.52, digit read 0.592 against 0.575, averaged) and far better
# than 50 plain steps (5.64, 0.481); dpm++2m round-trips 50 evaluations with an rms error of 0.008, ddim 0.095.
INPAINT_STEPS, INPAINT_RESAMPLE, INPAINT_JUMP = 8, 8, 2
INVERSION_SAMPLER, INVERSION_STEPS = "dpm++2m", 50


def _generators(seed: int, indices: Sequence[int], stream: str, device: torch.device) -> list[torch.Generator]:
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return [torch.Generator(device=gen_device).manual_seed(s) for s in item_seeds(seed, indices, stream)]


def _my_share(n: int) -> tuple[list[int], int]:
    """This process's contiguous share of items 0..n-1 and the (padded) share size of every process."""
    rank, world = get_rank(), get_world_size()
    per_rank = math.ceil(n / world) if n else 0
    return list(range(rank * per_rank, min(n, (rank + 1) * per_rank))), per_rank


def _gather_shares(local: torch.Tensor, n: int, per_rank: int, device: torch.device) -> torch.Tensor:
    """Items 0..n-1 from every process's share (rank r holds items r*per_rank..), in order, on the CPU."""
    if get_world_size() == 1:
        return local
    padded = local.new_zeros(per_rank, *local.shape[1:])
    padded[: local.shape[0]] = local
    return all_gather_tensor(padded.to(device)).cpu()[:n]


@dataclass
class Bound:
    """The variational bound on a set of images, in bits per dimension.

    ``total_bpd`` is the mean over images of L_T + sum L_{t-1} + L_0; ``stderr_bpd`` its standard
    error (the spread over images, plus the Monte Carlo error of an estimate). For the exact bound
    the parts are there too: ``prior_bpd`` (L_T), ``kl_bpd`` (sum of L_{t-1}), ``decoder_bpd`` (L_0)
    and the mean of every term ``terms_bpd`` ``[T]``.
    """

    total_bpd: float
    stderr_bpd: float
    prior_bpd: float
    images: int
    timesteps: int
    mode: str
    per_image_bpd: torch.Tensor = field(repr=False)
    conditional: bool = False  # True: the bound on -log p(x | y) with the given labels
    decoder_bpd: float | None = None
    kl_bpd: float | None = None
    mc_stderr_bpd: float | None = None
    terms_bpd: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields, JSON-ready (the per-image and per-term tensors left out)."""
        keys = ("images", "timesteps", "mode", "total_bpd", "stderr_bpd", "prior_bpd", "kl_bpd", "decoder_bpd",
                "mc_stderr_bpd")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["bound_on"] = "-log p(x | y), true labels" if self.conditional else "-log p(x)"
        return out


class Pipeline:
    """A trained denoising network with its diffusion and configuration; see the module docstring.

    Attributes:
        model: the network in eval mode, ``model(x_t, t)``.
        process: the diffusion process it was trained with (all T steps).
        config: the resolved run configuration (for an imported diffusers folder: its diffusion and
            the data shape; the network's own architecture is ``model.config``).
        source: the checkpoint or pipeline folder the weights came from.
        weights: ``"ema"`` or ``"raw"``.
        data_shape: the per-example shape, ``(C, H, W)`` or ``(D,)``.
        amp: the autocast dtype of sampling (``"none"``: float32; ``"auto"``: the device's rule).
        cuda_graphs: whether each network evaluation of sampling replays a captured CUDA graph
            (``"on"``, CUDA only; ``"auto"`` is off until ``benchmarks/gpu.py`` has measured it).
        policy: a policy to run with as it is, on a network already prepared for it (the trainer's, for
            the evaluation while training); None resolves one from ``amp`` and ``cuda_graphs``.
        policy: how the network runs on its device (:mod:`ddpm.nn.policy`): the memory layout and
            kernels of the device's rule (the same function up to float rounding) and ``amp``.
    """

    def __init__(
        self, model: nn.Module, process: DiffusionProcess, config: RunConfig, *, source: Path, weights: Weights,
        amp: Amp = "none", cuda_graphs: Toggle = "auto", policy: RuntimePolicy | None = None,
    ) -> None:
        if config.model.data_shape is None:
            raise CheckpointError(f"{source}: the configuration has no model.data_shape")
        self.model = model.eval()
        self.process = process
        self.config = config
        self.source = Path(source)
        self.weights = weights
        self.data_shape: tuple[int, ...] = tuple(config.model.data_shape)
        self.amp, self.cuda_graphs = amp, cuda_graphs
        self.policy = self._set_up(self.device) if policy is None else policy

    def __repr__(self) -> str:
        return (f"Pipeline(source={str(self.source)!r}, weights={self.weights!r}, data_shape={self.data_shape}, "
                f"device={str(self.device)!r}, {self.process!r})")

    # ------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def is_image(self) -> bool:
        return len(self.data_shape) == 3

    @property
    def clip_denoised(self) -> bool:
        """Whether sampling clamps the predicted x_0 to [-1, 1] by default (images yes, vectors no)."""
        configured = self.config.diffusion.clip_denoised
        return self.is_image if configured is None else bool(configured) and self.is_image

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-conditional network (labels 0..num_classes-1), else None."""
        return getattr(getattr(self.model, "config", None), "num_classes", None)

    @property
    def can_guide(self) -> bool:
        """Whether classifier-free guidance is possible: a conditional network whose null class was trained
        (label dropout ``model.cond_drop`` > 0; an imported model with ddpm's null-class marker)."""
        if self.num_classes is None or not getattr(self.model.config, "null_class", False):
            return False
        return self.config.model.preset == "diffusers" or self.config.model.cond_drop > 0

    def labels(self, classes: int | Sequence[int] | torch.Tensor | None, num: int) -> torch.Tensor | None:
        """Per-sample labels ``[num]`` from one class for all, one per sample, or None (unconditional)."""
        if classes is None:
            return None
        if self.num_classes is None:
            raise UserError(f"{self.source} is an unconditional model: it takes no class labels")
        labels = torch.as_tensor(classes, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(num).clone()
        if labels.numel() != num:
            raise UserError(f"got {labels.numel()} class labels for {num} samples")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise UserError(f"class labels must lie in 0..{self.num_classes - 1}, got {sorted(set(labels.tolist()))}")
        return labels

    def guided_model(self, guidance: float) -> Any:
        """The network with classifier-free guidance of weight ``guidance`` (1: the network itself)."""
        if guidance == 1.0:
            return self.model
        if not self.can_guide or self.num_classes is None:
            raise UserError(f"guidance {guidance} needs a class-conditional model trained with label dropout "
                            f"(a null class); {self.source} is not one")
        return Guided(self.model, guidance, self.num_classes,
                      prediction_channels=self.process.guidance_channels(self.data_shape[0]))

    def _conditioned(self, classes: Any, num: int, guidance: float) -> tuple[Any, torch.Tensor | None]:
        """The network to sample with (guided when ``guidance`` != 1) and the labels ``[num]`` of ``classes``;
        a float tensor ``[num, classes + null]`` is class weights (see :meth:`interpolate`)."""
        if isinstance(classes, torch.Tensor) and classes.dtype.is_floating_point:
            return self.policy.sampling_forward(self.guided_model(guidance)), classes
        labels = self.labels(classes, num)
        if labels is None and guidance != 1.0:
            raise UserError("guidance needs class labels (classes=...)")
        return self.policy.sampling_forward(self.guided_model(guidance)), labels

    def _bound(self, model: Any, labels: torch.Tensor | None, idx: list[int]) -> Any:
        return bind_condition(model, None if labels is None else labels[idx].to(self.device))

    def to(self, device: torch.device | str) -> Pipeline:
        """Move the network to ``device`` ("auto": CUDA, else MPS, else CPU), set up for it; returns ``self``."""
        self.policy = self._set_up(resolve_device(str(device)) if str(device) == "auto" else torch.device(device))
        return self

    def _set_up(self, device: torch.device) -> RuntimePolicy:
        """The runtime policy on ``device``; the network moved there in its layout and kernels."""
        policy = resolve_policy(device, amp=self.amp, cuda_graphs=self.cuda_graphs, model=self.model)
        policy.prepare(self.model)
        return policy

    def fingerprint(self) -> str:
        """A short SHA-256 of the weights in memory (identifies the model in eval cards)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ---------------------------------------------------------------------------- sampling
    def network_evaluations(self, sampler: str | None, steps: int | None) -> int:
        """How many network evaluations ``sample(..., sampler, steps)`` costs per sample."""
        return nfe_budget(self.sampler_name(sampler), steps, self.process.num_timesteps)

    def sampler_name(self, sampler: str | None) -> str:
        """``sampler``, or the process's default sampler when None."""
        return self.process.default_sampler if sampler is None else sampler

    @torch.inference_mode()
    def sample(
        self,
        num: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: Spacing | None = None,
        seed: int = 0,
        batch_size: int = 64,
        clip_denoised: bool | None = None,
        classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """Draw samples 0..num-1: float ``[num, *data_shape]`` on the CPU (images in [-1, 1]).

        ``sampler`` is a name in :data:`ddpm.SAMPLERS` that walks this process (None: the process's
        default, ``dpm++2m-sde`` for Gaussian diffusion); ``steps`` is the number of network
        evaluations (None: the sampler's default), ``spacing``
        the time grid (None: the sampler's default); ``options`` are the sampler's (e.g. ``eta``).
        A class-conditional model samples class ``classes`` (one label for all, or one per sample;
        None: unconditionally, with the null class) with classifier-free guidance ``guidance``
        (0: unconditional, 1: conditional, more: sharper; one network call of 2B per evaluation).
        Sample i is drawn from its own seed (``seed``, i), so it does not depend on ``batch_size``
        or on how many processes share the work. Raises :class:`~ddpm.errors.UserError` if the
        network produces non-finite samples (broken weights).
        """
        if num < 1 or batch_size < 1:
            raise UserError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
        sampler = self.sampler_name(sampler)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised and self.is_image
        model, labels = self._conditioned(classes, num, guidance)

        def draw(idx: list[int]) -> torch.Tensor:
            return sample(
                self.process, model, (len(idx), *self.data_shape), sampler=sampler, steps=steps,
                spacing=spacing, clip_denoised=clip, generator=_generators(seed, idx, "sample", self.device),
                device=self.device, y=None if labels is None else labels[idx], **options,
            )

        desc = f"sampling ({sampler}, {self.network_evaluations(sampler, steps)} network evaluations)"
        samples = self._in_shares(num, batch_size, draw, desc=desc if progress else None)
        check_finite(samples, what=f"samples from {self.source} ({self.weights} weights)")
        return samples

    def _in_shares(self, n: int, batch_size: int, work: Any, *, desc: str | None = None) -> torch.Tensor:
        """``work(indices) -> [len(indices), ...]`` over items 0..n-1 in batches, sharded over the processes of
        a torchrun job; every process gets all n results, in order, on the CPU. ``desc``: show progress."""
        mine, per_rank = _my_share(n)
        chunks: Any = range(0, len(mine), batch_size)
        if desc is not None and get_rank() == 0:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=desc)
        out = [work(mine[start : start + batch_size]).float().cpu() for start in chunks]
        local = torch.cat(out) if out else torch.empty(0, *self.data_shape)
        return _gather_shares(local, n, per_rank, self.device)

    @torch.inference_mode()
    def reverse_chain(
        self,
        num: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: Spacing | None = None,
        seed: int = 0,
        frames: int | None = 60,
        classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0,
        **options: Any,
    ) -> torch.Tensor:
        """The reverse chain x_T -> x_0 of samples 0..num-1 as ``[F, num, *data_shape]`` (F frames, on the CPU).

        Sample i is the same as ``sample(...)[i]`` with the same arguments; not sharded.
        """
        idx = list(range(num))
        model, labels = self._conditioned(classes, num, guidance)
        _, trajectory = sample(
            self.process, model, (num, *self.data_shape), sampler=self.sampler_name(sampler), steps=steps,
            spacing=spacing, clip_denoised=self.clip_denoised, generator=_generators(seed, idx, "sample", self.device),
            device=self.device, return_trajectory=True, trajectory_frames=frames, y=labels, **options,
        )
        return trajectory.float().cpu()

    def grid_timesteps(self, sampler: str | None, steps: int | None, spacing: Spacing | None = None) -> list[float]:
        """The network timesteps a sampler visits (largest first)."""
        chain = sampling_chain(self.process, self.sampler_name(sampler), steps, spacing)
        return [float(t) for t in chain.timestep_map.flip(0)]

    # ----------------------------------------------------------------------------- editing
    def _edit_process(self, what: str) -> GaussianDiffusion:
        """The process, if editing can walk it: Gaussian diffusion of images."""
        if not isinstance(self.process, GaussianDiffusion):
            raise UserError(f"{what} walks Gaussian diffusion; {self.source} is a {self.process.name!r} model")
        if not self.is_image:
            raise UserError(f"{what} works on images; {self.source} models vectors of shape {list(self.data_shape)}")
        return self.process

    def _editable(self, images: torch.Tensor, what: str) -> tuple[GaussianDiffusion, torch.Tensor]:
        """The Gaussian process and ``images`` checked (``[N, *data_shape]``, finite, in [-1, 1]) as float32."""
        process = self._edit_process(what)
        images = torch.as_tensor(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.data_shape:
            raise UserError(f"images of shape {list(images.shape)} do not fit a model of {list(self.data_shape)} "
                            f"(channels, height, width): resize them first")
        check_images_in_range(images, what)
        return process, images.float()

    def resolve_steps(self, steps: int | None, default: int) -> int:
        """``steps``, or ``default`` capped at T when None (the defaults of editing)."""
        return min(default, self.process.num_timesteps) if steps is None else steps

    @torch.inference_mode()
    def inpaint(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        *,
        steps: int | None = None,
        resample: int = INPAINT_RESAMPLE,
        jump: int = INPAINT_JUMP,
        sampler: str = "ancestral",
        seed: int = 0,
        batch_size: int = 64,
        classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_denoised: bool | None = None,
        progress: bool = False,
        **options: float,
    ) -> torch.Tensor:
        """Fill the pixels of ``images`` ``[N, C, H, W]`` (in [-1, 1]) where ``mask`` is 0: RePaint.

        ``mask`` is 1 (True) where the input is kept, ``[H, W]`` or per image ``[N, 1, H, W]``; the kept
        pixels of the result equal the input's exactly. The chain is ``sampler`` (``ancestral`` or
        ``ddim``) respaced to ``steps`` points (None: :data:`INPAINT_STEPS`, at most T), with
        ``resample`` passes (U) through every ``jump``-th level (see :mod:`ddpm.editing.inpaint`;
        :func:`~ddpm.editing.repaint_evaluations` counts the network evaluations; the defaults: 8
        points, U = 8, j = 2, 50 evaluations). Image i draws its noise from its own seed: with an
        all-zero mask and ``resample=1`` it is ``sample(...)[i]`` of the same seed, sampler and steps.
        Returns ``[N, C, H, W]`` on the CPU.
        """
        process, x0 = self._editable(images, "inpainting")
        check_repaint_sampler(sampler)
        keep = check_mask(torch.as_tensor(mask), x0).cpu()
        steps = self.resolve_steps(steps, INPAINT_STEPS)
        chain = cast(GaussianDiffusion, sampling_chain(process, sampler, steps, None))
        model, labels = self._conditioned(classes, x0.shape[0], guidance)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised

        def fill(idx: list[int]) -> torch.Tensor:
            return inpaint(chain, self._bound(model, labels, idx), x0[idx].to(self.device),
                           keep[idx if keep.shape[0] > 1 else [0]].to(self.device), resample=resample, jump=jump,
                           sampler=sampler, generator=_generators(seed, idx, "sample", self.device),
                           known_generator=_generators(seed, idx, "inpaint", self.device), clip_denoised=clip,
                           trained=process, options=options)

        nfe = repaint_evaluations(chain.num_timesteps, resample, jump)
        out = self._in_shares(x0.shape[0], batch_size, fill, desc=f"inpainting ({nfe} network evaluations)"
                              if progress else None)
        check_finite(out, what=f"inpainted images from {self.source}")
        return torch.where(keep.expand_as(x0), x0, out)  # known pixels: the input's, bit for bit

    @torch.inference_mode()
    def edit(
        self,
        images: torch.Tensor,
        strength: float,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: Spacing | None = None,
        seed: int = 0,
        batch_size: int = 64,
        classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_denoised: bool | None = None,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """SDEdit: noise ``images`` ``[N, C, H, W]`` to t0 = round(strength (T - 1)) and sample back down.

        ``strength`` in (0, 1]: small keeps the input, 1 starts from the noisiest point; ``sampler``
        (any, default the process's), ``steps`` and ``spacing`` as in :meth:`sample`, its grid laid over
        0..t0 (see :mod:`ddpm.editing.sdedit`). Optionally toward class ``classes`` with ``guidance``.
        Image i draws its noise from its own seed. Returns ``[N, C, H, W]`` on the CPU.
        """
        process, x0 = self._editable(images, "editing")
        sampler = self.sampler_name(sampler)
        model, labels = self._conditioned(classes, x0.shape[0], guidance)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        nfe = sdedit_plan(process, strength, sampler, steps)[1]

        def run(idx: list[int]) -> torch.Tensor:
            return sdedit(process, self._bound(model, labels, idx), x0[idx].to(self.device), strength,
                          sampler=sampler, steps=steps, spacing=spacing, clip_denoised=clip,
                          generator=_generators(seed, idx, "sample", self.device), **options)

        out = self._in_shares(x0.shape[0], batch_size, run, desc=f"editing ({nfe} network evaluations)"
                              if progress else None)
        check_finite(out, what=f"edited images from {self.source}")
        return out

    @torch.inference_mode()
    def encode(
        self, images: torch.Tensor, *, sampler: str = INVERSION_SAMPLER, steps: int | None = None,
        spacing: Spacing | None = None, batch_size: int = 64, classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0, clip_denoised: bool = False,
    ) -> torch.Tensor:
        """x_T of ``images`` ``[N, C, H, W]``: the probability-flow ODE run towards noise by ``sampler``
        (``ddim`` or ``dpm++2m``) on the grid that :meth:`decode` with the same arguments walks back.

        Deterministic; ``steps`` network evaluations per image (None: :data:`INVERSION_STEPS`, at most T;
        see :mod:`ddpm.editing.inversion`).
        Returns ``[N, C, H, W]`` (float32, on the CPU).
        """
        process, x0 = self._editable(images, "encoding")
        check_inversion_sampler(sampler)
        steps = self.resolve_steps(steps, INVERSION_STEPS)
        chain = cast(GaussianDiffusion, sampling_chain(process, sampler, steps, spacing))
        model, labels = self._conditioned(classes, x0.shape[0], guidance)
        return self._in_shares(x0.shape[0], batch_size, lambda idx: encode(
            chain, self._bound(model, labels, idx), x0[idx].to(self.device), sampler=sampler,
            clip_denoised=clip_denoised, trained=process))

    @torch.inference_mode()
    def decode(
        self, x_T: torch.Tensor, *, sampler: str = INVERSION_SAMPLER, steps: int | None = None,
        spacing: Spacing | None = None, batch_size: int = 64, classes: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float = 1.0, clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Images from ``x_T`` ``[N, C, H, W]`` by the deterministic ``sampler`` (the inverse of :meth:`encode`).

        ``steps`` network evaluations per image; x_0 unclipped by default, as :meth:`encode` leaves it.
        """
        check_inversion_sampler(sampler)
        process = self._edit_process("decoding")
        x_T = torch.as_tensor(x_T)
        if x_T.ndim != 4 or tuple(x_T.shape[1:]) != self.data_shape:
            raise UserError(f"x_T of shape {list(x_T.shape)} does not fit a model of {list(self.data_shape)}")
        check_finite(x_T, what="x_T")
        model, labels = self._conditioned(classes, x_T.shape[0], guidance)
        return self._in_shares(x_T.shape[0], batch_size, lambda idx: sample(
            process, self._bound(model, labels, idx), (len(idx), *self.data_shape), sampler=sampler,
            steps=self.resolve_steps(steps, INVERSION_STEPS),
            spacing=spacing, clip_denoised=clip_denoised, noise=x_T[idx].float(), device=self.device))

    @torch.inference_mode()
    def interpolate(
        self, a: torch.Tensor, b: torch.Tensor, *, frames: int = 9, sampler: str = INVERSION_SAMPLER,
        steps: int | None = None, spacing: Spacing | None = None, batch_size: int = 64,
        classes: int | tuple[int, int] | None = None, guidance: float = 1.0,
    ) -> torch.Tensor:
        """``frames`` images from ``a`` to ``b`` (each ``[C, H, W]`` or ``[1, C, H, W]``): both encoded
        (:meth:`encode`), their x_T joined by :func:`~ddpm.editing.slerp`, every point decoded.

        Frame 0 is ``decode(encode(a))``, the last ``decode(encode(b))``. A class-conditional model
        keeps one class along the path (``classes=c``), or goes from class ``ca`` to ``cb``
        (``classes=(ca, cb)``): ``a`` is encoded with ``ca``, ``b`` with ``cb``, and frame k is decoded
        with the class embedding (1 - w_k) e_ca + w_k e_cb. Returns ``[frames, C, H, W]`` on the CPU.
        """
        pair = torch.stack([torch.as_tensor(v).reshape(self.data_shape) for v in (a, b)])
        kwargs: dict[str, Any] = dict(sampler=sampler, steps=steps, spacing=spacing, batch_size=batch_size,
                                      guidance=guidance)
        ends = None if classes is None else self.labels(classes if isinstance(classes, int) else list(classes), 2)
        weights = interpolation_weights(frames)
        z = self.encode(pair, classes=ends, **kwargs)
        path = torch.cat([slerp(z[:1], z[1:], w) for w in weights])
        if ends is None:
            return self.decode(path, **kwargs)
        embeds = (self.num_classes or 0) + int(bool(getattr(self.model.config, "null_class", True)))
        onehot = torch.nn.functional.one_hot(ends, embeds).double()
        mixture = torch.stack([(1 - w) * onehot[0] + w * onehot[1] for w in weights]).float()
        return self.decode(path, classes=mixture, **kwargs)

    # ---------------------------------------------------------------------------- the bound
    @torch.inference_mode()
    def nll(
        self,
        images: torch.Tensor,
        *,
        estimate: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        respace: int | None = None,
        labels: torch.Tensor | None = None,
        progress: bool = False,
    ) -> Bound:
        """The variational bound on ``images`` ``[N, C, H, W]`` in [-1, 1] (8-bit data), bits/dim.

        ``estimate=None`` evaluates all T terms per image; ``estimate=K`` is the unbiased importance
        estimate from K timesteps per image, with its standard error. ``respace=K`` bounds the
        respaced K-step model instead. Image i draws its noise (and timesteps) from its own seed.
        For a class-conditional model, ``labels`` (the images' true classes) make it the bound on
        -log p(x | y); without them it is the bound on -log p(x) of the null-class model.
        """
        if tuple(images.shape[1:]) != self.data_shape:
            raise UserError(f"images of shape {list(images.shape[1:])} do not fit a model trained on "
                            f"{list(self.data_shape)}")
        self.process.check_data(images)
        y_all = self.labels(labels, images.shape[0]) if labels is not None else None
        process = self.process if respace is None else self.process.respaced(respace)
        T, n = process.num_timesteps, images.shape[0]
        mine, per_rank = _my_share(n)
        chunks: Any = range(0, len(mine), batch_size)
        if progress and get_rank() == 0:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="bound")
        totals, priors, stderrs, terms = [], [], [], []  # per image, this process's share
        for start in chunks:
            idx = mine[start : start + batch_size]
            x0 = images[idx].to(self.device, torch.float32)
            gens = _generators(seed, idx, "nll", self.device)
            y = None if y_all is None else y_all[idx].to(self.device)
            if estimate is None:
                r = exact_bound(process, self.model, x0, generator=gens, max_batch_size=max(batch_size, 256), y=y)
                totals.append(r.total_bpd)
                priors.append(r.prior_bpd)
                terms.append(r.terms_bpd)
            else:
                e = nll_estimate(process, self.model, x0, estimate, generator=gens,
                                 max_batch_size=max(batch_size, 256), y=y)
                totals.append(e.total_bpd)
                priors.append(e.prior_bpd)
                stderrs.append(e.stderr_bpd)

        def gathered(parts: list[torch.Tensor], *shape: int) -> torch.Tensor:
            local = torch.cat(parts).cpu() if parts else torch.zeros(0, *shape, dtype=torch.float64)
            return _gather_shares(local, n, per_rank, self.device)

        total = gathered(totals)
        spread = float(total.std() / math.sqrt(n)) if n > 1 else float("nan")
        prior, conditional = float(gathered(priors).mean()), y_all is not None
        if estimate is None:
            all_terms = gathered(terms, T)
            return Bound(total_bpd=float(total.mean()), stderr_bpd=spread, prior_bpd=prior, images=n, timesteps=T,
                         mode="exact", per_image_bpd=total, conditional=conditional,
                         decoder_bpd=float(all_terms[:, 0].mean()), kl_bpd=float(all_terms[:, 1:].sum(1).mean()),
                         terms_bpd=all_terms.mean(0))
        within = float(gathered(stderrs).pow(2).sum().sqrt() / n)
        between = 0.0 if math.isnan(spread) else spread
        return Bound(total_bpd=float(total.mean()), stderr_bpd=math.sqrt(between**2 + within**2), prior_bpd=prior,
                     images=n, timesteps=T, mode=f"importance estimate, {estimate} terms per image",
                     per_image_bpd=total, conditional=conditional, mc_stderr_bpd=within)

    # ------------------------------------------------------------------------------ export
    def save_pretrained(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write a diffusers pipeline folder (``DDPMPipeline.from_pretrained(folder)`` loads it).

        The weights written are this pipeline's (``weights="ema"`` at load time: the EMA weights).
        Only U-Nets of Gaussian diffusion can be exported; see :mod:`ddpm.diffusers_format` for the
        scheduler mapping.
        """
        if not isinstance(self.config.diffusion, GaussianConfig):
            raise DiffusersFormatError(f"diffusers has no pipeline for the {self.config.diffusion.process!r} process; "
                                       f"{self.source} stays in ddpm's checkpoint format")
        model = self.model
        was = next(iter(model.parameters())).device
        try:
            return write_pipeline_folder(folder, model.to("cpu"), self.config.diffusion,
                                         clip_sample=self.clip_denoised, overwrite=overwrite)
        finally:
            model.to(was)


# ------------------------------------------------------------------------------------- load
def load(
    path: str | Path, *, weights: Weights = "ema", device: torch.device | str = "auto", amp: Amp = "none",
    cuda_graphs: Toggle = "auto", checkpoint: CheckpointName = "latest",
) -> Pipeline:
    """A :class:`Pipeline` from a run folder (its newest complete checkpoint, or with
    ``checkpoint="best"`` the one that scored best in the evaluation while training), a checkpoint
    folder or a diffusers pipeline folder, with ``weights`` (``"ema"`` or ``"raw"``; a diffusers folder
    holds one set) on ``device`` ("auto": CUDA, else MPS, else CPU). ``amp`` is the autocast dtype
    of sampling: ``"none"`` (float32, the default: samples as the weights define them), ``"bf16"``,
    ``"fp16"`` (CUDA) or ``"auto"`` (the device's rule of :mod:`ddpm.nn.policy`); the bound is
    always computed in float32."""
    check_choice("weights", weights, WEIGHTS)
    check_choice("amp", amp, AMPS)
    path = Path(path)
    target = resolve_device(str(device)) if str(device) == "auto" else torch.device(device)
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if is_pipeline_folder(path):
        if checkpoint != "latest":
            raise CheckpointError(f"{path} is a diffusers pipeline folder: it holds one model, no {checkpoint!r} one")
        parts = read_pipeline_folder(path)
        config = RunConfig(diffusion=parts.diffusion, model=ModelConfig(preset="diffusers",
                                                                        data_shape=parts.data_shape))
        return Pipeline(parts.model.to(target), build_process(parts.diffusion), config, source=path,
                        weights=weights, amp=amp, cuda_graphs=cuda_graphs)
    folder = resolve_checkpoint(path, checkpoint)
    config = read_config(folder)
    if config.model.data_shape is None:
        raise CheckpointError(f"{folder}: the checkpoint's config has no model.data_shape")
    shape = tuple(config.model.data_shape)
    process = build_process(config.diffusion)
    _, spec = model_spec(config.model, shape, out_channels=process.output_channels(shape[0]))
    model = model_from_spec(spec)
    load_model_weights(folder, model, which=weights)
    return Pipeline(model.to(target), process, config, source=folder, weights=weights, amp=amp,
                    cuda_graphs=cuda_graphs)
