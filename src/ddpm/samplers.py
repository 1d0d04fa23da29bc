"""Samplers of the reverse chain, from x_T ~ N(0, I) back to x_0.

Every sampler is one step function with the same signature,
``step(diffusion, model, x_t, t, *, generator, clip_denoised, eta) -> (x_{t-1}, pred_x0)``, run by
:func:`sample` over a (possibly respaced) chain:

* ``ancestral``: Ho et al. 2020 Algorithm 2, x_{t-1} = mu_theta(x_t, t) + sigma_t z.
* ``ddim``: Song et al. 2021 Eq. 12; ``eta=0`` is deterministic, ``eta=1`` has the posterior
  variance and coincides with ``ancestral`` under ``variance="fixed_small"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddpm.diffusion import GaussianDiffusion, Generator, Model, randn

SAMPLERS = ("ancestral", "ddim")
StepFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def ancestral_step(
    diffusion: GaussianDiffusion,
    model: Model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    generator: Generator = None,
    clip_denoised: bool = True,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} ~ p_theta(x_{t-1} | x_t) (Algorithm 2); no noise is added at index 0."""
    out = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
    noise = randn(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out.pred_x0


def ddim_step(
    diffusion: GaussianDiffusion,
    model: Model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    generator: Generator = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Song et al. 2021 Eq. 12 with sigma_t(eta) of Eq. 16.

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma^2) eps_hat + sigma z,
    sigma^2 = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1}).
    eps_hat is re-derived from the (possibly clipped) x0_hat so both agree.
    """
    t = diffusion.check_timesteps(t, x_t)
    prediction, _ = diffusion.split_model_output(diffusion.model_output(model, x_t, t), x_t)
    pred_x0 = diffusion.predict_x0(prediction, x_t, t, clip_denoised=clip_denoised)  # no posterior mean needed
    abar = diffusion._extract("alphas_cumprod", t, x_t)
    abar_prev = diffusion._extract("alphas_cumprod_prev", t, x_t)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    eps = diffusion.predict_eps_from_x0(x_t, t, pred_x0)
    mean = abar_prev.sqrt() * pred_x0 + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0.0)) * eps
    if eta == 0:
        return mean, pred_x0
    noise = randn(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)
    return mean + sigma * noise, pred_x0


STEP_FUNCTIONS: dict[str, StepFn] = {"ancestral": ancestral_step, "ddim": ddim_step}


def _frame_indices(num_steps: int, frames: int | None) -> set[int]:
    """Which loop iterations (0 = x_T, num_steps = x_0) to record in a trajectory."""
    if frames is None or frames >= num_steps + 1:
        return set(range(num_steps + 1))
    if frames < 2:
        raise ValueError(f"trajectory_frames must be >= 2 (x_T and x_0), got {frames}")
    return {round(i * num_steps / (frames - 1)) for i in range(frames)}


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    steps: int | Sequence[int] | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: Generator = None,
    progress: bool = False,
    return_trajectory: bool = False,
    trajectory_frames: int | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain from x_T ~ N(0, I) to x_0 and return x_0 ``shape``.

    Args:
        sampler: ``"ancestral"`` or ``"ddim"``.
        steps: number of steps (or the kept indices) of a respaced chain; ``None`` = all T.
        eta: DDIM's noise scale (ignored by ``ancestral``).
        clip_denoised: clamp the predicted x_0 to [-1, 1] at each step.
        generator: one generator for the batch, or one per example so that example i is the same
            whatever the batch it is drawn in.
        return_trajectory: also return x_T, ..., x_0 as ``[F, B, ...]``.
        trajectory_frames: record only this many evenly spaced frames (default: every step).
        noise: x_T itself (overrides the generator for the start).
        callback: called as ``callback(i, t, x_t, pred_x0)`` after each step.
    """
    if sampler not in STEP_FUNCTIONS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    step_fn = STEP_FUNCTIONS[sampler]
    chain = diffusion if steps is None else diffusion.respaced(steps)
    if device is None:
        params = getattr(model, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    x = randn(shape, generator, device=device, dtype=torch.float32) if noise is None else noise.to(device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(x.shape)} differs from requested shape {tuple(shape)}")

    num_steps = chain.num_timesteps
    keep = _frame_indices(num_steps, trajectory_frames) if return_trajectory else set()
    frames = [x] if 0 in keep else []
    indices = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{sampler} sampling", total=num_steps)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    for i, index in enumerate(indices, start=1):
        t = torch.full((shape[0],), index, device=device, dtype=torch.long)
        x, pred_x0 = step_fn(chain, model, x, t, generator=generator, clip_denoised=clip_denoised, **kwargs)
        if callback is not None:
            callback(i, t, x, pred_x0)
        if i in keep:
            frames.append(x)
    if return_trajectory:
        return x, torch.stack(frames)
    return x
