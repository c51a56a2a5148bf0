"""Tests for lfm_jax/metrics/stability.py."""

import numpy as np
import pytest
from PIL import Image

from lfm_jax.metrics import stability


def _structured_images(n=12, size=16, channels=1, seed=0):
  """Distinct structured images in [-1, 1]: oriented gratings with random phase and frequency."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  out = []
  for _ in range(n):
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(0.15, 0.6)
    phase = rng.uniform(0, 2 * np.pi)
    img = np.cos(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    out.append(np.repeat(img[..., None], channels, axis=-1))
  return np.clip(np.stack(out), -1, 1).astype(np.float32)


def test_identical_pairs():
  a = _structured_images()
  lat = np.random.default_rng(1).normal(size=(12, 4, 4, 4)).astype(np.float32)
  m = stability.pair_metrics(a, a.copy(), latents_a=lat, latents_b=lat.copy())
  assert m["cosine"] == pytest.approx(1.0, abs=1e-6)
  assert m["psnr"] == np.inf
  assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert m["mse"] == 0.0 and m["latent_mse"] == 0.0


def test_known_psnr_and_embed_fn():
  a = np.zeros((3, 16, 16, 3), np.float32)
  b = a + 0.2  # MSE 0.04 over a range of 2 -> 10 log10(4 / 0.04) = 20 dB
  m = stability.pair_metrics(a + 0.5, b + 0.5)
  assert m["psnr"] == pytest.approx(20.0, abs=1e-4)
  assert m["mse"] == pytest.approx(0.04, rel=1e-5)
  # A pluggable embedding: mean colour per channel (+1 so it is never zero).
  m = stability.pair_metrics(a, b, embed_fn=lambda x: np.asarray(x).mean(axis=(1, 2)) + 1.0)
  assert m["cosine"] == pytest.approx(1.0, abs=1e-6)
  assert "latent_mse" not in m


def test_report_same_seed_beats_shuffled():
  a = _structured_images(n=16, channels=3)
  rng = np.random.default_rng(2)
  b = np.clip(a + 0.05 * rng.normal(size=a.shape), -1, 1).astype(np.float32)
  la = rng.normal(size=(16, 4, 4, 4)).astype(np.float32)
  lb = la + 0.01 * rng.normal(size=la.shape).astype(np.float32)
  r = stability.stability_report(a, b, latents_a=la, latents_b=lb, seed=3, batch_size=5)
  assert r["num_pairs"] == 16
  for k in ("cosine", "psnr", "ssim", "mse", "latent_mse"):
    assert f"same_seed/{k}" in r and f"shuffled/{k}" in r
  assert r["same_seed/cosine"] > 0.98
  assert r["same_seed/cosine"] > r["shuffled/cosine"] + 0.5
  assert r["same_seed/ssim"] > r["shuffled/ssim"] + 0.5
  assert r["same_seed/psnr"] > r["shuffled/psnr"] + 10
  assert r["same_seed/latent_mse"] < 0.01 * r["shuffled/latent_mse"]
  assert r["gap/cosine"] == pytest.approx(r["same_seed/cosine"] - r["shuffled/cosine"])
  # Seeded: the same report twice.
  assert stability.stability_report(a, b, latents_a=la, latents_b=lb, seed=3) == pytest.approx(r)


def test_derangement():
  for n in (2, 3, 10, 101):
    p = stability.derangement(n, seed=n)
    assert sorted(p.tolist()) == list(range(n))
    assert np.all(p != np.arange(n))
  np.testing.assert_array_equal(stability.derangement(10, 1), stability.derangement(10, 1))
  with pytest.raises(ValueError):
    stability.derangement(1)


def test_small_images_ssim_window_and_shape_errors():
  a = _structured_images(n=4, size=8)
  m = stability.pair_metrics(a, a)
  assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
  with pytest.raises(ValueError):
    stability.pair_metrics(a, a[:3])


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_pairs_png(tmp_path, channels, mode):
  a = _structured_images(n=6, size=16, channels=channels)
  b = -a
  path = tmp_path / "pairs.png"
  hw = stability.save_pairs_png(path, a, b, n=5, pad=2)
  with Image.open(path) as img:
    assert img.size == (5 * 16 + 4 * 2, 2 * 16 + 2)  # (width, height)
    assert img.mode == mode
    arr = np.asarray(img)
  assert hw == (34, 88)
  # Pixel check: top-left of the first pair is a[0], below it b[0].
  expect_a = np.round((a[0, 0, 0, 0] + 1) * 127.5)
  expect_b = np.round((b[0, 0, 0, 0] + 1) * 127.5)
  top = arr[0, 0] if arr.ndim == 2 else arr[0, 0, 0]
  bottom = arr[18, 0] if arr.ndim == 2 else arr[18, 0, 0]
  assert abs(int(top) - expect_a) <= 1 and abs(int(bottom) - expect_b) <= 1
  # No padding: exactly n*W by 2*H.
  stability.save_pairs_png(path, a, b, n=6, pad=0)
  with Image.open(path) as img:
    assert img.size == (96, 32)
