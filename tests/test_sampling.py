"""diffrax sampling on analytic velocity fields."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import ynn_fused
from lfm_jax import flow, sampling

SIGMA = flow.SIGMA_MIN
M, S = 1.5, 0.6


def gaussian_fn(m, s):
  return lambda t, z: flow.gaussian_marginal_velocity(t, z, m, s)


def pushforward(noise, m, s):
  """The exact ODE map of N(m, s^2) data: eps -> m + sqrt(s^2 + sigma_min^2) eps."""
  return m + np.sqrt(s * s + SIGMA * SIGMA) * noise


def gaussian_flow(z, t_from, t_to, m, s):
  """Exact flow of the N(m, s^2) marginal velocity from t_from to t_to (affine in z)."""
  def var(t):
    a, b = 1 - t, SIGMA + (1 - SIGMA) * t
    return a * a * s * s + b * b
  return (1 - t_to) * m + np.sqrt(var(t_to) / var(t_from)) * (z - (1 - t_from) * m)


@pytest.fixture(scope="module")
def noise():
  return jax.random.normal(jax.random.PRNGKey(0), (256, 2, 2, 2))


@pytest.mark.parametrize("solver", ["dopri5", "tsit5"])
def test_adaptive_solver_maps_noise_to_data(noise, solver):
  z, info = sampling.sample(gaussian_fn(M, S), noise, solver=solver, rtol=1e-5, atol=1e-5)
  err = float(jnp.max(jnp.abs(z - pushforward(noise, M, S))))
  assert err < 1e-3, err
  assert 10 < int(info["nfe"]) < 200
  assert not bool(info["failed"])


def test_euler_converges_at_first_order(noise):
  exact = pushforward(noise, M, S)
  errs = []
  for n in [10, 20, 40, 80]:
    z, info = sampling.sample(gaussian_fn(M, S), noise, solver="euler", num_steps=n)
    assert int(info["nfe"]) == n
    errs.append(float(jnp.max(jnp.abs(z - exact))))
  ratios = np.array(errs[:-1]) / np.array(errs[1:])
  assert np.all((ratios > 1.7) & (ratios < 2.3)), (errs, ratios)


@pytest.mark.parametrize("solver,order,n", [("heun", 2, 16), ("midpoint", 2, 8), ("rk4", 4, 4)])
def test_fixed_step_solvers_converge_at_least_at_their_order(noise, solver, order, n):
  exact = pushforward(noise, M, S)
  errs = [float(jnp.max(jnp.abs(sampling.sample(gaussian_fn(M, S), noise, solver=solver,
                                                num_steps=k)[0] - exact))) for k in (n, 2 * n)]
  assert errs[0] / errs[1] > 0.6 * 2 ** order, errs


@pytest.mark.parametrize("solver,num_steps,tol", [
    ("euler", 7, None), ("heun", 5, None), ("midpoint", 5, None), ("rk4", 3, None),
    ("dopri5", None, 1e-5), ("tsit5", None, 1e-5), ("dopri5", None, 1e-3)])
def test_reported_nfe_equals_counted_evaluations(solver, num_steps, tol):
  count = [0]

  def bump():
    count[0] += 1
    return np.int32(0)

  def counting(t, z):
    io_callback(bump, jax.ShapeDtypeStruct((), jnp.int32), ordered=True)
    return flow.gaussian_marginal_velocity(t, z, M, S) * (1 + 0.5 * jnp.sin(6 * t))

  z0 = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  z, info = sampling.sample(counting, z0, solver=solver, num_steps=num_steps,
                            rtol=tol or 1e-5, atol=tol or 1e-5)
  z.block_until_ready()
  assert int(info["nfe"]) == count[0]


def test_compiled_once_and_reused_with_new_args(noise):
  def fn(t, z, params):
    return flow.gaussian_marginal_velocity(t, z, params["m"], params["s"])

  sampling._sample_jit().clear_cache()
  for m in (0.0, 1.0, 2.0):
    z, _ = sampling.sample(fn, noise, solver="euler", num_steps=4, args={"m": jnp.float32(m),
                                                                         "s": jnp.float32(S)})
  assert sampling._sample_jit()._cache_size() == 1
  z, _ = sampling.sample(fn, noise, solver="dopri5", args={"m": jnp.float32(M), "s": jnp.float32(S)})
  np.testing.assert_allclose(z, pushforward(noise, M, S), atol=1e-3)


def test_sharded_batch_matches_single_device(noise):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # Auto axes, as lfm_jax.parallel
  sharded = jax.device_put(noise, NamedSharding(mesh, P("data")))
  z_ref, _ = sampling.sample(gaussian_fn(M, S), noise, solver="heun", num_steps=10)
  z, _ = sampling.sample(gaussian_fn(M, S), sharded, solver="heun", num_steps=10)
  assert len(z.sharding.device_set) == jax.device_count()
  np.testing.assert_allclose(z, z_ref, atol=1e-6)


def test_bad_arguments_raise():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="unknown solver"):
    sampling.sample(gaussian_fn(M, S), z, solver="rk45x")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.sample(gaussian_fn(M, S), z, solver="euler")
  with pytest.raises(ValueError, match="light_fraction"):
    sampling.sample_coarse_to_fine(gaussian_fn(M, S), gaussian_fn(M, S), z, light_fraction=1.5,
                                   solver="euler", num_steps=10)


# --- coarse-to-fine ---

@pytest.mark.parametrize("solver,num_steps", [("euler", 50), ("heun", 20), ("dopri5", None)])
def test_coarse_to_fine_with_equal_models_is_single_model_sampling(noise, solver, num_steps):
  fn = gaussian_fn(M, S)
  z_ref, info_ref = sampling.sample(fn, noise, solver=solver, num_steps=num_steps)
  z, info = sampling.sample_coarse_to_fine(fn, fn, noise, light_fraction=0.7, solver=solver,
                                           num_steps=num_steps)
  tol = 1e-6 if num_steps else 1e-4  # adaptive: two segments pick other steps, same accuracy
  np.testing.assert_allclose(z, z_ref, atol=tol)
  if num_steps:
    assert int(info["nfe_light"]) + int(info["nfe_heavy"]) == int(info_ref["nfe"])
    assert int(info["nfe_light"]) == round(0.7 * num_steps) * int(info_ref["nfe"]) // num_steps


def test_coarse_to_fine_endpoints_reduce_to_single_models(noise):
  light, heavy = gaussian_fn(0.0, 1.0), gaussian_fn(M, S)
  for frac, ref_fn in [(0.0, heavy), (1.0, light)]:
    z, info = sampling.sample_coarse_to_fine(light, heavy, noise, light_fraction=frac,
                                             solver="euler", num_steps=20)
    z_ref, _ = sampling.sample(ref_fn, noise, solver="euler", num_steps=20)
    np.testing.assert_allclose(z, z_ref, atol=1e-6)
    assert int(info["nfe_light"]) == (20 if frac == 1.0 else 0)
    assert int(info["nfe_heavy"]) == (0 if frac == 1.0 else 20)


@pytest.mark.parametrize("frac", [0.3, 0.7])
def test_coarse_to_fine_equals_analytic_composition(noise, frac):
  (m1, s1), (m2, s2) = (-1.0, 1.3), (M, S)
  z, info = sampling.sample_coarse_to_fine(gaussian_fn(m1, s1), gaussian_fn(m2, s2), noise,
                                           light_fraction=frac, solver="dopri5")
  t_switch = 1.0 - frac
  expected = gaussian_flow(gaussian_flow(np.asarray(noise), 1.0, t_switch, m1, s1),
                           t_switch, 0.0, m2, s2)
  assert float(jnp.max(jnp.abs(z - expected))) < 1e-3
  assert int(info["nfe_light"]) > 0 and int(info["nfe_heavy"]) > 0
  assert info["t_switch"] == pytest.approx(t_switch)


def test_coarse_to_fine_per_segment_step_counts(noise):
  light, heavy = gaussian_fn(0.0, 1.0), gaussian_fn(M, S)
  z, info = sampling.sample_coarse_to_fine(light, heavy, noise, light_fraction=0.7,
                                           solver="euler", num_steps=(14, 6))
  assert (int(info["nfe_light"]), int(info["nfe_heavy"])) == (14, 6)
  assert info["t_switch"] == pytest.approx(0.3)


def test_samplers_compile_with_the_inference_options_and_keep_the_numbers():
  """On CPU the samplers' programs are compiled with parallel.inference_compiler_options()
  (YNNPACK for convolutions only); a small DiT's Euler sample equals the one compiled with XLA's
  defaults."""
  from lfm_jax import parallel  # pylint: disable=g-import-not-at-top
  from lfm_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  opts = parallel.inference_compiler_options()
  assert opts == {"xla_cpu_experimental_ynn_fusion_type":
                  "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}  # the tests run on CPU
  module = DiT(hidden_size=64, depth=2, num_heads=2, patch_size=2)
  z0 = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 4))
  params = module.init(jax.random.PRNGKey(0), z0, jnp.zeros((4,)))["params"]
  leaves, treedef = jax.tree.flatten(params)  # off DiT's zero init, so the output is not 0
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])

  def velocity(t, x, p):
    return module.apply({"params": p}, x, jnp.broadcast_to(jnp.float32(t), (x.shape[0],)))

  ours, _ = sampling.sample(velocity, z0, solver="euler", num_steps=3, args=params)
  static = dict(solver="euler", num_steps=3, rtol=1e-5, atol=1e-5, max_steps=4096, t_start=1.0,
                t_end=0.0)
  lowered = jax.jit(sampling._sample, static_argnames=("velocity_fn",) + tuple(static)).lower(
      velocity, z0, params, **static)
  compiled_default = lowered.compile()
  default = compiled_default(z0, params)[0]
  np.testing.assert_allclose(ours, default, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(ours - z0).max()) > 0.1  # the network moved the latents
  # The options reach the compiled program: XLA's defaults run the dots in YNNPACK, ours not.
  assert ynn_fused(compiled_default.as_text(), "dot")
  ours_text = sampling._sample_jit().lower(velocity, z0, params, **static).compile().as_text()
  assert not ynn_fused(ours_text, "dot")

