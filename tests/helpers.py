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
