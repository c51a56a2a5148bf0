"""A tiny U-Net trained by flow matching reproduces a 2-mode latent distribution."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lfm_jax import flow, models, sampling

SHAPE = (4, 4, 2)
MODE_A, MODE_B, P_A, SPREAD = -1.5, 1.5, 0.3, 0.2


def two_mode_data(rng, n):
  k1, k2 = jax.random.split(rng)
  which = jax.random.bernoulli(k1, P_A, (n,))
  centre = jnp.where(which, MODE_A, MODE_B).reshape(n, 1, 1, 1)
  return centre + SPREAD * jax.random.normal(k2, (n,) + SHAPE)


def test_tiny_unet_learns_two_modes():
  cfg = ml_collections.ConfigDict(dict(
      name="unet", model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
      attention_resolutions=(), num_classes=0, mid_attention=False, norm_num_groups=8))
  model = models.create_model(cfg, SHAPE)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,)))
  params = params["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, rng):
    k_data, k_loss = jax.random.split(rng)
    z0 = two_mode_data(k_data, 256)
    def loss_fn(p):
      return flow.flow_matching_loss(lambda t, z, y: model.apply({"params": p}, z, t), z0, k_loss)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = jax.random.PRNGKey(1)
  losses = []
  for i in range(400):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
    losses.append(loss)
  losses = np.asarray(losses)
  assert losses[-50:].mean() < 0.7 * losses[:20].mean()

  noise = jax.random.normal(jax.random.PRNGKey(2), (2000,) + SHAPE)
  fn = lambda t, z, p: model.apply({"params": p}, z, jnp.broadcast_to(t, (z.shape[0],)))
  z, info = sampling.sample(fn, noise, solver="heun", num_steps=25, args=params)
  per_sample_mean = np.asarray(z).reshape(len(z), -1).mean(axis=1)
  in_a = per_sample_mean < 0
  frac_a = in_a.mean()
  mean_a, mean_b = per_sample_mean[in_a].mean(), per_sample_mean[~in_a].mean()
  print(f"fraction in mode A {frac_a:.3f} (data {P_A}); means {mean_a:.3f}, {mean_b:.3f} "
        f"(data {MODE_A}, {MODE_B}); NFE {int(info['nfe'])}")
  assert abs(frac_a - P_A) < 0.06
  assert abs(mean_a - MODE_A) < 0.2 and abs(mean_b - MODE_B) < 0.2
  # Samples sit near the modes, not in between.
  assert np.mean(np.abs(per_sample_mean) < 0.5) < 0.05
