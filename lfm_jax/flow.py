"""Flow matching in LFM's convention: the path, its target velocity, the loss, guidance.

Time convention (the only one inside lfm_jax): t = 0 is data, t = 1 is noise, sigma_min = 1e-5.

    z_t = (1 - t) * z0 + (sigma_min + (1 - sigma_min) * t) * eps
    u   = dz_t/dt = (1 - sigma_min) * eps - z0

Sampling integrates dz/dt = v(t, z) from t = 1 (z = eps) to t = 0 (lfm_jax/sampling.py).
All arrays are NHWC (or any shape with a leading batch axis); t has shape (B,) or is a scalar and
is broadcast over the trailing axes. Everything here is a pure, jittable function.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 1e-5

# velocity_fn(t, z, y) -> v, with t of shape (B,), z (B, ...), y (B,) int labels or None.
ConditionalVelocityFn = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def _expand_time(t: jax.Array, z: jax.Array) -> jax.Array:
  """Broadcasts t (scalar or (B,)) against z of shape (B, ...)."""
  t = jnp.asarray(t, dtype=z.dtype)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (z.ndim - t.ndim))


def interpolate(z0: jax.Array, noise: jax.Array, t: jax.Array, sigma_min: float = SIGMA_MIN) -> jax.Array:
  """Point z_t on the conditional path from data z0 (t = 0) to noise (t = 1).

  Args:
    z0: data latents, (B, ...).
    noise: standard normal noise, same shape as z0.
    t: times in [0, 1], scalar or (B,).
    sigma_min: the path's residual noise scale at t = 0.
  Returns:
    z_t = (1 - t) z0 + (sigma_min + (1 - sigma_min) t) noise, same shape as z0.
  """
  t = _expand_time(t, z0)
  return (1.0 - t) * z0 + (sigma_min + (1.0 - sigma_min) * t) * noise


def target_velocity(z0: jax.Array, noise: jax.Array, sigma_min: float = SIGMA_MIN) -> jax.Array:
  """The conditional target u = d z_t / dt = (1 - sigma_min) noise - z0 (independent of t)."""
  return (1.0 - sigma_min) * noise - z0


def sample_time(rng: jax.Array, batch_size: int, method: str = "uniform",
                logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
  """Training times, shape (batch_size,), in [0, 1].

  method: "uniform" (LFM) or "logit_normal" (t = sigmoid(N(logit_mean, logit_std^2))).
  """
  if method == "uniform":
    return jax.random.uniform(rng, (batch_size,))
  if method == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,)))
  raise ValueError(f"flow.time_sampling must be 'uniform' or 'logit_normal', got {method!r}")


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float, null_label: int) -> jax.Array:
  """Classifier-free-guidance label dropout: each label becomes null_label with probability prob."""
  if prob <= 0.0:
    return labels
  drop = jax.random.bernoulli(rng, prob, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def per_sample_loss(v: jax.Array, u: jax.Array) -> jax.Array:
  """Mean squared error over all non-batch axes: (B, ...) -> (B,)."""
  sq = jnp.square(v.astype(jnp.float32) - u.astype(jnp.float32))
  return jnp.mean(sq.reshape(sq.shape[0], -1), axis=1)


def flow_matching_loss(
    velocity_fn: ConditionalVelocityFn,
    z0: jax.Array,
    rng: jax.Array,
    *,
    labels: Optional[jax.Array] = None,
    sigma_min: float = SIGMA_MIN,
    time_sampling: str = "uniform",
    class_dropout_prob: float = 0.0,
    null_label: Optional[int] = None,
    per_sample: bool = False,
    time_range: Optional[tuple[float, float]] = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """LFM's flow-matching loss: mean((v(t, z_t, y) - u)^2) over all elements.

  Args:
    velocity_fn: (t (B,), z_t (B, ...), y (B,) or None) -> v, same shape as z_t.
    z0: data latents (B, ...), already scaled.
    rng: drawn into t, noise and label dropout.
    labels: (B,) int labels, or None for unconditional models.
    class_dropout_prob: probability of replacing a label by null_label (CFG training).
    null_label: the null class index (num_classes); needed when class_dropout_prob > 0.
    per_sample: if True the loss returned has shape (B,) (for sample scoring), else it is scalar.
    time_range: optional (t_lo, t_hi): times drawn by `time_sampling` on [0, 1] are mapped to
      t_lo + (t_hi - t_lo) t (e.g. a band next to the coarse-to-fine switch, lfm_jax/seam.py).
  Returns:
    (loss, aux) with aux = {"t": t, "per_sample": (B,) losses}.
  """
  rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
  t = sample_time(rng_t, z0.shape[0], time_sampling)
  if time_range is not None:
    t = time_range[0] + (time_range[1] - time_range[0]) * t
  noise = jax.random.normal(rng_noise, z0.shape, z0.dtype)
  if labels is not None and class_dropout_prob > 0.0:
    if null_label is None:
      raise ValueError("null_label is required when class_dropout_prob > 0")
    labels = drop_labels(rng_drop, labels, class_dropout_prob, null_label)
  z_t = interpolate(z0, noise, t, sigma_min)
  u = target_velocity(z0, noise, sigma_min)
  losses = per_sample_loss(velocity_fn(t, z_t, labels), u)
  aux = {"t": t, "per_sample": losses}
  return (losses if per_sample else jnp.mean(losses)), aux


def guided_velocity(
    velocity_fn: ConditionalVelocityFn,
    t: jax.Array,
    z: jax.Array,
    labels: jax.Array,
    guidance_scale: float,
    null_label: int,
    interval: Optional[tuple[float, float]] = None,
) -> jax.Array:
  """Classifier-free guided velocity v_u + s (v_c - v_u), in one batched network call.

  The network sees [z; z] with labels [y; null] (batch 2B). With s == 1 this is the
  conditional velocity (no doubling is done); s == 0 gives the unconditional one.

  Guidance interval: with `interval = (t_lo, t_hi)` guidance is applied only where
  t_lo <= t <= t_hi (closed band, LFM's convention: t = 0 data, t = 1 noise); elsewhere the
  result is the conditional velocity v_c (scale 1). A band given in the t = 0 noise convention
  of SiT / paper 2, [a, b], is (1 - b, 1 - a) here. `interval = None` or (0, 1) is plain CFG
  at every t. When t is static (a Python or NumPy number, or a concrete array) the band is
  decided in Python: outside it the network runs once on batch B. When t is traced (inside a
  jitted sampler) the network runs once on batch 2B and jnp.where picks, per example, the
  guided or the conditional half, so the function stays jittable with no data-dependent shape.

  Args:
    velocity_fn: (t (B,), z (B, ...), y (B,)) -> v.
    t: scalar or (B,).
    z: (B, ...).
    labels: (B,) int labels.
    guidance_scale: s (a Python float or a traced scalar).
    null_label: the null class index.
    interval: optional (t_lo, t_hi) band of t where guidance applies (floats or scalar arrays).
  Returns:
    the velocity, same shape and dtype as velocity_fn's output.
  """
  b = z.shape[0]
  if isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0:
    return velocity_fn(jnp.broadcast_to(jnp.asarray(t, z.dtype), (b,)), z, labels)
  in_band = None  # None: guidance everywhere
  if interval is not None:
    if len(interval) != 2:
      raise ValueError(f"guidance interval must be (t_lo, t_hi), got {interval!r}")
    lo, hi = interval
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval!r}")
    t_static = _concrete_or_none(t)
    lo_static, hi_static = _concrete_or_none(lo), _concrete_or_none(hi)
    if t_static is not None and lo_static is not None and hi_static is not None:
      inside = (t_static >= lo_static) & (t_static <= hi_static)
      if not np.any(inside):
        return velocity_fn(jnp.broadcast_to(jnp.asarray(t, z.dtype), (b,)), z, labels)
      if not np.all(inside):
        in_band = jnp.asarray(np.broadcast_to(inside, (b,)))
    else:
      tb = jnp.broadcast_to(jnp.asarray(t), (b,))
      in_band = (tb >= lo) & (tb <= hi)
  t = jnp.broadcast_to(jnp.asarray(t, z.dtype), (b,))
  null = jnp.full_like(labels, null_label)
  v = velocity_fn(jnp.concatenate([t, t]), jnp.concatenate([z, z]), jnp.concatenate([labels, null]))
  v_cond, v_uncond = v[:b], v[b:]
  guided = v_uncond + guidance_scale * (v_cond - v_uncond)
  if in_band is None:
    return guided
  return jnp.where(in_band.reshape((b,) + (1,) * (guided.ndim - 1)), guided, v_cond)


def _concrete_or_none(x) -> Optional[np.ndarray]:
  """x as a NumPy array when its value is known at trace time, else None (a tracer)."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


def gaussian_marginal_velocity(t: jax.Array, z: jax.Array, mean: jax.Array, std: jax.Array,
                               sigma_min: float = SIGMA_MIN) -> jax.Array:
  """Exact marginal velocity of this path when the data is N(mean, std^2) per dimension.

  With a_t = 1 - t and b_t = sigma_min + (1 - sigma_min) t, z_t ~ N(a_t m, a_t^2 s^2 + b_t^2) and
  E[u | z_t] = -m + c_t (z_t - a_t m) with c_t = (b_t (1 - sigma_min) - a_t s^2) / (a_t^2 s^2 + b_t^2).
  Used as an analytic velocity field in tests and benchmarks. t is a scalar or (B,).
  """
  t = _expand_time(t, z)
  a = 1.0 - t
  b = sigma_min + (1.0 - sigma_min) * t
  var = a * a * std * std + b * b
  c = (b * (1.0 - sigma_min) - a * std * std) / var
  return -mean + c * (z - a * mean)
