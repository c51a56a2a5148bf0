"""Shared test setup: 8 simulated CPU devices (set before jax is imported)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA cache for the session, inherited by the CLI and multi-process children:
# the tiny pipelines compile the same programs again in every process and stage.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lfm_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import contextlib  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# The GCS emulator is one per session (TensorStore reads its endpoint once per process).
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  pylint: disable=unused-import

jax.config.update("jax_default_matmul_precision", "highest")

# The tiny pipeline every multi-stage test starts from: 1 process x 8 devices, the modes below.
REFERENCE_MODES = ("train", "pipeline", "score", "stability")
# The reference run trains with gradients averaged in shard order, so a 2-process x 4-device run
# of the same config (tests/test_multihost.py) differs from it only by the rounding of XLA:CPU's
# per-device kernels (their loop partitioning follows the local device count). Its autoencoder
# has no one-channel GroupNorm groups: the bias before such a norm has no gradient, and Adam
# turns any rounding difference there into steps of the learning rate. Adam scales every
# gradient to about the learning rate, so the flow model's trains at 1e-4 (1e-3 moves its
# params 10x as far per step and with them the rounding).
REFERENCE_OVERRIDES = {"mesh.deterministic_reduction": True, "autoencoder.norm_num_groups": 4,
                       "train.learning_rate": 1e-4}


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test, skipped unless --runslow")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: pass --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A tfds data dir with lfm_digits prepared (shared by the whole session, so concurrent child
  processes never prepare it at once)."""
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from lfm_jax import data  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  data.prepare(tiny_config(path).data)
  return path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, digits_data_dir):
  """The tiny pipeline (helpers.tiny_config) run in this process on 8 devices:
  `train` on a fresh workdir (it trains the autoencoder and encodes first), then `pipeline`
  (sample, evaluate, export), `score` and `stability` against itself. Read-only for tests: copy
  it (`copy_reference`) before changing it. Returns dict(workdir, results, seconds, train_output).
  """
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("reference"))
  results = {}
  t0 = time.time()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results["train"] = stages.run(
        tiny_config(digits_data_dir, mode="train", **REFERENCE_OVERRIDES), workdir)
  train_output = out.getvalue()
  print(train_output)
  for mode in REFERENCE_MODES[1:]:
    results[mode] = stages.run(tiny_config(digits_data_dir, mode=mode, **REFERENCE_OVERRIDES,
                                           **{"stability.other_workdir": workdir}), workdir)
  return {"workdir": workdir, "results": results, "seconds": time.time() - t0,
          "train_output": train_output}


@pytest.fixture
def copy_reference(reference_run, tmp_path):
  """A private copy of the reference workdir (tests that train on or resample it)."""
  target = str(tmp_path / "reference_copy")
  shutil.copytree(reference_run["workdir"], target)
  return target
