"""Seam fine-tuning of the light model at the coarse-to-fine switch (paper 2's optional step).

The coarse-to-fine sampler (sampling.sample_coarse_to_fine) runs the light model on
t in (t_switch, 1] and the heavy one on [0, t_switch], with t_switch = 1 - light_fraction (LFM's
convention: t = 0 data, t = 1 noise). Seam fine-tuning teaches the light model to hand over
points the heavy model expects: data latents are carried by the heavy model's ODE from t = 0 back
to t_switch (`seam_points`), and the light model's velocity there is pulled towards the heavy
one's (`seam_loss`), next to the ordinary flow-matching loss on times just above the switch
(`near_switch_fm_loss`); `seam_finetune_loss` is their sum, the objective of one step.

Velocity functions follow flow.py: fn(t (B,), z (B, h, w, c), y (B,) int or None) -> v, NHWC.
Close over the network parameters (as a train step's loss function does) and differentiate
the loss with respect to them; the heavy model's output is held fixed (stop_gradient).
Everything here is a pure, jittable function, free of optimizer or loop state.
"""

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from lfm_jax import flow
from lfm_jax import sampling

# fn(t (B,), z (B, ...), y (B,) or None) -> v; with `args`: fn(t, z, y, args) -> v.
VelocityFn = Callable[..., jax.Array]


def _check_t_switch(t_switch) -> None:
  if isinstance(t_switch, (int, float)) and not 0.0 < float(t_switch) < 1.0:
    raise ValueError(f"seam: t_switch must lie in (0, 1) (t_switch = 1 - "
                     f"coarse_to_fine.light_fraction), got {t_switch}")


@functools.lru_cache(maxsize=64)
def _ode_field(heavy_fn: VelocityFn) -> Callable:
  """The diffrax field (t scalar, z, (labels, args)) of heavy_fn; one object per heavy_fn, so
  sampling.sample's compiled solve is reused across calls with the same heavy_fn."""

  def field(t, z, labels_args):
    labels, args = labels_args
    tb = jnp.full((z.shape[0],), t, z.dtype)
    if args is None:
      return heavy_fn(tb, z, labels)
    return heavy_fn(tb, z, labels, args)

  return field


def seam_points(heavy_fn: VelocityFn, z0: jax.Array, t_switch: float, *, num_steps: int,
                labels: Optional[jax.Array] = None, args: Any = None, solver: str = "euler",
                rtol: float = 1e-5, atol: float = 1e-5) -> tuple[jax.Array, dict]:
  """Carries data latents z0 (t = 0) to t_switch along the heavy model's ODE.

  dz/dt = heavy_fn(t, z, y) is integrated forward from t = 0 to t_switch with
  `sampling.sample(t_start=0, t_end=t_switch)` (diffrax): these are the points the heavy
  model would hand back to data, i.e. where the coarse-to-fine sampler switches models.

  Args:
    heavy_fn: fn(t (B,), z, y) -> v, or fn(t, z, y, args) -> v when `args` is given (pass the
      heavy parameters through `args` so the compiled solve is reused across batches).
    z0: (B, h, w, c) data latents (scaled as for training).
    t_switch: the switch time in (0, 1), 1 - light_fraction.
    num_steps: steps of the fixed-step solver on [0, t_switch].
    labels: (B,) int labels of z0, or None.
    solver: any sampling solver; fixed-step ones (euler, heun, midpoint, rk4) need num_steps.
  Returns:
    (z_switch (B, h, w, c), info) with sampling.sample's info (nfe, failed).
  """
  _check_t_switch(t_switch)
  return sampling.sample(_ode_field(heavy_fn), z0, solver=solver, num_steps=num_steps, rtol=rtol,
                         atol=atol, args=(labels, args), t_start=0.0, t_end=float(t_switch))


def seam_loss(light_fn: VelocityFn, heavy_fn: VelocityFn, z_switch: jax.Array, t_switch,
              *, labels: Optional[jax.Array] = None, weight: float = 0.1) -> jax.Array:
  """weight * mean over the batch of ||v_light(t_s, z) - v_heavy(t_s, z)||^2, a scalar.

  ||.||^2 is the mean over a sample's elements (flow.per_sample_loss), the normalisation of the
  flow-matching loss, so `weight` (paper 2: 0.1) sets the seam term's scale relative to it.
  The heavy velocity is a constant target (stop_gradient). With precomputed heavy velocities
  pass `lambda t, z, y: v_heavy` as heavy_fn.

  Args:
    light_fn, heavy_fn: fn(t (B,), z, y) -> v.
    z_switch: (B, h, w, c) points at t_switch (`seam_points`).
    t_switch: scalar switch time.
    labels: (B,) labels of the points, or None.
  """
  _check_t_switch(t_switch)
  t = jnp.full((z_switch.shape[0],), t_switch, z_switch.dtype)
  v_heavy = jax.lax.stop_gradient(heavy_fn(t, z_switch, labels))
  v_light = light_fn(t, z_switch, labels)
  return weight * jnp.mean(flow.per_sample_loss(v_light, v_heavy))


def near_switch_fm_loss(light_fn: VelocityFn, z0: jax.Array, rng: jax.Array, t_switch, *,
                        width: float = 0.1, labels: Optional[jax.Array] = None,
                        sigma_min: float = flow.SIGMA_MIN, class_dropout_prob: float = 0.0,
                        null_label: Optional[int] = None) -> tuple[jax.Array, dict]:
  """The light model's flow-matching loss on t ~ U[t_switch, min(t_switch + width, 1)].

  That band is the light model's side of the switch (it runs t in (t_switch, 1]).
  Returns flow.flow_matching_loss's (loss, aux), aux["t"] the times drawn.
  """
  _check_t_switch(t_switch)
  if isinstance(width, (int, float)) and not width > 0.0:
    raise ValueError(f"seam: width must be > 0, got {width}")
  t_hi = jnp.minimum(t_switch + width, 1.0)
  return flow.flow_matching_loss(light_fn, z0, rng, labels=labels, sigma_min=sigma_min,
                                 class_dropout_prob=class_dropout_prob, null_label=null_label,
                                 time_range=(t_switch, t_hi))


def seam_finetune_loss(light_fn: VelocityFn, heavy_fn: VelocityFn, z0: jax.Array,
                       z_switch: jax.Array, rng: jax.Array, t_switch, *,
                       labels: Optional[jax.Array] = None,
                       switch_labels: Optional[jax.Array] = None, width: float = 0.1,
                       weight: float = 0.1, sigma_min: float = flow.SIGMA_MIN,
                       class_dropout_prob: float = 0.0,
                       null_label: Optional[int] = None) -> tuple[jax.Array, dict]:
  """One fine-tuning objective: near_switch_fm_loss(z0) + seam_loss(z_switch).

  Args:
    light_fn: the light model being fine-tuned, fn(t (B,), z, y) -> v (closes over its params).
    heavy_fn: the frozen heavy model, same signature.
    z0: (B, h, w, c) data latents for the flow-matching term, labels `labels`.
    z_switch: (B', h, w, c) seam points at t_switch (e.g. seam_points of z0), labels
      `switch_labels` (default: `labels`).
    rng: drawn into the flow-matching term's times, noise and label dropout.
    width, weight: the time band above the switch and the seam weight.
  Returns:
    (loss, aux) with aux = {"fm_loss", "seam_loss", "t"}.
  """
  fm, aux = near_switch_fm_loss(light_fn, z0, rng, t_switch, width=width, labels=labels,
                                sigma_min=sigma_min, class_dropout_prob=class_dropout_prob,
                                null_label=null_label)
  seam = seam_loss(light_fn, heavy_fn, z_switch, t_switch,
                   labels=labels if switch_labels is None else switch_labels, weight=weight)
  return fm + seam, {"fm_loss": fm, "seam_loss": seam, "t": aux["t"]}


__all__ = ("seam_points", "seam_loss", "near_switch_fm_loss", "seam_finetune_loss")
