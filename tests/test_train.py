"""Flow trainer: mesh equivalence, exact resume (incl. a real SIGTERM), NaN stop, logs, shardings.

A tiny conv velocity net (same call signature as the U-Net) on 8x8x4 latents keeps this fast.
`python tests/test_train.py <workdir> [sleep]` is the runnable entry the SIGTERM test starts.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LATENT_SHAPE = (8, 8, 4)
NUM_STEPS = 8
HALF = 4


class TinyVelocityNet(nn.Module):
  """(x, t, y=None, cond=None, train=False) -> v, like lfm_jax.models.UNet, but two convs."""
  features: int = 8
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, t, y=None, cond=None, train=False):
    if cond is not None:
      x_in = jnp.concatenate([x, cond], axis=-1)
    else:
      x_in = x
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    h = nn.Conv(self.features, (3, 3), dtype=x.dtype, name="conv_in")(x_in)
    h = h + nn.Dense(self.features, dtype=x.dtype, name="time")(t[:, None])[:, None, None, :]
    if y is not None:
      h = h + nn.Embed(self.num_classes + 1, self.features, name="label")(y)[:, None, None, :].astype(h.dtype)
    h = nn.silu(h)
    return nn.Conv(x.shape[-1], (3, 3), dtype=x.dtype, name="conv_out")(h)


def tiny_config():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.seed = 3
  config.model.model_channels = 8
  config.model.num_classes = 10
  config.train.batch_size = 16
  config.train.num_steps = NUM_STEPS
  config.train.learning_rate = 3e-3
  config.train.schedule = "cosine"
  config.train.warmup_steps = 2
  config.train.end_learning_rate = 1e-4
  config.train.grad_clip_norm = 1.0
  config.train.weight_decay = 1e-4
  config.train.ema_decay = 0.9
  config.train.ema_warmup = True
  config.train.log_every = 1
  config.train.checkpoint_every = HALF
  config.train.keep_checkpoints = 3
  config.train.sample_every = HALF
  config.autoencoder.scale_factor = 1.0
  return config


def model_for(config):
  return TinyVelocityNet(features=int(config.model.model_channels),
                         num_classes=int(config.model.num_classes))


def make_latents(n=64, seed=0):
  rng = np.random.default_rng(seed)
  return {"latent": rng.normal(size=(n,) + LATENT_SHAPE).astype(np.float32) * 0.5 + 0.3,
          "label": rng.integers(0, 10, size=(n,)).astype(np.int32)}


class SlowIterator:
  """Delegates to an iterator (state/restore included), sleeping before every batch."""

  def __init__(self, it, sleep):
    self._it, self._sleep = it, sleep

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(self._sleep)
    return next(self._it)

  def state(self):
    return self._it.state()

  def restore(self, state):
    self._it.restore(state)


def sample_fn(ema_params, step):
  del step
  leaf = np.asarray(jax.tree.leaves(ema_params)[0]).ravel()
  return np.tanh(np.resize(leaf, (4, 8, 8, 1)))


def array_data(latents, config):
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.ArrayIterator(latents, batch_size=int(config.train.batch_size),
                                      seed=int(config.seed))


def _run(workdir, data=None, **kw):
  from lfm_jax import train  # pylint: disable=g-import-not-at-top
  config = kw.pop("config", None) or tiny_config()
  latents = kw.pop("latents", None)
  if data is None:
    data = array_data(latents, config)
  return train.train_and_evaluate(config, workdir, data, model=model_for(config), **kw)


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _losses(workdir):
  from lfm_jax import writers  # pylint: disable=g-import-not-at-top
  out = {}
  for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


def _max_diff(a, b):
  from helpers import tree_max_abs_diff  # pylint: disable=g-import-not-at-top
  return tree_max_abs_diff(_host(a), _host(b))


if __name__ == "__main__":
  # Runnable entry for the SIGTERM test: python tests/test_train.py <workdir> <sleep per batch>.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  jax.config.update("jax_default_matmul_precision", "highest")
  from lfm_jax import train as _train  # pylint: disable=g-import-not-at-top
  _workdir, _sleep = sys.argv[1], float(sys.argv[2])
  _config = tiny_config()
  _train.train_and_evaluate(_config, _workdir, SlowIterator(array_data(make_latents(), _config),
                                                            _sleep),
                            model=model_for(_config), sample_fn=sample_fn)
  print("EXITED CLEANLY", flush=True)
  sys.exit(0)


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from lfm_jax import checkpoint as ckpt_lib  # noqa: E402
from lfm_jax import parallel  # noqa: E402
from lfm_jax import optim  # noqa: E402
from lfm_jax import train  # noqa: E402
from lfm_jax import trainer  # noqa: E402
from lfm_jax import writers  # noqa: E402
from helpers import tree_max_abs_diff, ynn_fused  # noqa: E402


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run of NUM_STEPS steps (reference for resume, logs, shardings)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  import contextlib, io  # pylint: disable=g-import-not-at-top,multiple-imports
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    state = _run(workdir, latents=make_latents(), sample_fn=sample_fn)
  return {"workdir": workdir, "state": _host(state), "printed": out.getvalue().splitlines()}


def test_mesh_equivalence_8_vs_1_device():
  config = tiny_config()
  config.train.grad_clip_norm = 0.0
  model = model_for(config)
  tx, schedule = optim.create_optimizer(config.train)
  data = make_latents(n=80)
  finals = []
  for n in (8, 1):
    mesh = parallel.create_mesh(n)
    state = train.create_train_state(jax.random.PRNGKey(0), model, config, LATENT_SHAPE, tx=tx,
                                     mesh=mesh)
    step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh), mesh)
    for i in range(5):
      batch = {k: v[16 * i:16 * (i + 1)] for k, v in data.items()}
      state, metrics = step(state, parallel.host_local_to_global(batch, mesh))
    assert bool(metrics["finite"])
    assert state.params["conv_in"]["kernel"].sharding.mesh.devices.size == n
    finals.append(_host(state))
  diff = tree_max_abs_diff(finals[0].params, finals[1].params)
  print(f"mesh 8 vs 1 device, 5 steps: max |params diff| = {diff:.3g}")
  assert diff < 1e-5, diff
  assert tree_max_abs_diff(finals[0].ema_params, finals[1].ema_params) < 1e-5


def test_grad_accumulation_and_bf16_run():
  config = tiny_config()
  config.train.grad_accum_steps = 2
  config.train.compute_dtype = "bfloat16"
  model = model_for(config)
  tx, schedule = optim.create_optimizer(config.train)
  mesh = parallel.create_mesh()
  state = train.create_train_state(jax.random.PRNGKey(0), model, config, LATENT_SHAPE, tx=tx,
                                   mesh=mesh)
  step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh), mesh)
  batch = parallel.host_local_to_global({k: v[:16] for k, v in make_latents().items()}, mesh)
  state, metrics = step(state, batch)
  assert bool(metrics["finite"]) and float(metrics["loss"]) > 0
  assert state.params["conv_in"]["kernel"].dtype == jnp.float32
  assert int(state.step) == 1


def test_posterior_batch_samples_fresh_latents():
  rng = jax.random.PRNGKey(1)
  mean = jnp.ones((4, 2, 2, 1))
  logvar = jnp.full((4, 2, 2, 1), -2.0)
  z = train.batch_latents({"mean": mean, "logvar": logvar}, rng, scale_factor=0.5)
  assert z.shape == mean.shape
  assert not np.allclose(np.asarray(z), 0.5)
  z_mean = train.batch_latents({"mean": mean, "logvar": logvar}, rng, 0.5, sample_posterior=False)
  np.testing.assert_allclose(np.asarray(z_mean), 0.5)


def test_shardings_table_printed_at_startup(straight):
  text = "\n".join(straight["printed"])
  assert "train state shardings" in text
  for field in ("params", "ema_params", "opt_state", "step", "rng"):
    assert field in text
  assert "replicated" in text and "data=8 x fsdp=1" in text
  assert "PartitionSpec(('data', 'fsdp'),)" in text  # the batch line
  # One progress line per log interval, with steps/s and ETA (and nothing else per interval).
  lines = [l for l in straight["printed"] if "train: step" in l]
  assert len(lines) == NUM_STEPS and all("steps/s, ETA" in l for l in lines), lines


def test_logs_and_sample_grid(straight):
  workdir = straight["workdir"]
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = set().union(*[r.keys() for r in records])
  for k in ("loss", "learning_rate", "grad_norm", "steps_per_sec"):
    assert k in keys, keys
  steps = sorted(r["step"] for r in records if "loss" in r)
  assert steps == list(range(1, NUM_STEPS + 1))
  events = glob.glob(os.path.join(workdir, "events.out.tfevents*"))
  assert events
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in events:
    for ev in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in ev.summary.value)
  for k in ("loss", "learning_rate", "grad_norm", "steps_per_sec"):
    assert k in tags, tags
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{HALF:08d}.png"))
  assert os.path.exists(os.path.join(workdir, "samples", f"step_{NUM_STEPS:08d}.png"))
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert list(ck.all_steps()) == [HALF, NUM_STEPS]
  ck.close()


def test_exact_resume_in_process(straight, tmp_path):
  workdir = str(tmp_path / "resumed")
  first = _run(workdir, latents=make_latents(), sample_fn=sample_fn, stop_after=HALF)
  assert int(first.step) == HALF
  final = _host(_run(workdir, latents=make_latents(), sample_fn=sample_fn))
  ref = straight["state"]
  assert int(final.step) == NUM_STEPS
  print("resume in process: max diffs params/ema/opt =", _max_diff(final.params, ref.params),
        _max_diff(final.ema_params, ref.ema_params), _max_diff(final.opt_state, ref.opt_state))
  assert _max_diff(final.params, ref.params) < 1e-6
  assert _max_diff(final.ema_params, ref.ema_params) < 1e-6
  assert _max_diff(final.opt_state, ref.opt_state) < 1e-6
  a, b = _losses(straight["workdir"]), _losses(workdir)
  for s in range(HALF + 1, NUM_STEPS + 1):
    assert a[s] == pytest.approx(b[s], abs=1e-6), (s, a[s], b[s])


def test_exact_resume_after_real_sigterm(straight, tmp_path):
  workdir = str(tmp_path / "sigterm")
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), workdir, "0.5"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      if proc.poll() is not None:
        break
      if os.path.exists(metrics_path) and any(
          r.get("step", 0) >= 2 and "loss" in r for r in writers.read_jsonl(metrics_path)):
        break
      time.sleep(0.1)
    assert proc.poll() is None, "training finished before SIGTERM:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out
  assert "EXITED CLEANLY" in out
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  stopped = ck.latest_step()
  ck.close()
  assert stopped is not None and 2 <= stopped < NUM_STEPS, stopped
  final = _host(_run(workdir, latents=make_latents(), sample_fn=sample_fn))
  ref = straight["state"]
  print(f"SIGTERM at step {stopped}: max diffs params/ema/opt =", _max_diff(final.params, ref.params),
        _max_diff(final.ema_params, ref.ema_params), _max_diff(final.opt_state, ref.opt_state))
  assert _max_diff(final.params, ref.params) < 1e-6
  assert _max_diff(final.ema_params, ref.ema_params) < 1e-6
  assert _max_diff(final.opt_state, ref.opt_state) < 1e-6
  a, b = _losses(straight["workdir"]), _losses(workdir)
  for s in range(stopped + 1, NUM_STEPS + 1):
    assert a[s] == pytest.approx(b[s], abs=1e-6), (s, a[s], b[s])


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, directory)] = fh.read()
  return out


def test_mismatched_width_fails_naming_checkpoint_and_shapes(straight, tmp_path):
  workdir = str(tmp_path / "wide")
  shutil.copytree(os.path.join(straight["workdir"], "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  before = _snapshot(workdir)
  config = tiny_config()
  config.model.model_channels = 16
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    _run(workdir, config=config, latents=make_latents())
  msg = str(err.value)
  assert os.path.join(workdir, "checkpoints", str(NUM_STEPS)) in msg and f"step {NUM_STEPS}" in msg
  assert "params/conv_in/kernel" in msg and "(3, 3, 4, 8)" in msg and "(3, 3, 4, 16)" in msg
  assert "model.model_channels: checkpoint 8, now 16" in msg
  assert _snapshot(workdir) == before


def test_truncated_checkpoint_fails_and_is_untouched(straight, tmp_path):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(os.path.join(straight["workdir"], "checkpoints"),
                  os.path.join(workdir, "checkpoints"))
  step_dir = os.path.join(workdir, "checkpoints", str(NUM_STEPS))
  # The merged OCDBT data files (state/d/); ocdbt.process_0/ holds pre-merge leftovers never read.
  data_files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  victim = max(data_files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  before = _snapshot(workdir)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    _run(workdir, latents=make_latents())
  msg = str(err.value)
  assert step_dir in msg and f"step {NUM_STEPS}" in msg
  assert _snapshot(workdir) == before


class NaNAt:
  """Wraps an iterator; the batch of (1-based) step `at` gets a NaN latent."""

  def __init__(self, it, at):
    self._it, self._at, self._n = it, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    step = self._it.state()["batch"] + 1  # the step this batch feeds (peeks do not count)
    batch = dict(next(self._it))
    if step == self._at:
      batch["latent"] = batch["latent"].copy()
      batch["latent"][0, 0, 0, 0] = np.nan
    return batch

  def state(self):
    return self._it.state()

  def restore(self, state):
    self._it.restore(state)


def test_nan_in_data_stops_with_step(tmp_path):
  workdir = str(tmp_path / "nan")
  config = tiny_config()
  config.train.checkpoint_every = 2
  config.train.log_every = 2
  it = NaNAt(array_data(make_latents(), config), at=3)
  with pytest.raises(trainer.NonFiniteError, match=r"training step 3\b") as err:
    _run(workdir, it, config=config)
  assert err.value.step == 3
  assert "step 2" in str(err.value)  # the last good checkpoint is named
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert list(ck.all_steps()) == [2]
  ck.close()


def test_default_model_is_the_unet(tmp_path):
  """model=None builds lfm_jax.models.create_model(config.model): a 2-level U-Net, width 16."""
  config = tiny_config()
  config.model.model_channels = 16
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = ()
  config.model.norm_num_groups = 8
  config.model.mid_attention = False
  config.train.num_steps = 2
  config.train.checkpoint_every = 0
  state = train.train_and_evaluate(config, str(tmp_path), array_data(make_latents(), config))
  assert int(state.step) == 2
  assert any("loss" in r for r in writers.read_jsonl(str(tmp_path / "metrics.jsonl")))


def test_train_compiler_options_keep_the_numbers():
  """On CPU the train step is compiled with parallel.train_compiler_options() (convolutions off
  YNNPACK); the step computes the same numbers as with XLA's default options."""
  opts = parallel.train_compiler_options()
  assert opts and "xla_cpu_experimental_ynn_fusion_type" in opts  # the tests run on CPU
  config = tiny_config()
  model = model_for(config)
  tx, schedule = optim.create_optimizer(config.train)
  mesh = parallel.create_mesh(2)
  raw = train.make_train_step(model, config, tx, schedule, mesh=mesh)
  batch = parallel.host_local_to_global({k: v[:16] for k, v in make_latents(16).items()}, mesh)
  finals = []
  for options in (opts, None):
    state = train.create_train_state(jax.random.PRNGKey(0), model, config, LATENT_SHAPE, tx=tx,
                                     mesh=mesh)
    step = jax.jit(raw, donate_argnames="state", compiler_options=options)
    for _ in range(3):
      state, _ = step(state, batch)
    finals.append(_host(state).params)
  assert tree_max_abs_diff(finals[0], finals[1]) < 1e-5
  # What the options change: a 64-channel conv's gradients leave YNNPACK (XLA's own are faster).
  conv_grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2), argnums=(0, 1)))
  lowered = conv_grad.lower(jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64)))
  default = ynn_fused(lowered.compile().as_text(), "convolution")
  if not any("size=16x16" in line for line in default):
    pytest.skip("this jaxlib does not run weight-gradient convolutions on YNNPACK")
  tuned = ynn_fused(lowered.compile(compiler_options=opts).as_text(), "convolution")
  assert len(tuned) < len(default)
  assert not any("size=16x16" in line for line in tuned)  # the weight gradient
