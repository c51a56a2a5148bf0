"""Sample scoring and subset selection (paper 2, "data-efficient training"; `score` mode).

Three scoring criteria, three baselines, a scores file, and the selection rules that turn scores
into the ids of the examples to keep.

Criteria (higher score = "harder" / more atypical):
  * loss      `loss_scores`: flow-matching loss of a (small, trained) velocity model at
              `num_times` fixed interior times with a SHARED bank of `num_noises` fixed noises.
  * gradient  `gradient_scores`: the same protocol with the squared norm of the per-sample
              parameter gradient of that loss, computed in chunks of examples so that memory
              is bounded by chunk x params (config `score.gradient_chunk_size`).
  * cluster   `cluster_scores`: spherical k-means on L2-normalised embeddings; the score is the
              cosine distance 1 - <x, c> to the assigned centre (the assignments are returned).
Baselines: `random_scores`, `kcenter_order` / `kcenter_scores` (greedy farthest-point coreset),
`herding_order` / `herding_scores` (greedy kernel herding). The baselines' scores are priorities
derived from the greedy order (first picked = highest), so keeping the highest-scoring examples
keeps exactly the greedy prefix.

Protocol choices for the loss and gradient scores (documented here, pinned by the tests):
  * Times: t_k = k / (num_times + 1), k = 1..num_times (interior points of an even grid, the
    official code's `linspace(0, 1, T + 2)[1:-1]`), LFM convention (t = 0 data, t = 1 noise).
  * Noise bank: `noise_bank(seed, num_noises, shape)`, shape (num_noises, h, w, c), drawn once from
    `seed`; every example sees the same noises.
  * Per time k the raw value (loss, or squared gradient norm) is averaged over the noise bank, then
    divided by that time's mean over the WHOLE data set (an exact mean, computed from the stored
    (N, num_times) matrix after the single pass over the data). The official code normalises by a
    streaming EMA (alpha 0.9) of earlier examples, which makes a score depend on data order and on
    the number of hosts; the exact mean does not. The score is the mean over times of the
    normalised values (so the data-set mean score is 1).
  * Batches are padded to a fixed size (one compile) and run under plain `jax.jit`; pass a
    `sharding` (e.g. NamedSharding(mesh, P("data"))) to shard each batch across devices.

Selection (`select_subset`): ratio = fraction REMOVED, keep count = round(N * (1 - ratio)) exactly.
Every tie is broken by id (smaller id first), and every random choice is a function of the seed and
of the SET of ids, so results do not depend on input order, host or run.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import flow
from lfm_jax import storage

# velocity_fn(params, t (B,), z (B, h, w, c), y (B,) or None) -> v (B, h, w, c)
VelocityFn = Callable[[Any, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]

CRITERIA = ("loss", "gradient", "cluster", "random", "kcenter", "herding")
RULES = ("highest", "lowest", "random", "proportional", "proportional_nearest",
         "proportional_furthest", "balanced", "balanced_nearest", "balanced_furthest", "kcenter",
         "herding")
_EPS = 1e-12
# Examples whose per-example gradients are held at once by `gradient_scores` (config
# score.gradient_chunk_size).
DEFAULT_GRADIENT_CHUNK_SIZE = 8


# ---------------------------------------------------------------------------------------------
# Loss and gradient scores.
# ---------------------------------------------------------------------------------------------

def time_grid(num_times: int) -> np.ndarray:
  """The fixed scoring times t_k = k / (num_times + 1), k = 1..num_times (float32)."""
  if num_times < 1:
    raise ValueError(f"num_times must be >= 1, got {num_times}")
  return (np.arange(1, num_times + 1, dtype=np.float64) / (num_times + 1)).astype(np.float32)


def noise_bank(seed: int, num_noises: int, shape: Sequence[int]) -> jax.Array:
  """The shared noise bank, (num_noises, *shape) standard normal, drawn once from `seed`."""
  if num_noises < 1:
    raise ValueError(f"num_noises must be >= 1, got {num_noises}")
  return jax.random.normal(jax.random.PRNGKey(seed), (num_noises, *shape), jnp.float32)


def module_velocity_fn(module, **apply_kwargs) -> VelocityFn:
  """Adapts a velocity module (lfm_jax UNet / DiT call convention) to velocity_fn(params, t, z, y).

  `apply_kwargs` are passed to `module.apply` (e.g. cond=...); train=False is always used.
  """

  def velocity_fn(params, t, z, y):
    return module.apply({"params": params}, z, t, y=y, train=False, **apply_kwargs)

  return velocity_fn


def _combos(times: np.ndarray, num_noises: int) -> tuple[jax.Array, jax.Array]:
  """Flattened (time, noise index) grid: arrays of length T * M, time-major."""
  t = np.repeat(times, num_noises).astype(np.float32)
  m = np.tile(np.arange(num_noises, dtype=np.int32), len(times))
  return jnp.asarray(t), jnp.asarray(m)


def _make_loss_batch_fn(velocity_fn: VelocityFn, num_times: int, num_noises: int,
                        sigma_min: float) -> Callable:
  """(params, z (B,...), y or None, bank, ts, ms) -> (B, T) raw losses averaged over noises."""

  def fn(params, z, y, bank, ts, ms):
    def one(tm):
      t, m = tm
      eps = jnp.broadcast_to(bank[m], z.shape)
      z_t = flow.interpolate(z, eps, t, sigma_min)
      u = flow.target_velocity(z, eps, sigma_min)
      tb = jnp.full((z.shape[0],), t, z.dtype)
      return flow.per_sample_loss(velocity_fn(params, tb, z_t, y), u)

    losses = jax.lax.map(one, (ts, ms))  # (T * M, B)
    losses = losses.reshape(num_times, num_noises, z.shape[0]).mean(axis=1)
    return losses.T

  return fn


def chunk_layout(batch_size: int, chunk_size: Optional[int]) -> tuple[int, int]:
  """(num_chunks, chunk) for per-example gradients of a batch in chunks of at most chunk_size.

  num_chunks = ceil(batch_size / chunk_size) and chunk = ceil(batch_size / num_chunks), so the
  padding (num_chunks * chunk - batch_size < num_chunks rows) is as small as it can be.
  chunk_size None (or >= batch_size) is one chunk of the whole batch.
  """
  if chunk_size is None or int(chunk_size) >= batch_size:
    return 1, batch_size
  if int(chunk_size) < 1:
    raise ValueError(f"score.gradient_chunk_size must be >= 1, got {chunk_size}")
  num_chunks = -(-batch_size // int(chunk_size))
  return num_chunks, -(-batch_size // num_chunks)


def _make_grad_batch_fn(velocity_fn: VelocityFn, num_times: int, num_noises: int,
                        sigma_min: float, chunk_size: Optional[int] = None) -> Callable:
  """(params, z, y, bank, ts, ms) -> (B, T) squared per-sample gradient norms, noise-averaged.

  Per-example gradients are a jax.vmap of jax.grad over a chunk of the batch, and the chunks run
  one after another under jax.lax.map, so at most chunk x params gradient values are live at
  once (the whole batch when chunk_size is None). Chunk j holds rows i * num_chunks + j: a batch
  sharded on its leading axis stays sharded along each chunk (make the chunk a multiple of the
  device count to split it evenly).
  """

  def sample_loss(params, z1, y1, eps1, t):
    # One example as a batch of one: z1 (...), y1 () or None.
    z = z1[None]
    eps = eps1[None]
    y = None if y1 is None else y1[None]
    z_t = flow.interpolate(z, eps, t, sigma_min)
    u = flow.target_velocity(z, eps, sigma_min)
    v = velocity_fn(params, jnp.full((1,), t, z.dtype), z_t, y)
    return flow.per_sample_loss(v, u)[0]

  grad_fn = jax.grad(sample_loss)

  def sq_norm(tree):
    return sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree))

  def fn(params, z, y, bank, ts, ms):
    b = z.shape[0]
    num_chunks, chunk = chunk_layout(b, chunk_size)
    pad = num_chunks * chunk - b
    y_axis = None if y is None else 0

    def per_example(eps, t, zz, yy):
      return jax.vmap(lambda z1, y1: sq_norm(grad_fn(params, z1, y1, eps, t)),
                      in_axes=(0, y_axis))(zz, yy)

    if num_chunks == 1:
      def one(tm):
        t, m = tm
        return per_example(bank[m], t, z, y)
    else:
      def to_chunks(a):  # (B, ...) -> (num_chunks, chunk, ...), chunk j = rows i * num_chunks + j
        if pad:
          a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
        return a.reshape((chunk, num_chunks) + a.shape[1:]).swapaxes(0, 1)

      zc = to_chunks(z)
      yc = None if y is None else to_chunks(y)

      def one(tm):
        t, m = tm
        eps = bank[m]
        per = jax.lax.map(lambda zy: per_example(eps, t, *zy), (zc, yc))  # (num_chunks, chunk)
        return per.swapaxes(0, 1).reshape(-1)[:b]

    g2 = jax.lax.map(one, (ts, ms))  # (T * M, B)
    g2 = g2.reshape(num_times, num_noises, b).mean(axis=1)
    return g2.T

  return fn


def _replicated_like(sharding):
  """A fully replicated NamedSharding on the devices of `sharding` (None stays None)."""
  if sharding is None:
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is None:
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    mesh = jax.sharding.Mesh(devices, ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _run_batched(batch_fn: Callable, params, latents, labels, *, num_times: int, num_noises: int,
                 batch_size: int, seed: int, sharding=None) -> np.ndarray:
  """Runs a jitted (B, T) batch function over the data set; returns the (N, T) float64 matrix."""
  latents = np.asarray(latents, np.float32)
  n = latents.shape[0]
  if n == 0:
    return np.zeros((0, num_times))
  labels = None if labels is None else np.asarray(labels, np.int32)
  if labels is not None and labels.shape[0] != n:
    raise ValueError(f"labels has {labels.shape[0]} entries, latents {n}")
  if sharding is not None:
    ndev = len(sharding.device_set)
    batch_size = -(-batch_size // ndev) * ndev  # divisible by the device count
  batch_size = max(1, min(batch_size, n if sharding is None else batch_size))
  bank = noise_bank(seed, num_noises, latents.shape[1:])
  ts, ms = _combos(time_grid(num_times), num_noises)
  rep = _replicated_like(sharding)
  if rep is not None:
    params, bank, ts, ms = jax.device_put((params, bank, ts, ms), rep)
  jitted = jax.jit(batch_fn)
  out = np.zeros((n, num_times), np.float64)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)
    z = latents[start:stop]
    y = None if labels is None else labels[start:stop]
    if pad:
      z = np.concatenate([z, np.zeros((pad,) + z.shape[1:], z.dtype)])
      if y is not None:
        y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    if sharding is not None:
      z = jax.device_put(z, sharding)
      if y is not None:
        y = jax.device_put(y, sharding)
    vals = jitted(params, z, y, bank, ts, ms)
    out[start:stop] = np.asarray(jax.device_get(vals), np.float64)[: stop - start]
  return out


def normalize_per_time(raw: np.ndarray) -> np.ndarray:
  """Scores from an (N, T) matrix: each column divided by its data-set mean, then mean over T."""
  raw = np.asarray(raw, np.float64)
  means = raw.mean(axis=0, keepdims=True)
  return (raw / (means + _EPS)).mean(axis=1)


def loss_scores(velocity_fn: VelocityFn, params, latents, labels=None, *, num_times: int = 10,
                num_noises: int = 2, batch_size: int = 256, seed: int = 0,
                sigma_min: float = flow.SIGMA_MIN, sharding=None,
                return_raw: bool = False):
  """Loss ("hardness") score of every example; see the module docstring for the protocol.

  Args:
    velocity_fn: velocity_fn(params, t (B,), z (B, h, w, c), y (B,) or None) -> v; a Flax module
      can be adapted with `module_velocity_fn`.
    params: the model parameters (any pytree).
    latents: (N, h, w, c) data latents z0 (already scaled).
    labels: (N,) int labels or None (unconditional).
    num_times, num_noises: the time grid and the size of the shared noise bank.
    batch_size: examples per jitted call (the last batch is padded).
    seed: seeds the noise bank.
    sharding: optional sharding for a batch (leading axis), e.g. NamedSharding(mesh, P("data"));
      params and the bank are replicated on its devices.
    return_raw: also return the raw (N, num_times) noise-averaged losses.
  Returns:
    scores (N,) float64 (data-set mean 1), or (scores, raw) with return_raw.
  """
  fn = _make_loss_batch_fn(velocity_fn, num_times, num_noises, sigma_min)
  raw = _run_batched(fn, params, latents, labels, num_times=num_times, num_noises=num_noises,
                     batch_size=batch_size, seed=seed, sharding=sharding)
  scores = normalize_per_time(raw)
  return (scores, raw) if return_raw else scores


def gradient_scores(velocity_fn: VelocityFn, params, latents, labels=None, *,
                    num_times: int = 10, num_noises: int = 2, batch_size: int = 64, seed: int = 0,
                    sigma_min: float = flow.SIGMA_MIN, sharding=None, return_raw: bool = False,
                    chunk_size: Optional[int] = DEFAULT_GRADIENT_CHUNK_SIZE):
  """Gradient score: as `loss_scores`, with ||d loss_i / d params||^2 per example.

  Per-example gradients are jax.vmap of jax.grad over chunks of `chunk_size` examples (config
  `score.gradient_chunk_size`), run one chunk after another, so the gradient memory is about
  chunk_size x params x 4 bytes (e.g. 8 x 33M-parameter DiT-S/2 ~ 1 GB) whatever batch_size is;
  None vmaps the whole batch at once. The chunking changes no number beyond float rounding. The
  velocity function sees each example as a batch of one.
  """
  fn = _make_grad_batch_fn(velocity_fn, num_times, num_noises, sigma_min, chunk_size)
  raw = _run_batched(fn, params, latents, labels, num_times=num_times, num_noises=num_noises,
                     batch_size=batch_size, seed=seed, sharding=sharding)
  scores = normalize_per_time(raw)
  return (scores, raw) if return_raw else scores


# ---------------------------------------------------------------------------------------------
# Cluster score.
# ---------------------------------------------------------------------------------------------

def l2_normalize(x, eps: float = _EPS) -> np.ndarray:
  """Rows of x (N, ...) flattened and scaled to unit L2 norm (float32)."""
  x = np.asarray(x, np.float32).reshape(np.shape(x)[0], -1)
  norm = np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=1, keepdims=True))
  return (x / np.maximum(norm, eps)).astype(np.float32)


def _argsort_ids(ids) -> np.ndarray:
  ids = np.asarray(ids, np.int64)
  if len(np.unique(ids)) != len(ids):
    raise ValueError("ids must be unique")
  return np.argsort(ids, kind="stable")


def _cosine_sims(x: np.ndarray, c: np.ndarray, block: int = 65536) -> np.ndarray:
  """(N, K) cosine similarities of unit rows, in blocks."""
  out = np.empty((x.shape[0], c.shape[0]), np.float32)
  for s in range(0, x.shape[0], block):
    out[s:s + block] = x[s:s + block] @ c.T
  return out


def _kmeanspp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ on the cosine distance 1 - <x, c> (D^2 weighting), deterministic given rng."""
  n = x.shape[0]
  first = int(rng.integers(n))
  centers = [x[first]]
  dist = np.maximum(1.0 - x @ x[first], 0.0).astype(np.float64)
  for _ in range(1, k):
    w = np.square(dist)
    total = w.sum()
    if total <= 0:  # fewer distinct points than k: take the lowest index not yet a centre
      idx = int(np.argmax(dist >= 0))
    else:
      idx = int(np.searchsorted(np.cumsum(w), rng.random() * total, side="right"))
      idx = min(idx, n - 1)
    centers.append(x[idx])
    dist = np.minimum(dist, np.maximum(1.0 - x @ x[idx], 0.0))
  return np.stack(centers).astype(np.float32)


def spherical_kmeans(embeddings, num_clusters: int, *, seed: int = 0, max_iters: int = 100,
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Spherical k-means on L2-normalised embeddings (rows are used in the order given).

  Init: k-means++ with the cosine distance, from np.random.default_rng(seed). Then Lloyd
  iterations (assign to the most similar centre, ties to the lowest centre index; centre =
  normalised mean of its members) until the assignments stop changing or max_iters. An empty
  cluster is re-seeded with the point currently farthest from its centre.
  Returns (centers (K, D) unit rows, assignments (N,) int32).
  """
  x = l2_normalize(embeddings)
  n = x.shape[0]
  k = int(num_clusters)
  if not 1 <= k <= n:
    raise ValueError(f"num_clusters must be in [1, {n}], got {k}")
  rng = np.random.default_rng(seed)
  centers = _kmeanspp_init(x, k, rng)
  assign = None
  for _ in range(max_iters):
    sims = _cosine_sims(x, centers)
    new = np.argmax(sims, axis=1).astype(np.int32)
    counts = np.bincount(new, minlength=k)
    for c in np.flatnonzero(counts == 0):  # re-seed empty clusters deterministically
      own = sims[np.arange(n), new]
      far = int(np.argmin(own))
      new[far] = c
      sims[far, :] = -np.inf
      sims[far, c] = 1.0
      counts = np.bincount(new, minlength=k)
    sums = np.zeros_like(centers, dtype=np.float64)
    np.add.at(sums, new, x)
    centers = l2_normalize(sums)
    if assign is not None and np.array_equal(new, assign):
      break
    assign = new
  # Final assignment against the final centres.
  assign = np.argmax(_cosine_sims(x, centers), axis=1).astype(np.int32)
  return centers, assign


def cluster_scores(embeddings, *, num_clusters: int, seed: int = 0, max_iters: int = 100,
                   ids=None) -> tuple[np.ndarray, np.ndarray]:
  """Cluster score: cosine distance of each normalised embedding to its spherical-k-means centre.

  Args:
    embeddings: (N, ...) features (flattened, L2-normalised here).
    num_clusters: k.
    seed: k-means++ seed.
    ids: optional (N,) example ids; if given, k-means runs on the rows sorted by id so the result
      does not depend on input order (returned arrays are in the input order either way).
  Returns:
    (scores (N,) float64 in [0, 2], assignments (N,) int32).
  """
  emb = np.asarray(embeddings)
  order = np.arange(emb.shape[0]) if ids is None else _argsort_ids(ids)
  x = l2_normalize(emb[order])
  centers, assign = spherical_kmeans(x, num_clusters, seed=seed, max_iters=max_iters)
  # Row-wise (not matmul) so that identical embeddings get bit-identical scores.
  scores_sorted = 1.0 - np.sum(x.astype(np.float64) * centers[assign].astype(np.float64), axis=1)
  scores = np.empty_like(scores_sorted)
  clusters = np.empty_like(assign)
  scores[order] = scores_sorted
  clusters[order] = assign
  return scores, clusters


# ---------------------------------------------------------------------------------------------
# Baselines.
# ---------------------------------------------------------------------------------------------

def random_scores(ids, seed: int = 0) -> np.ndarray:
  """Uniform [0, 1) scores, a function of the seed and the id set (not of input order)."""
  order = _argsort_ids(ids)
  vals = np.random.default_rng(seed).random(len(order))
  out = np.empty(len(order))
  out[order] = vals
  return out


def _order_to_scores(order: np.ndarray, n: int) -> np.ndarray:
  """Priority scores from a greedy order: the r-th pick gets (n - r) / n; unpicked get 0."""
  scores = np.zeros(n)
  scores[order] = (n - np.arange(len(order))) / n
  return scores


def kcenter_order(embeddings, *, seed: int = 0, num_select: Optional[int] = None,
                  normalize: bool = True) -> np.ndarray:
  """Greedy k-center (farthest-point) order: row indices, first pick first.

  The first point is drawn from np.random.default_rng(seed); each next point is the one farthest
  (Euclidean, on L2-normalised embeddings if normalize) from the points picked so far; ties go to
  the lowest row. O(num_select * N * D).
  """
  x = l2_normalize(embeddings) if normalize else np.asarray(embeddings, np.float32).reshape(
      np.shape(embeddings)[0], -1)
  n = x.shape[0]
  m = n if num_select is None else min(int(num_select), n)
  order = np.empty(m, np.int64)
  if m == 0:
    return order
  sq = np.sum(np.square(x, dtype=np.float64), axis=1)
  mind = np.full(n, np.inf)
  picked = np.zeros(n, bool)
  cur = int(np.random.default_rng(seed).integers(n))
  for r in range(m):
    order[r] = cur
    picked[cur] = True
    d = np.maximum(sq + sq[cur] - 2.0 * (x @ x[cur]).astype(np.float64), 0.0)
    mind = np.minimum(mind, d)
    if r + 1 < m:
      cand = np.where(picked, -1.0, mind)
      cur = int(np.argmax(cand))
  return order


def _median_bandwidth(x: np.ndarray, seed: int, max_points: int = 2048) -> float:
  """RBF bandwidth sigma with sigma^2 = median(||xi - xj||^2) / 2 on a seeded subsample."""
  n = x.shape[0]
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.permutation(n)[:max_points]) if n > max_points else np.arange(n)
  xs = x[idx].astype(np.float64)
  sq = np.sum(xs * xs, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * xs @ xs.T, 0.0)
  tri = d2[np.triu_indices(len(idx), 1)]
  med = float(np.median(tri)) if tri.size else 1.0
  return float(np.sqrt(max(med, _EPS) / 2.0))


def herding_order(embeddings, *, kernel: str = "rbf", bandwidth: Optional[float] = None,
                  seed: int = 0, num_select: Optional[int] = None, normalize: bool = True,
                  block: int = 4096) -> np.ndarray:
  """Greedy kernel herding order (Chen, Welling & Smola 2010): row indices, first pick first.

  Pick T+1 maximises  mean_j k(x, x_j) - 1/(T+1) * sum_{t<=T} k(x, x_t)  over unpicked points
  (ties to the lowest row), i.e. the subset's kernel mean embedding greedily tracks the data's.
  kernel: "rbf" (exp(-||x-y||^2 / (2 sigma^2)), sigma by the median heuristic on a subsample drawn
  with `seed` unless `bandwidth` is given) or "linear" (<x, y>). Exact kernel: O(N^2 D) for the
  mean term (computed in blocks) plus O(num_select * N * D).
  """
  x = l2_normalize(embeddings) if normalize else np.asarray(embeddings, np.float32).reshape(
      np.shape(embeddings)[0], -1)
  x = x.astype(np.float64)
  n = x.shape[0]
  m = n if num_select is None else min(int(num_select), n)
  sq = np.sum(x * x, axis=1)
  if kernel == "rbf":
    sigma = bandwidth if bandwidth is not None else _median_bandwidth(x, seed)
    gamma = 1.0 / (2.0 * sigma * sigma)

    def kcol(rows, j):
      return np.exp(-gamma * np.maximum(sq[rows] + sq[j] - 2.0 * x[rows] @ x[j], 0.0))

    mean_k = np.zeros(n)
    for s in range(0, n, block):
      d2 = np.maximum(sq[s:s + block, None] + sq[None, :] - 2.0 * x[s:s + block] @ x.T, 0.0)
      mean_k[s:s + block] = np.exp(-gamma * d2).mean(axis=1)
  elif kernel == "linear":
    def kcol(rows, j):
      return x[rows] @ x[j]

    mean_k = x @ x.mean(axis=0)
  else:
    raise ValueError(f"kernel must be 'rbf' or 'linear', got {kernel!r}")
  all_rows = np.arange(n)
  running = np.zeros(n)
  picked = np.zeros(n, bool)
  order = np.empty(m, np.int64)
  for r in range(m):
    obj = mean_k - running / (r + 1)
    obj[picked] = -np.inf
    j = int(np.argmax(obj))
    order[r] = j
    picked[j] = True
    running += kcol(all_rows, j)
  return order


def kcenter_scores(ids, embeddings, *, seed: int = 0, num_select: Optional[int] = None,
                   normalize: bool = True) -> np.ndarray:
  """Priority scores from `kcenter_order` on the rows sorted by id (input-order independent)."""
  order = _argsort_ids(ids)
  o = kcenter_order(np.asarray(embeddings)[order], seed=seed, num_select=num_select,
                    normalize=normalize)
  return _order_to_scores(order[o], len(order))


def herding_scores(ids, embeddings, *, kernel: str = "rbf", bandwidth: Optional[float] = None,
                   seed: int = 0, num_select: Optional[int] = None,
                   normalize: bool = True) -> np.ndarray:
  """Priority scores from `herding_order` on the rows sorted by id (input-order independent)."""
  order = _argsort_ids(ids)
  o = herding_order(np.asarray(embeddings)[order], kernel=kernel, bandwidth=bandwidth, seed=seed,
                    num_select=num_select, normalize=normalize)
  return _order_to_scores(order[o], len(order))


def compute_scores(criterion: str, ids, *, embeddings=None, latents=None, labels=None,
                   velocity_fn: Optional[VelocityFn] = None, params=None, num_clusters: int = 10,
                   num_times: int = 10, num_noises: int = 2, batch_size: int = 256,
                   seed: int = 0, sharding=None,
                   gradient_chunk_size: Optional[int] = DEFAULT_GRADIENT_CHUNK_SIZE,
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Dispatch on config.score.criterion. Returns (scores (N,), clusters (N,) or None).

  loss / gradient need velocity_fn, params, latents (labels optional); cluster / kcenter /
  herding need embeddings; random needs only ids. Rows may come in any order; latent-based scores
  are per example and so order independent too. gradient_chunk_size bounds the per-example
  gradients held at once by the gradient criterion (see `gradient_scores`).
  """
  ids = np.asarray(ids, np.int64)
  if criterion in ("loss", "gradient"):
    if velocity_fn is None or latents is None:
      raise ValueError(f"criterion {criterion!r} needs velocity_fn, params and latents")
    fn = loss_scores
    if criterion == "gradient":
      fn = functools.partial(gradient_scores, chunk_size=gradient_chunk_size)
    return fn(velocity_fn, params, latents, labels, num_times=num_times, num_noises=num_noises,
              batch_size=batch_size, seed=seed, sharding=sharding), None
  if criterion == "random":
    return random_scores(ids, seed), None
  if embeddings is None:
    raise ValueError(f"criterion {criterion!r} needs embeddings")
  if criterion == "cluster":
    return cluster_scores(embeddings, num_clusters=num_clusters, seed=seed, ids=ids)
  if criterion == "kcenter":
    return kcenter_scores(ids, embeddings, seed=seed), None
  if criterion == "herding":
    return herding_scores(ids, embeddings, seed=seed), None
  raise ValueError(f"score.criterion must be one of {CRITERIA}, got {criterion!r}")


# ---------------------------------------------------------------------------------------------
# Scores file.
# ---------------------------------------------------------------------------------------------

def save_scores(path, ids, scores, clusters=None, *, criterion: str = "",
                meta: Optional[Mapping[str, Any]] = None) -> None:
  """Writes an .npz keyed by example id: ids (int64, sorted ascending), scores (float64),
  clusters (int32, optional), criterion (str), meta (JSON string)."""
  ids = np.asarray(ids, np.int64)
  scores = np.asarray(scores, np.float64)
  if ids.ndim != 1 or scores.shape != ids.shape:
    raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be 1-D of equal length")
  order = _argsort_ids(ids)
  arrays = {"ids": ids[order], "scores": scores[order], "criterion": np.asarray(str(criterion)),
            "meta": np.asarray(json.dumps(dict(meta or {}), sort_keys=True, default=str))}
  if clusters is not None:
    clusters = np.asarray(clusters, np.int32)
    if clusters.shape != ids.shape:
      raise ValueError(f"clusters {clusters.shape} must match ids {ids.shape}")
    arrays["clusters"] = clusters[order]
  storage.write_npz(path, **arrays)


def load_scores(path) -> dict[str, Any]:
  """Reads a scores file: {"ids", "scores", "clusters" (or None), "criterion", "meta" (dict)}."""
  d = storage.load_npz(path)
  return {
      "ids": d["ids"].astype(np.int64),
      "scores": d["scores"].astype(np.float64),
      "clusters": d["clusters"].astype(np.int32) if "clusters" in d else None,
      "criterion": str(d["criterion"]) if "criterion" in d else "",
      "meta": json.loads(str(d["meta"])) if "meta" in d else {},
  }


# ---------------------------------------------------------------------------------------------
# Subset selection.
# ---------------------------------------------------------------------------------------------

def keep_count(n: int, ratio: float) -> int:
  """round(n * (1 - ratio)) (half to even, as Python's round), ratio = fraction removed."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio (fraction removed) must be in [0, 1], got {ratio}")
  return int(round(n * (1.0 - ratio)))


def _rank(ids: np.ndarray, scores: np.ndarray, highest: bool) -> np.ndarray:
  """Indices sorted by score (descending if highest), ties by ascending id."""
  key = -scores if highest else scores
  return np.lexsort((ids, key))


def _largest_remainder(sizes: np.ndarray, total: int) -> np.ndarray:
  """Integer quotas proportional to sizes summing to total (ties: larger remainder, then lower
  cluster index)."""
  n = sizes.sum()
  exact = sizes * (total / n) if n else np.zeros(len(sizes))
  base = np.minimum(np.floor(exact + 1e-9).astype(np.int64), sizes)
  rest = total - base.sum()
  rem = exact - base
  order = np.lexsort((np.arange(len(sizes)), -rem))
  for c in order:
    if rest <= 0:
      break
    if base[c] < sizes[c]:
      base[c] += 1
      rest -= 1
  return base


def _balanced_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
  """Equal quota per cluster; clusters smaller than their share keep all and the shortfall goes to
  the others (iterated, water-filling). Leftover units go to the largest clusters (ties: lower
  index). Quotas differ by at most 1 among clusters that are not kept whole."""
  k = len(sizes)
  quota = np.zeros(k, np.int64)
  active = [c for c in range(k) if sizes[c] > 0]
  remaining = total
  while active:
    share = remaining // len(active)
    small = [c for c in active if sizes[c] <= share]
    if not small:
      break
    for c in small:
      quota[c] = sizes[c]
      remaining -= sizes[c]
    active = [c for c in active if c not in small]
  if active:
    share, extra = divmod(remaining, len(active))
    for c in active:
      quota[c] = share
    for c in sorted(active, key=lambda c: (-sizes[c], c))[:extra]:
      quota[c] += 1
  return quota


def select_subset(ids, scores, *, rule: str, ratio: float, clusters=None,
                  seed: int = 0) -> np.ndarray:
  """Ids of the examples to keep (sorted ascending), exactly keep_count(N, ratio) of them.

  Rules:
    highest / lowest        the highest- / lowest-scoring examples.
    random                  a uniform random subset (a function of seed and the id set).
    proportional[_furthest] / proportional_nearest
                            each cluster keeps its share of the keep count (largest-remainder
                            rounding so the total is exact); inside a cluster the highest scores
                            (furthest from the centre, for cluster scores) or the lowest (nearest).
    balanced[_furthest] / balanced_nearest
                            an equal count per cluster; clusters smaller than their share keep all
                            and the shortfall is spread over the others (iteratively).
    kcenter / herding       the highest scores, where scores are the priorities written by
                            `kcenter_scores` / `herding_scores` (= the greedy prefix).
  Ties are broken by id (smaller first).
  """
  ids = np.asarray(ids, np.int64)
  scores = np.asarray(scores, np.float64)
  if ids.ndim != 1 or scores.shape != ids.shape:
    raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be 1-D of equal length")
  _argsort_ids(ids)  # uniqueness check
  n = len(ids)
  k = keep_count(n, ratio)
  if rule in ("highest", "kcenter", "herding"):
    keep = _rank(ids, scores, True)[:k]
  elif rule == "lowest":
    keep = _rank(ids, scores, False)[:k]
  elif rule == "random":
    order = _argsort_ids(ids)
    keep = order[np.random.default_rng(seed).permutation(n)[:k]]
  elif rule.startswith("proportional") or rule.startswith("balanced"):
    if clusters is None:
      raise ValueError(f"rule {rule!r} needs cluster assignments")
    clusters = np.asarray(clusters, np.int64)
    if clusters.shape != ids.shape:
      raise ValueError(f"clusters {clusters.shape} must match ids {ids.shape}")
    if rule in ("proportional", "proportional_furthest", "balanced", "balanced_furthest"):
      highest = True
    elif rule in ("proportional_nearest", "balanced_nearest"):
      highest = False
    else:
      raise ValueError(f"data.subset.rule must be one of {RULES}, got {rule!r}")
    labels, inv = np.unique(clusters, return_inverse=True)
    sizes = np.bincount(inv, minlength=len(labels)).astype(np.int64)
    quotas = (_largest_remainder(sizes, k) if rule.startswith("proportional")
              else _balanced_quotas(sizes, k))
    parts = []
    for c in range(len(labels)):
      members = np.flatnonzero(inv == c)
      ranked = members[_rank(ids[members], scores[members], highest)]
      parts.append(ranked[:quotas[c]])
    keep = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  else:
    raise ValueError(f"data.subset.rule must be one of {RULES}, got {rule!r}")
  kept = np.sort(ids[keep])
  assert len(kept) == k, (len(kept), k)
  return kept


def select_from_scores_file(path, *, rule: str, ratio: float, seed: int = 0) -> np.ndarray:
  """`select_subset` on a scores file (clusters from the file when present); config.data.subset."""
  s = load_scores(path)
  return select_subset(s["ids"], s["scores"], rule=rule, ratio=ratio, clusters=s["clusters"],
                       seed=seed)
