"""`celebamask_hq`: CelebAMask-HQ faces with 19-class face-parsing maps, from the official files.

Manual dir: the official `CelebAMask-HQ.zip` (https://github.com/switchablenorms/CelebAMask-HQ)
or its unpacked folder `CelebAMask-HQ/`:

  CelebAMask-HQ/CelebA-HQ-img/<i>.jpg                                 i = 0 .. 29999, 1024 x 1024
  CelebAMask-HQ/CelebAMask-HQ-mask-anno/<i // 2000>/<iiiii>_<part>.png   512 x 512, white = part

The 18 binary part masks of an image merge into one label map: class 0 is background and part
k of `PARTS` is class k + 1, a later part overwriting an earlier one where they overlap. `PARTS` is
the order of LFM's preprocess_celeb_mask.py (the face-parsing.PyTorch order), so class ids match
LFM's semantic-synthesis checkpoints; the official g_mask.py numbers the same 18 parts in another
order (`G_MASK_PARTS`). A mask pixel belongs to its part when it is white (grey level >= 128).

Features: `image` uint8 (R, R, 3) PNG, bicubic (antialiased) from the source; `segmentation` uint8
(R, R, 1) PNG of class ids, nearest from the 512 masks; `id` int64 = index in the split;
`image/index` int64 = the CelebA-HQ image number i.
Splits (LFM's): `train` = images 0 .. 26999, `test` = images 27000 .. 29999, each in image-number
order (`id` 0 of `test` is image 27000). Missing part files mean the part is absent.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lfm_jax.datasets import manual

PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
         "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
G_MASK_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CLASS_NAMES = ("background",) + PARTS
NUM_CLASSES = len(CLASS_NAMES)  # 19
NUM_TRAIN = 27_000  # LFM: images 0..26999 train, 27000..29999 test
NUM_IMAGES = 30_000
IMAGES_PER_FOLDER = 2_000


def _flip_permutation() -> np.ndarray:
  """Class ids after a horizontal flip: left and right parts swap."""
  perm = np.arange(NUM_CLASSES)
  for a, b in (("l_brow", "r_brow"), ("l_eye", "r_eye"), ("l_ear", "r_ear")):
    i, j = CLASS_NAMES.index(a), CLASS_NAMES.index(b)
    perm[i], perm[j] = j, i
  return perm


FLIP_PERMUTATION = _flip_permutation()
_IMAGE = re.compile(r"^(\d+)\.jpg$")


class _Source:
  """The CelebAMask-HQ tree inside a zip or a folder; names relative to CelebAMask-HQ/."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._zip = None
    if str(path).endswith(".zip"):
      try:
        self._file = path.open("rb")
        self._zip = zipfile.ZipFile(self._file)
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise manual.ManualFileError(f"{path} is not a readable zip archive ({e})") from e
      names = [n for n in self._zip.namelist() if not n.endswith("/")]
      roots = {n[:n.index("CelebA-HQ-img/")] for n in names if "CelebA-HQ-img/" in n}
      if not roots:
        raise manual.ManualFileError(f"{path} holds no CelebA-HQ-img/ folder")
      self._root = sorted(roots, key=len)[0]
      k = len(self._root)
      self._names = {n[k:] for n in names if n.startswith(self._root)}
    else:
      root = os.fspath(path)
      self._names = set()
      for sub in ("CelebA-HQ-img", "CelebAMask-HQ-mask-anno"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, sub)):
          dirnames[:] = [d for d in dirnames if not d.startswith(".")]
          rel = os.path.relpath(dirpath, root)
          self._names.update(f"{rel}/{f}".replace(os.sep, "/") for f in filenames)

  def images(self) -> list[int]:
    """Sorted image numbers present in CelebA-HQ-img/."""
    found = []
    for n in self._names:
      if n.startswith("CelebA-HQ-img/"):
        m = _IMAGE.match(n[len("CelebA-HQ-img/"):])
        if m:
          found.append(int(m.group(1)))
    return sorted(found)

  def has(self, name: str) -> bool:
    return name in self._names

  def read(self, name: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(self._root + name)
    with open(os.path.join(os.fspath(self.path), name), "rb") as f:
      return f.read()

  def where(self, name: str) -> str:
    return f"{self.path}:{name}" if self._zip is not None else os.path.join(str(self.path), name)

  def close(self):
    if self._zip is not None:
      self._zip.close()
      self._file.close()


def find_source(manual_dir) -> Optional[epath.Path]:
  """CelebAMask-HQ.zip or the CelebAMask-HQ/ folder in manual_dir (or manual_dir itself)."""
  manual_dir = epath.Path(manual_dir)
  for candidate in (manual_dir / "CelebAMask-HQ", manual_dir):
    if (candidate / "CelebA-HQ-img").is_dir():
      return candidate
  if (manual_dir / "CelebAMask-HQ.zip").exists():
    return manual_dir / "CelebAMask-HQ.zip"
  return None


def mask_name(index: int, part: str) -> str:
  return (f"CelebAMask-HQ-mask-anno/{index // IMAGES_PER_FOLDER}/"
          f"{index:05d}_{part}.png")


def _read_part(src: _Source, name: str, shape) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(src.read(name))) as im:
      part = np.asarray(im.convert("L")) >= 128
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise manual.ManualFileError(
        f"{src.where(name)} is not a readable image ({type(e).__name__}: {e})") from e
  if shape is not None and part.shape != shape:
    raise manual.ManualFileError(f"{src.where(name)} is {part.shape[1]}x{part.shape[0]}, but "
                                 f"the other masks of image are {shape[1]}x{shape[0]}")
  return part


def label_map(src: _Source, index: int) -> np.ndarray:
  """(H, W) uint8 class ids of image `index`, at the masks' own size (512 officially)."""
  labels = None
  for k, part in enumerate(PARTS, 1):
    name = mask_name(index, part)
    if src.has(name):
      binary = _read_part(src, name, None if labels is None else labels.shape)
      if labels is None:
        labels = np.zeros(binary.shape, np.uint8)
      labels[binary] = k
  return labels


def check_source(path: epath.Path) -> int:
  """Checks the layout and the first image and masks; returns the number of images."""
  src = _Source(path)
  try:
    images = src.images()
    if not images:
      raise manual.ManualFileError(f"{path} holds no CelebA-HQ-img/<i>.jpg images")
    if not any(n.startswith("CelebAMask-HQ-mask-anno/") for n in src._names):  # pylint: disable=protected-access
      raise manual.ManualFileError(f"{path} holds no CelebAMask-HQ-mask-anno/ folder")
    first = f"CelebA-HQ-img/{images[0]}.jpg"
    manual.check_image_bytes(src.read(first), src.where(first), square=True)
    labels = label_map(src, images[0])
    if labels is not None and labels.shape[0] != labels.shape[1]:
      raise manual.ManualFileError(f"the masks of image {images[0]} in {path} are not square")
    return len(images)
  finally:
    src.close()


def manual_files(manual_dir) -> manual.ManualFiles:
  path = find_source(manual_dir)
  return manual.ManualFiles(
      path is not None,
      f"put CelebAMask-HQ.zip (https://github.com/switchablenorms/CelebAMask-HQ) or its "
      f"unpacked CelebAMask-HQ/ folder in {manual_dir}", lambda: check_source(path))


class CelebAMaskHqConfig(tfds.core.BuilderConfig):

  def __init__(self, *, resolution: int, **kwargs):
    super().__init__(name=str(resolution),
                     description=f"CelebAMask-HQ at {resolution}x{resolution}", **kwargs)
    self.resolution = resolution


def make_config(resolution: int) -> CelebAMaskHqConfig:
  for c in CelebamaskHq.BUILDER_CONFIGS:
    if c.resolution == resolution:
      return c
  return CelebAMaskHqConfig(resolution=resolution)


class CelebamaskHq(tfds.core.GeneratorBasedBuilder):
  """CelebAMask-HQ images and merged 19-class label maps (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [CelebAMaskHqConfig(resolution=256), CelebAMaskHqConfig(resolution=512),
                     CelebAMaskHqConfig(resolution=128)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put CelebAMask-HQ.zip (https://github.com/switchablenorms/CelebAMask-HQ) or its unpacked
  CelebAMask-HQ/ folder (CelebA-HQ-img/, CelebAMask-HQ-mask-anno/) in manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "segmentation": tfds.features.Image(shape=(r, r, 1), encoding_format="png"),
            "id": tfds.features.Scalar(dtype=np.int64),
            "image/index": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://github.com/switchablenorms/CelebAMask-HQ",
        disable_shuffling=True,  # stored order == image-number order == `id`
    )

  def _split_generators(self, dl_manager):
    path = find_source(dl_manager.manual_dir)
    if path is None:
      raise manual.DatasetNotAvailableError(
          f"No CelebAMask-HQ in {dl_manager.manual_dir}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    src = _Source(path)
    images = src.images()
    src.close()
    train = [i for i in images if i < NUM_TRAIN]
    test = [i for i in images if i >= NUM_TRAIN]
    splits = {}
    if train:
      splits["train"] = self._generate_examples(path, train)
    if test:
      splits["test"] = self._generate_examples(path, test)
    return splits

  def _generate_examples(self, path, indices):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    r = self.builder_config.resolution
    src = _Source(path)
    try:
      for i, index in enumerate(indices):
        name = f"CelebA-HQ-img/{index}.jpg"
        try:
          with Image.open(io.BytesIO(src.read(name))) as im:
            im = im.convert("RGB")
        except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
          raise manual.ManualFileError(
              f"{src.where(name)} is not a readable image ({type(e).__name__}: {e})") from e
        if im.size[0] != im.size[1]:
          raise manual.ManualFileError(f"{src.where(name)} is {im.size[0]}x{im.size[1]}; "
                                       f"CelebA-HQ images are square")
        if im.size != (r, r):
          im = im.resize((r, r), Image.BICUBIC)
        labels = label_map(src, index)
        if labels is None:
          labels = np.zeros((r, r), np.uint8)
        elif labels.shape != (r, r):
          labels = np.asarray(Image.fromarray(labels).resize((r, r), Image.NEAREST))
        yield i, {"image": np.asarray(im), "segmentation": labels[..., None], "id": i,
                  "image/index": index}
    finally:
      src.close()
