"""ADM U-Net (guided-diffusion `UNetModel`, as LFM and torchcfm use it) in Flax Linen, NHWC.

Parameter tree mirrors the PyTorch state dict so conversion is mechanical: a Flax module name
`a_3_b` is the torch path `a.3.b` (every `_<digits>` component is a sequence index), e.g.
`input_blocks_1_0/in_layers_2/kernel` <-> `input_blocks.1.0.in_layers.2.weight`,
`time_embed_0`, `label_emb`, `middle_block_1/qkv`, `output_blocks_5_2/conv`, `out_2`.
GroupNorm params are `scale`/`bias` (torch weight/bias), conv kernels HWIO (torch OIHW),
dense kernels (in, out) (torch weight.T; the attention qkv / proj_out are torch Conv1d(k=1)).

Time: raw t in [0, 1] through the guided-diffusion sinusoidal embedding (max_period 10000).
Labels: y in [0, num_classes]; index num_classes is the null label (classifier-free guidance).
With `learn_null_class=True` the table has num_classes + 1 rows; with False it has num_classes
rows and the null label contributes a zero embedding (a converted guided-diffusion checkpoint).

Precision: `dtype` (default float32) is the compute dtype of activations, matmuls and
convolutions; parameters are float32 whatever it is; GroupNorm statistics and the attention
softmax are computed in float32; the output is float32. `remat` ("none", "blocks" or a
`jax.checkpoint_policies` name) rematerialises every ResBlock and AttentionBlock in the backward
pass with the same parameter tree.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lfm_jax.models.layers import (Conv, GroupNorm, broadcast_time, dense,
                                   dot_product_attention, maybe_remat,
                                   timestep_embedding)


def _avg_pool2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample_nearest2(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def norm_groups(channels: int, num_groups: int = 32, min_channels_per_group: int = 0) -> int:
  """The group count asked of GroupNorm for `channels` (it then takes the largest divisor).

  min_channels_per_group 0: num_groups (guided-diffusion: always 32); > 0: EDM's rule
  min(num_groups, channels // min_channels_per_group), e.g. 8 groups for 32 channels with 4.
  """
  if min_channels_per_group > 0:
    return max(1, min(num_groups, channels // min_channels_per_group))
  return num_groups


class ResBlock(nn.Module):
  """guided-diffusion ResBlock (in_layers, emb_layers, out_layers, skip_connection)."""

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  up: bool = False
  down: bool = False
  norm_num_groups: int = 32
  norm_min_channels_per_group: int = 0
  small_map_threshold: int = 8
  dtype: Any = None

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    ch = x.shape[-1]
    out = self.out_channels
    conv = lambda feats, name, **kw: Conv(feats, small_map_threshold=self.small_map_threshold,
                                          dtype=self.dtype, name=name, **kw)
    groups = lambda c: norm_groups(c, self.norm_num_groups, self.norm_min_channels_per_group)
    h = GroupNorm(groups(ch), name="in_layers_0")(x, silu=True)
    if self.up:
      h, x = _upsample_nearest2(h), _upsample_nearest2(x)
    elif self.down:
      h, x = _avg_pool2(h), _avg_pool2(x)
    h = conv(out, "in_layers_2")(h)
    emb_out = dense(2 * out if self.use_scale_shift_norm else out, "emb_layers_1",
                    dtype=self.dtype)(nn.silu(emb))
    emb_out = emb_out[:, None, None, :].astype(h.dtype)
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = GroupNorm(groups(out), name="out_layers_0")(h, scale, shift, silu=True)
    else:
      h = GroupNorm(groups(out), name="out_layers_0")(h + emb_out, silu=True)
    h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(h)
    h = conv(out, "out_layers_3", kernel_init=nn.initializers.zeros)(h)
    if out != ch:
      x = conv(out, "skip_connection", kernel_size=(1, 1))(x)
    return x + h


class AttentionBlock(nn.Module):
  """guided-diffusion AttentionBlock: norm, qkv (Conv1d k=1), attention, proj_out (zero).

  The 3C qkv outputs are ordered [head][q, k, v][channel] (QKVAttentionLegacy, the ADM
  default) or, with use_new_attention_order, [q, k, v][head][channel] (QKVAttention); EDM's
  [head][channel][q, k, v] is permuted into the first by the converter. Attention runs through
  `layers.dot_product_attention` on (B, HW, heads, C / heads) with scale 1/sqrt(C / heads).
  """

  num_heads: int = 1
  num_head_channels: int = -1
  use_new_attention_order: bool = False  # False: QKVAttentionLegacy (the ADM default)
  norm_num_groups: int = 32
  norm_min_channels_per_group: int = 0
  dtype: Any = None
  attention_implementation: Optional[str] = None  # None | "xla" | "cudnn"

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    heads = self.num_heads if self.num_head_channels == -1 else c // self.num_head_channels
    if c % heads:
      raise ValueError(f"attention channels {c} not divisible by {heads} heads")
    ch = c // heads
    hn = GroupNorm(norm_groups(c, self.norm_num_groups, self.norm_min_channels_per_group),
                   name="norm")(x).reshape(b, hh * ww, c)
    qkv = dense(3 * c, "qkv", dtype=self.dtype)(hn)
    if self.use_new_attention_order:
      qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    a = dot_product_attention(q, k, v, scale=ch ** -0.5,
                              implementation=self.attention_implementation)
    a = a.reshape(b, hh * ww, c)
    a = dense(c, "proj_out", zero=True, dtype=self.dtype)(a)
    return x + a.reshape(b, hh, ww, c).astype(x.dtype)


class Downsample(nn.Module):
  use_conv: bool = True
  small_map_threshold: int = 8
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    if self.use_conv:
      return Conv(x.shape[-1], strides=(2, 2), padding=1, dtype=self.dtype,
                  small_map_threshold=self.small_map_threshold, name="op")(x)
    return _avg_pool2(x)


class Upsample(nn.Module):
  use_conv: bool = True
  small_map_threshold: int = 8
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = _upsample_nearest2(x)
    if self.use_conv:
      x = Conv(x.shape[-1], dtype=self.dtype, small_map_threshold=self.small_map_threshold,
               name="conv")(x)
    return x


class UNet(nn.Module):
  """ADM U-Net velocity network. `__call__(x, t, y=None, cond=None, train=False) -> v`.

  attention_resolutions: with attention_semantics "downsample" (guided-diffusion UNetModel) the
  entries are downsample factors ds (1, 2, 4, ...); with "resolution" (EDM) they are feature-map
  sizes (H // ds). The middle block always has attention in ADM (`mid_attention=True`).
  """

  model_channels: int = 128
  channel_mult: Sequence[float] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()
  attention_semantics: str = "downsample"  # downsample | resolution
  num_heads: int = 4
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  dropout: float = 0.0
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  conv_resample: bool = True
  use_new_attention_order: bool = False
  mid_attention: bool = True
  num_classes: int = 0
  learn_null_class: bool = True
  extra_in_channels: int = 0
  out_channels: Optional[int] = None  # None: x's channel count
  norm_num_groups: int = 32
  norm_min_channels_per_group: int = 0  # > 0: groups = min(norm_num_groups, C // this) (EDM: 4)
  small_map_threshold: int = 8
  dtype: Any = jnp.float32  # compute dtype; params stay float32
  remat: str = "none"  # none | blocks | a jax.checkpoint_policies name (layers.REMAT_CHOICES)
  attention_implementation: Optional[str] = None  # None | "xla" | "cudnn" (layers.ATTENTION_...)

  def _has_attention(self, ds: int, resolution: int) -> bool:
    if self.attention_semantics == "downsample":
      return ds in tuple(self.attention_resolutions)
    if self.attention_semantics == "resolution":
      return resolution in tuple(self.attention_resolutions)
    raise ValueError(f"attention_semantics must be 'downsample' or 'resolution', got "
                     f"{self.attention_semantics!r}")

  @nn.compact
  def __call__(self, x, t, y=None, cond=None, train: bool = False):
    b, height, _, in_ch = x.shape
    out_ch = self.out_channels or in_ch
    mc = self.model_channels
    emb_dim = 4 * mc
    kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
              norm_num_groups=self.norm_num_groups,
              norm_min_channels_per_group=self.norm_min_channels_per_group,
              small_map_threshold=self.small_map_threshold, dtype=self.dtype)
    heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    attn_kw = dict(num_head_channels=self.num_head_channels,
                   use_new_attention_order=self.use_new_attention_order,
                   norm_num_groups=self.norm_num_groups,
                   norm_min_channels_per_group=self.norm_min_channels_per_group, dtype=self.dtype,
                   attention_implementation=self.attention_implementation)
    # Rematerialised blocks keep their explicit names, hence the parameter tree; `train`
    # (argument 3 counting self) is static.
    res_block = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    attn_block = maybe_remat(AttentionBlock, self.remat)

    t = broadcast_time(t, b)
    emb = dense(emb_dim, "time_embed_0", dtype=self.dtype)(timestep_embedding(t, mc))
    emb = dense(emb_dim, "time_embed_2", dtype=self.dtype)(nn.silu(emb))
    if self.num_classes > 0:
      if y is None:
        y = jnp.full((b,), self.num_classes, jnp.int32)
      y = jnp.asarray(y, jnp.int32).reshape(b)
      rows = self.num_classes + 1 if self.learn_null_class else self.num_classes
      table = nn.Embed(rows, emb_dim, embedding_init=nn.initializers.normal(1.0),
                       name="label_emb")
      if self.learn_null_class:
        emb = emb + table(y).astype(emb.dtype)
      else:
        is_null = (y >= self.num_classes)[:, None]
        lab = table(jnp.minimum(y, self.num_classes - 1)).astype(emb.dtype)
        emb = emb + jnp.where(is_null, jnp.zeros_like(lab), lab)

    if self.extra_in_channels:
      if cond is None:
        raise ValueError(f"this UNet expects cond with {self.extra_in_channels} channels")
      if cond.shape[-1] != self.extra_in_channels:
        raise ValueError(f"cond has {cond.shape[-1]} channels, expected "
                         f"{self.extra_in_channels}")
      h = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    elif cond is not None:
      raise ValueError("cond given but extra_in_channels == 0")
    else:
      h = x
    if self.dtype is not None:
      h = h.astype(self.dtype)

    ch = input_ch = int(self.channel_mult[0] * mc)
    h = Conv(ch, dtype=self.dtype, small_map_threshold=self.small_map_threshold,
             name="input_blocks_0_0")(h)
    hs = [h]
    ds, idx = 1, 1
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * mc)
        h = res_block(ch, name=f"input_blocks_{idx}_0", **kw)(h, emb, train)
        if self._has_attention(ds, height // ds):
          h = attn_block(self.num_heads, name=f"input_blocks_{idx}_1", **attn_kw)(h)
        hs.append(h)
        idx += 1
      if level != last:
        if self.resblock_updown:
          h = res_block(ch, down=True, name=f"input_blocks_{idx}_0", **kw)(h, emb, train)
        else:
          h = Downsample(self.conv_resample, self.small_map_threshold, self.dtype,
                         name=f"input_blocks_{idx}_0")(h)
        hs.append(h)
        idx += 1
        ds *= 2

    h = res_block(ch, name="middle_block_0", **kw)(h, emb, train)
    if self.mid_attention:
      h = attn_block(self.num_heads, name="middle_block_1", **attn_kw)(h)
    h = res_block(ch, name=f"middle_block_{2 if self.mid_attention else 1}", **kw)(h, emb, train)

    idx = 0
    for level, mult in list(enumerate(self.channel_mult))[::-1]:
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        ch = int(mc * mult)
        h = res_block(ch, name=f"output_blocks_{idx}_0", **kw)(h, emb, train)
        j = 1
        if self._has_attention(ds, height // ds):
          h = attn_block(heads_up, name=f"output_blocks_{idx}_{j}", **attn_kw)(h)
          j += 1
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res_block(ch, up=True, name=f"output_blocks_{idx}_{j}", **kw)(h, emb, train)
          else:
            h = Upsample(self.conv_resample, self.small_map_threshold, self.dtype,
                         name=f"output_blocks_{idx}_{j}")(h)
          ds //= 2
        idx += 1

    assert ch == input_ch
    out_groups = norm_groups(ch, self.norm_num_groups, self.norm_min_channels_per_group)
    h = GroupNorm(out_groups, name="out_0")(h, silu=True)
    h = Conv(out_ch, kernel_init=nn.initializers.zeros, dtype=self.dtype,
             small_map_threshold=self.small_map_threshold, name="out_2")(h)
    return h.astype(jnp.float32)
