"""Fréchet distance between feature Gaussians, with exact streaming / multi-host statistics.

Statistics are accumulated as sums (n, Σx, Σxxᵀ) in float64 on the host (`FeatureStats`), so
shards, batches and hosts combine *exactly* (`merge`, `allgather_stats`): per-host means or
covariances are never averaged. `cov()` is the unbiased (n - 1) covariance, as pytorch-fid's
`np.cov(rowvar=False)`.

"FID" means the Fréchet distance in the FID InceptionV3 pool3 features (models/inception.py).
With any other feature extractor call the number by its extractor's name ("fd_<name>").

The .npz format (`save_stats` / `load_stats`) is pytorch-fid's and LFM's: keys `mu`, `sigma`.
"""

from typing import Optional, Tuple

import numpy as np

from lfm_jax import storage


class FeatureStats:
  """Running sums of feature vectors: n, Σx (D,), Σxxᵀ (D, D), all float64 on the host."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.n = 0
    self.sum = np.zeros((self.dim,), np.float64)
    self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features) -> "FeatureStats":
    """Adds a (B, D) batch (any array type; converted to float64 on the host). Returns self."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"expected features of shape (B, {self.dim}), got {x.shape}")
    self.n += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another shard's sums into this one (exact pooling). Returns self."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge stats of dim {other.dim} into dim {self.dim}")
    self.n += other.n
    self.sum += other.sum
    self.sum_outer += other.sum_outer
    return self

  def copy(self) -> "FeatureStats":
    out = FeatureStats(self.dim)
    out.merge(self)
    return out

  def mean(self) -> np.ndarray:
    if self.n < 1:
      raise ValueError("no features accumulated")
    return self.sum / self.n

  def cov(self) -> np.ndarray:
    """Unbiased covariance (divides by n - 1), symmetric."""
    if self.n < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
    mu = self.mean()
    c = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return 0.5 * (c + c.T)

  def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
    return self.mean(), self.cov()

  @classmethod
  def from_features(cls, features) -> "FeatureStats":
    x = np.asarray(features)
    return cls(x.shape[1]).add(x)


def _f64_to_u32(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a, dtype=np.float64).view(np.uint32)


def _u32_to_f64(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a, dtype=np.uint32).view(np.float64)


def allgather_stats(stats: FeatureStats, always_gather: bool = False) -> FeatureStats:
  """Exact pooled statistics over all JAX processes (every process gets the same result).

  Each process passes its local `FeatureStats`; the sums are gathered with
  `jax.experimental.multihost_utils.process_allgather` and added. The float64 values are
  bit-cast to uint32 for the transfer, so nothing is rounded even with jax_enable_x64 off.
  With one process this returns a copy of `stats` (unless `always_gather`, used by tests).
  Must be called by every process (it is a collective).
  """
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1 and not always_gather:
    return stats.copy()
  local = {
      "n": _f64_to_u32(np.array([stats.n], np.float64)),  # exact for n < 2**53
      "sum": _f64_to_u32(stats.sum),
      "sum_outer": _f64_to_u32(stats.sum_outer),
  }
  gathered = jax.tree_util.tree_map(np.asarray,
                                    multihost_utils.process_allgather(local, tiled=False))
  out = FeatureStats(stats.dim)
  for i in range(gathered["n"].shape[0]):  # leading axis: process index
    out.n += int(_u32_to_f64(gathered["n"][i])[0])
    out.sum += _u32_to_f64(gathered["sum"][i])
    out.sum_outer += _u32_to_f64(gathered["sum_outer"][i])
  return out


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(0.5 * (a + a.T))
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "eigh",
                       eps: float = 1e-6) -> float:
  """tr(sqrt(Σ1 Σ2)) for symmetric PSD Σ1, Σ2.

  method "eigh" (default): tr sqrt(Σ1 Σ2) = Σ_i sqrt(λ_i(A)) with A = sqrt(Σ1) Σ2 sqrt(Σ1), which
  is symmetric PSD and shares its eigenvalues with Σ1 Σ2: real, stable, no eps needed.
  method "sqrtm": pytorch-fid's scipy.linalg.sqrtm(Σ1 Σ2), retried with eps·I added to both
  covariances when the result is not finite; an imaginary part above 1e-3 raises.
  """
  if method == "eigh":
    s1 = _sqrtm_psd(sigma1)
    a = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh(0.5 * (a + a.T))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())
  if method == "sqrtm":
    import scipy.linalg

    def sqrtm(m):
      r = scipy.linalg.sqrtm(m)
      return r[0] if isinstance(r, tuple) else r

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"sqrtm: imaginary component {np.max(np.abs(covmean.imag))}")
      covmean = covmean.real
    return float(np.trace(covmean))
  raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh", eps: float = 1e-6) -> float:
  """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = ||mu1 - mu2||² + tr(Σ1) + tr(Σ2) - 2 tr(sqrt(Σ1 Σ2)), in float64.
  See `trace_sqrt_product` for `method` ("eigh" default, "sqrtm" = pytorch-fid's procedure).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean shapes differ: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariance shapes {sigma1.shape}, {sigma2.shape} do not match {mu1.shape}")
  diff = mu1 - mu2
  tr_covmean = trace_sqrt_product(sigma1, sigma2, method=method, eps=eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats, **kw) -> float:
  return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov(), **kw)


def save_stats(path: str, mu, sigma, **extra) -> None:
  """Writes pytorch-fid / LFM-format statistics: an .npz with `mu` (D,) and `sigma` (D, D).

  `extra` arrays (e.g. n=...) are stored beside them; readers of the format ignore them.
  """
  storage.write_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                    **extra)


def load_stats(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """Reads an .npz with keys `mu` and `sigma` (pytorch-fid's format) -> (mu, sigma) float64."""
  f = storage.load_npz(path)
  missing = [k for k in ("mu", "sigma") if k not in f]
  if missing:
    raise KeyError(f"{path}: statistics file lacks {missing} (has {sorted(f)})")
  return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)


def save_feature_stats(path: str, stats: FeatureStats) -> None:
  """Saves mu/sigma (the standard format) plus the raw sums, so the file can be merged later."""
  save_stats(path, stats.mean(), stats.cov(), n=np.int64(stats.n), sum=stats.sum,
             sum_outer=stats.sum_outer)


def load_feature_stats(path: str) -> Optional[FeatureStats]:
  """Restores the sums written by `save_feature_stats`; None for a plain mu/sigma file."""
  f = storage.load_npz(path)
  if not all(k in f for k in ("n", "sum", "sum_outer")):
    return None
  s = FeatureStats(f["sum"].shape[0])
  s.n = int(f["n"])
  s.sum = np.asarray(f["sum"], np.float64).copy()
  s.sum_outer = np.asarray(f["sum_outer"], np.float64).copy()
  return s


__all__ = ("FeatureStats", "allgather_stats", "frechet_distance", "frechet_distance_from_stats",
           "trace_sqrt_product", "save_stats", "load_stats", "save_feature_stats",
           "load_feature_stats")
