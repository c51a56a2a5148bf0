"""`lfm_digits`: scikit-learn's bundled 8x8 digits as a tfds data set (offline).

1,797 grey-level images of the digits 0-9 ship inside scikit-learn
(`sklearn.datasets.load_digits`, values 0..16). This builder rescales them to uint8 (0..255),
upsamples them bilinearly to the configured resolution (bilinear gives better samples than nearest here),
optionally repeats the grey channel to RGB, and writes a fixed, deterministic, stratified
80/20 train/test split (seed 0): 1,437 train and 360 test examples.

Features: `image` uint8 (R, R, C), `label` ClassLabel(10), `id` int64 = the example's index in
its split (the stored order is the index order, so it equals the position the input pipeline
reports), `source_index` int64 = the row in `load_digits()`.

Preparing needs no network and takes seconds; tfds caches the result in its data dir.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
TEST_FRACTION = 0.2
_RESOLUTIONS = (8, 16, 32, 64)


def config_name(resolution: int, channels: int) -> str:
  """The BuilderConfig name for a resolution and channel count, e.g. "16x16_gray"."""
  if channels not in (1, 3):
    raise ValueError(f"lfm_digits: channels must be 1 or 3, got {channels}")
  return f"{resolution}x{resolution}_{'gray' if channels == 1 else 'rgb'}"


class LfmDigitsConfig(tfds.core.BuilderConfig):
  """Resolution and channel count of the prepared digits."""

  def __init__(self, *, resolution: int, channels: int, **kwargs):
    if resolution < 1:
      raise ValueError(f"lfm_digits: resolution must be positive, got {resolution}")
    super().__init__(
        name=config_name(resolution, channels),
        description=(
            f"sklearn 8x8 digits bilinearly resampled to {resolution}x{resolution}, "
            f"{channels} channel(s)."),
        **kwargs)
    self.resolution = resolution
    self.channels = channels


def make_config(resolution: int, channels: int) -> LfmDigitsConfig:
  """A (possibly non-predefined) config; pass it as `tfds.builder("lfm_digits", config=...)`."""
  for c in LfmDigits.BUILDER_CONFIGS:
    if c.resolution == resolution and c.channels == channels:
      return c
  return LfmDigitsConfig(resolution=resolution, channels=channels)


def upsample_bilinear(images: np.ndarray, resolution: int) -> np.ndarray:
  """(N, h, w) float images in [0, 255] -> (N, R, R) uint8, bilinear (half-pixel centres)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  out = np.empty((images.shape[0], resolution, resolution), np.uint8)
  for i, im in enumerate(images.astype(np.float32)):
    pil = Image.fromarray(im, mode="F")
    if pil.size != (resolution, resolution):
      pil = pil.resize((resolution, resolution), Image.BILINEAR)
    out[i] = np.clip(np.rint(np.asarray(pil)), 0, 255).astype(np.uint8)
  return out


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Deterministic stratified 80/20 split of the sklearn rows; each split's rows sorted."""
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  idx = np.arange(len(labels))
  train, test = train_test_split(
      idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
  return {"train": np.sort(train), "test": np.sort(test)}


class LfmDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits, upsampled, with a fixed stratified train/test split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      LfmDigitsConfig(resolution=16, channels=1),  # default (first)
      LfmDigitsConfig(resolution=32, channels=1),
      LfmDigitsConfig(resolution=16, channels=3),
      LfmDigitsConfig(resolution=32, channels=3),
      LfmDigitsConfig(resolution=8, channels=1),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    r, c = self.builder_config.resolution, self.builder_config.channels
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, c), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            "id": tfds.features.Scalar(dtype=np.int64),
            "source_index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
        disable_shuffling=True,  # stored order == index order == `id`
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ship with scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = digits.images * (255.0 / 16.0)
    labels = digits.target.astype(np.int64)
    images = upsample_bilinear(images, self.builder_config.resolution)[..., None]
    if self.builder_config.channels == 3:
      images = np.repeat(images, 3, axis=-1)
    return {
        name: self._generate_examples(images=images, labels=labels, rows=rows)
        for name, rows in split_indices(labels).items()
    }

  def _generate_examples(self, images, labels, rows):
    for i, row in enumerate(rows):
      yield i, {
          "image": images[row],
          "label": int(labels[row]),
          "id": i,
          "source_index": int(row),
      }
