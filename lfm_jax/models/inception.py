"""The FID InceptionV3 (TF "2015-12-05" graph) in Flax Linen, NHWC.

This is the network behind pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and
torch-fidelity's `FeatureExtractorInceptionV3`: torchvision's InceptionV3 layout with the TF-graph
patches that FID depends on:
- InceptionA / InceptionC / the first InceptionE ("Mixed_7b") pool branch uses a 3x3 stride-1
  average pool that does NOT count the zero padding (TF semantics, `count_include_pad=False`);
- the last InceptionE block ("Mixed_7c") uses a 3x3 stride-1 *max* pool in its pool branch;
- BatchNorm has eps 1e-3 and always runs in inference mode (running statistics);
- the output is pool3: the global average of Mixed_7c, 2048-d. The 1008-way `fc` (the graph's
  logits, for the Inception Score) is built only with `with_logits=True`.

Input convention (torch-fidelity's, the parity reference): `InceptionV3.__call__` takes float
NHWC images with pixel values in [0, 255] ("uint8-like"; FID protocols quantise to uint8 first,
see `images_to_uint8_range`), any spatial size, 3 channels. It resizes them to 299x299 with
TensorFlow-1.x bilinear resizing (align_corners=False, no half-pixel centres) exactly as
torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x(method="slow")` does, then maps pixels
with (x - 128) / 128 (the TF graph's normalisation; note 255 -> 0.9921875, not 1). pytorch-fid
instead uses `F.interpolate(bilinear, align_corners=False)` (half-pixel centres) and 2x - 1 on
[0, 1] inputs; its FIDs differ slightly from torch-fidelity's/TF's. We follow torch-fidelity / TF.

Parameters come from `lfm_jax.converters.inception.load_inception(path)`; the variables have
collections "params" (conv kernels, BN scale/bias) and "batch_stats" (BN mean/var), with module
names equal to the PyTorch ones (`Mixed_5b/branch1x1/conv/kernel`, ...).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
LOGITS_DIM = 1008  # the TF graph's classifier: 1000 ImageNet classes + 8 unused

_Pad = Tuple[Tuple[int, int], Tuple[int, int]]


def _tf1_resize_grid(in_size: int, out_size: int):
  """Source indices and weights of TF1 bilinear resizing (align_corners=False), float32 maths."""
  scale = np.float32(in_size / out_size)  # Python float64 division, then float32, as the reference
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = src.astype(np.int64)  # truncation == floor for non-negative
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(x: jnp.ndarray, size: Tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jnp.ndarray:
  """Bilinear resize of NHWC `x` as TensorFlow 1.x `resize_bilinear(align_corners=False)`.

  Matches torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x(..., align_corners=False,
  method="slow")` operation by operation (same index/weight arithmetic in float32, same order of
  the lerps: first along width, then along height). Resizing to the input's own size is exact.
  """
  _, h, w, _ = x.shape
  ylo, yhi, dy = _tf1_resize_grid(h, size[0])
  xlo, xhi, dx = _tf1_resize_grid(w, size[1])
  dtype = x.dtype
  rows_lo = jnp.take(x, ylo, axis=1)
  rows_hi = jnp.take(x, yhi, axis=1)
  in_00 = jnp.take(rows_lo, xlo, axis=2)
  in_01 = jnp.take(rows_lo, xhi, axis=2)
  in_10 = jnp.take(rows_hi, xlo, axis=2)
  in_11 = jnp.take(rows_hi, xhi, axis=2)
  dx = jnp.asarray(dx, dtype).reshape(1, 1, -1, 1)
  dy = jnp.asarray(dy, dtype).reshape(1, -1, 1, 1)
  in_0 = in_00 + (in_01 - in_00) * dx
  in_1 = in_10 + (in_11 - in_10) * dx
  return in_0 + (in_1 - in_0) * dy


def images_to_uint8_range(images: jnp.ndarray, quantize: bool = True) -> jnp.ndarray:
  """Maps float images in [-1, 1] to float pixel values in [0, 255], the network's input.

  With `quantize` (the default) values are rounded to integers as writing a PNG / uint8 tensor
  would do, which is what torch-fidelity and pytorch-fid see when they read sample files.
  Grayscale (C == 1) images are repeated to 3 channels.
  """
  x = (jnp.asarray(images, jnp.float32) + 1.0) * 127.5
  x = jnp.clip(x, 0.0, 255.0)
  if quantize:
    x = jnp.round(x)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return x


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps 1e-3, inference) -> ReLU.

  The conv computes in `dtype` (None: the input's dtype, so a whole network follows the dtype
  InceptionV3 casts its input to); BatchNorm in float32; the output has the conv's dtype.
  """

  features: int
  kernel_size: Tuple[int, int] = (1, 1)
  strides: Tuple[int, int] = (1, 1)
  padding: _Pad = ((0, 0), (0, 0))
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                use_bias=False, dtype=dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=jnp.float32, name="bn")(x)
    return nn.relu(x).astype(dtype)


def _k(kh, kw=None):
  kw = kh if kw is None else kw
  return dict(kernel_size=(kh, kw), padding=((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _avg_pool_tf(x):
  """3x3 stride-1 average pool with SAME padding that ignores the padded zeros (TF), in x.dtype
  (flax divides by float32 window counts)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False).astype(x.dtype)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, **_k(5), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, **_k(3), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, **_k(3), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_tf(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, kernel_size=(3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, **_k(3), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, kernel_size=(3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c7, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, **_k(1, 7), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **_k(7, 1), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, **_k(7, 1), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, **_k(1, 7), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, **_k(7, 1), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **_k(1, 7), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool_tf(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, kernel_size=(3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, **_k(1, 7), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, **_k(7, 1), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, kernel_size=(3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (pool="avg", TF average pool) or Mixed_7c (pool="max", the TF graph's max pool)."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **_k(1, 3), name="branch3x3_2a")(b3),
                          BasicConv2d(384, **_k(3, 1), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, **_k(3), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **_k(1, 3), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **_k(3, 1), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      bp = _avg_pool_tf(x)
    elif self.pool == "max":
      bp = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = BasicConv2d(192, name="branch_pool")(bp)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The graph's 1008-way classifier on pool3: (B, 2048) -> (x @ kernel, x @ kernel + bias).

  float32 at the highest matmul precision (the Inception Score exponentiates these logits).
  """

  num_classes: int = LOGITS_DIM

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    unbiased = jnp.matmul(x.astype(jnp.float32), kernel, precision="highest")
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """FID InceptionV3: (B, H, W, 3) pixels in [0, 255] -> (B, 2048) pool3 features.

  Attributes:
    resize_input: resize to 299x299 with TF1 bilinear resizing first (exact no-op at 299).
    normalize_input: apply (x - 128) / 128; set False to feed already-normalised inputs.
    with_logits: also build the 1008-way `fc` (params `fc/kernel` (2048, 1008), `fc/bias`) and
      return a dict {"pool3": (B, 2048), "logits_unbiased": (B, 1008) = pool3 @ kernel,
      "logits": (B, 1008) = that + bias}, float32. torch-fidelity's Inception Score uses
      "logits_unbiased". With False (the default) the variables and output are pool3 only.
    dtype: compute dtype of the convolutions (float32 default, or bfloat16); resizing,
      normalisation, BatchNorm and the final average are float32, and so are params and output.
  """

  resize_input: bool = True
  normalize_input: bool = True
  with_logits: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) images, got shape {x.shape}")
    x = jnp.asarray(x, jnp.float32)
    if self.resize_input and x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
      x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    if self.normalize_input:
      x = (x - 128.0) / 128.0
    x = x.astype(self.dtype)  # every block computes in its input's dtype
    x = BasicConv2d(32, kernel_size=(3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, kernel_size=(3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, **_k(3), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, kernel_size=(3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    if self.with_logits:
      pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      logits_unbiased, logits = Logits(name="fc")(pool3)
      return {"pool3": pool3, "logits_unbiased": logits_unbiased, "logits": logits}
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def init_variables(rng, module: InceptionV3 = None, image_size: int = INPUT_SIZE):
  """Random variables with the right structure (for shape checks and tests)."""
  import jax
  module = module or InceptionV3()
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(module.init)(rng, dummy)


def variable_shapes(module: InceptionV3 = None) -> dict:
  """Shape tree of the variables (no FLOPs: jax.eval_shape)."""
  import jax
  module = module or InceptionV3()
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)


__all__: Sequence[str] = (
    "InceptionV3", "resize_bilinear_tf1", "images_to_uint8_range", "init_variables",
    "variable_shapes", "INPUT_SIZE", "FEATURE_DIM", "Logits", "LOGITS_DIM")
