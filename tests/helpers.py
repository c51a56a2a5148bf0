"""Small helpers shared by the tests (not part of the library)."""

import os
import sys
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config():
  """configs/default.py's get_config() (the repository root need not be on sys.path)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import default  # pylint: disable=g-import-not-at-top
  return default.get_config()


def tree_max_abs_diff(a: Any, b: Any) -> float:
  """max |a - b| over all leaves of two trees of the same structure (host float64)."""
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64)
                                                         - np.asarray(y, np.float64))))
                       if np.size(x) else 0.0, a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def tiny_config(data_dir, **overrides):
  """The embedded default, shrunk to seconds: 8x8 digits, tiny widths, few steps.

  overrides: {"section.key": value}, applied last.
  """
  c = default_config()
  c.data.data_dir = str(data_dir)
  c.data.image_size = 8
  c.autoencoder.block_out_channels = (8, 16)
  c.autoencoder.norm_num_groups = 8
  c.autoencoder.train.num_steps = 30
  c.autoencoder.train.log_every = 10
  c.model.model_channels = 16
  c.model.channel_mult = (1, 2)
  c.model.norm_num_groups = 8
  c.model.mid_attention = False
  c.train.batch_size = 64
  c.train.num_steps = 20
  c.train.log_every = 10
  c.train.checkpoint_every = 10
  c.train.sample_every = 0
  c.sample.num_steps = 8
  c.sample.num_samples = 20
  c.sample.batch_size = 24
  c.eval.num_samples = 48
  c.eval.batch_size = 48
  c.eval.kid_subsets = 5
  c.stability.num_samples = 16
  set_keys(c, overrides)
  return c


def set_keys(config, overrides):
  """Applies {"a.b.c": value} overrides to a ConfigDict in place; returns it."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config
