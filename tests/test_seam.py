"""Seam fine-tuning pieces (lfm_jax/seam.py): analytic seam points, the seam loss, the objective."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lfm_jax import flow
from lfm_jax import seam

S = flow.SIGMA_MIN
T_SWITCH = 0.3


def _sigma(t, std):
  """Marginal std of the path at t for N(mean, std^2) data: sqrt((1-t)^2 s^2 + b_t^2)."""
  return np.sqrt((1 - t) ** 2 * std ** 2 + (S + (1 - S) * t) ** 2)


def _gaussian_fn(mean, std):
  return lambda t, z, y: flow.gaussian_marginal_velocity(t, z, mean, std)


MEAN, STD = 0.7, 0.5
HEAVY = _gaussian_fn(MEAN, STD)  # one function object: seam_points compiles once per shape


@pytest.fixture(scope="module")
def gaussian_data():
  """Latents from the t = 0 marginal of N(0.7, 0.5^2) data (N(0.7, 0.5^2 + sigma_min^2)) and
  their seam points (RK4, 4 steps)."""
  z0 = MEAN + _sigma(0.0, STD) * jax.random.normal(jax.random.PRNGKey(0), (1024, 4, 4, 1))
  z_s, info = seam.seam_points(HEAVY, z0, T_SWITCH, solver="rk4", num_steps=4)
  return z0, z_s, info


def test_seam_points_follow_the_exact_flow_map(gaussian_data):
  z0, z_s, info = gaussian_data
  mean, std = MEAN, STD
  # For Gaussian data the ODE keeps the standardised coordinate (z - a_t m) / sigma_t fixed.
  exact = (1 - T_SWITCH) * mean + _sigma(T_SWITCH, std) / _sigma(0.0, std) * (z0 - mean)
  assert z_s.shape == z0.shape and int(info["nfe"]) == 16
  np.testing.assert_allclose(z_s, exact, atol=2e-5)
  # The known marginal statistics at t_switch: N(a_t m, sigma_t^2).
  assert abs(float(z_s.mean()) - (1 - T_SWITCH) * mean) < 0.02
  assert abs(float(z_s.std()) / _sigma(T_SWITCH, std) - 1) < 0.02
  # Euler converges to the same points (first order).
  errs = [float(jnp.abs(seam.seam_points(HEAVY, z0, T_SWITCH, num_steps=n)[0] - exact).max())
          for n in (10, 40)]
  assert errs[1] < errs[0] / 3 and errs[1] < 0.02


def test_seam_points_labels_and_args():
  """Per-class Gaussians; the heavy parameters (class means) travel through `args`."""
  means = jnp.array([-1.0, 0.5, 2.0])
  std = 0.3
  y = jnp.array([0, 1, 2, 1, 0, 2])
  eps = jax.random.normal(jax.random.PRNGKey(1), (6, 2, 2, 1))
  z0 = means[y][:, None, None, None] + _sigma(0.0, std) * eps

  def heavy(t, z, labels, args):
    return flow.gaussian_marginal_velocity(t, z, args["means"][labels][:, None, None, None], std)

  z_s, _ = seam.seam_points(heavy, z0, 0.5, labels=y, args={"means": means}, solver="rk4",
                            num_steps=8)
  m = means[y][:, None, None, None]
  exact = 0.5 * m + _sigma(0.5, std) / _sigma(0.0, std) * (z0 - m)
  np.testing.assert_allclose(z_s, exact, atol=2e-5)
  assert seam._ode_field(heavy) is seam._ode_field(heavy)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="light_fraction"):
    seam.seam_points(heavy, z0, 1.0, num_steps=4, labels=y, args={"means": means})


def test_seam_loss_value_and_gradient_flow(gaussian_data):
  _, z_s, _ = gaussian_data
  heavy = HEAVY
  assert float(seam.seam_loss(heavy, heavy, z_s, T_SWITCH)) == 0.0
  shifted = lambda t, z, y: heavy(t, z, y) + 0.3
  np.testing.assert_allclose(seam.seam_loss(shifted, heavy, z_s, T_SWITCH), 0.1 * 0.09, rtol=1e-5)
  np.testing.assert_allclose(seam.seam_loss(shifted, heavy, z_s, T_SWITCH, weight=1.0), 0.09,
                             rtol=1e-5)

  # d/d(light offset) = weight * 2 * offset; the heavy model gets no gradient.
  def loss(light_offset, heavy_offset):
    light = lambda t, z, y: heavy(t, z, y) + light_offset
    heavy_p = lambda t, z, y: heavy(t, z, y) + heavy_offset
    return seam.seam_loss(light, heavy_p, z_s, T_SWITCH)

  g_light, g_heavy = jax.grad(loss, argnums=(0, 1))(0.3, 0.0)
  np.testing.assert_allclose(g_light, 0.1 * 2 * 0.3, rtol=1e-4)
  assert float(g_heavy) == 0.0


class _TinyLight(nn.Module):
  """A per-pixel MLP velocity v(t, z): a tiny light model."""

  @nn.compact
  def __call__(self, t, z):
    tt = jnp.broadcast_to(t[:, None, None, None], z.shape)
    h = nn.tanh(nn.Dense(16)(jnp.concatenate([z, tt], axis=-1)))
    return nn.Dense(z.shape[-1])(h)


def test_a_few_optax_steps_reduce_the_seam_loss(gaussian_data):
  heavy = HEAVY
  z_s = gaussian_data[1][:256]
  model = _TinyLight()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,)), z_s[:1])
  opt = optax.adam(1e-2)

  def loss_fn(p):
    return seam.seam_loss(lambda t, z, y: model.apply(p, t, z), heavy, z_s, T_SWITCH)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  state = opt.init(params)
  first = float(loss_fn(params))
  for _ in range(40):
    params, state, _ = step(params, state)
  last = float(loss_fn(params))
  assert first > 1e-3
  assert last < 0.3 * first, (first, last)


def test_finetune_objective_is_fm_near_switch_plus_seam(gaussian_data):
  heavy = HEAVY
  z0, z_s = gaussian_data[0][:64], gaussian_data[1][:64]
  light = lambda t, z, y: 0.9 * heavy(t, z, y)
  rng = jax.random.PRNGKey(3)

  @jax.jit
  def everything(r):
    total, aux = seam.seam_finetune_loss(light, heavy, z0, z_s, r, T_SWITCH, width=0.2)
    fm, fm_aux = seam.near_switch_fm_loss(light, z0, r, T_SWITCH, width=0.2)
    sl = seam.seam_loss(light, heavy, z_s, T_SWITCH)
    plain_t = flow.flow_matching_loss(light, z0, r)[1]["t"]
    t_hi = seam.near_switch_fm_loss(light, z0, r, 0.95, width=0.2)[1]["t"]
    return total, aux, fm, fm_aux["t"], sl, plain_t, t_hi

  total, aux, fm, t, sl, plain_t, t_hi = everything(rng)
  np.testing.assert_allclose(total, fm + sl, rtol=1e-5)
  np.testing.assert_allclose(aux["fm_loss"], fm, rtol=1e-5)
  np.testing.assert_allclose(aux["seam_loss"], sl, rtol=1e-5)
  assert float(sl) > 0
  # Times in the light model's band just above the switch: the plain FM draw, mapped.
  t = np.asarray(t)
  assert t.min() >= T_SWITCH and t.max() <= T_SWITCH + 0.2
  np.testing.assert_allclose(t, T_SWITCH + 0.2 * plain_t, rtol=1e-6)
  # The band is clipped at t = 1.
  assert float(t_hi.max()) <= 1.0 and float(t_hi.min()) >= 0.95
  with pytest.raises(ValueError, match="width"):
    seam.near_switch_fm_loss(light, z0, rng, T_SWITCH, width=0.0)
