"""The training skeleton shared by the flow trainer (train.py) and the autoencoder trainer.

A trainer supplies a pure state constructor and a pure step `(state, batch) -> (state, metrics)`;
`fit` does the rest, the same way for both:

    restore the latest checkpoint (strict, against the abstract state) or build step 0
    for each step: host rows -> global batch -> jitted step (state donated, FSDP shardings)
                   -> every log_every steps one progress line, TensorBoard + metrics.jsonl
                   -> hooks (sample grids) -> checkpoint every checkpoint_every steps
    SIGTERM/SIGINT: save at the next step boundary and return; NaN/Inf: stop, keep the last good
    checkpoint.

`apply_gradients` is the guarded update both steps end with: optax update, EMA, and a non-finite
loss or gradient leaving params, EMA and optimizer state unchanged.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import optim
from lfm_jax import parallel
from lfm_jax import storage
from lfm_jax import writers


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


def new_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The step-0 state of `params` (traceable; the EMA is a separate buffer, so donation works)."""
  ema_params = jax.tree.map(lambda p: p + jnp.zeros_like(p), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=tx.init(params), rng=rng)


def apply_gradients(state: TrainState, loss: jax.Array, grads: Any,
                    tx: optax.GradientTransformation, ema_decay: jax.Array
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One guarded optimizer + EMA update: (new state, {"grad_norm", "finite"}).

  grad_norm is taken before clipping. When the loss or gradient is not finite the params, EMA and
  optimizer state stay as they were (the step counter still advances; the loop stops on it).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(operands):
    params, ema_params, opt_state, grads = operands
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, optim.ema_update(ema_params, params, ema_decay), opt_state

  # A conditional rather than a per-leaf select(finite, new, old): with the state donated, the
  # select form makes XLA copy every state buffer at the start of the step (the old value is
  # live until the end), and adds a select per leaf; the taken branch updates in place.
  params, ema_params, opt_state = jax.lax.cond(
      finite, update, lambda operands: operands[:3],
      (state.params, state.ema_params, state.opt_state, grads))
  new = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                      opt_state=opt_state)
  return new, {"grad_norm": grad_norm, "finite": finite}


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient; `step` is the 1-based step that did."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


def check_finite(history: Sequence[tuple[int, Mapping[str, Any]]], last_good_step: Optional[int],
                 checkpoint_dir: Optional[str] = None) -> None:
  """Raises NonFiniteError naming the first step whose metrics["finite"] is False."""
  for step, m in history:
    if not bool(np.asarray(m["finite"])):
      where = (f"; the last good checkpoint (step {last_good_step}) in {checkpoint_dir} is kept"
               if last_good_step is not None else "; no checkpoint was written")
      raise NonFiniteError(
          step, f"Non-finite loss or gradient at training step {step} "
          f"(loss={float(np.asarray(m.get('loss', np.nan)))}, "
          f"grad_norm={float(np.asarray(m.get('grad_norm', np.nan)))}); training stopped{where}.")


def mean_metrics(history: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
  """Averages host metrics over the interval (the 'finite' flag excluded)."""
  keys = [k for k in history[0][1] if k != "finite"]
  return {k: float(np.mean([np.asarray(m[k], np.float64) for _, m in history])) for k in keys}


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train and how often to report and save (a config.train-like section)."""
  num_steps: int
  log_every: int = 100
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  keep_every: int = 0

  @classmethod
  def from_config(cls, cfg: Any) -> "LoopSettings":
    return cls(num_steps=int(cfg.num_steps), log_every=max(int(cfg.log_every), 1),
               checkpoint_every=int(cfg.checkpoint_every),
               keep_checkpoints=int(cfg.keep_checkpoints), keep_every=int(cfg.keep_every))


def abstract_state(create: Callable[..., TrainState], create_args: tuple,
                   mesh: jax.sharding.Mesh) -> TrainState:
  """ShapeDtypeStructs of `create(*create_args)` carrying the FSDP-rule shardings on `mesh`."""
  shapes = jax.eval_shape(create, *create_args)
  return parallel.with_sharding(shapes, parallel.state_sharding(shapes, mesh))


def fit(*, name: str, create: Callable[..., TrainState], create_args: tuple,
        step_fn: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]],
        train_iter: Any, mesh: jax.sharding.Mesh, checkpoint_dir: storage.PathLike,
        logdir: storage.PathLike, settings: LoopSettings, metadata: Mapping[str, Any],
        hparams: Optional[Mapping[str, Any]] = None,
        hooks: Sequence[Callable[[int, TrainState, writers.MetricWriter], None]] = (),
        stop_after: Optional[int] = None,
        print_fn: Callable[[str], None] = writers.say) -> TrainState:
  """Restore-or-init, then steps state.step + 1 .. min(num_steps, stop_after); returns the state.

  create(*create_args) -> TrainState builds step 0 (jitted once with the state's shardings;
  arrays are passed as arguments, not baked in as constants). step_fn is pure and jitted here.
  train_iter yields host-local numpy batches and has state()/restore(dict) for exact resume.
  hooks(step, state, writer) run after every step (e.g. a sample grid every K steps).
  Raises NonFiniteError (NaN/Inf) and checkpoint.CheckpointError (corrupt or mismatched
  checkpoint; nothing on disk is changed).
  """
  parallel.sync(f"{name}_fit")
  abstract = abstract_state(create, create_args, mesh)
  shardings = jax.tree.map(lambda s: s.sharding, abstract)
  checkpointer = ckpt_lib.Checkpointer(
      checkpoint_dir, max_to_keep=settings.keep_checkpoints,
      keep_period=settings.keep_every or None)
  try:
    latest = checkpointer.latest_step()
    if latest is not None:
      state, input_state, _ = checkpointer.restore(abstract, latest, expected_meta=metadata)
      if input_state:
        train_iter.restore(input_state)
      print_fn(f"{name}: resuming from {checkpointer.step_path(latest)} (step {latest})")
    else:
      state = jax.jit(create, out_shardings=shardings)(*create_args)
    if jax.process_index() == 0:
      parallel.print_shardings(state, title=f"{name} state shardings",
                               print_fn=lambda text: print(text, flush=True),
                               batch_sharding=parallel.data_sharded(mesh))
    jitted = jax.jit(step_fn, in_shardings=(shardings, parallel.data_sharded(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0,
                     compiler_options=parallel.train_compiler_options())
    writer = writers.create_metric_writer(logdir)
    try:
      if int(jax.device_get(state.step)) == 0 and hparams:
        writer.write_hparams(hparams)
      parallel.sync(f"{name}_loop_start")  # process 0 set up the writers alone
      return _loop(name, state, jitted, train_iter, mesh, checkpointer, writer, settings,
                   metadata, hooks, stop_after, print_fn)
    finally:
      writer.close()
  finally:
    checkpointer.close()  # waits for the last async save; never saves by itself


def _loop(name, state, step_fn, train_iter, mesh, checkpointer, writer, settings, metadata,
          hooks, stop_after, print_fn) -> TrainState:
  start_step = int(jax.device_get(state.step))
  num_steps = settings.num_steps
  end_step = num_steps if stop_after is None else min(num_steps, int(stop_after))
  progress = writers.ProgressLine(name, start_step, num_steps)
  last_saved = [checkpointer.latest_step()]
  pending: list[tuple[int, Any]] = []   # device metrics not yet fetched
  fetched: list[tuple[int, dict]] = []  # host metrics of the current log interval

  def fetch_and_check():
    host = jax.device_get([m for _, m in pending])
    fetched.extend(zip([s for s, _ in pending], host))
    pending.clear()
    check_finite(fetched, last_saved[0], checkpointer.directory)

  with ckpt_lib.PreemptionGuard(checkpointer) as guard:
    for step in range(start_step + 1, end_step + 1):
      with jax.profiler.StepTraceAnnotation(name, step_num=step):
        batch = parallel.host_local_to_global(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
      pending.append((step, metrics))
      stopping = guard.should_stop(step, sync_every=settings.log_every)
      last = step == end_step or stopping
      save_now = last or (settings.checkpoint_every > 0 and step % settings.checkpoint_every == 0)
      log_now = step % settings.log_every == 0 or last
      if log_now or save_now:
        fetch_and_check()
      if fetched and log_now:
        summary = mean_metrics(fetched)
        rate, eta = progress.update(step)
        writer.write_scalars(step, {**summary, "steps_per_sec": rate, "uptime": progress.uptime})
        writer.flush()
        print_fn(progress.line(step, summary, rate, eta))
        fetched.clear()
      for hook in hooks:
        hook(step, state, writer)
      if save_now:
        checkpointer.save(step, state, input_state=train_iter.state(), metadata=metadata)
        last_saved[0] = step
      if stopping:
        print_fn(f"{name}: stopped by signal at step {step}; checkpoint saved to "
                 f"{checkpointer.step_path(step)}")
        break
  return state
