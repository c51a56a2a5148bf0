"""`ffhq`: Flickr-Faces-HQ from the official PNG folder (manual download), e.g. at 256x256.

tfds does not ship FFHQ. Put the official images (https://github.com/NVlabs/ffhq-dataset:
`python download_ffhq.py --images` gives `images1024x1024/00000/00000.png` ... 70,000 PNGs)
in the manual dir; any folder holding the 70,000 numbered PNGs (flat or in the 1,000-image
sub-folders, at 1024 or already at the target resolution) works. Images whose size differs from
the config's resolution are resized with Pillow's Lanczos filter (the filter the usual FFHQ-256
preparations use). One split, `train`, in file-name order: `id` = index = the FFHQ image number
when all 70,000 are present (NVAE's and LFM's split is `train[:90%]` = the first 63,000).
A PNG that is not square or not readable stops the preparation with an error naming it.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from lfm_jax import storage
from lfm_jax.datasets import manual

NUM_IMAGES = 70_000


def find_pngs(manual_dir: str) -> list[str]:
  """PNG paths under manual_dir (local or gs://; prefers an `images1024x1024` sub-folder),
  sorted by file name."""
  if not manual_dir or not storage.path(manual_dir).is_dir():
    return []
  root = storage.path(manual_dir)
  for candidate in ("images1024x1024", "ffhq", "FFHQ"):
    if (root / candidate).is_dir():
      root = root / candidate
      break
  found = []
  for dirpath, dirnames, filenames in root.walk():
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    found += [storage.display(dirpath / f) for f in filenames if f.lower().endswith(".png")]
  return sorted(found, key=lambda p: (p.rsplit("/", 1)[-1], p))


def manual_files(manual_dir) -> manual.ManualFiles:
  """The PNG tree under manual_dir: present?, instructions, check of the first PNG."""
  files = find_pngs(str(manual_dir))

  def check():
    manual.check_image_bytes(storage.read_bytes(files[0]), files[0], square=True)

  return manual.ManualFiles(
      bool(files),
      f"put the official FFHQ PNGs (https://github.com/NVlabs/ffhq-dataset: "
      f"`python download_ffhq.py --images` -> images1024x1024/00000/00000.png ...) in "
      f"{manual_dir}/images1024x1024/", check)


class FfhqConfig(tfds.core.BuilderConfig):

  def __init__(self, *, resolution: int, **kwargs):
    super().__init__(name=str(resolution),
                     description=f"FFHQ at {resolution}x{resolution}", **kwargs)
    self.resolution = resolution


class Ffhq(tfds.core.GeneratorBasedBuilder):
  """FFHQ (70,000 aligned faces) from the official PNGs in the manual dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [FfhqConfig(resolution=256), FfhqConfig(resolution=128),
                     FfhqConfig(resolution=512), FfhqConfig(resolution=1024)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Put the official FFHQ PNGs (https://github.com/NVlabs/ffhq-dataset,
  `python download_ffhq.py --images` -> images1024x1024/00000/00000.png ...) in manual_dir,
  e.g. <manual_dir>/images1024x1024/. 70,000 PNGs, 1024x1024 (they are resized).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "id": tfds.features.Scalar(dtype=np.int64),
            "image/filename": tfds.features.Text(),
        }),
        homepage="https://github.com/NVlabs/ffhq-dataset",
        disable_shuffling=True,  # stored order == file-name order == `id`
    )

  def _split_generators(self, dl_manager):
    files = find_pngs(str(dl_manager.manual_dir))
    if not files:
      raise FileNotFoundError(
          f"No FFHQ PNGs under {dl_manager.manual_dir}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {"train": self._generate_examples(files)}

  def _generate_examples(self, files):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    r = self.builder_config.resolution
    for i, path in enumerate(files):
      try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
          im = im.convert("RGB")
      except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
        raise manual.ManualFileError(
            f"{path} is not a readable image ({type(e).__name__}: {e})") from e
      if im.size[0] != im.size[1]:
        raise manual.ManualFileError(
            f"{path} is {im.size[0]}x{im.size[1]}; FFHQ images are square")
      if im.size != (r, r):
        im = im.resize((r, r), Image.LANCZOS)
      image = np.asarray(im)
      yield i, {"image": image, "id": i, "image/filename": path.rsplit("/", 1)[-1]}
