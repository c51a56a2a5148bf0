"""Latent cache: reuse, invalidation, atomic writes, scale factor."""

import os

import jax
import numpy as np
import pytest

from lfm_jax import latents


def _batches(n=40, batch=16, size=8, seed=0):
  rs = np.random.RandomState(seed)
  images = rs.uniform(-1, 1, (n, size, size, 1)).astype(np.float32)
  labels = rs.randint(0, 10, n)

  def factory():
    for i in range(0, n, batch):
      yield {"image": images[i:i + batch], "label": labels[i:i + batch],
             "id": np.arange(i, min(i + batch, n)) + 1000}
  return factory, images, labels


class _Encoder:
  """A stand-in encoder: 2x2 average pool to 4 channels; counts its calls."""

  def __init__(self, gain=3.0, logvar=-1.0):
    self.calls = 0
    self.gain = gain
    self.logvar = logvar

  def __call__(self, x):
    self.calls += 1
    b, h, w, _ = x.shape
    pooled = x.reshape(b, h // 2, 2, w // 2, 2, 1).mean(axis=(2, 4))
    mean = self.gain * np.concatenate([pooled, -pooled, 2 * pooled, pooled + 0.5], axis=-1)
    return mean, np.full_like(mean, self.logvar)


FP = {"autoencoder": "/ckpt/ae", "step": 1000, "data": "lfm_digits", "split": "train",
      "image_size": 8}


def test_build_then_reuse(tmp_path):
  factory, images, labels = _batches()
  enc = _Encoder()
  msgs = []
  m1 = latents.build_latent_cache(str(tmp_path), enc, factory, fingerprint=FP, log=msgs.append)
  assert not m1["reused"] and m1["num_examples"] == 40 and enc.calls == 3
  assert m1["latent_shape"] == [4, 4, 4]
  enc2 = _Encoder()
  factory_calls = []
  m2 = latents.build_latent_cache(str(tmp_path), enc2,
                                  lambda: factory_calls.append(1) or factory(),
                                  fingerprint=dict(FP), log=msgs.append)
  assert m2["reused"] and enc2.calls == 0 and not factory_calls
  assert msgs[-1] == f"reusing latent cache at {tmp_path / 'latents'} (40 examples)"
  c = latents.load_latent_cache(str(tmp_path))
  assert c["mean"].shape == (40, 4, 4, 4) and c["mean"].dtype == np.float32
  np.testing.assert_array_equal(c["label"], labels)
  np.testing.assert_array_equal(c["id"], np.arange(40) + 1000)
  np.testing.assert_allclose(c["mean"], _Encoder()(images)[0], rtol=1e-6)
  assert c["scale_factor"] == pytest.approx(m1["scale_factor"])


def test_fingerprint_change_invalidates(tmp_path):
  factory, images, _ = _batches()
  latents.build_latent_cache(str(tmp_path), _Encoder(gain=3.0), factory, fingerprint=FP,
                             log=lambda m: None)
  enc = _Encoder(gain=1.0)
  msgs = []
  m = latents.build_latent_cache(str(tmp_path), enc, factory,
                                 fingerprint=dict(FP, step=2000), log=msgs.append)
  assert not m["reused"] and enc.calls == 3
  assert "does not match" in msgs[0]
  c = latents.load_latent_cache(str(tmp_path))
  np.testing.assert_allclose(c["mean"], _Encoder(gain=1.0)(images)[0], rtol=1e-6)
  assert sorted(os.listdir(tmp_path)) == ["latents"]  # no temp or old dirs left behind


def test_interrupted_build_leaves_old_cache_valid(tmp_path):
  factory, _, _ = _batches()
  latents.build_latent_cache(str(tmp_path), _Encoder(), factory, fingerprint=FP,
                             log=lambda m: None)

  class Boom(_Encoder):
    def __call__(self, x):
      if self.calls == 1:
        raise KeyboardInterrupt
      return super().__call__(x)

  with pytest.raises(KeyboardInterrupt):
    latents.build_latent_cache(str(tmp_path), Boom(), factory, fingerprint=dict(FP, step=5),
                               log=lambda m: None)
  assert sorted(os.listdir(tmp_path)) == ["latents"]
  assert latents.read_manifest(str(tmp_path))["fingerprint"]["step"] == 1000
  # And with no previous cache, an interrupted build leaves nothing that looks valid.
  with pytest.raises(KeyboardInterrupt):
    latents.build_latent_cache(str(tmp_path / "fresh"), Boom(), factory, fingerprint=FP,
                               log=lambda m: None)
  assert latents.read_manifest(str(tmp_path / "fresh")) is None
  assert os.listdir(tmp_path / "fresh") == []


def test_computed_scale_factor_gives_unit_std(tmp_path):
  factory, _, _ = _batches(n=64)
  m = latents.build_latent_cache(str(tmp_path), _Encoder(gain=5.0, logvar=0.5), factory,
                                 fingerprint=FP, log=lambda m: None)
  assert m["scale_factor_source"] == "computed"
  c = latents.load_latent_cache(str(tmp_path))
  z = jax.jit(latents.sample_latents)(jax.random.PRNGKey(7), c["mean"], c["logvar"],
                                      c["scale_factor"])
  std = float(np.std(np.asarray(z)))
  print("scale factor", c["scale_factor"], "std of scaled latents", std)
  assert abs(std - 1.0) < 0.05
  assert c["scale_factor"] == pytest.approx(
      latents.compute_scale_factor(c["mean"], c["logvar"]), rel=0.05)
  # A given scale factor replaces it without re-encoding.
  enc = _Encoder()
  m2 = latents.build_latent_cache(str(tmp_path), enc, factory, fingerprint=FP,
                                  scale_factor=0.18215, log=lambda m: None)
  assert m2["reused"] and enc.calls == 0
  assert latents.load_latent_cache(str(tmp_path))["scale_factor"] == 0.18215


def test_float16_shards_and_mask(tmp_path):
  factory, images, labels = _batches(n=20, batch=6)

  def masked():
    for b in factory():
      mask = np.ones(len(b["label"]), bool)
      mask[-1] = False  # the last example of every batch is padding
      yield dict(b, mask=mask)

  m = latents.build_latent_cache(str(tmp_path), _Encoder(), masked, fingerprint=FP,
                                 dtype="float16", shard_size=4, log=lambda m: None)
  keep = np.array([i % 6 != 5 and i != 19 for i in range(20)])
  assert m["num_examples"] == int(keep.sum()) == 16
  assert len(m["shards"]) == 4 and all(s["num_examples"] == 4 for s in m["shards"])
  c = latents.load_latent_cache(str(tmp_path))
  assert c["mean"].dtype == np.float16
  np.testing.assert_array_equal(c["id"], np.arange(20)[keep] + 1000)
  np.testing.assert_array_equal(c["label"], labels[keep])
  np.testing.assert_allclose(c["mean"], _Encoder()(images)[0][keep], atol=1e-2)
  # Changing the storage dtype rebuilds.
  enc = _Encoder()
  assert not latents.build_latent_cache(str(tmp_path), enc, masked, fingerprint=FP,
                                        log=lambda m: None)["reused"]
  assert enc.calls == 4


def test_params_fingerprint():
  p = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
  q = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3, np.float32)}}
  assert latents.params_fingerprint(p) == latents.params_fingerprint(q)
  q["b"]["c"][1] = 1e-7
  assert latents.params_fingerprint(p) != latents.params_fingerprint(q)


def test_fingerprint_from_config():
  from configs.default import get_config
  config = get_config()
  a = latents.fingerprint_from_config(config, {"path": "/w/autoencoder", "step": 1000})
  assert a["data"]["name"] == "lfm_digits" and a["data"]["split"] == "train"
  assert a == latents.fingerprint_from_config(get_config(), {"path": "/w/autoencoder", "step": 1000})
  config.data.image_size = 32
  assert a != latents.fingerprint_from_config(config, {"path": "/w/autoencoder", "step": 1000})
  assert a != latents.fingerprint_from_config(get_config(), {"path": "/w/autoencoder", "step": 2000})
