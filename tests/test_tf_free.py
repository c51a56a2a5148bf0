"""The core runs without TensorFlow, tensorflow-datasets and clu: in a subprocess where importing
them fails, the flow step trains, the sampler samples, the converters import, the Python API and
a benchmark run."""

import subprocess
import sys

from helpers import REPO

BLOCK = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
  sys.modules[name] = None  # `import tensorflow` now raises ImportError
"""

CORE = BLOCK + """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
from lfm_jax import flow, sampling, models, train, optim, parallel, generate, artifacts, trainer
from lfm_jax import weights, checkpoint, latents, writers, api
from lfm_jax.converters import autoencoder_kl, velocity, inception
from configs import default
config = default.get_config()
config.model.model_channels = 8
config.model.norm_num_groups = 4
config.model.mid_attention = False
config.train.batch_size = 4
model = models.create_model(config.model, (4, 4, 4))
tx, schedule = optim.create_optimizer(config.train)
mesh = parallel.create_mesh()
state = train.create_train_state(jax.random.PRNGKey(0), model, config, (4, 4, 4), tx=tx, mesh=mesh)
step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh), mesh,
                            state)
batch = {"latent": np.zeros((4, 4, 4, 4), np.float32), "label": np.zeros(4, np.int32)}
state, metrics = step(state, parallel.host_local_to_global(batch, mesh))
fm = artifacts.FlowModel(model, state.ema_params, (4, 4, 4), 1.0, config.model, "test")
out = generate.generate(fm, None, 4, settings=generate.SamplerSettings(num_steps=2), seed=0,
                        batch_size=4, mesh=mesh)
w = writers.create_metric_writer(os.environ["OUT"])
w.write_scalars(1, {"loss": float(metrics["loss"])})
w.close()
loaded = [m for m in ("tensorflow", "tensorflow_datasets", "clu") if sys.modules.get(m) is not None]
print("OK", float(metrics["loss"]), out.latents.shape, loaded)
"""


def test_core_runs_without_tensorflow(tmp_path):
  r = subprocess.run([sys.executable, "-c", CORE], capture_output=True, text=True, cwd=REPO,
                     timeout=600, env={**__import__("os").environ, "OUT": str(tmp_path)})
  assert r.returncode == 0, r.stderr[-4000:]
  assert "OK" in r.stdout and "(4, 4, 4, 4) []" in r.stdout, r.stdout
  assert (tmp_path / "metrics.jsonl").exists()  # TensorBoard is left out, metrics.jsonl is not
  assert "TensorBoard events are not written" in r.stderr


def test_benchmark_runs_without_tensorflow():
  script = BLOCK + (f"sys.argv = ['train_step.py', '--quick']\n"
                    f"sys.path.insert(0, {REPO + '/benchmarks'!r})\n"
                    f"import runpy\nrunpy.run_path({REPO + '/benchmarks/train_step.py'!r}, "
                    "run_name='__main__')\n")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  assert '"bench"' in r.stdout or '"name"' in r.stdout, r.stdout[-2000:]
