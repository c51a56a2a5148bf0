"""PyTorch FID InceptionV3 weights -> Flax (`lfm_jax.models.inception.InceptionV3`).

Accepts pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (same key layout: `Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`, `fc.bias`). Strict: every key the model
needs must be present with the right shape, and the only checkpoint keys ignored are the ones known
to be unused by the 2048-d pool3 features:
  - `fc.weight` (1008, 2048), `fc.bias` (1008,): the logits layer (shape-checked, so that
    torchvision's ImageNet InceptionV3, 1000 classes, which is NOT the FID network, is refused);
  - `*.bn.num_batches_tracked`: a BatchNorm training counter.
Anything else (e.g. torchvision's `AuxLogits.*`) is an error. torch is imported lazily, only to
read the file; nothing is ever downloaded.
"""

import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from lfm_jax import storage
from lfm_jax.converters.common import check_keys, torch_load
from lfm_jax.models.inception import InceptionV3, variable_shapes

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
_FC_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
_BN_PARAM_NAMES = {"scale": "weight", "bias": "bias"}
_BN_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) in ("torch.bfloat16", "torch.float16"):
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _expected_torch_keys() -> Dict[str, Tuple[Tuple[int, ...], Tuple[str, ...], Any]]:
  """torch key -> (torch shape, flax path (collection, ...), transform)."""
  shapes = variable_shapes(InceptionV3())
  out = {}

  def walk(tree, path):
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        walk(v, path + (k,))
      return
    collection, *mods, leaf = path
    prefix = ".".join(mods[:-1])  # mods ends with "conv" or "bn"
    layer = mods[-1]
    shape = tuple(tree.shape)
    if collection == "params" and layer == "conv" and leaf == "kernel":
      kh, kw, cin, cout = shape
      out[f"{prefix}.conv.weight"] = ((cout, cin, kh, kw), path, "conv")
    elif collection == "params" and layer == "bn":
      out[f"{prefix}.bn.{_BN_PARAM_NAMES[leaf]}"] = (shape, path, None)
    elif collection == "batch_stats" and layer == "bn":
      out[f"{prefix}.bn.{_BN_STAT_NAMES[leaf]}"] = (shape, path, None)
    else:
      raise AssertionError(f"unexpected variable {path}")

  walk(shapes, ())
  return out


def _is_known_unused(key: str) -> bool:
  return key in _FC_SHAPES or key.endswith(".bn.num_batches_tracked")


def convert_inception_state_dict(state_dict: Mapping[str, Any], source: str = "<state_dict>"):
  """Pure conversion: a PyTorch FID-Inception state dict -> Flax variables.

  Args:
    state_dict: key -> torch tensor or numpy array.
    source: named in error messages.
  Returns:
    {"params": ..., "batch_stats": ...} (nested dicts of float32 numpy arrays) for
    `InceptionV3().apply(variables, images)`.
  Raises:
    WeightConversionError listing every missing, unexpected and mis-shaped key.
  """
  expected = _expected_torch_keys()
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected and not _is_known_unused(k)]
  mismatched = []
  for k, v in state_dict.items():
    shape = tuple(np.shape(v)) if not hasattr(v, "shape") else tuple(v.shape)
    if k in expected and shape != expected[k][0]:
      mismatched.append((k, shape, expected[k][0]))
    elif k in _FC_SHAPES and shape != _FC_SHAPES[k]:
      mismatched.append((k, shape, _FC_SHAPES[k]))
  check_keys(source, missing, unexpected, mismatched)

  variables: Dict[str, Any] = {}
  for k, (_, path, transform) in expected.items():
    arr = _to_numpy(state_dict[k]).astype(np.float32)
    if transform == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
      arr = np.transpose(arr, (2, 3, 1, 0))
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(arr)
  return variables


def load_inception(path: str):
  """Loads FID InceptionV3 weights from a local .pth file -> (module, variables).

  `variables` holds both collections ("params" and "batch_stats"):
  `module.apply(variables, images_0_255)` -> (B, 2048). Never downloads: if `path` does not exist,
  raises FileNotFoundError saying where to get the file.
  """
  path = os.fspath(path)
  if not storage.path(path).is_file():
    raise FileNotFoundError(
        f"Inception weights file not found: {path}. Download pytorch-fid's {WEIGHTS_FILENAME} "
        "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        f"{WEIGHTS_FILENAME}) and pass its path (config.eval.inception_weights).")
  state_dict = torch_load(path)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
  if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
    state_dict = state_dict["state_dict"]
  return InceptionV3(), convert_inception_state_dict(state_dict, source=path)


def convert_inception_logits(state_dict: Mapping[str, Any], source: str = "<state_dict>"):
  """The 1008-way `fc` of a FID-Inception state dict -> {"kernel": (2048, 1008), "bias": (1008,)}.

  For `InceptionV3(with_logits=True)` (variables["params"]["fc"]). Strict: `fc.weight` and
  `fc.bias` must be present with pytorch-fid's shapes (torchvision's 1000-class head is refused).
  """
  missing = [k for k in _FC_SHAPES if k not in state_dict]
  mismatched = [(k, tuple(state_dict[k].shape), shape) for k, shape in _FC_SHAPES.items()
                if k in state_dict and tuple(state_dict[k].shape) != shape]
  check_keys(source, missing, (), mismatched)
  return {"kernel": np.ascontiguousarray(_to_numpy(state_dict["fc.weight"]).astype(np.float32).T),
          "bias": _to_numpy(state_dict["fc.bias"]).astype(np.float32)}


def load_inception_with_logits(path: str):
  """As `load_inception`, logits included -> (InceptionV3(with_logits=True), variables).

  `module.apply(variables, images_0_255)` returns {"pool3", "logits_unbiased", "logits"}
  (the Inception Score reads "logits_unbiased"). Raises WeightConversionError when the file
  lacks `fc.weight` / `fc.bias`.
  """
  path = os.fspath(path)
  if not storage.path(path).is_file():
    load_inception(path)  # raises FileNotFoundError saying where to get the file
  state_dict = torch_load(path)
  if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
    state_dict = state_dict["state_dict"]
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
  variables = convert_inception_state_dict(state_dict, source=path)
  variables["params"]["fc"] = convert_inception_logits(state_dict, source=path)
  return InceptionV3(with_logits=True), variables


__all__ = ("load_inception", "convert_inception_state_dict", "WEIGHTS_FILENAME",
           "convert_inception_logits", "load_inception_with_logits")
