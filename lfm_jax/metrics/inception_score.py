"""Inception Score from the FID InceptionV3's logits, computed as torch-fidelity computes it.

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   reported as (mean, std) over `splits` splits.

Logits: `InceptionV3(with_logits=True)`'s "logits_unbiased" (pool3 @ fc kernel, no bias, 1008
classes; weights from `converters.inception.load_inception_with_logits`). That is the feature
torch-fidelity's IS reads from the same FID Inception (its `isc` metric's "logits_unbiased").

Protocol (torch-fidelity's `isc_features_to_metric` with its defaults, pinned by the tests):
  * the N rows are permuted with `np.random.RandomState(2020).permutation(N)` (`shuffle`, `seed`);
  * split i holds the permuted positions [i N // splits, (i + 1) N // splits);
  * softmax and log-softmax in float64; per split exp(mean_x sum_c p (log p - log q)) with q the
    split's mean of p; `std` is np.std over splits (population, ddof 0).

Streaming (`InceptionScoreStats`): per split the mean KL is (1/n) sum_x sum_c p log p -
sum_c q log q with q = (1/n) sum_x p, so a split needs only n, sum_x p (classes,) and
sum_x sum_c p log p, in float64. Samples arrive in any order, batch by batch, on any host, each
with its global index in [0, num_samples); the index decides the split exactly as the
permutation above would, so batches, shards and hosts combine exactly (`merge`,
`allgather_inception_stats`). Memory: splits x classes float64 sums (80 kB at 10 x 1008) plus
the N-entry index permutation and an N-entry "seen" mask; no per-sample probabilities are kept.
"""

from typing import Tuple

import numpy as np

DEFAULT_SPLITS = 10
DEFAULT_SEED = 2020  # torch-fidelity's rng_seed, used by its samples_shuffle
NUM_CLASSES = 1008


def _log_softmax64(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected logits of shape (N, classes), got {x.shape}")
  m = x.max(axis=1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _plogp(p: np.ndarray, log_p: np.ndarray) -> np.ndarray:
  """p log p with 0 log 0 = 0."""
  return np.where(p > 0, p * log_p, 0.0)


def _check_splits(num_samples: int, splits: int) -> None:
  if int(splits) < 1:
    raise ValueError(f"inception score: splits must be >= 1, got {splits}")
  if num_samples < splits:
    raise ValueError(f"inception score: {num_samples} samples cannot fill {splits} splits "
                     "(need at least one sample per split)")


def inception_score(logits, splits: int = DEFAULT_SPLITS, *, shuffle: bool = True,
                    seed: int = DEFAULT_SEED) -> Tuple[float, float]:
  """Inception Score (mean, std) of (N, classes) logits, float64 maths (torch-fidelity's IS).

  Args:
    logits: (N, classes) array (numpy or a fully addressable jax array), e.g. "logits_unbiased"
      of `InceptionV3(with_logits=True)`.
    splits: number of equal splits (torch-fidelity's isc_splits, 10).
    shuffle, seed: permute the rows with np.random.RandomState(seed) first, as torch-fidelity's
      samples_shuffle / rng_seed (True / 2020) do.
  Returns:
    (mean, std) Python floats.
  """
  log_p = _log_softmax64(logits)
  n = log_p.shape[0]
  _check_splits(n, splits)
  if shuffle:
    log_p = log_p[np.random.RandomState(seed).permutation(n)]
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    p_s, log_p_s = p[lo:hi], log_p[lo:hi]
    q = p_s.mean(axis=0, keepdims=True)
    log_q = np.log(np.where(q > 0, q, 1.0))
    kl = np.where(p_s > 0, p_s * (log_p_s - log_q), 0.0).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreStats:
  """Exact streaming Inception Score over a known number of samples (see the module docstring).

    stats = InceptionScoreStats(num_samples=N)
    for logits, indices in batches:     # (B, classes) and (B,) global sample indices
      stats.add(logits, indices)
    mean, std = stats.result()          # == inception_score(all logits in index order)
  """

  def __init__(self, num_samples: int, splits: int = DEFAULT_SPLITS, *, shuffle: bool = True,
               seed: int = DEFAULT_SEED, num_classes: int = NUM_CLASSES):
    self.num_samples = int(num_samples)
    self.splits = int(splits)
    self.shuffle = bool(shuffle)
    self.seed = int(seed)
    self.num_classes = int(num_classes)
    _check_splits(self.num_samples, self.splits)
    # Split of each sample index: sample `perm[j]` sits at position j of torch-fidelity's order.
    position = np.arange(self.num_samples)
    if self.shuffle:
      perm = np.random.RandomState(self.seed).permutation(self.num_samples)
      position = np.empty_like(perm)
      position[perm] = np.arange(self.num_samples)
    starts = np.arange(self.splits) * self.num_samples // self.splits
    self._split_of = (np.searchsorted(starts, position, side="right") - 1).astype(np.int32)
    self.count = np.zeros((self.splits,), np.int64)
    self.sum_p = np.zeros((self.splits, self.num_classes), np.float64)
    self.sum_plogp = np.zeros((self.splits,), np.float64)
    self.seen = np.zeros((self.num_samples,), bool)

  def _check_compatible(self, other: "InceptionScoreStats") -> None:
    mine = (self.num_samples, self.splits, self.shuffle, self.seed, self.num_classes)
    theirs = (other.num_samples, other.splits, other.shuffle, other.seed, other.num_classes)
    if mine != theirs:
      raise ValueError(f"cannot merge inception-score stats {theirs} into {mine} "
                       "(num_samples, splits, shuffle, seed, num_classes)")

  def add(self, logits, indices) -> "InceptionScoreStats":
    """Adds a batch: logits (B, classes) and their distinct global indices (B,). Returns self."""
    log_p = _log_softmax64(logits)
    idx = np.asarray(indices, np.int64).reshape(-1)
    if log_p.shape != (idx.shape[0], self.num_classes):
      raise ValueError(f"expected logits of shape ({idx.shape[0]}, {self.num_classes}) for "
                       f"{idx.shape[0]} indices, got {log_p.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
      raise ValueError(f"sample indices must lie in [0, {self.num_samples}), got "
                       f"[{idx.min()}, {idx.max()}]")
    if len(np.unique(idx)) != idx.size or self.seen[idx].any():
      raise ValueError("inception score: a sample index was added twice")
    p = np.exp(log_p)
    split = self._split_of[idx]
    self.count += np.bincount(split, minlength=self.splits)
    np.add.at(self.sum_p, split, p)
    np.add.at(self.sum_plogp, split, _plogp(p, log_p).sum(axis=1))
    self.seen[idx] = True
    return self

  def merge(self, other: "InceptionScoreStats") -> "InceptionScoreStats":
    """Adds another shard's sums into this one (disjoint sample indices). Returns self."""
    self._check_compatible(other)
    if (self.seen & other.seen).any():
      raise ValueError("inception score: the merged stats share sample indices")
    self.count += other.count
    self.sum_p += other.sum_p
    self.sum_plogp += other.sum_plogp
    self.seen |= other.seen
    return self

  def copy(self) -> "InceptionScoreStats":
    out = InceptionScoreStats(self.num_samples, self.splits, shuffle=self.shuffle, seed=self.seed,
                              num_classes=self.num_classes)
    return out.merge(self)

  @property
  def num_added(self) -> int:
    return int(self.seen.sum())

  def split_scores(self) -> np.ndarray:
    """The per-split scores exp(mean KL), (splits,) float64; needs every sample added."""
    if self.num_added != self.num_samples:
      raise ValueError(f"inception score: {self.num_added} of {self.num_samples} samples added")
    q = self.sum_p / self.count[:, None]
    log_q = np.log(np.where(q > 0, q, 1.0))
    mean_kl = self.sum_plogp / self.count - _plogp(q, log_q).sum(axis=1)
    return np.exp(mean_kl)

  def result(self) -> Tuple[float, float]:
    """(mean, std) over the splits, as `inception_score`."""
    s = self.split_scores()
    return float(np.mean(s)), float(np.std(s))


def allgather_inception_stats(stats: InceptionScoreStats,
                              always_gather: bool = False) -> InceptionScoreStats:
  """Exact pooled stats over all JAX processes (every process gets the same result).

  Each process passes its local stats (disjoint sample indices); the sums travel bit-cast to
  uint32 through `multihost_utils.process_allgather`, so nothing is rounded. With one process
  this returns a copy (unless `always_gather`, used by tests). A collective: every process calls it.
  """
  import jax
  from jax.experimental import multihost_utils

  if jax.process_count() == 1 and not always_gather:
    return stats.copy()

  def bits(a):
    return np.ascontiguousarray(a, np.float64).view(np.uint32)

  local = {"count": bits(stats.count.astype(np.float64)), "sum_p": bits(stats.sum_p),
           "sum_plogp": bits(stats.sum_plogp), "seen": stats.seen.astype(np.uint8)}
  gathered = jax.tree_util.tree_map(np.asarray,
                                    multihost_utils.process_allgather(local, tiled=False))
  out = InceptionScoreStats(stats.num_samples, stats.splits, shuffle=stats.shuffle,
                            seed=stats.seed, num_classes=stats.num_classes)
  for i in range(gathered["seen"].shape[0]):  # leading axis: process index
    seen = gathered["seen"][i].astype(bool)
    if (out.seen & seen).any():
      raise ValueError("inception score: processes share sample indices")
    out.seen |= seen
    out.count += np.ascontiguousarray(gathered["count"][i]).view(np.float64).astype(np.int64)
    out.sum_p += np.ascontiguousarray(gathered["sum_p"][i]).view(np.float64)
    out.sum_plogp += np.ascontiguousarray(gathered["sum_plogp"][i]).view(np.float64)
  return out


__all__ = ("inception_score", "InceptionScoreStats", "allgather_inception_stats",
           "DEFAULT_SPLITS", "DEFAULT_SEED", "NUM_CLASSES")
