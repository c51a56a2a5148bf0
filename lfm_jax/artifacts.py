"""What a run produces and what later stages load: the autoencoder and the flow model.

- `Autoencoder`: a frozen first-stage KL autoencoder (module, params, what identifies them),
  loaded from `config.autoencoder.pretrained` or from the one a workdir trained. Loading never
  trains.
- `FlowModel`: a trained velocity network ready to sample (module, params, latent shape, scale
  factor), restored from a workdir's latest checkpoint. The architecture comes from the
  checkpoint's own metadata, so another run's workdir (a light model, the other side of a
  stability comparison) loads without being told its config.
- Export: `export_model(workdir, out_dir)` writes a self-describing directory (lfm_jax_export.json,
  velocity.safetensors and the autoencoder in the diffusers layout) that `load_exported` reads,
  and that `weights.export_pytorch` turns into a PyTorch-layout checkpoint.

Problems a user can fix raise `ArtifactError` with a one-line message naming the path or key.
"""

import dataclasses
import functools
from typing import Any, Optional

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lfm_jax import parallel
from lfm_jax import storage
from lfm_jax import workdir as workdir_lib

EXPORT_MANIFEST = "lfm_jax_export.json"
EXPORT_FORMAT = 1


class ArtifactError(RuntimeError):
  """An artifact is missing or unreadable; the message names it and what to run."""


def _first_line(e: BaseException) -> str:
  lines = str(e).splitlines()
  if not lines:
    return type(e).__name__
  more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
  return lines[0] + (f" {lines[1].strip()}" if len(lines) > 1 else "") + more


# ----------------------------------------------------------------------------- autoencoder


@dataclasses.dataclass(eq=False)
class Autoencoder:
  """A frozen first-stage autoencoder: module, params and what identifies them.

  encode(images) -> (mean, logvar) and decode(latents) -> images work on NHWC arrays; images
  are in [-1, 1]; latents are the autoencoder's own (not multiplied by a scale factor).
  """
  module: Any
  params: Any
  identity: dict
  source: str

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.module.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.module.latent_channels)

  def encode(self, images) -> tuple[jax.Array, jax.Array]:
    return _encode_fn(self.module)(self.params, jnp.asarray(images, jnp.float32))

  def decode(self, latents) -> jax.Array:
    return _decode_fn(self.module)(self.params, jnp.asarray(latents, jnp.float32))


@functools.lru_cache(maxsize=8)
def _encode_fn(module):
  return jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))


@functools.lru_cache(maxsize=8)
def _decode_fn(module):
  return jax.jit(lambda p, z: jnp.clip(module.apply({"params": p}, z, method=module.decode),
                                       -1.0, 1.0))


def load_autoencoder_file(path: storage.PathLike, key: str = "autoencoder.pretrained") -> Autoencoder:
  """A diffusers directory or an LDM/SD single file (local or gs://); errors name `key`."""
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  p = storage.path(path)
  shown = storage.display(p)
  if not p.exists():
    raise ArtifactError(f"config.{key}: {shown} does not exist")
  try:
    module, params = weights.load_autoencoder_kl(shown)
  except weights.WeightConversionError as e:
    raise ArtifactError(f"config.{key}: {_first_line(e)}") from e
  except (OSError, ValueError, KeyError) as e:
    raise ArtifactError(f"config.{key}: cannot load {shown}: {_first_line(e)}") from e
  weights_file = p if p.is_file() else storage.largest_file(
      p / "vae" if (p / "vae").is_dir() else p)
  return Autoencoder(module, params, storage.file_identity(weights_file), shown)


def autoencoder_trained(config, workdir) -> bool:
  """True when `workdir` holds a finished autoencoder export (its training reached num_steps)."""
  wd = workdir_lib.Workdir.of(workdir)
  step = wd.latest_step(wd.autoencoder_checkpoints)
  return ((wd.autoencoder_export / "config.json").exists() and step is not None
          and step >= int(config.autoencoder.train.num_steps))


def load_autoencoder(config, workdir=None) -> Autoencoder:
  """config.autoencoder.pretrained, or the autoencoder `workdir` trained. Never trains."""
  if config.autoencoder.pretrained:
    return load_autoencoder_file(config.autoencoder.pretrained)
  if workdir is None or not autoencoder_trained(config, workdir):
    where = "" if workdir is None else f" in {workdir_lib.Workdir.of(workdir).autoencoder}"
    raise ArtifactError(f"no trained autoencoder{where}: run --mode=autoencoder first, or set "
                        "config.autoencoder.pretrained")
  wd = workdir_lib.Workdir.of(workdir)
  ae = load_autoencoder_file(wd.autoencoder_export, key="autoencoder (this workdir's export)")
  # The workdir's own autoencoder is known by its file's size and time, not its path: a copied
  # or moved workdir keeps its latent cache.
  own = {k: v for k, v in ae.identity.items() if k != "path"}
  return dataclasses.replace(ae, identity={"trained": own})


# ----------------------------------------------------------------------------- flow model


@dataclasses.dataclass(eq=False)
class FlowModel:
  """A trained velocity network ready to sample.

  module(x, t, y=None, cond=None) -> v in LFM's convention; params (EMA or live); latent_shape
  (h, w, c); scale_factor (latents the network sees = scale_factor * autoencoder latents);
  model_config the config.model section it was built from; source where it came from.
  """
  module: Any
  params: Any
  latent_shape: tuple
  scale_factor: float
  model_config: Any
  source: str
  step: Optional[int] = None

  @property
  def num_classes(self) -> int:
    return int(self.model_config.num_classes)

  @property
  def extra_in_channels(self) -> int:
    return int(self.model_config.extra_in_channels)


def import_velocity(model_config) -> tuple[Any, Any]:
  """(module, params) of model_config.init_from, a PyTorch LFM / stability-repo checkpoint."""
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  path = model_config.init_from
  if not storage.exists(path):
    raise ArtifactError(f"config.model.init_from: {path} does not exist")
  try:
    return weights.load_velocity_checkpoint(path, model_config)
  except weights.WeightConversionError as e:
    raise ArtifactError(f"config.model.init_from: {_first_line(e)}") from e
  except (OSError, ValueError, KeyError) as e:
    raise ArtifactError(f"config.model.init_from: cannot load {path}: {_first_line(e)}") from e


def build_velocity_network(model_config, latent_shape, dtype=jnp.float32):
  """The velocity network of a config.model section computing in `dtype`: the imported
  checkpoint's architecture when model.init_from is set (inferred from its shapes), else
  models.create_model; model.remat and model.attention_implementation applied either way."""
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  if model_config.init_from:
    return models.with_compute_options(import_velocity(model_config)[0], model_config,
                                       dtype=dtype)
  try:
    return models.create_model(model_config, tuple(latent_shape), dtype=dtype)
  except ValueError as e:
    raise ArtifactError(f"config.model: {_first_line(e)}") from e


def latent_shape_of(config) -> tuple[int, int, int]:
  """The latent shape a config implies (image size / downsampling, latent channels)."""
  down = 2 ** (len(config.autoencoder.block_out_channels) - 1)
  size = int(config.data.image_size) // down
  return (size, size, int(config.autoencoder.latent_channels))


def load_flow_model(workdir, *, use_ema: bool = True, step: Optional[int] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> FlowModel:
  """The flow model of `workdir`'s latest (or `step`) checkpoint; the architecture, latent shape
  and scale factor come from the checkpoint's metadata. A workdir that holds no checkpoint but
  whose config imports a PyTorch network (config.model.init_from) serves that network."""
  from lfm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lfm_jax import optim, train  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir.of(workdir)
  step = wd.latest_step() if step is None else step
  if step is None:
    if wd.exists():
      cfg = wd.read_config()
      if cfg.model.init_from:
        return imported_flow_model(cfg, wd)
    raise ArtifactError(f"no flow-model checkpoint in {wd.checkpoints}: run --mode=train first "
                        "(or set config.model.init_from to a PyTorch checkpoint)")
  checkpointer = ckpt_lib.Checkpointer(wd.checkpoints)
  try:
    meta = checkpointer.read_metadata(step)
    model_config = ml_collections.ConfigDict(meta["config"]["model"])
    latent_shape = tuple(meta["config"]["latent_shape"])
    module = build_velocity_network(model_config, latent_shape)
    run_config = wd.read_config()
    tx, _ = optim.create_optimizer(run_config.train)
    mesh = mesh or parallel.create_mesh()
    abstract = train.abstract_train_state(jax.random.PRNGKey(0), module, run_config,
                                          latent_shape, tx, mesh)
    state, _, _ = checkpointer.restore(abstract, step)
  except ckpt_lib.CheckpointError as e:
    raise ArtifactError(_first_line(e)) from e
  finally:
    checkpointer.close()
  scale = meta.get("scale_factor")
  if scale is None:  # checkpoints written before the scale factor was recorded
    from lfm_jax import latents  # pylint: disable=g-import-not-at-top
    cache = latents.LatentCache.open(wd.latents)
    scale = run_config.autoencoder.scale_factor or (cache.scale_factor if cache else 1.0)
  return FlowModel(module, state.ema_params if use_ema else state.params, latent_shape,
                   float(scale), model_config, str(wd), step=int(step))


def imported_flow_model(config, workdir=None) -> FlowModel:
  """A FlowModel serving config.model.init_from (no training); latent shape and scale factor
  from the workdir's latent cache when it has one, else from the config."""
  module, params = import_velocity(config.model)
  latent_shape, scale = latent_shape_of(config), config.autoencoder.scale_factor
  if workdir is not None:
    from lfm_jax import latents  # pylint: disable=g-import-not-at-top
    cache = latents.LatentCache.open(workdir_lib.Workdir.of(workdir).latents)
    if cache is not None:
      latent_shape = cache.latent_shape
      scale = scale or cache.scale_factor
  return FlowModel(module, params, tuple(latent_shape), float(scale or 1.0), config.model,
                   config.model.init_from)


# ----------------------------------------------------------------------------- export


def _module_classes() -> dict:
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  from lfm_jax.models import dit  # pylint: disable=g-import-not-at-top
  return {c.__name__: c for c in (models.UNet, dit.DiT, models.SiTConventionWrapper)}


def module_spec(module) -> dict:
  """A JSON description of a velocity network (class and dataclass fields), nested modules too."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  fields = {}
  for f in dataclasses.fields(module):
    if f.name in ("parent", "name"):
      continue
    v = getattr(module, f.name)
    if isinstance(v, nn.Module):
      v = {"module": module_spec(v)}
    elif isinstance(v, (type, np.dtype)) or hasattr(v, "dtype") and not hasattr(v, "shape"):
      v = {"dtype": np.dtype(v).name}
    elif isinstance(v, tuple):
      v = list(v)
    fields[f.name] = v
  return {"class": type(module).__name__, "fields": fields}


def module_from_spec(spec: dict):
  """The network `module_spec` described."""
  classes = _module_classes()
  if spec["class"] not in classes:
    raise ArtifactError(f"unknown network class {spec['class']!r} in an export")
  fields = {}
  for k, v in spec["fields"].items():
    if isinstance(v, dict) and "module" in v:
      v = module_from_spec(v["module"])
    elif isinstance(v, dict) and "dtype" in v:
      v = jnp.dtype(v["dtype"])
    elif isinstance(v, list):
      v = tuple(v)
    fields[k] = v
  return classes[spec["class"]](**fields)


def _flatten(params) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(parallel.to_host(params), sep="/")
  return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def export_model(model: FlowModel, autoencoder: Autoencoder, out_dir: storage.PathLike,
                 run_config: ml_collections.ConfigDict) -> str:
  """Writes a self-describing model directory (process 0):

    lfm_jax_export.json   format, latent shape, scale factor, the model section, file names
    config.json           the run's resolved config (sampling defaults)
    velocity.safetensors  the velocity network's params ('/'-joined flax paths)
    autoencoder/          the autoencoder in the diffusers layout
  """
  from lfm_jax.converters.common import save_safetensors  # pylint: disable=g-import-not-at-top
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  out = storage.path(out_dir)
  if jax.process_index() == 0:
    save_safetensors(out / "velocity.safetensors", _flatten(model.params))
    weights.export_autoencoder_kl(autoencoder.module, parallel.to_host(autoencoder.params),
                                  out / "autoencoder")
    storage.write_text(out / "config.json", run_config.to_json_best_effort(indent=2,
                                                                          sort_keys=True))
    storage.write_json(out / EXPORT_MANIFEST, {
        "format": EXPORT_FORMAT, "latent_shape": list(model.latent_shape),
        "scale_factor": float(model.scale_factor), "model": model.model_config.to_dict(),
        "module": module_spec(model.module),
        "velocity": "velocity.safetensors", "autoencoder": "autoencoder",
        "source": model.source, "step": model.step})
  parallel.sync("export_model")
  return storage.display(out)


def is_export(path: storage.PathLike) -> bool:
  return (storage.path(path) / EXPORT_MANIFEST).exists()


def load_exported(path: storage.PathLike) -> tuple[FlowModel, Autoencoder, dict]:
  """(flow model, autoencoder, manifest) of a directory written by export_model."""
  from lfm_jax.converters.common import load_safetensors  # pylint: disable=g-import-not-at-top
  d = storage.path(path)
  if not is_export(d):
    raise ArtifactError(f"{storage.display(d)} is not an lfm_jax export (no {EXPORT_MANIFEST})")
  manifest = storage.read_json(d / EXPORT_MANIFEST)
  if manifest.get("format") != EXPORT_FORMAT:
    raise ArtifactError(f"{storage.display(d)}: export format {manifest.get('format')} is not "
                        f"{EXPORT_FORMAT}")
  model_config = ml_collections.ConfigDict(manifest["model"])
  latent_shape = tuple(manifest["latent_shape"])
  flat = load_safetensors(d / manifest["velocity"])
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                         for k, v in flat.items()})
  module = module_from_spec(manifest["module"])
  model = FlowModel(module, params, latent_shape, float(manifest["scale_factor"]), model_config,
                    storage.display(d), step=manifest.get("step"))
  ae = load_autoencoder_file(d / manifest["autoencoder"], key="autoencoder (export)")
  return model, ae, manifest
