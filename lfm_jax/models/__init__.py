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


def _get(cfg, key, default):
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)


def _ints(value) -> tuple:
  """(16, 8), [16, 8], "16,8", 16 or None -> a tuple of ints."""
  if value is None:
    return ()
  if isinstance(value, str):
    return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
  if isinstance(value, (int, np.integer)):
    return (int(value),)
  return tuple(int(v) for v in value)


def _compute_options(model_config, dtype) -> dict:
  """dtype, remat and attention_implementation of a network, checked (one-line ValueErrors)."""
  remat = _get(model_config, "remat", "none") or "none"  # model_config None: the defaults
  remat_policy(remat)  # a bad name fails here, before any trace
  attention = _get(model_config, "attention_implementation", None)
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
  return module.clone(**_compute_options(model_config, dtype))


def _build(model_config, latent_shape=None, dtype=jnp.float32) -> nn.Module:
  name = _get(model_config, "name", "unet")
  num_classes = int(_get(model_config, "num_classes", 0) or 0)
  extra = int(_get(model_config, "extra_in_channels", 0) or 0)
  accel = _compute_options(model_config, dtype)
  if name == "unet":
    return UNet(
        model_channels=int(_get(model_config, "model_channels", 128)),
        channel_mult=tuple(_get(model_config, "channel_mult", (1, 2, 2, 2))),
        num_res_blocks=int(_get(model_config, "num_res_blocks", 2)),
        attention_resolutions=_ints(_get(model_config, "attention_resolutions", ())),
        attention_semantics=_get(model_config, "attention_semantics", "resolution"),
        num_heads=int(_get(model_config, "num_heads", 4)),
        num_head_channels=int(_get(model_config, "num_head_channels", -1)),
        num_heads_upsample=int(_get(model_config, "num_heads_upsample", -1)),
        dropout=float(_get(model_config, "dropout", 0.0)),
        use_scale_shift_norm=bool(_get(model_config, "use_scale_shift_norm", True)),
        resblock_updown=bool(_get(model_config, "resblock_updown", False)),
        use_new_attention_order=bool(_get(model_config, "use_new_attention_order", False)),
        mid_attention=bool(_get(model_config, "mid_attention", True)),
        num_classes=num_classes,
        learn_null_class=bool(_get(model_config, "learn_null_class", True)),
        extra_in_channels=extra,
        norm_num_groups=int(_get(model_config, "norm_num_groups", 32)),
        norm_min_channels_per_group=int(_get(model_config, "norm_min_channels_per_group", 0)
                                        or 0),
        **accel,
    )
  if name == "dit":
    from lfm_jax.models.dit import DiT, dit_config
    preset = _get(model_config, "dit_preset", None)
    kw = dict(dit_config(preset)) if preset else {}
    # Explicit keys override the preset; num_heads (shared with the U-Net, default 4) only
    # counts when no preset is given.
    for key in ("hidden_size", "depth", "patch_size", "mlp_ratio") + (
        () if preset else ("num_heads",)):
      val = _get(model_config, key, None)
      if val is not None:
        kw[key] = val
    missing = [k for k in ("hidden_size", "depth", "num_heads", "patch_size") if k not in kw]
    if missing:
      raise ValueError(f"model.dit_preset is not set and DiT keys are missing: "
                       f"{['model.' + k for k in missing]}")
    return DiT(num_classes=num_classes, extra_in_channels=extra, **kw, **accel)
  raise ValueError(f"model.name must be 'unet' or 'dit', got {name!r}")


def create_model(model_config, latent_shape: Optional[Sequence[int]] = None, *,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds the velocity network described by `config.model` (an ml_collections ConfigDict).

  latent_shape (H, W, C) is only used for validation (DiT needs H, W divisible by the patch).
  dtype: the compute dtype of activations, matmuls and convolutions (jnp.float32 or
  jnp.bfloat16); parameters are float32 either way, normalisations and softmax run in float32,
  and the network returns float32.
  Keys read beyond configs/default.py (all optional, `.get` with defaults): dit_preset
  ("S/2", ... "XL/8"), hidden_size, depth, patch_size, mlp_ratio (override the preset; without
  a preset num_heads is read too), time_convention ("lfm" | "sit"), learn_null_class,
  mid_attention, use_new_attention_order, num_heads_upsample, norm_num_groups,
  norm_min_channels_per_group, remat ("none" | "blocks" | a jax.checkpoint_policies name; a bad
  name is a ValueError here), attention_implementation (None | "xla" | "cudnn").
  """
  module = _build(model_config, latent_shape, dtype)
  if latent_shape is not None and _get(model_config, "name", "unet") == "dit":
    p = module.patch_size
    if latent_shape[0] % p or latent_shape[1] % p:
      raise ValueError(f"latent shape {tuple(latent_shape)} not divisible by DiT patch {p}")
  if latent_shape is not None and _get(model_config, "name", "unet") == "unet":
    levels = len(module.channel_mult) - 1
    if latent_shape[0] % (2 ** levels) or latent_shape[1] % (2 ** levels):
      raise ValueError(f"latent shape {tuple(latent_shape)} not divisible by 2**{levels} "
                       f"(model.channel_mult has {levels + 1} levels)")
  semantic_classes = int(_get(model_config, "semantic_classes", 0) or 0)
  if semantic_classes:  # cond is a class map (models/semantic.py); params nest under "inner"
    from lfm_jax.models.semantic import SemanticConditioned
    module = SemanticConditioned(module, semantic_classes=semantic_classes)
  convention = _get(model_config, "time_convention", "lfm") or "lfm"
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
