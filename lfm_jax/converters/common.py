"""Shared helpers for strict PyTorch -> Flax conversion, and reading/writing weight files.

Weight files are read and written through lfm_jax.storage (local paths or gs://), whole into
memory: safetensors with safetensors.numpy, PyTorch pickles with torch.load (lazily imported).
"""

import io
from typing import Any, Dict, Iterable, Mapping

import numpy as np

from lfm_jax import storage


class WeightConversionError(ValueError):
  """A checkpoint does not match the model: lists every missing, unexpected, mis-shaped key."""


def check_keys(
    source: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Mapping[str, tuple] | Iterable[tuple] = (),
) -> None:
  """Raises one WeightConversionError naming every problem, or returns None.

  Args:
    source: the file or directory the weights came from (named in the message).
    missing: keys the model needs that the checkpoint lacks.
    unexpected: checkpoint keys the model does not use.
    mismatched: (key, checkpoint_shape, expected_shape) triples, or a mapping
      key -> (checkpoint_shape, expected_shape).
  """
  missing = sorted(missing)
  unexpected = sorted(unexpected)
  if isinstance(mismatched, Mapping):
    mismatched = [(k, *v) for k, v in mismatched.items()]
  mismatched = sorted(mismatched)
  if not (missing or unexpected or mismatched):
    return
  lines = [f"checkpoint {source} does not match the model:"]
  for k in missing:
    lines.append(f"  missing key: {k}")
  for k in unexpected:
    lines.append(f"  unexpected key: {k}")
  for k, got, want in mismatched:
    lines.append(f"  wrong shape: {k}: checkpoint {tuple(got)}, model expects {tuple(want)}")
  raise WeightConversionError("\n".join(lines))


def torch_load(path: str, trust_pickle: bool = False):
  """torch.load on CPU for a PyTorch checkpoint (torch is imported here, lazily: optional).

  Files are read with weights_only=True; a file that pickles Python objects (e.g. an argparse
  Namespace) fails with a message that names trust_pickle=True (only for files you trust).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch (an optional dependency: pip install torch); "
                      "safetensors files do not") from None
  data = storage.read_bytes(path)
  try:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # pickle.UnpicklingError and friends
    if trust_pickle:
      raise
    raise WeightConversionError(
        f"{path}: torch.load(weights_only=True) failed ({e}); if you trust the file, pass "
        "trust_pickle=True") from e


def load_safetensors(path) -> Dict[str, Any]:
  """{key: array} of a .safetensors file (numpy; bfloat16 files come back as torch tensors)."""
  data = storage.read_bytes(path)
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    return st_numpy.load(data)
  except Exception:  # bfloat16 tensors have no numpy dtype; go through torch if present
    from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
    return st_torch.load(data)


def save_safetensors(path, state_dict: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes {key: numpy array} as .safetensors (atomically, local or gs://)."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  storage.write_bytes(path, st_numpy.save(arrays, metadata=dict(metadata) if metadata else None))


def torch_save(path, state_dict: Mapping[str, np.ndarray]) -> None:
  """torch.save of a plain state dict of numpy arrays (atomically, local or gs://)."""
  import torch  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, buf)
  storage.write_bytes(path, buf.getvalue())
