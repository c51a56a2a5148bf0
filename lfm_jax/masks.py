"""Inpainting masks: LFM's training distribution, drawn deterministically per example.

Convention in lfm_jax: a mask is float32 (S, S) with 1 = known pixel, 0 = hole (to inpaint).
LFM's network sees `model_channel(mask)`: +1 on holes, -1 on known pixels (LFM draws a hole
indicator m and feeds m * 2 - 1), nearest-downsampled to the latent grid; the image it encodes is
`masked_image(x, mask)`: x on known pixels, -1 (black) in holes. Known pixels are pasted back
after decoding (`paste_known`).

`inpainting_mask(seed, example_id, size)` draws LFM's training masks (its MixedMaskGenerator with
default arguments, defined at 256 x 256): with probability 1/2 free-form strokes, else boxes.
  strokes: n ~ U{0..11} strokes; each starts at a uniform pixel and has 1 + U{0..4} segments;
    a segment has angle a = 0.01 + U{0..3} rad (2*pi - a in even-numbered strokes), length
    10 + U{0..59} px and brush width 5 + U{0..19} px, its end clipped to the image, and is drawn
    as a round-capped thick line; the next segment starts at its end.
  boxes: n ~ U{0..3} boxes with width and height 30 + U{0..70} px, placed uniformly with a
    10 px margin.
n = 0 leaves the image unmasked, as in LFM. At another size S the geometry is the 256-px draw
scaled by S / 256 (the same mask, resampled). The randomness is numpy's PCG64 seeded with
(seed, example_id[, epoch]): the mask of an example is the same for any host count, batch size
or read order. Pure numpy; about a millisecond per 256 x 256 mask.

User masks: `read_mask_file(path, size, white=...)` reads a PNG (white = known pixels by default,
the convention of LFM's evaluation masks; white="hole" for LaMa/MAT-style hole masks).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["REFERENCE_SIZE", "inpainting_mask", "center_mask", "read_mask_file",
           "model_channel", "masked_image", "paste_known"]

REFERENCE_SIZE = 256  # LFM's masks are defined in pixels of a 256 x 256 image
_MAX_STROKES, _MAX_SEGMENTS, _MAX_ANGLE, _MAX_LEN, _MAX_WIDTH = 11, 5, 4, 60, 20
_MAX_BOXES, _BOX_MIN, _BOX_MAX, _MARGIN = 3, 30, 100, 10


def _centres(lo: float, hi: float, scale: float, size: int) -> tuple[int, np.ndarray]:
  """First index and reference-pixel coordinates of the output pixels whose centres may lie in
  [lo, hi] (reference pixels; output pixel j has its centre at (j + 0.5) / scale - 0.5)."""
  j0 = max(0, int(math.floor((lo + 0.5) * scale - 0.5)))
  j1 = min(size, int(math.ceil((hi + 0.5) * scale + 0.5)))
  return j0, (np.arange(j0, max(j0, j1)) + 0.5) / scale - 0.5


def _stroke(hole, x0, y0, x1, y1, width, scale):
  """Marks output pixels within width / 2 (reference px) of the segment (x0, y0)-(x1, y1)."""
  r = width / 2.0
  size = hole.shape[0]
  cx, xs = _centres(min(x0, x1) - r, max(x0, x1) + r, scale, size)
  cy, ys = _centres(min(y0, y1) - r, max(y0, y1) + r, scale, size)
  if not xs.size or not ys.size:
    return
  px, py = xs[None, :], ys[:, None]
  dx, dy = x1 - x0, y1 - y0
  length2 = dx * dx + dy * dy
  t = 0.0 if length2 == 0 else np.clip(((px - x0) * dx + (py - y0) * dy) / length2, 0.0, 1.0)
  inside = (px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2 <= r * r
  hole[cy:cy + ys.size, cx:cx + xs.size] |= inside


def _box(hole, x0, y0, w, h, scale):
  """Marks output pixels whose centres lie in reference pixels [x0, x0 + w) x [y0, y0 + h)."""
  size = hole.shape[0]
  cx, xs = _centres(x0 - 0.5, x0 + w - 0.5, scale, size)
  cy, ys = _centres(y0 - 0.5, y0 + h - 0.5, scale, size)
  inside_x = (xs >= x0 - 0.5) & (xs < x0 + w - 0.5)
  inside_y = (ys >= y0 - 0.5) & (ys < y0 + h - 0.5)
  hole[cy:cy + ys.size, cx:cx + xs.size] |= inside_y[:, None] & inside_x[None, :]


def inpainting_mask(seed: int, example_id: int, size: int,
                    epoch: Optional[int] = None) -> np.ndarray:
  """LFM's training mask of one example: float32 (size, size), 1 = known, 0 = hole.

  Args:
    seed: mask seed (config.data.mask_seed).
    example_id: the example's id (its index in the base split).
    size: output side S.
    epoch: when given, a different mask per epoch (still independent of hosts and batching).
  """
  if size < 1:
    raise ValueError(f"mask size must be positive, got {size}")
  entropy = [int(seed), int(example_id)] + ([] if epoch is None else [int(epoch)])
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
  ref = REFERENCE_SIZE
  scale = size / ref
  hole = np.zeros((size, size), bool)
  if rng.random() < 0.5:
    for i in range(int(rng.integers(0, _MAX_STROKES + 1))):
      x, y = int(rng.integers(ref)), int(rng.integers(ref))
      for _ in range(1 + int(rng.integers(_MAX_SEGMENTS))):
        angle = 0.01 + int(rng.integers(_MAX_ANGLE))
        if i % 2 == 0:
          angle = 2 * math.pi - angle
        length = 10 + int(rng.integers(_MAX_LEN))
        width = 5 + int(rng.integers(_MAX_WIDTH))
        x1 = int(np.clip(x + length * math.sin(angle), 0, ref))
        y1 = int(np.clip(y + length * math.cos(angle), 0, ref))
        _stroke(hole, x, y, x1, y1, width, scale)
        x, y = x1, y1
  else:
    for _ in range(int(rng.integers(0, _MAX_BOXES + 1))):
      w = int(rng.integers(_BOX_MIN, _BOX_MAX + 1))
      h = int(rng.integers(_BOX_MIN, _BOX_MAX + 1))
      x0 = int(rng.integers(_MARGIN, ref - _MARGIN - w + 1))
      y0 = int(rng.integers(_MARGIN, ref - _MARGIN - h + 1))
      _box(hole, x0, y0, w, h, scale)
  return (~hole).astype(np.float32)


def center_mask(size: int) -> np.ndarray:
  """The centre-square hole LFM's training previews use (rows and columns S/4 .. 3S/4)."""
  mask = np.ones((size, size), np.float32)
  mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 0.0
  return mask


def read_mask_file(path, size: Optional[int] = None, white: str = "known") -> np.ndarray:
  """A mask PNG (any mode, thresholded at grey 128) as float32 (S, S), 1 = known, 0 = hole.

  Args:
    path: a local or gs:// path (etils.epath).
    size: the expected side S; a mask of another shape is an error naming the file.
    white: what white pixels mean: "known" (LFM's evaluation masks) or "hole".
  """
  import io  # pylint: disable=g-import-not-at-top

  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if white not in ("known", "hole"):
    raise ValueError(f"config.data.mask_white must be 'known' or 'hole', got {white!r}")
  path = epath.Path(path)
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
      grey = np.asarray(im.convert("L"))
  except FileNotFoundError as e:
    raise ValueError(f"mask file {path} does not exist") from e
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise ValueError(f"mask file {path} is not a readable image ({type(e).__name__}: {e})") from e
  if size is not None and grey.shape != (size, size):
    raise ValueError(f"mask file {path} is {grey.shape[1]}x{grey.shape[0]}, expected "
                     f"{size}x{size} (config.data.image_size)")
  is_white = grey >= 128
  return (is_white if white == "known" else ~is_white).astype(np.float32)


def model_channel(mask):
  """LFM's mask input: +1 on holes, -1 on known pixels (same shape and array type)."""
  return 1.0 - 2.0 * mask


def masked_image(image, mask):
  """image (..., S, S, C) in [-1, 1] with holes set to -1; mask (..., S, S), 1 = known."""
  m = mask[..., None]
  return image * m - (1.0 - m)


def paste_known(generated, image, mask):
  """generated in the holes, image on the known pixels (both (..., S, S, C))."""
  m = mask[..., None]
  return image * m + generated * (1.0 - m)
