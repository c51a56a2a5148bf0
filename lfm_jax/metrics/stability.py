"""Same-seed stability of two models (paper 2; `stability` mode).

Two models sample from the SAME noise seeds; pair i is (a[i], b[i]). Stability is measured by
  cosine     cosine similarity of paired embeddings (embed_fn: any callable images -> features;
             default: the flattened pixels / latents themselves),
  psnr       10 log10(data_range^2 / MSE) per pair (inf for identical pairs), images in [-1, 1]
             so data_range = 2,
  ssim       dm_pix.ssim (Gaussian window 11, sigma 1.5, or the largest odd window that fits),
  latent_mse mean squared difference of the paired latents (when latents are given),
each the mean over pairs. `stability_report` puts the same figures for a baseline beside them:
pairs (a[i], b[pi(i)]) with pi a seeded random derangement (no image paired with its own seed),
under keys "same_seed/<metric>" and "shuffled/<metric>".
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import dm_pix

EmbedFn = Callable[[Any], Any]


def _flatten(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x.reshape(x.shape[0], -1)


def _embed(images, embed_fn: Optional[EmbedFn], batch_size: int) -> np.ndarray:
  """Features (N, D) float64: embed_fn over batches, or the flattened images."""
  if embed_fn is None:
    return _flatten(images).astype(np.float64)
  feats = [np.asarray(embed_fn(images[s:s + batch_size]), np.float64)
           for s in range(0, len(images), batch_size)]
  feats = np.concatenate(feats) if feats else np.zeros((0, 1))
  return feats.reshape(feats.shape[0], -1)


def _cosine(fa: np.ndarray, fb: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Per-row cosine similarity of two (N, D) arrays."""
  na = np.linalg.norm(fa, axis=1)
  nb = np.linalg.norm(fb, axis=1)
  return np.sum(fa * fb, axis=1) / np.maximum(na * nb, eps)


def _ssim_window(h: int, w: int) -> int:
  size = min(11, h, w)
  return size if size % 2 == 1 else size - 1


def _image_batch_metrics(a: jax.Array, b: jax.Array, data_range: float, filter_size: int):
  """Per-pair (mse, ssim) for image batches (B, H, W, C)."""
  diff = (a - b).reshape(a.shape[0], -1)
  mse = jnp.mean(jnp.square(diff), axis=1)
  ssim = dm_pix.ssim(a, b, max_val=data_range, filter_size=filter_size)
  return mse, ssim


_image_batch_metrics_jit = jax.jit(_image_batch_metrics, static_argnums=(2, 3))


def _per_pair_image(a: np.ndarray, b: np.ndarray, data_range: float,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-pair MSE and SSIM of image arrays (N, H, W, C), batched (last batch padded)."""
  n = a.shape[0]
  if a.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C), got {a.shape}")
  fsize = _ssim_window(a.shape[1], a.shape[2])
  bs = max(1, min(batch_size, n))
  mses, ssims = [], []
  for s in range(0, n, bs):
    xa, xb = a[s:s + bs], b[s:s + bs]
    m = xa.shape[0]
    if m < bs:
      pad = np.zeros((bs - m,) + xa.shape[1:], xa.dtype)
      xa, xb = np.concatenate([xa, pad]), np.concatenate([xb, pad])
    mse, ssim = _image_batch_metrics_jit(jnp.asarray(xa), jnp.asarray(xb), float(data_range), fsize)
    mses.append(np.asarray(mse, np.float64)[:m])
    ssims.append(np.asarray(ssim, np.float64)[:m])
  return np.concatenate(mses), np.concatenate(ssims)


def _psnr(mse: np.ndarray, data_range: float) -> np.ndarray:
  with np.errstate(divide="ignore"):
    return np.where(mse > 0, 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-300)), np.inf)


def _metrics(a, b, fa, fb, la, lb, data_range: float, batch_size: int) -> dict[str, float]:
  mse, ssim = _per_pair_image(a, b, data_range, batch_size)
  out = {
      "cosine": float(np.mean(_cosine(fa, fb))),
      "psnr": float(np.mean(_psnr(mse, data_range))),
      "ssim": float(np.mean(ssim)),
      "mse": float(np.mean(mse)),
  }
  if la is not None:
    out["latent_mse"] = float(np.mean(np.square(_flatten(la) - _flatten(lb)).mean(axis=1)))
  return out


def _check_pairs(a, b, name: str):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  if a.shape != b.shape:
    raise ValueError(f"{name}: paired arrays must have the same shape, got {a.shape} and {b.shape}")
  if a.shape[0] < 1:
    raise ValueError(f"{name}: no pairs")
  return a, b


def pair_metrics(a, b, embed_fn: Optional[EmbedFn] = None, *, latents_a=None, latents_b=None,
                 data_range: float = 2.0, batch_size: int = 256) -> dict[str, float]:
  """Mean over pairs (a[i], b[i]) of cosine, psnr, ssim, mse (and latent_mse with latents).

  Args:
    a, b: images (N, H, W, C) in [-1, 1] from two models with the same noise seeds.
    embed_fn: images (B, H, W, C) -> features (B, ...); None: the flattened images.
    latents_a, latents_b: optional (N, ...) latents behind a and b.
    data_range: max - min of the image range (2 for [-1, 1]).
    batch_size: pairs per call of embed_fn and of the jitted SSIM.
  Returns:
    {"cosine", "psnr" (inf if every pair is identical), "ssim", "mse", ["latent_mse"]}.
  """
  a, b = _check_pairs(a, b, "images")
  la = lb = None
  if latents_a is not None or latents_b is not None:
    if latents_a is None or latents_b is None:
      raise ValueError("give both latents_a and latents_b, or neither")
    la, lb = _check_pairs(latents_a, latents_b, "latents")
  fa = _embed(a, embed_fn, batch_size)
  fb = _embed(b, embed_fn, batch_size)
  return _metrics(a, b, fa, fb, la, lb, data_range, batch_size)


def derangement(n: int, seed: int = 0) -> np.ndarray:
  """A seeded random permutation of range(n) with no fixed point (a single n-cycle), n >= 2."""
  if n < 2:
    raise ValueError(f"a derangement needs n >= 2, got {n}")
  p = np.random.default_rng(seed).permutation(n)
  perm = np.empty(n, np.int64)
  perm[p] = np.roll(p, -1)
  return perm


def stability_report(a, b, embed_fn: Optional[EmbedFn] = None, *, latents_a=None, latents_b=None,
                     seed: int = 0, data_range: float = 2.0,
                     batch_size: int = 256) -> dict[str, float]:
  """Same-seed figures and the shuffled-pair baseline.

  Same-seed pairs are (a[i], b[i]); baseline pairs are (a[i], b[pi(i)]) with pi = derangement(N,
  seed) (latents permuted alike). Embeddings are computed once. Returns
  {"same_seed/cosine", ..., "shuffled/cosine", ..., "num_pairs"}; the gap same - shuffled is also
  given as "gap/<metric>" for cosine and ssim.
  """
  a, b = _check_pairs(a, b, "images")
  la = lb = None
  if latents_a is not None or latents_b is not None:
    if latents_a is None or latents_b is None:
      raise ValueError("give both latents_a and latents_b, or neither")
    la, lb = _check_pairs(latents_a, latents_b, "latents")
  fa = _embed(a, embed_fn, batch_size)
  fb = _embed(b, embed_fn, batch_size)
  same = _metrics(a, b, fa, fb, la, lb, data_range, batch_size)
  perm = derangement(a.shape[0], seed)
  shuf = _metrics(a, b[perm], fa, fb[perm], la, None if lb is None else lb[perm], data_range,
                  batch_size)
  report: dict[str, float] = {"num_pairs": int(a.shape[0])}
  for k, v in same.items():
    report[f"same_seed/{k}"] = v
  for k, v in shuf.items():
    report[f"shuffled/{k}"] = v
  for k in ("cosine", "ssim"):
    report[f"gap/{k}"] = same[k] - shuf[k]
  return report


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """(H, W, C) in [-1, 1] -> uint8 (H, W) for C in {1, 2} (first channel), (H, W, 3) otherwise."""
  x = np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  if x.ndim == 2:
    return x
  if x.shape[-1] < 3:
    return x[..., 0]
  return x[..., :3]


def save_pairs_png(path, a, b, n: int = 8, *, pad: int = 2, pad_value: float = 1.0):
  """Side-by-side PNG of the first n pairs: pair i is column i, a on the top row, b below.

  Size: width n*W + (n-1)*pad, height 2*H + pad (pad pixels of value pad_value in [-1, 1]).
  Images (N, H, W, C) in [-1, 1]; C = 1 (or 2) gives a grayscale PNG, C >= 3 RGB (first 3).
  Returns the (height, width) written.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  a, b = _check_pairs(a, b, "images")
  n = int(min(n, a.shape[0]))
  h, w, c = a.shape[1:]
  channels = 1 if c < 3 else 3
  height, width = 2 * h + pad, n * w + (n - 1) * pad
  canvas = np.full((height, width, channels), pad_value, np.float32)
  for i in range(n):
    x0 = i * (w + pad)
    canvas[:h, x0:x0 + w] = a[i][..., :channels]
    canvas[h + pad:, x0:x0 + w] = b[i][..., :channels]
  img = _to_uint8(canvas)
  Image.fromarray(img).save(path, format="PNG")
  return height, width
