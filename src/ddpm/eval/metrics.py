"""Sample-quality metrics as pure functions on feature tensors.

Every function takes samples as ``[N, F]`` arrays (torch tensors or numpy arrays; one row per sample)
and computes in float64 on the CPU, whatever the input dtype. None needs scipy.

Image metrics (features from a :class:`ddpm.eval.features.FeatureExtractor`):

- :func:`gaussian_stats` and :func:`frechet_distance`: the Frechet distance between Gaussians fitted to
  two feature sets (FID when the features are Inception-v3 pool features; Heusel et al. 2017).
- :func:`kid`: the unbiased squared MMD with a cubic polynomial kernel, averaged over random subsets
  (KID; Binkowski et al. 2018).
- :func:`precision_recall`: improved precision and recall from k-NN manifolds
  (Kynkaenniemi et al. 2019).

Low-dimensional (e.g. 2-D toy) metrics on raw samples:

- :func:`sliced_wasserstein`, :func:`mmd_rbf` and :func:`mean_log_density`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Relative size below which a negative eigenvalue of a covariance is taken as round-off (and clipped
# to zero) rather than a sign that the matrix is not positive semi-definite (an error).
_PSD_RTOL = 1e-6


def _as_samples(x: ArrayLike, name: str) -> torch.Tensor:
    """Return ``x`` as a float64 CPU tensor of shape ``[N, F]``; 1-D input is read as ``[N, 1]``."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [N, F], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _same_dim(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------


def gaussian_stats(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[F]`` and covariance ``[F, F]`` (float64) of ``features`` ``[N, F]``, N >= 2.

    The covariance uses the unbiased ``1 / (N - 1)`` normalisation, as ``numpy.cov`` and the reference
    FID code do.
    """
    x = _as_samples(features, "features")
    if x.shape[0] < 2:
        raise ValueError("gaussian_stats needs at least 2 samples")
    mu = x.mean(dim=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


def _psd_eigvalsh(m: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the symmetric part of ``m`` with round-off negatives clipped to zero.

    Raises if an eigenvalue is below ``-_PSD_RTOL * max|eigenvalue|``: that is not round-off but a
    matrix that is not a covariance.
    """
    sym = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(sym)
    scale = evals.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    if evals.min() < -_PSD_RTOL * scale:
        raise ValueError(
            f"{name} is not positive semi-definite (eigenvalue {evals.min().item():.3g}, "
            f"largest magnitude {scale.item():.3g})"
        )
    return evals.clamp_min(0.0), evecs


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike) -> float:
    """``tr(sqrt(sigma1 @ sigma2))`` for symmetric PSD ``sigma1``, ``sigma2``, in float64.

    ``sigma1 @ sigma2`` is not symmetric, so a general matrix square root (``scipy.linalg.sqrtm``) goes
    through a Schur form and can return complex parts from round-off. Instead we use that
    ``sigma1 @ sigma2`` and ``A = sqrt(sigma1) @ sigma2 @ sqrt(sigma1)`` have the same eigenvalues
    (``XY`` and ``YX`` share their non-zero eigenvalues, with ``X = sqrt(sigma1)``), and ``A`` is
    symmetric PSD, so ``tr(sqrt(sigma1 @ sigma2)) = sum_i sqrt(lambda_i(A))`` with a symmetric
    eigensolver (``eigh``). This holds for singular covariances too (fewer samples than features).

    Round-off handling, exactly: both matrices are symmetrised (``(M + M^T) / 2``) before ``eigh``;
    eigenvalues of ``sigma1`` and of ``A`` below zero but above ``-1e-6`` times the largest magnitude
    are round-off and clipped to 0 before the square root; anything more negative raises
    ``ValueError``. No complex numbers appear at any point, so there is no imaginary part to discard.

    Accuracy: about 1e-12 relative for well-conditioned covariances. An exactly zero eigenvalue comes
    back from ``eigh`` as ~1e-16 times the scale, whose square root is ~1e-8: singular covariances
    (fewer samples than features) are accurate to about ``sqrt(eps)``, as with any matrix square root.
    """
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    if s1.ndim != 2 or s1.shape[0] != s1.shape[1] or s1.shape != s2.shape:
        raise ValueError(f"need two square matrices of one shape, got {tuple(s1.shape)}, {tuple(s2.shape)}")
    evals1, evecs1 = _psd_eigvalsh(s1, "sigma1")
    sqrt_s1 = (evecs1 * evals1.sqrt()) @ evecs1.T
    _psd_eigvalsh(s2, "sigma2")  # validation only
    evals_a, _ = _psd_eigvalsh(sqrt_s1 @ s2 @ sqrt_s1, "sqrt(sigma1) @ sigma2 @ sqrt(sigma1)")
    return evals_a.sqrt().sum().item()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))`` (Dowson & Landau
    1982); FID is this on Inception pool features. The trace of the square root is computed as in
    :func:`trace_sqrt_product` (float64, symmetric eigensolver, round-off negatives clipped to 0). The
    result can come out a few ulps below zero for identical inputs; it is clamped to ``>= 0``.
    """
    m1 = torch.as_tensor(mu1, dtype=torch.float64).reshape(-1)
    m2 = torch.as_tensor(mu2, dtype=torch.float64).reshape(-1)
    s1 = torch.as_tensor(sigma1, dtype=torch.float64)
    s2 = torch.as_tensor(sigma2, dtype=torch.float64)
    if m1.shape != m2.shape or s1.shape != (m1.numel(), m1.numel()) or s2.shape != s1.shape:
        raise ValueError(
            f"shape mismatch: mu1 {tuple(m1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}"
        )
    mean_term = (m1 - m2).square().sum().item()
    cov_term = torch.trace(s1).item() + torch.trace(s2).item() - 2.0 * trace_sqrt_product(s1, s2)
    return max(mean_term + cov_term, 0.0)


def frechet_distance_from_features(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """:func:`frechet_distance` between Gaussians fitted (:func:`gaussian_stats`) to two feature sets."""
    return frechet_distance(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# --------------------------------------------------------------------------------------------------
# Kernel inception distance
# --------------------------------------------------------------------------------------------------


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``k(x, y) = (x . y / d + 1)^3`` for all pairs; ``[n, m]``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """Unbiased MMD^2 U-statistic (Gretton et al. 2012, Eq. 3) from kernel matrices.

    Within-set means leave out the diagonal (``k(x_i, x_i)`` terms bias the estimate upwards).
    """
    n, m = k_xx.shape[0], k_yy.shape[0]
    if n < 2 or m < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples per set")
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (xx + yy - 2.0 * k_xy.mean()).item()


def kid(
    feats_a: ArrayLike,
    feats_b: ArrayLike,
    *,
    num_subsets: int = 10,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance: ``(mean, standard_error)`` of the unbiased MMD^2 over disjoint subsets.

    Both sets are shuffled (seeded by ``seed``; the global RNG is untouched) and cut into
    ``num_subsets`` disjoint subsets of ``subset_size`` rows; each pair of subsets gives an
    independent unbiased MMD^2 with the kernel ``k(x, y) = (x . y / d + 1)^3``. The mean is unbiased
    (negative values happen when the distributions match) and, the subsets being disjoint, the
    standard error ``std(ddof=1) / sqrt(num_subsets)`` is an honest one for that mean. (Overlapping
    subsets, as some tools draw, make the spread shrink towards 0 as the subsets grow.)

    ``subset_size`` defaults to ``min(1000, n // num_subsets)`` with n the smaller set's size;
    ``num_subsets * subset_size`` must not exceed n.
    """
    a = _as_samples(feats_a, "feats_a")
    b = _as_samples(feats_b, "feats_b")
    _same_dim(a, b)
    n_max = min(a.shape[0], b.shape[0])
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size is None:
        subset_size = min(1000, n_max // num_subsets)
    if not 2 <= subset_size or num_subsets * subset_size > n_max:
        raise ValueError(
            f"subset_size={subset_size} with num_subsets={num_subsets} needs 2 <= subset_size and "
            f"num_subsets * subset_size <= {n_max} (the smaller set): the subsets are disjoint"
        )
    gen = torch.Generator().manual_seed(seed)
    perm_a = torch.randperm(a.shape[0], generator=gen)
    perm_b = torch.randperm(b.shape[0], generator=gen)
    estimates = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        block = slice(i * subset_size, (i + 1) * subset_size)
        x, y = a[perm_a[block]], b[perm_b[block]]
        estimates[i] = _unbiased_mmd2(
            _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        )
    mean = estimates.mean().item()
    stderr = estimates.std().item() / math.sqrt(num_subsets) if num_subsets > 1 else float("nan")
    return mean, stderr


# --------------------------------------------------------------------------------------------------
# Improved precision and recall
# --------------------------------------------------------------------------------------------------


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row; ``[N]``."""
    radii = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start : start + chunk], x)
        # The k+1 smallest include the point itself at distance 0 (index 0 after sorting).
        radii[start : start + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _inside_manifold(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """Boolean ``[Q]``: is each query row inside some ball ``B(ref_j, radii_j)``?"""
    inside = torch.empty(query.shape[0], dtype=torch.bool)
    for start in range(0, query.shape[0], chunk):
        d = torch.cdist(query[start : start + chunk], ref)
        inside[start : start + chunk] = (d <= radii[None, :]).any(dim=1)
    return inside


def precision_recall(
    real: ArrayLike, fake: ArrayLike, *, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019); returns ``(precision, recall)``.

    The manifold of a set is the union of balls around its points, each with radius the distance to the
    point's k-th nearest neighbour within the set. Precision is the fraction of ``fake`` inside the real
    manifold (sample quality); recall is the fraction of ``real`` inside the fake manifold (coverage).
    A point on a ball's boundary counts as inside. Distances are Euclidean in float64, computed in row
    chunks of ``chunk`` to bound memory at ``chunk * N`` entries.
    """
    r = _as_samples(real, "real")
    f = _as_samples(fake, "fake")
    _same_dim(r, f)
    if not 1 <= k < min(r.shape[0], f.shape[0]):
        raise ValueError(f"k must be in [1, min(len(real), len(fake)) - 1], got {k}")
    real_radii = _kth_neighbour_radii(r, k, chunk)
    fake_radii = _kth_neighbour_radii(f, k, chunk)
    precision = _inside_manifold(f, r, real_radii, chunk).double().mean().item()
    recall = _inside_manifold(r, f, fake_radii, chunk).double().mean().item()
    return precision, recall


# --------------------------------------------------------------------------------------------------
# Low-dimensional metrics
# --------------------------------------------------------------------------------------------------


def _wasserstein_1d_pow(x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
    """``W_p^p`` between the empirical distributions of the columns of ``x`` ``[n, P]`` and ``y`` ``[m, P]``.

    Exact for empirical measures of any sizes: ``W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du`` with both
    quantile functions piecewise constant, jumping at ``i / n`` and ``j / m``. Returns ``[P]``.
    """
    n, m = x.shape[0], y.shape[0]
    xs, _ = x.sort(dim=0)
    ys, _ = y.sort(dim=0)
    if n == m:
        return (xs - ys).abs().pow(p).mean(dim=0)
    steps_x = torch.arange(1, n + 1, dtype=torch.float64) / n
    steps_y = torch.arange(1, m + 1, dtype=torch.float64) / m
    grid, _ = torch.cat([steps_x, steps_y]).sort()
    widths = torch.diff(grid, prepend=grid.new_zeros(1))
    mids = grid - 0.5 * widths
    ix = (mids * n).floor().long().clamp_(0, n - 1)
    iy = (mids * m).floor().long().clamp_(0, m - 1)
    return ((xs[ix] - ys[iy]).abs().pow(p) * widths[:, None]).sum(dim=0)


def sliced_wasserstein(
    a: ArrayLike, b: ArrayLike, *, num_projections: int = 256, p: float = 2.0, seed: int = 0
) -> float:
    """Sliced p-Wasserstein distance ``(E_theta[W_p^p(theta . a, theta . b)])^(1/p)`` (Bonneel et al. 2015).

    Directions ``theta`` are ``num_projections`` draws uniform on the unit sphere (normalised Gaussians,
    seeded by ``seed``); each 1-D distance is exact for the two empirical distributions, which may have
    different sizes. For ``b = a + delta`` the 1-D distance along ``theta`` is ``|delta . theta|``, so in
    2-D the p=2 value tends to ``|delta| / sqrt(2)`` and the p=1 value to ``2 |delta| / pi``.
    """
    x = _as_samples(a, "a")
    y = _as_samples(b, "b")
    _same_dim(x, y)
    if num_projections < 1 or p < 1:
        raise ValueError(f"need num_projections >= 1 and p >= 1, got {num_projections}, {p}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return _wasserstein_1d_pow(x @ theta, y @ theta, p).mean().pow(1.0 / p).item()


def mmd_rbf(a: ArrayLike, b: ArrayLike, *, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels ``sum_h exp(-||x - y||^2 / (2 h^2))``.

    ``bandwidths`` are in the units of the data; a sum over several scales keeps the test sensitive
    when the right scale is unknown. The U-statistic is unbiased, so it can be slightly negative.
    """
    x = _as_samples(a, "a")
    y = _as_samples(b, "b")
    _same_dim(x, y)
    hs = [float(h) for h in bandwidths]
    if not hs or min(hs) <= 0:
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {bandwidths}")

    def gram(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sq = torch.cdist(u, v).square()
        return torch.stack([torch.exp(-sq / (2.0 * h * h)) for h in hs]).sum(dim=0)

    return _unbiased_mmd2(gram(x, x), gram(y, y), gram(x, y))


def mean_log_density(samples: ArrayLike, log_density_fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Mean of ``log_density_fn`` (a known target's log density, in nats) over ``samples`` ``[N, D]``.

    ``log_density_fn`` receives the float64 samples ``[N, D]`` and returns ``[N]``. This is the
    expected log-likelihood of the model's samples under the true density: high when samples land where
    the data is dense (precision-like; it does not penalise missing modes).
    """
    x = _as_samples(samples, "samples")
    with torch.no_grad():
        logp = torch.as_tensor(log_density_fn(x)).to(torch.float64).reshape(-1)
    if logp.shape[0] != x.shape[0]:
        raise ValueError(f"log_density_fn returned {logp.shape[0]} values for {x.shape[0]} samples")
    return logp.mean().item()
