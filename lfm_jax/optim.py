"""Optimizer, learning-rate schedule and EMA from a `config.train`-like section.

Keys read (all declared in configs/default.py): optimizer ("adamw" | "adam"), learning_rate,
schedule ("constant" | "cosine"), warmup_steps, end_learning_rate, num_steps, weight_decay,
grad_clip_norm (0 disables), b1, b2, eps, ema_decay, ema_warmup.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("constant", "cosine")


def create_learning_rate_schedule(cfg: Any) -> optax.Schedule:
  """Constant, or linear warm-up then cosine decay to cfg.end_learning_rate at cfg.num_steps.

  A constant schedule with warmup_steps > 0 ramps linearly from 0 and then stays.
  """
  lr = float(cfg.learning_rate)
  warmup = int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    if warmup > 0:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if cfg.schedule == "cosine":
    decay_steps = max(int(cfg.num_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup > 0 else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=decay_steps, end_value=float(cfg.end_learning_rate))
  raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")


def create_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (or Adam) with the schedule above and optional global-norm clipping: (tx, schedule)."""
  schedule = create_learning_rate_schedule(cfg)
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
  wd = float(cfg.weight_decay) if cfg.optimizer == "adamw" else 0.0
  opt = optax.adamw(schedule, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                    weight_decay=wd)
  clip = float(cfg.grad_clip_norm)
  tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
  return tx, schedule


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The EMA decay used at (0-based) `step`: decay, or min(decay, (1+step)/(10+step)) if warmup."""
  decay = jnp.asarray(decay, jnp.float32)
  if warmup:
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def ema_update(ema_params: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params (leafwise, in the EMA's dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema_params, params)
