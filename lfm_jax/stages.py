"""The stages behind the command-line modes, and how each reuses what earlier ones left.

    autoencoder -> encode -> train -> sample / evaluate / score / stability

Workdir layout (DESIGN.md): config.json, autoencoder/ (orbax + an exported diffusers directory),
latents/ (cache), checkpoints/ (flow model, orbax), samples/ (PNG grids, .npz), eval/, scores/,
stability/, TensorBoard event files and metrics.jsonl.

Every stage is a function `(config, workdir) -> dict` registered in MODES; `run` validates the
config, checks the workdir and dispatches. Problems a user can fix (a bad config value, missing
data or weights, a stage that has not run yet) raise `UserError` with a one-line message.
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import config_validation
from lfm_jax import flow
from lfm_jax import parallel
from lfm_jax import sampling


class UserError(Exception):
  """A problem the user can fix; main prints the message on one line and exits non-zero."""


def say(message: str) -> None:
  """Stage progress for humans (stdout) and the log."""
  print(f"[lfm_jax] {message}", flush=True)


# ----------------------------------------------------------------------------- workdir and config


def prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir, checks it is writable, writes the resolved config.json."""
  if "://" not in workdir:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise UserError(f"workdir {workdir} is not writable (permission denied)")
  if jax.process_index() == 0:
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    try:
      with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
      os.replace(tmp, path)
    except OSError as e:
      raise UserError(f"workdir {workdir} is not writable: {e.strerror}") from e


def _json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def append_metrics(workdir: str, record: dict) -> None:
  """Appends one JSON line to <workdir>/metrics.jsonl (process 0 only)."""
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record, default=float) + "\n")


def load_workdir_config(workdir: str):
  """The resolved config another run wrote to <workdir>/config.json."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{path} not found: is {workdir} an lfm_jax workdir?")
  with open(path) as f:
    d = json.load(f)
  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    return x
  return ml_collections.ConfigDict(tuples(d))


# ----------------------------------------------------------------------------- data


def _data_errors():
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return (input_pipeline.DatasetNotAvailableError,)


def load_images(config, split: str, max_examples: Optional[int] = None, batch_size: int = 256):
  """All images of a split as numpy (N, H, W, C) in [-1, 1], labels and ids (this host's share)."""
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    ds = input_pipeline.create_dataset(config.data, split, batch_size=batch_size, shuffle=False,
                                       seed=config.seed, repeat=False, drop_remainder=False,
                                       augment=False)
  except _data_errors() as e:
    raise UserError(str(e).splitlines()[0] if str(e) else repr(e)) from e
  images, labels, ids = [], [], []
  n = 0
  for batch in input_pipeline.iterate_numpy(ds):
    images.append(batch["image"])
    labels.append(batch["label"])
    ids.append(batch["id"])
    n += len(batch["image"])
    if max_examples is not None and n >= max_examples:
      break
  images, labels, ids = (np.concatenate(x) for x in (images, labels, ids))
  if max_examples is not None:
    images, labels, ids = images[:max_examples], labels[:max_examples], ids[:max_examples]
  return images, labels, ids


# ----------------------------------------------------------------------------- autoencoder


@dataclasses.dataclass
class Autoencoder:
  """A frozen first-stage autoencoder: module, params and what identifies them."""
  module: Any
  params: Any
  fingerprint: dict
  source: str

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.module.block_out_channels) - 1)


def _file_identity(path: str) -> dict:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime": int(st.st_mtime)}


def load_autoencoder(config, workdir: str, train_if_missing: bool = True) -> Autoencoder:
  """The pretrained autoencoder (config.autoencoder.pretrained), the one trained in this workdir,
  or (train_if_missing) a new one trained now."""
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  path = config.autoencoder.pretrained
  if path:
    if not os.path.exists(path):
      raise UserError(f"config.autoencoder.pretrained: {path} does not exist")
    try:
      module, params = weights.load_autoencoder_kl(path)
    except weights.WeightConversionError as e:
      first = str(e).splitlines()
      raise UserError(f"{first[0]} {first[1].strip() if len(first) > 1 else ''}"
                      f" (+{max(len(first) - 2, 0)} more)") from e
    except (OSError, ValueError) as e:
      raise UserError(f"config.autoencoder.pretrained: cannot load {path}: {e}") from e
    ident = _file_identity(path if os.path.isfile(path) else _largest_file(path))
    say(f"autoencoder: loaded pretrained weights from {path}")
    return Autoencoder(module, params, {"pretrained": ident}, path)

  exported = autoencoder_export_dir(workdir)
  if _autoencoder_complete(config, workdir):
    module, params = weights.load_autoencoder_kl(exported)
    say(f"autoencoder: reusing the one trained in {exported}")
  elif not train_if_missing:
    raise UserError(f"no trained autoencoder in {workdir}/autoencoder: run --mode=autoencoder "
                    "first, or set config.autoencoder.pretrained")
  else:
    _train_autoencoder(config, workdir)
    module, params = weights.load_autoencoder_kl(exported)  # the same path as pretrained weights
  return Autoencoder(module, params, {"trained": _file_identity(_largest_file(exported))},
                     exported)


def autoencoder_export_dir(workdir: str) -> str:
  """Where the trained autoencoder is exported (diffusers layout, loaded like pretrained weights)."""
  return os.path.join(workdir, "autoencoder", "diffusers")


def _autoencoder_complete(config, workdir: str) -> bool:
  exported = autoencoder_export_dir(workdir)
  step = _latest_step(os.path.join(workdir, "autoencoder", "checkpoints"))
  return (os.path.isfile(os.path.join(exported, "config.json")) and step is not None
          and step >= int(config.autoencoder.train.num_steps))


def _train_autoencoder(config, workdir: str) -> None:
  from lfm_jax import autoencoder_train, checkpoint as ckpt_lib, input_pipeline, train_utils  # pylint: disable=g-import-not-at-top
  data = config.data
  tcfg = config.autoencoder.train
  try:
    n = input_pipeline.num_examples(data, data.train_split)
  except _data_errors() as e:
    raise UserError(str(e).splitlines()[0]) from e
  in_memory = n * data.image_size ** 2 * data.channels * 4 < 2 ** 30
  say(f"autoencoder: training {tcfg.num_steps} steps on {n} images of {data.name} "
      f"(block_out_channels={tuple(config.autoencoder.block_out_channels)})")
  eval_images, _, _ = load_images(config, data.eval_split, max_examples=256)
  kw = {}
  if in_memory:
    kw["images"], _, _ = load_images(config, data.train_split)
  else:
    kw["train_iter"] = input_pipeline.ResumableIterator(
        data, data.train_split, batch_size=int(tcfg.batch_size), shuffle=True, seed=config.seed,
        repeat=True)
  try:
    autoencoder_train.train_autoencoder(config, workdir, eval_images=eval_images, print_fn=say,
                                        **kw)
  except (ckpt_lib.CheckpointError, train_utils.NonFiniteError) as e:
    raise UserError(str(e).splitlines()[0]) from e


def _largest_file(directory: str) -> str:
  files = [os.path.join(directory, f) for f in os.listdir(directory)]
  files = [f for f in files if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def run_autoencoder(config, workdir: str) -> dict:
  ae = load_autoencoder(config, workdir)
  return {"autoencoder": ae.source}


# ----------------------------------------------------------------------------- latents


def run_encode(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Encodes config.data.train_split into <workdir>/latents/ (reused when nothing changed)."""
  from lfm_jax import input_pipeline, latents  # pylint: disable=g-import-not-at-top
  ae = ae or load_autoencoder(config, workdir, train_if_missing=config.mode == "pipeline")
  mesh = parallel.create_mesh()
  params = jax.device_put(ae.params, parallel.replicated(mesh))
  encode = jax.jit(lambda p, x: ae.module.apply({"params": p}, x, method=ae.module.encode))
  ndev = mesh.devices.size

  def encode_fn(images):
    n = images.shape[0]
    pad = (-n) % ndev
    x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images
    x = jax.device_put(x, parallel.data_sharded(mesh))
    mean, logvar = encode(params, x)
    return np.asarray(mean)[:n], np.asarray(logvar)[:n]

  def images():
    ds = input_pipeline.create_dataset(config.data, config.data.train_split, batch_size=256,
                                       shuffle=False, seed=config.seed, repeat=False,
                                       drop_remainder=False, augment=False)
    return input_pipeline.iterate_numpy(ds)

  data = config.data
  fingerprint = {"autoencoder": ae.fingerprint, "data": data.name, "split": data.train_split,
                 "image_size": data.image_size, "channels": data.channels, "crop": data.crop,
                 "max_train_examples": data.max_train_examples}
  try:
    manifest = latents.build_latent_cache(
        workdir, encode_fn, images, fingerprint=fingerprint,
        scale_factor=config.autoencoder.scale_factor, seed=config.seed, log=say)
  except _data_errors() as e:
    raise UserError(str(e).splitlines()[0]) from e
  say(f"latents: {manifest['num_examples']} examples, shape {tuple(manifest['latent_shape'])}, "
      f"scale factor {manifest['scale_factor']:.4f}")
  return {"latents": manifest["path"], "reused": manifest["reused"]}


def _load_latents(workdir: str):
  from lfm_jax import latents  # pylint: disable=g-import-not-at-top
  try:
    return latents.load_latent_cache(workdir)
  except FileNotFoundError as e:
    raise UserError(f"no latent cache in {workdir}/latents: run --mode=encode first") from e


# ----------------------------------------------------------------------------- flow model


def _kept_ids(config, workdir: str, ids: np.ndarray) -> Optional[np.ndarray]:
  """The example ids of a pruned subset (config.data.subset), saved beside the checkpoints."""
  sub = config.data.subset
  if not sub.ratio:
    return None
  from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
  path = sub.scores or default_scores_path(workdir, config.score.criterion)
  if not os.path.isfile(path):
    raise UserError(f"config.data.subset.scores: {path} not found (run --mode=score first)")
  kept = scoring.select_from_scores_file(path, rule=sub.rule, ratio=float(sub.ratio),
                                         seed=config.seed)
  missing = np.setdiff1d(kept, ids)
  if missing.size:
    raise UserError(f"{path}: {missing.size} kept ids are not in the latent cache "
                    "(scores of another data set?)")
  os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
  np.save(os.path.join(workdir, "checkpoints", "kept_ids.npy"), kept)
  say(f"subset: keeping {kept.size} of {ids.size} examples (rule {sub.rule}, "
      f"{float(sub.ratio):.0%} removed, scores {path})")
  return kept


def run_train(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Trains the velocity network on the latent cache (resumes from checkpoints/)."""
  from lfm_jax import train  # pylint: disable=g-import-not-at-top
  cache = _load_latents(workdir)
  arrays = {"mean": cache["mean"], "logvar": cache["logvar"]}
  if config.model.num_classes:
    arrays["label"] = cache["label"].astype(np.int32)
  kept = _kept_ids(config, workdir, cache["id"])
  if kept is not None:
    rows = np.isin(cache["id"], kept)
    arrays = {k: v[rows] for k, v in arrays.items()}
  latent_shape = tuple(cache["mean"].shape[1:])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  done = _latest_step(ckpt_dir)
  if done is not None and done >= config.train.num_steps:
    say(f"train: reusing the finished model in {ckpt_dir} (step {done})")
    return {"checkpoints": ckpt_dir, "reused": True}
  say(f"train: {config.train.num_steps} steps of {config.model.name} on {len(arrays['mean'])} "
      f"latents {latent_shape}" + (f", resuming at step {done}" if done else ""))
  from lfm_jax import checkpoint as ckpt_lib, train_utils  # pylint: disable=g-import-not-at-top
  init_params = None
  if config.model.get("init_from", None):
    model, init_params = import_velocity_checkpoint(config)
    if done is None:
      say(f"train: fine-tuning from {config.model.init_from}")
    else:
      init_params = None  # resuming: the checkpoint has the params
  else:
    model = build_model(config, latent_shape)
  sample_fn = None
  if config.train.sample_every:
    ae = ae or load_autoencoder(config, workdir, train_if_missing=False)
    sample_fn = _training_sample_fn(config, ae, model, latent_shape, cache["scale_factor"])
  try:
    train.train_and_evaluate(config, workdir, latents=arrays, latent_shape=latent_shape,
                             scale_factor=cache["scale_factor"], sample_fn=sample_fn,
                             model=model, initial_params=init_params)
  except (ckpt_lib.CheckpointError, train_utils.NonFiniteError) as e:
    raise UserError(str(e).splitlines()[0]) from e
  return {"checkpoints": ckpt_dir, "reused": False}


def _latest_step(ckpt_dir: str) -> Optional[int]:
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  return max(steps) if steps else None


@dataclasses.dataclass
class FlowModel:
  """A trained velocity network ready to sample: module, EMA params, what it expects."""
  module: Any
  params: Any
  config: Any
  latent_shape: tuple
  scale_factor: float

  @property
  def num_classes(self) -> int:
    return int(self.config.model.num_classes)


def load_flow_model(config, workdir: str, use_ema: bool = True, other_run: bool = False) -> FlowModel:
  """Restores the latest flow checkpoint of `workdir`.

  other_run: the workdir belongs to another run (a light model, the other side of a stability
  comparison): its model is built from that run's own config.json, not from `config`.
  """
  from lfm_jax import checkpoint as ckpt_lib, train, train_utils  # pylint: disable=g-import-not-at-top
  run_config = load_workdir_config(workdir) if other_run else config
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = _latest_step(ckpt_dir)
  if step is None and run_config.model.get("init_from", None):
    return _imported_flow_model(run_config, workdir)
  if step is None:
    raise UserError(f"no flow-model checkpoint in {ckpt_dir}: run --mode=train first "
                    "(or set config.model.init_from to a PyTorch checkpoint)")
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir)
  try:
    meta = checkpointer.read_metadata(step)
    latent_shape = tuple(meta["config"]["latent_shape"])
    model = build_model(run_config, latent_shape)
    tx, _ = train_utils.create_optimizer(run_config.train)
    mesh = parallel.create_mesh()
    abstract = train.abstract_train_state(jax.random.PRNGKey(0), model, run_config, latent_shape,
                                          tx, mesh)
    state, _, _ = checkpointer.restore(abstract, step)
  except ckpt_lib.CheckpointError as e:
    raise UserError(str(e).splitlines()[0]) from e
  finally:
    checkpointer.close()
  cache_manifest = os.path.join(workdir, "latents", "manifest.json")
  scale = run_config.autoencoder.scale_factor
  if os.path.isfile(cache_manifest):
    with open(cache_manifest) as f:
      scale = json.load(f)["scale_factor"]
  params = state.ema_params if use_ema else state.params
  return FlowModel(model, params, run_config, latent_shape, float(scale or 1.0))


def import_velocity_checkpoint(config):
  """(module, params) of config.model.init_from, a PyTorch LFM / stability-repo checkpoint."""
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  path = config.model.init_from
  if not os.path.isfile(path):
    raise UserError(f"config.model.init_from: {path} does not exist")
  try:
    return weights.load_velocity_checkpoint(path, config.model)
  except weights.WeightConversionError as e:
    lines = str(e).splitlines()
    raise UserError(f"config.model.init_from: {lines[0]} {lines[1].strip() if len(lines) > 1 else ''}"
                    f" (+{max(len(lines) - 2, 0)} more)") from e
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"config.model.init_from: cannot load {path}: {e}") from e


def build_model(config, latent_shape):
  """The velocity network of a config: the imported checkpoint's architecture when
  config.model.init_from is set (inferred from its shapes), else create_model(config.model)."""
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  if config.model.get("init_from", None):
    return import_velocity_checkpoint(config)[0]
  return models.create_model(config.model, latent_shape)


def _imported_flow_model(config, workdir: str) -> "FlowModel":
  module, params = import_velocity_checkpoint(config)
  manifest = os.path.join(workdir, "latents", "manifest.json")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      m = json.load(f)
    latent_shape, scale = tuple(m["latent_shape"]), m["scale_factor"]
  else:
    size = config.data.image_size // 2 ** (len(config.autoencoder.block_out_channels) - 1)
    latent_shape = (size, size, int(config.autoencoder.latent_channels))
    scale = config.autoencoder.scale_factor
  say(f"model: sampling the imported checkpoint {config.model.init_from} (latents {latent_shape})")
  return FlowModel(module, params, config, latent_shape, float(scale or 1.0))


_VELOCITY_FNS: dict = {}


def velocity_fn_for(module, num_classes: int, guidance_scale: float) -> Callable:
  """A sampler velocity `(t, z, (params, labels)) -> v` with classifier-free guidance.

  Cached per (module, classes, scale) so the compiled solve is reused across calls.
  """
  key = (id(module), num_classes, float(guidance_scale))
  if key in _VELOCITY_FNS:
    return _VELOCITY_FNS[key][1]

  def fn(t, z, args):
    params, labels = args
    tb = jnp.broadcast_to(jnp.asarray(t, z.dtype), (z.shape[0],))
    apply = lambda tt, zz, yy: module.apply({"params": params}, zz, tt, yy)
    if labels is None or not num_classes:
      return apply(tb, z, None)
    return flow.guided_velocity(apply, tb, z, labels, float(guidance_scale), null_label=num_classes)

  _VELOCITY_FNS[key] = (module, fn)  # keep the module alive: ids stay unique
  return fn


def sample_latents_batch(model: FlowModel, noise, labels, sample_config, light: Optional[FlowModel]
                         = None, light_fraction: float = 0.0):
  """One batch of latents (already divided by the scale factor) and the solver info."""
  g = float(sample_config.guidance_scale)
  heavy_fn = velocity_fn_for(model.module, model.num_classes, g)
  kw = dict(solver=sample_config.solver, num_steps=sample_config.num_steps,
            rtol=sample_config.rtol, atol=sample_config.atol)
  if sampling.is_adaptive(sample_config.solver):
    kw["num_steps"] = None
  if light is None:
    z, info = sampling.sample(heavy_fn, noise, args=(model.params, labels), **kw)
  else:
    light_fn = velocity_fn_for(light.module, light.num_classes, g)
    z, info = sampling.sample_coarse_to_fine(
        light_fn, heavy_fn, noise, light_fraction=light_fraction,
        light_args=(light.params, labels), heavy_args=(model.params, labels), **kw)
  return z / model.scale_factor, info


def _decoder(ae: Autoencoder):
  return jax.jit(lambda p, z: jnp.clip(ae.module.apply({"params": p}, z, method=ae.module.decode),
                                       -1.0, 1.0))


def _labels_for(n: int, num_classes: int) -> Optional[np.ndarray]:
  """n labels cycling through the classes (None for unconditional models)."""
  return (np.arange(n) % num_classes).astype(np.int32) if num_classes else None


def generate(model: FlowModel, ae: Autoencoder, num: int, batch_size: int, sample_config, *,
             seed: int, labels: Optional[np.ndarray] = None, light: Optional[FlowModel] = None,
             light_fraction: float = 0.0, progress: str = "") -> dict:
  """Samples `num` images in sharded batches from fixed seeds; returns images, latents, timing."""
  mesh = parallel.create_mesh()
  ndev = mesh.devices.size
  rep = parallel.replicated(mesh)
  model = dataclasses.replace(model, params=jax.device_put(model.params, rep))
  if light is not None:
    light = dataclasses.replace(light, params=jax.device_put(light.params, rep))
  ae_params = jax.device_put(ae.params, rep)
  decode = _decoder(ae)
  if labels is None:
    labels = _labels_for(num, model.num_classes)
  bs = max(ndev, (batch_size // ndev) * ndev)
  rng = jax.random.PRNGKey(seed)
  out_images, out_latents, nfes, nfe_l, nfe_h = [], [], [], [], []
  t_sample = t_decode = 0.0
  done = 0
  while done < num:
    n = min(bs, num - done)
    padded = -(-n // ndev) * ndev
    noise = jax.random.normal(jax.random.fold_in(rng, done), (padded,) + model.latent_shape)
    noise = jax.device_put(noise, parallel.data_sharded(mesh))
    y = None
    if labels is not None:
      y = np.zeros((padded,), np.int32)
      y[:n] = labels[done:done + n]
      y = jax.device_put(y, parallel.data_sharded(mesh))
    t0 = time.perf_counter()
    z, info = sample_latents_batch(model, noise, y, sample_config, light, light_fraction)
    z.block_until_ready()
    t1 = time.perf_counter()
    x = decode(ae_params, z)
    x.block_until_ready()
    t2 = time.perf_counter()
    if done > 0 or num <= bs:  # the first batch includes compilation when there are more
      t_sample += t1 - t0
      t_decode += t2 - t1
    out_images.append(np.asarray(x)[:n])
    out_latents.append(np.asarray(z)[:n])
    nfes.append(int(info["nfe"]))
    if "nfe_light" in info:
      nfe_l.append(int(info["nfe_light"]))
      nfe_h.append(int(info["nfe_heavy"]))
    done += n
    if progress:
      say(f"{progress}: {done}/{num} samples")
  timed = num - (min(bs, num) if num > bs else 0)
  result = {"images": np.concatenate(out_images), "latents": np.concatenate(out_latents),
            "labels": labels, "nfe": float(np.mean(nfes)),
            "sec_per_image": (t_sample + t_decode) / max(timed, 1),
            "sec_per_image_without_decoder": t_sample / max(timed, 1)}
  if nfe_l:
    result.update(nfe_light=float(np.mean(nfe_l)), nfe_heavy=float(np.mean(nfe_h)))
  return result


def _light_model(config) -> Optional[FlowModel]:
  lw = config.coarse_to_fine.light_workdir
  if not lw:
    return None
  light = load_flow_model(config, lw, other_run=True)
  say(f"coarse-to-fine: light model from {lw}, light_fraction {config.coarse_to_fine.light_fraction}")
  return light


def run_sample(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Samples config.sample.num_samples images: PNG grid (a row per class) and an .npz."""
  from lfm_jax import train_utils  # pylint: disable=g-import-not-at-top
  model = load_flow_model(config, workdir, use_ema=config.sample.use_ema)
  ae = ae or load_autoencoder(config, workdir, train_if_missing=False)
  light = _light_model(config)
  num = int(config.sample.num_samples)
  labels = None
  if model.num_classes:  # class-major order: the grid shows one class per row
    per = -(-num // model.num_classes)
    labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), per)[:num]
  out = generate(model, ae, num, config.sample.batch_size, config.sample, seed=config.seed,
                 labels=labels, light=light, light_fraction=config.coarse_to_fine.light_fraction,
                 progress="sample")
  sdir = os.path.join(workdir, "samples")
  os.makedirs(sdir, exist_ok=True)
  tag = f"{config.sample.solver}_g{config.sample.guidance_scale:g}"
  if light is not None:
    tag += f"_c2f{config.coarse_to_fine.light_fraction:g}"
  grid_path = os.path.join(sdir, f"samples_{tag}.png")
  cols = -(-num // model.num_classes) if model.num_classes else None
  train_utils.save_image_grid(out["images"], grid_path, ncols=cols)
  np.savez(os.path.join(sdir, f"samples_{tag}.npz"), images=out["images"], latents=out["latents"],
           labels=labels if labels is not None else np.zeros((0,), np.int32))
  record = {"stage": "sample", "solver": config.sample.solver, "guidance_scale":
            config.sample.guidance_scale, "num_samples": num, "nfe": out["nfe"],
            "sec_per_image": out["sec_per_image"],
            "sec_per_image_without_decoder": out["sec_per_image_without_decoder"]}
  if "nfe_light" in out:
    record.update(nfe_light=out["nfe_light"], nfe_heavy=out["nfe_heavy"])
  append_metrics(workdir, record)
  say(f"sample: wrote {grid_path} ({num} samples, NFE {out['nfe']:.0f})")
  return {"grid": grid_path, **record}


# ----------------------------------------------------------------------------- evaluation


def feature_extractor(config, workdir: str, ae: Optional[Autoencoder] = None):
  """The configured feature extractor; trains/loads the offline digits classifier if needed."""
  from lfm_jax.metrics import features  # pylint: disable=g-import-not-at-top
  name = config.eval.feature_extractor
  if name == "inception":
    return features.get_feature_extractor("inception", weights_path=config.eval.inception_weights)
  if name == "autoencoder":
    ae = ae or load_autoencoder(config, workdir, train_if_missing=False)
    enc = jax.jit(lambda p, x: ae.module.apply({"params": p}, x, method=ae.module.encode)[0])
    dim = int(np.prod(jax.eval_shape(
        lambda: enc(ae.params, jnp.zeros((1, config.data.image_size, config.data.image_size,
                                         config.data.channels)))).shape[1:]))
    return features.CallableFeatureExtractor(
        "autoencoder", dim, lambda x: enc(ae.params, jnp.asarray(x)).reshape(x.shape[0], -1))
  cache = os.path.join(workdir, "eval")
  os.makedirs(cache, exist_ok=True)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  path = features.digits_classifier_cache_path(cache, shape)
  if os.path.isfile(path):
    say(f"evaluate: reusing the digits classifier {path}")
    return features.get_feature_extractor("digits_classifier", path=path)
  images, labels, _ = load_images(config, config.data.train_split)
  say(f"evaluate: training the offline digits classifier on {len(images)} images")
  return features.get_feature_extractor(
      "digits_classifier", path=path, train_images=images, train_labels=labels,
      num_classes=max(config.data.num_classes, 1))


def run_evaluate(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Samples eval.num_samples images and reports the labelled metrics, NFE and time per image."""
  from lfm_jax.metrics import features as feat_lib, fid, precision_recall  # pylint: disable=g-import-not-at-top
  model = load_flow_model(config, workdir, use_ema=config.sample.use_ema)
  ae = ae or load_autoencoder(config, workdir, train_if_missing=False)
  try:
    extractor = feature_extractor(config, workdir, ae)
  except feat_lib.FeatureExtractorUnavailable as e:
    say(f"evaluate: {e} -- skipping feature metrics (FID/precision/recall/KID)")
    extractor = None
  light = _light_model(config)
  num = int(config.eval.num_samples)
  out = generate(model, ae, num, config.eval.batch_size, config.sample, seed=config.seed + 1,
                 light=light, light_fraction=config.coarse_to_fine.light_fraction,
                 progress="evaluate")
  record = {"stage": "evaluate", "num_samples": num, "solver": config.sample.solver,
            "num_steps": config.sample.num_steps, "guidance_scale": config.sample.guidance_scale,
            "nfe": out["nfe"], "sec_per_image": out["sec_per_image"],
            "sec_per_image_without_decoder": out["sec_per_image_without_decoder"]}
  if "nfe_light" in out:
    record.update(nfe_light=out["nfe_light"], nfe_heavy=out["nfe_heavy"])
  if extractor is not None:
    ref_stats, ref_feats = _reference(config, workdir, extractor)
    gen_feats = extractor.extract(out["images"], batch_size=config.eval.batch_size)
    gen_stats = fid.FeatureStats.from_features(gen_feats)
    name = extractor.name
    record[feat_lib.metric_name("fd", name)] = fid.frechet_distance_from_stats(gen_stats, ref_stats)
    k = int(config.eval.precision_recall_k)
    n_ref = min(len(ref_feats), num)
    pr = precision_recall.precision_recall(ref_feats[:n_ref], gen_feats, k=k)
    record[feat_lib.metric_name("precision", name)] = float(pr["precision"])
    record[feat_lib.metric_name("recall", name)] = float(pr["recall"])
    sub = min(int(config.eval.kid_subset_size), n_ref, num)
    kid = precision_recall.kid(ref_feats[:n_ref], gen_feats, num_subsets=int(config.eval.kid_subsets),
                               subset_size=sub)
    record[feat_lib.metric_name("kid", name)] = float(kid["mean"])
    if hasattr(extractor, "class_agreement") and out["labels"] is not None:
      record["class_agreement_" + name] = float(
          extractor.class_agreement(out["images"], out["labels"]))
  eval_dir = os.path.join(workdir, "eval")
  _json(os.path.join(eval_dir, "metrics.json"), record)
  append_metrics(workdir, record)
  _write_tb(workdir, record)
  say("evaluate: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in record.items() if k != "stage"))
  return record


def _reference(config, workdir: str, extractor):
  """Reference statistics and features of real images (config.eval.reference_stats or the
  eval split), cached under <workdir>/eval/."""
  from lfm_jax.metrics import fid  # pylint: disable=g-import-not-at-top
  split = config.eval.reference_split
  path = os.path.join(workdir, "eval", f"reference_{extractor.name}_{split}.npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      feats = z["features"]
  else:
    images, _, _ = load_images(config, split, max_examples=int(config.eval.num_samples))
    feats = extractor.extract(images, batch_size=config.eval.batch_size)
    np.savez(path, features=feats)
  stats = fid.FeatureStats.from_features(feats)
  if config.eval.reference_stats:
    mu, sigma = fid.load_stats(config.eval.reference_stats)
    stats = _StatsView(mu, sigma)
  return stats, feats


class _StatsView:
  """Reference statistics given as (mu, sigma) (pytorch-fid .npz)."""

  def __init__(self, mu, sigma):
    self._mu, self._sigma = mu, sigma

  def mean_cov(self):
    return self._mu, self._sigma

  def mean(self):
    return self._mu

  def cov(self):
    return self._sigma


def _write_tb(workdir: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.SummaryWriter(os.path.join(workdir, "eval"))
  writer.write_scalars(0, {k: v for k, v in record.items() if isinstance(v, (int, float))})
  writer.flush()
  writer.close()


# ----------------------------------------------------------------------------- scoring, stability


def default_scores_path(workdir: str, criterion: str) -> str:
  return os.path.join(workdir, "scores", f"scores_{criterion}.npz")


def run_score(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Scores every training example (config.score.criterion) into <workdir>/scores/."""
  from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
  sc = config.score
  cache = _load_latents(workdir)
  ids = cache["id"]
  latents_scaled = cache["mean"].astype(np.float32) * cache["scale_factor"]
  kw = dict(num_clusters=int(sc.num_clusters), num_times=int(sc.num_times),
            num_noises=int(sc.num_noises), batch_size=int(sc.batch_size), seed=int(config.seed))
  embeddings = velocity_fn = params = None
  if sc.criterion in ("cluster", "kcenter", "herding"):
    embeddings = _embeddings(config, workdir, cache, ae)
  if sc.criterion in ("loss", "gradient"):
    model_dir = sc.get("model_workdir", None) or workdir
    model = load_flow_model(config, model_dir, other_run=model_dir != workdir)
    velocity_fn, params = scoring.module_velocity_fn(model.module), model.params
    say(f"score: {sc.criterion} score with the model in {model_dir}")
  labels = cache["label"].astype(np.int32) if config.model.num_classes else None
  scores, clusters = scoring.compute_scores(
      sc.criterion, ids, embeddings=embeddings, latents=latents_scaled, labels=labels,
      velocity_fn=velocity_fn, params=params, **kw)
  path = default_scores_path(workdir, sc.criterion)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  scoring.save_scores(path, ids, scores, clusters, criterion=sc.criterion,
                      meta={"embedding": sc.embedding, "num_clusters": sc.num_clusters})
  say(f"score: wrote {path} ({len(ids)} examples, criterion {sc.criterion})")
  return {"scores": path}


def _embeddings(config, workdir: str, cache: dict, ae) -> np.ndarray:
  sc = config.score
  if sc.embedding == "file":
    with np.load(sc.embedding_file) as z:
      order = {int(i): r for r, i in enumerate(z["ids"])}
      missing = [int(i) for i in cache["id"] if int(i) not in order]
      if missing:
        raise UserError(f"config.score.embedding_file: {len(missing)} example ids missing "
                        f"(e.g. {missing[0]})")
      return z["features"][[order[int(i)] for i in cache["id"]]].astype(np.float32)
  if sc.embedding == "inception":
    ex = feature_extractor(config, workdir, ae)
    images, _, ids = load_images(config, config.data.train_split)
    pos = {int(i): r for r, i in enumerate(ids)}
    feats = ex.extract(images, batch_size=int(sc.batch_size))
    return feats[[pos[int(i)] for i in cache["id"]]]
  return cache["mean"].reshape(len(cache["mean"]), -1).astype(np.float32)


def run_stability(config, workdir: str, ae: Optional[Autoencoder] = None) -> dict:
  """Same-seed comparison of this workdir's model with config.stability.other_workdir's."""
  from lfm_jax.metrics import stability  # pylint: disable=g-import-not-at-top
  st = config.stability
  if not st.other_workdir:
    raise UserError("config.stability.other_workdir: the second model's workdir is required")
  a = load_flow_model(config, workdir)
  b = load_flow_model(config, st.other_workdir, other_run=True)
  ae = ae or load_autoencoder(config, workdir, train_if_missing=False)
  num = int(st.num_samples)
  gen_a = generate(a, ae, num, config.sample.batch_size, config.sample, seed=config.seed + 2)
  gen_b = generate(b, ae, num, config.sample.batch_size, config.sample, seed=config.seed + 2)
  embed = None
  if st.embedding:
    ecfg = config.copy_and_resolve_references()
    with ecfg.unlocked():
      ecfg.eval.feature_extractor = st.embedding
    try:
      embed = feature_extractor(ecfg, workdir, ae)
    except Exception as e:  # pylint: disable=broad-except
      say(f"stability: embedding {st.embedding} unavailable ({e}); using pixels")
  report = stability.stability_report(gen_a["images"], gen_b["images"], embed,
                                      latents_a=gen_a["latents"], latents_b=gen_b["latents"],
                                      seed=config.seed)
  out_dir = os.path.join(workdir, "stability")
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, "pairs.png")
  stability.save_pairs_png(png, gen_a["images"], gen_b["images"], n=min(16, num))
  record = {"stage": "stability", "other_workdir": st.other_workdir, **report}
  _json(os.path.join(out_dir, "report.json"), record)
  append_metrics(workdir, record)
  say("stability: same-seed cosine {:.4f} vs shuffled {:.4f}; SSIM {:.4f} vs {:.4f}; pairs {}".format(
      report["same_seed/cosine"], report["shuffled/cosine"], report["same_seed/ssim"],
      report["shuffled/ssim"], png))
  return record


# ----------------------------------------------------------------------------- pipeline


def _training_sample_fn(config, ae: Autoencoder, module, latent_shape, scale_factor: float):
  """Sample-grid callback for the trainer (velocity network `module`): fixed noise, one row per
  class, EMA params."""
  num_classes = int(config.model.num_classes)
  n = 10 * max(min(num_classes, 10), 1) if num_classes else 64
  labels = np.repeat(np.arange(min(num_classes, 10), dtype=np.int32), 10) if num_classes else None
  noise = jax.random.normal(jax.random.PRNGKey(config.seed + 7), (n,) + tuple(latent_shape))
  decode = _decoder(ae)

  def sample_fn(params, step):
    del step
    model = FlowModel(module, params, config, tuple(latent_shape), scale_factor)
    z, _ = sample_latents_batch(model, noise, labels, config.sample)
    return np.asarray(decode(ae.params, z))

  return sample_fn


def run_pipeline(config, workdir: str) -> dict:
  """All stages: autoencoder -> encode -> train -> sample -> evaluate."""
  t0 = time.time()
  results = {}
  stages = [("autoencoder", None), ("encode", run_encode), ("train", run_train),
            ("sample", run_sample), ("evaluate", run_evaluate)]
  ae = None
  for i, (name, fn) in enumerate(stages, 1):
    t = time.time()
    say(f"stage {i}/{len(stages)}: {name}")
    if fn is None:
      ae = load_autoencoder(config, workdir)
      results[name] = {"autoencoder": ae.source}
    else:
      results[name] = fn(config, workdir, ae=ae)
    say(f"stage {name} done in {time.time() - t:.1f} s (total {time.time() - t0:.1f} s)")
  return results


MODES: dict[str, Callable] = {
    "pipeline": run_pipeline,
    "autoencoder": run_autoencoder,
    "encode": run_encode,
    "train": run_train,
    "sample": run_sample,
    "evaluate": run_evaluate,
    "score": run_score,
    "stability": run_stability,
}


def run(config, workdir: str) -> dict:
  """Validates the config, prepares the workdir and runs config.mode."""
  try:
    config_validation.validate_config(config)
  except config_validation.ConfigError as e:
    raise UserError(str(e)) from e
  parallel.maybe_initialize_distributed()
  prepare_workdir(config, workdir)
  say(f"mode {config.mode}, workdir {workdir}, {jax.device_count()} {jax.devices()[0].platform} "
      f"device(s), {jax.process_count()} process(es)")
  return MODES[config.mode](config, workdir)
