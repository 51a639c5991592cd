"""Distances between two sets of feature vectors: the Frechet distance and the kernel distance.

These are the statistics behind FID / FVD / FAD (Frechet) and KID / KVD (kernel); which network makes
the features is the caller's business. Everything runs in float64 NumPy on the host: feature sets of
evaluations are small (thousands x hundreds), and the matrix square root needs the precision.

  FeatureStats          running mean and covariance over batches (sums in float64), optionally
                        keeping the raw features for the kernel distance
  frechet_distance      ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
  kernel_distance       unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^3, the raw value
  set_distances         both of the above between two feature sets (small sets: see below)
  nearest_distances     each query's Euclidean distance to its nearest reference (memorisation)

Frechet distance: tr((S1 S2)^(1/2)) is computed as TF-GAN does (`trace_sqrt_product`): with
A = S1^(1/2) (symmetric, from an eigendecomposition), S1 S2 is similar to A S2 A, which is symmetric
positive semi-definite, so the trace is the sum of the square roots of its eigenvalues (tiny negative
round-off clipped to 0). This equals scipy's `sqrtm` route used by pytorch-fid wherever that one
works, and stays finite and real for singular covariances (fewer samples than dimensions), where
`sqrtm(S1 @ S2)` returns complex values or NaN.

Sets smaller than the feature width (`set_distances`, n or m < d): with X and Y the centred sets,
S1 = X^T X / (n - 1) and S2 = Y^T Y / (m - 1), and the non-zero eigenvalues of S1 S2 are those of
(X Y^T)(X Y^T)^T / ((n - 1)(m - 1)), so tr((S1 S2)^(1/2)) is the sum of the singular values of the
n x m matrix X Y^T over sqrt((n - 1)(m - 1)): the same number, exactly, without the two d x d
eigendecompositions (2048-wide PANNs features of a few dozen clips: milliseconds instead of
seconds per distance).

Kernel distance: k(x, y) = (gamma x.y + coef0)^degree with sklearn's `polynomial_kernel` defaults
(degree 3, gamma = 1 / d, coef0 = 1), and the unbiased MMD^2 estimate (the diagonal terms k(x_i, x_i)
left out), as KID and MM-Diffusion's KVD; reported raw (no x1000). It can be slightly negative when
the sets come from the same distribution.
"""
from __future__ import annotations

import numpy as np


class FeatureStats:
  """Accumulates feature vectors batch by batch: mean, covariance and (optionally) the features.

  Sums of x and x x^T are kept in float64, so the result does not depend on how the set was split
  into batches (beyond float64 round-off).
  """

  def __init__(self, dim: int, keep_features: bool = True):
    if dim <= 0:
      raise ValueError(f"FeatureStats: dim={dim}, expected a positive feature width")
    self.dim = int(dim)
    self.count = 0
    self._sum = np.zeros(self.dim, np.float64)
    self._outer = np.zeros((self.dim, self.dim), np.float64)
    self._kept: list[np.ndarray] | None = [] if keep_features else None

  def update(self, features: np.ndarray) -> None:
    """Adds a batch [N, dim] (or one vector [dim])."""
    features = np.asarray(features, np.float64)
    if features.ndim == 1:
      features = features[None]
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"FeatureStats.update: expected features [N, {self.dim}], got "
                       f"{features.shape}")
    if not np.all(np.isfinite(features)):
      raise ValueError("FeatureStats.update: features contain NaN or inf")
    self.count += features.shape[0]
    self._sum += features.sum(axis=0)
    self._outer += features.T @ features
    if self._kept is not None:
      self._kept.append(features)

  @property
  def mean(self) -> np.ndarray:
    self._need(1)
    return self._sum / self.count

  @property
  def covariance(self) -> np.ndarray:
    """Unbiased (N - 1) sample covariance, like np.cov(features, rowvar=False)."""
    self._need(2)
    mean = self.mean
    return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  @property
  def features(self) -> np.ndarray:
    if self._kept is None:
      raise ValueError("FeatureStats was built with keep_features=False")
    self._need(1)
    return np.concatenate(self._kept, axis=0)

  def _need(self, count: int) -> None:
    if self.count < count:
      raise ValueError(f"FeatureStats holds {self.count} feature vectors; this needs >= {count}")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric positive semi-definite matrices (see module doc)."""
  sigma1 = _symmetric(sigma1)
  sigma2 = _symmetric(sigma2)
  values, vectors = np.linalg.eigh(sigma1)
  sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
  inner = _symmetric(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (>= 0 up to round-off)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"frechet_distance: means must be vectors of one width, got {mu1.shape} and "
                     f"{mu2.shape}")
  width = mu1.shape[0]
  for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
    if sigma.shape != (width, width):
      raise ValueError(f"frechet_distance: {name} has shape {sigma.shape}, expected "
                       f"{(width, width)}")
  difference = mu1 - mu2
  value = (difference @ difference + np.trace(sigma1) + np.trace(sigma2)
           - 2.0 * trace_sqrt_product(sigma1, sigma2))
  return float(value)


def frechet_distance_of(stats1: FeatureStats, stats2: FeatureStats) -> float:
  """`frechet_distance` of two accumulated feature sets."""
  return frechet_distance(stats1.mean, stats1.covariance, stats2.mean, stats2.covariance)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
  """(gamma x y^T + coef0)^degree, gamma = 1 / width by default (sklearn's polynomial_kernel)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  return (gamma * (x @ y.T) + coef0) ** degree


def kernel_distance(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                    coef0: float = 1.0) -> float:
  """Unbiased MMD^2 between feature sets x [m, d] and y [n, d] (m, n >= 2) with the polynomial kernel:

    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
    - 2 sum_{i, j} k(x_i, y_j) / (m n)
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"kernel_distance: expected [m, d] and [n, d] features, got {x.shape} and "
                     f"{y.shape}")
  m, n = x.shape[0], y.shape[0]
  if m < 2 or n < 2:
    raise ValueError(f"kernel_distance: the unbiased estimate needs >= 2 vectors per set, got {m} "
                     f"and {n}")
  k_xx = polynomial_kernel(x, x, degree, gamma, coef0)
  k_yy = polynomial_kernel(y, y, degree, gamma, coef0)
  k_xy = polynomial_kernel(x, y, degree, gamma, coef0)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def set_distances(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
  """Frechet and kernel distance between feature sets x [m, d] and y [n, d]; both None when a set
  has fewer than 2 vectors (no covariance, no unbiased MMD)."""
  if min(len(x), len(y)) < 2:
    return {"frechet": None, "kernel": None}
  if min(len(x), len(y)) < x.shape[1]:
    frechet = frechet_distance_of_small_sets(x, y)
  else:
    stats = []
    for values in (x, y):
      accumulated = FeatureStats(values.shape[1], keep_features=False)
      accumulated.update(values)
      stats.append(accumulated)
    frechet = frechet_distance_of(*stats)
  return {"frechet": frechet, "kernel": kernel_distance(x, y)}


def frechet_distance_of_small_sets(x: np.ndarray, y: np.ndarray) -> float:
  """`frechet_distance` of the Gaussians fitted to feature sets x [n, d] and y [m, d] (n, m >= 2,
  unbiased covariances) through the n x m matrix of centred products (module doc): exact, and
  cheaper than the d x d route when n or m is below d."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise ValueError(f"frechet_distance_of_small_sets: expected [n, d] and [m, d] features with "
                     f"n, m >= 2, got {x.shape} and {y.shape}")
  centred_x, centred_y = x - x.mean(axis=0), y - y.mean(axis=0)
  scale_x, scale_y = len(x) - 1, len(y) - 1
  difference = x.mean(axis=0) - y.mean(axis=0)
  trace_sqrt = np.linalg.svd(centred_x @ centred_y.T, compute_uv=False).sum() / np.sqrt(
      scale_x * scale_y)
  return float(difference @ difference + np.sum(centred_x ** 2) / scale_x
               + np.sum(centred_y ** 2) / scale_y - 2.0 * trace_sqrt)


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
  """Euclidean distance from each query [n, d] to its nearest reference [m, d]."""
  queries, references = np.asarray(queries, np.float64), np.asarray(references, np.float64)
  squared = ((queries ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None]
             - 2.0 * queries @ references.T)
  return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def _symmetric(matrix: np.ndarray) -> np.ndarray:
  matrix = np.asarray(matrix, np.float64)
  return 0.5 * (matrix + matrix.T)
