"""Generation from fixed seeds: the same images for any batch size, device count and solver
batching; the noise of sample i depends on (seed, i) only; a failed adaptive solve is an error;
the Python API returns what --mode=sample wrote; exports load back and convert to PyTorch."""

import os

import numpy as np
import pytest

import lfm_jax
from lfm_jax import artifacts
from lfm_jax import generate
from lfm_jax import parallel
from lfm_jax import weights


@pytest.fixture(scope="module")
def trained(reference_run):
  wd = reference_run["workdir"]
  return wd, artifacts.load_flow_model(wd), artifacts.load_autoencoder(
      lfm_jax.load(wd).config, wd)


def _images(model, ae, num, *, devices, batch_size, solver="euler", num_steps=8, seed=5,
            **settings):
  s = generate.SamplerSettings(solver=solver, num_steps=num_steps, guidance_scale=1.5,
                               rtol=1e-3, atol=1e-3, **settings)
  if generate.sampling.is_adaptive(solver):
    s = generate.SamplerSettings(**{**s.__dict__, "num_steps": None})
  return generate.generate(model, ae, num, settings=s, seed=seed, batch_size=batch_size,
                           mesh=parallel.create_mesh(devices))


def test_noise_depends_on_seed_and_index_only():
  idx = np.arange(10, 26, dtype=np.int32)
  batch = np.asarray(generate.noise_for(3, idx, (4, 4, 4)))
  for i in (0, 7, 15):
    alone = np.asarray(generate.noise_for(3, idx[i:i + 1], (4, 4, 4)))[0]
    np.testing.assert_array_equal(alone, batch[i])
  assert not np.allclose(batch, np.asarray(generate.noise_for(4, idx, (4, 4, 4))))


def test_same_images_for_any_batch_size_and_device_count(trained):
  _, model, ae = trained
  ref = _images(model, ae, 20, devices=8, batch_size=24)
  assert ref.images.shape == (20, 8, 8, 1) and ref.nfe == 8
  worst = 0.0
  for devices in (1, 2, 8):
    for batch_size in (3, 8, 20):
      out = _images(model, ae, 20, devices=devices, batch_size=batch_size)
      diff = float(np.max(np.abs(out.images - ref.images)))
      worst = max(worst, diff)
      assert diff <= 1e-5, (devices, batch_size, diff)
      np.testing.assert_array_equal(out.labels, ref.labels)
  print(f"Euler-8 images over devices (1, 2, 8) x batch sizes (3, 8, 20): max |diff| {worst:.3g}")
  # A later slice of the same sample set is the same images (start_index).
  part = generate.generate(model, ae, 6, settings=generate.SamplerSettings(
      solver="euler", num_steps=8, guidance_scale=1.5), seed=5, batch_size=4, start_index=10,
      labels=ref.labels[10:16], mesh=parallel.create_mesh(2))
  np.testing.assert_allclose(part.images, ref.images[10:16], atol=1e-5)


def test_adaptive_solves_are_per_sample(trained):
  _, model, ae = trained
  a = _images(model, ae, 12, devices=8, batch_size=16, solver="dopri5")
  b = _images(model, ae, 12, devices=2, batch_size=4, solver="dopri5")
  c = _images(model, ae, 1, devices=1, batch_size=1, solver="dopri5")
  print(f"dopri5 per-sample NFE mean {a.nfe:.1f}; batch 16 vs 4: "
        f"{float(np.max(np.abs(a.images - b.images))):.3g}")
  np.testing.assert_allclose(a.images, b.images, atol=1e-5)
  np.testing.assert_allclose(c.images[0], a.images[0], atol=1e-5)  # alone == in a batch


def test_solver_that_runs_out_of_steps_is_an_error(trained):
  _, model, ae = trained
  with pytest.raises(generate.SolverError,
                     match=r"sample\.solver=dopri5 \(rtol=1e-09, atol=1e-09, sample\.max_steps=3\)"):
    generate.generate(model, ae, 4, settings=generate.SamplerSettings(
        solver="dopri5", num_steps=None, rtol=1e-9, atol=1e-9, max_steps=3, guidance_scale=1.5),
        seed=0, batch_size=8)


def test_python_api_matches_sample_mode_and_export(reference_run, tmp_path):
  wd = reference_run["workdir"]
  with np.load(os.path.join(wd, "samples", "samples_euler_g1.5.npz")) as z:
    written = z["images"]
  run = lfm_jax.load(wd)
  images = run.sample(20, seed=run.config.seed)
  assert images.dtype == np.float32 and images.shape == written.shape
  assert images.min() >= -1 and images.max() <= 1
  np.testing.assert_allclose(images, written, atol=1e-5)
  exported = lfm_jax.load(os.path.join(wd, "export"))
  np.testing.assert_allclose(exported.sample(20, seed=run.config.seed), written, atol=1e-5)
  # Labels and a solver chosen per call; encode/decode round trip.
  threes = run.sample(4, labels=[3, 3, 3, 3], solver="heun", num_steps=4, seed=1)
  assert threes.shape == (4, 8, 8, 1)
  z = run.encode(written[:4])
  assert z.shape == (4, 4, 4, 4)
  back = run.decode(z)
  assert float(np.mean(np.abs(back - written[:4]))) < 0.5
  # The PyTorch-layout exporter takes the export directory.
  path = str(tmp_path / "velocity.safetensors")
  weights.export_pytorch(os.path.join(wd, "export"), path)
  module, params = weights.load_velocity_checkpoint(path, run.config.model)
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
  t, y = np.array([0.3, 0.8], np.float32), np.array([1, 2], np.int32)
  np.testing.assert_allclose(
      np.asarray(module.apply({"params": params}, x, t, y)),
      np.asarray(run.model.module.apply({"params": run.model.params}, x, t, y)), atol=1e-5)
