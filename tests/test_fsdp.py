"""FSDP on 8 simulated devices: the same training under every mesh shape, checkpoints that move
between meshes and device counts, sampling under FSDP, and the FSDP rule itself."""

import jax
import numpy as np
import pytest

from helpers import default_config, tree_max_abs_diff
from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import generate
from lfm_jax import models
from lfm_jax import optim
from lfm_jax import parallel
from lfm_jax import train

LATENT_SHAPE = (8, 8, 4)


def _config():
  c = default_config()
  c.model.model_channels = 32  # conv kernels of 18k+ elements: sharded by the rule
  c.model.channel_mult = (1, 2)
  c.model.norm_num_groups = 8
  c.model.mid_attention = True
  c.train.batch_size = 16
  # At 1e-3 this random U-Net amplifies summation-order rounding past 1e-5 within 5 steps
  # even between two data-parallel meshes (8 vs 2 devices, no FSDP): ~1e-4 on one kernel.
  c.train.learning_rate = 1e-4
  c.autoencoder.scale_factor = 1.0
  return c


def _train(config, mesh, steps=5):
  model = models.create_model(config.model, LATENT_SHAPE)
  tx, schedule = optim.create_optimizer(config.train)
  state = train.create_train_state(jax.random.PRNGKey(0), model, config, LATENT_SHAPE, tx=tx,
                                   mesh=mesh)
  step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh),
                              mesh, state)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = {"latent": rng.normal(size=(16,) + LATENT_SHAPE).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    state, metrics = step(state, parallel.host_local_to_global(batch, mesh))
  assert bool(metrics["finite"])
  return model, state


@pytest.fixture(scope="module")
def runs():
  config = _config()
  out = {}
  for fsdp in (1, 4, 8):
    out[fsdp] = _train(config, parallel.create_mesh(fsdp=fsdp))
  return config, out


def test_every_mesh_shape_trains_the_same(runs):
  _, out = runs
  sharded = [leaf for leaf in jax.tree.leaves(out[8][1].params)
             if leaf.sharding.spec != jax.sharding.PartitionSpec()]
  assert sharded, "nothing was sharded under fsdp 8"
  assert sharded[0].addressable_shards[0].data.size * 8 == sharded[0].size
  opt_sharded = [leaf for leaf in jax.tree.leaves(out[4][1].opt_state)
                 if hasattr(leaf, "sharding") and leaf.sharding.spec != jax.sharding.PartitionSpec()]
  assert opt_sharded  # Adam moments follow the params
  for fsdp in (4, 8):
    for field in ("params", "ema_params"):
      diff = tree_max_abs_diff(parallel.to_host(getattr(out[1][1], field)),
                               parallel.to_host(getattr(out[fsdp][1], field)))
      print(f"5 steps, {field}: replicated vs fsdp {fsdp} (data {8 // fsdp}): max |diff| {diff:.3g}")
      assert diff <= 1e-5


def test_checkpoint_moves_between_meshes_and_device_counts(runs, tmp_path):
  config, out = runs
  model, state = out[8]
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(5, state)
  ck.wait()
  tx, _ = optim.create_optimizer(config.train)
  for mesh in (parallel.create_mesh(fsdp=2), parallel.create_mesh(2), parallel.create_mesh(1)):
    abstract = train.abstract_train_state(jax.random.PRNGKey(0), model, config, LATENT_SHAPE, tx,
                                          mesh)
    restored, _, _ = ck.restore(abstract, 5)
    assert tree_max_abs_diff(parallel.to_host(restored.params),
                             parallel.to_host(state.params)) == 0.0
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.devices.size == mesh.devices.size
  ck.close()


def test_sampling_under_fsdp(runs):
  config, out = runs
  model, state = out[4]
  from lfm_jax import artifacts  # pylint: disable=g-import-not-at-top
  flow_model = artifacts.FlowModel(model, state.ema_params, LATENT_SHAPE, 1.0, config.model, "t")
  settings = generate.SamplerSettings(solver="euler", num_steps=4, guidance_scale=2.0)
  images = {}
  for fsdp in (1, 4):
    images[fsdp] = generate.generate(flow_model, None, 16, settings=settings, seed=0,
                                     batch_size=16, mesh=parallel.create_mesh(fsdp=fsdp)).latents
  np.testing.assert_allclose(images[1], images[4], atol=1e-5)


def test_fsdp_that_does_not_divide_the_devices_is_named(tmp_path):
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  with pytest.raises(stages.UserError, match=r"config\.mesh\.fsdp: 3 does not divide the 8"):
    stages.run(tiny_config(tmp_path, **{"mesh.fsdp": 3}), str(tmp_path / "w"))


def test_deterministic_reduction_is_the_same_on_every_mesh_shape():
  """mesh.deterministic_reduction (per-shard gradients summed in shard order), with gradient
  accumulation: replicated and fsdp 4 x data 2 give the same params (the noise follows the 8
  shards, the sum's order is fixed, the optimizer is elementwise), and it trains as the
  all-reduce path does (the same loss scale, different noise)."""
  config = _config()
  config.mesh.deterministic_reduction = True
  config.train.grad_accum_steps = 2
  _, a = _train(config, parallel.create_mesh(fsdp=1), steps=3)
  _, b = _train(config, parallel.create_mesh(fsdp=4), steps=3)
  for field in ("params", "ema_params"):
    diff = tree_max_abs_diff(parallel.to_host(getattr(a, field)), parallel.to_host(getattr(b, field)))
    print(f"deterministic reduction, 3 steps, {field}: replicated vs fsdp 4: {diff:.3g}")
    assert diff <= 1e-6
  config.mesh.deterministic_reduction = False
  _, c = _train(config, parallel.create_mesh(fsdp=1), steps=3)
  moved = tree_max_abs_diff(parallel.to_host(a.params), parallel.to_host(c.params))
  assert 0 < moved < 1e-2  # another draw of the noise, the same optimizer steps' size
