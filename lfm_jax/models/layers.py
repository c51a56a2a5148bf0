"""Building blocks shared by the velocity networks (U-Net and DiT).

- `timestep_embedding`: guided-diffusion / GLIDE / DiT sinusoidal embedding ([cos, sin] halves,
  frequencies exp(-log(max_period) * i / half)). LFM feeds raw t in [0, 1].
- `Conv`: a 2-D convolution with PyTorch-style symmetric integer padding and parameters
  `kernel` (kh, kw, Cin, Cout) and `bias` (Cout,). On feature maps smaller than
  `small_map_threshold` it computes the same convolution as patch extraction + one matmul,
  because XLA's CPU convolution is pathologically slow on tiny maps. The
  parameters are identical on both paths, so converters never see the difference.
- `GroupNorm` / `group_norm_act`: GroupNorm computed in float32 (as guided-diffusion's
  GroupNorm32), eps 1e-5, group count clipped to divide the channel count (tiny test widths),
  fused with an optional per-sample scale-shift (ADM) and SiLU, with a two-pass custom VJP.
- `dot_product_attention`: multi-head attention on (B, T, N, H) q, k, v through
  `jax.nn.dot_product_attention` (logits and softmax in float32 for any input dtype).
- `remat_policy` / `maybe_remat`: `config.model.remat` ("none", "blocks" or a
  `jax.checkpoint_policies` name) -> a flax `nn.remat` of a block class (same param names).
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# `config.model.remat` values besides "none" and "blocks": the jax.checkpoint_policies entries
# that are policies themselves (the others are factories that take names or memory kinds).
_NAMED_REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                         "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                         "checkpoint_dots_with_no_batch_dims")
REMAT_CHOICES = ("none", "blocks") + tuple(
    n for n in _NAMED_REMAT_POLICIES if hasattr(jax.checkpoint_policies, n))
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")

# PyTorch's default init for conv / linear weights is kaiming_uniform(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (fractional) times t: (B,) -> (B, dim), [cos | sin] halves."""
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def broadcast_time(t, batch: int):
  """t as a (batch,) float32 array (a scalar or (1,) is broadcast)."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    t = jnp.full((batch,), t)
  t = t.reshape(-1)
  if t.shape[0] == 1 and batch != 1:
    t = jnp.broadcast_to(t, (batch,))
  return t


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups that divides channels (32 for ADM widths)."""
  g = max(1, min(max_groups, channels))
  while channels % g:
    g -= 1
  return g


def _group_stats(x, groups: int, eps: float):
  """Per-(sample, group) mean and 1/std of x (B, ..., C) float32 -> two (B, G) arrays.

  Two-pass (exact) statistics, each pass a per-(sample, channel) sum over the spatial axes
  followed by a tiny (B, C) -> (B, G) sum: XLA's CPU backend reduces over the spatial axes
  ~8x faster than over (spatial, channel-in-group) of a (B, HW, G, C/G) view.
  """
  b, c = x.shape[0], x.shape[-1]
  xr = x.reshape(b, -1, c)
  n = xr.shape[1] * (c // groups)
  mean = jnp.sum(xr, axis=1).reshape(b, groups, -1).sum(-1) / n
  centred = xr - _per_channel(mean, groups, c)[:, None, :]
  var = jnp.sum(jnp.square(centred), axis=1).reshape(b, groups, -1).sum(-1) / n
  return mean, jax.lax.rsqrt(var + eps)


# Name scope of the statistics expansion below (float32 by design, whatever the compute dtype).
PER_CHANNEL_SCOPE = "group_stats_per_channel"


def _per_channel(v, groups: int, c: int):
  """(B, G) -> (B, C): each group's value repeated over its channels.

  A matmul with the 0/1 group-membership matrix (exact: one nonzero term per output) rather
  than a repeat: XLA fuses a repeat's broadcast-reshape into every consumer, and the CPU
  backend then gathers per element instead of running a vectorised loop over channels.
  """
  member = np.kron(np.eye(groups, dtype=np.float32), np.ones((1, c // groups), np.float32))
  with jax.named_scope(PER_CHANNEL_SCOPE):
    return jnp.dot(v, member.astype(v.dtype), precision=jax.lax.Precision.HIGHEST)


def _expand(v, ndim: int):
  """(B, C) -> (B, 1, ..., 1, C) for broadcasting against (B, ..., C)."""
  return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def _gn_forward(x, weight, bias, groups, eps, silu):
  xf = x.astype(jnp.float32)
  mean, inv = _group_stats(xf, groups, eps)
  c = xf.shape[-1]
  inv_c, mean_c = _per_channel(inv, groups, c), _per_channel(mean, groups, c)
  # Normalisation and affine folded into one per-(sample, channel) multiply-add y = x·a + d.
  a = inv_c * weight
  d = bias - mean_c * a
  y = xf * _expand(a, xf.ndim) + _expand(d, xf.ndim)
  out = y * jax.nn.sigmoid(y) if silu else y
  return out.astype(x.dtype), (mean, inv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm_act(x, weight, bias, groups: int, eps: float = 1e-5, silu: bool = False):
  """act(GroupNorm(x) with per-sample affine): x (B, ..., C); weight, bias (B, C) float32.

  out = act(x̂ · weight + bias), x̂ normalised over (spatial, C/groups) per (sample, group) in
  float32, act = SiLU if `silu` else identity; output in x.dtype. A per-sample affine covers
  both a plain GroupNorm (weight = broadcast scale) and ADM's scale-shift modulation
  (weight = scale·(1 + s), bias = bias·(1 + s) + shift) in one elementwise pass.
  Custom VJP: the backward is two passes over x (per-(sample, channel) sums, then dx) instead
  of autodiff's chain of separate normalise / affine / SiLU / statistics gradients.
  """
  return _gn_forward(x, weight, bias, groups, eps, silu)[0]


def _gn_fwd(x, weight, bias, groups, eps, silu):
  out, (mean, inv) = _gn_forward(x, weight, bias, groups, eps, silu)
  return out, (x, weight, bias, mean, inv)


def _gn_bwd(groups, eps, silu, res, g):
  x, weight, bias, mean, inv = res
  xf = x.astype(jnp.float32)
  gf = g.astype(jnp.float32)
  nd, c = xf.ndim, xf.shape[-1]
  axes = tuple(range(1, nd - 1))
  inv_c, mean_c = _per_channel(inv, groups, c), _per_channel(mean, groups, c)
  xhat = xf * _expand(inv_c, nd) - _expand(mean_c * inv_c, nd)
  if silu:
    y = xhat * _expand(weight, nd) + _expand(bias, nd)
    sig = jax.nn.sigmoid(y)
    gf = gf * sig * (1.0 + y * (1.0 - sig))
  s1 = jnp.sum(gf, axis=axes)  # (B, C): d bias
  s2 = jnp.sum(gf * xhat, axis=axes)  # (B, C): d weight
  n = xf.size // (xf.shape[0] * groups)  # elements per (sample, group)
  ws1 = (weight * s1).reshape(-1, groups, c // groups).sum(-1) / n  # (B, G)
  ws2 = (weight * s2).reshape(-1, groups, c // groups).sum(-1) / n
  # dx = inv·(g·w − mean_g(g·w) − x̂·mean_g(g·w·x̂)), as one multiply-add over (g, x).
  k_g = inv_c * weight
  k_x = -_per_channel(inv * inv * ws2, groups, c)
  k_0 = _per_channel(-inv * ws1 + mean * inv * inv * ws2, groups, c)
  dx = gf * _expand(k_g, nd) + xf * _expand(k_x, nd) + _expand(k_0, nd)
  return dx.astype(x.dtype), s2.astype(weight.dtype), s1.astype(bias.dtype)


group_norm_act.defvjp(_gn_fwd, _gn_bwd)


class GroupNorm(nn.Module):
  """GroupNorm in float32 (PyTorch eps 1e-5); params `scale`, `bias` (torch weight, bias).

  `__call__(x, scale=None, shift=None, silu=False)`: optional per-sample modulation
  (B, C) applied as GroupNorm(x)·(1 + scale) + shift (ADM's scale-shift norm), then SiLU if
  `silu`; all fused in `group_norm_act`.
  """

  num_groups: int = 32
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, scale=None, shift=None, silu: bool = False):
    c = x.shape[-1]
    groups = num_groups_for(c, self.num_groups)
    gamma = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    beta = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    b = x.shape[0]
    weight = jnp.broadcast_to(gamma, (b, c))
    bias = jnp.broadcast_to(beta, (b, c))
    if scale is not None:
      s = 1.0 + scale.reshape(b, c).astype(jnp.float32)
      weight, bias = weight * s, bias * s
    if shift is not None:
      bias = bias + shift.reshape(b, c).astype(jnp.float32)
    return group_norm_act(x, weight, bias, groups, self.epsilon, silu)


def extract_patches(x, kernel_size: Sequence[int], strides: Sequence[int],
                    padding: Sequence[int]):
  """im2col: (B, H, W, C) -> (B, Ho, Wo, kh*kw*C), ordered (kh, kw, C) like an HWIO kernel."""
  kh, kw = kernel_size
  sh, sw = strides
  ph, pw = padding
  x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  hp, wp = x.shape[1], x.shape[2]
  ho = (hp - kh) // sh + 1
  wo = (wp - kw) // sw + 1
  cols = []
  for i in range(kh):
    for j in range(kw):
      cols.append(x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :])
  patches = jnp.stack(cols, axis=3)  # (B, Ho, Wo, kh*kw, C)
  return patches.reshape(x.shape[0], ho, wo, kh * kw * x.shape[-1])


def conv2d(x, kernel, bias=None, strides=(1, 1), padding=(1, 1), small_map_threshold=8,
           precision=None):
  """2-D conv (NHWC, HWIO kernel, symmetric padding); im2col + matmul on small maps."""
  kh, kw, cin, cout = kernel.shape
  h, w = x.shape[1], x.shape[2]
  if kh == 1 and kw == 1 and tuple(strides) == (1, 1) and tuple(padding) == (0, 0):
    y = jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0], precision=precision)
  elif min(h, w) < small_map_threshold:
    patches = extract_patches(x, (kh, kw), strides, padding)
    y = jnp.einsum("bhwk,kd->bhwd", patches, kernel.reshape(kh * kw * cin, cout),
                   precision=precision)
  else:
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides),
        padding=[(padding[0], padding[0]), (padding[1], padding[1])],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  if bias is not None:
    y = y + bias
  return y


class Conv(nn.Module):
  """Conv2d with torch-style padding; same params on the lax-conv and small-map matmul paths."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = None  # int or (ph, pw); None: kernel_size // 2 ("same" for odd kernels)
  use_bias: bool = True
  kernel_init: Any = torch_default_init
  bias_init: Any = nn.initializers.zeros
  small_map_threshold: int = 8
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    if self.padding is None:
      pad = (kh // 2, kw // 2)
    elif isinstance(self.padding, int):
      pad = (self.padding, self.padding)
    else:
      pad = tuple(self.padding)
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    kernel = kernel.astype(dtype)
    bias = None if bias is None else bias.astype(dtype)
    return conv2d(x, kernel, bias, tuple(self.strides), pad, self.small_map_threshold)


def dense(features, name, zero=False, dtype=None, kernel_init=None):
  """nn.Dense with PyTorch-like init (or zero init); kernel is (in, out) = torch weight.T."""
  if zero:
    kinit = nn.initializers.zeros
  else:
    kinit = kernel_init or torch_default_init
  return nn.Dense(features, kernel_init=kinit, bias_init=nn.initializers.zeros, dtype=dtype,
                  name=name)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D sin-cos positional embedding (MAE / DiT): (grid_size**2, embed_dim) float32.

  Token order is row-major (h, w). The first half of the channels encodes the w coordinate and
  the second half the h coordinate (the meshgrid(w, h) convention of the reference), each half
  as [sin | cos] with omega_i = 1 / 10000**(i / (D/4)).
  """
  assert embed_dim % 4 == 0, "DiT hidden size must be divisible by 4"
  gh, gw = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                       np.arange(grid_size, dtype=np.float64), indexing="ij")
  # meshgrid(w, h) in the reference -> grid[0] varies along w.
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
  return emb.astype(np.float32)


def remat_policy(remat: str):
  """`config.model.remat` -> a jax checkpoint policy; None for "none" (no rematerialisation).

  "blocks" is `nothing_saveable` (each block recomputes its whole forward in the backward
  pass); any other value names a policy of `jax.checkpoint_policies` (see REMAT_CHOICES).
  """
  remat = "none" if remat is None else remat
  if remat not in REMAT_CHOICES:
    raise ValueError(f"model.remat must be one of {list(REMAT_CHOICES)}, got {remat!r}")
  if remat == "none":
    return None
  return getattr(jax.checkpoint_policies, "nothing_saveable" if remat == "blocks" else remat)


def maybe_remat(module_cls, remat: str, static_argnums: Sequence[int] = ()):
  """`module_cls`, or its `nn.remat` with the policy of `remat` (see remat_policy).

  static_argnums index `__call__`'s arguments with self as 0 (flax's convention), e.g. (3,)
  for `__call__(self, x, emb, train)`. Give the instances explicit names: the lifted class has
  another class name, and explicit names keep the parameter tree identical with and without
  rematerialisation.
  """
  policy = remat_policy(remat)
  if policy is None:
    return module_cls
  return nn.remat(module_cls, policy=policy, static_argnums=tuple(static_argnums))


def dot_product_attention(q, k, v, scale=None, implementation=None):
  """softmax(q·kᵀ · scale) · v per head; q (B, T, N, H), k and v (B, S, N, H) -> (B, T, N, H).

  `jax.nn.dot_product_attention` (scale default 1/sqrt(H)); the logits and the softmax are
  float32 for any input dtype and the output has q's dtype. `implementation`: None or "xla"
  (XLA's fused attention on every platform) or "cudnn" (cuDNN flash attention on NVIDIA
  GPUs; bfloat16/float16 inputs only).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention_implementation must be one of "
                     f"{list(ATTENTION_IMPLEMENTATIONS)}, got {implementation!r}")
  return jax.nn.dot_product_attention(q, k, v, scale=scale,
                                      implementation=implementation)
