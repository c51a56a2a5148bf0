"""Autoencoder trainer: a tiny KL autoencoder learns 16x16 digits on CPU (PSNR before/after)."""

import os

import jax
import numpy as np
import pytest

from lfm_jax import autoencoder_train
from lfm_jax import writers
from helpers import tree_max_abs_diff


def _digits_16():
  datasets = pytest.importorskip("sklearn.datasets")
  digits = datasets.load_digits()
  x = digits.images.astype(np.float32)[..., None] / 16.0  # (N, 8, 8, 1) in [0, 1]
  x = np.asarray(jax.image.resize(x, (x.shape[0], 16, 16, 1), "bilinear"))
  return x * 2.0 - 1.0


def _config():
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.channels = 1
  ae = config.autoencoder
  ae.block_out_channels = (8, 16)
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 4
  ae.attention = False
  ae.train.num_steps = 100
  ae.train.batch_size = 32
  ae.train.learning_rate = 3e-3
  ae.train.log_every = 50
  ae.train.checkpoint_every = 100
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  images = _digits_16()
  train_images, eval_images = images[:1500], images[1500:1700]
  workdir = str(tmp_path_factory.mktemp("ae"))
  printed = []
  module, params = autoencoder_train.train_autoencoder(
      _config(), workdir, train_images, eval_images=eval_images, print_fn=printed.append)
  return dict(workdir=workdir, module=module, params=params, eval_images=eval_images,
              printed=printed)


def test_reconstruction_improves(trained):
  line = [l for l in trained["printed"] if l.startswith("autoencoder: held-out PSNR")][0]
  before = float(line.split("PSNR ")[1].split(" dB")[0])
  after = autoencoder_train.evaluate_psnr(trained["module"], trained["params"],
                                          trained["eval_images"])
  print(f"PSNR before {before:.2f} dB, after {after:.2f} dB")
  assert after > before + 6.0, (before, after)
  assert after > 17.0, after
  records = writers.read_jsonl(os.path.join(trained["workdir"], "autoencoder", "metrics.jsonl"))
  recon = [r["recon_loss"] for r in records if "recon_loss" in r]
  assert recon[-1] < recon[0]
  assert [r["eval_psnr"] for r in records if "eval_psnr" in r][-1] == pytest.approx(after, abs=1e-3)


def test_checkpoint_resumes_to_the_same_params(trained):
  # A second call finds the finished run's checkpoint and returns its params without training.
  module, params = autoencoder_train.train_autoencoder(
      _config(), trained["workdir"], _digits_16()[:1500], eval_images=trained["eval_images"],
      export=False, print_fn=lambda s: None)
  assert tree_max_abs_diff(params, trained["params"]) == 0.0


def test_exported_weights_load_like_pretrained(trained):
  pytest.importorskip("safetensors")
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  export_dir = os.path.join(trained["workdir"], "autoencoder", "diffusers")
  if not os.path.isdir(export_dir):
    pytest.skip("autoencoder export (lfm_jax.weights.export_autoencoder_kl) not available")
  module, params = weights.load_autoencoder_kl(export_dir)
  x = trained["eval_images"][:16]
  a = autoencoder_train.reconstruct(trained["module"], trained["params"], x)
  b = autoencoder_train.reconstruct(module, params, x)
  np.testing.assert_allclose(a, b, atol=1e-4)
