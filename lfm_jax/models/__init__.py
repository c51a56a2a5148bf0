"""Velocity networks: `create_model(config.model, latent_shape, dtype=...)` builds a U-Net or a DiT.

Both take `(x, t, y=None, cond=None, train=False)` (NHWC latents, raw t in [0, 1] in LFM's
convention: t = 0 data, t = 1 noise) and return the velocity with x's shape.

`model.time_convention = "sit"` wraps the network so that a model trained in SiT's convention
(t = 0 noise, t = 1 data) is seen by the rest of the code in LFM's convention:
v_LFM(x, t) = -v_SiT(x, 1 - t).

Accelerator knobs: `dtype` (create_model's keyword; float32 default, bfloat16 for mixed
precision with float32 params), `model.remat` (rematerialised blocks, layers.REMAT_CHOICES) and
`model.attention_implementation` (None/"xla"/"cudnn", passed to jax.nn.dot_product_attention).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax.config_validation import with_defaults
from lfm_jax.models.layers import ATTENTION_IMPLEMENTATIONS, REMAT_CHOICES, remat_policy
from lfm_jax.models.unet import UNet

__all__ = ["UNet", "DiT", "SiTConventionWrapper", "create_model", "count_params",
           "DIT_PRESETS", "dit_config", "unwrap", "with_compute_options", "REMAT_CHOICES",
           "ATTENTION_IMPLEMENTATIONS"]


def __getattr__(name):
  if name in ("DiT", "DIT_PRESETS", "dit_config"):
    from lfm_jax.models import dit
    return getattr(dit, name)
  raise AttributeError(f"module 'lfm_jax.models' has no attribute {name!r}")


class SiTConventionWrapper(nn.Module):
  """Presents a SiT-convention network (t = 0 noise) in LFM's convention (t = 0 data).

  v_LFM(x, t) = -v_SiT(x, 1 - t). The wrapped network's params live under `inner`.
  """

  inner: nn.Module

  def __call__(self, x, t, y=None, cond=None, train: bool = False):
    t = jnp.asarray(t, jnp.float32)
    return -self.inner(x, 1.0 - t, y=y, cond=cond, train=train)


def unwrap(module: nn.Module) -> nn.Module:
  """The bare network inside any time-convention wrapper."""
  while isinstance(module, SiTConventionWrapper):
    module = module.inner
  return module


def _ints(value) -> tuple:
  """(16, 8), [16, 8], "16,8", 16 or None -> a tuple of ints."""
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
  if isinstance(value, (int, np.integer)):
    return (int(value),)
  return tuple(int(v) for v in value)


def _compute_options(m, dtype) -> dict:
  """dtype, remat and attention_implementation of a complete model section `m` (with_defaults),
  checked (one-line ValueErrors)."""
  remat = m.remat
  remat_policy(remat)  # a bad name fails here, before any trace
  attention = m.attention_implementation
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention_implementation must be one of "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
  return dict(dtype=dtype, remat=remat, attention_implementation=attention)


def with_compute_options(module: nn.Module, model_config=None, *,
                         dtype: Any = jnp.float32) -> nn.Module:
  """`module` (a UNet or DiT, possibly time-convention wrapped) with the dtype, `model.remat`
  and `model.attention_implementation` of `model_config` (None: no remat, default attention).

  For networks not built by create_model (an imported checkpoint's module); the parameter tree
  is unchanged.
  """
  if isinstance(module, SiTConventionWrapper):
    return module.clone(inner=with_compute_options(module.inner, model_config, dtype=dtype))
  return module.clone(**_compute_options(with_defaults("model", model_config), dtype))


def _build(m, dtype=jnp.float32) -> nn.Module:
  """The network of a complete model section `m` (with_defaults)."""
  accel = _compute_options(m, dtype)
  if m.name == "unet":
    return UNet(
        model_channels=int(m.model_channels), channel_mult=tuple(m.channel_mult),
        num_res_blocks=int(m.num_res_blocks),
        attention_resolutions=_ints(m.attention_resolutions),
        attention_semantics=m.attention_semantics, num_heads=int(m.num_heads),
        num_head_channels=int(m.num_head_channels),
        num_heads_upsample=int(m.num_heads_upsample), dropout=float(m.dropout),
        use_scale_shift_norm=bool(m.use_scale_shift_norm),
        resblock_updown=bool(m.resblock_updown),
        use_new_attention_order=bool(m.use_new_attention_order),
        mid_attention=bool(m.mid_attention), num_classes=int(m.num_classes),
        learn_null_class=bool(m.learn_null_class), extra_in_channels=int(m.extra_in_channels),
        norm_num_groups=int(m.norm_num_groups),
        norm_min_channels_per_group=int(m.norm_min_channels_per_group),
        **accel,
    )
  if m.name == "dit":
    from lfm_jax.models.dit import DiT, dit_config
    kw = dict(dit_config(m.dit_preset)) if m.dit_preset else {}
    # Explicit keys override the preset; num_heads (shared with the U-Net, default 4) only
    # counts when no preset is given.
    for key in ("hidden_size", "depth", "patch_size", "mlp_ratio") + (
        () if m.dit_preset else ("num_heads",)):
      if m[key] is not None:
        kw[key] = m[key]
    missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if k not in kw]
    if missing:
      raise ValueError(f"model.dit_preset is not set and DiT keys are missing: "
                       f"{['model.' + k for k in missing]}")
    return DiT(num_classes=int(m.num_classes), extra_in_channels=int(m.extra_in_channels), **kw,
               **accel)
  raise ValueError(f"model.name must be 'unet' or 'dit', got {m.name!r}")


def create_model(model_config, latent_shape: Optional[Sequence[int]] = None, *,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds the velocity network described by `config.model` (an ml_collections ConfigDict).

  latent_shape (H, W, C) is only used for validation (DiT needs H, W divisible by the patch).
  dtype: the compute dtype of activations, matmuls and convolutions (jnp.float32 or
  jnp.bfloat16); parameters are float32 either way, normalisations and softmax run in float32,
  and the network returns float32.
  model_config may also be a plain dict (a checkpoint's saved config) or None: it is laid over
  configs/default.py's model section, which documents every key (config_validation.with_defaults).
  DiT: dit_preset ("S/2", ... "XL/8"), with hidden_size, depth, patch_size, mlp_ratio overriding
  it (without a preset num_heads is read too). A bad model.remat or attention_implementation is
  a ValueError here, before any trace.
  """
  m = with_defaults("model", model_config)
  module = _build(m, dtype)
  if latent_shape is not None and m.name == "dit":
    p = module.patch_size
    if latent_shape[0] % p or latent_shape[1] % p:
      raise ValueError(f"latent shape {tuple(latent_shape)} not divisible by DiT patch {p}")
  if latent_shape is not None and m.name == "unet":
    levels = len(module.channel_mult) - 1
    if latent_shape[0] % (2 ** levels) or latent_shape[1] % (2 ** levels):
      raise ValueError(f"latent shape {tuple(latent_shape)} not divisible by 2**{levels} "
                       f"(model.channel_mult has {levels + 1} levels)")
  semantic_classes = int(m.semantic_classes)
  if semantic_classes:  # cond is a class map (models/semantic.py); params nest under "inner"
    from lfm_jax.models.semantic import SemanticConditioned
    module = SemanticConditioned(module, semantic_classes=semantic_classes)
  convention = m.time_convention
  if convention == "sit":
    module = SiTConventionWrapper(module)
  elif convention != "lfm":
    raise ValueError(f"model.time_convention must be 'lfm' or 'sit', got {convention!r}")
  return module


def count_params(model: nn.Module, latent_shape: Sequence[int], batch_size: int = 1,
                 with_labels: bool = True) -> int:
  """Number of parameters, from jax.eval_shape (nothing is allocated)."""
  h, w, c = latent_shape
  x = jax.ShapeDtypeStruct((batch_size, h, w, c), jnp.float32)
  t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  inner = unwrap(model)
  extra = getattr(inner, "extra_in_channels", 0)
  cond = jax.ShapeDtypeStruct((batch_size, h, w, extra), jnp.float32) if extra else None
  y = (jax.ShapeDtypeStruct((batch_size,), jnp.int32)
       if with_labels and getattr(inner, "num_classes", 0) else None)

  def init(x, t, y, cond):
    return model.init(jax.random.PRNGKey(0), x, t, y=y, cond=cond)

  shapes = jax.eval_shape(init, x, t, y, cond)
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes.get("params", {}))))
