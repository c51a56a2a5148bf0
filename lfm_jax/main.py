"""lfm_jax command line: `python -m lfm_jax.main --config=configs/default.py --workdir=DIR`.

Flags -> one function per mode (lfm_jax/stages.py); no logic of its own. Every config value can be
overridden: `--config.train.num_steps=500`. `--mode` overrides config.mode.
"""

import os
import sys

if __name__ == "__main__":
  from lfm_jax import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.exec_with_huge_pages()  # first thing: glibc reads its tunables at process start

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _split_cpu_into_devices(model_name: str = "unet"):
  """On CPU, one host device per core (up to 8) for convolutional models; one for DiT.

  XLA:CPU keeps a U-Net's many small convolutions and normalisations on few threads: a
  data-parallel mesh over one device per core uses the cores better (the embedded default's
  train step: -20% on 2 cores; BENCH-U: even). A DiT is dot-bound and XLA threads its dots well,
  while splitting it across host devices triples its CPU time (BENCH-D on 2 cores: 3.6 s vs
  10.7 s per step), so DiT runs on one device. Accelerators are unaffected (their devices are
  used, not the host's). $LFM_JAX_CPU_DEVICES chooses; XLA_FLAGS with a device count wins.
  Must run before jax is imported (main() calls it after flag parsing, before any jax import).
  """
  flags_now = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags_now or "jax" in sys.modules:
    return
  default = 1 if model_name == "dit" else min(os.cpu_count() or 1, 8)
  count = int(os.environ.get("LFM_JAX_CPU_DEVICES", default))
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={count}".strip()


from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lfm_jax.modes import MODES  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (ml_collections, get_config()).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory (local path or gs://).")
flags.DEFINE_enum("mode", None, list(MODES), "What to run; default: config.mode.")
flags.mark_flags_as_required(["config", "workdir"])


# Libraries whose INFO records would drown the progress lines (warnings still show).
_QUIET_PATHS = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/jax/_src/")


class _QuietLibraries(logging.logging.Filter):

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or not any(
        p in record.pathname for p in _QUIET_PATHS)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  _split_cpu_into_devices(str(config.model.name))
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  if FLAGS.mode:
    with config.unlocked():
      config.mode = FLAGS.mode
  try:
    stages.run(config, FLAGS.workdir)
  except stages.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing with one-line errors for bad config overrides."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key the config does not have.
    name = str(e).strip("\"' ")
    keys = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--config.")]
    bad = [k for k in keys if k.split(".")[-1] == name or f".{name}." in k + "."] or keys
    _fail(f"unknown config key {bad[0] if bad else name!r}: not in the config "
          "(every key is declared in configs/default.py)")


def run():
  """Console-script entry point (`lfm-jax`)."""
  from lfm_jax import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.exec_with_huge_pages()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
