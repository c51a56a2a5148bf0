"""Orbax checkpointing for the trainers: async saves, keep-N (+ keep every K), strict restore, resume.

One checkpoint (one step directory) holds three items:
  state  the TrainState pytree (ocp.args.StandardSave), restored against an abstract target;
  input  the input iterator's state, a small JSON dict of ints (ocp.args.JsonSave), so a resumed
         run sees exactly the batches an uninterrupted run would;
  meta   JSON metadata: a config fingerprint and the config section it hashes, the step, etc.

Restores never run target-less and never modify the checkpoint directory. Before any array is read,
the checkpoint's tree metadata is compared with the abstract target; a missing/unexpected leaf or a
shape/dtype mismatch raises CheckpointError naming the checkpoint (path, step) and the leaf paths with
both shapes. Any other failure while reading (a truncated or corrupt file) is re-raised as
CheckpointError with the checkpoint's path and step.

Preemption: `PreemptionGuard` installs SIGTERM/SIGINT handlers that only set a flag; the training
loop asks `guard.should_stop(step)` at every step boundary, saves, and exits cleanly. On multi-host
jobs orbax's `reached_preemption` (JAX's preemption sync point) is consulted too so every host stops at
the same step. All methods are called on every host.
"""

import json
import os
import signal
import threading
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import hashlib
import jax
import numpy as np
import orbax.checkpoint as ocp

from lfm_jax import storage


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names the checkpoint and what differs."""


def config_fingerprint(section: Any) -> tuple[str, dict[str, Any]]:
  """(sha256 hex[:16], plain dict) of a ConfigDict / dict, for the checkpoint metadata."""
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  plain = json.loads(json.dumps(section, sort_keys=True, default=str))
  digest = hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
  return digest, plain


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flatten_paths(tree: Any, is_leaf=None) -> dict[str, Any]:
  """{'params/Dense_0/kernel': leaf} using dict keys / attribute names / sequence indices."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _is_array_metadata(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (dict, list, tuple))


def _to_plain_tree(x: Any) -> Any:
  """Target pytree -> nested dicts/lists as orbax stores it (namedtuples -> lists, dataclasses -> dicts)."""
  return ocp.utils.serialize_tree(x, keep_empty_nodes=True) if hasattr(ocp.utils, "serialize_tree") else x


def diff_tree_metadata(ckpt_tree: Any, target: Any, max_items: int = 20) -> list[str]:
  """Lines describing how the checkpoint's array metadata differs from the abstract target.

  Compared: the set of leaf paths, and each common leaf's shape and dtype.
  """
  ckpt = _flatten_paths(ckpt_tree, is_leaf=_is_array_metadata)
  tgt = _flatten_paths(_to_plain_tree(target))
  ckpt = {k: v for k, v in ckpt.items() if v is not None}
  tgt = {k: v for k, v in tgt.items() if v is not None}
  lines = []
  for path in sorted(set(ckpt) - set(tgt)):
    lines.append(f"  {path}: in the checkpoint {tuple(ckpt[path].shape)}, not in the model")
  for path in sorted(set(tgt) - set(ckpt)):
    lines.append(f"  {path}: in the model {tuple(np.shape(tgt[path]))}, not in the checkpoint")
  for path in sorted(set(ckpt) & set(tgt)):
    c, t = ckpt[path], tgt[path]
    cs, ts = tuple(c.shape), tuple(np.shape(t))
    if cs != ts:
      lines.append(f"  {path}: checkpoint shape {cs} != model shape {ts}")
    elif np.dtype(c.dtype) != np.dtype(t.dtype):
      lines.append(f"  {path}: checkpoint dtype {np.dtype(c.dtype)} != model dtype {np.dtype(t.dtype)}")
  # Params first: they are what a reader recognises; EMA / optimizer copies follow.
  lines.sort(key=lambda line: (not line.strip().startswith("params/"), line))
  if len(lines) > max_items:
    lines = lines[:max_items] + [f"  ... and {len(lines) - max_items} more"]
  return lines


def _diff_dicts(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Keys whose values differ between two plain nested dicts ('model.width: 16 -> 32')."""
  out = []
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      out += _diff_dicts(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
  elif a != b:
    out.append(f"{prefix[:-1]}: checkpoint {a!r}, now {b!r}")
  return out


def _short(e: Exception, limit: int = 600) -> str:
  """type: message, without tensorstore's long spec dump."""
  text = str(e).split(" [tensorstore_spec=")[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a concrete pytree, for restoring against it."""
  def one(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, tree)


class Checkpointer:
  """An orbax CheckpointManager with the items (state, input, meta) and strict restores.

  Args:
    directory: where step directories live (created).
    max_to_keep: keep the newest N checkpoints.
    keep_period: also keep every checkpoint whose step is a multiple of this (None/0 disables).
    async_save: save in a background thread (call wait()/close() before reading files).
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2,
               keep_period: Optional[int] = None, async_save: bool = True):
    text = os.fspath(directory)
    self.directory = text if storage.is_remote(text) else os.path.abspath(text)
    from lfm_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.sync("checkpointer")  # orbax meets the other hosts in a device collective next
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period or None, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        storage.path(self.directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "input": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._manager.all_steps()

  def step_path(self, step: int) -> str:
    return f"{self.directory.rstrip('/')}/{step}"

  def save(self, step: int, state: Any, *, input_state: Optional[Mapping[str, Any]] = None,
           metadata: Optional[Mapping[str, Any]] = None, force: bool = True) -> bool:
    """Saves (asynchronously if enabled) the state, iterator state and metadata at `step`."""
    meta = dict(metadata or {})
    meta["step"] = int(step)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        input=ocp.args.JsonSave(dict(input_state or {})),
        meta=ocp.args.JsonSave(meta))
    saved = self._manager.save(int(step), args=args, force=force)
    if saved:
      logging.info("Saving checkpoint step %d to %s", step, self.step_path(step))
    return saved

  def read_metadata(self, step: int) -> dict[str, Any]:
    """The JSON metadata item of checkpoint `step` (raises CheckpointError if unreadable)."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(out["meta"] or {})
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Checkpoint {self.step_path(step)} (step {step}): cannot read its "
                            f"metadata: {_short(e)}") from e

  def check_compatible(self, step: int, abstract_state: Any,
                       expected_meta: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Compares checkpoint `step` with the abstract target before any array is read.

    Raises CheckpointError naming the checkpoint and every differing leaf (path, both shapes), plus
    the differing config keys when `expected_meta` holds a "config" entry. Returns the metadata.
    """
    where = f"Checkpoint {self.step_path(step)} (step {step})"
    meta = self.read_metadata(step)
    try:
      item_meta = self._manager.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{where}: cannot read the state's array metadata (corrupt or "
                            f"truncated?): {_short(e)}") from e
    if item_meta is None:
      raise CheckpointError(f"{where}: has no 'state' item metadata (corrupt or not a lfm_jax "
                            "checkpoint)")
    tree = getattr(item_meta, "tree", item_meta)
    lines = diff_tree_metadata(tree, abstract_state)
    config_lines = []
    if expected_meta and "config" in expected_meta and "config" in meta:
      config_lines = _diff_dicts(meta["config"], json.loads(json.dumps(expected_meta["config"],
                                                                        default=str)))
    if lines:
      msg = f"{where} does not match the model being restored:\n" + "\n".join(lines)
      if config_lines:
        msg += "\nConfig differences (checkpoint vs now):\n  " + "\n  ".join(config_lines)
      msg += ("\nThe checkpoint was left untouched; use another workdir or the matching config.")
      raise CheckpointError(msg)
    if config_lines:
      logging.warning("%s was written with a different config (shapes match, restoring):\n  %s",
                      where, "\n  ".join(config_lines))
    return meta

  def restore(self, abstract_state: Any, step: Optional[int] = None, *,
              expected_meta: Optional[Mapping[str, Any]] = None
              ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Restores (state, input_state, metadata) of `step` (default: latest) against the target.

    abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) or concrete arrays.
    Raises CheckpointError (path, step, what differs) on a mismatch or a corrupt file; nothing on
    disk is changed.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"No checkpoint in {self.directory}")
    abstract_state = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else abstract_like(x), abstract_state)
    meta = self.check_compatible(step, abstract_state, expected_meta)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          input=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"Checkpoint {self.step_path(step)} (step {step}) could not be read (corrupt or "
          f"truncated file?): {_short(e)}\nThe checkpoint was left untouched.") from e
    return out["state"], dict(out["input"] or {}), meta

  def reached_preemption(self, step: int) -> bool:
    """orbax/JAX preemption sync point (meaningful on multi-host TPU jobs)."""
    try:
      return bool(self._manager.reached_preemption(int(step)))
    except Exception:  # pylint: disable=broad-except
      return False

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag checked at step boundaries (final save, then clean exit).

  Use as a context manager around the training loop; previous handlers are restored on exit. A
  second Ctrl-C while the flag is already set raises KeyboardInterrupt immediately. Handlers can
  only be installed from the main thread; elsewhere the guard only consults orbax's sync point.
  Detection latency: single process, the step in flight; multi-host, up to `sync_every` steps.
  """

  def __init__(self, checkpointer: Optional[Checkpointer] = None,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
    self._checkpointer = checkpointer
    self._signals = tuple(signals)
    self._previous = {}
    self.signal_received: Optional[int] = None

  def _handler(self, signum, frame):
    del frame
    if self.signal_received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_received = signum
    logging.warning("Received %s: will save a checkpoint and stop at the next step boundary.",
                    signal.Signals(signum).name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def should_stop(self, step: int, sync_every: int = 1) -> bool:
    """True when training should save and stop after `step`.

    Single process: this process got SIGTERM/SIGINT. Multi-host: orbax's preemption sync point
    (JAX's preemption notifier, TPU maintenance events) at every step, and every `sync_every` steps
    an all-gather of the local signal flags so that all hosts stop at the same step.
    """
    if jax.process_count() == 1:
      return self.signal_received is not None
    if self._checkpointer is not None and self._checkpointer.reached_preemption(step):
      return True
    if sync_every and step % sync_every == 0:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.int32(self.signal_received is not None))
      return bool(np.any(flags))
    return False
