"""Improved precision / recall (Kynkäänniemi et al. 2019) and KID (Bińkowski et al. 2018).

Both work on (N, D) feature arrays on the host (numpy, float64, pairwise distances in row
batches so memory stays O(batch * N)).

Precision/recall: each real feature r gets a radius ρ_k(r) = distance to its k-th nearest other
real feature (k = 3); the real manifold is the union of the balls B(r, ρ_k(r)). Precision is the
fraction of generated features inside the real manifold; recall is the fraction of real features
inside the generated manifold (built the same way from the generated features).

KID: unbiased MMD² with the polynomial kernel k(x, y) = (x·y / D + 1)^3, averaged over random
subsets (default 100 subsets of min(1000, N_real, N_fake) samples each, drawn without replacement,
as torch-fidelity does); returns mean and (population) std over subsets.
"""

from typing import Dict, Optional

import numpy as np


def _as_f64(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected (N, D) features, got shape {x.shape}")
  return x


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  a_sq = np.einsum("ij,ij->i", a, a)
  d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
  """Distance of each row to its k-th nearest *other* row (the row itself excluded), (N,)."""
  x = _as_f64(features)
  n = x.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"need 1 <= k < N, got k={k}, N={n}")
  x_sq = np.einsum("ij,ij->i", x, x)
  radii = np.empty((n,), np.float64)
  for s in range(0, n, batch_size):
    d = _sq_dists(x[s:s + batch_size], x, x_sq)
    # the k-th smallest including the row itself (distance 0) = the k-th nearest other row
    radii[s:s + batch_size] = np.partition(d, k, axis=1)[:, k]
  return np.sqrt(radii)


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                     batch_size: int) -> float:
  c_sq = np.einsum("ij,ij->i", centres, centres)
  r_sq = radii ** 2
  inside = 0
  for s in range(0, queries.shape[0], batch_size):
    d = _sq_dists(queries[s:s + batch_size], centres, c_sq)
    inside += int(np.any(d <= r_sq[None, :], axis=1).sum())
  return inside / queries.shape[0]


def precision_recall(real_features, fake_features, k: int = 3,
                     batch_size: int = 1024) -> Dict[str, float]:
  """Improved precision and recall -> {"precision": p, "recall": r} in [0, 1]."""
  real = _as_f64(real_features)
  fake = _as_f64(fake_features)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
  real_radii = knn_radii(real, k, batch_size)
  fake_radii = knn_radii(fake, k, batch_size)
  return {
      "precision": _fraction_inside(fake, real, real_radii, batch_size),
      "recall": _fraction_inside(real, fake, fake_radii, batch_size),
  }


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0,
                      gamma: Optional[float] = None) -> np.ndarray:
  """(gamma x·y + coef0)^degree with gamma = 1/D by default."""
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  return (gamma * (x @ y.T) + coef0) ** degree


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel_kw) -> float:
  m = x.shape[0]
  kxx = polynomial_kernel(x, x, **kernel_kw)
  kyy = polynomial_kernel(y, y, **kernel_kw)
  kxy = polynomial_kernel(x, y, **kernel_kw)
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(sxx + syy - 2.0 * kxy.sum() / (m * m))


def kid(real_features, fake_features, num_subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, coef0: float = 1.0, gamma: Optional[float] = None,
        seed: int = 0) -> Dict[str, float]:
  """Kernel Inception Distance (or KD in any features) -> {"mean": .., "std": ..} over subsets.

  Unbiased MMD² between random subsets (without replacement; the subset size is clipped to the
  smaller set), `num_subsets` times, with a seeded numpy Generator.
  """
  real = _as_f64(real_features)
  fake = _as_f64(fake_features)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dims differ: {real.shape[1]} vs {fake.shape[1]}")
  m = min(subset_size, real.shape[0], fake.shape[0])
  if m < 2:
    raise ValueError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  vals = np.empty((num_subsets,), np.float64)
  for i in range(num_subsets):
    x = real[rng.choice(real.shape[0], m, replace=False)]
    y = fake[rng.choice(fake.shape[0], m, replace=False)]
    vals[i] = _mmd2_unbiased(x, y, degree=degree, coef0=coef0, gamma=gamma)
  return {"mean": float(vals.mean()), "std": float(vals.std())}


__all__ = ("precision_recall", "knn_radii", "kid", "polynomial_kernel")
