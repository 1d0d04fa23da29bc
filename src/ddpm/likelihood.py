"""The variational bound on -log p(x_0), in bits per dimension.

    -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0          (Ho et al. 2020, Eq. 5)

with L_T = KL(q(x_T|x_0) || N(0, I)), L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_theta(x_{t-1}|x_t)) and
L_0 = -log p_theta(x_0|x_1). Each L term is an expectation over x_t ~ q(x_t | x_0); like every
published evaluation, one draw of x_t per term is used.

:func:`nll` evaluates all T terms (batched over t: several timesteps share one network call);
:func:`nll_estimate` is an unbiased Monte Carlo estimate of the same total from K sampled
timesteps per image, with a per-image standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm.choices import ESTIMATE_METHODS, EstimateMethod, check_choice
from ddpm.processes import DiffusionProcess
from ddpm.tensors import Generator, Model


@dataclass
class NLLResult:
    """The full bound per example, bits/dim.

    ``total_bpd`` [B] = ``prior_bpd`` [B] (L_T) + ``terms_bpd.sum(1)``; ``terms_bpd`` [B, T] holds
    L_0 at index 0 (``decoder_bpd``) and the KL terms at 1..T-1 (summed in ``kl_bpd``).
    """

    total_bpd: torch.Tensor
    prior_bpd: torch.Tensor
    terms_bpd: torch.Tensor

    @property
    def decoder_bpd(self) -> torch.Tensor:
        return self.terms_bpd[:, 0]

    @property
    def kl_bpd(self) -> torch.Tensor:
        return self.terms_bpd[:, 1:].sum(dim=1)


@dataclass
class NLLEstimate:
    """Monte Carlo estimate of the bound per example, bits/dim ``[B]``, with its standard error."""

    total_bpd: torch.Tensor
    stderr_bpd: torch.Tensor
    prior_bpd: torch.Tensor
    num_terms: int
    method: str

    def mean_and_stderr(self) -> tuple[float, float]:
        """Average over the examples and the standard error of that average (examples independent)."""
        n = self.total_bpd.numel()
        return float(self.total_bpd.mean()), float(self.stderr_bpd.pow(2).sum().sqrt() / n)


@torch.no_grad()
def evaluate_terms(
    process: DiffusionProcess,
    model: Model,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    generator: Generator = None,
    max_batch_size: int = 1024,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_t in bits/dim for each example i and each of its timesteps ``t[i, k]``: ``[B, K]``.

    The B*K (example, timestep) pairs are evaluated ``max_batch_size`` at a time, one fresh x_t
    per pair. With one generator per example, example i's noise is drawn from its own generator in
    the order of its timesteps, so its terms do not depend on the batch or the chunking. ``y``:
    class labels ``[B]`` of a conditional model (the bound is then on -log p(x_0 | y)).
    """
    B, K = t.shape
    flat_t = t.reshape(-1)
    example = torch.arange(B, device=x0.device).repeat_interleave(K)
    out = torch.empty(B * K, device=x0.device, dtype=torch.float64)
    for start in range(0, B * K, max_batch_size):
        sl = slice(start, start + max_batch_size)
        x0_chunk, t_chunk = x0[example[sl]], flat_t[sl].to(x0.device)
        gens = generator if isinstance(generator, torch.Generator) or generator is None else [
            generator[int(e)] for e in example[sl]
        ]
        noise = process.draw_noise(x0_chunk.shape, gens, device=x0.device)
        x_t = process.q_sample(x0_chunk, t_chunk, noise)
        y_chunk = None if y is None else y[example[sl]]
        out[sl] = process.vlb_term(model, x0_chunk, x_t, t_chunk, y=y_chunk).double()
    return out.reshape(B, K)


def nll(
    process: DiffusionProcess,
    model: Model,
    x0: torch.Tensor,
    *,
    generator: Generator = None,
    max_batch_size: int = 1024,
    progress: bool = False,
    y: torch.Tensor | None = None,
) -> NLLResult:
    """All T terms of the bound for each example of ``x0`` ``[B, ...]``, bits/dim; ``y``: labels if conditional."""
    process.check_data(x0)
    B, T = x0.shape[0], process.num_timesteps
    per_chunk = max(1, max_batch_size // B)  # timesteps per network call
    chunks = range(0, T, per_chunk)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="bound terms", unit_scale=per_chunk)
    terms = torch.empty(B, T, dtype=torch.float64, device=x0.device)
    for start in chunks:
        ts = torch.arange(start, min(T, start + per_chunk), device=x0.device)
        grid = ts.expand(B, -1)
        terms[:, ts] = evaluate_terms(process, model, x0, grid, generator=generator, max_batch_size=max_batch_size,
                                      y=y)
    prior = process.prior_bpd(x0).double()
    return NLLResult(total_bpd=prior + terms.sum(dim=1), prior_bpd=prior, terms_bpd=terms)


def _dev(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def stratum_edges(num_timesteps: int, strata: int) -> torch.Tensor:
    """Edges ``[strata + 1]`` of contiguous strata of 0..T-1 whose sizes grow geometrically.

    The bound's terms are largest and change fastest at small t (most bits are spent in the last
    steps of the reverse chain), so the first strata are a single timestep each and the variance
    that is left sits in the long, flat tail, where two draws per stratum estimate it well.
    """
    T = num_timesteps
    edges = torch.round(torch.logspace(0, math.log10(T + 1), strata + 1, dtype=torch.float64)).long() - 1
    edges[0], edges[-1] = 0, T
    for i in range(1, strata + 1):  # strictly increasing...
        edges[i] = max(int(edges[i]), int(edges[i - 1]) + 1)
    for i in range(strata - 1, -1, -1):  # ...and ending at T
        edges[i] = min(int(edges[i]), int(edges[i + 1]) - 1)
    return edges


def default_proposal(num_timesteps: int) -> torch.Tensor:
    """The default importance proposal ``[T]``: p_t ~ 1/(t+1), which follows the typical decay of the
    terms with t (a trained loss-aware timestep sampler's probabilities are a better one, when there)."""
    p = 1.0 / torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    return p / p.sum()


def nll_estimate(
    process: DiffusionProcess,
    model: Model,
    x0: torch.Tensor,
    num_terms: int,
    *,
    method: EstimateMethod = "importance",
    proposal: torch.Tensor | None = None,
    generator: Generator = None,
    max_batch_size: int = 1024,
    y: torch.Tensor | None = None,
) -> NLLEstimate:
    """Unbiased estimate of ``nll(...).total_bpd`` from ``num_terms`` sampled timesteps per image.

    ``"stratified"``: 0..T-1 is cut into num_terms/2 contiguous strata (geometrically growing, see
    :func:`stratum_edges`); two timesteps are drawn
    uniformly (with replacement) in each. With N_h indices in stratum h and y its two terms, the
    estimate is sum_h N_h mean(y) and its variance sum_h N_h^2 s_h^2 / 2 with s_h^2 the unbiased
    sample variance, (y_1 - y_2)^2 / 2; two draws per stratum are what makes this variance
    estimate unbiased. The estimate is unbiased, but with few strata its standard error has few
    degrees of freedom and is optimistic (tests/test_likelihood.py measures how often 2 SE cover the bound).
    ``"importance"``: t ~ ``proposal`` [T] (default :func:`default_proposal`); estimate
    mean(L_t / p_t), standard error std(L_t / p_t) / sqrt(K) (2 SE cover the exact bound about 95% of
    the time: tests/test_likelihood.py holds it to that).
    """
    check_choice("method", method, ESTIMATE_METHODS)
    process.check_data(x0)
    B, T = x0.shape[0], process.num_timesteps
    device = x0.device

    def per_example(draw: Callable[[int, torch.Generator | None], torch.Tensor]) -> torch.Tensor:
        """One draw for the batch, or one per example from its own generator."""
        if generator is None or isinstance(generator, torch.Generator):
            return draw(B, generator)
        return torch.cat([draw(1, g) for g in generator])

    if method == "stratified":
        if num_terms < 2 or num_terms % 2 or num_terms // 2 > T:
            raise ValueError(f"stratified estimation needs an even num_terms in [2, {2 * T}], got {num_terms}")
        strata = num_terms // 2
        edges = stratum_edges(T, strata)
        sizes = (edges[1:] - edges[:-1]).double()  # N_h
        u = per_example(lambda n, g: torch.rand(n, strata, 2, generator=g, dtype=torch.float64, device=_dev(g)).cpu())
        t = edges[:-1, None] + (u * sizes[:, None]).long().clamp(max=(sizes - 1).long()[:, None])
        terms = evaluate_terms(
            process, model, x0, t.reshape(B, -1).to(device), generator=generator, max_batch_size=max_batch_size,
            y=y,
        ).reshape(B, strata, 2)
        sizes = sizes.to(device)
        total_terms = (sizes * terms.mean(dim=2)).sum(dim=1)
        variance = (sizes**2 * (terms[..., 0] - terms[..., 1]) ** 2 / 4).sum(dim=1)
    elif method == "importance":
        if num_terms < 2:
            raise ValueError(f"importance estimation needs num_terms >= 2, got {num_terms}")
        p = default_proposal(T) if proposal is None else proposal.double().cpu()
        if p.shape != (T,) or (p <= 0).any() or not torch.isfinite(p).all():
            raise ValueError(f"proposal must be a positive finite tensor of shape [{T}]")
        p = p / p.sum()
        t = per_example(
            lambda n, g: torch.multinomial(p.to(_dev(g)).expand(n, -1), num_terms, replacement=True, generator=g).cpu()
        )
        terms = evaluate_terms(
            process, model, x0, t.to(device), generator=generator, max_batch_size=max_batch_size, y=y
        )
        ratio = terms / p.to(device)[t.to(device)]
        total_terms = ratio.mean(dim=1)
        variance = ratio.var(dim=1, unbiased=True) / num_terms
    else:  # pragma: no cover - check_choice refused it
        raise AssertionError(method)
    prior = process.prior_bpd(x0).double()
    return NLLEstimate(prior + total_terms, variance.sqrt(), prior, num_terms, method)
