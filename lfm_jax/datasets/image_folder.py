"""`lfm_image_folder`: any folder of images as a tfds data set (prepared offline, cached).

Accepted layouts (image files: png, jpg, jpeg, bmp, gif, webp, tif, tiff; case-insensitive):

  root/*.png                          one split "train", unlabelled (label 0, num_classes 0)
  root/<class>/*.png                  one split "train", classes = sorted sub-folder names
  root/<split>/[<class>/]*.png        splits named train | test | validation | val | valid

Images are decoded with Pillow, converted to RGB and stored as PNG at their own size (the input
pipeline resizes/crops). Examples are stored in sorted relative-path order, so `id` (the index in
the split) is stable. The config name carries a fingerprint of the file list (paths, sizes,
mtimes): changing the folder prepares a new copy instead of reading a stale one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from lfm_jax import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "test", "validation", "val", "valid")


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _root(path: str):
  """The folder as a storage path (local paths made absolute, `~` expanded; gs:// as given)."""
  if storage.is_remote(path):
    return storage.path(path)
  return storage.path(os.path.abspath(os.path.expanduser(path)))


def _images_under(path) -> list[str]:
  """Image files under `path`, recursively, as sorted paths relative to `path`."""
  root = storage.path(path)
  found = []
  for dirpath, dirnames, filenames in root.walk():
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = str(dirpath)[len(str(root)):].strip("/")
    for f in filenames:
      if _is_image(f):
        found.append(f"{rel}/{f}" if rel else f)
  return sorted(found)


def _subdirs(path) -> list[str]:
  return sorted(p.name for p in storage.path(path).iterdir()
                if p.is_dir() and not p.name.startswith("."))


def scan(root: str) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
  """Returns ({split: [(absolute path, label)]}, class names) for a folder (see module doc)."""
  top_dir = _root(root)
  root = storage.display(top_dir)
  if not top_dir.is_dir():
    raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
  split_dirs = [d for d in _subdirs(top_dir) if d.lower() in SPLIT_NAMES]
  if split_dirs:
    split_roots = {d.lower(): top_dir / d for d in split_dirs}
  else:
    split_roots = {"train": top_dir}
  classes = sorted({c for r in split_roots.values() for c in _subdirs(r)})
  splits = {}
  for split, split_root in split_roots.items():
    files = []
    top = sorted(p.name for p in split_root.iterdir() if _is_image(p.name) and p.is_file())
    if classes and top:
      raise ValueError(
          f"image folder {storage.display(split_root)!r} mixes loose images ({top[0]!r}, ...) "
          f"with class sub-folders {classes[:3]}...; put every image in a class folder or none.")
    if classes:
      for label, c in enumerate(classes):
        cdir = split_root / c
        if cdir.is_dir():
          files += [(storage.display(cdir / f), label) for f in _images_under(cdir)]
    else:
      files = [(storage.display(split_root / f), 0) for f in top]
    if not files:
      raise ValueError(f"image folder {storage.display(split_root)!r} holds no images "
                       f"({IMAGE_EXTENSIONS})")
    splits[split] = files
  return splits, classes


def fingerprint(root: str) -> str:
  """Short hash of the folder's image list (relative path, size, mtime)."""
  top_dir = _root(root)
  h = hashlib.sha1(storage.display(top_dir).encode())
  for rel in _images_under(top_dir):
    st = (top_dir / rel).stat()
    h.update(f"{rel}\0{st.length}\0{int(st.mtime)}\n".encode())
  return h.hexdigest()[:10]


class ImageFolderConfig(tfds.core.BuilderConfig):
  """One folder of images; the name identifies the folder and its contents."""

  def __init__(self, *, root_dir: str, **kwargs):
    root_dir = storage.display(_root(root_dir))
    slug = re.sub(r"[^a-z0-9_]+", "_", root_dir.rstrip("/").rsplit("/", 1)[-1].lower())
    super().__init__(name=f"{slug or 'root'}_{fingerprint(root_dir)}",
                     description=f"Images under {root_dir}", **kwargs)
    self.root_dir = root_dir


class LfmImageFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of images (optional split and class sub-folders); see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = []  # always built with config=ImageFolderConfig(root_dir=...)

  def _info(self) -> tfds.core.DatasetInfo:
    _, classes = scan(self.builder_config.root_dir)
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "id": tfds.features.Scalar(dtype=np.int64),
        "image/filename": tfds.features.Text(),
    }
    if classes:
      features["label"] = tfds.features.ClassLabel(names=classes)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,  # stored order == sorted path order == `id`
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    splits, classes = scan(self.builder_config.root_dir)
    return {name: self._generate_examples(files, bool(classes))
            for name, files in splits.items()}

  def _generate_examples(self, files, labelled):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    root = self.builder_config.root_dir
    for i, (path, label) in enumerate(files):
      with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        image = np.asarray(im.convert("RGB"))
      ex = {"image": image, "id": i, "image/filename": path[len(root):].lstrip("/")}
      if labelled:
        ex["label"] = label
      yield i, ex
