"""tfds builders of lfm_jax.datasets: lfm_digits, ffhq, lfm_image_folder (real files, tmp dirs)."""

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lfm_jax.datasets import ffhq  # noqa: F401
from lfm_jax.datasets import image_folder
from lfm_jax.datasets import lfm_digits

_OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)


def _write_png(path, size, color, mode="RGB"):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, color).save(path)


def test_lfm_digits_prepares_fast_with_fixed_split(tmp_path):
  builder = tfds.builder("lfm_digits", data_dir=str(tmp_path))
  assert builder.builder_config.name == "16x16_gray"  # the default config
  t0 = time.perf_counter()
  builder.download_and_prepare(download_config=_OFFLINE)
  prepare_seconds = time.perf_counter() - t0
  print(f"lfm_digits/16x16_gray prepared in {prepare_seconds:.2f} s")
  assert prepare_seconds < 30.0
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["test"].num_examples == 1797
  assert splits["test"].num_examples == 360
  assert builder.info.features["label"].num_classes == 10

  seen = {}
  for split in ("train", "test"):
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    assert ex["image"].shape == (splits[split].num_examples, 16, 16, 1)
    assert ex["image"].dtype == np.uint8 and ex["image"].max() == 255
    np.testing.assert_array_equal(ex["id"], np.arange(len(ex["id"])))  # stored in id order
    assert set(np.unique(ex["label"])) == set(range(10))
    seen[split] = ex["source_index"]
  both = np.concatenate([seen["train"], seen["test"]])
  np.testing.assert_array_equal(np.sort(both), np.arange(1797))  # a partition of sklearn's rows

  # The split and the pixels are deterministic: the first test example is the same row and
  # image as a direct computation gives.
  from sklearn.datasets import load_digits
  digits = load_digits()
  row = int(seen["test"][0])
  direct = lfm_digits.upsample_bilinear(digits.images[row:row + 1] * (255 / 16), 16)[0]
  ex0 = next(iter(tfds.as_numpy(builder.as_dataset(split="test").take(1))))
  np.testing.assert_array_equal(ex0["image"][..., 0], direct)
  assert ex0["label"] == digits.target[row]


def test_lfm_digits_rgb_and_custom_resolution(tmp_path):
  builder = tfds.builder("lfm_digits/32x32_rgb", data_dir=str(tmp_path))
  assert builder.info.features["image"].shape == (32, 32, 3)
  custom = tfds.builder("lfm_digits", config=lfm_digits.make_config(24, 1), data_dir=str(tmp_path))
  assert custom.builder_config.name == "24x24_gray"
  assert custom.info.features["image"].shape == (24, 24, 1)


def test_bilinear_upsampling_is_smooth():
  img = np.zeros((1, 8, 8), np.float32)
  img[0, :, 4:] = 255.0
  up = lfm_digits.upsample_bilinear(img, 16)[0]
  assert up.shape == (16, 16)
  # Bilinear makes intermediate values at the edge (nearest would not).
  assert 0 < up[0, 7] < 255 and 0 < up[0, 8] < 255


def test_image_folder_builder_with_classes(tmp_path):
  root = tmp_path / "pics"
  for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 255, 0))):
    for i in range(3):
      _write_png(str(root / cls / f"{i}.png"), (10 + i, 12), color)
  _write_png(str(root / "dog" / "gray.png"), (9, 9), 128, mode="L")  # converted to RGB
  builder = tfds.builder("lfm_image_folder",
                         config=image_folder.ImageFolderConfig(root_dir=str(root)),
                         data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=_OFFLINE)
  assert builder.info.features["label"].names == ["cat", "dog"]
  exs = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert len(exs) == 7
  assert [int(e["id"]) for e in exs] == list(range(7))
  names = [e["image/filename"].decode() for e in exs]
  assert names == sorted(names)
  assert [int(e["label"]) for e in exs] == [0, 0, 0, 1, 1, 1, 1]
  assert all(e["image"].shape[-1] == 3 for e in exs)
  np.testing.assert_array_equal(exs[0]["image"][0, 0], [255, 0, 0])

  # Changing the folder changes the config (no stale cache).
  name_before = builder.builder_config.name
  _write_png(str(root / "cat" / "new.png"), (5, 5), (1, 2, 3))
  assert image_folder.ImageFolderConfig(root_dir=str(root)).name != name_before


def test_image_folder_scan_layouts(tmp_path):
  flat = tmp_path / "flat"
  _write_png(str(flat / "a.png"), (4, 4), (0, 0, 0))
  _write_png(str(flat / "b.jpg"), (4, 4), (0, 0, 0))
  splits, classes = image_folder.scan(str(flat))
  assert classes == [] and list(splits) == ["train"] and len(splits["train"]) == 2

  split_root = tmp_path / "splits"
  _write_png(str(split_root / "train" / "x" / "1.png"), (4, 4), (0, 0, 0))
  _write_png(str(split_root / "test" / "y" / "1.png"), (4, 4), (0, 0, 0))
  splits, classes = image_folder.scan(str(split_root))
  assert classes == ["x", "y"] and sorted(splits) == ["test", "train"]
  assert splits["test"][0][1] == 1

  with pytest.raises(FileNotFoundError):
    image_folder.scan(str(tmp_path / "missing"))


def test_ffhq_builder_from_manual_pngs(tmp_path):
  manual = tmp_path / "manual"
  for i, color in enumerate(((10, 20, 30), (40, 50, 60), (70, 80, 90))):
    _write_png(str(manual / "images1024x1024" / "00000" / f"{i:05d}.png"), (160, 160), color)
  builder = tfds.builder("ffhq/128", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual), try_download_gcs=False))
  exs = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert [int(e["id"]) for e in exs] == [0, 1, 2]
  assert [e["image/filename"].decode() for e in exs] == ["00000.png", "00001.png", "00002.png"]
  assert exs[1]["image"].shape == (128, 128, 3)
  np.testing.assert_array_equal(exs[1]["image"][64, 64], [40, 50, 60])
