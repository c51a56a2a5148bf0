"""PyTorch <-> Flax weight converters: the public entry points.

Every loader is strict: any missing, unexpected or mis-shaped key raises one error that lists
them all; nothing is silently left at random init. The implementations live in
`lfm_jax/converters/` (one module per network family); this module is the stable public face.

- `load_autoencoder_kl(path) -> (module, params)`: diffusers directory or LDM/SD single file.
- `export_autoencoder_kl(module, params, out_dir)`: back to the diffusers layout.
- `load_velocity_checkpoint(path, model_config) -> (module, params)`: LFM / stability-repo
  PyTorch velocity networks (guided-diffusion UNetModel, EDM DhariwalUNet, facebook DiT).
- `export_velocity_checkpoint(..., layout=None)`: back to a PyTorch layout ("guided_diffusion"
  or "edm_dhariwal" for a U-Net, "facebook_dit" for a DiT).
- `load_inception(path) -> (module, params)`: pytorch-fid's FID InceptionV3 weights.
- `export_pytorch(export_dir, path, layout=None)`: the velocity network of an lfm_jax export
  directory (`--mode=export`, lfm_jax.artifacts.export_model) in a PyTorch layout.
"""

import importlib

_EXPORTS = {
    "load_autoencoder_kl": "lfm_jax.converters.autoencoder_kl",
    "export_autoencoder_kl": "lfm_jax.converters.autoencoder_kl",
    "convert_autoencoder_kl_state_dict": "lfm_jax.converters.autoencoder_kl",
    "load_velocity_checkpoint": "lfm_jax.converters.velocity",
    "export_velocity_checkpoint": "lfm_jax.converters.velocity",
    "load_inception": "lfm_jax.converters.inception",
    "WeightConversionError": "lfm_jax.converters.common",
}


def export_pytorch(export_dir, path, layout=None):
  """Writes the velocity network of an lfm_jax export directory in a PyTorch layout (see
  export_velocity_checkpoint; the latent size comes from the export). Returns the state dict."""
  from lfm_jax import artifacts  # pylint: disable=g-import-not-at-top
  from lfm_jax.converters.velocity import export_velocity_checkpoint  # pylint: disable=g-import-not-at-top
  model, _, _ = artifacts.load_exported(export_dir)
  return export_velocity_checkpoint(model.module, model.params, path, layout=layout,
                                    latent_size=int(model.latent_shape[0]))

__all__ = sorted(_EXPORTS) + ["export_pytorch"]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'lfm_jax.weights' has no attribute {name!r}")
