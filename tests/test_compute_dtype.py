"""Compute dtype: every network computes in bfloat16 on request, with float32 params and output.

For each network (U-Net, DiT, AutoencoderKL encode/decode, InceptionV3) the bfloat16 forward
pass on random inputs agrees with the float32 one within a bound set by bfloat16's 8-bit
mantissa, the parameters are float32 either way, and the traced program really multiplies in
bfloat16 (so a dtype that is silently ignored fails).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lfm_jax.models import create_model
from lfm_jax.models import layers
from lfm_jax.models.autoencoder import AutoencoderKL
from lfm_jax.models.inception import InceptionV3

_MATMULS = ("dot_general", "conv_general_dilated")


def _random_variables(shapes, seed=0):
  """Random float32 variables for a shape tree, drawn with numpy (no init to compile).

  Kernels ~ N(0, 1/fan_in) (no zero-initialised output layers, so every output is non-trivial),
  norm scales and variances 1 + |N(0, 0.1^2)|, biases, means and embeddings N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(leaf.shape, np.float32)
    if "kernel" in name:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    if "scale" in name or "var" in name:
      return 1.0 + 0.1 * np.abs(noise)
    return 0.1 * noise
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _matmul_dtypes(jaxpr) -> set:
  """Operand dtypes of every dot_general / conv in `jaxpr` and the jaxprs nested in it."""
  found = set()
  for eqn in jaxpr.eqns:
    # GroupNorm's (B, G) -> (B, C) statistics expansion is a float32 matmul by design.
    if (eqn.primitive.name in _MATMULS
        and layers.PER_CHANNEL_SCOPE not in str(eqn.source_info.name_stack)):
      found.add(str(eqn.invars[0].aval.dtype))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found |= _matmul_dtypes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found |= _matmul_dtypes(sub)
  return found


def _check(names, make, init_args, fn, bound):
  """make(dtype) -> module; fn(module, variables) -> outputs (one name each).

  Asserts max |bf16 - fp32| / max |fp32| < bound for every output; returns the worst ratio."""
  m32, m16 = make(jnp.float32), make(jnp.bfloat16)
  v32 = jax.eval_shape(m32.init, jax.random.PRNGKey(0), *init_args)
  v16 = jax.eval_shape(m16.init, jax.random.PRNGKey(0), *init_args)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), v16) == jax.tree.map(
      lambda a: (a.shape, a.dtype), v32)
  assert {a.dtype for a in jax.tree.leaves(v16)} == {jnp.dtype(jnp.float32)}  # float32 params
  variables = _random_variables(v32)
  f32 = jax.jit(lambda v: fn(m32, v))(variables)
  bf16 = jax.jit(lambda v: fn(m16, v))(variables)
  assert _matmul_dtypes(jax.make_jaxpr(lambda v: fn(m16, v))(variables).jaxpr) == {"bfloat16"}
  assert _matmul_dtypes(jax.make_jaxpr(lambda v: fn(m32, v))(variables).jaxpr) == {"float32"}
  worst = 0.0
  f32, bf16 = jax.tree.leaves(f32), jax.tree.leaves(bf16)
  assert len(f32) == len(names)
  for name, a, b in zip(names, f32, bf16):
    assert a.dtype == b.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(a - b)))
    ref = float(jnp.max(jnp.abs(a)))
    rel_l2 = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    print(f"{name}: bf16 vs fp32 max abs err {err:.3g}, max |fp32| {ref:.3g}, "
          f"max-rel {err / ref:.3g}, rel L2 {rel_l2:.3g}")
    assert ref > 0.1 and rel_l2 > 0  # a non-trivial output, and bf16 is not fp32
    worst = max(worst, err / ref)
  assert worst < bound, worst
  return worst


VELOCITY = {
    "unet": dict(name="unet", model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), attention_semantics="resolution", num_heads=2,
                 num_head_channels=-1, dropout=0.0, use_scale_shift_norm=True,
                 resblock_updown=False, mid_attention=True, norm_num_groups=8, num_classes=3,
                 extra_in_channels=0),
    "dit": dict(name="dit", hidden_size=64, depth=2, num_heads=2, patch_size=2, num_classes=3,
                extra_in_channels=0),
}


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_velocity_network_bf16_close_to_fp32(kind):
  shape = (8, 8, 4)
  cfg = ml_collections.ConfigDict(VELOCITY[kind])
  x = jax.random.normal(jax.random.PRNGKey(2), (4,) + shape)
  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  y = jnp.array([0, 1, 2, 3])
  _check([kind], lambda dt: create_model(cfg, shape, dtype=dt), (x, t, y),
         lambda m, v: m.apply(v, x, t, y=y), bound=0.03)


def test_autoencoder_bf16_close_to_fp32():
  x = jnp.tanh(jax.random.normal(jax.random.PRNGKey(3), (2, 16, 16, 3)))
  z = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 4))
  cfg = ml_collections.ConfigDict(dict(block_out_channels=(32, 64), layers_per_block=1,
                                       latent_channels=4, norm_num_groups=8, attention=True))
  make = lambda dt: AutoencoderKL.from_config(cfg, in_channels=3, dtype=dt)
  assert make(jnp.bfloat16).dtype == jnp.bfloat16
  _check(["AutoencoderKL encode mean", "AutoencoderKL encode logvar", "AutoencoderKL decode"],
         make, (x,), lambda m, v: (*m.apply(v, x, method=m.encode),
                                   m.apply(v, z, method=m.decode)), bound=0.03)


def test_inception_bf16_close_to_fp32():
  # 75x75 is the smallest input InceptionV3 takes.
  x = jax.random.uniform(jax.random.PRNGKey(5), (1, 75, 75, 3), maxval=255.0)
  _check(["InceptionV3 pool3"], lambda dt: InceptionV3(resize_input=False, dtype=dt), (x,),
         lambda m, v: m.apply(v, x), bound=0.03)


@pytest.mark.parametrize("model_dtype", [jnp.float32, jnp.bfloat16])
def test_params_cast_to_bf16_still_apply(model_dtype):
  """The train step's train.compute_dtype path casts params and inputs to bfloat16 before apply;
  that works for a float32 and a bfloat16 network alike and returns float32."""
  cfg = ml_collections.ConfigDict(VELOCITY["unet"])
  model = create_model(cfg, (8, 8, 4), dtype=model_dtype)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 8, 4))
  t = jnp.array([0.2, 0.9])
  params = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t))["params"]
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)  # as the train step does
  out = jax.jit(lambda p: model.apply({"params": p}, x.astype(jnp.bfloat16), t))(p16)
  ref = jax.jit(lambda p: model.apply({"params": p}, x, t))(params)
  assert out.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
  print(f"U-Net({jnp.dtype(model_dtype).name}) with bf16-cast params: max-rel err {rel:.3g}")
  assert np.isfinite(rel) and rel < 0.03
