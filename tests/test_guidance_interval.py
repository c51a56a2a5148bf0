"""Guidance interval of flow.guided_velocity: CFG only on a band of t (LFM convention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfm_jax import flow

NULL = 3


def _net(t, z, y):
  """A label-dependent toy velocity with a nonlinear time dependence; label 3 is the null class."""
  centres = jnp.array([-2.0, 0.0, 2.0, 0.5])
  tt = t.reshape((-1,) + (1,) * (z.ndim - 1))
  return -centres[y].reshape(tt.shape) * jnp.cos(tt) + (1.0 + tt ** 2) * z


def _counting(calls):
  def fn(t, z, y):
    calls.append(z.shape[0])
    return _net(t, z, y)
  return fn


@pytest.fixture(scope="module")
def batch():
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2, 1))
  y = jnp.array([0, 1, 2, 0, 1])
  return z, y


def _cfg(t, z, y, s):
  tb = jnp.broadcast_to(jnp.asarray(t, z.dtype), (z.shape[0],))
  vc, vu = _net(tb, z, y), _net(tb, z, jnp.full_like(y, NULL))
  return vu + s * (vc - vu), vc


@pytest.mark.parametrize("t, inside", [(0.1, False), (0.3, True), (0.55, True), (0.7, True),
                                       (0.9, False)])
def test_interval_static_and_traced_t(batch, t, inside):
  z, y = batch
  band = (0.3, 0.7)
  guided, cond = _cfg(t, z, y, 2.5)
  expect = guided if inside else cond
  calls = []
  static = flow.guided_velocity(_counting(calls), t, z, y, 2.5, NULL, interval=band)
  np.testing.assert_allclose(static, expect, rtol=1e-6, atol=1e-6)
  assert calls == [10 if inside else 5]  # static t outside the band: one call on batch B
  # Traced t (as inside a jitted ODE solve): one call on batch 2B, the band picked by where.
  calls.clear()
  traced = jax.jit(lambda tt: flow.guided_velocity(_counting(calls), tt, z, y, 2.5, NULL,
                                                   interval=band))(jnp.float32(t))
  assert calls == [10]
  # Exactly the plain guided (inside) or conditional (outside) velocity, both jitted.
  if inside:
    ref = jax.jit(lambda tt: flow.guided_velocity(_net, tt, z, y, 2.5, NULL))(jnp.float32(t))
  else:
    ref = jax.jit(lambda tt: flow.guided_velocity(_net, tt, z, y, 1.0, NULL))(jnp.float32(t))
  np.testing.assert_array_equal(traced, ref)


def test_interval_per_example_times(batch):
  z, y = batch
  t = jnp.array([0.05, 0.3, 0.5, 0.7, 0.95])
  out = flow.guided_velocity(_net, t, z, y, 2.0, NULL, interval=(0.3, 0.7))
  guided, cond = _cfg(t, z, y, 2.0)
  mask = np.array([False, True, True, True, False])[:, None, None, None]
  np.testing.assert_allclose(out, np.where(mask, guided, cond), rtol=1e-6, atol=1e-6)
  traced = jax.jit(lambda tt: flow.guided_velocity(_net, tt, z, y, 2.0, NULL,
                                                   interval=(0.3, 0.7)))(t)
  np.testing.assert_allclose(traced, out, rtol=1e-6, atol=1e-6)  # jit vs eager: fusion rounding


def test_full_interval_equals_plain_cfg(batch):
  z, y = batch
  for t in (0.0, 0.4, 1.0):
    plain = flow.guided_velocity(_net, t, z, y, 1.7, NULL)
    np.testing.assert_array_equal(flow.guided_velocity(_net, t, z, y, 1.7, NULL, interval=(0, 1)),
                                  plain)
    jitted = jax.jit(lambda tt, s: flow.guided_velocity(_net, tt, z, y, s, NULL,
                                                        interval=(0.0, 1.0)))
    np.testing.assert_array_equal(jitted(jnp.float32(t), jnp.float32(1.7)),
                                  jax.jit(lambda tt, s: flow.guided_velocity(_net, tt, z, y, s,
                                                                             NULL))(
                                      jnp.float32(t), jnp.float32(1.7)))
  # A traced interval is allowed too.
  band = jax.jit(lambda lo, hi: flow.guided_velocity(_net, 0.5, z, y, 3.0, NULL,
                                                     interval=(lo, hi)))
  np.testing.assert_allclose(band(0.6, 0.9), _cfg(0.5, z, y, 3.0)[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(band(0.0, 0.5), _cfg(0.5, z, y, 3.0)[0], rtol=1e-6, atol=1e-6)


def test_interval_errors(batch):
  z, y = batch
  for bad in [(0.7, 0.3), (-0.1, 0.5), (0.2, 1.5), (0.1,)]:
    with pytest.raises(ValueError, match="interval"):
      flow.guided_velocity(_net, 0.5, z, y, 2.0, NULL, interval=bad)
