"""lfm_jax.input_pipeline: paper pipelines on mock data, digits and image folders on real files,
per-host splits, exact resume, offline failures."""

import os
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lfm_jax import input_pipeline as ip


def _data_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      name="lfm_digits", data_dir=None, manual_dir=None, image_folder=None, image_size=16,
      channels=1, train_split="train", eval_split="test", max_train_examples=None,
      crop="none", random_flip=False, num_classes=10, shuffle_buffer=10_000))
  c.update(overrides)
  return c


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A tfds data dir with lfm_digits/16x16_gray prepared once (through the pipeline)."""
  data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  ip.ensure_prepared(ip.get_builder(_data_config(data_dir=data_dir)), _data_config())
  return data_dir


def _ids(ds):
  return np.concatenate([b["id"] for b in ip.iterate_numpy(ds)]) if ds is not None else None


# ------------------------------------------------------------------------ digits, real files


def test_digits_pipeline(digits_dir):
  c = _data_config(data_dir=digits_dir)
  assert ip.dataset_info(c) == (1437, 10, (16, 16, 1))
  ds = ip.create_dataset(c, "test", batch_size=32, shuffle=False, seed=0, repeat=False,
                         drop_remainder=False, process_index=0, process_count=1)
  batches = list(ip.iterate_numpy(ds))
  assert sum(len(b["id"]) for b in batches) == 360
  b = batches[0]
  assert b["image"].shape == (32, 16, 16, 1) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
  assert b["image"].min() == -1.0 and b["image"].max() == 1.0
  assert b["label"].dtype == np.int32 and b["id"].dtype == np.int64
  np.testing.assert_array_equal(b["id"], np.arange(32))  # id = index in the split
  labels = np.concatenate([x["label"] for x in batches])
  assert set(labels) == set(range(10))

  # The pipeline's id matches the builder's stored id feature, and the pixels match.
  raw = tfds.as_numpy(ip.get_builder(c).as_dataset(split="test", batch_size=-1))
  np.testing.assert_array_equal(raw["id"][:32], b["id"])
  np.testing.assert_allclose(b["image"], raw["image"][:32] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(b["label"], raw["label"][:32])


def test_digits_rgb_upscaled_and_max_train_examples(digits_dir):
  c = _data_config(data_dir=digits_dir, channels=3, image_size=16, max_train_examples=100)
  # channels=3 selects (and prepares) the 16x16_rgb builder config.
  assert ip.get_builder(c).builder_config.name == "16x16_rgb"
  n, _, shape = ip.dataset_info(c)
  assert n == 100 and shape == (16, 16, 3)
  ids = _ids(ip.create_dataset(c, "train", batch_size=10, shuffle=True, seed=3, repeat=False,
                               process_index=0, process_count=1))
  np.testing.assert_array_equal(np.sort(ids), np.arange(100))  # the first 100


def test_shuffle_is_seeded_and_reshuffles_each_epoch(digits_dir):
  c = _data_config(data_dir=digits_dir, shuffle_buffer=1000)
  def first(seed, count):
    ds = ip.create_dataset(c, "test", batch_size=360, shuffle=True, seed=seed, repeat=True,
                           process_index=0, process_count=1)
    return [b["id"] for b in ds.take(count).as_numpy_iterator()]
  a, b, other = first(0, 2), first(0, 2), first(1, 1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], a[1])  # a new order in epoch 2
  assert not np.array_equal(a[0], other[0])
  np.testing.assert_array_equal(np.sort(a[1]), np.arange(360))


# ------------------------------------------------------------------------ hosts


@pytest.mark.parametrize("use_ids", [False, True])
def test_eight_hosts_are_disjoint_and_cover_the_split(digits_dir, use_ids):
  c = _data_config(data_dir=digits_dir)
  keep = np.arange(0, 360, 3) if use_ids else None  # a pruned subset: 120 ids
  per_host = []
  for p in range(8):
    ds = ip.create_dataset(c, "test", batch_size=8, shuffle=True, seed=0, repeat=False,
                           drop_remainder=False, process_index=p, process_count=8, ids=keep)
    per_host.append(_ids(ds))
  everything = np.concatenate(per_host)
  expected = keep if use_ids else np.arange(360)
  assert len(everything) == len(expected)  # disjoint: no id twice
  np.testing.assert_array_equal(np.sort(everything), expected)  # cover
  sizes = [len(h) for h in per_host]
  assert max(sizes) - min(sizes) <= 1


def test_host_range_matches_tfds_even_splits():
  for n, k in ((360, 8), (10, 3), (7, 8)):
    ranges = [ip.host_range(n, p, k) for p in range(k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes


# ------------------------------------------------------------------------ resume


@pytest.mark.parametrize("k", [2, 7])  # 7 batches of 48 > the 180 examples of one host epoch
def test_resumable_iterator_restores_exactly(digits_dir, k):
  c = _data_config(data_dir=digits_dir, random_flip=True, shuffle_buffer=64)
  kwargs = dict(batch_size=96, shuffle=True, seed=5, repeat=True, process_index=1,
                process_count=2)
  full = ip.ResumableIterator(c, "test", **kwargs)
  reference = [next(full) for _ in range(k + 3)]
  assert full.state()["batch"] == k + 3

  interrupted = ip.ResumableIterator(c, "test", **kwargs)
  for _ in range(k):
    next(interrupted)
  state = interrupted.state()
  assert state["batch"] == k and all(isinstance(v, int) for v in state.values())
  resumed = ip.ResumableIterator(c, "test", **kwargs, state=dict(state))
  resumed_restore = ip.ResumableIterator(c, "test", **kwargs).restore(state)
  for want in reference[k:]:
    for it in (resumed, resumed_restore):
      got = next(it)
      for key in ("image", "label", "id"):
        np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="seed"):
    ip.ResumableIterator(c, "test", **{**kwargs, "seed": 6}).restore(state)


def test_random_flip_is_applied_deterministically(digits_dir):
  c = _data_config(data_dir=digits_dir, random_flip=True)
  plain = _data_config(data_dir=digits_dir)
  args = dict(batch_size=360, shuffle=False, seed=0, repeat=False, process_index=0,
              process_count=1)
  flipped = next(ip.iterate_numpy(ip.create_dataset(c, "test", augment=True, **args)))
  original = next(ip.iterate_numpy(ip.create_dataset(plain, "test", **args)))
  same = np.all(flipped["image"] == original["image"], axis=(1, 2, 3))
  mirrored = np.all(flipped["image"] == original["image"][:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored) and 0.3 < mirrored.mean() < 0.7
  no_aug = next(ip.iterate_numpy(ip.create_dataset(c, "test", augment=False, **args)))
  np.testing.assert_array_equal(no_aug["image"], original["image"])


@pytest.mark.parametrize("shuffle", [True, False])
def test_array_iterator_restores_exactly_and_slices_hosts(shuffle):
  n = 10
  arrays = {"z": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "id": np.arange(n)}
  kw = dict(batch_size=4, seed=7, shuffle=shuffle, repeat=True)
  full = ip.ArrayIterator(arrays, process_index=0, process_count=1, **kw)
  global_batches = [next(full) for _ in range(8)]  # 32 examples: crosses 3 epoch boundaries
  ids = np.concatenate([b["id"] for b in global_batches])
  for e in range(3):  # every epoch is a permutation
    np.testing.assert_array_equal(np.sort(ids[e * n:(e + 1) * n]), np.arange(n))
  if shuffle:
    assert not np.array_equal(ids[:n], ids[n:2 * n])
  np.testing.assert_array_equal(global_batches[0]["z"][:, 0], global_batches[0]["id"] * 2)

  for p in range(2):
    host = ip.ArrayIterator(arrays, process_index=p, process_count=2, **kw)
    for _ in range(3):
      next(host)
    resumed = ip.ArrayIterator(arrays, process_index=p, process_count=2, **kw,
                               state=host.state())
    for k in range(3, 8):
      want = global_batches[k]["id"][p * 2:(p + 1) * 2]
      np.testing.assert_array_equal(next(host)["id"], want)
      np.testing.assert_array_equal(next(resumed)["id"], want)


def test_array_iterator_single_pass():
  arrays = {"x": np.arange(10)}
  it = ip.ArrayIterator(arrays, batch_size=4, shuffle=False, repeat=False, drop_remainder=False,
                        process_index=0, process_count=1)
  assert [b["x"].tolist() for b in it] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  it = ip.ArrayIterator(arrays, batch_size=4, shuffle=False, repeat=False, process_index=0,
                        process_count=1)
  assert len(list(it)) == 2
  it.restore({"batch": 1})
  assert next(it)["x"].tolist() == [4, 5, 6, 7]


# ------------------------------------------------------------------------ image folders


def test_image_folder_pipeline(tmp_path):
  from PIL import Image
  root = tmp_path / "folder"
  colors = {"apple": (255, 0, 0), "banana": (255, 255, 0), "cherry": (0, 0, 255)}
  for cls, color in colors.items():
    os.makedirs(root / cls)
    for i in range(2):
      Image.new("RGB", (20 + 4 * i, 12), color).save(root / cls / f"{i}.png")
  c = _data_config(name="image_folder", image_folder=str(root), data_dir=str(tmp_path / "tfds"),
                   image_size=8, channels=3, crop="center", random_flip=True)
  assert ip.dataset_info(c) == (6, 3, (8, 8, 3))
  batch = next(ip.iterate_numpy(ip.create_dataset(
      c, "train", batch_size=6, shuffle=False, seed=0, repeat=False, process_index=0,
      process_count=1)))
  assert batch["image"].shape == (6, 8, 8, 3)
  np.testing.assert_array_equal(batch["id"], np.arange(6))
  np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(batch["image"][4, 3, 3], [-1, -1, 1], atol=1e-6)  # cherry: blue


# ------------------------------------------------------------------------ paper data sets (mock)


@pytest.mark.parametrize("name,crop,labelled", [
    ("celeb_a_hq/256", "none", False),
    ("ffhq", "none", False),
    ("lsun/church_outdoor", "center", False),
    ("lsun/bedroom", "center", False),
    ("imagenet2012", "adm", True),
])
def test_paper_pipelines_on_mock_data(tmp_path, name, crop, labelled):
  preset = dict(ip.PAPER_PRESETS[name])
  assert preset["crop"] == crop
  preset.update(image_size=32, max_train_examples=preset.get("max_train_examples"))
  c = _data_config(name=name, data_dir=str(tmp_path), **preset)
  with tfds.testing.mock_data(num_examples=12):
    ds = ip.create_dataset(c, "train", batch_size=4, shuffle=True, seed=0, repeat=True,
                           process_index=0, process_count=1)
    batches = list(ip.iterate_numpy(ds.take(4)))  # 16 > 12: crosses an epoch
    n, num_classes, shape = ip.dataset_info(c)
  assert shape == (32, 32, 3) and n == 12
  assert num_classes == (1000 if labelled else 0)
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert b["id"].dtype == np.int64
  labels = np.concatenate([b["label"] for b in batches])
  if labelled:
    assert labels.min() >= 0 and labels.max() < 1000
  else:
    assert np.all(labels == 0)
  np.testing.assert_array_equal(np.sort(np.concatenate([b["id"] for b in batches])[:12]),
                                np.arange(12))


def test_lsun_first_examples_follow_lmdb_key_order(tmp_path):
  c = _data_config(name="lsun/church_outdoor", data_dir=str(tmp_path), image_size=8, channels=3,
                   crop="center", max_train_examples=5)
  with tfds.testing.mock_data(num_examples=12):
    # (Mocks draw different fake values for partial decoding, so read keys the same way.)
    keys = [ex["id"] for ex in tfds.as_numpy(ip.get_builder(c).as_dataset(
        split="train", decoders=tfds.decode.PartialDecoding({"id": True})))]
    ds = ip.create_dataset(c, "train", batch_size=5, shuffle=True, seed=0, repeat=False,
                           process_index=0, process_count=1)
    ids = _ids(ds)
    assert ip.num_examples(c, "train") == 5
  assert len(set(keys)) == 12
  np.testing.assert_array_equal(np.sort(ids), np.sort(np.argsort(keys, kind="stable")[:5]))


def test_adm_and_center_crops_shapes_and_values():
  image = tf.constant(np.tile(np.linspace(0, 255, 70, dtype=np.float32)[None, :, None],
                              (50, 1, 3)).astype(np.uint8))
  for crop in ("adm", "center", "none"):
    out = ip.preprocess_image(image, image_size=16, channels=3, crop=crop).numpy()
    assert out.shape == (16, 16, 3), crop
    assert -1.0 <= out.min() and out.max() <= 1.0
    if crop != "none":  # a centre crop of a horizontal ramp: the middle stays mid-grey
      assert abs(out[:, 7:9].mean()) < 0.1, crop
  gray = ip.preprocess_image(image, image_size=16, channels=1, crop="adm").numpy()
  assert gray.shape == (16, 16, 1)
  with pytest.raises(ValueError, match="crop"):
    ip.preprocess_image(image, image_size=16, channels=3, crop="bogus")


# ------------------------------------------------------------------------ offline failures


@pytest.mark.parametrize("name,expect", [
    ("celeb_a_hq/256", "data256x256.tar"),
    ("lsun/church_outdoor", "tfds build lsun/church_outdoor"),
    ("imagenet2012", "ILSVRC2012_img_train.tar"),
    ("ffhq", "images1024x1024"),
])
def test_unprepared_dataset_fails_fast_with_instructions(tmp_path, name, expect):
  c = _data_config(name=name, data_dir=str(tmp_path / "empty"), image_size=256, channels=3)
  t0 = time.perf_counter()
  with pytest.raises(ip.DatasetNotAvailableError) as err:
    ip.create_dataset(c, "train", batch_size=4, shuffle=True, seed=0, repeat=True,
                      process_index=0, process_count=1)
  seconds = time.perf_counter() - t0
  print(f"{name}: DatasetNotAvailableError after {seconds:.2f} s")
  assert seconds < 5.0
  message = str(err.value)
  assert expect in message and str(tmp_path / "empty") in message


def test_unknown_dataset_name(tmp_path):
  with pytest.raises(ip.DatasetNotAvailableError, match="no_such_dataset"):
    ip.get_builder(_data_config(name="no_such_dataset", data_dir=str(tmp_path)))
