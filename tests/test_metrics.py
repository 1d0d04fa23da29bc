"""Sample-quality metrics against closed forms and reference implementations."""

import math

import numpy as np
import pytest
import torch

from ddpm.eval.metrics import (
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    kid,
    mean_log_density,
    mmd_rbf,
    precision_recall,
    sliced_wasserstein,
    trace_sqrt_product,
)


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


# --------------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------------


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_commuting_covariances_closed_form():
    # Shared eigenvectors: d^2 = sum_i (sqrt(l1_i) - sqrt(l2_i))^2 with no mean term.
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    l1, l2 = rng.uniform(0.0, 2.0, 5), rng.uniform(0.0, 2.0, 5)
    l1[0] = 0.0  # singular covariance is allowed
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expected = np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    # A zero eigenvalue comes back as ~1e-16 and its square root as ~1e-8: sqrt(eps) accuracy.
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, abs=1e-6)
    l1[0] = 0.3
    s1 = q @ np.diag(l1) @ q.T
    expected = np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 3])
def test_trace_sqrt_matches_scipy_sqrtm(rank):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 12, rank), random_spd(rng, 12)
    reference = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(reference, rel=1e-7)
    assert trace_sqrt_product(s2, s1) == pytest.approx(reference, rel=1e-7)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((200, 8)), rng.standard_normal((150, 8)) * 1.3 + 0.2
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(a, b) == pytest.approx(
        frechet_distance_from_features(b, a), rel=1e-9
    )
    # fewer samples than features: singular covariances still give a finite, non-negative value
    assert frechet_distance_from_features(a[:5], b[:5]) >= 0.0


def test_frechet_rejects_non_psd():
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------


def test_kid_unbiased_for_same_distribution():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    mean, se = kid(a, b, num_subsets=10, subset_size=100, seed=0)
    assert se > 0
    assert abs(mean) < 3 * se


def test_kid_positive_for_different_distributions():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16)) + 0.5
    mean, se = kid(a, b, num_subsets=6, subset_size=100, seed=0)
    assert mean > 5 * se  # measured: 1.00 +/- 0.11
    # an exact check of the kernel: one subset of everything equals the full U-statistic
    x, y = torch.as_tensor(a), torch.as_tensor(b)

    def k(u, v):
        return (u @ v.T / 16 + 1) ** 3

    kxx, kyy = k(x, x), k(y, y)
    n = 600
    full = (
        (kxx.sum() - kxx.trace()) / (n * (n - 1))
        + (kyy.sum() - kyy.trace()) / (n * (n - 1))
        - 2 * k(x, y).mean()
    )
    assert kid(a, b, num_subsets=1, subset_size=600)[0] == pytest.approx(full.item(), rel=1e-10)


def test_kid_seeded_and_checks_subset_size():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((100, 4)), rng.standard_normal((80, 4))
    assert kid(a, b, num_subsets=5, seed=3) == kid(a, b, num_subsets=5, seed=3)
    with pytest.raises(ValueError, match="subset_size"):
        kid(a, b, subset_size=81)
    with pytest.raises(ValueError, match="disjoint"):
        kid(a, b, num_subsets=5, subset_size=20)  # 100 > 80 rows


def test_kid_standard_error_is_honest():
    """Over seeded repeats with fresh data, 2 standard errors cover the true MMD^2 about 95% of the time."""
    rng = np.random.default_rng(8)
    ref_a, ref_b = rng.standard_normal((20000, 4)), rng.standard_normal((20000, 4)) + 0.3
    truth, _ = kid(ref_a, ref_b, num_subsets=20, subset_size=1000, seed=0)  # low-noise reference
    hits = 0
    for r in range(40):
        a, b = rng.standard_normal((400, 4)), rng.standard_normal((400, 4)) + 0.3
        mean, se = kid(a, b, num_subsets=8, seed=r)
        hits += abs(mean - truth) < 2 * se
    assert 30 <= hits <= 40, hits


# --------------------------------------------------------------------------------------------------
# Precision and recall
# --------------------------------------------------------------------------------------------------


def test_precision_recall_identical_sets():
    x = np.random.default_rng(8).standard_normal((300, 5))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((200, 5)), rng.standard_normal((200, 5)) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_one_of_two_modes():
    rng = np.random.default_rng(10)
    real = np.concatenate([rng.standard_normal((500, 2)), rng.standard_normal((500, 2)) + [20.0, 0.0]])
    fake = rng.standard_normal((500, 2))  # covers only the first mode
    precision, recall = precision_recall(real, fake, k=3, chunk=128)
    assert precision > 0.9
    assert 0.4 < recall < 0.55


# --------------------------------------------------------------------------------------------------
# Low-dimensional metrics
# --------------------------------------------------------------------------------------------------


def test_sliced_wasserstein_1d_is_exact():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal(300), rng.exponential(size=170)  # different sizes
    # In 1-D every direction is +-1, so SW_1 is the ordinary W_1.
    reference = scipy_stats.wasserstein_distance(a, b)
    assert sliced_wasserstein(a, b, num_projections=3, p=1) == pytest.approx(reference, rel=1e-10)
    assert sliced_wasserstein(a, a + 0.7, num_projections=3, p=2) == pytest.approx(0.7, rel=1e-12)


def test_sliced_wasserstein_shift_closed_form():
    # b = a + delta: along theta the 1-D distance is |delta . theta|; over uniform directions in 2-D,
    # E[(delta . theta)^2] = |delta|^2 / 2 and E|delta . theta| = 2 |delta| / pi.
    a = np.random.default_rng(12).standard_normal((500, 2))
    delta = np.array([3.0, -4.0])
    sw2 = sliced_wasserstein(a, a + delta, num_projections=4000, p=2, seed=1)
    sw1 = sliced_wasserstein(a, a + delta, num_projections=4000, p=1, seed=1)
    assert sw2 == pytest.approx(5.0 / math.sqrt(2.0), rel=0.02)
    assert sw1 == pytest.approx(2 * 5.0 / math.pi, rel=0.02)
    assert sliced_wasserstein(a, a, num_projections=50) == 0.0


def gaussian_mmd2(mu1, s1, mu2, s2, h, d):
    """Closed-form MMD^2 between N(mu1, s1^2 I) and N(mu2, s2^2 I) with a Gaussian kernel of width h."""

    def expected_kernel(var, sq_dist):
        return (h * h / (h * h + var)) ** (d / 2) * math.exp(-sq_dist / (2 * (h * h + var)))

    sq = float(np.sum((np.asarray(mu1) - np.asarray(mu2)) ** 2))
    return (
        expected_kernel(2 * s1 * s1, 0.0)
        + expected_kernel(2 * s2 * s2, 0.0)
        - 2 * expected_kernel(s1 * s1 + s2 * s2, sq)
    )


def test_mmd_rbf_matches_gaussian_closed_form():
    rng = np.random.default_rng(13)
    a = rng.standard_normal((1500, 2))
    b = 1.5 * rng.standard_normal((1500, 2)) + [1.0, 0.0]
    hs = (0.5, 1.0, 2.0)
    expected = sum(gaussian_mmd2([0, 0], 1.0, [1, 0], 1.5, h, 2) for h in hs)
    assert mmd_rbf(a, b, bandwidths=hs) == pytest.approx(expected, rel=0.1)
    same = mmd_rbf(a, rng.standard_normal((1500, 2)), bandwidths=hs)
    assert abs(same) < 0.05 * expected


def test_mean_log_density_standard_normal():
    x = torch.randn(20000, 2, generator=torch.Generator().manual_seed(14), dtype=torch.float64)

    def log_normal(z):
        return -0.5 * z.square().sum(1) - math.log(2 * math.pi)

    # E[log N(x; 0, I)] under x ~ N(0, I) is minus the entropy, -(d/2)(1 + log 2 pi).
    assert mean_log_density(x, log_normal) == pytest.approx(-(1 + math.log(2 * math.pi)), abs=0.02)
    with pytest.raises(ValueError, match="returned"):
        mean_log_density(x, lambda z: z[:3, 0])
