"""Checkpointer: round trip against an abstract target, keep policy, strict errors, preemption flag."""

import os
import signal

import jax
import jax.numpy as jnp
import optax
import pytest

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import parallel
from helpers import tree_max_abs_diff
from lfm_jax.train import TrainState


def _state(width=4, seed=0):
  params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(seed), (3, width)),
                      "bias": jnp.zeros((width,))}}
  tx = optax.adamw(1e-3)
  return TrainState(step=jnp.array(7, jnp.int32), params=params,
                    ema_params=jax.tree.map(lambda p: p + 1.0, params),
                    opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = fh.read()
  return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ckpt"))
  state = jax.device_put(_state(), parallel.replicated(parallel.create_mesh()))
  meta = {"config": {"model": {"width": 4}}, "fingerprint": "x"}
  with ckpt_lib.Checkpointer(directory, max_to_keep=2) as ck:
    ck.save(7, state, input_state={"batch": 7, "seed": 0}, metadata=meta)
  return directory, jax.device_get(state), meta


def test_round_trip_against_abstract_target(saved):
  directory, state, meta = saved
  ck = ckpt_lib.Checkpointer(directory)
  assert ck.latest_step() == 7
  abstract = ckpt_lib.abstract_like(jax.device_put(_state(seed=1),
                                                   parallel.replicated(parallel.create_mesh())))
  restored, input_state, got_meta = ck.restore(abstract, expected_meta=meta)
  ck.close()
  assert input_state == {"batch": 7, "seed": 0}
  assert got_meta["step"] == 7 and got_meta["fingerprint"] == "x"
  assert type(restored.opt_state[0]).__name__ == "ScaleByAdamState"  # not a list
  assert tree_max_abs_diff(restored, state) == 0.0
  assert restored.params["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec()


def test_mismatched_shape_names_checkpoint_and_leaf(saved, tmp_path):
  directory, _, _ = saved
  before = _snapshot(directory)
  ck = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    ck.restore(ckpt_lib.abstract_like(_state(width=6)),
               expected_meta={"config": {"model": {"width": 6}}})
  ck.close()
  msg = str(err.value)
  assert os.path.join(directory, "7") in msg and "(step 7)" in msg
  assert "params/dense/kernel: checkpoint shape (3, 4) != model shape (3, 6)" in msg
  assert msg.index("params/dense") < msg.index("ema_params/dense")
  assert "model.width: checkpoint 4, now 6" in msg
  assert _snapshot(directory) == before


def test_truncated_file_names_checkpoint_and_is_untouched(saved, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "copy")
  shutil.copytree(saved[0], directory)
  # The merged OCDBT data files (state/d/); ocdbt.process_0/ holds pre-merge leftovers never read.
  data_dir = os.path.join(directory, "7", "state", "d")
  victim = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  before = _snapshot(directory)
  ck = ckpt_lib.Checkpointer(directory)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    ck.restore(ckpt_lib.abstract_like(_state()))
  ck.close()
  assert os.path.join(directory, "7") in str(err.value) and "step 7" in str(err.value)
  assert _snapshot(directory) == before


def test_keep_last_n_and_every_k(tmp_path):
  state = _state()
  with ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, keep_period=3) as ck:
    for step in range(1, 8):
      ck.save(step, state.replace(step=jnp.array(step, jnp.int32)))
    steps = sorted(ck.all_steps())
  assert steps == [3, 6, 7], steps


def test_preemption_guard_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with ckpt_lib.PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop(2)
    assert guard.signal_received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) == previous


def test_config_fingerprint_is_stable():
  a, plain = ckpt_lib.config_fingerprint({"b": 1, "a": (1, 2)})
  b, _ = ckpt_lib.config_fingerprint({"a": [1, 2], "b": 1})
  assert a == b and plain == {"a": [1, 2], "b": 1}
