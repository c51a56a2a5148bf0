"""Mesh and sharding helpers on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lfm_jax import parallel


def test_create_mesh():
  mesh = parallel.create_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 8
  assert parallel.create_mesh(2).devices.size == 2
  with pytest.raises(ValueError, match="num_devices=9"):
    parallel.create_mesh(9)


def test_host_local_to_global_shards_the_batch():
  mesh = parallel.create_mesh()
  batch = {"latent": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32)}
  out = parallel.host_local_to_global(batch, mesh)
  assert out["latent"].shape == (16, 3) and out["latent"].sharding.spec == P("data")
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
  assert "params" in text and "replicated" in text and "data=8" in text
  assert "20" in text  # 16 + 4 elements
  assert "batch: PartitionSpec('data',)" in text


def test_distributed_only_when_the_platform_asks():
  assert not parallel._wants_distributed({})  # pylint: disable=protected-access
  assert not parallel._wants_distributed({"TPU_WORKER_HOSTNAMES": "localhost"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"TPU_WORKER_HOSTNAMES": "h0,h1"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"JAX_COORDINATOR_ADDRESS": "h0:1234"})  # pylint: disable=protected-access
  assert parallel._wants_distributed({"SLURM_NTASKS": "4"})  # pylint: disable=protected-access
  assert not parallel._wants_distributed({"SLURM_NTASKS": "4", "LFM_JAX_DISTRIBUTED": "0"})  # pylint: disable=protected-access
  assert parallel.maybe_initialize_distributed({}) is False
