"""Latent cache: encode a data set once with the frozen autoencoder, read it by groups.

The cache stores the posterior q(z|x) = N(mean, exp(logvar)) of every training example, not one
sample: training draws a fresh z each step (`sample_latents`, as LFM does) and multiplies it by
the scale factor. With data.random_flip it also stores the posterior of the mirrored image, and
training picks one orientation per example and epoch (as fast-DiT's flipped feature cache does).

Layout under `<workdir>/latents/`:
  manifest.json              fingerprint, counts, shapes, dtype, scale factor, the group table
  group-00000-<build>.npz    `mean`, `logvar` (n, h, w, c) [+ `mean_flip`, `logvar_flip`],
                             `label` int32 (-1 when unlabelled), `id` int64 (index in the split)

Groups. The examples, in id order, are cut into G = min(latents.groups, N) contiguous groups of
near-equal size, one file each. A multi-host build has host h encode and write groups
[hG/P, (h+1)G/P) (P hosts, P | G); process 0 writes the manifest last, so a cache is complete
exactly when its manifest lists it, and an interrupted build leaves the previous cache valid.
Any host count dividing G can read it.

Training order (`LatentIterator`): the global batch of B rows is made of L = gcd(G, B) lanes of
B / L rows; lane l draws from groups [lG/L, (l+1)G/L) in a fresh permutation every lane epoch,
drawn from (seed, L, l, epoch). Host h feeds lanes [hL/P, (h+1)L/P), so it reads only its own
groups, and the global batches are the same for every host and device count.

Fingerprint (`fingerprint`, the only one): the autoencoder's identity and everything that
changes the encoded images (data set, image folder, split, resolution, channels, crop, example
cap, stored orientations, group count, storage dtype). A cache whose manifest holds another fingerprint is
rebuilt.

Scale factor: 1 / std of latents sampled from the cached posteriors, one seeded draw per example
(seed, id) summed per group in float64, so it is the same for any host count.
"""

import math
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import parallel
from lfm_jax import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_DTYPES = {"float32": np.float32, "float16": np.float16}


class CacheError(ValueError):
  """The latent cache cannot serve a request (missing, incompatible); the message says why."""


# ----------------------------------------------------------------------------------- identity


def params_fingerprint(params) -> str:
  """sha256 (hex) of a parameter pytree: paths, shapes, dtypes and values."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _normalize(obj: Any) -> Any:
  """JSON round trip: tuples become lists, non-JSON values their str(), keys sorted."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(config, autoencoder: Any) -> Dict[str, Any]:
  """The cache fingerprint of a run config and an autoencoder identity (see module docstring).

  `autoencoder` identifies the weights, e.g. {"trained": {path, size, mtime}} or
  {"pretrained": ...} or `params_fingerprint(params)`. Subset selection and the orientation
  drawn at each step are applied after the cache and are not part of it.
  """
  data = config.data
  return _normalize({
      "autoencoder": autoencoder,
      "data": {
          "name": data.name,
          "image_folder": data.image_folder,
          "split": data.train_split,
          "image_size": int(data.image_size),
          "channels": int(data.channels),
          "crop": data.crop,
          "max_train_examples": data.max_train_examples,
      },
      "flipped": bool(data.random_flip),
      "groups": int(config.latents.groups),
      "dtype": config.latents.dtype,
      "format": FORMAT_VERSION,
  })


def group_bounds(num_examples: int, num_groups: int) -> np.ndarray:
  """(G + 1,) start offsets of G contiguous near-equal groups of num_examples (first ones +1)."""
  base, rest = divmod(num_examples, num_groups)
  sizes = np.full(num_groups, base, np.int64)
  sizes[:rest] += 1
  return np.concatenate([[0], np.cumsum(sizes)])


def num_groups_for(num_examples: int, groups: int) -> int:
  return max(1, min(int(groups), int(num_examples)))


def _owned(count: int, process_index: int, process_count: int, what: str) -> range:
  if count % process_count:
    raise CacheError(f"{what}: {count} is not divisible by the {process_count} processes")
  per = count // process_count
  return range(process_index * per, (process_index + 1) * per)


# ----------------------------------------------------------------------------------- reading


class LatentCache:
  """A complete cache (its manifest) and readers of its groups."""

  def __init__(self, directory: storage.PathLike, manifest: Mapping[str, Any]):
    self.directory = storage.path(directory)
    self.manifest = dict(manifest)

  @classmethod
  def open(cls, directory: storage.PathLike) -> Optional["LatentCache"]:
    """The cache in `directory`, or None when there is no complete one."""
    d = storage.path(directory)
    path = d / MANIFEST
    if not path.exists():
      return None
    try:
      manifest = storage.read_json(path)
    except storage.StorageError:
      return None
    if manifest.get("version") != FORMAT_VERSION:
      return None
    return cls(d, manifest)

  @property
  def num_examples(self) -> int:
    return int(self.manifest["num_examples"])

  @property
  def num_groups(self) -> int:
    return len(self.manifest["groups"])

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.manifest["latent_shape"])

  @property
  def flipped(self) -> bool:
    return bool(self.manifest["flipped"])

  @property
  def scale_factor(self) -> float:
    """1 / std of the cached latents (LDM's rule); a configured scale factor takes precedence."""
    return 1.0 / float(self.manifest["latent_std"])

  def read_group(self, g: int) -> Dict[str, np.ndarray]:
    return storage.load_npz(self.directory / self.manifest["groups"][g]["file"])

  def read(self, groups: Optional[Iterable[int]] = None) -> Dict[str, np.ndarray]:
    """The arrays of `groups` (default: all), concatenated in group order."""
    groups = range(self.num_groups) if groups is None else list(groups)
    parts = [self.read_group(g) for g in groups]
    if not parts:
      raise CacheError("no groups requested")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sample_latents(rng: jax.Array, mean: jax.Array, logvar: jax.Array,
                   scale_factor: float) -> jax.Array:
  """scale_factor * (mean + exp(logvar / 2) * eps), float32: a fresh draw from the posterior."""
  mean = jnp.asarray(mean).astype(jnp.float32)
  logvar = jnp.asarray(logvar).astype(jnp.float32)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return scale_factor * (mean + jnp.exp(0.5 * logvar) * eps)


# ----------------------------------------------------------------------------------- building


def _example_stats(mean: np.ndarray, logvar: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
  """[n, sum, sum of squares] (float64) of one posterior draw per example, seeded by (seed, id)."""
  out = np.zeros(3, np.float64)
  for m, lv, i in zip(mean, logvar, ids):
    z = m.astype(np.float64) + np.exp(0.5 * lv.astype(np.float64)) * np.random.default_rng(
        [int(seed), int(i)]).standard_normal(m.shape)
    out += (z.size, z.sum(), np.square(z).sum())
  return out


def _chunked_encode(encode_fn: Callable, images: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """encode_fn over rows [0, chunk), [chunk, 2 chunk), ... of one group (last chunk padded)."""
  n = images.shape[0]
  pad = (-n) % chunk
  if pad:
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  mean, logvar = encode_fn(images)
  return np.asarray(mean, np.float32)[:n], np.asarray(logvar, np.float32)[:n]


def _group_file(g: int, build: str) -> str:
  return f"group-{g:05d}-{build}.npz"


def build_cache(directory: storage.PathLike, fp: Mapping[str, Any], *, ids: np.ndarray,
                read_images: Callable[[np.ndarray], Iterable[Mapping[str, np.ndarray]]],
                encode_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                groups: int, chunk: int, flipped: bool = False, dtype: str = "float32",
                seed: int = 0, log: Callable[[str], None] = print,
                extras: Optional[Callable[[Mapping[str, np.ndarray], bool],
                                          Mapping[str, np.ndarray]]] = None,
                extra_inputs: Sequence[str] = ()) -> tuple[LatentCache, bool]:
  """Returns (cache, reused): the matching cache in `directory`, or a new one built now.

  Args:
    directory: the cache directory (<workdir>/latents).
    fp: the fingerprint (`fingerprint(config, autoencoder_identity)`).
    ids: every example id of the split, ascending (the same array on every host).
    read_images(ids) -> batches {"image" (b, H, W, C) in [-1, 1], "label", "id"} of exactly
      those examples in id order (this host reads them itself).
    encode_fn(images (k * chunk, H, W, C)) -> (mean, logvar) host arrays; it encodes chunks of
      `chunk` rows independently (e.g. one chunk per local device), so an example's latent does
      not depend on which host or batch encoded it.
    groups: latents.groups (G = min(groups, N)); the process count must divide G.
    flipped: also store the mirrored images' posteriors.
    dtype: storage dtype of mean/logvar ("float32" | "float16").
    seed: the scale-factor draws' seed.
    extras(group, flip) -> {name: (n, ...) array}: more arrays stored per example (a task's
      conditioning, lfm_jax/tasks.py), from the group's {"image", *extra_inputs} rows (read from
      read_images' batches); with `flipped` also extras(group, True) as <name>_flip.
  """
  d = storage.path(directory)
  want = _normalize(fp)
  old = LatentCache.open(d)
  if old is not None and old.manifest.get("fingerprint") == want:
    log(f"latents: reusing the cache at {storage.display(d)} ({old.num_examples} examples)")
    return old, True
  if old is not None:
    log(f"latents: the cache at {storage.display(d)} was made from other data or another "
        "autoencoder; rebuilding it")
  if dtype not in _DTYPES:
    raise CacheError(f"latents.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  ids = np.asarray(ids, np.int64)
  n = int(ids.size)
  if n == 0:
    raise CacheError("the training split has no examples; nothing to encode")
  num_groups = num_groups_for(n, groups)
  pi, pc = jax.process_index(), jax.process_count()
  mine = _owned(num_groups, pi, pc, f"latents.groups (here {num_groups} groups)")
  bounds = group_bounds(n, num_groups)
  build = "%08x" % int(parallel.broadcast_from_first(
      np.asarray(uuid.uuid4().int % (2 ** 31), np.int64)))
  storage.makedirs(d)
  start = time.time()
  stats = np.zeros((num_groups, 3), np.float64)
  np_dtype = _DTYPES[dtype]
  latent_shape = None
  my_ids = ids[bounds[mine.start]:bounds[mine.stop]]
  rows: dict[str, list] = {k: [] for k in ("image", "label", "id", *extra_inputs)}
  g = mine.start
  buffered = 0

  def finish_group(g, batch):
    nonlocal latent_shape
    images = np.concatenate(batch["image"])
    label = np.concatenate(batch["label"]).astype(np.int32)
    gid = np.concatenate(batch["id"]).astype(np.int64)
    if not np.array_equal(gid, ids[bounds[g]:bounds[g + 1]]):
      raise CacheError(f"latents: the data pipeline returned other examples than group {g} "
                       "asked for (ids out of order?)")
    mean, logvar = _chunked_encode(encode_fn, images, chunk)
    arrays = {"mean": mean.astype(np_dtype), "logvar": logvar.astype(np_dtype), "label": label,
              "id": gid}
    if flipped:
      fm, fl = _chunked_encode(encode_fn, images[:, :, ::-1, :], chunk)
      arrays.update(mean_flip=fm.astype(np_dtype), logvar_flip=fl.astype(np_dtype))
    if extras is not None:
      group = {"image": images, **{k: np.concatenate(batch[k]) for k in extra_inputs}}
      arrays.update(extras(group, False))
      if flipped:
        arrays.update({f"{k}_flip": v for k, v in extras(group, True).items()})
    latent_shape = list(mean.shape[1:])
    storage.write_npz(d / _group_file(g, build), **arrays)
    stats[g] = _example_stats(mean, logvar, gid, seed)

  for batch in read_images(my_ids):
    b = len(batch["id"])
    i = 0
    while i < b:
      need = int(bounds[g + 1] - bounds[g]) - buffered
      take = min(need, b - i)
      for k in rows:
        rows[k].append(np.asarray(batch[k])[i:i + take])
      buffered += take
      i += take
      if buffered == bounds[g + 1] - bounds[g]:
        finish_group(g, rows)
        rows = {k: [] for k in rows}
        buffered = 0
        g += 1
  if g != mine.stop:
    raise CacheError(f"latents: the data pipeline ended after {bounds[g] - bounds[mine.start] + buffered}"
                     f" of this host's {len(my_ids)} examples")
  stats = parallel.sum_over_hosts(stats)
  shapes = parallel.broadcast_from_first(np.asarray(latent_shape or [0, 0, 0], np.int64))
  tables = [{"file": _group_file(g, build), "num_examples": int(bounds[g + 1] - bounds[g]),
             "first_id": int(ids[bounds[g]]), "last_id": int(ids[bounds[g + 1] - 1])}
            for g in range(num_groups)]
  count, total, total_sq = stats.sum(axis=0)
  mu = total / count
  std = math.sqrt(max(total_sq / count - mu * mu, 0.0))
  manifest = {
      "version": FORMAT_VERSION,
      "fingerprint": want,
      "num_examples": n,
      "latent_shape": [int(s) for s in shapes],
      "dtype": dtype,
      "flipped": bool(flipped),
      "groups": tables,
      "latent_mean": float(mu),
      "latent_std": float(std),
      "scale_factor_seed": int(seed),
      "build": build,
      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "encode_seconds": round(time.time() - start, 3),
  }
  parallel.sync("latents_groups_written")
  if pi == 0:
    storage.write_json(d / MANIFEST, manifest)
    keep = {t["file"] for t in tables} | {MANIFEST}
    for f in d.iterdir():
      if f.name not in keep:
        storage.remove_tree(f)
  parallel.sync("latents_manifest_written")
  cache = LatentCache(d, manifest)
  log(f"latents: wrote {n} examples in {num_groups} groups to {storage.display(d)} "
      f"(latents {tuple(manifest['latent_shape'])} {dtype}{', both orientations' if flipped else ''},"
      f" {manifest['encode_seconds']:.1f} s)")
  return cache, False


# ----------------------------------------------------------------------------------- training order


def num_lanes(num_groups: int, batch_size: int) -> int:
  """L = gcd(G, B): the lanes a global batch is drawn from (see the module docstring)."""
  return math.gcd(int(num_groups), int(batch_size))


class LatentIterator:
  """Host-local training batches from a latent cache, with an exact, O(1) resume.

  Yields {"mean", "logvar"[, "label"], *extra_keys} (with_ids: also "id" and, with flip,
  "flipped") for this host's rows of each global batch of
  `batch_size` (see "Training order" in the module docstring). `kept_ids` restricts training to
  a subset; `flip` draws one orientation per example and lane epoch from the flipped cache.
  state() -> {"batch": b, ...}; restore(state) continues there (under any host count).
  """

  def __init__(self, cache: LatentCache, *, batch_size: int, seed: int,
               kept_ids: Optional[np.ndarray] = None, flip: bool = False,
               with_labels: bool = True, with_ids: bool = False,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None, extra_keys: Sequence[str] = ()):
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if flip and not cache.flipped:
      raise CacheError("data.random_flip is set but the latent cache holds one orientation; "
                       "rerun --mode=encode")
    self._batch_size, self._seed, self._flip = int(batch_size), int(seed), bool(flip)
    self._lanes = num_lanes(cache.num_groups, batch_size)
    if self._lanes % pc:
      raise CacheError(
          f"train.batch_size={batch_size} and the cache's {cache.num_groups} groups "
          f"(latents.groups) give {self._lanes} lanes, not divisible by the {pc} processes")
    self._rows = self._batch_size // self._lanes
    per_lane_groups = cache.num_groups // self._lanes
    owned = _owned(self._lanes, pi, pc, "lanes")
    arrays = cache.read(range(owned.start * per_lane_groups, owned.stop * per_lane_groups))
    self._oriented = ["mean", "logvar", *extra_keys]  # keys with a mirrored version
    self._keys = ["mean", "logvar", "id"] + (["label"] if with_labels else []) + list(extra_keys)
    if flip:
      self._keys += [f"{k}_flip" for k in self._oriented]
    self._with_ids = with_ids
    keep = (np.ones(len(arrays["id"]), bool) if kept_ids is None
            else np.isin(arrays["id"], np.asarray(kept_ids, np.int64)))
    bounds = [0]
    for g in range(owned.start * per_lane_groups, owned.stop * per_lane_groups):
      bounds.append(bounds[-1] + cache.manifest["groups"][g]["num_examples"])
    self._lane_ids = list(owned)
    self._lane_arrays = []
    for j, lane in enumerate(owned):
      lo, hi = bounds[j * per_lane_groups], bounds[(j + 1) * per_lane_groups]
      sel = np.nonzero(keep[lo:hi])[0] + lo
      if sel.size == 0:
        raise CacheError(f"lane {lane} of the training order has no examples left after the "
                         "subset selection (data.subset); use fewer latents.groups")
      self._lane_arrays.append({k: arrays[k][sel] for k in self._keys})
    self._orders: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._batch = 0
    self.latent_shape = cache.latent_shape
    self.num_examples = int(keep.sum()) if pc == 1 else None

  def _order(self, lane: int, epoch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    key = (lane, epoch)
    if key not in self._orders:
      if len(self._orders) > 4 * len(self._lane_ids):
        self._orders.pop(next(iter(self._orders)))
      rng = np.random.default_rng([self._seed, self._lanes, lane, epoch])
      self._orders[key] = (rng.permutation(n), rng.random(n) < 0.5)
    return self._orders[key]

  def _fingerprint(self) -> dict[str, int]:
    return {"seed": self._seed, "batch_size": self._batch_size, "lanes": self._lanes}

  def state(self) -> dict[str, int]:
    return {"batch": self._batch, **self._fingerprint()}

  def restore(self, state: Mapping[str, int]) -> "LatentIterator":
    for key, value in self._fingerprint().items():
      if key in state and int(state[key]) != value:
        raise CacheError(f"cannot resume the training order: the checkpoint has {key}="
                         f"{int(state[key])}, this run {value}")
    self._batch = int(state["batch"])
    return self

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = []
    for lane, arrays in zip(self._lane_ids, self._lane_arrays):
      n = len(arrays["id"])
      pos = np.arange(self._batch * self._rows, (self._batch + 1) * self._rows)
      epochs, offsets = np.divmod(pos, n)
      idx = np.empty_like(pos)
      flips = np.zeros(pos.shape, bool)
      for e in np.unique(epochs):
        perm, bits = self._order(lane, int(e), n)
        sel = epochs == e
        idx[sel] = perm[offsets[sel]]
        flips[sel] = bits[offsets[sel]]
      out = {k: arrays[k][idx] for k in self._keys if not k.endswith("_flip")}
      if self._flip:
        for k in self._oriented:
          f = flips.reshape((-1,) + (1,) * (out[k].ndim - 1))
          out[k] = np.where(f, arrays[f"{k}_flip"][idx], out[k])
        if self._with_ids:
          out["flipped"] = flips
      if not self._with_ids:
        del out["id"]
      parts.append(out)
    self._batch += 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
