"""Latent cache: encode a data set once with the frozen autoencoder, reuse it afterwards.

Layout under `<workdir>/latents/`:
  manifest.json          fingerprint, counts, shapes, dtype, scale factor, latent statistics
  shard-00000.npz ...    `mean`, `logvar` (B, h, w, c) float32|float16, `label` int32, `id` int64

The cache stores the posterior q(z|x) = N(mean, exp(logvar)), not one sample: training draws a
fresh z each step with `sample_latents` (as LFM does) and multiplies by the scale factor.

A cache is reused when its manifest's fingerprint equals the requested one (which autoencoder -
path and step, or `params_fingerprint(params)` - data set, split, resolution, ...), and rebuilt
otherwise. A build writes into a temporary directory and renames it into place only when complete,
so an interrupted build never leaves a cache that looks valid.

Scale factor: the given one (e.g. 0.18215 for SD's KL-f8), else 1 / std of latents sampled from
the cached posteriors (computed while encoding, seeded, so rebuilds are reproducible).
"""

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "latents"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}


def cache_dir(workdir: str) -> str:
  return os.path.join(os.fspath(workdir), CACHE_DIRNAME)


def params_fingerprint(params) -> str:
  """sha256 (hex) of a parameter pytree: paths, shapes, dtypes and values."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _normalize(fingerprint: Mapping[str, Any]) -> Any:
  """JSON round trip: tuples become lists, non-JSON values their str(), keys sorted."""
  return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def fingerprint_from_config(config, autoencoder: Any, split: Optional[str] = None) -> Dict[str, Any]:
  """The cache fingerprint for `config` (the full run config) and an autoencoder identity.

  `autoencoder` identifies the weights: e.g. {"path": ..., "step": ...} for a trained one, the
  pretrained checkpoint path, or `params_fingerprint(params)`. Everything that changes the encoded
  images is included (data set, split, resolution, channels, crop, example cap); augmentation
  (random flips) and subset selection are applied after the cache and are not.
  """
  data = config.data
  get = lambda k: data.get(k, None) if hasattr(data, "get") else getattr(data, k, None)
  return _normalize({
      "autoencoder": autoencoder,
      "data": {
          "name": get("name"),
          "split": split if split is not None else get("train_split"),
          "image_size": get("image_size"),
          "channels": get("channels"),
          "crop": get("crop"),
          "max_train_examples": get("max_train_examples"),
          "image_folder": get("image_folder"),
      },
      "format": FORMAT_VERSION,
  })


def read_manifest(workdir: str) -> Optional[Dict[str, Any]]:
  """The manifest of a complete cache, or None (absent, unreadable or with missing shards)."""
  d = cache_dir(workdir)
  try:
    with open(os.path.join(d, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  if manifest.get("version") != FORMAT_VERSION:
    return None
  if not all(os.path.exists(os.path.join(d, s["file"])) for s in manifest.get("shards", [])):
    return None
  return manifest


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class _Stats:
  """Streaming mean/std of latents sampled from the posteriors (float64 sums)."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    self.n = 0
    self.s = 0.0
    self.s2 = 0.0

  def update(self, mean: np.ndarray, logvar: np.ndarray) -> None:
    z = mean.astype(np.float64) + np.exp(0.5 * logvar.astype(np.float64)) * self.rng.standard_normal(
        mean.shape)
    self.n += z.size
    self.s += float(z.sum())
    self.s2 += float(np.square(z).sum())

  def result(self):
    mu = self.s / max(self.n, 1)
    var = max(self.s2 / max(self.n, 1) - mu * mu, 0.0)
    return mu, float(np.sqrt(var))


def compute_scale_factor(mean, logvar, seed: int = 0) -> float:
  """1 / std of z ~ N(mean, exp(logvar)) over all elements (LDM's rescaling rule)."""
  st = _Stats(seed)
  st.update(np.asarray(mean), np.asarray(logvar))
  return 1.0 / st.result()[1]


def build_latent_cache(
    workdir: str,
    encode_fn: Callable[[Any], Any],
    images_iter_factory: Callable[[], Iterable[Mapping[str, Any]]],
    *,
    fingerprint: Mapping[str, Any],
    dtype: str = "float32",
    scale_factor: Optional[float] = None,
    shard_size: int = 16384,
    seed: int = 0,
    force: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
  """Encodes the data set into `<workdir>/latents/` unless a matching cache exists.

  Args:
    workdir: the run directory (local path).
    encode_fn: images (B, H, W, C) float32 in [-1, 1] -> (mean, logvar), each (B, h, w, c);
      typically a jitted (and sharded) `module.apply(..., method=module.encode)`. Must return
      host-addressable arrays.
    images_iter_factory: () -> iterable of batches {"image": (B, H, W, C), "label": (B,) int
      (optional: -1), "id": (B,) int (optional: running index), "mask": (B,) bool (optional:
      False marks padding examples, which are dropped)}. Only called when (re)building.
    fingerprint: JSON-able dict identifying autoencoder checkpoint + data (name, split,
      resolution, preprocessing...). Any change invalidates the cache.
    dtype: storage dtype of mean/logvar, "float32" or "float16".
    scale_factor: fixed scale factor; None: 1 / std of sampled latents.
    shard_size: examples per shard file.
    seed: seed of the latent sampling used for the computed scale factor.
    force: rebuild even if a matching cache exists.
    log: message sink (default: this module's logger at INFO).

  Returns:
    the manifest dict, plus "reused": bool and "path".
  """
  log = log or logger.info
  if dtype not in _DTYPES:
    raise ValueError(f"latent cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
  workdir = os.fspath(workdir)
  final = cache_dir(workdir)
  want = _normalize(fingerprint)

  manifest = None if force else read_manifest(workdir)
  if manifest is not None and manifest.get("fingerprint") == want and manifest.get("dtype") == dtype:
    if scale_factor is not None and manifest["scale_factor"] != float(scale_factor):
      manifest["scale_factor"] = float(scale_factor)
      manifest["scale_factor_source"] = "given"
      _write_json_atomic(os.path.join(final, MANIFEST), manifest)
    elif scale_factor is None and manifest.get("scale_factor_source") != "computed":
      manifest["scale_factor"] = 1.0 / manifest["latent_std"]
      manifest["scale_factor_source"] = "computed"
      _write_json_atomic(os.path.join(final, MANIFEST), manifest)
    log(f"reusing latent cache at {final} ({manifest['num_examples']} examples)")
    return dict(manifest, reused=True, path=final)
  if manifest is not None:
    log(f"latent cache at {final} does not match (fingerprint or dtype changed); rebuilding")

  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, f"{CACHE_DIRNAME}.tmp-{uuid.uuid4().hex[:12]}")
  os.makedirs(tmp)
  np_dtype = _DTYPES[dtype]
  stats = _Stats(seed)
  shards = []
  buf = {"mean": [], "logvar": [], "label": [], "id": []}
  buffered = 0
  total = 0
  latent_shape = None
  start = time.time()

  def flush():
    nonlocal buf, buffered
    if not buffered:
      return
    name = f"shard-{len(shards):05d}.npz"
    arrays = {k: np.concatenate(v) for k, v in buf.items()}
    with open(os.path.join(tmp, name), "wb") as f:
      np.savez(f, **arrays)
    shards.append({"file": name, "num_examples": int(buffered)})
    buf = {k: [] for k in buf}
    buffered = 0

  try:
    for batch in images_iter_factory():
      images = batch["image"]
      mean, logvar = encode_fn(images)
      mean = np.asarray(mean, np.float32)
      logvar = np.asarray(logvar, np.float32)
      b = mean.shape[0]
      label = np.asarray(batch["label"], np.int32).reshape(b) if "label" in batch else np.full(
          (b,), -1, np.int32)
      ids = (np.asarray(batch["id"], np.int64).reshape(b) if "id" in batch
             else np.arange(total, total + b, dtype=np.int64))
      if "mask" in batch:
        keep = np.asarray(batch["mask"], bool).reshape(b)
        mean, logvar, label, ids = mean[keep], logvar[keep], label[keep], ids[keep]
        b = int(keep.sum())
      if b == 0:
        continue
      if latent_shape is None:
        latent_shape = list(mean.shape[1:])
      elif list(mean.shape[1:]) != latent_shape:
        raise ValueError(f"latent shape changed mid-build: {mean.shape[1:]} vs {latent_shape}")
      stats.update(mean, logvar)
      mean_s, logvar_s = mean.astype(np_dtype), logvar.astype(np_dtype)
      # Split so no shard exceeds shard_size.
      i = 0
      while i < b:
        n = min(b - i, shard_size - buffered)
        buf["mean"].append(mean_s[i:i + n])
        buf["logvar"].append(logvar_s[i:i + n])
        buf["label"].append(label[i:i + n])
        buf["id"].append(ids[i:i + n])
        buffered += n
        total += n
        i += n
        if buffered >= shard_size:
          flush()
    flush()
    if total == 0:
      raise ValueError("the data iterator yielded no examples; nothing to cache")
    latent_mean, latent_std = stats.result()
    manifest = {
        "version": FORMAT_VERSION,
        "fingerprint": want,
        "num_examples": int(total),
        "latent_shape": latent_shape,
        "dtype": dtype,
        "shards": shards,
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "scale_factor": float(scale_factor) if scale_factor is not None else 1.0 / latent_std,
        "scale_factor_source": "given" if scale_factor is not None else "computed",
        "scale_factor_seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "encode_seconds": round(time.time() - start, 3),
    }
    _write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    # Commit: move any old cache aside, rename the new one into place, then delete the old.
    old = None
    if os.path.exists(final):
      old = os.path.join(workdir, f"{CACHE_DIRNAME}.old-{uuid.uuid4().hex[:12]}")
      os.rename(final, old)
    os.rename(tmp, final)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f"wrote latent cache at {final} ({total} examples, latents {latent_shape} {dtype}, "
      f"scale factor {manifest['scale_factor']:.6g}, {manifest['encode_seconds']:.1f}s)")
  return dict(manifest, reused=False, path=final)


def load_latent_cache(workdir: str) -> Dict[str, Any]:
  """Loads the cache: dict(mean, logvar, label, id, scale_factor).

  mean/logvar keep their stored dtype (float32 or float16; `sample_latents` computes in float32).
  """
  manifest = read_manifest(workdir)
  if manifest is None:
    raise FileNotFoundError(f"no complete latent cache at {cache_dir(workdir)}")
  d = cache_dir(workdir)
  parts = {"mean": [], "logvar": [], "label": [], "id": []}
  for s in manifest["shards"]:
    with np.load(os.path.join(d, s["file"])) as z:
      for k in parts:
        parts[k].append(z[k])
  out = {k: np.concatenate(v) for k, v in parts.items()}
  out["scale_factor"] = float(manifest["scale_factor"])
  return out


def sample_latents(rng, mean, logvar, scale_factor):
  """scale_factor * (mean + exp(logvar / 2) * eps), float32. Pure and jittable."""
  mean = jnp.asarray(mean).astype(jnp.float32)
  logvar = jnp.asarray(logvar).astype(jnp.float32)
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return scale_factor * (mean + jnp.exp(0.5 * logvar) * eps)
