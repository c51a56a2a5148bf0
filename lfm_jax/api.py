"""The Python API for notebooks and scripts: a trained run, loaded once, sampled from directly.

    import lfm_jax
    run = lfm_jax.load("runs/demo")              # a workdir, or a directory written by --mode=export
    images = run.sample(16, labels=[3] * 16, seed=0)   # (16, H, W, C) float32 in [-1, 1]

`run.sample` returns the images `--mode=sample` writes for the same seed, labels and settings
(sample i's noise depends on (seed, i) only; `--mode=sample` uses config.seed and class-major
labels, `lfm_jax.generate.grid_labels`, which is also what `labels=None` means here). Defaults come
from the run's own config. `run.encode(images)` gives the latents the velocity network sees
(scale factor applied), `run.decode(latents)` maps them back to images.
"""

from typing import Optional, Sequence, Union

import numpy as np

from lfm_jax import artifacts
from lfm_jax import config_validation
from lfm_jax import generate
from lfm_jax import parallel
from lfm_jax import storage
from lfm_jax import workdir as workdir_lib


class Run:
  """A trained model with its autoencoder and config (see the module docstring)."""

  def __init__(self, model: artifacts.FlowModel, autoencoder: artifacts.Autoencoder, config,
               path: str):
    self.model, self.autoencoder, self.config, self.path = model, autoencoder, config, path

  def __repr__(self) -> str:
    return (f"lfm_jax.Run({self.path!r}: {self.config.model.name}, latents {self.model.latent_shape},"
            f" {self.model.num_classes} classes)")

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  def sample(self, num_samples: int, *, labels: Optional[Sequence[int]] = None, seed: int = 0,
             solver: Optional[str] = None, num_steps: Optional[int] = None,
             guidance_scale: Optional[float] = None, light: Union["Run", str, None] = None,
             light_fraction: Optional[float] = None, batch_size: Optional[int] = None,
             start_index: int = 0) -> np.ndarray:
    """(num_samples, H, W, C) float32 images in [-1, 1] (samples start_index, ...).

    labels: one per sample (class-conditional models; default: class-major rows). light: a Run
    or path of a light model for coarse-to-fine sampling (light_fraction of the trajectory).
    """
    settings = generate.SamplerSettings.from_config(
        self.config, solver=solver, num_steps=num_steps, guidance_scale=guidance_scale,
        light_fraction=light_fraction)
    if labels is None:
      labels = generate.grid_labels(num_samples, self.num_classes)
    elif self.num_classes:
      labels = np.asarray(labels, np.int32)
      if labels.shape != (num_samples,):
        raise ValueError(f"labels: need {num_samples} labels, got shape {labels.shape}")
    light_model = None
    if light is not None:
      light_model = (light if isinstance(light, Run) else load(light)).model
    out = generate.generate(
        self.model, self.autoencoder, int(num_samples), settings=settings, seed=int(seed),
        batch_size=int(batch_size or self.config.sample.batch_size), labels=labels,
        light=light_model, start_index=start_index, keep_latents=False)
    return out.images

  def encode(self, images) -> np.ndarray:
    """Images (N, H, W, C) in [-1, 1] -> latents (N, h, w, c) * scale factor (posterior mean)."""
    mean, _ = self.autoencoder.encode(np.asarray(images, np.float32))
    return np.asarray(parallel.to_host(mean)) * self.model.scale_factor

  def decode(self, latents) -> np.ndarray:
    """Latents (scale factor applied, as `encode` returns) -> images in [-1, 1]."""
    z = np.asarray(latents, np.float32) / self.model.scale_factor
    return np.asarray(parallel.to_host(self.autoencoder.decode(z)))


def load(path: Union[str, "storage.PathLike"], *, use_ema: Optional[bool] = None) -> Run:
  """A Run from a workdir (its latest checkpoint, its autoencoder) or an export directory."""
  if artifacts.is_export(path):
    model, ae, _ = artifacts.load_exported(path)
    config_path = storage.path(path) / workdir_lib.CONFIG
    if not config_path.exists():
      raise artifacts.ArtifactError(f"{storage.display(path)}: the export has no config.json")
    config = config_validation.config_from_dict(storage.read_json(config_path))
    return Run(model, ae, config, storage.display(path))
  wd = workdir_lib.Workdir(path)
  if not wd.exists():
    raise artifacts.ArtifactError(f"{wd} is neither an lfm_jax workdir (no config.json) nor an "
                                  f"export ({artifacts.EXPORT_MANIFEST})")
  config = wd.read_config()
  use_ema = bool(config.sample.use_ema) if use_ema is None else use_ema
  if wd.latest_step() is None and config.model.init_from:
    model = artifacts.imported_flow_model(config, wd)
  else:
    model = artifacts.load_flow_model(wd, use_ema=use_ema)
  return Run(model, artifacts.load_autoencoder(config, wd), config, str(wd))


__all__ = ["Run", "load"]
