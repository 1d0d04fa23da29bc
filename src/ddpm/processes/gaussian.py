"""The Gaussian diffusion of Ho et al. 2020: forward process, posterior, reverse process, losses.

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)           (Eq. 2)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)              (Eq. 4)
    q(x_{t-1} | x_t, x_0) = N(mu-tilde_t(x_t, x_0), beta-tilde_t I)     (Eqs. 6-7)
    p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t))   (Eq. 1)

One implementation of :class:`~ddpm.processes.protocol.DiffusionProcess`, over :mod:`ddpm.schedules`
(coefficients, float64) and :mod:`ddpm.distributions` (KL and the decoder). Samplers
(:mod:`ddpm.samplers`) and the bound (:mod:`ddpm.likelihood`) are functions of a process and a
model; which timesteps to train on is the trainer's business (:mod:`ddpm.train.timesteps`). Index
convention: ``t`` in 0..T-1 stands for the paper's step t+1. Images live in [-1, 1]. Bits per
dimension are nats per dimension divided by log 2.

Parameterisations. With x_t = alpha x_0 + sigma eps (alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t)),
the network predicts eps (Ho et al.), x_0, or v = alpha eps - sigma x_0 (Salimans & Ho 2022). The
conversions between them are written once, in :func:`x0_from_prediction`, :func:`eps_from_x0` and
:func:`prediction_target`.

Conditioning: every method that calls the network takes ``y`` (class labels ``[B]`` or None) and
passes it on as ``model(x_t, t, y=y)``; an unconditional call is ``model(x_t, t)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddpm.choices import (
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    VARIANCES,
    LossType,
    LossWeighting,
    Prediction,
    Variance,
    check_choice,
)
from ddpm.distributions import LOG2, discretized_gaussian_log_likelihood, normal_kl
from ddpm.errors import ConfigError, UserError
from ddpm.processes.protocol import ProcessConfig, TrainingLosses, check_images_in_range, check_timesteps, described
from ddpm.schedules import (
    SCHEDULES,
    Schedule,
    make_betas,
    make_schedule,
    respace_betas,
    schedule_parameters,
    space_timesteps,
)
from ddpm.tensors import Generator, Model, mean_flat, per_example, randn

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal sec. 3.1)


# ------------------------------------------------------------------------------ parameterisations
def x0_from_prediction(
    prediction: Prediction, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """The x_0 implied by a network output, where x_t = alpha x_0 + sigma eps.

    eps: x_0 = (x_t - sigma eps) / alpha (Eq. 4 solved for x_0; Eq. 11 of the paper's mean);
    x0: the output itself; v = alpha eps - sigma x_0 (with alpha^2 + sigma^2 = 1): x_0 = alpha x_t - sigma v.
    """
    if prediction == "eps":
        return (x_t - sigma * output) / alpha
    if prediction == "x0":
        return output
    return alpha * x_t - sigma * output


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor | float,
                sigma: torch.Tensor | float) -> torch.Tensor:
    """eps = (x_t - alpha x_0) / sigma, the noise that x_0 and x_t imply."""
    return (x_t - alpha * x0) / sigma


def prediction_target(prediction: Prediction, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor | float,
                      sigma: torch.Tensor | float) -> torch.Tensor:
    """What the network should output for x_t = alpha x_0 + sigma eps: eps, x_0, or v = alpha eps - sigma x_0."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha * eps - sigma * x0


# ------------------------------------------------------------------------------------ configuration
@dataclass
class GaussianConfig(ProcessConfig):
    """The ``[diffusion]`` table of a Gaussian diffusion (``process = "gaussian"``, the default)."""

    schedule: str = described("linear", lambda: "beta schedule: " + ", ".join(
        f"{name} ({', '.join(f'{k}={v:g}' for k, v in schedule_parameters(name).items())})" for name in SCHEDULES))
    schedule_options: dict[str, float] = described({}, "the schedule's parameters, e.g. s=0.01 (cosine)")
    prediction: Prediction = described("eps", "what the network predicts: eps, x0 or v")
    variance: Variance = described("fixed_small", "reverse-process variance")
    loss: LossType = described("simple", "training objective: L_simple, the bound, or both")
    loss_weighting: LossWeighting = described("none", "weighting of the MSE over t")
    min_snr_gamma: float = described(5.0, "gamma of min-SNR weighting")
    betas: tuple[float, ...] | None = described(None, "explicit beta_1..beta_T, comma-separated; replaces the schedule")

    def validate(self) -> None:
        super().validate()
        if self.betas is not None and len(self.betas) != self.timesteps:
            raise ConfigError(f"diffusion.betas has {len(self.betas)} values but diffusion.timesteps={self.timesteps}")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"diffusion.min_snr_gamma={self.min_snr_gamma} must be > 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"diffusion.schedule={self.schedule!r} is not valid: expected one of "
                              f"{', '.join(repr(s) for s in SCHEDULES)}")
        try:
            make_schedule(self.schedule, self.schedule_options)
        except ConfigError as exc:
            raise ConfigError(f"diffusion.schedule_options: {exc}") from None
        if self.variance == "learned_range" and self.loss == "simple":
            raise ConfigError("diffusion.variance='learned_range' with diffusion.loss='simple' would never train the "
                              "variance; use loss='hybrid' or loss='vlb'")


@dataclass
class PMeanVariance:
    """p_theta(x_{t-1} | x_t): mean, variance and log-variance ``[B, ...]``, and the implied x_0."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """DDPM with a fixed or learned diagonal reverse variance.

    Args:
        betas: the schedule ``[T]`` (see :func:`ddpm.make_betas`) or a schedule name.
        prediction: what the network predicts: ``"eps"`` (Ho et al.), ``"x0"`` or ``"v"``
            (v = sqrt(abar) eps - sqrt(1 - abar) x_0, Salimans & Ho 2022).
        variance: Sigma_theta: ``"fixed_small"`` (beta-tilde_t), ``"fixed_large"`` (beta_t) or
            ``"learned_range"`` (Nichol & Dhariwal Eq. 15; the network outputs twice the channels).
        loss: ``"simple"`` (L_simple, Eq. 14), ``"vlb"`` (L_vlb, the bound, rescaled by T so one
            sampled term estimates the whole sum) or ``"hybrid"`` (L_simple + 0.001 L_vlb with the
            mean's gradient stopped in the vlb part).
        loss_weighting: ``"none"`` or ``"min-snr"`` (Hang et al. 2023) on the MSE part.
        min_snr_gamma: the gamma of min-SNR weighting.
        timestep_map: the network's own timestep for each index of this chain (identity unless
            respaced, see :meth:`respaced`; fractional values are allowed).
    """

    name = "gaussian"
    error_metric = "mse"  # TrainingLosses.error: the prediction's mean squared error per dimension
    # The sampler of Pipeline.sample, ddpm sample and ddpm eval when none is named: the best measured from 10
    # network evaluations up on two models (benchmarks/results/samplers-demo.md, samplers-digits.md).
    default_sampler = "dpm++2m-sde"

    def __init__(
        self,
        betas: torch.Tensor | str,
        *,
        prediction: Prediction = "eps",
        variance: Variance = "fixed_small",
        loss: LossType = "simple",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        num_timesteps: int | None = None,
        timestep_map: torch.Tensor | None = None,
    ) -> None:
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("variance", variance, VARIANCES)
        check_choice("loss", loss, LOSS_TYPES)
        check_choice("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)
        if variance == "learned_range" and loss == "simple":
            raise ConfigError(
                "variance='learned_range' with loss='simple' would never train the variance; "
                "use loss='hybrid' or loss='vlb'"
            )
        if isinstance(betas, str):
            betas = make_betas(betas, num_timesteps or 1000)
        self.schedule = Schedule.from_betas(torch.as_tensor(betas))
        self.prediction: Prediction = prediction
        self.variance: Variance = variance
        self.loss_type: LossType = loss
        self.loss_weighting: LossWeighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        # Which timestep of the network's own chain each of our indices is (identity unless respaced).
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        elif timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map has shape {tuple(timestep_map.shape)}, expected ({self.num_timesteps},)")
        self.timestep_map = timestep_map if timestep_map.dtype.is_floating_point else timestep_map.long()
        self._cast: dict[tuple[torch.device, torch.dtype], Schedule] = {}

    @classmethod
    def from_config(cls, cfg: GaussianConfig) -> GaussianDiffusion:
        """The diffusion a ``[diffusion]`` table describes (explicit ``betas`` win over the named schedule)."""
        if cfg.betas is not None:
            betas = make_betas(cfg.betas, cfg.timesteps)
        else:
            betas = make_betas(cfg.schedule, cfg.timesteps, **cfg.schedule_options)
        return cls(betas, prediction=cfg.prediction, variance=cfg.variance, loss=cfg.loss,
                   loss_weighting=cfg.loss_weighting, min_snr_gamma=cfg.min_snr_gamma)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def model_output_factor(self) -> int:
        """How many times the data's channels the network must output (2 for learned variance)."""
        return 2 if self.variance == "learned_range" else 1

    def output_channels(self, channels: int) -> int:
        return channels * self.model_output_factor

    def guidance_channels(self, channels: int) -> int:
        return channels  # the prediction; a learned variance comes from the conditional output (as GLIDE)

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, prediction={self.prediction!r}, "
            f"variance={self.variance!r}, loss={self.loss_type!r}, loss_weighting={self.loss_weighting!r})"
        )

    def tables(self, like: torch.Tensor) -> Schedule:
        """The schedule's tables in ``like``'s dtype and on its device (cast once, then cached)."""
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = self.schedule.to(like.device, like.dtype)
        return self._cast[key]

    def check_timesteps(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Validate t (integer ``[B]``, 0 <= t < T, B = x.shape[0]) and move it to x's device."""
        return check_timesteps(t, x, self.num_timesteps)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) at indices ``t``, shaped ``[B, 1, ...]`` like ``like``."""
        c = self.tables(like)
        return per_example(c.sqrt_alphas_cumprod[t], like), per_example(c.sqrt_one_minus_alphas_cumprod[t], like)

    # ------------------------------------------------------------------ forward process
    def draw_noise(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        """eps ~ N(0, I) of ``shape`` (float32) on ``device``."""
        return randn(shape, generator, device=device, dtype=torch.float32)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Eq. 4): mean, variance, log-variance."""
        t = self.check_timesteps(t, x0)
        c = self.tables(x0)
        mean = per_example(c.sqrt_alphas_cumprod[t], x0) * x0
        variance = 1.0 - per_example(c.alphas_cumprod[t], x0)
        return mean, variance.expand_as(x0), torch.log(variance).expand_as(x0)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *, generator: Generator = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4)."""
        t = self.check_timesteps(t, x0)
        if noise is None:
            noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I) (Eqs. 6-7): mean, variance, log-variance.

        At index 0 the variance is 0 and the log-variance is clipped to that of index 1.
        """
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} differs from x_t shape {tuple(x_t.shape)}")
        t = self.check_timesteps(t, x_t)
        c = self.tables(x_t)
        # Eq. 7: mu-tilde_t(x_t, x_0) = coef1 x_0 + coef2 x_t
        mean = per_example(c.posterior_mean_coef1[t], x_t) * x0 + per_example(c.posterior_mean_coef2[t], x_t) * x_t
        variance = per_example(c.posterior_variance[t], x_t).expand_as(x_t)
        log_variance = per_example(c.posterior_log_variance_clipped[t], x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ the network's output
    def model_output(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Call ``model(x_t, t)`` (``model(x_t, t, y=y)`` when conditioned) with t mapped to the network's timesteps."""
        t_net = self.timestep_map.to(t.device)[t]
        return model(x_t, t_net) if y is None else model(x_t, t_net, y=y)

    def split_model_output(self, output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the raw network output into the prediction and (learned_range) v in [-1, 1]."""
        channels = x_t.shape[1] if x_t.ndim > 1 else 1
        expected = (x_t.shape[0], channels * self.model_output_factor, *x_t.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"model output has shape {tuple(output.shape)}, expected {expected} "
                f"(prediction={self.prediction!r}, variance={self.variance!r}: "
                f"{self.model_output_factor}x the {channels} input channels on dim 1)"
            )
        output = output.to(x_t.dtype)
        if self.variance == "learned_range":
            prediction, var_v = output.chunk(2, dim=1)
            return prediction, var_v
        return output, None

    def reverse_log_variance(self, t: torch.Tensor, x_t: torch.Tensor, var_v: torch.Tensor | None) -> torch.Tensor:
        """log Sigma_theta(x_t, t): ``[B, 1, ...]`` for fixed variances, ``[B, ...]`` when learned."""
        c = self.tables(x_t)
        if self.variance == "fixed_small":
            return per_example(c.posterior_log_variance_clipped[t], x_t)
        if self.variance == "fixed_large":
            return per_example(c.fixed_large_log_variance[t], x_t)
        assert var_v is not None  # learned_range: split_model_output returned the interpolation
        # Nichol & Dhariwal Eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta-tilde_t), v in [0, 1].
        frac = (var_v + 1.0) / 2.0
        return frac * per_example(c.log_betas[t], x_t) + (1.0 - frac) * per_example(
            c.posterior_log_variance_clipped[t], x_t)

    def predict_x0(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = False
    ) -> torch.Tensor:
        """The x_0 implied by the network's prediction (Eq. 11 for eps), optionally clamped to [-1, 1]."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        pred_x0 = x0_from_prediction(self.prediction, prediction, x_t, alpha, sigma)
        return pred_x0.clamp(-1.0, 1.0) if clip_denoised else pred_x0

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> PMeanVariance:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)).

        The mean is the posterior mean (Eq. 7) at the predicted x_0 (Eq. 11 for eps prediction);
        ``clip_denoised`` clamps the predicted x_0 to [-1, 1] first (a sampling aid; the bound is
        evaluated without it).
        """
        t = self.check_timesteps(t, x_t)
        raw = self.model_output(model, x_t, t, y=y) if model_output is None else model_output
        prediction, var_v = self.split_model_output(raw, x_t)
        log_variance = self.reverse_log_variance(t, x_t, var_v).expand_as(x_t)
        pred_x0 = self.predict_x0(prediction, x_t, t, clip_denoised=clip_denoised)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return PMeanVariance(mean, torch.exp(log_variance), log_variance, pred_x0)

    def prior_sample(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        """x_T ~ N(0, I)."""
        return randn(shape, generator, device=device, dtype=torch.float32)

    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *, generator: Generator,
                 clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x_{t-1} = mu_theta(x_t, t) + sigma_t z (Algorithm 2, line 4); no noise is added at index 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        if bool((t == 0).all()):
            return out.mean, out.pred_x0
        noise = randn(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = per_example((t != 0).to(x_t.dtype), x_t)
        return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out.pred_x0

    # ------------------------------------------------------------------ the bound
    def check_data(self, x0: torch.Tensor) -> None:
        """The bound is defined for finite images ``[B, C, H, W]`` in [-1, 1] (the decoder's 256 bins)."""
        if x0.ndim != 4:
            raise UserError(f"the bound uses the 256-level decoder of 8-bit images [B, C, H, W]; got data of shape "
                            f"{list(x0.shape)}")
        check_images_in_range(x0, "the discretised decoder")

    def vlb_term(
        self,
        model: Model,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One term of the bound, bits/dim ``[B]``: L_0 = -log p(x_0 | x_1) at index 0 (Eq. 13),
        L_{t} = KL(q(x_{t} | x_{t+1}, x_0) || p_theta(x_{t} | x_{t+1})) elsewhere (Eq. 5)."""
        t = self.check_timesteps(t, x_t)
        raw = self.model_output(model, x_t, t, y=y) if model_output is None else model_output
        prediction, var_v = self.split_model_output(raw, x_t)
        pred_x0 = self.predict_x0(prediction, x_t, t, clip_denoised=clip_denoised)
        c = self.tables(x_t)
        log_var_q = per_example(c.posterior_log_variance_clipped[t], x_t)
        log_var_p = self.reverse_log_variance(t, x_t, var_v)
        # Both means are mu-tilde_t(., x_t) (Eq. 7) and share the x_t part, so their difference is
        # coef1 (x_0 - pred_x0): the KL needs no posterior means, only the x_0 error.
        mean_diff = per_example(c.posterior_mean_coef1[t], x_t) * (x0 - pred_x0)
        if var_v is None:  # per-example scalar variances: reduce before the elementwise work
            scalar = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p))
            kl = scalar.reshape(-1) + 0.5 * torch.exp(-log_var_p).reshape(-1) * mean_flat(mean_diff**2)
        else:
            kl = mean_flat(normal_kl(mean_diff, log_var_q, 0.0, log_var_p))
        terms = kl / LOG2
        first = torch.nonzero(t == 0).squeeze(1)  # the decoder term only where needed: it is costly
        if first.numel():
            mean, _, _ = self.q_posterior(pred_x0[first], x_t[first], t[first])
            log_scale = 0.5 * log_var_p[first].expand_as(mean)
            log_p = discretized_gaussian_log_likelihood(x0[first], mean, log_scale)
            terms = terms.index_put((first,), -mean_flat(log_p) / LOG2)
        return terms

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim ``[B]``; no parameters, tiny for good schedules."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / LOG2

    # ------------------------------------------------------------------ training
    def mse_weights(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example weights ``[B]`` of the MSE term; min-SNR-gamma expressed for each prediction."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape[0], device=x.device, dtype=x.dtype)
        snr = self.schedule.snr().to(x.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        # min(snr, gamma) is the weight of the x_0-space error; divided by the factor that relates
        # each target's error to x_0's: eps error = snr * x0 error, v error = (snr + 1) * x0 error.
        divisor = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1.0}[self.prediction]
        return (clipped / divisor).to(x.dtype)

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        y: torch.Tensor | None = None,
    ) -> TrainingLosses:
        """Per-example training loss ``[B]`` and its parts for one (x_0, t, eps) draw.

        L_simple = ||eps - eps_theta(x_t, t)||^2 averaged over dimensions (Eq. 14), or the same
        for the x_0 / v target. ``t`` (uniform) and ``noise`` are drawn from ``generator`` when
        not given; importance weights of another timestep distribution are applied by the caller.
        """
        if not torch.isfinite(x0).all():
            raise ValueError("x0 contains non-finite values")
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=gen_device)
        t = self.check_timesteps(t, x0)
        if noise is None:
            noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        raw = self.model_output(model, x_t, t, y=y)
        prediction, var_v = self.split_model_output(raw, x_t)
        alpha, sigma = self.alpha_sigma(t, x0)
        target = prediction_target(self.prediction, x0, noise, alpha, sigma)
        mse = mean_flat((target - prediction) ** 2)

        vlb = None
        if self.loss_type != "simple" or self.variance == "learned_range":
            # The vlb part trains only the variance in "hybrid": the mean's gradient is stopped here.
            frozen = prediction.detach() if self.loss_type == "hybrid" else prediction
            frozen_output = frozen if var_v is None else torch.cat([frozen, var_v], dim=1)
            vlb = self.vlb_term(model, x0, x_t, t, model_output=frozen_output)

        if self.loss_type == "simple":
            loss = self.mse_weights(t, x0) * mse
        elif self.loss_type == "vlb":
            assert vlb is not None
            loss = vlb * self.num_timesteps  # one uniformly drawn term times T estimates the whole sum
        else:
            assert vlb is not None
            loss = self.mse_weights(t, x0) * mse + HYBRID_VLB_WEIGHT * self.num_timesteps * vlb
        return TrainingLosses(loss=loss, error=mse.detach(), vlb=None if vlb is None else vlb.detach(), t=t)

    # ------------------------------------------------------------------ respacing
    def respaced(self, steps: int | Sequence[float] | torch.Tensor) -> GaussianDiffusion:
        """The DDPM that visits only some timesteps of this chain (betas recomputed from abar).

        ``steps`` is a number K (K timesteps evenly spread over 0..T-1, see
        :func:`~ddpm.schedules.space_timesteps`) or the timesteps themselves, in this chain's index
        space; fractional timesteps take abar from the log-SNR interpolation of
        :meth:`~ddpm.schedules.Schedule.alphas_cumprod_at`. The returned diffusion maps its indices
        to the network's timesteps, so the same network serves both; its index 0 steps to clean data.
        """
        if isinstance(steps, int):
            kept: torch.Tensor = space_timesteps(self.num_timesteps, steps)
        else:
            kept = torch.as_tensor(steps, dtype=torch.float64).flatten().unique()  # sorted
            if kept.numel() == 0 or kept[0] < 0 or kept[-1] > self.num_timesteps - 1:
                raise UserError(f"respaced timesteps must lie in [0, {self.num_timesteps - 1}], got {kept.tolist()}")
            if bool((kept == kept.round()).all()):
                kept = kept.long()
        if kept.numel() == self.num_timesteps and not kept.dtype.is_floating_point:
            return self
        abar = self.schedule.alphas_cumprod_at(kept)
        if kept.dtype.is_floating_point:
            network_t = interpolate(self.timestep_map.double(), kept)
        else:
            network_t = self.timestep_map[kept]
        return GaussianDiffusion(
            respace_betas(abar),
            prediction=self.prediction,
            variance=self.variance,
            loss=self.loss_type,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            timestep_map=network_t,
        )


def interpolate(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``table`` ``[T]`` at fractional indices ``t`` in [0, T-1]."""
    if table.numel() == 1:
        return table.expand_as(t).clone()
    lo = t.floor().long().clamp(max=table.numel() - 2)
    return table[lo] + (t - lo) * (table[lo + 1] - table[lo])
