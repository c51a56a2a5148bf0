"""The path, target, loss minimiser and guidance of lfm_jax.flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfm_jax import flow

M, S = 1.5, 0.6  # data ~ N(M, S^2) per dimension


def test_interpolate_endpoints_and_target_is_time_derivative():
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  z0 = jax.random.normal(k0, (4, 8, 8, 3))
  eps = jax.random.normal(k1, (4, 8, 8, 3))
  np.testing.assert_allclose(flow.interpolate(z0, eps, 0.0), z0 + 1e-5 * eps, atol=1e-6)
  np.testing.assert_allclose(flow.interpolate(z0, eps, 1.0), eps, atol=1e-6)
  u = flow.target_velocity(z0, eps)
  for t in [0.0, 0.3, 0.9]:
    tb = jnp.full((4,), t)
    _, dz_dt = jax.jvp(lambda s: flow.interpolate(z0, eps, s), (tb,), (jnp.ones_like(tb),))
    np.testing.assert_allclose(dz_dt, u, atol=1e-6)


def test_per_example_time_broadcast():
  z0 = jnp.ones((3, 2, 2, 1))
  eps = jnp.zeros_like(z0)
  zt = flow.interpolate(z0, eps, jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(zt[:, 0, 0, 0], [1.0, 0.5, 0.0], atol=1e-7)


def _mc_loss(velocity_fn, n=200_000, seed=1):
  z0 = M + S * jax.random.normal(jax.random.PRNGKey(seed), (n, 1))
  loss, _ = flow.flow_matching_loss(lambda t, z, y: velocity_fn(t, z), z0, jax.random.PRNGKey(seed + 1))
  return float(loss)


def test_exact_marginal_velocity_minimises_the_loss():
  exact = lambda t, z: flow.gaussian_marginal_velocity(t, z, M, S)
  base = _mc_loss(exact)
  # Perturbations of every kind raise the loss (same t, noise draws: common random numbers).
  perturbed = {
      "shift": lambda t, z: exact(t, z) + 0.05,
      "scale": lambda t, z: exact(t, z) * 1.05,
      "time_warp": lambda t, z: flow.gaussian_marginal_velocity(jnp.clip(t * 0.95, 0, 1), z, M, S),
      "wrong_mean": lambda t, z: flow.gaussian_marginal_velocity(t, z, M + 0.1, S),
      "wrong_std": lambda t, z: flow.gaussian_marginal_velocity(t, z, M, S * 1.1),
  }
  for name, fn in perturbed.items():
    assert _mc_loss(fn) > base + 1e-4, name
  # The excess loss of a constant shift c is c^2 in expectation (Monte Carlo: ~10% noise).
  np.testing.assert_allclose(_mc_loss(perturbed["shift"]) - base, 0.05**2, rtol=0.3)


def test_per_sample_loss_and_mean_agree():
  z0 = jax.random.normal(jax.random.PRNGKey(0), (16, 4, 4, 2))
  fn = lambda t, z, y: 0.3 * z
  rng = jax.random.PRNGKey(3)
  mean_loss, aux = flow.flow_matching_loss(fn, z0, rng)
  per, _ = flow.flow_matching_loss(fn, z0, rng, per_sample=True)
  assert per.shape == (16,)
  np.testing.assert_allclose(jnp.mean(per), mean_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["per_sample"], per, rtol=1e-6)


def test_time_sampling():
  t = flow.sample_time(jax.random.PRNGKey(0), 100_000, "uniform")
  assert 0 <= float(t.min()) and float(t.max()) <= 1
  np.testing.assert_allclose(float(t.mean()), 0.5, atol=0.01)
  t = flow.sample_time(jax.random.PRNGKey(0), 100_000, "logit_normal")
  np.testing.assert_allclose(float(jnp.median(t)), 0.5, atol=0.01)
  assert float(jnp.std(t)) < float(jnp.sqrt(1 / 12))  # concentrated in the middle
  with pytest.raises(ValueError, match="time_sampling"):
    flow.sample_time(jax.random.PRNGKey(0), 4, "beta")


def test_drop_labels_rate_and_null():
  labels = jnp.zeros((20_000,), jnp.int32)
  dropped = flow.drop_labels(jax.random.PRNGKey(0), labels, 0.1, null_label=10)
  assert set(np.unique(dropped)) == {0, 10}
  np.testing.assert_allclose(float(jnp.mean(dropped == 10)), 0.1, atol=0.01)
  np.testing.assert_array_equal(flow.drop_labels(jax.random.PRNGKey(0), labels, 0.0, 10), labels)


def _toy_conditional_velocity(t, z, y):
  """A label-dependent velocity; the null label (3) has its own field."""
  centres = jnp.array([-2.0, 0.0, 2.0, 0.5])
  tt = t.reshape((-1,) + (1,) * (z.ndim - 1))
  return -centres[y].reshape(tt.shape) + (1.0 + tt) * z


@pytest.mark.parametrize("t", [0.2, 0.8])
def test_guidance_scales(t):
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2, 1))
  y = jnp.array([0, 1, 2, 0, 1])
  tb = jnp.full((5,), t)
  v_cond = _toy_conditional_velocity(tb, z, y)
  v_uncond = _toy_conditional_velocity(tb, z, jnp.full_like(y, 3))
  g = lambda s: flow.guided_velocity(_toy_conditional_velocity, t, z, y, s, null_label=3)
  np.testing.assert_allclose(g(1.0), v_cond, atol=1e-6)
  np.testing.assert_allclose(g(0.0), v_uncond, atol=1e-6)
  np.testing.assert_allclose(g(2.5), v_uncond + 2.5 * (v_cond - v_uncond), atol=1e-5)
  # A traced scale takes the batched single-call path, and equals two separate calls.
  np.testing.assert_allclose(jax.jit(g)(1.0), v_cond, atol=1e-6)
  calls = []

  def counting(t, z, y):
    calls.append(z.shape[0])
    return _toy_conditional_velocity(t, z, y)

  flow.guided_velocity(counting, t, z, y, 1.7, null_label=3)
  assert calls == [10]  # one network call on the doubled batch
