"""Latent cache: groups, reuse, invalidation, atomic builds, scale factor, flips, training order."""

import os

import jax
import numpy as np
import pytest

from helpers import default_config
from lfm_jax import latents

N = 40


def _data(n=N, size=8, seed=0):
  rs = np.random.RandomState(seed)
  images = rs.uniform(-1, 1, (n, size, size, 1)).astype(np.float32)
  labels = rs.randint(0, 10, n).astype(np.int32)
  ids = np.arange(n, dtype=np.int64) + 1000

  def read(want, batch=16):
    pos = np.searchsorted(ids, want)
    for i in range(0, len(pos), batch):
      p = pos[i:i + batch]
      yield {"image": images[p], "label": labels[p], "id": ids[p]}

  return ids, read, images, labels


class _Encoder:
  """A stand-in encoder: 2x2 average pool to 4 channels; counts its calls and rows."""

  def __init__(self, gain=3.0, logvar=-1.0):
    self.calls, self.rows = 0, 0
    self.gain, self.logvar = gain, logvar

  def __call__(self, x):
    self.calls += 1
    self.rows += len(x)
    b, h, w, _ = x.shape
    pooled = x.reshape(b, h // 2, 2, w // 2, 2, 1).mean(axis=(2, 4))
    mean = self.gain * np.concatenate([pooled, -pooled, 2 * pooled, pooled + 0.5], axis=-1)
    return mean, np.full_like(mean, self.logvar)


FP = {"autoencoder": {"trained": {"path": "/ckpt/ae", "size": 1}}, "data": "lfm_digits"}


def _build(tmp_path, enc=None, fp=FP, groups=4, chunk=4, msgs=None, **kw):
  ids, read, _, _ = _data()
  return latents.build_cache(str(tmp_path / "latents"), fp, ids=ids, read_images=read,
                             encode_fn=enc or _Encoder(), groups=groups, chunk=chunk,
                             log=(msgs.append if msgs is not None else lambda m: None), **kw)


def test_build_then_reuse(tmp_path):
  enc, msgs = _Encoder(), []
  cache, reused = _build(tmp_path, enc, msgs=msgs)
  assert not reused and cache.num_examples == N and cache.num_groups == 4
  assert cache.latent_shape == (4, 4, 4)
  assert enc.rows == N + (-10 % 4) * 4  # each group of 10 is padded to whole chunks of 4
  files = sorted(os.listdir(tmp_path / "latents"))
  assert len(files) == 5 and files[-1] == "manifest.json"
  enc2 = _Encoder()
  again, reused = _build(tmp_path, enc2, msgs=msgs)
  assert reused and enc2.calls == 0
  assert msgs[-1] == f"latents: reusing the cache at {tmp_path / 'latents'} ({N} examples)"
  ids, _, images, labels = _data()
  arrays = again.read()
  np.testing.assert_array_equal(arrays["id"], ids)
  np.testing.assert_array_equal(arrays["label"], labels)
  np.testing.assert_allclose(arrays["mean"], _Encoder()(images)[0], rtol=1e-6)
  assert [g["num_examples"] for g in again.manifest["groups"]] == [10, 10, 10, 10]
  np.testing.assert_array_equal(again.read([2])["id"], ids[20:30])


def test_fingerprint_change_rebuilds_and_cleans_up(tmp_path):
  _build(tmp_path, _Encoder(gain=3.0))
  msgs = []
  enc = _Encoder(gain=1.0)
  cache, reused = _build(tmp_path, enc, fp=dict(FP, data="other"), msgs=msgs)
  assert not reused and enc.calls > 0 and "rebuilding" in msgs[0]
  _, _, images, _ = _data()
  np.testing.assert_allclose(cache.read()["mean"], _Encoder(gain=1.0)(images)[0], rtol=1e-6)
  files = sorted(os.listdir(tmp_path / "latents"))
  assert files == sorted([g["file"] for g in cache.manifest["groups"]] + ["manifest.json"])


def test_interrupted_build_leaves_old_cache_valid(tmp_path):
  _build(tmp_path)

  class Boom(_Encoder):
    def __call__(self, x):
      if self.calls == 2:
        raise KeyboardInterrupt
      return super().__call__(x)

  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, Boom(), fp=dict(FP, data="other"))
  cache = latents.LatentCache.open(str(tmp_path / "latents"))
  assert cache.manifest["fingerprint"]["data"] == "lfm_digits"
  np.testing.assert_array_equal(cache.read()["id"], _data()[0])  # its files are all there
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path / "fresh", Boom())
  assert latents.LatentCache.open(str(tmp_path / "fresh" / "latents")) is None


def test_scale_factor_unit_std_and_independent_of_grouping(tmp_path):
  enc = _Encoder(gain=5.0, logvar=0.5)
  a, _ = _build(tmp_path / "a", enc, groups=4, chunk=4)
  b, _ = _build(tmp_path / "b", enc, groups=5, chunk=2)
  assert a.manifest["latent_std"] == pytest.approx(b.manifest["latent_std"], rel=1e-12)
  arrays = a.read()
  z = jax.jit(latents.sample_latents)(jax.random.PRNGKey(7), arrays["mean"], arrays["logvar"],
                                      a.scale_factor)
  std = float(np.std(np.asarray(z)))
  print("scale factor", a.scale_factor, "std of scaled latents", std)
  assert abs(std - 1.0) < 0.05


def test_float16_storage_and_flipped_orientation(tmp_path):
  cache, _ = _build(tmp_path, dtype="float16", flipped=True)
  arrays = cache.read()
  assert arrays["mean"].dtype == np.float16 and cache.flipped
  _, _, images, _ = _data()
  np.testing.assert_allclose(arrays["mean"], _Encoder()(images)[0], atol=1e-2)
  np.testing.assert_allclose(arrays["mean_flip"], _Encoder()(images[:, :, ::-1])[0], atol=1e-2)


def _iterator(cache, **kw):
  kw.setdefault("batch_size", 8)
  kw.setdefault("seed", 3)
  return latents.LatentIterator(cache, with_ids=True, **kw)


def test_training_order_is_the_same_for_any_host_count(tmp_path):
  cache, _ = _build(tmp_path, groups=4)
  one = _iterator(cache, process_index=0, process_count=1)
  two = [_iterator(cache, process_index=p, process_count=2) for p in range(2)]
  seen = []
  for _ in range(12):
    batch = next(one)
    halves = [next(it) for it in two]
    for k in batch:
      np.testing.assert_array_equal(batch[k], np.concatenate([h[k] for h in halves]))
    seen.append(batch["id"])
    # 4 lanes of 2 rows: lane l draws from group l only; host p from its own groups.
    lanes = (batch["id"] - 1000) // 10
    np.testing.assert_array_equal(lanes, np.repeat(np.arange(4), 2))
  seen = np.concatenate(seen)
  # Every lane epoch is a permutation: the first 5 batches see every example exactly once.
  assert sorted(seen[:40].tolist()) == list(range(1000, 1040))
  assert not np.array_equal(seen[:40], seen[40:80])  # a new order every epoch


def test_training_order_resumes_exactly(tmp_path):
  cache, _ = _build(tmp_path, groups=4)
  it = _iterator(cache)
  for _ in range(7):
    next(it)
  state = it.state()
  expected = [next(it)["id"] for _ in range(3)]
  fresh = _iterator(cache).restore(state)
  np.testing.assert_array_equal(np.concatenate(expected),
                                np.concatenate([next(fresh)["id"] for _ in range(3)]))
  with pytest.raises(latents.CacheError, match="batch_size"):
    _iterator(cache, batch_size=16).restore(state)


def test_subset_flips_and_bad_host_counts(tmp_path):
  cache, _ = _build(tmp_path, groups=4, flipped=True)
  kept = np.arange(1000, 1040, 2)
  it = _iterator(cache, kept_ids=kept, flip=True)
  batches = [next(it) for _ in range(10)]
  ids = np.concatenate([b["id"] for b in batches])
  assert set(ids.tolist()) <= set(kept.tolist())
  flipped = np.concatenate([b["flipped"] for b in batches])
  assert 0 < flipped.mean() < 1  # both orientations are drawn
  arrays = cache.read()
  row = {int(i): r for r, i in enumerate(arrays["id"])}
  means = np.concatenate([b["mean"] for b in batches])
  for m, i, f in zip(means, ids, flipped):
    expected = arrays["mean_flip" if f else "mean"][row[int(i)]]
    np.testing.assert_array_equal(m, expected)
  with pytest.raises(latents.CacheError, match="holds one orientation"):
    _iterator(_build(tmp_path / "plain")[0], flip=True)
  with pytest.raises(latents.CacheError, match="not divisible by the 3 processes"):
    _iterator(cache, process_index=0, process_count=3)


def test_fingerprint_names_everything_the_images_depend_on():
  config = default_config()
  a = latents.fingerprint(config, {"trained": {"path": "/w/ae", "size": 1}})
  assert a["data"]["name"] == "lfm_digits" and a["data"]["split"] == "train"
  assert a == latents.fingerprint(default_config(), {"trained": {"path": "/w/ae", "size": 1}})
  assert a != latents.fingerprint(config, {"trained": {"path": "/w/ae", "size": 2}})
  for key, value in [("data.image_size", 32), ("data.image_folder", "/data/other_folder"),
                     ("data.random_flip", True), ("data.train_split", "train[:50%]"),
                     ("latents.groups", 8), ("latents.dtype", "float16")]:
    changed = default_config()
    section, leaf = key.split(".")
    changed[section][leaf] = value
    assert latents.fingerprint(changed, {"trained": {"path": "/w/ae", "size": 1}}) != a, key


def test_params_fingerprint():
  p = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
  q = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
  assert latents.params_fingerprint(p) == latents.params_fingerprint(q)
  q["b"]["c"][1] = 1e-7
  assert latents.params_fingerprint(p) != latents.params_fingerprint(q)
