"""Rematerialisation (model.remat) and fused attention (jax.nn.dot_product_attention).

Remat: gradients equal the plain network's, the parameter tree is the same, and the gradient's
jaxpr really holds rematerialised blocks. Attention: the U-Net's (both qkv orders), the DiT's and
the autoencoder's attention equal the explicit softmax(q·kᵀ/√d)·v formula the modules used
before, copied below as reference modules with the same parameter names.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lfm_jax import config_validation
from lfm_jax.models import create_model, layers
from lfm_jax.models import autoencoder as ae_lib
from lfm_jax.models import dit as dit_lib
from lfm_jax.models import unet as unet_lib

_REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")


def _random_variables(shapes, seed=0):
  """Random float32 variables for a shape tree, drawn with numpy (no init to compile).

  Kernels ~ N(0, 1/fan_in) (no zero-initialised output layers, so every output is non-trivial),
  norm scales 1 + |N(0, 0.1^2)|, biases and embeddings N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.standard_normal(leaf.shape, np.float32)
    if "kernel" in name:
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    if "scale" in name:
      return 1.0 + 0.1 * np.abs(noise)
    return 0.1 * noise
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _max_abs(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _count_primitives(jaxpr, names) -> int:
  """Equations whose primitive is one of `names`, in `jaxpr` and every jaxpr nested in it."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in names
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          n += _count_primitives(sub.jaxpr, names)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          n += _count_primitives(sub, names)
  return n


TINY = {
    # One level, attention after every ResBlock and in the middle; dropout so that train=True
    # (a static argument of the rematerialised ResBlock) acts.
    "unet": dict(name="unet", model_channels=16, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(8,), attention_semantics="resolution", num_heads=2,
                 num_head_channels=-1, dropout=0.1, use_scale_shift_norm=True,
                 resblock_updown=False, mid_attention=True, norm_num_groups=8, num_classes=3,
                 extra_in_channels=0),
    "dit": dict(name="dit", hidden_size=32, depth=2, num_heads=2, patch_size=2, num_classes=3,
                extra_in_channels=0),
}
# ResBlocks + AttentionBlocks of the tiny U-Net: 1 + 1 (input), 2 + 1 (middle), 2 + 2 (output).
NUM_BLOCKS = {"unet": 9, "dit": 2}
SHAPE = (8, 8, 4)


def _model(kind, remat):
  cfg = ml_collections.ConfigDict(dict(TINY[kind], remat=remat))
  return create_model(cfg, SHAPE)


@pytest.fixture(scope="module", params=["unet", "dit"])
def plain(request):
  kind = request.param
  model = _model(kind, "none")
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (2,) + SHAPE)
  t = jnp.array([0.3, 0.8])
  y = jnp.array([0, 2])
  target = jax.random.normal(k[1], x.shape)
  variables = jax.eval_shape(model.init, k[2], x, t, y)
  params = _random_variables(variables)["params"]

  def loss_fn(model):
    def loss(p):
      v = model.apply({"params": p}, x, t, y=y, train=True, rngs={"dropout": k[3]})
      return jnp.mean(jnp.square(v - target))
    return loss

  grads, n_remat = _grad_and_remat_count(loss_fn(model), params)
  assert n_remat == 0
  return dict(kind=kind, x=x, t=t, y=y, params=params, loss_fn=loss_fn, grads=grads,
              shapes=jax.tree.map(lambda a: (a.shape, a.dtype), variables))


def _grad_and_remat_count(loss, params):
  """The gradient of `loss` at params and the number of remat primitives in its jaxpr."""
  traced = jax.jit(jax.grad(loss)).trace(params)
  return traced.lower().compile()(params), _count_primitives(traced.jaxpr.jaxpr,
                                                            _REMAT_PRIMITIVES)


@pytest.mark.parametrize("remat", ["blocks", "dots_saveable"])
def test_remat_same_params_and_gradients(plain, remat):
  model = _model(plain["kind"], remat)
  assert model.remat == remat
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), plain["x"], plain["t"], plain["y"])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == plain["shapes"]

  grads, n = _grad_and_remat_count(plain["loss_fn"](model), plain["params"])
  diff = _max_abs(grads, plain["grads"])
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain["grads"]))
  print(f"{plain['kind']} remat={remat}: max |grad - plain grad| = {diff:.3g} "
        f"(max |grad| {scale:.3g})")
  assert scale > 1e-3  # the gradients are not trivially zero
  assert diff <= 1e-6, diff

  # Remat really happens: the gradient's jaxpr holds a rematerialised call per block (the plain
  # network's none, checked in the fixture).
  print(f"  remat primitives in the gradient's jaxpr: {n} (plain: 0)")
  assert n >= NUM_BLOCKS[plain["kind"]], n


def test_bad_remat_policy_is_a_clear_error_at_build_time():
  cfg = ml_collections.ConfigDict(dict(TINY["dit"], remat="dots_savable"))
  with pytest.raises(ValueError, match=r"model\.remat must be one of .*'dots_saveable'") as e:
    create_model(cfg, SHAPE)
  assert "\n" not in str(e.value)
  for name in layers.REMAT_CHOICES:  # every listed name builds
    layers.remat_policy(name)
  assert {"none", "blocks", "nothing_saveable", "dots_saveable",
          "dots_with_no_batch_dims_saveable", "everything_saveable"} <= set(layers.REMAT_CHOICES)


def test_config_validation_checks_remat_and_attention_implementation():
  from configs.default import get_config
  config = get_config()
  assert config.model.remat == "none" and config.model.attention_implementation is None
  config_validation.validate_config(config)
  config.model.remat = "dots_with_no_batch_dims_saveable"
  config_validation.validate_config(config)
  config.model.remat = "everything"
  with pytest.raises(config_validation.ConfigError, match=r"config\.model\.remat"):
    config_validation.validate_config(config)
  config.model.remat = "blocks"
  config.model.attention_implementation = "flash"
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.model\.attention_implementation"):
    config_validation.validate_config(config)


# ---- Fused attention against the explicit formula the modules used before. ----


class _RefUNetAttention(nn.Module):
  """The U-Net AttentionBlock with an explicit softmax (same parameter names)."""

  num_heads: int
  use_new_attention_order: bool

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    heads, ch = self.num_heads, c // self.num_heads
    hn = layers.GroupNorm(32, name="norm")(x).reshape(b, hh * ww, c)
    qkv = layers.dense(3 * c, "qkv")(hn)
    if self.use_new_attention_order:
      qkv = qkv.reshape(b, hh * ww, 3, heads, ch)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(b, hh * ww, heads, 3, ch)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    logits = jnp.einsum("bthc,bshc->bhts", q, k) / jnp.sqrt(jnp.asarray(ch, q.dtype))
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    a = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(b, hh * ww, c)
    a = layers.dense(c, "proj_out")(a)
    return x + a.reshape(b, hh, ww, c)


class _RefDiTAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bthc,bshc->bhts", q, k) * (hd ** -0.5)
    w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    a = jnp.einsum("bhts,bshc->bthc", w, v).reshape(b, n, d)
    return nn.Dense(d, name="proj")(a)


class _RefAEAttention(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = layers.GroupNorm(self.groups, 1e-6, name="group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, name="to_q")(y)
    k = nn.Dense(c, name="to_k")(y)
    v = nn.Dense(c, name="to_v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)
    o = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits, axis=-1), v)
    return x + nn.Dense(c, name="to_out_0")(o).reshape(b, h, w, c)


def _compare(ours, ref, x, what):
  variables = _random_variables(jax.eval_shape(ref.init, jax.random.PRNGKey(0), x))
  ours_vars = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
  assert (jax.tree.map(lambda a: a.shape, ours_vars)
          == jax.tree.map(lambda a: a.shape, variables))  # same names and shapes
  got, want = jax.jit(ours.apply)(variables, x), jax.jit(ref.apply)(variables, x)
  diff = float(jnp.max(jnp.abs(got - want)))
  resid = float(jnp.max(jnp.abs(want - x)))  # the attention branch's own size
  print(f"{what}: max |fused - explicit| = {diff:.3g} (attention output up to {resid:.3g})")
  assert resid > 0.1
  assert diff <= 1e-5, diff


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_unet_attention_equals_explicit_formula(new_order, heads):
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (2, 4, 6, 64))
  ours = unet_lib.AttentionBlock(heads, use_new_attention_order=new_order)
  _compare(ours, _RefUNetAttention(heads, new_order), x,
           f"U-Net attention, {heads} heads, new_order={new_order}")


def test_dit_attention_equals_explicit_formula():
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 48))
  _compare(dit_lib.Attention(3), _RefDiTAttention(3), x, "DiT attention, 3 heads")


def test_autoencoder_attention_equals_explicit_formula():
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 4, 32))
  _compare(ae_lib.Attention(8), _RefAEAttention(8), x, "autoencoder mid-block attention")


def test_attention_implementation_reaches_jax(monkeypatch):
  """model.attention_implementation is what jax.nn.dot_product_attention receives."""
  seen = []
  real = jax.nn.dot_product_attention

  def spy(*args, implementation=None, **kw):
    seen.append(implementation)
    return real(*args, implementation=None, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  for kind in ("unet", "dit"):
    cfg = ml_collections.ConfigDict(dict(TINY[kind], attention_implementation="xla"))
    model = create_model(cfg, SHAPE)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,)))
  assert seen and set(seen) == {"xla"}, seen
  with pytest.raises(ValueError, match=r"model\.attention_implementation"):
    create_model(ml_collections.ConfigDict(dict(TINY["dit"], attention_implementation="flash")),
                 SHAPE)


def test_with_compute_options_keeps_the_parameter_tree():
  """An imported checkpoint's module (built outside create_model) takes the run's dtype, remat
  and attention implementation, through a time-convention wrapper too."""
  from lfm_jax.models import SiTConventionWrapper, with_compute_options
  cfg = ml_collections.ConfigDict(dict(TINY["dit"], time_convention="sit"))
  module = create_model(cfg, SHAPE)
  assert isinstance(module, SiTConventionWrapper) and module.inner.remat == "none"
  tuned = with_compute_options(module, dict(remat="blocks", attention_implementation="xla"),
                               dtype=jnp.bfloat16)
  assert (tuned.inner.remat, tuned.inner.attention_implementation,
          tuned.inner.dtype) == ("blocks", "xla", jnp.bfloat16)
  args = (jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,)))
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, *args))
  assert shapes(tuned) == shapes(module)
  with pytest.raises(ValueError, match=r"model\.remat"):
    with_compute_options(module, dict(remat="blockz"))
