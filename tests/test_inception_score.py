"""Inception Score: the pure function and the streaming stats against torch-fidelity's IS, and
the InceptionV3 logits against torch-fidelity's FID Inception on the same random weights."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_fidelity_module, randomise_batch_norm, random_fidelity_inception
from lfm_jax.converters.common import WeightConversionError
from lfm_jax.converters.inception import (convert_inception_logits, convert_inception_state_dict,
                                          load_inception_with_logits)
from lfm_jax.metrics.inception_score import (InceptionScoreStats, allgather_inception_stats,
                                             inception_score)
from lfm_jax.models.inception import InceptionV3, resize_bilinear_tf1, variable_shapes



_load_fidelity_module = load_fidelity_module


@pytest.fixture(scope="module")
def fidelity_isc():
  """torch-fidelity's `isc_features_to_metric` (its package imports torchvision: stub `utils`)."""
  pytest.importorskip("torch")
  _load_fidelity_module("helpers")  # creates the bare package
  stubbed = "torch_fidelity.utils" not in sys.modules
  if stubbed:
    stub = types.ModuleType("torch_fidelity.utils")
    for name in ("extract_featuresdict_from_input_id_cached", "create_feature_extractor",
                 "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
      setattr(stub, name, None)
    sys.modules["torch_fidelity.utils"] = stub
  try:
    mod = _load_fidelity_module("metric_isc")
  finally:
    if stubbed:
      del sys.modules["torch_fidelity.utils"]
  return mod.isc_features_to_metric


def _reference_is(isc, logits, splits, **kw):
  import torch
  out = isc(torch.from_numpy(np.asarray(logits, np.float32)), splits, **kw)
  return out["inception_score_mean"], out["inception_score_std"]


def _random_logits(n, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  # A few dominant classes per sample over a shared background: IS well above 1.
  x = scale * rng.normal(size=(n, 1008))
  x[np.arange(n), rng.integers(0, 40, n)] += 4 * scale
  return x.astype(np.float32)


@pytest.mark.parametrize("n, splits", [(1000, 10), (257, 10), (64, 3), (10, 1)])
def test_inception_score_matches_torch_fidelity(fidelity_isc, n, splits):
  logits = _random_logits(n, seed=n)
  ref = _reference_is(fidelity_isc, logits, splits)
  ours = inception_score(logits, splits)
  assert ours[0] > 2.0
  np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
  # Unshuffled, another seed: same protocol knobs as torch-fidelity's.
  np.testing.assert_allclose(inception_score(logits, splits, shuffle=False),
                             _reference_is(fidelity_isc, logits, splits, shuffle=False), rtol=1e-10)
  np.testing.assert_allclose(inception_score(logits, splits, seed=7),
                             _reference_is(fidelity_isc, logits, splits, rng_seed=7), rtol=1e-10)


def test_inception_score_analytic():
  # Every sample certain of its own class, classes balanced within each split: IS = #classes.
  k, per = 8, 5
  logits = np.full((k * per, 1008), -1e4, np.float32)
  logits[np.arange(k * per), np.tile(np.arange(k), per)] = 0.0
  mean, std = inception_score(logits, splits=per, shuffle=False)
  assert mean == pytest.approx(8.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
  # Identical predictions: p(y|x) = p(y), IS = 1.
  same = np.tile(np.random.default_rng(0).normal(size=(1, 1008)), (30, 1))
  assert inception_score(same, splits=3)[0] == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match="splits"):
    inception_score(same[:2], splits=3)


def test_streaming_stats_equal_pure_function(fidelity_isc):
  n, splits = 203, 10
  logits = _random_logits(n, seed=5)
  whole = inception_score(logits, splits)
  # Batches in a random order, on two "hosts", merged.
  order = np.random.default_rng(1).permutation(n)
  a, b = InceptionScoreStats(n, splits), InceptionScoreStats(n, splits)
  for k, start in enumerate(range(0, n, 17)):
    idx = order[start:start + 17]
    (a if k % 2 else b).add(logits[idx], idx)
  with pytest.raises(ValueError, match="of 203 samples"):
    a.result()
  pooled = a.copy().merge(b)
  np.testing.assert_allclose(pooled.result(), whole, rtol=1e-12)
  np.testing.assert_allclose(pooled.result(), _reference_is(fidelity_isc, logits, splits),
                             rtol=1e-10)
  np.testing.assert_allclose(allgather_inception_stats(pooled, always_gather=True).result(),
                             whole, rtol=1e-12)
  # Memory does not grow with the batches: sums only.
  assert pooled.sum_p.shape == (splits, 1008) and pooled.count.sum() == n
  with pytest.raises(ValueError, match="twice"):
    pooled.add(logits[:1], [0])
  with pytest.raises(ValueError, match="share"):
    a.merge(a.copy())
  with pytest.raises(ValueError, match=r"\[0, 203\)"):
    InceptionScoreStats(n, splits).add(logits[:1], [n])


# ------------------------------------------------------------------ network logits vs torch


@pytest.fixture(scope="module")
def torch_fid_inception():
  """torch-fidelity's FID InceptionV3 returning pool3 and logits_unbiased, random weights
  (BN statistics calibrated on one batch then randomised; fc scaled, bias random)."""
  torch = pytest.importorskip("torch")
  model, _ = random_fidelity_inception(("2048", "logits_unbiased", "logits"), seed=3)
  g = torch.Generator().manual_seed(4)
  randomise_batch_norm(model, g)
  with torch.no_grad():
    model.fc.weight.mul_(0.6)
    model.fc.bias.copy_(torch.randn(1008, generator=g))
  return model


def test_logits_match_torch_fidelity(torch_fid_inception, fidelity_isc, tmp_path):
  torch = pytest.importorskip("torch")
  model = torch_fid_inception
  state_dict = model.state_dict()
  variables = convert_inception_state_dict(state_dict)
  variables["params"]["fc"] = convert_inception_logits(state_dict)
  # Noise, gradients and solid colours: features (and so predictions) differ between images.
  noise = np.random.default_rng(0).integers(0, 256, size=(4, 64, 64, 3))
  yy, xx = np.mgrid[0:64, 0:64]
  ramps = np.stack([np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1),
                    np.stack([255 - yy * 4, xx * 2, yy * 0 + 128], -1)])
  solid = np.stack([np.full((64, 64, 3), c) for c in ([255, 0, 0], [0, 0, 255])])
  images = np.concatenate([noise, ramps, solid]).clip(0, 255).astype(np.uint8)
  with torch.no_grad():
    ref_pool, ref_unbiased, ref_logits = (
        t.numpy() for t in model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()))
  module = InceptionV3(with_logits=True)
  out = jax.jit(module.apply)(variables, resize_bilinear_tf1(jnp.asarray(images, jnp.float32)))
  assert set(out) == {"pool3", "logits_unbiased", "logits"}
  assert out["logits_unbiased"].shape == (8, 1008) and out["logits"].dtype == jnp.float32
  err_pool = np.abs(np.asarray(out["pool3"]) - ref_pool).max()
  err = np.abs(np.asarray(out["logits_unbiased"]) - ref_unbiased).max()
  err_b = np.abs(np.asarray(out["logits"]) - ref_logits).max()
  ours_is = inception_score(np.asarray(out["logits_unbiased"]), splits=2)
  ref_is = _reference_is(fidelity_isc, ref_unbiased, 2)
  print(f"inception logits parity: max abs err pool3 {err_pool:.3g}, logits_unbiased {err:.3g} "
        f"(max |logit| {np.abs(ref_unbiased).max():.3g}, std {ref_unbiased.std():.3g}), "
        f"logits {err_b:.3g}; IS ours {ours_is} torch-fidelity {ref_is} "
        f"diff {abs(ours_is[0] - ref_is[0]):.3g}")
  assert ref_unbiased.std() > 1.0 and ref_is[0] > 1.3  # logits spread: the IS is not trivial
  assert err < 2e-5 * max(1.0, np.abs(ref_unbiased).max())
  assert err_b < 2e-5 * max(1.0, np.abs(ref_logits).max())
  np.testing.assert_allclose(ours_is, ref_is, rtol=1e-4)
  # The pool3-only module keeps its variables (no fc) and its output.
  assert "fc" not in variable_shapes(InceptionV3())["params"]
  assert variable_shapes(module)["params"]["fc"]["kernel"].shape == (2048, 1008)
  # Loading from a file: logits included; a file without fc is refused, naming the key.
  path = tmp_path / "pt_inception.pth"
  torch.save(state_dict, path)
  loaded_module, loaded = load_inception_with_logits(str(path))
  assert loaded_module.with_logits
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                state_dict["fc.weight"].numpy().T)
  torch.save({k: v for k, v in state_dict.items() if k != "fc.bias"}, path)
  with pytest.raises(WeightConversionError, match="fc.bias"):
    load_inception_with_logits(str(path))
  with pytest.raises(WeightConversionError, match="fc.weight"):
    convert_inception_logits({**state_dict, "fc.weight": torch.zeros(1000, 2048)})
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    load_inception_with_logits(str(tmp_path / "absent.pth"))
