"""Semantic-map conditioning: a velocity network that takes a class map as `cond`.

`SemanticConditioned(inner, semantic_classes)` wraps a UNet or DiT built with
`extra_in_channels = C`. Its `cond` is a class-id map (B, S, S) (any numeric dtype; ids in
[0, semantic_classes)); the wrapper one-hot encodes it on device, rescales it to the latent grid
(h, w) and maps it to C channels, which the inner network concatenates to the noisy latent:

    one_hot (B, S, S, K) -> n = log2(S / h) halvings, each the mean of 2 x 2 pixels
    -> (B, h, w, K) class frequencies -> 1 x 1 conv without bias -> (B, h, w, C)

This is LDM's SpatialRescaler as LFM configures it for CelebAMask-HQ (n_stages 3, bilinear,
multiplier 0.5, 19 -> 4 channels, no bias): a bilinear 0.5 resize of an even-sized map without
antialiasing samples at 2i + 0.5, i.e. averages each 2 x 2 block, so the halvings here are
exactly its resizes. The conv (`cond_stage/channel_mapper`, kernel (1, 1, K, C)) is trained
jointly with the velocity network. (LFM's training script computes the rescaler under
`torch.no_grad()`, so its conv stays at its random initialisation there.)

Parameters: {"inner": <the network's own tree>, "cond_stage": {"channel_mapper": {"kernel"}}}:
converters and checkpoints find the U-Net or DiT under "inner".
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def halvings(image_size: int, latent_size: int) -> int:
  """n with image_size = latent_size * 2**n; ValueError when the ratio is no power of two."""
  n, size = 0, int(image_size)
  while size > latent_size and size % 2 == 0:
    size //= 2
    n += 1
  if size != latent_size:
    raise ValueError(f"a semantic map of {image_size}x{image_size} cannot be rescaled to the "
                     f"{latent_size}x{latent_size} latent grid by halving")
  return n


class SpatialRescaler(nn.Module):
  """(B, S, S) class ids -> (B, h, w, out_channels) (see the module docstring)."""

  num_classes: int
  out_channels: int

  @nn.compact
  def __call__(self, class_map, latent_hw):
    if class_map.ndim != 3:
      raise ValueError(f"the semantic map must be (B, S, S) class ids, got {class_map.shape}")
    h, w = latent_hw
    n = halvings(class_map.shape[1], h)
    if halvings(class_map.shape[2], w) != n:
      raise ValueError(f"semantic map {class_map.shape[1:]} and latent grid {(h, w)} differ in "
                       "aspect")
    ids = jnp.round(class_map.astype(jnp.float32)).astype(jnp.int32)
    x = nn.one_hot(ids, self.num_classes, dtype=jnp.float32)
    b, size_h, size_w, k = x.shape
    f = 2 ** n
    x = x.reshape(b, size_h // f, f, size_w // f, f, k).mean(axis=(2, 4))
    return _Conv1x1(self.out_channels, name="channel_mapper")(x)


class _Conv1x1(nn.Module):
  """1 x 1 conv without bias; kernel (1, 1, K, C) (torch Conv2d(K, C, 1, bias=False), HWIO)."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    return jnp.einsum("bhwk,kc->bhwc", x, kernel[0, 0])


class SemanticConditioned(nn.Module):
  """`(x, t, y=None, cond=class_map, train=False) -> v`: `inner` conditioned on a class map."""

  inner: Any
  semantic_classes: int = 19

  @property
  def extra_in_channels(self) -> int:
    return int(self.inner.extra_in_channels)

  @nn.compact
  def __call__(self, x, t, y=None, cond=None, train: bool = False):
    if cond is None:
      raise ValueError("this network is conditioned on a semantic map: pass cond=(B, S, S) "
                       "class ids")
    c = SpatialRescaler(self.semantic_classes, self.extra_in_channels, name="cond_stage")(
        cond, x.shape[1:3])
    return self.inner(x, t, y=y, cond=c, train=train)
