"""Fréchet distance, streaming statistics, precision/recall, KID and the feature extractors."""

import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lfm_jax.metrics import features as feats_lib
from lfm_jax.metrics.fid import (FeatureStats, allgather_stats, frechet_distance, load_feature_stats,
                                 load_stats, save_feature_stats, save_stats)
from lfm_jax.metrics.precision_recall import kid, knn_radii, precision_recall


# ----------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_form_diagonal(method):
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_full_covariances():
  rng = np.random.default_rng(1)
  d = 32
  a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
  s1, s2 = a @ a.T / d, b @ b.T / d
  mu = rng.normal(size=d)
  assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-9
  # Rank-deficient covariances (fewer samples than dims, as with few samples in 2048-d).
  c = rng.normal(size=(d, d // 4))
  s3 = c @ c.T
  for sa, sb in [(s1, s2), (s1, s3)]:
    e = frechet_distance(mu, sa, mu + 1, sb, method="eigh")
    q = frechet_distance(mu, sa, mu + 1, sb, method="sqrtm")
    np.testing.assert_allclose(e, q, rtol=1e-6)
  # Commuting case: Σ2 = 4 Σ1 -> tr sqrt(Σ1 Σ2) = 2 tr Σ1 -> d² = tr Σ1.
  np.testing.assert_allclose(frechet_distance(mu, s1, mu, 4 * s1), np.trace(s1), rtol=1e-10)


def test_feature_stats_sharded_equals_single_pass():
  rng = np.random.default_rng(2)
  x = rng.normal(loc=0.5, scale=2.0, size=(1000, 24)).astype(np.float32)
  single = FeatureStats(24).add(x)
  np.testing.assert_allclose(single.mean(), x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(single.cov(), np.cov(x.astype(np.float64), rowvar=False),
                             rtol=1e-10, atol=1e-12)
  # 8 shards of uneven sizes, each fed in uneven batches, then pooled.
  cuts = np.sort(rng.choice(np.arange(1, 1000), 7, replace=False))
  shards = []
  for part in np.split(x, cuts):
    s = FeatureStats(24)
    for batch in np.array_split(part, 3):
      s.add(batch)
    shards.append(s)
  pooled = FeatureStats(24)
  for s in shards:
    pooled.merge(s)
  assert pooled.n == 1000
  for a, b in [(pooled.mean(), single.mean()), (pooled.cov(), single.cov())]:
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-10
  # The multi-process gather is exact (single process here: a copy); its bit-cast transfer
  # format round-trips float64 exactly.
  g = allgather_stats(pooled)
  assert g is not pooled and g.n == pooled.n and np.array_equal(g.sum_outer, pooled.sum_outer)
  g = allgather_stats(pooled, always_gather=True)  # through process_allgather
  assert g.n == pooled.n and np.array_equal(g.sum, pooled.sum)
  assert np.array_equal(g.sum_outer, pooled.sum_outer)
  from lfm_jax.metrics.fid import _f64_to_u32, _u32_to_f64
  assert np.array_equal(_u32_to_f64(_f64_to_u32(pooled.sum_outer)), pooled.sum_outer)


def test_stats_files_roundtrip(tmp_path):
  rng = np.random.default_rng(3)
  stats = FeatureStats.from_features(rng.normal(size=(50, 8)))
  save_stats(tmp_path / "ref.npz", stats.mean(), stats.cov())
  mu, sigma = load_stats(tmp_path / "ref.npz")
  np.testing.assert_array_equal(mu, stats.mean())
  np.testing.assert_array_equal(sigma, stats.cov())
  with np.load(tmp_path / "ref.npz") as f:
    assert set(f.files) == {"mu", "sigma"}  # pytorch-fid format
  save_feature_stats(tmp_path / "full.npz", stats)
  back = load_feature_stats(tmp_path / "full.npz")
  assert back.n == 50 and np.array_equal(back.sum_outer, stats.sum_outer)
  assert load_feature_stats(tmp_path / "ref.npz") is None
  np.testing.assert_array_equal(load_stats(tmp_path / "full.npz")[0], stats.mean())


# ----------------------------------------------------------------------------- precision / recall, KID


def test_precision_recall_extremes():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(300, 16))
  pr = precision_recall(real, real.copy(), k=3, batch_size=64)
  assert pr == {"precision": 1.0, "recall": 1.0}
  far = rng.normal(size=(200, 16)) + 100.0
  pr = precision_recall(real, far, k=3, batch_size=64)
  assert pr == {"precision": 0.0, "recall": 0.0}
  # A generator covering one of two modes (2-D, where k-NN balls cover a fresh sample well):
  # high precision, about half the recall.
  modes = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0])
  half = rng.normal(size=(200, 2))
  pr = precision_recall(modes, half, k=3)
  assert pr["precision"] > 0.9 and 0.3 < pr["recall"] < 0.55


def test_knn_radii_brute_force():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(40, 3))
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  expected = np.sort(d, axis=1)[:, 3]  # column 0 is the point itself
  np.testing.assert_allclose(knn_radii(x, k=3, batch_size=7), expected, rtol=1e-8, atol=1e-10)


def test_kid():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(2000, 32))
  kw = dict(num_subsets=20, subset_size=100)
  # Identical sets: ~0 (slightly negative in expectation, because independently drawn subsets of
  # one set share points; torch-fidelity's estimator behaves the same).
  same = kid(real, real.copy(), **kw)
  assert abs(same["mean"]) < 0.02 and same["std"] >= 0
  other = kid(real, rng.normal(size=(2000, 32)), **kw)  # a fresh sample of the same law
  assert abs(other["mean"]) < 0.02
  shifted = kid(real, rng.normal(size=(2000, 32)) + 0.3, **kw)
  assert shifted["mean"] > 0.15 and shifted["mean"] > 5 * shifted["std"]
  assert kid(real, real + 1.0, **kw)["mean"] > 10 * shifted["mean"]
  assert kid(real, real, seed=3, **kw) == kid(real, real, seed=3, **kw)  # seeded


# ----------------------------------------------------------------------------- feature extractors


def test_inception_extractor_unavailable_message(tmp_path):
  with pytest.raises(feats_lib.FeatureExtractorUnavailable) as e:
    feats_lib.get_feature_extractor("inception")
  msg = str(e.value)
  assert "pt_inception-2015-12-05-6726825d.pth" in msg and "eval.inception_weights" in msg
  with pytest.raises(feats_lib.FeatureExtractorUnavailable, match="not found"):
    feats_lib.get_feature_extractor("inception", weights_path=str(tmp_path / "nope.pth"))
  assert feats_lib.metric_name("fd", "inception") == "fid"
  assert feats_lib.metric_name("fd", "digits_classifier") == "fd_digits_classifier"
  assert feats_lib.metric_name("kid", "inception") == "kid"
  assert feats_lib.metric_name("kid", "digits_classifier") == "kd_digits_classifier"
  assert feats_lib.metric_name("precision", "inception") == "precision_inception"


def test_images_to_uint8_range():
  from lfm_jax.models.inception import images_to_uint8_range
  x = jnp.array([-1.0, -0.999, 0.0, 1.0, 1.5]).reshape(1, 1, 5, 1)
  out = np.asarray(images_to_uint8_range(x))
  assert out.shape == (1, 1, 5, 3)
  np.testing.assert_array_equal(out[0, 0, :, 0], [0, 0, 128, 255, 255])


def test_register_callable_extractor():
  name = "test_mean_pixels"
  if name not in feats_lib.available_feature_extractors():
    feats_lib.register_feature_extractor(
        name, lambda **kw: feats_lib.CallableFeatureExtractor(
            name, 2, lambda im: jnp.stack([im.mean((1, 2, 3)), im.std((1, 2, 3))], -1)))
  fe = feats_lib.get_feature_extractor(name)
  assert fe.name == name and fe.dim == 2
  assert fe.extract(np.zeros((5, 4, 4, 1), np.float32), batch_size=2).shape == (5, 2)
  with pytest.raises(ValueError, match="unknown feature extractor"):
    feats_lib.get_feature_extractor("no_such_extractor")


def _digits_16():
  datasets = pytest.importorskip("sklearn.datasets")
  d = datasets.load_digits()
  x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0
  x = np.asarray(jax.image.resize(jnp.asarray(x)[..., None], (len(x), 16, 16, 1), "linear"))
  perm = np.random.default_rng(0).permutation(len(x))
  n_train = int(0.8 * len(x))
  return (x[perm[:n_train]], d.target[perm[:n_train]], x[perm[n_train:]], d.target[perm[n_train:]])


def test_digits_classifier(tmp_path):
  x_tr, y_tr, x_te, y_te = _digits_16()
  with pytest.raises(feats_lib.FeatureExtractorUnavailable):
    feats_lib.get_feature_extractor("digits_classifier", cache_dir=str(tmp_path),
                                    image_shape=(16, 16, 1))
  t0 = time.time()
  clf = feats_lib.get_feature_extractor("digits_classifier", cache_dir=str(tmp_path),
                                        train_images=x_tr, train_labels=y_tr)
  elapsed = time.time() - t0
  acc = clf.accuracy(x_te, y_te)
  print(f"digits classifier: test accuracy {acc:.4f} on {len(y_te)} held-out digits, "
        f"trained in {elapsed:.1f}s")
  assert acc >= 0.97
  assert clf.name == "digits_classifier" and clf.dim == 128
  f = clf.extract(x_te[:10], batch_size=4)
  assert f.shape == (10, 128) and np.isfinite(f).all()
  # Cached: the second call loads the .npz (no training data needed) and gives the same features.
  again = feats_lib.get_feature_extractor("digits_classifier", cache_dir=str(tmp_path),
                                          image_shape=(16, 16, 1))
  np.testing.assert_allclose(np.asarray(again(x_te[:10])), f, rtol=1e-6, atol=1e-6)
  assert again.class_agreement(x_te, y_te) == acc
  # Real train vs test digits are close in its features; a shuffled-pixel set is far.
  from lfm_jax.metrics.fid import frechet_distance_from_stats
  tr = FeatureStats.from_features(clf.extract(x_tr))
  te = FeatureStats.from_features(clf.extract(x_te))
  noise = np.random.default_rng(0).permuted(x_te.reshape(len(x_te), -1), axis=1)
  nz = FeatureStats.from_features(clf.extract(noise.reshape(x_te.shape)))
  assert frechet_distance_from_stats(tr, te) * 5 < frechet_distance_from_stats(tr, nz)
