"""Shared helpers for strict PyTorch -> Flax conversion."""

from typing import Iterable, Mapping


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
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # pickle.UnpicklingError and friends
    if trust_pickle:
      raise
    raise WeightConversionError(
        f"{path}: torch.load(weights_only=True) failed ({e}); if you trust the file, pass "
        "trust_pickle=True") from e
