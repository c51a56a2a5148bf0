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


TINY = {
    "data.image_size": 8, "autoencoder.block_out_channels": (8, 16),
    "autoencoder.norm_num_groups": 8, "autoencoder.train.num_steps": 30,
    "autoencoder.train.log_every": 10, "model.model_channels": 16, "model.channel_mult": (1, 2),
    "model.norm_num_groups": 8, "model.mid_attention": False, "train.batch_size": 64,
    "train.num_steps": 20, "train.log_every": 10, "train.checkpoint_every": 10,
    "train.sample_every": 0, "sample.num_steps": 8, "sample.num_samples": 20,
    "sample.batch_size": 24, "eval.num_samples": 48, "eval.batch_size": 48,
    "eval.kid_subsets": 5, "stability.num_samples": 16,
}


def tiny_config(data_dir, **overrides):
  """The embedded default, shrunk to seconds by TINY (8x8 digits, tiny widths, few steps).

  overrides: {"section.key": value}, applied last.
  """
  c = default_config()
  c.data.data_dir = str(data_dir)
  set_keys(c, TINY)
  set_keys(c, overrides)
  return c


def cli_flags(data_dir, **overrides) -> list[str]:
  """The same shrinking as command-line flags (`--config.section.key=value`)."""
  def text(v):
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
  values = {"data.data_dir": str(data_dir), **TINY, **overrides}
  return [f"--config.{k}={text(v)}" for k, v in values.items()]


def set_keys(config, overrides):
  """Applies {"a.b.c": value} overrides to a ConfigDict in place; returns it."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def load_fidelity_module(name: str):
  """One torch_fidelity module file, without running the package's __init__ (which imports
  torchvision): a bare package object with the real __spec__ stands in for the package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  pkg = sys.modules.get("torch_fidelity")
  if pkg is None:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
      pytest.skip("torch-fidelity not installed")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["torch_fidelity"] = pkg
  full = f"torch_fidelity.{name}"
  if full not in sys.modules:
    mspec = importlib.util.spec_from_file_location(
        full, os.path.join(pkg.__path__[0], f"{name}.py"))
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[full] = mod
    mspec.loader.exec_module(mod)
  return sys.modules[full]
