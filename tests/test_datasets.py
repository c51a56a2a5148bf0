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


# ----------------------------------------------------------------------- paper builders, real files

import manual_data  # noqa: E402  (tests/manual_data.py)
from lfm_jax.datasets import celebamask_hq  # noqa: E402
from lfm_jax.datasets import lsun_lmdb  # noqa: E402
from lfm_jax.datasets import manual  # noqa: E402


def _prepare(builder, manual_dir):
  t0 = time.perf_counter()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  config = f"/{builder.builder_config.name}" if builder.builder_config else ""
  print(f"{builder.name}{config} prepared in {time.perf_counter() - t0:.2f} s")


def test_lfm_lsun_reads_the_lmdb_in_key_order_exactly(tmp_path):
  m = tmp_path / "manual"
  webp = manual_data.write_lsun_lmdb(str(m), "bedroom", "train", 6)  # lossless WebP values
  jpeg = manual_data.write_lsun_lmdb(str(m), "bedroom", "val", 2, fmt="jpeg", as_zip=True,
                                     first=50)
  builder = tfds.builder("lfm_lsun", config=lsun_lmdb.make_config("bedroom"),
                         data_dir=str(tmp_path / "tfds"))
  _prepare(builder, m)
  train = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert [e["key"].decode() for e in train] == [k.decode() for k, _ in webp]  # key order
  assert [int(e["id"]) for e in train] == list(range(6))
  for e, (_, i) in zip(train, webp):  # WebP decoded by Pillow, stored losslessly
    np.testing.assert_array_equal(e["image"], manual_data.picture(i, (40, 32)))
  # JPEG values are stored as the very bytes of the LMDB.
  import lmdb  # the zip was extracted to a scratch folder, which is gone again
  assert not any(os.scandir(tmp_path / "tfds" / "downloads" / "extracted"))
  raw = list(tfds.as_numpy(builder.as_dataset(
      split="validation", decoders={"image": tfds.decode.SkipDecoding()})))
  manual_data.write_lsun_lmdb(str(tmp_path / "again"), "bedroom", "val", 2, fmt="jpeg",
                              first=50)
  env = lmdb.open(str(tmp_path / "again" / "bedroom_val_lmdb"), readonly=True, lock=False)
  with env.begin() as txn:
    for e, (key, _) in zip(raw, jpeg):
      assert e["image"] == txn.get(key)
  env.close()
  first3 = tfds.builder("lfm_lsun", config=lsun_lmdb.make_config("bedroom", 3),
                        data_dir=str(tmp_path / "tfds"))
  _prepare(first3, m)
  assert first3.info.splits["train"].num_examples == 3
  assert first3.info.splits["validation"].num_examples == 2


def test_celebamask_hq_merges_part_masks_in_lfm_order(tmp_path):
  m = tmp_path / "manual"
  manual_data.write_celebamask_hq(str(m), indices=(0, 1, 27003), image_size=320,
                                  as_zip=False)  # the unpacked folder
  builder = tfds.builder("celebamask_hq", config=celebamask_hq.make_config(256),
                         data_dir=str(tmp_path / "tfds"))
  _prepare(builder, m)
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["test"].num_examples == 1
  train = list(tfds.as_numpy(builder.as_dataset(split="train")))
  test = list(tfds.as_numpy(builder.as_dataset(split="test")))
  assert [int(e["image/index"]) for e in train + test] == [0, 1, 27003]
  assert [int(e["id"]) for e in train + test] == [0, 1, 0]
  assert train[0]["segmentation"].shape == (256, 256, 1)
  np.testing.assert_array_equal(train[0]["segmentation"][..., 0],
                                manual_data.celebamask_labels(size=256))
  no_nose = [p for p in manual_data.CELEBAMASK_REGIONS if p != "nose"]
  np.testing.assert_array_equal(train[1]["segmentation"][..., 0],
                                manual_data.celebamask_labels(no_nose, size=256))
  assert celebamask_hq.PARTS.index("hair") + 1 == 17 and celebamask_hq.NUM_CLASSES == 19
  np.testing.assert_allclose(test[0]["image"][128, 128], manual_data.colour(27003), atol=3)
  assert test[0]["image"][128, 5].min() > 245  # the white band survives the resize
  # The flip permutation swaps exactly the three left/right pairs.
  perm = celebamask_hq.FLIP_PERMUTATION
  assert sorted(perm) == list(range(19)) and (perm != np.arange(19)).sum() == 6
  assert perm[4] == 5 and perm[5] == 4  # l_eye <-> r_eye


def test_tfds_celeb_a_hq_reads_the_tar_layout_png_and_jpeg(tmp_path):
  for fmt in ("png", "jpg"):
    m = tmp_path / fmt / "manual"
    written = manual_data.write_celeb_a_hq_tar(str(m), 128, 4, fmt=fmt)
    assert manual.check_celeb_a_hq_tar(epath_of(m / "data128x128.tar"), 128) == 4
    builder = tfds.builder("celeb_a_hq/128", data_dir=str(tmp_path / fmt / "tfds"))
    _prepare(builder, m)
    exs = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert sorted(e["image/filename"].decode() for e in exs) == sorted(written)
    for e in exs:
      want = written[e["image/filename"].decode()]
      diff = np.abs(e["image"].astype(int) - want.astype(int))
      if fmt == "png":
        assert diff.max() == 0
      else:  # JPEG ringing at the band's edge only
        assert diff.mean() < 1.0 and diff[:, 32:].max() <= 3


def epath_of(path):
  from etils import epath
  return epath.Path(path)


def test_tfds_imagenet_reads_the_tars_with_synset_labels(tmp_path):
  m = tmp_path / "manual"
  written = manual_data.write_imagenet(str(m), synset_indices=(3, 500), per_synset=2, num_val=3)
  manual.check_imagenet(epath_of(m / "ILSVRC2012_img_train.tar"),
                        epath_of(m / "ILSVRC2012_img_val.tar"))
  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path / "tfds"))
  _prepare(builder, m)
  for split, key in (("train", "train"), ("validation", "val")):
    got = {e["file_name"].decode(): int(e["label"])
           for e in tfds.as_numpy(builder.as_dataset(split=split))}
    assert got == written[key]
  assert written["train"]["n01491361_1.JPEG"] == 3  # line 4 of tfds' labels.txt


def test_manual_checks_name_the_bad_member(tmp_path):
  import io
  import tarfile
  m = tmp_path / "manual"
  manual_data.write_celeb_a_hq_tar(str(m), 64, 2)
  path = m / "data64x64.tar"
  with tarfile.open(path, "a") as tar:
    info = tarfile.TarInfo("data64x64/README.txt")
    info.size = 5
    tar.addfile(info, io.BytesIO(b"hello"))
    info = tarfile.TarInfo("data64x64/._00000.png")  # hidden: tfds skips it, so do we
    info.size = 5
    tar.addfile(info, io.BytesIO(b"hello"))
  with pytest.raises(manual.ManualFileError, match="non-image member.*README.txt"):
    manual.check_celeb_a_hq_tar(epath_of(path), 64)
  manual_data.write_celeb_a_hq_tar(str(m), 64, 5)
  with tarfile.open(path, "a") as tar:  # a sixth image at another size, past the decoded three
    data = manual_data.encode(manual_data.picture(5, 32), "PNG")
    info = tarfile.TarInfo("data64x64/00005.png")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  with pytest.raises(manual.ManualFileError, match=r"data64x64/00005.png is 32x32, expected 64x64"):
    manual.check_celeb_a_hq_tar(epath_of(path), 64)
  manual_data.write_imagenet(str(m), synset_indices=(0,), per_synset=1, num_val=1)
  with tarfile.open(m / "ILSVRC2012_img_train.tar", "a") as tar:
    info = tarfile.TarInfo("n99999999.tar")
    info.size = 0
    tar.addfile(info, io.BytesIO(b""))
  with pytest.raises(manual.ManualFileError, match="n99999999.tar.*ImageNet-1k synset"):
    manual.check_imagenet(epath_of(m / "ILSVRC2012_img_train.tar"),
                          epath_of(m / "ILSVRC2012_img_val.tar"))
