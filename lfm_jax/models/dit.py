"""DiT (adaLN-Zero diffusion transformer, Peebles & Xie) in Flax Linen, NHWC, learn_sigma=False.

Parameter names mirror the facebook DiT state dict (Flax `a_3` <-> torch `a.3`):
`x_embedder/proj` (patch conv, kernel (p, p, C, D)), `t_embedder/mlp_0`, `t_embedder/mlp_2`,
`y_embedder/embedding_table`, `blocks_i/attn/qkv`, `blocks_i/attn/proj`, `blocks_i/mlp/fc1`,
`blocks_i/mlp/fc2`, `blocks_i/adaLN_modulation_1`, `final_layer/linear`,
`final_layer/adaLN_modulation_1`. The 2-D sin-cos positional embedding is fixed (a constant,
not a parameter; the torch `pos_embed` buffer is recomputed and checked by the converter).

Time: raw t in [0, 1] (LFM), sinusoidal embedding of size 256, max_period 10000.
Labels: the table has num_classes + 1 rows, the last (index num_classes) is the null label, as
facebook's LabelEmbedder with class dropout > 0. num_classes = 0 gives a one-row table (only the
null label: an unconditional model). LFM's unconditional checkpoints use num_classes = 1
(two rows; y=None -> row 1, the null row), which converts to num_classes = 1 here.

Precision: `dtype` (default float32) is the compute dtype of activations and matmuls (the
token stream included); parameters are float32 whatever it is; LayerNorm and the attention
softmax are computed in float32; the output is float32. `remat` ("none", "blocks" or a
`jax.checkpoint_policies` name) rematerialises every DiT block in the backward pass with the
same parameter tree.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lfm_jax.models.layers import (broadcast_time, dot_product_attention, maybe_remat,
                                   sincos_pos_embed_2d, timestep_embedding)

# name -> (depth, hidden_size, patch_size, num_heads), as facebook's DiT_models.
DIT_PRESETS = {}
for _size, (_depth, _hidden, _heads) in {"S": (12, 384, 6), "B": (12, 768, 12),
                                         "L": (24, 1024, 16), "XL": (28, 1152, 16)}.items():
  for _patch in (2, 4, 8):
    DIT_PRESETS[f"{_size}/{_patch}"] = dict(depth=_depth, hidden_size=_hidden,
                                            patch_size=_patch, num_heads=_heads)


def dit_config(name: str) -> dict:
  """Preset kwargs for DiT: "S/2", "DiT-B/4", "xl/8" ... -> {depth, hidden_size, patch_size,
  num_heads}."""
  key = name.upper().replace("DIT-", "").replace("DIT_", "").replace("_", "/")
  if key not in DIT_PRESETS:
    raise ValueError(f"unknown DiT preset {name!r}; known: {sorted(DIT_PRESETS)}")
  return dict(DIT_PRESETS[key])


xavier = nn.initializers.xavier_uniform()


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(x, eps=1e-6):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _dense(features, name, dtype, zero=False, init=xavier):
  return nn.Dense(features, kernel_init=nn.initializers.zeros if zero else init,
                  bias_init=nn.initializers.zeros, dtype=dtype, name=name)


class PatchEmbed(nn.Module):
  hidden_size: int
  patch_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch_size
    # Initialised like nn.Linear on the flattened patch (facebook DiT: xavier on w.view(D, -1)).
    fan_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                                out_axis=3)
    kernel = self.param("kernel", fan_init, (p, p, c, self.hidden_size), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), jnp.float32)
    dtype = self.dtype or x.dtype
    xp = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    xp = xp.reshape(b, (h // p) * (w // p), p * p * c).astype(dtype)
    y = xp @ kernel.reshape(p * p * c, self.hidden_size).astype(dtype)
    return y + bias.astype(dtype)


class TimestepEmbedder(nn.Module):
  hidden_size: int
  frequency_embedding_size: int = 256
  dtype: Any = None

  @nn.compact
  def __call__(self, t):
    init = nn.initializers.normal(0.02)
    e = timestep_embedding(t, self.frequency_embedding_size)
    e = _dense(self.hidden_size, "mlp_0", self.dtype, init=init)(e)
    return _dense(self.hidden_size, "mlp_2", self.dtype, init=init)(nn.silu(e))


class Attention(nn.Module):
  """timm Attention: qkv ordered [q, k, v][head][channel], scale 1/sqrt(head dim), proj."""

  num_heads: int
  dtype: Any = None
  attention_implementation: Optional[str] = None  # None | "xla" | "cudnn"

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = _dense(3 * d, "qkv", self.dtype)(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a = dot_product_attention(q, k, v, scale=hd ** -0.5,
                              implementation=self.attention_implementation)
    a = a.reshape(b, n, d)
    return _dense(d, "proj", self.dtype)(a)


class Mlp(nn.Module):
  hidden_features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    h = _dense(self.hidden_features, "fc1", self.dtype)(x)
    h = nn.gelu(h, approximate=True)
    return _dense(x.shape[-1], "fc2", self.dtype)(h)


class DiTBlock(nn.Module):
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = None
  attention_implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x, c):
    mod = _dense(6 * self.hidden_size, "adaLN_modulation_1", self.dtype, zero=True)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa[:, None] * Attention(self.num_heads, self.dtype,
                                          self.attention_implementation, name="attn")(
        _modulate(_layer_norm(x), shift_msa, scale_msa))
    x = x + gate_mlp[:, None] * Mlp(int(self.hidden_size * self.mlp_ratio), self.dtype,
                                    name="mlp")(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nn.Module):
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, c):
    mod = _dense(2 * self.hidden_size, "adaLN_modulation_1", self.dtype, zero=True)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = _modulate(_layer_norm(x), shift, scale)
    return _dense(self.patch_size ** 2 * self.out_channels, "linear", self.dtype, zero=True)(x)


class DiT(nn.Module):
  """adaLN-Zero DiT velocity network. `__call__(x, t, y=None, cond=None, train=False) -> v`."""

  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 2
  mlp_ratio: float = 4.0
  num_classes: int = 0
  extra_in_channels: int = 0
  out_channels: Any = None  # None: x's channel count (learn_sigma=False)
  frequency_embedding_size: int = 256
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: str = "none"  # none | blocks | a jax.checkpoint_policies name (layers.REMAT_CHOICES)
  attention_implementation: Optional[str] = None  # None | "xla" | "cudnn" (layers.ATTENTION_...)

  @nn.compact
  def __call__(self, x, t, y=None, cond=None, train: bool = False):
    b, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"input {h}x{w} not divisible by patch size {p}")
    if h != w:
      raise ValueError(f"DiT expects square inputs, got {h}x{w}")
    out_ch = self.out_channels or c
    if self.extra_in_channels:
      if cond is None or cond.shape[-1] != self.extra_in_channels:
        raise ValueError(f"this DiT expects cond with {self.extra_in_channels} channels")
      inp = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    elif cond is not None:
      raise ValueError("cond given but extra_in_channels == 0")
    else:
      inp = x
    tokens = _XEmbedder(self.hidden_size, p, self.dtype, name="x_embedder")(inp)
    pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, h // p))
    tokens = tokens + pos[None].astype(tokens.dtype)

    t = broadcast_time(t, b)
    temb = TimestepEmbedder(self.hidden_size, self.frequency_embedding_size, self.dtype,
                            name="t_embedder")(t)
    if y is None:
      y = jnp.full((b,), self.num_classes, jnp.int32)
    y = jnp.asarray(y, jnp.int32).reshape(b)
    yemb = _LabelEmbedder(self.num_classes, self.hidden_size, name="y_embedder")(y)
    cvec = temb + yemb.astype(temb.dtype)

    # A rematerialised block keeps its explicit name, hence the parameter tree.
    block = maybe_remat(DiTBlock, self.remat)
    for i in range(self.depth):
      tokens = block(self.hidden_size, self.num_heads, self.mlp_ratio, self.dtype,
                     self.attention_implementation, name=f"blocks_{i}")(tokens, cvec)
    out = FinalLayer(self.hidden_size, p, out_ch, self.dtype, name="final_layer")(tokens, cvec)
    hp, wp = h // p, w // p
    out = out.reshape(b, hp, wp, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, out_ch).astype(jnp.float32)


class _XEmbedder(nn.Module):
  """timm PatchEmbed: holds `proj` (the patch conv)."""

  hidden_size: int
  patch_size: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    return PatchEmbed(self.hidden_size, self.patch_size, self.dtype, name="proj")(x)


class _LabelEmbedder(nn.Module):
  num_classes: int
  hidden_size: int

  @nn.compact
  def __call__(self, y):
    return nn.Embed(self.num_classes + 1, self.hidden_size,
                    embedding_init=nn.initializers.normal(0.02), name="embedding_table")(y)
