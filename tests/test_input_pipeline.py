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
    # The presets' own split expressions ("train[:90%]" for the faces), sliced on the mocks.
    n_train = ip.num_examples(c, c.train_split)
    ds = ip.create_dataset(c, c.train_split, batch_size=4, shuffle=True, seed=0, repeat=True,
                           process_index=0, process_count=1)
    batches = list(ip.iterate_numpy(ds.take(4)))  # 16 > 12: crosses an epoch
    n, num_classes, shape = ip.dataset_info(c)
    eval_ids = _ids(ip.create_dataset(c, c.eval_split, batch_size=1, shuffle=False, seed=0,
                                      repeat=False, process_index=0, process_count=1))
  sliced = c.train_split != "train"
  assert n == n_train == (11 if sliced else 12)  # round(0.9 * 12) = 11
  np.testing.assert_array_equal(eval_ids, [11] if sliced else np.arange(12))
  assert shape == (32, 32, 3)
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
  np.testing.assert_array_equal(np.sort(np.concatenate([b["id"] for b in batches])[:n]),
                                np.arange(n))


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
    ("lfm_lsun/church_outdoor", "church_outdoor_train_lmdb"),
    ("imagenet2012", "ILSVRC2012_img_train.tar"),
    ("ffhq", "images1024x1024"),
    ("celebamask_hq", "CelebAMask-HQ.zip"),
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


# ------------------------------------------------------------------------ split expressions


def test_split_slices_resolve_with_tfds_and_keep_base_ids(digits_dir):
  c = _data_config(data_dir=digits_dir)
  assert ip.num_examples(c, "test[:90%]") == 324 and ip.num_examples(c, "test[90%:]") == 36
  assert ip.num_examples(c, "test[100:200]") == 100 and ip.num_examples(c, "test[-10:]") == 10
  assert ip.split_range(c, "test[90%:]") == ("test", 324, 360)
  ds = ip.create_dataset(c, "test[300:]", batch_size=16, shuffle=False, seed=0, repeat=False,
                         drop_remainder=False, process_index=0, process_count=1)
  batches = list(ip.iterate_numpy(ds))
  ids = np.concatenate([b["id"] for b in batches])
  np.testing.assert_array_equal(ids, np.arange(300, 360))  # ids: indices in the BASE split
  # The pixels are those of base examples 300.. (not of the slice's own positions 0..).
  raw = tfds.as_numpy(ip.get_builder(c).as_dataset(split="test", batch_size=-1))
  np.testing.assert_allclose(batches[0]["image"], raw["image"][300:316] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(batches[0]["label"], raw["label"][300:316])


@pytest.mark.parametrize("split,message", [
    ("train[:27000]", r"train\[:27000\].*lfm_digits.*1437"),
    ("test[5:5]", "selects no examples"),
    ("test[90%:10%]", "selects no examples"),
    ("train+test", "combines several splits"),
    ("nosuch", "has no split 'nosuch'"),
    ("test[abc]", "not a tfds split expression"),
])
def test_bad_split_expressions_are_one_line_errors(digits_dir, split, message):
  c = _data_config(data_dir=digits_dir)
  for fn in (lambda: ip.num_examples(c, split),
             lambda: ip.create_dataset(c, split, batch_size=4, shuffle=False, seed=0,
                                       repeat=False, process_index=0, process_count=1)):
    with pytest.raises(ValueError, match=message) as err:
      fn()
    assert "\n" not in str(err.value)


def test_slices_with_hosts_ids_cap_and_resume(digits_dir):
  c = _data_config(data_dir=digits_dir, train_split="test[100:300]", max_train_examples=50)
  # max_train_examples keeps the first 50 of the train split's selection: ids 100..149.
  assert ip.num_examples(c, "test[100:300]") == 50
  per_host = [_ids(ip.create_dataset(c, "test[100:300]", batch_size=3, shuffle=True, seed=1,
                                     repeat=False, drop_remainder=False, process_index=p,
                                     process_count=3)) for p in range(3)]
  everything = np.concatenate(per_host)
  assert len(everything) == 50
  np.testing.assert_array_equal(np.sort(everything), np.arange(100, 150))
  # ids speak base indices and must lie inside the selection and the cap.
  keep = np.arange(100, 150, 7)
  got = _ids(ip.create_dataset(c, "test[100:300]", batch_size=1, shuffle=False, seed=0,
                               repeat=False, process_index=0, process_count=1, ids=keep))
  np.testing.assert_array_equal(got, keep)
  with pytest.raises(ValueError, match=r"ids must lie in \[100, 300\)"):
    ip.create_dataset(c, "test[100:300]", batch_size=1, shuffle=False, seed=0, repeat=False,
                      process_index=0, process_count=1, ids=[5, 120])
  with pytest.raises(ValueError, match="max_train_examples"):
    ip.create_dataset(c, "test[100:300]", batch_size=1, shuffle=False, seed=0, repeat=False,
                      process_index=0, process_count=1, ids=[120, 200])
  # Exact resume on a slice (batches straddle the 25-example host epochs).
  kwargs = dict(batch_size=8, shuffle=True, seed=2, repeat=True, process_index=1,
                process_count=2)
  full = ip.ResumableIterator(c, "test[100:300]", **kwargs)
  reference = [next(full)["id"] for _ in range(9)]
  resumed = ip.ResumableIterator(c, "test[100:300]", **kwargs, state={"batch": 5})
  for want in reference[5:]:
    np.testing.assert_array_equal(next(resumed)["id"], want)
  assert set(np.concatenate(reference)) <= set(range(125, 150))  # host 1's half of 100..149


# ------------------------------------------------------------------------ real manual files

import manual_data  # noqa: E402  (tests/manual_data.py: tiny copies in the real formats)


def _paper():
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "_paper.py")
  spec = importlib.util.spec_from_file_location("lfm_test_paper_helpers", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def paper_dirs(tmp_path_factory):
  """A manual dir with every paper format written once, and a tfds data dir to prepare into."""
  root = tmp_path_factory.mktemp("paper")
  manual = str(root / "manual")
  t0 = time.perf_counter()
  written = {
      "celeb_a_hq": manual_data.write_celeb_a_hq_tar(manual, 256, 10),
      "ffhq": manual_data.write_ffhq_tree(manual, 6, size=1024),
      "lsun_train": manual_data.write_lsun_lmdb(manual, "church_outdoor", "train", 8),
      "lsun_val": manual_data.write_lsun_lmdb(manual, "church_outdoor", "val", 3, as_zip=True,
                                              first=100),
      "imagenet": manual_data.write_imagenet(manual),
      "celebamask": manual_data.write_celebamask_hq(manual),
  }
  print(f"manual files written in {time.perf_counter() - t0:.2f} s")
  return {"manual": manual, "data_dir": str(root / "tfds"), "written": written}


def _paper_data(paper_dirs, helper, *args, image_size=64, **overrides):
  """config.data of the default config, set by a configs/_paper.py data helper."""
  from configs import default  # pylint: disable=g-import-not-at-top  (_paper put it on the path)
  del default
  paper = _paper()
  data = paper.default_lib.get_config().data
  data.data_dir = paper_dirs["data_dir"]
  data.manual_dir = paper_dirs["manual"]
  data.channels = 3
  data.num_classes = 0
  getattr(paper, helper)(data, *args)
  data.image_size = image_size
  data.update(overrides)
  return data


def _all(data, split, **kw):
  args = dict(batch_size=1, shuffle=False, seed=0, repeat=False, drop_remainder=False,
              process_index=0, process_count=1)
  args.update(kw)
  batches = list(ip.iterate_numpy(ip.create_dataset(data, split, **args)))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _colour_of(image):
  """The flat colour (uint8 RGB) of a pipeline image away from its white band."""
  mid = image.shape[0] // 2
  return np.round((image[mid, mid] + 1.0) * 127.5).astype(int)


def _band_side(image):
  """'left' or 'right': where the white band of a manual_data picture is."""
  left, right = image[:, 0].mean(), image[:, -1].mean()
  return "left" if left > right else "right"


def _timed(label, fn):
  t0 = time.perf_counter()
  out = fn()
  print(f"{label}: {time.perf_counter() - t0:.2f} s")
  return out


def test_celeb_a_hq_from_the_real_tar(paper_dirs):
  data = _paper_data(paper_dirs, "celeb_a_hq", 256)
  assert (data.train_split, data.eval_split) == ("train[:90%]", "train[90%:]")
  assert _timed("celeb_a_hq/256 prepare (10 images)",
                lambda: ip.num_examples(data, data.train_split)) == 9
  train = _timed("celeb_a_hq read train", lambda: _all(data, data.train_split, augment=True))
  test = _all(data, data.eval_split)
  np.testing.assert_array_equal(train["id"], np.arange(9))
  np.testing.assert_array_equal(test["id"], [9])  # ids of "train[90%:]" start at 9
  assert train["image"].shape == (9, 64, 64, 3) and train["image"].dtype == np.float32
  assert train["image"].min() == -1.0 or train["image"].max() == 1.0
  assert np.all(train["label"] == 0)
  # Each stored image is one of the archive's pictures (tfds' order), each exactly once.
  raw = tfds.as_numpy(ip.get_builder(data).as_dataset(split="train", batch_size=-1))
  names = [n.decode() for n in raw["image/filename"]]
  assert sorted(names) == sorted(paper_dirs["written"]["celeb_a_hq"])
  for k in range(9):
    want = manual_data.colour(int(names[k].split("/")[-1][:5]))
    np.testing.assert_allclose(_colour_of(train["image"][k]), want, atol=1)
  sides = {_band_side(im) for im in train["image"]}
  assert sides == {"left", "right"}  # flipped, deterministically, some of them


def test_ffhq_from_the_official_png_tree(paper_dirs):
  data = _paper_data(paper_dirs, "ffhq", image_size=32)
  assert _timed("ffhq/256 prepare (6 PNGs 1024px)",
                lambda: ip.num_examples(data, data.train_split)) == 5  # round(0.9 * 6)
  train, test = _all(data, data.train_split), _all(data, data.eval_split)
  np.testing.assert_array_equal(train["id"], np.arange(5))  # file-name order
  np.testing.assert_array_equal(test["id"], [5])
  for k, image in zip(train["id"], train["image"]):
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(k), atol=1)
    assert _band_side(image) == "left"  # augment defaults to shuffle: no flip here


def test_lsun_from_the_official_lmdb_keeps_key_order(paper_dirs):
  data = _paper_data(paper_dirs, "lsun", "church_outdoor", image_size=16)
  assert data.name == "lfm_lsun/church_outdoor" and data.max_train_examples == 120_000
  entries = paper_dirs["written"]["lsun_train"]  # [(key, picture index)] in key order
  assert [i for _, i in entries] != sorted(i for _, i in entries)  # key order != insertion
  full = _timed("lfm_lsun prepare (8 + 3 webp)", lambda: _all(data, "train"))
  assert ip.get_builder(data).builder_config.name == "church_outdoor_first120000"
  np.testing.assert_array_equal(full["id"], np.arange(8))
  for k, image in enumerate(full["image"]):  # id k is the k-th key
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(entries[k][1]), atol=1)
  # The first N (LFM: 120k) are the first N keys: the same whether N is stored or capped.
  data.max_train_examples = 5
  capped = _all(data, "train", shuffle=True, batch_size=5, augment=False)
  np.testing.assert_array_equal(np.sort(capped["id"]), np.arange(5))
  np.testing.assert_allclose(capped["image"][np.argsort(capped["id"])], full["image"][:5])
  assert ip.get_builder(data).builder_config.name == "church_outdoor_first5"
  val = _all(data, data.eval_split)  # from the val zip
  want = sorted((k, i) for k, i in paper_dirs["written"]["lsun_val"])
  assert val["image"].shape == (3, 16, 16, 3)  # 40x32 -> shorter side 16, centre crop
  for k, image in enumerate(val["image"]):
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(want[k][1]), atol=1)


def test_imagenet_from_the_real_tars_labels_follow_synsets(paper_dirs):
  data = _paper_data(paper_dirs, "imagenet", image_size=32)
  data.num_classes = 1000
  train = _timed("imagenet2012 prepare + read (6 + 4 JPEGs)",
                 lambda: _all(data, data.train_split))
  n, classes, _ = ip.dataset_info(data)
  assert n == 6 and classes == 1000
  written = paper_dirs["written"]["imagenet"]
  assert sorted(train["label"].tolist()) == sorted(written["train"].values())  # 0, 0, 1, 1, 999, 999
  for label, image in zip(train["label"], train["image"]):  # picture(label) was written
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(label), atol=2)
  val = _all(data, data.eval_split)
  assert sorted(val["label"].tolist()) == sorted(written["val"].values())
  # Validation images 1..4 are n01751748, n09193705, n02105855, n04263257 in tfds' bundled
  # labels: lines 66, 971, 231, 810 of its labels.txt (0-based labels 65, 970, 230, 809).
  assert sorted(val["label"].tolist()) == [65, 230, 809, 970]
  assert sorted(train["label"].tolist()) == [0, 0, 1, 1, 999, 999]  # n01440764, n01443537, n15075141
  for label, image in zip(val["label"], val["image"]):
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(label), atol=2)


def test_celebamask_hq_semantic_maps(paper_dirs):
  data = _paper_data(paper_dirs, "celebamask_hq", image_size=64)
  assert (data.task, data.train_split, data.eval_split) == ("semantic", "train", "test")
  assert ip.segmentation_classes(data) == 19
  train = _timed("celebamask_hq prepare + read (5 images, 18 part masks each)",
                 lambda: _all(data, "train"))
  test = _all(data, "test")
  np.testing.assert_array_equal(train["id"], [0, 1, 2])  # images 0, 1, 2
  np.testing.assert_array_equal(test["id"], [0, 1])  # images 27000, 27001
  seg = train["segmentation"]
  assert seg.shape == (3, 64, 64) and seg.dtype == np.int32
  classes = {name: k for k, name in enumerate(("background", "skin", "l_brow", "r_brow", "l_eye",
                                               "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
                                               "nose", "mouth", "u_lip", "l_lip", "neck",
                                               "neck_l", "cloth", "hair", "hat"))}
  at = lambda r, c: (r * 64 // 512, c * 64 // 512)  # a 512-px mask point on the 64 grid
  for k in range(3):
    assert seg[k][at(20, 20)] == classes["background"]
    assert seg[k][at(400, 256)] == classes["skin"]
    assert seg[k][at(160, 256)] == classes["hair"]  # hair overlaps skin and wins
    assert seg[k][at(256, 200)] == classes["l_eye"]
    assert seg[k][at(256, 312)] == classes["r_eye"]
  assert seg[0][at(312, 256)] == classes["nose"]
  assert seg[1][at(312, 256)] == classes["skin"]  # image 1 has no nose mask
  np.testing.assert_array_equal(test["segmentation"][0], seg[0])
  for k, image in zip([27000, 27001], test["image"]):
    np.testing.assert_allclose(_colour_of(image), manual_data.colour(k), atol=3)
  # A flip mirrors the map with the image and swaps left/right classes: the symmetric test
  # layout then keeps l_eye where it was.
  data.random_flip = True
  flipped = _all(data, "train", augment=True, seed=3)
  sides = [_band_side(im) for im in flipped["image"]]
  assert "right" in sides
  for k, side in enumerate(sides):
    assert flipped["segmentation"][k][at(256, 200)] == classes["l_eye"], side
    if side == "right":
      np.testing.assert_array_equal(flipped["segmentation"][k][:, ::-1] != 0, seg[k] != 0)


# ------------------------------------------------------------------------ inpainting masks

from lfm_jax import masks  # noqa: E402


def test_inpainting_masks_depend_only_on_seed_and_id(paper_dirs):
  data = _paper_data(paper_dirs, "celeb_a_hq", 256, "inpainting", image_size=32)
  assert data.task == "inpainting" and data.mask_kind == "lfm"
  one = _all(data, data.train_split, batch_size=3, shuffle=True, seed=0)
  by_id = dict(zip(one["id"].tolist(), one["mask"]))
  assert sorted(by_id) == list(range(9))
  for p in range(2):  # two hosts, another batch size and shuffle seed, a second epoch
    ds = ip.create_dataset(data, data.train_split, batch_size=4, shuffle=True, seed=7,
                           repeat=True, process_index=p, process_count=2)
    for b in ip.iterate_numpy(ds.take(4)):
      for i, m in zip(b["id"], b["mask"]):
        np.testing.assert_array_equal(m, by_id[int(i)])
  for i, m in by_id.items():
    np.testing.assert_array_equal(m, masks.inpainting_mask(0, i, 32))
  stacked = np.stack(list(by_id.values()))
  assert stacked.dtype == np.float32 and set(np.unique(stacked)) <= {0.0, 1.0}
  data.mask_seed = 1
  other = _all(data, data.train_split)
  assert any(not np.array_equal(m, by_id[int(i)]) for i, m in zip(other["id"], other["mask"]))
  data.mask_seed, data.mask_per_epoch = 0, True
  ds = ip.create_dataset(data, data.train_split, batch_size=9, shuffle=False, seed=0,
                         repeat=True, process_index=0, process_count=1)
  e0, e1 = list(ip.iterate_numpy(ds.take(2)))
  np.testing.assert_array_equal(e0["mask"][4], masks.inpainting_mask(0, 4, 32, epoch=0))
  np.testing.assert_array_equal(e1["mask"][4], masks.inpainting_mask(0, 4, 32, epoch=1))


def test_mask_kinds_center_file_and_dir(paper_dirs, tmp_path):
  from PIL import Image
  data = _paper_data(paper_dirs, "celeb_a_hq", 256, "inpainting", image_size=32)
  data.mask_kind = "center"
  got = _all(data, data.eval_split)["mask"][0]
  assert got[16, 16] == 0 and got[2, 2] == 1 and got.sum() == 32 * 32 - 16 * 16
  hole = np.zeros((32, 32), np.uint8)
  hole[:, 20:] = 255  # white = hole in this file
  Image.fromarray(hole).save(tmp_path / "hole.png")
  data.update(dict(mask_kind="file", mask_path=str(tmp_path / "hole.png"), mask_white="hole"))
  got = _all(data, data.eval_split)["mask"][0]
  assert np.all(got[:, 20:] == 0) and np.all(got[:, :20] == 1)
  folder = tmp_path / "per_id"
  folder.mkdir()
  for i in range(9, 10):
    known = np.full((32, 32), 255, np.uint8)
    known[i:i + 4] = 0  # black = hole (mask_white = known)
    Image.fromarray(known).save(folder / f"{i:06d}.png")
  data.update(dict(mask_kind="dir", mask_path=str(folder), mask_white="known"))
  got = _all(data, data.eval_split)["mask"][0]
  assert got[:9].min() == 1 and got[9:13].max() == 0 and got[13:].min() == 1
  with pytest.raises(ValueError, match="has no 000000.png"):
    ip.create_dataset(data, data.train_split, batch_size=1, shuffle=False, seed=0,
                      repeat=False, process_index=0, process_count=1)
  Image.fromarray(hole[:16]).save(tmp_path / "small.png")
  data.update(dict(mask_kind="file", mask_path=str(tmp_path / "small.png")))
  with pytest.raises(ValueError, match=r"small.png is 32x16, expected 32x32"):
    ip.create_dataset(data, data.eval_split, batch_size=1, shuffle=False, seed=0,
                      repeat=False, process_index=0, process_count=1)
  data.mask_kind = "bogus"
  with pytest.raises(ValueError, match="config.data.mask_kind"):
    ip.create_dataset(data, data.eval_split, batch_size=1, shuffle=False, seed=0,
                      repeat=False, process_index=0, process_count=1)


def test_mask_distribution_and_geometry():
  # Deterministic, seed-dependent, and the same mask at any resolution (resampled).
  np.testing.assert_array_equal(masks.inpainting_mask(3, 17, 64), masks.inpainting_mask(3, 17, 64))
  assert not np.array_equal(masks.inpainting_mask(3, 17, 64), masks.inpainting_mask(4, 17, 64))
  agree = [np.mean(masks.inpainting_mask(0, i, 256)[1::4, 1::4] == masks.inpainting_mask(0, i, 64))
           for i in range(20)]
  assert min(agree) > 0.95
  # LFM's draw: no hole with probability 1/2 * 1/12 + 1/2 * 1/4 = 1/6; holes cover on average
  # about a tenth of the image (strokes up to 11 x 5 segments, boxes up to 3 of 100 px).
  holes = np.array([1.0 - masks.inpainting_mask(0, i, 32).mean() for i in range(1500)])
  assert abs(np.mean(holes == 0) - 1 / 6) < 0.03
  assert 0.05 < holes.mean() < 0.2 and holes.max() < 0.8
  # A horizontal stroke of width 20 (radius 10) from x = 50 to 150 at y = 100, at 256 px.
  hole = np.zeros((256, 256), bool)
  masks._stroke(hole, 50, 100, 150, 100, 20, 1.0)  # pylint: disable=protected-access
  assert hole[90:111, 50:151].all() and not hole[:90].any() and not hole[111:].any()
  assert hole[100, 40] and not hole[100, 39] and hole[100, 160] and not hole[100, 161]  # caps
  box = np.zeros((64, 64), bool)
  masks._box(box, 10, 20, 30, 40, 0.25)  # pylint: disable=protected-access
  # Output pixel j has its centre at reference 4j + 1.5: columns 2..9 and rows 5..14 lie in
  # [9.5, 39.5) x [19.5, 59.5).
  assert box.sum() == 80 and box[5:15, 2:10].all()


def test_mask_helpers_and_mask_files(tmp_path):
  from PIL import Image
  mask = np.array([[1.0, 0.0]], np.float32)
  np.testing.assert_array_equal(masks.model_channel(mask), [[-1.0, 1.0]])  # hole = +1
  image = np.full((1, 2, 3), 0.5, np.float32)
  np.testing.assert_array_equal(masks.masked_image(image, mask)[0, :, 0], [0.5, -1.0])
  gen = np.full((1, 2, 3), -0.25, np.float32)
  np.testing.assert_array_equal(masks.paste_known(gen, image, mask)[0, :, 0], [0.5, -0.25])
  grey = np.zeros((8, 8), np.uint8)
  grey[:, :3] = 255
  Image.fromarray(grey).convert("RGB").save(tmp_path / "m.png")
  known = masks.read_mask_file(tmp_path / "m.png", 8)
  assert known[:, :3].min() == 1 and known[:, 3:].max() == 0
  np.testing.assert_array_equal(masks.read_mask_file(tmp_path / "m.png", 8, white="hole"),
                                1 - known)
  with pytest.raises(ValueError, match=r"m.png is 8x8, expected 16x16"):
    masks.read_mask_file(tmp_path / "m.png", 16)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="bad.png is not a readable image"):
    masks.read_mask_file(tmp_path / "bad.png", 8)
  with pytest.raises(ValueError, match="does not exist"):
    masks.read_mask_file(tmp_path / "missing.png", 8)


# ------------------------------------------------------------------------ wrong manual files


def _expect_manual_error(data, match):
  t0 = time.perf_counter()
  with pytest.raises(ip.ManualFileError, match=match) as err:
    ip.create_dataset(data, data.train_split, batch_size=1, shuffle=False, seed=0,
                      repeat=False, process_index=0, process_count=1)
  assert time.perf_counter() - t0 < 5.0
  assert "\n" not in str(err.value)
  assert isinstance(err.value, ip.DatasetNotAvailableError)  # what stages turns into one line
  assert not ip.get_builder(data).is_prepared()


def _fresh(tmp_path, helper, *args, **overrides):
  dirs = {"manual": str(tmp_path / "manual"), "data_dir": str(tmp_path / "tfds")}
  return dirs["manual"], _paper_data(dirs, helper, *args, **overrides)


def test_celeb_a_hq_archive_of_the_wrong_resolution_or_broken(tmp_path):
  manual, data = _fresh(tmp_path, "celeb_a_hq", 256)
  manual_data.write_celeb_a_hq_tar(manual, 256, 3, size=128)  # 128px images in data256x256.tar
  _expect_manual_error(data, r"data256x256.tar:data256x256/00000.png is 128x128, expected 256x256")
  manual_data.write_celeb_a_hq_tar(manual, 256, 3)
  manual_data.truncate(os.path.join(manual, "data256x256.tar"), nbytes=700)  # inside image 0
  _expect_manual_error(data, "data256x256.tar is a truncated or corrupt tar|not a readable image")
  manual_data.garbage(os.path.join(manual, "data256x256.tar"))
  _expect_manual_error(data, "data256x256.tar is not a readable tar archive")


def test_other_broken_manual_files(tmp_path):
  from PIL import Image
  manual, data = _fresh(tmp_path / "ffhq", "ffhq")
  manual_data.write_ffhq_tree(manual, 2, size=64)
  Image.new("RGB", (64, 48)).save(os.path.join(manual, "images1024x1024", "00000", "00000.png"))
  _expect_manual_error(data, r"00000.png is 64x48, expected a square image")

  manual, data = _fresh(tmp_path / "lsun", "lsun", "church_outdoor")
  manual_data.write_lsun_lmdb(manual, "church_outdoor", "train", 2)
  manual_data.garbage(os.path.join(manual, "church_outdoor_train_lmdb", "data.mdb"))
  _expect_manual_error(data, "church_outdoor_train_lmdb is not a readable LMDB")
  os.makedirs(os.path.join(manual, "x"))
  os.rename(os.path.join(manual, "church_outdoor_train_lmdb"), os.path.join(manual, "x", "old"))
  manual_data.garbage(os.path.join(manual, "church_outdoor_train_lmdb.zip"))
  _expect_manual_error(data, "church_outdoor_train_lmdb.zip is not a readable zip archive")

  manual, data = _fresh(tmp_path / "imagenet", "imagenet")
  manual_data.write_imagenet(manual, num_val=3)
  import tarfile
  val = os.path.join(manual, "ILSVRC2012_img_val.tar")
  with tarfile.open(val, "w") as tar:  # images 1 and 3: image 3 would get label 2
    for k in (1, 3):
      data_bytes = manual_data.encode(manual_data.picture(k, 8), "JPEG")
      info = tarfile.TarInfo(f"ILSVRC2012_val_{k:08d}.JPEG")
      info.size = len(data_bytes)
      tar.addfile(info, __import__("io").BytesIO(data_bytes))
  _expect_manual_error(data, "numbered 1..2 without gaps")

  manual, data = _fresh(tmp_path / "cm", "celebamask_hq")
  manual_data.write_celebamask_hq(manual, indices=(0,), image_size=64, mask_size=64)
  manual_data.truncate(os.path.join(manual, "CelebAMask-HQ.zip"), 0.5)
  _expect_manual_error(data, "CelebAMask-HQ.zip is not a readable zip archive")
