"""Velocity networks build, count their parameters, and behave."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest

from lfm_jax.models import (DIT_PRESETS, SiTConventionWrapper, count_params, create_model,
                            dit_config)
from lfm_jax.models import layers
from lfm_jax.models.dit import DiT
from lfm_jax.models.unet import UNet

PUBLISHED_DIT = {"S/2": 33e6, "B/2": 130e6, "L/2": 458e6, "XL/2": 675e6}


def _perturb(params, seed=1, std=0.05):
  # Zero-initialised output layers (ADM, adaLN-Zero) make a fresh net output 0 everywhere.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + std * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIT))
def test_dit_preset_param_counts(name):
  model = DiT(num_classes=1000, **dit_config(name))
  n = count_params(model, (32, 32, 4))
  print(f"DiT-{name}: {n:,} params (published {PUBLISHED_DIT[name] / 1e6:.0f}M)")
  assert abs(n - PUBLISHED_DIT[name]) / PUBLISHED_DIT[name] < 0.01


def test_dit_presets_complete():
  assert set(DIT_PRESETS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
  assert dit_config("DiT-XL/2") == dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)


def test_adm_celeba_hq_256_builds():
  cfg = ml_collections.ConfigDict(dict(
      name="unet", model_channels=256, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
      attention_resolutions=(16, 8), attention_semantics="downsample", num_heads=4,
      num_head_channels=-1, dropout=0.0, use_scale_shift_norm=True, resblock_updown=False,
      num_classes=0, extra_in_channels=0))
  model = create_model(cfg, (32, 32, 4))
  n = count_params(model, (32, 32, 4))
  print(f"ADM U-Net, LFM CelebA-HQ 256 config (32x32x4 latents): {n:,} params")
  assert 1e8 < n < 5e8
  out = jax.eval_shape(
      lambda: model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 4)),
                                     jnp.zeros((1,))), jnp.zeros((2, 32, 32, 4)), jnp.zeros((2,))))
  assert out.shape == (2, 32, 32, 4)


SMALL = {
    "unet": lambda: UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(2,), attention_semantics="downsample",
                         num_heads=2, num_classes=10, dropout=0.1),
    "dit": lambda: DiT(hidden_size=64, depth=2, num_heads=2, patch_size=2, num_classes=10),
}


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_small_network_behaviour(kind):
  model = SMALL[kind]()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 4))
  t = jnp.array([0.1, 0.5, 0.9])
  init = jax.jit(model.init)
  p1 = init(jax.random.PRNGKey(0), x, t)
  p2 = init(jax.random.PRNGKey(0), x, t)
  p3 = init(jax.random.PRNGKey(1), x, t)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), p1, p2)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p1),
                                                       jax.tree_util.tree_leaves(p3)))
  params = _perturb(p1["params"])
  apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y=y))
  y_real = jnp.array([0, 4, 9])
  y_null = jnp.full((3,), 10)
  v_real = apply(params, x, t, y_real)
  assert v_real.shape == x.shape
  assert np.all(np.isfinite(np.asarray(v_real)))
  np.testing.assert_array_equal(v_real, apply(params, x, t, y_real))  # deterministic
  v_null = apply(params, x, t, y_null)
  assert float(jnp.abs(v_real - v_null).max()) > 1e-3
  v_none = apply(params, x, t, None)
  np.testing.assert_allclose(v_none, v_null, atol=1e-6)
  if kind == "dit":  # a scalar t is broadcast (same code path in both networks)
    np.testing.assert_allclose(apply(params, x, 0.5, y_real)[1], v_real[1], atol=1e-5)
  else:  # dropout only acts with train=True and a dropout rng
    v_tr = jax.jit(lambda p, k: model.apply({"params": p}, x, t, y=y_real, train=True,
                                            rngs={"dropout": k}))(params, jax.random.PRNGKey(5))
    assert float(jnp.abs(v_tr - v_real).max()) > 1e-4


def test_broadcast_time():
  np.testing.assert_array_equal(layers.broadcast_time(0.5, 3), np.full((3,), 0.5, np.float32))
  np.testing.assert_allclose(layers.broadcast_time(jnp.array([0.2]), 2), [0.2, 0.2], rtol=1e-6)
  emb = layers.timestep_embedding(jnp.array([0.0, 1.0]), 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_allclose(emb[1, 0], np.cos(1.0), rtol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_small_map_conv_equals_lax_conv(stride):
  conv_small = layers.Conv(6, strides=(stride, stride), padding=1, small_map_threshold=8)
  conv_lax = layers.Conv(6, strides=(stride, stride), padding=1, small_map_threshold=0)
  for hw in [(2, 2), (4, 4), (6, 3), (7, 7)]:
    x = jax.random.normal(jax.random.PRNGKey(hw[0]), (2, *hw, 5))
    params = conv_small.init(jax.random.PRNGKey(1), x)
    params = _perturb(params, std=0.3)  # nonzero bias too
    assert params["params"]["kernel"].shape == (3, 3, 5, 6)
    a = conv_small.apply(params, x)
    b = conv_lax.apply(params, x)
    ref = jax.lax.conv_general_dilated(
        x, params["params"]["kernel"], (stride, stride), [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["params"]["bias"]
    assert a.shape == ref.shape
    np.testing.assert_allclose(a, ref, atol=1e-5)
    np.testing.assert_allclose(b, ref, atol=1e-5)


def test_attention_semantics_equivalent():
  """Downsample factor 2 on an 8x8 input == feature-map resolution 4."""
  kw = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_classes=0)
  a = UNet(attention_resolutions=(2,), attention_semantics="downsample", **kw)
  b = UNet(attention_resolutions=(4,), attention_semantics="resolution", **kw)
  x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,))
  sa = jax.eval_shape(a.init, jax.random.PRNGKey(0), x, t)
  sb = jax.eval_shape(b.init, jax.random.PRNGKey(0), x, t)
  assert jax.tree_util.tree_structure(sa) == jax.tree_util.tree_structure(sb)
  assert "qkv" in sa["params"]["input_blocks_3_1"]


def test_learn_null_class_false_gives_zero_null_embedding():
  model = UNet(model_channels=32, channel_mult=(1,), num_res_blocks=1, num_classes=3,
               learn_null_class=False, mid_attention=False)
  x, t = jnp.ones((2, 4, 4, 4)), jnp.array([0.2, 0.2])
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]
  assert params["label_emb"]["embedding"].shape == (3, 128)


def test_create_model_and_sit_wrapper():
  from configs.default import get_config
  cfg = get_config()
  model = create_model(cfg.model, (4, 4, 4))
  assert isinstance(model, UNet) and model.num_classes == 10
  print(f"default-config U-Net: {count_params(model, (4, 4, 4)):,} params")

  dcfg = ml_collections.ConfigDict(dict(name="dit", dit_preset="S/4", num_classes=0,
                                        num_heads=4, extra_in_channels=0))
  dit = create_model(dcfg, (32, 32, 4))
  assert isinstance(dit, DiT) and dit.patch_size == 4 and dit.num_heads == 6
  with pytest.raises(ValueError):
    create_model(dcfg, (30, 30, 4))

  small = ml_collections.ConfigDict(dict(name="dit", hidden_size=32, depth=1, num_heads=2,
                                         patch_size=2, num_classes=0, time_convention="sit"))
  wrapped = create_model(small, (4, 4, 4))
  assert isinstance(wrapped, SiTConventionWrapper)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
  vars_ = jax.jit(wrapped.init)(jax.random.PRNGKey(0), x, jnp.zeros((2,)))
  params = _perturb(vars_["params"])
  t = jnp.array([0.25, 0.8])
  got = wrapped.apply({"params": params}, x, t)
  want = -wrapped.inner.apply({"params": params["inner"]}, x, 1.0 - t)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("groups", [1, 4, 16])
def test_group_norm_act_value_and_gradients_match_flax_group_norm(silu, groups):
  """Fused GroupNorm (+ per-sample scale-shift, + SiLU) with its custom VJP against flax's
  nn.GroupNorm followed by the same modulation, differentiated by autodiff."""
  k = jax.random.split(jax.random.PRNGKey(groups), 6)
  x = jax.random.normal(k[0], (3, 5, 4, 16)) * 2.0 + 1.0
  gamma = 1.0 + 0.3 * jax.random.normal(k[1], (16,))
  beta = 0.3 * jax.random.normal(k[2], (16,))
  scale = 0.5 * jax.random.normal(k[3], (3, 16))
  shift = 0.5 * jax.random.normal(k[4], (3, 16))
  probe = jax.random.normal(k[5], x.shape)
  params = {"params": {"scale": gamma, "bias": beta}}
  ours = layers.GroupNorm(groups)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)

  def f_ours(x, p, s, sh):
    return jnp.sum(ours.apply(p, x, s, sh, silu=silu) * probe)

  def f_ref(x, p, s, sh):
    y = ref.apply(p, x) * (1 + s[:, None, None]) + sh[:, None, None]
    return jnp.sum((jax.nn.silu(y) if silu else y) * probe)

  args = (x, params, scale, shift)
  np.testing.assert_allclose(f_ours(*args), f_ref(*args), rtol=1e-5, atol=1e-4)
  g_ours = jax.grad(f_ours, argnums=(0, 1, 2, 3))(*args)
  g_ref = jax.grad(f_ref, argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # Without modulation it is flax's GroupNorm (+ SiLU); bf16 in, bf16 out.
  plain = ours.apply(params, x, silu=silu)
  expect = ref.apply(params, x)
  np.testing.assert_allclose(plain, jax.nn.silu(expect) if silu else expect, atol=2e-5)
  assert ours.apply(params, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
