"""Tiny copies of the paper data sets' manual files, in their REAL formats (for tests).

Each writer puts files into a manual dir exactly as the official download lays them out (names,
nesting, encodings), only with few and (where the format allows) small images, and returns what
it wrote so tests can check ids, labels and pixels:

  write_celeb_a_hq_tar   data<R>x<R>.tar            (tfds celeb_a_hq/<R>)
  write_ffhq_tree        images1024x1024/00000/00000.png ...   (lfm_jax ffhq)
  write_lsun_lmdb        <cat>_train_lmdb/ {data.mdb, lock.mdb} or <cat>_train_lmdb.zip
  write_imagenet         ILSVRC2012_img_train.tar (per-synset tars), ILSVRC2012_img_val.tar
  write_celebamask_hq    CelebAMask-HQ.zip or CelebAMask-HQ/ (CelebA-HQ-img/, *-mask-anno/)

`picture(i, size)` is the picture every writer stores as image i: a flat colour that encodes i
(see `colour`) with a white band on its left eighth, so a horizontal flip is visible.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import numpy as np
from PIL import Image


def colour(i: int) -> tuple[int, int, int]:
  """The flat colour of test image i (distinct for i < 1000, away from white)."""
  return (40 + (i * 53) % 160, 40 + (i * 97) % 160, 40 + (i * 29) % 160)


def picture(i: int, size, band: bool = True) -> np.ndarray:
  """uint8 (H, W, 3): colour(i) with a white left band of width W // 8 (size: int or (W, H))."""
  w, h = (size, size) if isinstance(size, int) else size
  image = np.empty((h, w, 3), np.uint8)
  image[:] = colour(i)
  if band:
    image[:, :max(1, w // 8)] = 255
  return image


def encode(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
  """PNG / JPEG / WEBP bytes of an (H, W, 3) or (H, W) uint8 array."""
  buf = io.BytesIO()
  kwargs = {"quality": quality} if fmt.upper() in ("JPEG", "WEBP") else {}
  if fmt.upper() == "WEBP":
    kwargs["lossless"] = True
  Image.fromarray(image).save(buf, format=fmt.upper(), **kwargs)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0
  tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- CelebA-HQ (tfds)


def write_celeb_a_hq_tar(manual_dir, resolution: int, num_images: int, *, size=None,
                         fmt: str = "png") -> dict[str, np.ndarray]:
  """data<R>x<R>.tar holding data<R>x<R>/<iiiii>.<fmt> (R x R; `size` overrides the pixel size
  to make a wrong archive). Returns {member name: image}."""
  size = size or resolution
  os.makedirs(manual_dir, exist_ok=True)
  stem = f"data{resolution}x{resolution}"
  ext = "jpg" if fmt.lower() in ("jpg", "jpeg") else "png"
  written = {}
  with tarfile.open(os.path.join(manual_dir, f"{stem}.tar"), "w") as tar:
    for i in range(num_images):
      name = f"{stem}/{i:05d}.{ext}"
      image = picture(i, size)
      _add(tar, name, encode(image, "JPEG" if ext == "jpg" else "PNG"))
      written[name] = image
  return written


# --------------------------------------------------------------------------- FFHQ


def write_ffhq_tree(manual_dir, num_images: int, size: int = 1024) -> list[str]:
  """images1024x1024/<thousands:05d>/<i:05d>.png, as download_ffhq.py lays them out."""
  paths = []
  for i in range(num_images):
    folder = os.path.join(manual_dir, "images1024x1024", f"{(i // 1000) * 1000:05d}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.png")
    Image.fromarray(picture(i, size)).save(path)
    paths.append(path)
  return paths


# --------------------------------------------------------------------------- LSUN (LMDB)


def lsun_key(category: str, i: int) -> bytes:
  """A 40-hex-digit key like LSUN's (image hashes), unrelated to i's order."""
  return hashlib.sha1(f"{category}/{i}".encode()).hexdigest().encode()


def write_lsun_lmdb(manual_dir, category: str, split: str, num_images: int, *,
                    fmt: str = "webp", as_zip: bool = False, size=(40, 32),
                    first: int = 0) -> list[tuple[bytes, int]]:
  """<category>_<train|val>_lmdb/ (data.mdb, lock.mdb) or its .zip, keys -> encoded images.

  Image i (i = first .. first + num_images - 1) is stored under `lsun_key(category, i)`,
  inserted in i order (LMDB keeps them in key order). Returns [(key, i)] in key order.
  """
  import lmdb  # pylint: disable=g-import-not-at-top

  stem = f"{category}_{'train' if split == 'train' else 'val'}_lmdb"
  folder = os.path.join(manual_dir, stem)
  os.makedirs(folder, exist_ok=True)
  env = lmdb.open(folder, map_size=1 << 26, subdir=True)
  entries = []
  with env.begin(write=True) as txn:
    for i in range(first, first + num_images):
      key = lsun_key(category, i)
      txn.put(key, encode(picture(i, size), "JPEG" if fmt == "jpeg" else fmt))
      entries.append((key, i))
  env.close()
  if as_zip:
    with zipfile.ZipFile(os.path.join(manual_dir, f"{stem}.zip"), "w") as z:
      for name in ("data.mdb", "lock.mdb"):
        z.write(os.path.join(folder, name), f"{stem}/{name}")
    for name in os.listdir(folder):
      os.remove(os.path.join(folder, name))
    os.rmdir(folder)
  return sorted(entries)


# --------------------------------------------------------------------------- ImageNet (tfds)


def imagenet_synsets() -> list[str]:
  from lfm_jax.datasets import manual  # pylint: disable=g-import-not-at-top
  return manual.imagenet_synsets()


def write_imagenet(manual_dir, synset_indices=(0, 1, 999), per_synset: int = 2,
                   num_val: int = 4, size=(48, 40)) -> dict:
  """ILSVRC2012_img_train.tar (n<8>.tar per synset, each with n<8>_<k>.JPEG) and
  ILSVRC2012_img_val.tar (ILSVRC2012_val_<k:08d>.JPEG, k = 1..num_val).

  Returns {"train": {file name: label}, "val": {file name: label}} with tfds' labels (the
  synset's line in tfds' labels.txt; validation image k has the synset on line k of tfds'
  validation_labels.txt).
  """
  from lfm_jax.datasets import manual  # pylint: disable=g-import-not-at-top

  os.makedirs(manual_dir, exist_ok=True)
  synsets = manual.imagenet_synsets()
  out = {"train": {}, "val": {}}
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
    for label in synset_indices:
      syn = synsets[label]
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as inner:
        for k in range(per_synset):
          name = f"{syn}_{k + 1}.JPEG"
          _add(inner, name, encode(picture(label, size), "JPEG"))
          out["train"][name] = label
      _add(outer, f"{syn}.tar", buf.getvalue())
  val_synsets = manual.imagenet_validation_synsets()
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as tar:
    for k in range(1, num_val + 1):
      name = f"ILSVRC2012_val_{k:08d}.JPEG"
      label = synsets.index(val_synsets[k - 1])
      _add(tar, name, encode(picture(label, size), "JPEG"))
      out["val"][name] = label
  return out


# --------------------------------------------------------------------------- CelebAMask-HQ

# Regions drawn into the part masks of every test image, in 512-px mask coordinates
# (row0, row1, col0, col1). hair overlaps skin's top rows (hair is later: it wins there).
CELEBAMASK_REGIONS = {
    "skin": (128, 448, 128, 384),
    "hair": (64, 192, 96, 416),
    "l_eye": (240, 272, 176, 224),
    "r_eye": (240, 272, 288, 336),
    "nose": (288, 336, 240, 272),
}


def celebamask_labels(parts=None, size: int = 512) -> np.ndarray:
  """The (size, size) uint8 class map the regions should give, painted here by hand."""
  from lfm_jax.datasets import celebamask_hq  # pylint: disable=g-import-not-at-top

  labels = np.zeros((size, size), np.uint8)
  s = size / 512
  order = [p for p in celebamask_hq.PARTS if p in (parts or CELEBAMASK_REGIONS)]
  for part in order:
    r0, r1, c0, c1 = (int(round(v * s)) for v in CELEBAMASK_REGIONS[part])
    labels[r0:r1, c0:c1] = celebamask_hq.PARTS.index(part) + 1
  return labels


def write_celebamask_hq(manual_dir, indices=(0, 1, 2, 27000, 27001), *, image_size: int = 1024,
                        mask_size: int = 512, as_zip: bool = True) -> str:
  """CelebAMask-HQ.zip (or the CelebAMask-HQ/ folder) with CelebA-HQ-img/<i>.jpg and
  CelebAMask-HQ-mask-anno/<i // 2000>/<iiiii>_<part>.png (RGB, white = part) for the
  regions of CELEBAMASK_REGIONS (image 1 has no nose mask). Returns the path written."""
  files = {}
  for i in indices:
    files[f"CelebA-HQ-img/{i}.jpg"] = encode(picture(i, image_size), "JPEG")
    for part, (r0, r1, c0, c1) in CELEBAMASK_REGIONS.items():
      if i == 1 and part == "nose":
        continue
      s = mask_size / 512
      binary = np.zeros((mask_size, mask_size, 3), np.uint8)
      binary[int(r0 * s):int(r1 * s), int(c0 * s):int(c1 * s)] = 255
      files[f"CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png"] = encode(binary, "PNG")
  files["CelebAMask-HQ-attribute-anno.txt"] = b"30000\n"
  os.makedirs(manual_dir, exist_ok=True)
  if as_zip:
    path = os.path.join(manual_dir, "CelebAMask-HQ.zip")
    with zipfile.ZipFile(path, "w") as z:
      for name, data in files.items():
        z.writestr(f"CelebAMask-HQ/{name}", data)
    return path
  root = os.path.join(manual_dir, "CelebAMask-HQ")
  for name, data in files.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return root


# --------------------------------------------------------------------------- damage


def truncate(path, keep: float = 0.5, nbytes=None) -> None:
  """Cuts a file to a fraction of its size, or to nbytes (a broken download)."""
  size = os.path.getsize(path) if nbytes is None else None
  with open(path, "r+b") as f:
    f.truncate(int(size * keep) if nbytes is None else int(nbytes))


def garbage(path, nbytes: int = 4096) -> None:
  """Replaces a file with bytes that are no archive."""
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
