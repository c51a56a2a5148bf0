"""Flow-model training: the flow-matching step and `train_and_evaluate` on the shared skeleton.

The step trains a velocity network v(t, z, y) with LFM's flow-matching loss (lfm_jax/flow.py;
t = 0 data, t = 1 noise). It is jitted once over the ("data", "fsdp") mesh (lfm_jax/parallel.py):
batches sharded on their leading axis, the state sharded by the FSDP rule (replicated at
fsdp = 1) and donated. Restore-or-init, logging, checkpoints and preemption live in
lfm_jax/trainer.py.

Batches (dicts of host-local numpy arrays, NHWC, leading axis = this host's rows):
  {"latent": (B, h, w, c) float32}   already-scaled z0, or
  {"mean": ..., "logvar": ...}       the latent cache's posterior; z0 = s * (mean + exp(logvar/2) eps)
                                     is drawn afresh every step (s = the scale factor) as LFM does,
                                     or s * mean when config.autoencoder.sample_posterior is False;
  "label": (B,) int                  required when config.model.num_classes > 0;
  "cond":  (B, h, w, Cc) optional    concatenated conditioning channels, or the task's keys
                                     (masked_mean/masked_logvar/mask_channel, segmentation) that
                                     lfm_jax/tasks.py's batch_cond turns into them.
"""

from typing import Any, Callable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import flow
from lfm_jax import latents as latents_lib
from lfm_jax import optim
from lfm_jax import parallel
from lfm_jax import precision
from lfm_jax import tasks
from lfm_jax import trainer
from lfm_jax import workdir as workdir_lib
from lfm_jax.trainer import TrainState

__all__ = ["TrainState", "init_params", "create_train_state", "train_state_from_params",
           "batch_latents", "make_train_step", "jit_train_step", "abstract_train_state",
           "checkpoint_metadata", "train_and_evaluate"]


def _dummy_inputs(config: Any, latent_shape: tuple[int, ...]) -> dict[str, Any]:
  x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if int(config.model.num_classes) > 0 else None
  return dict(x=x, t=t, y=y, cond=tasks.dummy_cond(config, latent_shape))


def init_params(model: nn.Module, rng: jax.Array, config: Any, latent_shape: tuple[int, ...]) -> Any:
  """The model's float32 params from a batch-1 dummy input (call under jax.jit: it is ~100x faster)."""
  inputs = _dummy_inputs(config, latent_shape)
  variables = model.init({"params": rng, "dropout": rng}, inputs["x"], inputs["t"],
                         y=inputs["y"], cond=inputs["cond"], train=False)
  return variables["params"]


def _state_constructor(model, config, latent_shape, tx, with_params: bool) -> Callable:
  """create(rng[, params]) -> TrainState at step 0; the rng split is the same either way."""
  if with_params:
    def create(rng, params):
      params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
      return trainer.new_state(params, tx, jax.random.split(rng)[1])
  else:
    def create(rng):
      rng_init, rng_train = jax.random.split(rng)
      return trainer.new_state(init_params(model, rng_init, config, latent_shape), tx, rng_train)
  return create


def create_train_state(rng: jax.Array, model: nn.Module, config: Any,
                       latent_shape: tuple[int, ...], *,
                       tx: Optional[optax.GradientTransformation] = None,
                       mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
  """A fresh TrainState, built under jax.jit (sharded by the FSDP rule over `mesh` when given)."""
  tx = tx or optim.create_optimizer(config.train)[0]
  create = _state_constructor(model, config, latent_shape, tx, with_params=False)
  shardings = None if mesh is None else jax.tree.map(
      lambda s: s.sharding, trainer.abstract_state(create, (rng,), mesh))
  return jax.jit(create, out_shardings=shardings)(rng)


def train_state_from_params(rng: jax.Array, params: Any, config: Any, *,
                            tx: Optional[optax.GradientTransformation] = None,
                            mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
  """A TrainState at step 0 starting from given params (fine-tuning an imported checkpoint)."""
  tx = tx or optim.create_optimizer(config.train)[0]
  create = _state_constructor(None, config, None, tx, with_params=True)
  shardings = None if mesh is None else jax.tree.map(
      lambda s: s.sharding, trainer.abstract_state(create, (rng, params), mesh))
  return jax.jit(create, out_shardings=shardings)(rng, params)


def abstract_train_state(rng: jax.Array, model: nn.Module, config: Any,
                         latent_shape: tuple[int, ...], tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> TrainState:
  """ShapeDtypeStructs (FSDP-rule shardings on `mesh`) of the TrainState, without computing it."""
  create = _state_constructor(model, config, latent_shape, tx, with_params=False)
  return trainer.abstract_state(create, (rng,), mesh)


def batch_latents(batch: Mapping[str, jax.Array], rng: jax.Array, scale_factor: float = 1.0,
                  sample_posterior: bool = True) -> jax.Array:
  """z0 from a batch: batch["latent"] as is, or s * (mean + exp(logvar / 2) * eps) (fresh eps)."""
  if "latent" in batch:
    return batch["latent"].astype(jnp.float32)
  if "mean" not in batch:
    raise KeyError(f"batch needs 'latent' or 'mean'/'logvar', has {sorted(batch)}")
  if sample_posterior:
    return latents_lib.sample_latents(rng, batch["mean"], batch["logvar"], scale_factor)
  return scale_factor * batch["mean"].astype(jnp.float32)


def make_train_step(model: nn.Module, config: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, scale_factor: float = 1.0,
                    mesh: Optional[jax.sharding.Mesh] = None
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
  """The pure step `(state, batch) -> (state, metrics)` (not jitted; see jit_train_step).

  Randomness: fold_in(state.rng, state.step) split into posterior noise, the loss's (t, eps,
  label dropout) and dropout. Metrics (replicated scalars): loss, grad_norm (before clipping),
  learning_rate (the one this step used), finite (bool). A non-finite loss or gradient leaves
  params, EMA and optimizer state unchanged (the loop stops on it).
  """
  tcfg, fcfg = config.train, config.flow
  num_classes = int(config.model.num_classes)
  accum = int(tcfg.grad_accum_steps)
  cdt = precision.dtype_from_name(tcfg.compute_dtype, "train.compute_dtype")
  ema_decay, ema_warmup = float(tcfg.ema_decay), bool(tcfg.ema_warmup)
  sample_posterior = bool(config.autoencoder.sample_posterior)
  class_dropout = float(fcfg.class_dropout_prob) if num_classes > 0 else 0.0

  def loss_fn(params, z0, labels, cond, rng):
    rng_loss, rng_dropout = jax.random.split(rng)
    p = precision.cast_floating(params, cdt)
    cond_c = None if cond is None else cond.astype(cdt)

    def velocity(t, z, y):
      v = model.apply({"params": p}, z.astype(cdt), t, y=y, cond=cond_c, train=True,
                      rngs={"dropout": rng_dropout})
      return v.astype(jnp.float32)

    loss, _ = flow.flow_matching_loss(
        velocity, z0, rng_loss, labels=labels, sigma_min=float(fcfg.sigma_min),
        time_sampling=fcfg.time_sampling, class_dropout_prob=class_dropout,
        null_label=num_classes)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)
  if bool(config.mesh.deterministic_reduction):
    if mesh is None:
      raise ValueError("mesh.deterministic_reduction=True needs the mesh (make_train_step(mesh=...))")
    whole = grad_fn
    per_shard = parallel.shard_mean(lambda p, r, b: whole(p, *b, r), mesh)
    grad_fn = lambda p, z, y, c, r: per_shard(p, r, (z, y, c))

  def micro_split(x):
    # (B, ...) -> (accum, B / accum, ...): micro-batch i holds rows i, i + accum, ... so every
    # micro-batch stays evenly sharded over the batch axes.
    if x is None:
      return None
    b = x.shape[0]
    if b % accum:
      raise ValueError(f"batch size {b} not divisible by train.grad_accum_steps={accum}")
    x = jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXES)))
    return x

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    rng_latent, rng_loss = jax.random.split(rng)
    z0 = batch_latents(batch, rng_latent, scale_factor, sample_posterior)
    labels = batch["label"].astype(jnp.int32) if num_classes > 0 else None
    cond = tasks.batch_cond(batch, jax.random.fold_in(rng_latent, 1), scale_factor,
                            sample_posterior)
    if accum == 1:
      loss, grads = grad_fn(state.params, z0, labels, cond, rng_loss)
    else:
      micro = (micro_split(z0), micro_split(labels), micro_split(cond))

      def body(carry, inputs):
        i, (z, y, c) = inputs
        l, g = grad_fn(state.params, z, y, c, jax.random.fold_in(rng_loss, i))
        return jax.tree.map(jnp.add, carry, (l, g)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    decay = optim.ema_decay_at(state.step, ema_decay, ema_warmup)
    new_state, info = trainer.apply_gradients(state, loss, grads, tx, decay)
    metrics = {"loss": loss, "grad_norm": info["grad_norm"],
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "finite": info["finite"]}
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh,
                   state: Optional[Any] = None) -> Callable:
  """jax.jit with explicit shardings (state by the FSDP rule, batch on the batch axes), the
  state donated and parallel.train_compiler_options(). `state` (arrays or abstract) gives the
  state's structure; without it the state is replicated."""
  shardings = (parallel.replicated(mesh) if state is None
               else parallel.state_sharding(state, mesh))
  return jax.jit(train_step, in_shardings=(shardings, parallel.data_sharded(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0,
                 compiler_options=parallel.train_compiler_options())


def checkpoint_metadata(config: Any, latent_shape: tuple[int, ...],
                        scale_factor: Optional[float] = None) -> dict[str, Any]:
  """What a flow checkpoint records about its model: config.model + latent shape (hashed, and
  compared on restore) and the scale factor it was trained with (what a sampler divides by)."""
  section = {"model": config.model.to_dict(), "latent_shape": list(latent_shape)}
  digest, plain = ckpt_lib.config_fingerprint(section)
  meta = {"config": plain, "fingerprint": digest}
  if scale_factor is not None:
    meta["scale_factor"] = float(scale_factor)
  return meta


def _peek_latent_shape(data: Any) -> tuple[int, ...]:
  state = data.state()
  first = next(data)
  data.restore(state)
  return tuple(int(d) for d in np.shape(first["latent" if "latent" in first else "mean"])[1:])


def train_and_evaluate(config: Any, workdir: Any, data: Iterator[Mapping[str, np.ndarray]], *,
                       model: Optional[nn.Module] = None,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       scale_factor: Optional[float] = None,
                       sample_fn: Optional[Callable[[Any, int], Optional[np.ndarray]]] = None,
                       initial_params: Optional[Any] = None,
                       stop_after: Optional[int] = None) -> TrainState:
  """Trains the velocity network by flow matching; resumes from <workdir>/checkpoints.

  Args:
    config: the full config (seed, model, flow, train, autoencoder.scale_factor /
      sample_posterior).
    workdir: a path or lfm_jax.workdir.Workdir; checkpoints/, metrics.jsonl, TensorBoard and
      samples/ go there.
    data: an iterator of host-local batches (see the module docstring) with .state() -> dict of
      ints and .restore(dict) (lfm_jax.latents.LatentIterator, input_pipeline.ArrayIterator);
      its state is checkpointed with the model.
    model: a Linen module `(x, t, y=None, cond=None, train=False) -> v`; default
      lfm_jax.models.create_model(config.model, latent_shape).
    mesh: default parallel.mesh_from_config(config).
    scale_factor: multiplies mean/logvar samples; default config.autoencoder.scale_factor or 1.
    sample_fn: sample_fn(ema_params, step) -> images (N, H, W, C) in [-1, 1] or None, called
      every config.train.sample_every steps and at the end; written to samples/step_<step>.png
      and TensorBoard.
    initial_params: start a fresh run from these params (an imported checkpoint) instead of a
      random init; ignored when resuming.
    stop_after: save and return after this step (as if preempted there).
  Returns:
    The final TrainState (global arrays).
  Raises:
    trainer.NonFiniteError, checkpoint.CheckpointError (see trainer.fit).
  """
  wd = workdir_lib.Workdir.of(workdir)
  tcfg = config.train
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.local_batch_size(int(tcfg.batch_size), mesh)
  latent_shape = _peek_latent_shape(data)
  if model is None:
    from lfm_jax import models  # pylint: disable=g-import-not-at-top
    model = models.create_model(config.model, latent_shape, dtype=precision.dtype_from_name(
        tcfg.compute_dtype, "train.compute_dtype"))
  if scale_factor is None:
    scale_factor = float(config.autoencoder.scale_factor or 1.0)
  tx, schedule = optim.create_optimizer(tcfg)
  rng = jax.random.PRNGKey(int(config.seed))
  with_params = initial_params is not None
  create = _state_constructor(model, config, latent_shape, tx, with_params)
  sample_every = int(tcfg.sample_every)

  def sample_hook(step, state, writer):
    if sample_fn is None or not ((sample_every and step % sample_every == 0)
                                 or step == int(tcfg.num_steps)):
      return
    images = sample_fn(state.ema_params, step)
    if images is not None and jax.process_index() == 0:
      from lfm_jax import images as images_lib  # pylint: disable=g-import-not-at-top
      images = np.asarray(images)
      images_lib.save_image_grid(images, wd.samples / f"step_{step:08d}.png")
      writer.write_images(step, {"samples": images_lib.image_grid(images)[None]})

  return trainer.fit(
      name="train", create=create, create_args=(rng, initial_params) if with_params else (rng,),
      step_fn=make_train_step(model, config, tx, schedule, scale_factor=scale_factor, mesh=mesh),
      train_iter=data, mesh=mesh, checkpoint_dir=wd.checkpoints, logdir=wd.root,
      settings=trainer.LoopSettings.from_config(tcfg),
      metadata=checkpoint_metadata(config, latent_shape, scale_factor),
      hparams={k: v for k, v in tcfg.items() if not isinstance(v, (list, tuple, dict))},
      hooks=(sample_hook,), stop_after=stop_after)
