"""Small helpers shared by the tests (not part of the library)."""

import os
import re
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


_INCEPTION_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c")


def random_fidelity_inception(features: tuple, seed: int, calibration_size: int = 64):
  """(model, module): torch-fidelity's FID InceptionV3 with seeded random weights (no download),
  BatchNorm statistics calibrated on one random batch of calibration_size² images so the
  activations stay O(1) through the ~95 layers; in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  fe = load_fidelity_module("feature_extractor_inceptionv3")
  torch.manual_seed(seed)

  class NoDownload(fe.FeatureExtractorInceptionV3):
    def load_state_dict(self, state_dict, *args, **kwargs):
      if state_dict is None:  # the constructor's would-be download: keep the random init
        return None
      return super().load_state_dict(state_dict, *args, **kwargs)

  original = fe.load_state_dict_from_url
  fe.load_state_dict_from_url = lambda *a, **k: None
  try:
    model = NoDownload("inception-v3-compat", list(features))
  finally:
    fe.load_state_dict_from_url = original
  for bn in model.modules():
    if isinstance(bn, torch.nn.BatchNorm2d):
      bn.momentum = 1.0
  model.train()
  with torch.no_grad():
    x = torch.rand(2, 3, calibration_size, calibration_size) * 255
    x = fe.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    for layer in _INCEPTION_LAYERS:
      x = getattr(model, layer)(x)
  model.eval()
  return model, fe


def randomise_batch_norm(model, generator) -> None:
  """Moves every BatchNorm's statistics and affine parameters randomly away from calibration."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for bn in model.modules():
      if isinstance(bn, torch.nn.BatchNorm2d):
        n = bn.num_features
        bn.running_mean += 0.05 * torch.randn(n, generator=generator) * bn.running_var.sqrt()
        bn.running_var *= 0.9 + 0.2 * torch.rand(n, generator=generator)
        bn.weight.copy_(0.9 + 0.2 * torch.rand(n, generator=generator))
        bn.bias.copy_(0.1 * torch.randn(n, generator=generator))


def ynn_fused(hlo_text: str, opcode: str) -> list[str]:
  """The `opcode` instructions (e.g. "convolution", "dot") inside the YNNPACK fusions of a
  compiled HLO module's text."""
  bodies = dict(re.findall(r"^%?(\S+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S))
  called = re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", hlo_text)
  return [line for name in called for line in bodies.get(name, "").splitlines()
          if f" {opcode}(" in line]
