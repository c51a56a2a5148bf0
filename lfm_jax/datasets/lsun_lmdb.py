"""`lfm_lsun`: LSUN scene categories from the official LMDB files (manual dir), in LMDB key order.

tfds' own `lsun` builder downloads and needs tensorflow-io; this one reads what the official
download (https://github.com/fyu/lsun, `python download.py -c church_outdoor`) gives, offline:

  <manual_dir>/<category>_train_lmdb/   (data.mdb, lock.mdb)   or  <category>_train_lmdb.zip
  <manual_dir>/<category>_val_lmdb/     or  <category>_val_lmdb.zip     (optional: `validation`)

An LMDB maps keys (image hashes) to encoded images: WebP in the current release, JPEG in the
first. JPEG bytes are stored as they are; other formats are decoded with Pillow and stored as PNG
(lossless), so the pixels are the ones Pillow decodes, as torchvision's LSUN loader sees them.
A zip is extracted to a temporary folder next to the tfds downloads and removed after preparing.

Splits `train` and `validation` in LMDB key order (the order of an LMDB cursor, which torchvision's
`LSUN` and LFM's loader use): `id` = index in the split = position in key order, `key` = the LMDB
key. Config `<category>` stores every train image; `<category>_first<N>` only the first N train
keys (LFM trains on the first 120,000: bedroom's 3M images need not be prepared). The first N ids
are the same in both.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lfm_jax.datasets import manual

CATEGORIES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room",
              "dining_room", "kitchen", "living_room", "restaurant", "tower")
_SPLIT_FILES = {"train": "train", "validation": "val"}


class LsunConfig(tfds.core.BuilderConfig):
  """One LSUN category; `max_train_examples` keeps only the first N train keys."""

  def __init__(self, *, category: str, max_train_examples: Optional[int] = None, **kwargs):
    if category not in CATEGORIES:
      raise ValueError(f"lfm_lsun: unknown category {category!r}; one of {CATEGORIES}")
    if max_train_examples is not None and max_train_examples < 1:
      raise ValueError(f"lfm_lsun: max_train_examples must be positive, got "
                       f"{max_train_examples}")
    name = category if max_train_examples is None else f"{category}_first{max_train_examples}"
    first = "" if max_train_examples is None else f", the first {max_train_examples} train keys"
    super().__init__(name=name, description=f"LSUN {category}{first}", **kwargs)
    self.category = category
    self.max_train_examples = max_train_examples


def make_config(category: str, max_train_examples: Optional[int] = None) -> LsunConfig:
  """The (possibly non-predefined) config; pass it as `tfds.builder("lfm_lsun", config=...)`."""
  for c in LfmLsun.BUILDER_CONFIGS:
    if c.category == category and c.max_train_examples == max_train_examples:
      return c
  return LsunConfig(category=category, max_train_examples=max_train_examples)


def find_lmdb(manual_dir, category: str, split: str) -> Optional[epath.Path]:
  """The LMDB folder (holding data.mdb) or zip of a category's split, or None."""
  manual_dir = epath.Path(manual_dir)
  stem = f"{category}_{_SPLIT_FILES[split]}_lmdb"
  folder = manual_dir / stem
  if (folder / "data.mdb").exists():
    return folder
  if (manual_dir / f"{stem}.zip").exists():
    return manual_dir / f"{stem}.zip"
  return None


def _open_env(folder: str, where):
  import lmdb  # pylint: disable=g-import-not-at-top

  try:
    return lmdb.open(folder, readonly=True, lock=False, readahead=False, meminit=False,
                     max_readers=1, subdir=True)
  except lmdb.Error as e:
    raise manual.ManualFileError(f"{where} is not a readable LMDB ({e})") from e


def _zip_member(path: epath.Path) -> str:
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as z:
      names = [n for n in z.namelist() if n.endswith("data.mdb")]
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise manual.ManualFileError(f"{path} is not a readable zip archive ({e})") from e
  if not names:
    raise manual.ManualFileError(f"{path} holds no data.mdb (the LSUN LMDB)")
  return names[0]


@contextlib.contextmanager
def open_lmdb(path: epath.Path, scratch_dir: Optional[str] = None) -> Iterator:
  """An open, read-only lmdb Environment of an LMDB folder or zip (extracted to scratch)."""
  tmp = None
  try:
    if str(path).endswith(".zip"):
      member = _zip_member(path)
      if scratch_dir:
        os.makedirs(scratch_dir, exist_ok=True)
      tmp = tempfile.mkdtemp(prefix="lfm_lsun_", dir=scratch_dir)
      with path.open("rb") as f, zipfile.ZipFile(f) as z, z.open(member) as src, open(
          os.path.join(tmp, "data.mdb"), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      folder = tmp
    elif os.path.isdir(os.fspath(path)):
      folder = os.fspath(path)
    else:  # not local (e.g. gs://): copy data.mdb to a local scratch folder
      tmp = tempfile.mkdtemp(prefix="lfm_lsun_", dir=scratch_dir)
      (path / "data.mdb").copy(epath.Path(tmp) / "data.mdb")
      folder = tmp
    env = _open_env(folder, path)
    try:
      yield env
    finally:
      env.close()
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def _is_jpeg(data: bytes) -> bool:
  return data[:3] == b"\xff\xd8\xff"


def _decode(value: bytes, where: str):
  """JPEG bytes as they are, anything else decoded to an RGB uint8 array (stored as PNG)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top

  if _is_jpeg(value):
    return value
  try:
    with Image.open(io.BytesIO(value)) as im:
      return np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise manual.ManualFileError(f"{where} is not an image ({type(e).__name__}: {e})") from e


def check_lmdb(path: epath.Path) -> int:
  """Opens an LMDB folder (or checks a zip's layout); returns its entry count (-1 for zips)."""
  if str(path).endswith(".zip"):
    _zip_member(path)
    return -1
  with open_lmdb(path) as env:
    with env.begin(write=False) as txn:
      entries = int(txn.stat()["entries"])
      if entries == 0:
        raise manual.ManualFileError(f"{path} is an empty LMDB")
      key, value = next(iter(txn.cursor()))
      manual.check_image_bytes(bytes(value), f"{path} key {bytes(key).decode(errors='replace')}")
  return entries


def manual_files(config: LsunConfig, manual_dir) -> manual.ManualFiles:
  train = find_lmdb(manual_dir, config.category, "train")

  def check():
    check_lmdb(train)
    val = find_lmdb(manual_dir, config.category, "validation")
    if val is not None:
      check_lmdb(val)

  c = config.category
  return manual.ManualFiles(
      train is not None,
      f"put {c}_train_lmdb/ (data.mdb) or {c}_train_lmdb.zip, and {c}_val_lmdb[.zip] for the "
      f"validation split (https://github.com/fyu/lsun: `python download.py -c {c}`) in "
      f"{manual_dir}", check)


class LfmLsun(tfds.core.GeneratorBasedBuilder):
  """LSUN from the official LMDB folders or zips, in LMDB key order (see the module doc)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = ([LsunConfig(category=c) for c in ("church_outdoor", "bedroom")]
                     + [LsunConfig(category=c, max_train_examples=120_000)
                        for c in ("church_outdoor", "bedroom")]
                     + [LsunConfig(category=c) for c in CATEGORIES
                        if c not in ("church_outdoor", "bedroom")])
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put <category>_train_lmdb/ (data.mdb) or <category>_train_lmdb.zip, and optionally
  <category>_val_lmdb[.zip], from https://github.com/fyu/lsun (download.py) in manual_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "id": tfds.features.Scalar(dtype=np.int64),
            "key": tfds.features.Text(),
        }),
        homepage="https://www.yf.io/p/lsun",
        disable_shuffling=True,  # stored order == LMDB key order == `id`
    )

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    c = self.builder_config.category
    train = find_lmdb(manual_dir, c, "train")
    if train is None:
      raise manual.DatasetNotAvailableError(
          f"No LSUN {c} train LMDB in {manual_dir}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    scratch = None
    if not os.fspath(dl_manager.download_dir).startswith("gs://"):
      scratch = os.path.join(os.fspath(dl_manager.download_dir), "extracted")
    splits = {"train": self._generate_examples(train, self.builder_config.max_train_examples,
                                               scratch)}
    val = find_lmdb(manual_dir, c, "validation")
    if val is not None:
      splits["validation"] = self._generate_examples(val, None, scratch)
    return splits

  def _generate_examples(self, path, limit, scratch):
    with open_lmdb(path, scratch) as env, env.begin(write=False) as txn:
      for i, (key, value) in enumerate(txn.cursor()):
        if limit is not None and i >= limit:
          break
        key = bytes(key).decode("ascii", errors="replace")
        yield i, {"image": _decode(bytes(value), f"{path} key {key}"), "id": i, "key": key}
