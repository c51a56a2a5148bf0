"""Rehearsals of the experiment configs: their documented commands, run on tiny real-format files.

A rehearsal takes the `python -m lfm_jax.main ...` commands written in a config file's docstring,
substitutes the placeholders ($WORKDIR, $MANUAL_DIR, $SD_VAE, $INCEPTION, ...) with paths of
tiny files made here, appends overrides of sizes, steps and counts only (`Rehearsal.shrink`), and
runs each command in-process through the same flag parsing as the command line
(`ml_collections.config_flags`) and `lfm_jax.stages.run`. What the files are:

- manual files in the real formats of the data sets (tests/manual_data.py), few images each;
- a tiny random KL autoencoder exported in the diffusers layout (`tiny_autoencoder`), passed
  where a config expects Stable Diffusion's;
- a random-weight FID InceptionV3 state dict in pytorch-fid's key layout (`tiny_inception`),
  built from torch-fidelity's module (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
from typing import Callable, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
COMMAND = "python -m lfm_jax.main"


# --------------------------------------------------------------------------- documented commands


def documented_commands(config_file: str) -> list[str]:
  """The `python -m lfm_jax.main ...` commands of a config's docstring (continuations joined)."""
  import ast  # pylint: disable=g-import-not-at-top
  with open(os.path.join(CONFIG_DIR, config_file)) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  commands, current = [], None
  for line in doc.splitlines():
    text = line.strip()
    if current is not None:
      current += " " + text.rstrip("\\").strip()
      if not text.endswith("\\"):
        commands.append(current)
        current = None
      continue
    if text.startswith(COMMAND):
      if text.endswith("\\"):
        current = text.rstrip("\\").strip()
      else:
        commands.append(text)
  return commands


def command_arguments(command: str, paths: dict[str, str]) -> list[str]:
  """argv (without the program) of a documented command, $NAME placeholders replaced."""
  def sub(match):
    name = match.group(1)
    if name not in paths:
      raise KeyError(f"documented command uses ${name}, which the rehearsal does not provide")
    return paths[name]
  args = shlex.split(re.sub(r"\$([A-Z_][A-Z0-9_]*)", sub, command))
  assert args[:3] == ["python", "-m", "lfm_jax.main"], args
  return args[3:]


def parse_command(argv: list[str]):
  """(config, workdir) of a command line, parsed as lfm_jax.main parses it (fresh flag values)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  argv = ["lfm_jax.main"] + list(argv)
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.DEFINE_string("mode", None, "", flag_values=fv)
  cwd = os.getcwd()
  os.chdir(REPO)  # documented commands name configs/... relative to the repository
  try:
    fv(argv)
  finally:
    os.chdir(cwd)
  config = fv.config
  if fv.mode:
    with config.unlocked():
      config.mode = fv.mode
  return config, fv.workdir


def override_flags(overrides: dict) -> list[str]:
  """--config.<key>=<value> flags (tuples as comma lists, as the command line takes them)."""
  out = []
  for key, value in overrides.items():
    if isinstance(value, (tuple, list)):
      value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    out.append(f"--config.{key}={value}")
  return out


# --------------------------------------------------------------------------- tiny weights


def random_params(module, x_shape, seed: int = 0, **inputs):
  """Random float32 params of a Flax module from its shapes alone (no init compile): kernels
  N(0, 1 / fan_in), norm scales 1, biases and the rest N(0, 0.02)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros(x_shape, jnp.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, **inputs))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      fan_in = int(np.prod(s.shape[:-1])) or 1
      return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
    if "scale" in name:
      return np.ones(s.shape, np.float32)
    return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_autoencoder(out_dir: str, *, block_out_channels=(8, 8), latent_channels: int = 4,
                     norm_num_groups: int = 8, layers_per_block: int = 1, seed: int = 0) -> str:
  """A random KL autoencoder (f = 2 ** (levels - 1)) exported in the diffusers layout."""
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  from lfm_jax.models.autoencoder import AutoencoderKL  # pylint: disable=g-import-not-at-top
  module = AutoencoderKL(block_out_channels=tuple(block_out_channels),
                         layers_per_block=layers_per_block, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups, mid_block_attention=True)
  return weights.export_autoencoder_kl(module, random_params(module, (1, 8, 8, 3), seed), out_dir,
                                       scaling_factor=0.18215)


def tiny_inception(path: str, seed: int = 0) -> str:
  """A random-weight FID InceptionV3 (pool3 and the 1008-way fc) saved as a torch state dict in
  pytorch-fid's layout, from torch-fidelity's module; BatchNorm statistics calibrated on one
  random batch so the features stay O(1)."""
  import torch  # pylint: disable=g-import-not-at-top
  from helpers import random_fidelity_inception  # pylint: disable=g-import-not-at-top
  model, _ = random_fidelity_inception(("2048",), seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  torch.save(model.state_dict(), path)
  return path


# --------------------------------------------------------------------------- manual files


def write_manual_files(kind: str, manual_dir: str) -> str:
  """Tiny manual files of one data set, in its real format, in manual_dir; returns manual_dir."""
  import manual_data  # pylint: disable=g-import-not-at-top
  if kind == "celeb_a_hq/256":
    manual_data.write_celeb_a_hq_tar(manual_dir, 256, 80)
  elif kind == "celeb_a_hq/512":
    manual_data.write_celeb_a_hq_tar(manual_dir, 512, 80)
  elif kind == "ffhq":
    manual_data.write_ffhq_tree(manual_dir, 80, size=1024)
  elif kind.startswith("lfm_lsun/"):
    category = kind.split("/")[1]
    manual_data.write_lsun_lmdb(manual_dir, category, "train", 40)
    manual_data.write_lsun_lmdb(manual_dir, category, "validation", 8, first=1000)
  elif kind == "imagenet2012":
    manual_data.write_imagenet(manual_dir, synset_indices=(0, 1, 999), per_synset=6, num_val=8)
  elif kind == "celebamask_hq":
    manual_data.write_celebamask_hq(manual_dir, indices=tuple(range(24)) + tuple(
        range(27000, 27008)))
  else:
    raise ValueError(f"no manual files for {kind!r}")
  return manual_dir


def write_user_files(directory: str, size: int) -> dict[str, str]:
  """The files a user gives `sample` for conditional tasks, at size x size: $IMAGE (an RGB PNG),
  $MASK (a PNG, white = known, a centre hole), $MAP (a single-channel PNG of class ids)."""
  import manual_data  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  paths = {k: os.path.join(directory, f"{k.lower()}_{size}.png") for k in ("IMAGE", "MASK", "MAP")}
  Image.fromarray(manual_data.picture(5, size)).save(paths["IMAGE"])
  mask = np.full((size, size), 255, np.uint8)
  mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 0
  Image.fromarray(mask).save(paths["MASK"])
  Image.fromarray(manual_data.celebamask_labels(size=size)).save(paths["MAP"])
  return paths


# --------------------------------------------------------------------------- rehearsal table


@dataclasses.dataclass(frozen=True)
class Rehearsal:
  """How one config file is rehearsed.

  data: the manual files it reads (a write_manual_files kind; None: the embedded data set).
  shrink: overrides of sizes, steps and counts, applied to every documented command (after it).
  per_command: more overrides for the commands whose --config argument ends with the key
    (e.g. ":light"), for parameterised configs.
  covered_by: the test file that rehearses the config instead (its command is run there).
  image_size: the shrunk data.image_size (the size of the user files made for it).
  """
  data: Optional[str]
  shrink: dict
  per_command: dict = dataclasses.field(default_factory=dict)
  covered_by: Optional[str] = None
  image_size: int = 16


# Sizes, steps and counts: a 2x-downsampling random autoencoder (16x16 images -> 8x8x4 latents),
# two-level one-block U-Nets and one-block DiTs (compile time is what a rehearsal spends), 2
# optimizer steps, 4 samples; solver, splits, crops, flips and metrics stay the configs' own.
COMMON = {
    "data.image_size": 16, "latents.groups": 2,
    "autoencoder.block_out_channels": (8, 8), "autoencoder.norm_num_groups": 8,
    "autoencoder.layers_per_block": 1,
    "train.batch_size": 8, "train.num_steps": 2, "train.log_every": 1,
    "train.checkpoint_every": 2, "train.sample_every": 0,
    "sample.num_samples": 4, "sample.batch_size": 4,
    "eval.num_samples": 4, "eval.batch_size": 4, "eval.inception_score_splits": 2,
}
UNET = {"model.model_channels": 16, "model.num_res_blocks": 1, "model.channel_mult": (1, 2)}
EDM_UNET = {**UNET, "model.num_head_channels": 8}  # 64 channels per head at width 16: 8
DIT = {"model.hidden_size": 48, "model.depth": 1}  # 48 = 6, 12 and 16 heads of 8, 4 and 3

REHEARSALS = {
    # The embedded default's command (README: pipeline mode, no files) is rehearsed
    # by tests/test_main.py's pipeline_run, shrunk by tests/helpers.py's TINY.
    "default.py": Rehearsal(None, {}, covered_by="tests/test_main.py", image_size=8),
    "celeba_hq_256_adm.py": Rehearsal("celeb_a_hq/256", {**COMMON, **UNET}),
    "celeba_hq_256_dit_l2.py": Rehearsal("celeb_a_hq/256", {**COMMON, **DIT}),
    "celeba_hq_256_inpainting_adm.py": Rehearsal("celeb_a_hq/256", {**COMMON, **UNET}),
    "celeba_hq_512_adm.py": Rehearsal("celeb_a_hq/512", {**COMMON, **UNET}),
    "celebamask_hq_semantic_adm.py": Rehearsal("celebamask_hq", {**COMMON, **UNET}),
    "coarse_to_fine_dit_s2_xl2.py": Rehearsal("celeb_a_hq/256", {**COMMON, **DIT}),
    "ffhq_256_adm.py": Rehearsal("ffhq", {**COMMON, **EDM_UNET}),
    "ffhq_256_dit_l2.py": Rehearsal("ffhq", {**COMMON, **DIT}),
    "imagenet_256_adm.py": Rehearsal("imagenet2012", {**COMMON, **EDM_UNET}),
    "imagenet_256_dit_b2.py": Rehearsal("imagenet2012", {**COMMON, **DIT}),
    "lsun_bedroom_256_adm.py": Rehearsal("lfm_lsun/bedroom", {**COMMON, **EDM_UNET}),
    "lsun_bedroom_256_dit_l2.py": Rehearsal("lfm_lsun/bedroom", {**COMMON, **DIT}),
    "lsun_church_256_adm.py": Rehearsal("lfm_lsun/church_outdoor", {**COMMON, **UNET}),
    "lsun_church_256_dit_l2.py": Rehearsal("lfm_lsun/church_outdoor", {**COMMON, **DIT}),
    # 16 training images (a count), 4 clusters: the cluster score embeds every training image.
    "stability_prune.py": Rehearsal("celeb_a_hq/256", {
        **COMMON, **DIT, "data.max_train_examples": 16, "score.num_clusters": 4,
        "latents.groups": 1}),
}


def run_rehearsal(config_file: str, rehearsal: Rehearsal, paths: dict[str, str],
                  log: Callable[[str], None] = print,
                  seconds: Optional[list] = None) -> list[dict]:
  """Runs every documented command of `config_file` (shrunk); returns their results (and
  appends each command's wall time to `seconds`)."""
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  commands = documented_commands(config_file)
  if not commands:
    raise AssertionError(f"configs/{config_file} documents no `{COMMAND}` command")
  results = []
  for command in commands:
    argv = command_arguments(command, paths)
    extra = dict(rehearsal.shrink)
    config_arg = next(a for a in argv if a.startswith("--config="))
    for suffix, more in rehearsal.per_command.items():
      if config_arg.endswith(suffix):
        extra.update(more)
    config, workdir = parse_command(argv + override_flags(extra))
    t0 = time.time()
    results.append(stages.run(config, workdir))
    if seconds is not None:
      seconds.append(time.time() - t0)
    log(f"rehearsal {config_file}: {config_arg[9:]} {config.mode} in {time.time() - t0:.1f} s")
  return results


# --------------------------------------------------------------------------- worker


def shared_inputs(root: str, kinds) -> dict[str, str]:
  """Files every rehearsal reads (made once): the tiny autoencoder, the Inception weights, the
  manual files of each data set kind, the user files of each image size."""
  paths = {"SD_VAE": os.path.join(root, "sd_vae"),
           "INCEPTION": os.path.join(root, "pt_inception-random.pth")}
  if not os.path.exists(os.path.join(paths["SD_VAE"], "config.json")):
    tiny_autoencoder(paths["SD_VAE"])
  if not os.path.exists(paths["INCEPTION"]):
    tiny_inception(paths["INCEPTION"])
  for kind in kinds:
    folder = os.path.join(root, "manual", kind.replace("/", "_"))
    if not os.path.isdir(folder):
      write_manual_files(kind, folder + ".tmp")
      os.rename(folder + ".tmp", folder)
  for size in sorted({r.image_size for r in REHEARSALS.values()}):
    write_user_files(os.path.join(root, "user"), size)
  return paths


def case_paths(root: str, config_file: str, rehearsal: Rehearsal, worker: str) -> dict[str, str]:
  """The $NAME values of one rehearsal's commands."""
  work = os.path.join(root, "work", config_file[:-3])
  paths = {"SD_VAE": os.path.join(root, "sd_vae"),
           "INCEPTION": os.path.join(root, "pt_inception-random.pth"),
           "WORKDIR": work, "HEAVY": work + "_heavy", "LIGHT": work + "_light",
           "SCORER": work + "_scorer", "TFDS": os.path.join(root, f"tfds_{worker}")}
  if rehearsal.data:
    paths["MANUAL_DIR"] = os.path.join(root, "manual", rehearsal.data.replace("/", "_"))
  user = os.path.join(root, "user")
  paths.update({k: os.path.join(user, f"{k.lower()}_{rehearsal.image_size}.png")
                for k in ("IMAGE", "MASK", "MAP")})
  return paths


def _cpu_seconds() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def worker_main(argv) -> int:
  """`python tests/rehearsal.py ROOT WORKER CONFIG...`: rehearses the configs one after another
  in this process (one CPU device, as lfm_jax.main gives a DiT), writing
  ROOT/results/<config>.json: {"results": [...], "seconds": [...], "error": str or None}."""
  import json  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  root, worker, configs = argv[0], argv[1], argv[2:]
  os.makedirs(os.path.join(root, "results"), exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  # Networks that shrink to the same program (DiT-L/2 and XL/2, the EDM U-Nets) compile once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # Threefry's partitionable form triples the compile time of a network's init on CPU (13.9 s
  # vs 4.2 s for the rehearsals' U-Net); the other draws the same distributions.
  jax.config.update("jax_threefry_partitionable", False)
  # One Inception per worker: the extractor is a function of its weights file alone, and
  # building it (reading 92 MB, converting, tracing) is a third of a tiny evaluation.
  from lfm_jax.metrics import features  # pylint: disable=g-import-not-at-top
  built = {}

  def shared_inception(**kw):
    key = kw.get("weights_path") or kw.get("inception_weights")
    if key not in built:
      built[key] = features._inception_factory(**kw)  # pylint: disable=protected-access
    return built[key]

  features.register_feature_extractor("inception", shared_inception, overwrite=True)
  for config_file in configs:
    rehearsal = REHEARSALS[config_file]
    paths = case_paths(root, config_file, rehearsal, worker)
    shrink = dict(rehearsal.shrink, **{"data.data_dir": paths["TFDS"]})
    rehearsal = dataclasses.replace(rehearsal, shrink=shrink)
    seconds, out = [], {"results": [], "error": None, "paths": paths}
    t0, cpu0 = time.time(), _cpu_seconds()
    try:
      out["results"] = run_rehearsal(config_file, rehearsal, paths,
                                     log=lambda m: print(m, flush=True), seconds=seconds)
    except BaseException as e:  # pylint: disable=broad-except  (reported to the test)
      out["error"] = "".join(traceback.format_exception(e))
      print(out["error"], flush=True)
    out["seconds"], out["total_seconds"] = seconds, time.time() - t0
    out["cpu_seconds"] = _cpu_seconds() - cpu0
    with open(os.path.join(root, "results", config_file[:-3] + ".json"), "w") as f:
      json.dump(out, f, default=str, indent=1)
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  flags_now = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  # One device (8 simulated ones, as tests/conftest.py makes, compile 2-3x slower). LLVM at -O0:
  # the rehearsals are compile-bound (tiny steps), so its faster compiles outweigh its slower
  # kernels; the numbers checked are plumbing, not parity.
  extra = ["--xla_force_host_platform_device_count=1"]
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags_now):
    extra.append("--xla_backend_optimization_level=0")
  os.environ["XLA_FLAGS"] = " ".join(flags_now + extra)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.exit(worker_main(sys.argv[1:]))
