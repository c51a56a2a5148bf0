"""Helpers shared by the flow trainer (train.py) and the autoencoder trainer (autoencoder_train.py).

Optimizer and learning-rate schedule from a `config.train`-like ConfigDict, EMA update, the
finite check, metric writers (TensorBoard + logging + metrics.jsonl), an image-grid PNG writer,
and a minimal checkpointable in-memory batch iterator.
"""

import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
from clu import metric_writers
from clu.metric_writers import interface as writer_interface
import jax
import jax.numpy as jnp
import numpy as np
import optax


# --------------------------------------------------------------------------------------------
# Optimizer, schedule, EMA.


def create_learning_rate_schedule(cfg: Any) -> optax.Schedule:
  """Constant, or linear warm-up then cosine decay to cfg.end_learning_rate at cfg.num_steps.

  Keys read: learning_rate, schedule ("constant" | "cosine"), warmup_steps, end_learning_rate,
  num_steps. A constant schedule with warmup_steps > 0 ramps linearly from 0 and then stays.
  """
  lr = float(cfg.learning_rate)
  warmup = int(cfg.get("warmup_steps", 0) or 0)
  kind = cfg.get("schedule", "constant")
  if kind == "constant":
    if warmup > 0:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return optax.constant_schedule(lr)
  if kind == "cosine":
    end = float(cfg.get("end_learning_rate", 0.0))
    decay_steps = max(int(cfg.num_steps), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup > 0 else lr, peak_value=lr, warmup_steps=warmup,
        decay_steps=decay_steps, end_value=end)
  raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {kind!r}")


def create_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (cfg.weight_decay) with the schedule above and optional global-norm clipping.

  Keys read: optimizer ("adamw" | "adam"), weight_decay, grad_clip_norm (0 disables), b1, b2, eps
  (optional) plus the schedule keys. Returns (tx, schedule).
  """
  schedule = create_learning_rate_schedule(cfg)
  name = cfg.get("optimizer", "adamw")
  if name not in ("adamw", "adam"):
    raise ValueError(f"train.optimizer must be 'adamw' or 'adam', got {name!r}")
  b1, b2, eps = cfg.get("b1", 0.9), cfg.get("b2", 0.999), cfg.get("eps", 1e-8)
  wd = float(cfg.get("weight_decay", 0.0) or 0.0) if name == "adamw" else 0.0
  opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)
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


def tree_all_finite(tree: Any) -> jax.Array:
  """A scalar bool: every element of every floating leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Leafwise jnp.where(pred, a, b) for two trees of the same structure."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' (or 'float16') -> the jnp dtype; names the config key on error."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"train.compute_dtype must be one of {sorted(table)}, got {name!r}")
  return table[name]


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating leaf of tree to dtype (identity when dtype is float32 and leaves are)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class NonFiniteError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient; `step` is the 1-based step that did."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


def check_finite(metrics_history: list[tuple[int, Mapping[str, Any]]], last_good_step: Optional[int],
                 checkpoint_dir: Optional[str] = None) -> None:
  """Raises NonFiniteError naming the first step whose metrics["finite"] is False.

  metrics_history: (step, host metrics) pairs, steps 1-based (the step just completed).
  """
  for step, m in metrics_history:
    if not bool(np.asarray(m["finite"])):
      where = (f"; the last good checkpoint (step {last_good_step}) in {checkpoint_dir} is kept"
               if last_good_step is not None else "; no checkpoint was written")
      raise NonFiniteError(
          step, f"Non-finite loss or gradient at training step {step} "
          f"(loss={float(np.asarray(m.get('loss', np.nan)))}, "
          f"grad_norm={float(np.asarray(m.get('grad_norm', np.nan)))}); training stopped{where}.")


def mean_metrics(history: list[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
  """Averages host metrics over the interval (the 'finite' flag excluded)."""
  keys = [k for k in history[0][1] if k != "finite"]
  return {k: float(np.mean([np.asarray(m[k], np.float64) for _, m in history])) for k in keys}


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Steps/s and ETA between two log points (wall clock on the host)."""

  def __init__(self, start_step: int, num_steps: int):
    self.num_steps = num_steps
    self._step = start_step
    self._time = time.monotonic()

  def update(self, step: int) -> tuple[float, float]:
    now = time.monotonic()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return rate, eta


# --------------------------------------------------------------------------------------------
# Metric writers.


class JsonlWriter(writer_interface.MetricWriter):
  """A clu MetricWriter appending one JSON object per step to a metrics.jsonl file.

  Scalars written for the same step in consecutive calls are merged into one record
  {"step": s, name: value, ...}, emitted when another step arrives or on flush/close. Other kinds
  (images, texts, histograms, ...) are ignored except texts and hparams, stored as records with a
  "texts"/"hparams" field.
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._pending_step: Optional[int] = None
    self._pending: dict[str, Any] = {}

  def _emit(self, record: Mapping[str, Any]) -> None:
    with open(self._path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def _flush_pending(self) -> None:
    if self._pending_step is not None and self._pending:
      self._emit({"step": self._pending_step, **self._pending})
    self._pending_step, self._pending = None, {}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    step = int(step)
    if self._pending_step is not None and step != self._pending_step:
      self._flush_pending()
    self._pending_step = step
    for k, v in scalars.items():
      self._pending[k] = float(np.asarray(v))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._flush_pending()
    self._emit({"step": int(step), "texts": dict(texts)})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._flush_pending()
    self._emit({"hparams": {k: (v if isinstance(v, (int, float, str, bool)) or v is None
                                else str(v)) for k, v in hparams.items()}})

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def flush(self) -> None:
    self._flush_pending()

  def close(self) -> None:
    self._flush_pending()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a helper for tests and notebooks)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def create_metric_writer(logdir: str, jsonl_name: str = "metrics.jsonl") -> metric_writers.MetricWriter:
  """TensorBoard event files + human-readable logging + <logdir>/metrics.jsonl on process 0.

  Other processes only log. Writes are synchronous so that a crash loses nothing already written.
  """
  if jax.process_index() > 0:
    return metric_writers.LoggingWriter()
  os.makedirs(logdir, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.LoggingWriter(),
      metric_writers.SummaryWriter(logdir),
      JsonlWriter(os.path.join(logdir, jsonl_name)),
  ])


# --------------------------------------------------------------------------------------------
# Images.


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) images in [-1, 1] -> one uint8 (rows*H', cols*W', C) grid (C in {1, 3})."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"image_grid expects (N, H, W, C), got {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
  return grid


def save_image_grid(images: np.ndarray, path: str, ncols: Optional[int] = None) -> str:
  """Writes image_grid(images) as a PNG at path (directories created); returns path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = image_grid(images, ncols)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path


# --------------------------------------------------------------------------------------------
# A minimal checkpointable in-memory iterator.


class InMemoryBatchIterator:
  """Endless shuffled batches over in-memory numpy arrays, checkpointable by a dict of ints.

  Every epoch is a fresh permutation drawn from (seed, epoch); only full global batches are
  produced (the remainder of an epoch is dropped). With several processes each host returns its
  own contiguous rows of every global batch (global_batch_size / process_count rows).
  state() -> {"epoch": e, "index": i}; restore(state) continues exactly there.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch_size: int, *, seed: int = 0,
               shuffle: bool = True, process_index: Optional[int] = None,
               process_count: Optional[int] = None):
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: len(v) for k, v in self._arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays must have the same length, got {sizes}")
    self._n = next(iter(sizes.values()))
    if global_batch_size > self._n:
      raise ValueError(f"batch size {global_batch_size} > number of examples {self._n}")
    self._batch = global_batch_size
    self._seed, self._shuffle = seed, shuffle
    self._pi = jax.process_index() if process_index is None else process_index
    self._pc = jax.process_count() if process_count is None else process_count
    if global_batch_size % self._pc:
      raise ValueError(f"batch size {global_batch_size} not divisible by {self._pc} processes")
    self._epoch, self._index = 0, 0
    self._perm = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    if not self._shuffle:
      return np.arange(self._n)
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._index + self._batch > self._n:
      self._epoch, self._index = self._epoch + 1, 0
      self._perm = self._permutation(self._epoch)
    idx = self._perm[self._index:self._index + self._batch]
    self._index += self._batch
    local = self._batch // self._pc
    idx = idx[self._pi * local:(self._pi + 1) * local]
    return {k: v[idx] for k, v in self._arrays.items()}

  def state(self) -> dict[str, int]:
    return {"epoch": int(self._epoch), "index": int(self._index)}

  def restore(self, state: Mapping[str, int]) -> None:
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation(self._epoch)


def make_array_iterator(arrays: Mapping[str, np.ndarray], global_batch_size: int, seed: int):
  """A checkpointable iterator over in-memory arrays (global batch size in, this host's rows out):
  lfm_jax.input_pipeline.ArrayIterator, or InMemoryBatchIterator when that module is absent."""
  try:
    from lfm_jax.input_pipeline import ArrayIterator  # pylint: disable=g-import-not-at-top
  except ImportError:
    return InMemoryBatchIterator(arrays, global_batch_size, seed=seed)
  return ArrayIterator(arrays, batch_size=global_batch_size, seed=seed)


def tree_max_abs_diff(a: Any, b: Any) -> float:
  """max |a - b| over all leaves of two trees of the same structure (host float)."""
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                         - np.asarray(y, np.float64))))
                       if np.size(x) else 0.0, a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


# --------------------------------------------------------------------------------------------
# The step loop shared by both trainers.


def run_loop(*, state: Any, step_fn: Callable[[Any, Any], tuple[Any, Any]], train_iter: Any,
             mesh: Any, checkpointer: Any, writer: metric_writers.MetricWriter, num_steps: int,
             end_step: Optional[int] = None, log_every: int = 100, checkpoint_every: int = 0,
             metadata: Optional[Mapping[str, Any]] = None,
             on_step: Optional[Callable[[int, Any], None]] = None, name: str = "train") -> Any:
  """Runs steps state.step+1 .. end_step; returns the final state.

  Each step: next(train_iter) (host-local numpy rows) -> global arrays on `mesh` -> step_fn
  (jitted, state donated) -> periodic actions. Metrics stay on device until a log step or a save:
  then one host sync fetches them, the finite flags are checked (NonFiniteError names the first bad
  step; nothing is saved after it, so the last good checkpoint is kept: detection latency is at
  most `log_every` steps and never crosses a save), the interval means are written with steps/s and
  ETA. `on_step(step, state)` runs after every step (sampling hooks). Checkpoints every
  `checkpoint_every` steps, at end_step, and at the step boundary after SIGTERM/SIGINT (then the
  loop returns early). The caller closes `checkpointer`.
  """
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from lfm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from lfm_jax import parallel  # pylint: disable=g-import-not-at-top

  start_step = int(jax.device_get(state.step))
  end_step = num_steps if end_step is None else min(num_steps, int(end_step))
  log_every = max(int(log_every), 1)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer, every_steps=log_every, every_secs=None)
  progress = Progress(start_step, num_steps)
  last_saved = [checkpointer.latest_step()]
  pending: list[tuple[int, Any]] = []   # device metrics not yet fetched
  fetched: list[tuple[int, dict]] = []  # host metrics of the current log interval

  def fetch_and_check():
    host = jax.device_get([m for _, m in pending])
    fetched.extend(zip([s for s, _ in pending], host))
    pending.clear()
    check_finite(fetched, last_saved[0], checkpointer.directory)

  with metric_writers.ensure_flushes(writer), ckpt_lib.PreemptionGuard(checkpointer) as guard:
    for step in range(start_step + 1, end_step + 1):
      with jax.profiler.StepTraceAnnotation(name, step_num=step):
        batch = parallel.host_local_to_global(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
      pending.append((step, metrics))
      report_progress(step)
      stopping = guard.should_stop(step, sync_every=log_every)
      last = step == end_step or stopping
      save_now = last or (checkpoint_every > 0 and step % checkpoint_every == 0)
      if step % log_every == 0 or last or save_now:
        fetch_and_check()
      if fetched and (step % log_every == 0 or last):
        summary = mean_metrics(fetched)
        rate, eta = progress.update(step)
        writer.write_scalars(step, summary)
        logging.info("[%s] step %d/%d: %s, %.2f steps/s, ETA %s", name, step, num_steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in summary.items()), rate, format_eta(eta))
        fetched.clear()
      if on_step is not None:
        on_step(step, state)
      if save_now:
        checkpointer.save(step, state, input_state=train_iter.state(), metadata=metadata)
        last_saved[0] = step
      if stopping:
        logging.warning("[%s] stopped by signal at step %d; checkpoint saved to %s.", name, step,
                        checkpointer.step_path(step))
        break
  return state
