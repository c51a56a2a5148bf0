"""What the stages read from a data set, on top of lfm_jax/input_pipeline.py.

- `split_ids(data_config, split)`: every example id a split selection reads (ascending).
- `load_images(data_config, split, max_examples)`: a (small) split whole in memory, on every host.
- `host_image_batches(data_config, split, ids, batch_size)`: streaming batches for work spread
  over all devices of all hosts: every host reads only its contiguous share of `ids`, all hosts
  yield the same number of batches (padded, with a validity mask), so the jitted computations
  that consume them run in lockstep.
"""

from typing import Iterator, Optional

import jax
import numpy as np


def _pipeline():
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline


def prepare(data_config) -> None:
  """Prepares the data set (offline) on process 0 first, then on the other hosts (a no-op where
  they share its data_dir), so hosts never prepare the same directory at once."""
  from lfm_jax import parallel  # pylint: disable=g-import-not-at-top
  ip = _pipeline()
  if jax.process_index() == 0:
    ip.ensure_prepared(ip.get_builder(data_config), data_config)
  parallel.sync("data_prepared")
  if jax.process_index() > 0:
    ip.ensure_prepared(ip.get_builder(data_config), data_config)


def split_ids(data_config, split: str) -> np.ndarray:
  """The ascending example ids (indices in the base split) the pipeline reads for `split`."""
  return _pipeline().split_ids(data_config, split)


def read_ids(data_config, split: str, ids: np.ndarray, batch_size: int = 256, *,
             seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches {"image", "label", "id"} of exactly `ids`, in id order, read by this host alone
  (unshuffled, unaugmented)."""
  ip = _pipeline()
  if len(ids) == 0:
    return iter(())
  ds = ip.create_dataset(data_config, split, batch_size=batch_size, shuffle=False, seed=seed,
                         repeat=False, drop_remainder=False, augment=False, ids=ids,
                         process_index=0, process_count=1)
  return ip.iterate_numpy(ds)


def load_images(data_config, split: str, max_examples: Optional[int] = None,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images (N, H, W, C) in [-1, 1], labels, ids) of the first max_examples of a split, on
  every host (all hosts call this together)."""
  prepare(data_config)
  ids = split_ids(data_config, split)
  if max_examples is not None:
    ids = ids[:int(max_examples)]
  parts = list(read_ids(data_config, split, ids, seed=seed))
  if not parts:
    raise ValueError(f"split {split!r} of {data_config.name} has no examples")
  return tuple(np.concatenate([p[k] for p in parts]) for k in ("image", "label", "id"))


def host_image_batches(data_config, split: str, ids: np.ndarray, batch_size: int, *,
                       seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of global batches over `ids` (see the module docstring).

  Yields {"image", "label", "id", "valid"}: batch_size / process_count rows each (the padding
  rows have valid False, id -1); every host yields ceil(max host share / rows) batches.
  """
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  pi, pc = jax.process_index(), jax.process_count()
  if batch_size % pc:
    raise ValueError(f"batch size {batch_size} is not divisible by the {pc} processes")
  rows = batch_size // pc
  lo, hi = input_pipeline.host_range(len(ids), pi, pc)
  longest = max(b - a for a, b in (input_pipeline.host_range(len(ids), p, pc) for p in range(pc)))
  num_batches = -(-longest // rows)
  mine = read_ids(data_config, split, ids[lo:hi], batch_size=rows, seed=seed)
  template = None
  for _ in range(num_batches):
    batch = next(mine, None)
    if batch is not None and template is None:
      template = batch
    if batch is None:
      batch = {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in template.items()} if (
          template is not None) else None
    if batch is None:  # this host has no examples at all: take shapes from a peek elsewhere
      first = next(read_ids(data_config, split, ids[:1], batch_size=1, seed=seed))
      template = first
      batch = {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in first.items()}
    n = len(batch["id"])
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
           for k, v in batch.items()}
    out["id"][n:] = -1
    out["valid"] = np.arange(rows) < n
    yield out
