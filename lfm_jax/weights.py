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

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'lfm_jax.weights' has no attribute {name!r}")
