"""First-stage KL autoencoder (AutoencoderKL), Flax Linen, NHWC.

Architecture and parameter tree mirror diffusers' `AutoencoderKL` (Stable Diffusion's KL-f8 by
default), so a diffusers state-dict key maps to a Flax path by replacing `.<i>` with `_<i>`
(`encoder.down_blocks.0.resnets.1.conv1.weight` -> `encoder/down_blocks_0/resnets_1/conv1/kernel`)
and transposing NCHW kernels to HWIO (lfm_jax/converters/autoencoder_kl.py does this).

Tiny maps: XLA's CPU convolution is pathologically slow below ~8x8, so 3x3 convolutions on small
maps run as patch extraction + one matrix multiply, with the same `kernel` (3, 3, in, out) / `bias`
parameters as a normal conv (numerically the same operation). The downsampler matches diffusers /
LDM exactly: zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv; on small maps it is
computed as strided patch extraction (space-to-depth) + a dense layer. Upsampling is nearest x2 then
a 3x3 conv, as in diffusers.

Precision: `dtype` (default float32) is the compute dtype of activations and convolutions;
parameters are float32 whatever it is; GroupNorm statistics and the mid-block attention's
softmax are computed in float32; `encode` and `decode` return float32.
"""

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from lfm_jax.models.layers import GroupNorm, dot_product_attention

Array = jax.Array

# Maps whose smaller spatial side is below this use the patch + matmul path.
SMALL_MAP_THRESHOLD = 8
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _patches(x: Array, stride: int) -> Array:
  """3x3 patches of an already padded NHWC map: (B, Ho, Wo, 9 * C), (dy, dx, c) order."""
  _, h, w, _ = x.shape
  ho = (h - 3) // stride + 1
  wo = (w - 3) // stride + 1
  cols = []
  for dy in range(3):
    for dx in range(3):
      cols.append(
          jax.lax.slice(
              x,
              (0, dy, dx, 0),
              (x.shape[0], dy + stride * (ho - 1) + 1, dx + stride * (wo - 1) + 1, x.shape[3]),
              (1, stride, stride, 1),
          ))
  return jnp.concatenate(cols, axis=-1)


def conv3x3(x: Array, kernel: Array, bias: Optional[Array], *, stride: int = 1,
            padding: Tuple[Tuple[int, int], Tuple[int, int]] = ((1, 1), (1, 1)),
            small_map_threshold: int = SMALL_MAP_THRESHOLD) -> Array:
  """A 3x3 conv, NHWC x, HWIO kernel, explicit padding; patch+matmul on small maps.

  Equal (to float rounding) to `lax.conv_general_dilated(x, kernel, (stride,)*2, padding)`.
  """
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - 3) // stride + 1
  wo = (xp.shape[2] - 3) // stride + 1
  if min(ho, wo) < small_map_threshold:
    p = _patches(xp, stride)
    y = jnp.einsum("bhwk,ko->bhwo", p, kernel.reshape(-1, kernel.shape[-1]))
  else:
    y = jax.lax.conv_general_dilated(
        xp, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  if bias is not None:
    y = y + bias
  return y


class Conv(nn.Module):
  """Conv2d with torch-like parameters (`kernel` HWIO, `bias`); 1x1 or 3x3.

  padding: "same" (1 on every side for 3x3), or "down" (diffusers' Downsample2D: pad (0, 1, 0, 1)
  then VALID), with `stride` 1 or 2.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "same"
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    bias = bias.astype(self.dtype)
    if k == 1:
      assert self.stride == 1
      return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0]) + bias
    assert k == 3, "only 1x1 and 3x3 convolutions are used"
    pad = ((1, 1), (1, 1)) if self.padding == "same" else ((0, 1), (0, 1))
    return conv3x3(x, kernel, bias, stride=self.stride, padding=pad,
                   small_map_threshold=self.small_map_threshold)


def _group_norm(groups: int, name: str) -> GroupNorm:
  """GroupNorm (eps 1e-6, params scale/bias); call with silu=True for the fused GroupNorm+SiLU."""
  return GroupNorm(num_groups=groups, epsilon=1e-6, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding (LDM ResnetBlock with temb_channels=0)."""
  out_channels: int
  groups: int
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t, dt = self.small_map_threshold, self.dtype
    h = _group_norm(self.groups, "norm1")(x, silu=True)
    h = Conv(self.out_channels, 3, small_map_threshold=t, dtype=dt, name="conv1")(h)
    h = _group_norm(self.groups, "norm2")(h, silu=True)
    h = Conv(self.out_channels, 3, small_map_threshold=t, dtype=dt, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, dtype=dt, name="conv_shortcut")(x)
    return x.astype(h.dtype) + h


class Attention(nn.Module):
  """Single-head spatial self-attention with residual (diffusers' mid-block Attention).

  Attention through `layers.dot_product_attention` on (B, HW, 1, C), scale 1/sqrt(C).
  """
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(self.groups, "group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(y)
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(y)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(y)
    heads = lambda a: a.reshape(b, h * w, 1, c)
    o = dot_product_attention(heads(q), heads(k), heads(v), scale=c ** -0.5)
    o = nn.Dense(c, dtype=self.dtype, name="to_out_0")(o.reshape(b, h * w, c))
    return x.astype(o.dtype) + o.reshape(b, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool = True
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t, dt = self.small_map_threshold, self.dtype
    x = ResnetBlock(self.channels, self.groups, t, dt, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, dt, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, t, dt, name="resnets_1")(x)


class _Sampler(nn.Module):
  """Holds a single `conv` like diffusers' Downsample2D / Upsample2D."""
  channels: int
  up: bool
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t, dt = self.small_map_threshold, self.dtype
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return Conv(self.channels, 3, small_map_threshold=t, dtype=dt, name="conv")(x)
    return Conv(self.channels, 3, stride=2, padding="down", small_map_threshold=t, dtype=dt,
                name="conv")(x)


class _Block(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D."""
  out_channels: int
  num_layers: int
  groups: int
  resample: Optional[str]  # None | "down" | "up"
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t, dt = self.small_map_threshold, self.dtype
    for j in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.groups, t, dt, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = _Sampler(self.out_channels, False, t, dt, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = _Sampler(self.out_channels, True, t, dt, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int  # 2 * latent_channels
  groups: int
  attention: bool
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    t, dt = self.small_map_threshold, self.dtype
    chans = tuple(self.block_out_channels)
    x = Conv(chans[0], 3, small_map_threshold=t, dtype=dt, name="conv_in")(x)
    for i, c in enumerate(chans):
      last = i == len(chans) - 1
      x = _Block(c, self.layers_per_block, self.groups, None if last else "down", t, dt,
                 name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], self.groups, self.attention, t, dt, name="mid_block")(x)
    x = _group_norm(self.groups, "conv_norm_out")(x, silu=True)
    return Conv(self.out_channels, 3, small_map_threshold=t, dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  attention: bool
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    t, dt = self.small_map_threshold, self.dtype
    rev = tuple(reversed(tuple(self.block_out_channels)))
    x = Conv(rev[0], 3, small_map_threshold=t, dtype=dt, name="conv_in")(z)
    x = MidBlock(rev[0], self.groups, self.attention, t, dt, name="mid_block")(x)
    for i, c in enumerate(rev):
      last = i == len(rev) - 1
      x = _Block(c, self.layers_per_block + 1, self.groups, None if last else "up", t, dt,
                 name=f"up_blocks_{i}")(x)
    x = _group_norm(self.groups, "conv_norm_out")(x, silu=True)
    return Conv(self.out_channels, 3, small_map_threshold=t, dtype=dt, name="conv_out")(x)


def sample_posterior(rng: Array, mean: Array, logvar: Array) -> Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I). Pure and jittable."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps)


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(q(z|x) || N(0, I)) summed over H, W, C per example (as diffusers / LDM)."""
  return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


_sample_posterior = sample_posterior  # the method argument below shadows the name


class AutoencoderKL(nn.Module):
  """diffusers-compatible AutoencoderKL. Defaults: Stable Diffusion's KL-f8.

  Methods (all usable with `module.apply({"params": p}, x, method=module.<name>)`):
    encode(x) -> (mean, logvar)      x: (B, H, W, in_channels) in [-1, 1]; logvar in [-30, 20]
    decode(z) -> x                   z: (B, H/f, W/f, latent_channels), unscaled latent
    __call__(x, rng=None, sample_posterior=None) -> (reconstruction, mean, logvar)
  Outputs are float32; `dtype` is the compute dtype (params stay float32).
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  small_map_threshold: int = SMALL_MAP_THRESHOLD
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @classmethod
  def from_config(cls, ae_config, in_channels: Optional[int] = None,
                  out_channels: Optional[int] = None, *, dtype: Any = jnp.float32,
                  **overrides) -> "AutoencoderKL":
    """Builds the module from `config.autoencoder` (configs/default.py).

    The image channel count is not an autoencoder key in the schema: pass `in_channels`
    (normally `config.data.channels`), else `ae_config.in_channels` if present, else 3.
    dtype: the compute dtype (jnp.float32 or jnp.bfloat16); parameters stay float32.
    """
    get = ae_config.get if hasattr(ae_config, "get") else lambda k, d=None: getattr(ae_config, k, d)
    if in_channels is None:
      in_channels = get("in_channels", None) or 3
    if out_channels is None:
      out_channels = get("out_channels", None) or in_channels
    kwargs = dict(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        block_out_channels=tuple(int(c) for c in get("block_out_channels")),
        layers_per_block=int(get("layers_per_block")),
        latent_channels=int(get("latent_channels")),
        norm_num_groups=int(get("norm_num_groups")),
        mid_block_attention=bool(get("attention", True)),
        dtype=dtype,
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    t, dt = self.small_map_threshold, self.dtype
    self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                           2 * self.latent_channels, self.norm_num_groups,
                           self.mid_block_attention, t, dt)
    self.decoder = Decoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.out_channels, self.norm_num_groups, self.mid_block_attention, t,
                           dt)
    if self.use_quant_conv:
      self.quant_conv = Conv(2 * self.latent_channels, 1, dtype=dt)
    if self.use_post_quant_conv:
      self.post_quant_conv = Conv(self.latent_channels, 1, dtype=dt)

  def encode(self, x: Array) -> Tuple[Array, Array]:
    h = self.encoder(x)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: Array) -> Array:
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array, rng: Optional[Array] = None,
               sample_posterior: Optional[bool] = None):
    """Reconstruction for training. sample_posterior None: sample iff `rng` is given."""
    mean, logvar = self.encode(x)
    if sample_posterior is None:
      sample_posterior = rng is not None
    if sample_posterior:
      if rng is None:
        raise ValueError("sample_posterior=True needs an rng")
      z = _sample_posterior(rng, mean, logvar)
    else:
      z = mean
    return self.decode(z), mean, logvar
