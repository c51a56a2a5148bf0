"""Image grids: (N, H, W, C) images in [-1, 1] -> one uint8 PNG (local path or gs://)."""

import io
import math
from typing import Optional

import numpy as np

from lfm_jax import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped), the quantisation of a saved PNG."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one uint8 (rows*H', cols*W', C) grid (C in {1, 3})."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image_grid expects (N, H, W, C), got {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  pixels = to_uint8(images)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
  return grid


def png_bytes(array: np.ndarray) -> bytes:
  """A uint8 (H, W) / (H, W, 1) / (H, W, 3) array encoded as PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def save_image_grid(images: np.ndarray, path: storage.PathLike, ncols: Optional[int] = None) -> str:
  """Writes image_grid(images) as a PNG at path (directories created); returns the path."""
  storage.write_bytes(path, png_bytes(image_grid(images, ncols)))
  return storage.display(path)
