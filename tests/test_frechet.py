"""Frechet distance and kernel distance against closed forms, scipy's sqrtm route and a direct
double-loop MMD, and feature statistics accumulated over batches."""
import numpy as np
import pytest
from scipy import linalg

from mmldm_jax.evaluation import frechet


def random_spd(rng, dim, rank=None):
  factor = rng.normal(size=(dim, rank or dim))
  return factor @ factor.T / (rank or dim) + (0.0 if rank else 0.1) * np.eye(dim)


def scipy_frechet(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's formula: scipy sqrtm of the product, real part."""
  covmean = linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_identical_sets_have_zero_distance():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12))
  stats = frechet.FeatureStats(12)
  stats.update(features)
  assert abs(frechet.frechet_distance_of(stats, stats)) < 1e-8
  # Singular covariance (fewer samples than dimensions) stays finite and ~0 (the square roots of
  # round-off-sized eigenvalues leave ~1e-7 of the trace).
  few = frechet.FeatureStats(64)
  few.update(rng.normal(size=(10, 64)))
  value = frechet.frechet_distance_of(few, few)
  assert np.isfinite(value) and abs(value) < 1e-6 * np.trace(few.covariance)


def test_diagonal_gaussians_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  value = frechet.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert value == pytest.approx(expected, rel=1e-12)
  assert expected == pytest.approx(1 + 6.25 + 4 + 1, rel=1e-12)


def test_general_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(1)
  for dim in (2, 7, 32):
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    ours = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-9, abs=1e-9)
    assert ours > 0


def test_small_sets_route_equals_the_covariance_route():
  """Sets narrower than the features (rank-deficient covariances): the n x m route of
  `set_distances` gives the d x d eigendecomposition route's number. The d x d route's error
  bound: each of its d - rank zero eigenvalues comes out as round-off of up to eps times the
  largest one, and contributes the square root of that, so it is within 2 d sqrt(eps |S1| |S2|)."""
  rng = np.random.default_rng(4)
  for n, m, dim in ((4, 12, 64), (12, 12, 300), (30, 9, 48)):
    x = rng.normal(size=(n, dim)) * rng.uniform(0.5, 2.0, dim)
    y = rng.normal(size=(m, dim)) + 0.3
    stats = [frechet.FeatureStats(dim), frechet.FeatureStats(dim)]
    stats[0].update(x)
    stats[1].update(y)
    expected = frechet.frechet_distance_of(*stats)
    norms = [np.linalg.norm(stat.covariance, 2) for stat in stats]
    bound = 2 * dim * np.sqrt(np.finfo(np.float64).eps * norms[0] * norms[1])
    assert frechet.frechet_distance_of_small_sets(x, y) == pytest.approx(expected, abs=bound)
    assert frechet.set_distances(x, y)["frechet"] == pytest.approx(expected, abs=bound)
    assert bound < 1e-6 * expected
  same = rng.normal(size=(5, 40))
  assert frechet.frechet_distance_of_small_sets(same, same) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match=r"\[n, d\] and \[m, d\]"):
    frechet.set_distances(rng.normal(size=(4, 40)), rng.normal(size=(4, 41)))


def test_sampled_gaussians_approach_the_closed_form():
  rng = np.random.default_rng(2)
  dim = 4
  mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
  sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
  exact = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
  stats1, stats2 = frechet.FeatureStats(dim), frechet.FeatureStats(dim)
  for _ in range(10):   # accumulated over batches
    stats1.update(rng.multivariate_normal(mu1, sigma1, size=4000))
    stats2.update(rng.multivariate_normal(mu2, sigma2, size=4000))
  assert frechet.frechet_distance_of(stats1, stats2) == pytest.approx(exact, rel=0.05)


def test_stats_over_batches_equal_numpy():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(103, 5)) * 3 + 7
  stats = frechet.FeatureStats(5)
  for start in range(0, 103, 10):
    stats.update(features[start:start + 10])
  assert stats.count == 103
  np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-10)
  np.testing.assert_array_equal(stats.features, features)
  with pytest.raises(ValueError, match=r"expected features \[N, 5\]"):
    stats.update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match="NaN"):
    stats.update(np.full((1, 5), np.nan))


def direct_mmd(x, y):
  """Unbiased polynomial-kernel MMD^2 with explicit loops (sklearn defaults: 3, 1/d, 1)."""
  d = x.shape[1]
  kernel = lambda a, b: (a @ b / d + 1.0) ** 3
  m, n = len(x), len(y)
  xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_kernel_distance_matches_the_direct_sum():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(9, 6)), rng.normal(size=(7, 6)) + 0.3
  assert frechet.kernel_distance(x, y) == pytest.approx(direct_mmd(x, y), rel=1e-10)


def test_kernel_distance_same_vs_shifted_distribution():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  same = frechet.kernel_distance(x, y)
  shifted = frechet.kernel_distance(x, y + 0.5)
  assert abs(same) < 0.02
  assert shifted > 10 * max(abs(same), 1e-3)
  with pytest.raises(ValueError, match=">= 2 vectors"):
    frechet.kernel_distance(x[:1], y)


@pytest.mark.parity
def test_kernel_distance_matches_sklearn():
  """KVD as MM-Diffusion computes it: sklearn's polynomial_kernel with its defaults."""
  pairwise = pytest.importorskip("sklearn.metrics.pairwise",
                                 reason="scikit-learn (the test extra) is not installed")
  rng = np.random.default_rng(6)
  x, y = rng.normal(size=(50, 400)), rng.normal(size=(40, 400)) * 1.2 + 0.1
  k_xx, k_yy = pairwise.polynomial_kernel(x), pairwise.polynomial_kernel(y)
  k_xy = pairwise.polynomial_kernel(x, y)
  m, n = len(x), len(y)
  expected = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
              + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2 * k_xy.mean())
  assert frechet.kernel_distance(x, y) == pytest.approx(expected, rel=1e-6)
