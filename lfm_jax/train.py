"""Flow-model training: TrainState, the pure sharded train step, and the training loop.

The step trains a velocity network v(t, z, y) with LFM's flow-matching loss (lfm_jax/flow.py;
t = 0 data, t = 1 noise). Data parallel: the step is jitted once over a 1-D "data" mesh, batches
sharded on their leading axis, the state replicated and donated.

Batches (dicts of host-local numpy arrays, NHWC, leading axis = this host's rows):
  {"latent": (B, h, w, c) float32}   already-scaled z0, or
  {"mean": ..., "logvar": ...}       the latent cache's posterior; z0 = s * (mean + exp(logvar/2) eps)
                                     is drawn afresh every step (s = the scale factor) as LFM does,
                                     or s * mean when config.autoencoder.sample_posterior is False;
  "label": (B,) int                  required when config.model.num_classes > 0;
  "cond":  (B, h, w, Cc) optional    concatenated conditioning channels (inpainting, maps).
"""

import functools
import os
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
from clu import parameter_overview
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import flow
from lfm_jax import parallel
from lfm_jax import train_utils


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed as a whole).

  step: int32 scalar, optimizer steps taken. params / ema_params: separate float32 trees.
  opt_state: the optax state. rng: a uint32[2] key; step k uses fold_in(rng, k).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def _dummy_inputs(config: Any, latent_shape: tuple[int, ...]) -> dict[str, Any]:
  x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  num_classes = int(config.model.get("num_classes", 0) or 0)
  y = jnp.zeros((1,), jnp.int32) if num_classes > 0 else None
  extra = int(config.model.get("extra_in_channels", 0) or 0)
  cond = jnp.zeros((1,) + tuple(latent_shape[:-1]) + (extra,), jnp.float32) if extra else None
  return dict(x=x, t=t, y=y, cond=cond)


def init_params(model: nn.Module, rng: jax.Array, config: Any, latent_shape: tuple[int, ...]) -> Any:
  """The model's float32 params from a batch-1 dummy input (call under jax.jit: it is ~100x faster)."""
  inputs = _dummy_inputs(config, latent_shape)
  variables = model.init({"params": rng, "dropout": rng}, inputs["x"], inputs["t"],
                         y=inputs["y"], cond=inputs["cond"], train=False)
  return variables["params"]


def create_train_state(rng: jax.Array, model: nn.Module, config: Any,
                       latent_shape: tuple[int, ...], *, tx: Optional[optax.GradientTransformation] = None,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       init_fn: Optional[Callable[[jax.Array], Any]] = None) -> TrainState:
  """A fresh TrainState, built under jax.jit (replicated over `mesh` when given).

  rng: a uint32[2] key (jax.random.PRNGKey). latent_shape: (h, w, c). tx defaults to
  train_utils.create_optimizer(config.train). init_fn(rng) -> params overrides the model init.
  """
  if tx is None:
    tx, _ = train_utils.create_optimizer(config.train)
  init_fn = init_fn or functools.partial(init_params, model, config=config, latent_shape=latent_shape)

  def create(rng):
    rng_init, rng_train = jax.random.split(rng)
    return _state_at_step_zero(init_fn(rng_init), rng_train, tx)

  out_shardings = parallel.replicated(mesh) if mesh is not None else None
  return jax.jit(create, out_shardings=out_shardings)(rng)


def _state_at_step_zero(params: Any, rng_train: jax.Array,
                        tx: optax.GradientTransformation) -> TrainState:
  # A separate buffer for the EMA (x + 0 is not the same buffer), or donation would fail.
  ema_params = jax.tree.map(lambda p: p + jnp.zeros_like(p), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=tx.init(params), rng=rng_train)


def train_state_from_params(rng: jax.Array, params: Any, config: Any, *,
                            tx: Optional[optax.GradientTransformation] = None,
                            mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
  """A TrainState at step 0 starting from given params (fine-tuning an imported checkpoint).

  The params are an argument of the jitted constructor (not constants baked into it); the
  training rng is drawn as in create_train_state.
  """
  if tx is None:
    tx, _ = train_utils.create_optimizer(config.train)
  create = lambda rng, params: _state_at_step_zero(params, jax.random.split(rng)[1], tx)
  out_shardings = parallel.replicated(mesh) if mesh is not None else None
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  return jax.jit(create, out_shardings=out_shardings)(rng, params)


def batch_latents(batch: Mapping[str, jax.Array], rng: jax.Array, scale_factor: float = 1.0,
                  sample_posterior: bool = True) -> jax.Array:
  """z0 from a batch: batch["latent"] as is, or s * (mean + exp(logvar / 2) * eps) (fresh eps)."""
  if "latent" in batch:
    return batch["latent"].astype(jnp.float32)
  if "mean" not in batch:
    raise KeyError(f"batch needs 'latent' or 'mean'/'logvar', has {sorted(batch)}")
  mean = batch["mean"].astype(jnp.float32)
  if sample_posterior:
    std = jnp.exp(0.5 * batch["logvar"].astype(jnp.float32))
    mean = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
  return scale_factor * mean


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
  num_classes = int(config.model.get("num_classes", 0) or 0)
  accum = int(tcfg.get("grad_accum_steps", 1) or 1)
  cdt = train_utils.compute_dtype(tcfg.get("compute_dtype", "float32"))
  ema_decay = float(tcfg.get("ema_decay", 0.0) or 0.0)
  ema_warmup = bool(tcfg.get("ema_warmup", False))
  ae_cfg = config.get("autoencoder", None) or {}
  sample_posterior = bool(ae_cfg.get("sample_posterior", True))
  class_dropout = float(fcfg.get("class_dropout_prob", 0.0)) if num_classes > 0 else 0.0

  def loss_fn(params, z0, labels, cond, rng):
    rng_loss, rng_dropout = jax.random.split(rng)
    p = train_utils.cast_floating(params, cdt)
    cond_c = None if cond is None else cond.astype(cdt)

    def velocity(t, z, y):
      v = model.apply({"params": p}, z.astype(cdt), t, y=y, cond=cond_c, train=True,
                      rngs={"dropout": rng_dropout})
      return v.astype(jnp.float32)

    loss, _ = flow.flow_matching_loss(
        velocity, z0, rng_loss, labels=labels, sigma_min=fcfg.get("sigma_min", flow.SIGMA_MIN),
        time_sampling=fcfg.get("time_sampling", "uniform"), class_dropout_prob=class_dropout,
        null_label=num_classes)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)

  def micro_split(x):
    # (B, ...) -> (accum, B / accum, ...): micro-batch i holds rows i, i + accum, ... so every
    # micro-batch stays evenly sharded over "data".
    if x is None:
      return None
    b = x.shape[0]
    if b % accum:
      raise ValueError(f"batch size {b} not divisible by train.grad_accum_steps={accum}")
    x = jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS)))
    return x

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    rng_latent, rng_loss = jax.random.split(rng)
    z0 = batch_latents(batch, rng_latent, scale_factor, sample_posterior)
    labels = batch["label"].astype(jnp.int32) if num_classes > 0 else None
    cond = batch.get("cond")
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
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = train_utils.ema_decay_at(state.step, ema_decay, ema_warmup)
    ema_params = train_utils.ema_update(state.ema_params, params, decay)
    new = (params, ema_params, opt_state)
    params, ema_params, opt_state = train_utils.select_tree(
        finite, new, (state.params, state.ema_params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "finite": finite}
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """jax.jit with explicit shardings (state replicated, batch on "data"), the state donated and
  parallel.train_compiler_options() (faster backward convolutions on CPU)."""
  rep, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnames="state", compiler_options=parallel.train_compiler_options())


def abstract_train_state(rng: jax.Array, model: nn.Module, config: Any,
                         latent_shape: tuple[int, ...], tx: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> TrainState:
  """ShapeDtypeStructs (replicated shardings) of the TrainState, without computing it."""
  shapes = jax.eval_shape(lambda r: create_train_state(r, model, config, latent_shape, tx=tx), rng)
  rep = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def checkpoint_metadata(config: Any, latent_shape: tuple[int, ...]) -> dict[str, Any]:
  """What a flow checkpoint records about its model: config.model + latent shape, and a hash."""
  section = {"model": config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model),
             "latent_shape": list(latent_shape)}
  digest, plain = ckpt_lib.config_fingerprint(section)
  return {"config": plain, "fingerprint": digest}


def train_and_evaluate(
    config: Any,
    workdir: str,
    *,
    latents: Optional[Mapping[str, np.ndarray]] = None,
    train_iter: Optional[Iterator[Mapping[str, np.ndarray]]] = None,
    latent_shape: Optional[tuple[int, ...]] = None,
    model: Optional[nn.Module] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    scale_factor: Optional[float] = None,
    sample_fn: Optional[Callable[[Any, int], Optional[np.ndarray]]] = None,
    stop_after: Optional[int] = None,
    initial_params: Optional[Any] = None,
    print_fn: Callable[[str], None] = print,
) -> TrainState:
  """Trains the velocity network by flow matching; resumes from <workdir>/checkpoints if present.

  Args:
    config: the full config (reads config.seed, model, flow, train, autoencoder.scale_factor /
      sample_posterior).
    workdir: checkpoints/ (orbax), TensorBoard event files, metrics.jsonl, samples/ go here.
    latents: the in-memory latent cache, a dict of numpy arrays with a leading example axis:
      "latent" (or "mean" + "logvar"), "label" (if class-conditional), optional "cond". On a
      multi-host job every host passes the whole cache; each feeds its own rows of every batch.
    train_iter: instead of `latents`, an iterator of host-local batches (same keys) with
      .state() -> dict of ints and .restore(dict); its state is checkpointed with the model.
    latent_shape: (h, w, c); inferred from the first batch when None.
    model: a Linen module `(x, t, y=None, cond=None, train=False) -> v`; default
      lfm_jax.models.create_model(config.model, latent_shape).
    mesh: default parallel.create_mesh() (all devices).
    scale_factor: multiplies mean/logvar samples; default config.autoencoder.scale_factor or 1.
    sample_fn: called as sample_fn(ema_params, step) every config.train.sample_every steps and at
      the end; it may return images (N, H, W, C) in [-1, 1], which are written to
      <workdir>/samples/step_<step>.png and TensorBoard. The trainer never calls a sampler or an
      autoencoder itself.
    stop_after: save and return after this step (as if preempted there; tests, time-boxed jobs).
    initial_params: start a fresh run from these params (e.g. an imported PyTorch checkpoint, see
      config.model.init_from) instead of a random init; ignored when resuming.
    print_fn: where the start-up sharding table is printed.
  Returns:
    The final TrainState (replicated global arrays).
  Raises:
    train_utils.NonFiniteError when the loss or gradient becomes NaN/Inf (the step is named; the
    last good checkpoint is kept and no later one is written). checkpoint.CheckpointError when the
    checkpoint to resume from is corrupt or belongs to another model.
  """
  tcfg = config.train
  num_steps = int(tcfg.num_steps)
  mesh = mesh or parallel.create_mesh()
  if (latents is None) == (train_iter is None):
    raise ValueError("pass exactly one of `latents` or `train_iter`")
  if train_iter is None:
    train_iter = train_utils.make_array_iterator(latents, int(tcfg.batch_size), int(config.seed))
  parallel.local_batch_size(int(tcfg.batch_size), mesh)

  if latent_shape is None:
    if latents is not None:
      key = "latent" if "latent" in latents else "mean"
      latent_shape = tuple(np.shape(latents[key])[1:])
    else:
      state_before = train_iter.state()
      first = next(train_iter)
      train_iter.restore(state_before)
      key = "latent" if "latent" in first else "mean"
      latent_shape = tuple(np.shape(first[key])[1:])
  latent_shape = tuple(int(d) for d in latent_shape)
  if model is None:
    from lfm_jax import models  # pylint: disable=g-import-not-at-top
    model = models.create_model(config.model, latent_shape)
  if scale_factor is None:
    scale_factor = (config.get("autoencoder", None) or {}).get("scale_factor", None)
    scale_factor = 1.0 if scale_factor is None else float(scale_factor)

  tx, schedule = train_utils.create_optimizer(tcfg)
  rng = jax.random.PRNGKey(int(config.seed))
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=int(tcfg.get("keep_checkpoints", 2)),
      keep_period=int(tcfg.get("keep_every", 0) or 0) or None)

  try:
    return _train_loop(config, workdir, checkpointer, train_iter, model, mesh, tx, schedule, rng,
                       latent_shape, scale_factor, sample_fn, stop_after, print_fn, initial_params)
  finally:
    checkpointer.close()  # waits for the last async save; never saves by itself


def _train_loop(config, workdir, checkpointer, train_iter, model, mesh, tx, schedule, rng,
                latent_shape, scale_factor, sample_fn, stop_after, print_fn,
                initial_params=None) -> TrainState:
  """The body of train_and_evaluate (restore-or-init, then the step loop)."""
  tcfg = config.train
  num_steps = int(tcfg.num_steps)
  meta = checkpoint_metadata(config, latent_shape)
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = abstract_train_state(rng, model, config, latent_shape, tx, mesh)
    state, input_state, _ = checkpointer.restore(abstract, latest, expected_meta=meta)
    if input_state:
      train_iter.restore(input_state)
    logging.info("Resumed from %s at step %d", checkpointer.step_path(latest), int(state.step))
  elif initial_params is not None:
    state = train_state_from_params(rng, initial_params, config, tx=tx, mesh=mesh)
  else:
    state = create_train_state(rng, model, config, latent_shape, tx=tx, mesh=mesh)
  start_step = int(jax.device_get(state.step))

  if jax.process_index() == 0:
    parallel.print_shardings(state, print_fn=print_fn, batch_sharding=parallel.data_sharded(mesh))
  parameter_overview.log_parameter_overview(state.params)

  p_train_step = jit_train_step(
      make_train_step(model, config, tx, schedule, scale_factor=scale_factor, mesh=mesh), mesh)

  writer = train_utils.create_metric_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in tcfg.items() if not isinstance(v, (list, tuple, dict))})
  sample_every = int(tcfg.get("sample_every", 0) or 0)

  def on_step(step, state):
    if sample_fn is not None and ((sample_every > 0 and step % sample_every == 0)
                                  or step == num_steps):
      _run_sample_fn(sample_fn, state, step, workdir, writer)

  return train_utils.run_loop(
      state=state, step_fn=p_train_step, train_iter=train_iter, mesh=mesh,
      checkpointer=checkpointer, writer=writer, num_steps=num_steps, end_step=stop_after,
      log_every=int(tcfg.get("log_every", 100)),
      checkpoint_every=int(tcfg.get("checkpoint_every", 0) or 0), metadata=meta, on_step=on_step,
      name="train")


def _run_sample_fn(sample_fn, state, step, workdir, writer):
  images = sample_fn(state.ema_params, step)
  if images is None:
    return
  images = np.asarray(images)
  if jax.process_index() == 0:
    path = train_utils.save_image_grid(images, os.path.join(workdir, "samples", f"step_{step:08d}.png"))
    grid = train_utils.image_grid(images)
    writer.write_images(step, {"samples": grid[None]})
    logging.info("Wrote sample grid %s", path)
