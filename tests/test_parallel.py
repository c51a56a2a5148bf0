"""Mesh and sharding helpers on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lfm_jax import parallel


def test_create_mesh():
  mesh = parallel.create_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.size == jax.device_count() == 8
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  assert dict(parallel.create_mesh(fsdp=4).shape) == {"data": 2, "fsdp": 4}
  assert parallel.create_mesh(2).devices.size == 2
  with pytest.raises(ValueError, match="num_devices=9"):
    parallel.create_mesh(9)
  with pytest.raises(ValueError, match=r"config\.mesh\.fsdp"):
    parallel.create_mesh(fsdp=3)


def test_fsdp_rule():
  """The largest dimension divisible by the fsdp size is split; small leaves stay whole."""
  assert parallel.fsdp_spec((3, 3, 64, 128), 4) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((1152, 4608), 8) == P(None, "fsdp")
  assert parallel.fsdp_spec((4608, 1152), 8) == P("fsdp", None)
  assert parallel.fsdp_spec((1000, 33), 8) == P("fsdp", None)
  assert parallel.fsdp_spec((1001, 33), 8) == P()  # no dimension divisible by 8
  assert parallel.fsdp_spec((128,), 8) == P()  # small: replicated
  assert parallel.fsdp_spec((4096, 4096), 1) == P()
  mesh = parallel.create_mesh(fsdp=8)
  sharded = parallel.shard_state({"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}, mesh)
  assert sharded["w"].sharding.spec == P("fsdp", None)
  assert sharded["w"].addressable_shards[0].data.shape == (32, 128)
  assert sharded["b"].sharding.spec == P()


def test_host_local_to_global_shards_the_batch():
  mesh = parallel.create_mesh()
  batch = {"latent": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32)}
  out = parallel.host_local_to_global(batch, mesh)
  assert out["latent"].shape == (16, 3) and out["latent"].sharding.spec == P(("data", "fsdp"))
  assert len(out["latent"].addressable_shards) == 8
  assert out["latent"].addressable_shards[1].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  with pytest.raises(ValueError, match="'label'"):
    parallel.host_local_to_global({"label": np.zeros(12)}, mesh)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.local_batch_size(12, mesh)


def test_shard_state_and_table():
  mesh = parallel.create_mesh()
  state = {"params": {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}, "step": jnp.array(0)}
  sharded = parallel.shard_state(state, mesh)
  assert sharded["params"]["w"].sharding.spec == P()
  lines = []
  text = parallel.print_shardings(sharded, print_fn=lines.append,
                                  batch_sharding=parallel.data_sharded(mesh))
  assert lines == [text]
  assert "params" in text and "replicated" in text and "data=8 x fsdp=1" in text
  assert "20" in text  # 16 + 4 elements
  assert "batch: PartitionSpec(('data', 'fsdp'),)" in text


def test_distributed_only_when_the_platform_asks():
  assert not parallel._wants_distributed({})  # pylint: disable=protected-access
  assert not parallel._wants_distributed({"TPU_WORKER_HOSTNAMES": "localhost"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"TPU_WORKER_HOSTNAMES": "h0,h1"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"JAX_COORDINATOR_ADDRESS": "h0:1234"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"SLURM_NTASKS": "4"})  # pylint: disable=protected-access
  assert not parallel._wants_distributed({"SLURM_NTASKS": "4", "LFM_JAX_DISTRIBUTED": "0"})  # pylint: disable=protected-access
  assert parallel.maybe_initialize_distributed({}) is False


def test_shard_mean_is_the_batch_mean_with_a_key_per_shard():
  mesh = parallel.create_mesh()
  n = mesh.devices.size
  w = jnp.arange(6.0).reshape(3, 2) / 10
  x = jax.random.normal(jax.random.key(1), (4 * n, 3))

  def fn(params, rng, batch):
    loss = lambda p: jnp.mean(jnp.tanh(batch @ p) ** 2)
    value, grad = jax.value_and_grad(loss)(params)
    return value, grad, jax.random.uniform(rng, ())

  x_sharded = jax.device_put(x, parallel.data_sharded(mesh))
  value, grad, draw = jax.jit(parallel.shard_mean(fn, mesh))(w, jax.random.key(0), x_sharded)
  v_ref, g_ref = jax.value_and_grad(lambda p: jnp.mean(jnp.tanh(x @ p) ** 2))(w)
  np.testing.assert_allclose(value, v_ref, rtol=1e-6)
  np.testing.assert_allclose(grad, g_ref, rtol=1e-5, atol=1e-7)
  per_shard = [jax.random.uniform(jax.random.fold_in(jax.random.key(0), i), ()) for i in range(n)]
  assert n > 1 and len(set(np.asarray(per_shard).tolist())) == n
  np.testing.assert_allclose(draw, np.mean(per_shard), rtol=1e-6)
