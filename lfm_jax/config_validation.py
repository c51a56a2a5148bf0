"""Validation of a resolved config, before anything is compiled.

`validate_config(config)` raises `ConfigError` whose message names the bad key
(`config.train.batch_size: ...`). Unknown keys and wrong types given on the command line are
already rejected by ml_collections when the override is parsed; this checks values and the
relations between them.
"""

import functools
import json
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from lfm_jax.modes import MODES

FEATURE_EXTRACTORS = ("digits_classifier", "autoencoder", "inception")


class ConfigError(ValueError):
  """A config value is invalid; the message names the key."""


@functools.lru_cache(maxsize=None)
def _schema_section(name: str) -> str:
  from configs import default  # pylint: disable=g-import-not-at-top  (the schema)
  return default.get_config()[name].to_json()


def with_defaults(name: str, section: Any = None) -> ml_collections.ConfigDict:
  """`section` (a ConfigDict, a plain dict such as a checkpoint's saved config, or None) laid
  over configs/default.py's section `name`: every key the schema defines is present, so the
  modules read keys directly. Keys the schema lacks are kept as given."""
  base = json.loads(_schema_section(name))
  if section is not None:
    given = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)

    def merge(into, new):
      for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
          merge(into[k], v)
        else:
          into[k] = v
    merge(base, given)
  return config_from_dict(base)


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """A ConfigDict from a JSON dict (JSON lists become tuples, as configs write them)."""
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
  return ml_collections.ConfigDict(tuples(d))


def _get(config: ml_collections.ConfigDict, path: str, default: Any = None) -> Any:
  node = config
  for part in path.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return node


def _require(config, path: str, ok: Callable[[Any], bool], what: str, optional: bool = False):
  value = _get(config, path, _MISSING)
  if value is _MISSING:
    if optional:
      return
    raise ConfigError(f"config.{path}: missing (every config derives from configs/default.py)")
  if optional and value is None:
    return
  try:
    good = ok(value)
  except (TypeError, ValueError):
    good = False
  if not good:
    raise ConfigError(f"config.{path}: {what}, got {value!r}")


class _Missing:
  pass


_MISSING = _Missing()


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _nonneg_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _one_of(choices: Iterable[str]) -> Callable[[Any], bool]:
  choices = tuple(choices)
  return lambda v: v in choices


def _fraction(lo_open=False, hi_open=False):
  def ok(v):
    v = float(v)
    return (0.0 < v if lo_open else 0.0 <= v) and (v < 1.0 if hi_open else v <= 1.0)
  return ok


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every value a stage reads; raises ConfigError naming the first bad key."""
  from lfm_jax import optim, precision, sampling, scoring  # pylint: disable=g-import-not-at-top
  from lfm_jax.metrics import evaluate  # pylint: disable=g-import-not-at-top
  SOLVERS, SUBSET_RULES, SCORE_CRITERIA = sampling.SOLVERS, scoring.RULES, scoring.CRITERIA  # pylint: disable=invalid-name
  r = lambda path, ok, what, optional=False: _require(config, path, ok, what, optional)
  r("mesh.fsdp", _positive_int, "must be a positive integer dividing the device count")
  r("latents.groups", _positive_int, "must be a positive integer")
  r("latents.encode_batch_size", _positive_int, "must be a positive integer")
  r("latents.dtype", _one_of(("float32", "float16")), "must be float32 or float16")
  r("train.optimizer", _one_of(optim.OPTIMIZERS), f"must be one of {', '.join(optim.OPTIMIZERS)}")
  r("train.b1", _fraction(hi_open=True), "must lie in [0, 1)")
  r("train.b2", _fraction(hi_open=True), "must lie in [0, 1)")
  r("train.eps", lambda v: float(v) > 0, "must be positive")
  r("sample.max_steps", _positive_int, "must be a positive integer")
  r("sample.guidance_interval", lambda v: len(v) == 2 and 0 <= float(v[0]) < float(v[1]) <= 1,
    "must be (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1, or None", optional=True)
  r("eval.metrics", lambda v: len(v) > 0 and all(m in evaluate.available_metrics() for m in v),
    f"must list metrics from {', '.join(evaluate.available_metrics())}")
  r("eval.inception_score_splits", _positive_int, "must be a positive integer")
  r("score.gradient_chunk_size", _positive_int, "must be a positive integer")
  for key in ("train.compute_dtype", "sample.compute_dtype", "autoencoder.compute_dtype",
              "eval.compute_dtype"):
    if _get(config, key) not in precision.DTYPES:
      raise ConfigError(f"config.{key}: must be one of {', '.join(precision.DTYPES)}, got "
                        f"{_get(config, key)!r}")
  r("mode", _one_of(MODES), f"must be one of {', '.join(MODES)}")
  r("seed", lambda v: isinstance(v, int), "must be an integer")

  # Data.
  r("data.name", lambda v: isinstance(v, str) and v, "must name a data set")
  r("data.image_size", _positive_int, "must be a positive integer")
  r("data.channels", _one_of((1, 3)), "must be 1 or 3")
  r("data.crop", _one_of(("none", "center", "adm")), "must be none, center or adm")
  r("data.num_classes", _nonneg_int, "must be an integer >= 0")
  r("data.max_train_examples", _positive_int, "must be a positive integer or None", optional=True)
  if _get(config, "data.name") == "image_folder":
    r("data.image_folder", lambda v: isinstance(v, str) and v,
      "must be the folder's path when data.name == 'image_folder'")
  r("data.subset.rule", _one_of(SUBSET_RULES), f"must be one of {', '.join(SUBSET_RULES)}")
  r("data.subset.ratio", _fraction(hi_open=True), "is the fraction removed: in [0, 1)")

  # Autoencoder.
  r("autoencoder.block_out_channels", lambda v: len(v) >= 1 and all(_positive_int(c) for c in v),
    "must be a non-empty tuple of positive integers")
  r("autoencoder.latent_channels", _positive_int, "must be a positive integer")
  r("autoencoder.layers_per_block", _positive_int, "must be a positive integer")
  r("autoencoder.norm_num_groups", _positive_int, "must be a positive integer")
  groups = _get(config, "autoencoder.norm_num_groups")
  for c in _get(config, "autoencoder.block_out_channels", ()):
    if c % groups:
      raise ConfigError(f"config.autoencoder.block_out_channels: {c} is not divisible by "
                        f"config.autoencoder.norm_num_groups={groups}")
  down = 2 ** (len(_get(config, "autoencoder.block_out_channels", (1,))) - 1)
  if _get(config, "data.image_size") % down:
    raise ConfigError(f"config.data.image_size: {_get(config, 'data.image_size')} is not divisible "
                      f"by the autoencoder's downsampling factor {down}")
  r("autoencoder.scale_factor", lambda v: float(v) > 0, "must be positive or None", optional=True)
  r("autoencoder.train.num_steps", _nonneg_int, "must be an integer >= 0")
  r("autoencoder.train.batch_size", _positive_int, "must be a positive integer")
  r("autoencoder.train.learning_rate", lambda v: float(v) > 0, "must be positive")
  r("autoencoder.train.recon_loss", _one_of(("l1", "l2")), "must be l1 or l2")
  r("autoencoder.train.kl_weight", lambda v: float(v) >= 0, "must be >= 0")

  # Velocity network.
  r("model.name", _one_of(("unet", "dit")), "must be unet or dit")
  r("model.num_classes", _nonneg_int, "must be an integer >= 0")
  if _get(config, "model.name") == "unet":
    r("model.model_channels", _positive_int, "must be a positive integer")
    r("model.channel_mult", lambda v: len(v) >= 1 and all(_positive_int(c) for c in v),
      "must be a non-empty tuple of positive integers")
    r("model.num_res_blocks", _positive_int, "must be a positive integer")
    r("model.attention_semantics", _one_of(("resolution", "downsample")),
      "must be 'resolution' (EDM) or 'downsample' (guided-diffusion)")
    r("model.dropout", _fraction(hi_open=True), "must lie in [0, 1)")
    r("model.norm_min_channels_per_group", _nonneg_int,
      "must be an integer >= 0 (0: always norm_num_groups; EDM DhariwalUNet: 4)", optional=True)
  else:
    preset = _get(config, "model.dit_preset")
    if preset is not None:
      from lfm_jax.models import dit  # pylint: disable=g-import-not-at-top
      presets = getattr(dit, "DIT_PRESETS", {})
      if presets and preset not in presets:
        raise ConfigError(f"config.model.dit_preset: unknown preset {preset!r}; "
                          f"choose one of {', '.join(presets)}")
  r("model.extra_in_channels", _nonneg_int, "must be an integer >= 0")
  _validate_task(config)
  r("model.time_convention", _one_of(("lfm", "sit")), "must be lfm or sit", optional=True)
  from lfm_jax.models import layers  # pylint: disable=g-import-not-at-top
  r("model.remat", _one_of(layers.REMAT_CHOICES),
    f"must be one of {', '.join(layers.REMAT_CHOICES)}", optional=True)
  r("model.attention_implementation", _one_of(layers.ATTENTION_IMPLEMENTATIONS),
    "must be None, xla or cudnn", optional=True)
  if _get(config, "model.num_classes", 0) and _get(config, "data.num_classes", 0) and (
      _get(config, "model.num_classes") != _get(config, "data.num_classes")):
    raise ConfigError(f"config.model.num_classes: {_get(config, 'model.num_classes')} differs from "
                      f"config.data.num_classes={_get(config, 'data.num_classes')}")

  # Flow matching.
  r("flow.sigma_min", lambda v: 0 <= float(v) < 1, "must lie in [0, 1)")
  r("flow.time_sampling", _one_of(("uniform", "logit_normal")), "must be uniform or logit_normal")
  r("flow.class_dropout_prob", _fraction(hi_open=True), "must lie in [0, 1)")

  # Training.
  r("train.batch_size", _positive_int, "must be a positive integer")
  r("train.num_steps", _nonneg_int, "must be an integer >= 0")
  r("train.learning_rate", lambda v: float(v) > 0, "must be positive")
  r("train.weight_decay", lambda v: float(v) >= 0, "must be >= 0")
  r("train.schedule", _one_of(("constant", "cosine")), "must be constant or cosine")
  r("train.warmup_steps", _nonneg_int, "must be an integer >= 0")
  r("train.grad_clip_norm", lambda v: float(v) >= 0, "must be >= 0 (0 disables)")
  r("train.grad_accum_steps", _positive_int, "must be a positive integer")
  if _get(config, "train.batch_size") % _get(config, "train.grad_accum_steps"):
    raise ConfigError("config.train.batch_size: must be divisible by config.train.grad_accum_steps")
  r("train.compute_dtype", _one_of(("float32", "bfloat16")), "must be float32 or bfloat16")
  r("train.ema_decay", _fraction(hi_open=True), "must lie in [0, 1)")
  r("train.log_every", _positive_int, "must be a positive integer")
  r("train.checkpoint_every", _positive_int, "must be a positive integer")
  r("train.keep_checkpoints", _positive_int, "must be a positive integer")
  r("train.keep_every", _nonneg_int, "must be an integer >= 0 (0 disables)")
  r("train.sample_every", _nonneg_int, "must be an integer >= 0 (0 disables)")

  # Sampling and evaluation.
  r("sample.solver", _one_of(SOLVERS), f"must be one of {', '.join(SOLVERS)}")
  if _get(config, "sample.solver") in ("euler", "heun", "midpoint", "rk4"):
    r("sample.num_steps", _positive_int, "fixed-step solvers need a positive integer")
  r("sample.rtol", lambda v: float(v) > 0, "must be positive")
  r("sample.atol", lambda v: float(v) > 0, "must be positive")
  r("sample.guidance_scale", lambda v: float(v) >= 0, "must be >= 0")
  r("sample.num_samples", _positive_int, "must be a positive integer")
  r("sample.batch_size", _positive_int, "must be a positive integer")
  r("eval.num_samples", _positive_int, "must be a positive integer")
  r("eval.batch_size", _positive_int, "must be a positive integer")
  r("eval.feature_extractor", _one_of(FEATURE_EXTRACTORS),
    f"must be one of {', '.join(FEATURE_EXTRACTORS)}")
  r("score.criterion", _one_of(SCORE_CRITERIA), f"must be one of {', '.join(SCORE_CRITERIA)}")
  r("score.embedding", _one_of(("autoencoder", "inception", "file")),
    "must be autoencoder, inception or file")
  if _get(config, "score.embedding") == "file":
    r("score.embedding_file", lambda v: isinstance(v, str) and v,
      "must name an .npz with ids and features when config.score.embedding == 'file'")
  r("score.num_clusters", _positive_int, "must be a positive integer")
  r("coarse_to_fine.light_fraction", _fraction(), "must lie in [0, 1]")


TASKS = ("generation", "inpainting", "semantic")
MASK_KINDS = ("lfm", "center", "file", "dir")


def _validate_task(config: ml_collections.ConfigDict) -> None:
  """data.task, the mask keys and the network's conditioning channels (lfm_jax/tasks.py)."""
  r = lambda path, ok, what, optional=False: _require(config, path, ok, what, optional)
  r("data.task", _one_of(TASKS), f"must be one of {', '.join(TASKS)}", optional=True)
  task = _get(config, "data.task", "generation") or "generation"
  extra = _get(config, "model.extra_in_channels", 0)
  classes = _get(config, "model.semantic_classes", 0) or 0
  r("model.semantic_classes", _nonneg_int, "must be an integer >= 0 (0: no semantic map)",
    optional=True)
  if task == "inpainting":
    r("data.mask_kind", _one_of(MASK_KINDS), f"must be one of {', '.join(MASK_KINDS)}")
    r("data.mask_white", _one_of(("known", "hole")), "must be known or hole")
    r("data.mask_seed", lambda v: isinstance(v, int), "must be an integer")
    if _get(config, "data.mask_kind") in ("file", "dir"):
      r("data.mask_path", lambda v: isinstance(v, str) and v,
        f"must name the mask {'PNG' if _get(config, 'data.mask_kind') == 'file' else 'folder'} "
        f"when config.data.mask_kind == {_get(config, 'data.mask_kind')!r}")
    want = _get(config, "autoencoder.latent_channels", 4) + 1
    if extra != want:
      raise ConfigError(f"config.model.extra_in_channels: inpainting feeds the masked image's "
                        f"latent ({want - 1} channels) and the mask (1): {want}, got {extra}")
    if classes:
      raise ConfigError("config.model.semantic_classes: must be 0 for inpainting")
    if bool(_get(config, "data.inpaint_image")) != bool(_get(config, "data.inpaint_mask")):
      missing = "inpaint_mask" if _get(config, "data.inpaint_image") else "inpaint_image"
      raise ConfigError(f"config.data.{missing}: inpainting a given image needs both "
                        "config.data.inpaint_image and config.data.inpaint_mask")
  elif task == "semantic":
    if not classes:
      raise ConfigError("config.model.semantic_classes: semantic synthesis needs the number of "
                        "classes of the maps (19 for CelebAMask-HQ)")
    if not extra:
      raise ConfigError("config.model.extra_in_channels: semantic synthesis maps the class map "
                        "to extra input channels (LFM: 4); got 0")
  else:
    if extra and not _get(config, "model.init_from"):
      raise ConfigError(f"config.model.extra_in_channels: {extra} conditioning channels need "
                        "config.data.task = 'inpainting' or 'semantic'")
    if classes:
      raise ConfigError("config.model.semantic_classes: set config.data.task = 'semantic' for a "
                        "semantic-map network")
  for key in ("data.inpaint_image", "data.inpaint_mask"):
    if _get(config, key) and task != "inpainting":
      raise ConfigError(f"config.{key}: only used when config.data.task == 'inpainting'")
  if _get(config, "data.semantic_map") and task != "semantic":
    raise ConfigError("config.data.semantic_map: only used when config.data.task == 'semantic'")


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int,
                         num_processes: int) -> None:
  """Checks the values that depend on the device and process counts, before any compile."""
  fsdp = _get(config, "mesh.fsdp")
  if num_devices % fsdp:
    raise ConfigError(f"config.mesh.fsdp: {fsdp} does not divide the {num_devices} devices")
  training = {"pipeline": ("train.batch_size", "autoencoder.train.batch_size"),
              "train": ("train.batch_size",),
              "autoencoder": ("autoencoder.train.batch_size",)}.get(_get(config, "mode"), ())
  for key in training:
    if _get(config, key) % num_devices:
      raise ConfigError(f"config.{key}: {_get(config, key)} is not divisible by the "
                        f"{num_devices} devices")
  if _get(config, "latents.groups") % num_processes:
    raise ConfigError(f"config.latents.groups: {_get(config, 'latents.groups')} is not divisible "
                      f"by the {num_processes} processes")
