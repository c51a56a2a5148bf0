"""The run directory: every path of a run, and the writes into it.

    <workdir>/
      config.json              the resolved config of the last command run here
      metrics.jsonl            one JSON record per log interval / stage (process 0)
      events.out.tfevents.*    TensorBoard (flow training)
      autoencoder/             checkpoints/ (orbax), diffusers/ (export), metrics.jsonl, events
      latents/                 the latent cache (manifest.json + group files)
      checkpoints/             the flow model (orbax); kept_ids.npy for a pruned subset
      samples/                 PNG grids and .npz files
      eval/                    metrics.json, reference statistics, the digits classifier
      scores/                  scores_<criterion>.npz
      stability/               report.json, pairs.png
      export/                  a self-describing model directory (lfm_jax.load reads it)

A workdir may be a local path or a gs:// URI (lfm_jax.storage). Single files shared by all hosts
(config.json, metrics.jsonl, PNGs, JSON reports, exports) are written by process 0 only, through
the `write_*` methods here, which do nothing on other processes.
"""

from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from lfm_jax import storage
from lfm_jax.config_validation import config_from_dict

CONFIG = "config.json"


class Workdir:
  """The paths of one run directory (see the module docstring)."""

  def __init__(self, root: storage.PathLike):
    self.root = storage.path(root)

  @classmethod
  def of(cls, workdir: "storage.PathLike | Workdir") -> "Workdir":
    return workdir if isinstance(workdir, Workdir) else cls(workdir)

  def __str__(self) -> str:
    return storage.display(self.root)

  def __repr__(self) -> str:
    return f"Workdir({str(self)!r})"

  def __fspath__(self) -> str:
    return str(self)

  # ------------------------------------------------------------------------- paths
  @property
  def config_json(self):
    return self.root / CONFIG

  @property
  def metrics_jsonl(self):
    return self.root / "metrics.jsonl"

  @property
  def autoencoder(self):
    return self.root / "autoencoder"

  @property
  def autoencoder_checkpoints(self):
    return self.autoencoder / "checkpoints"

  @property
  def autoencoder_export(self):
    """The trained autoencoder in the diffusers layout (loaded like pretrained weights)."""
    return self.autoencoder / "diffusers"

  @property
  def latents(self):
    return self.root / "latents"

  @property
  def checkpoints(self):
    return self.root / "checkpoints"

  @property
  def kept_ids(self):
    """The example ids of a pruned training subset, saved beside the checkpoints."""
    return self.checkpoints / "kept_ids.npy"

  @property
  def samples(self):
    return self.root / "samples"

  @property
  def eval(self):
    return self.root / "eval"

  @property
  def scores(self):
    return self.root / "scores"

  def scores_file(self, criterion: str):
    return self.scores / f"scores_{criterion}.npz"

  @property
  def stability(self):
    return self.root / "stability"

  @property
  def export(self):
    return self.root / "export"

  # ------------------------------------------------------------------------- state
  def exists(self) -> bool:
    return self.config_json.exists()

  def prepare(self, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir, checks it is writable and writes the resolved config.json
    (process 0). Raises storage.StorageError naming the path."""
    if jax.process_index() == 0:
      storage.check_writable(self.root, what="workdir")
      self.write_text(self.config_json, config.to_json_best_effort(indent=2, sort_keys=True))
    from lfm_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.sync("workdir_prepared")

  def read_config(self) -> ml_collections.ConfigDict:
    """The resolved config this run wrote (lists come back as tuples)."""
    if not self.config_json.exists():
      raise storage.StorageError(f"{self.config_json} not found: is {self} an lfm_jax workdir?")
    return config_from_dict(storage.read_json(self.config_json))

  def latest_step(self, directory: Optional[storage.PathLike] = None) -> Optional[int]:
    """The newest committed checkpoint step in `directory` (default: the flow checkpoints)."""
    return latest_step(self.checkpoints if directory is None else directory)

  # ------------------------------------------------------------------------- writes (process 0)
  def write_text(self, path: storage.PathLike, text: str) -> None:
    if jax.process_index() == 0:
      storage.write_text(path, text)

  def write_json(self, path: storage.PathLike, obj: Any) -> None:
    if jax.process_index() == 0:
      storage.write_json(path, obj)

  def write_npz(self, path: storage.PathLike, **arrays: np.ndarray) -> None:
    if jax.process_index() == 0:
      storage.write_npz(path, **arrays)

  def save_npy(self, path: storage.PathLike, array: np.ndarray) -> None:
    if jax.process_index() == 0:
      storage.save_npy(path, array)

  def save_image_grid(self, path: storage.PathLike, images: np.ndarray,
                      ncols: Optional[int] = None) -> None:
    if jax.process_index() == 0:
      from lfm_jax import images as images_lib  # pylint: disable=g-import-not-at-top
      images_lib.save_image_grid(images, path, ncols)

  def append_metrics(self, record: dict) -> None:
    """Appends one JSON line to metrics.jsonl."""
    from lfm_jax import writers  # pylint: disable=g-import-not-at-top
    writers.append_record(self.metrics_jsonl, record)


def latest_step(directory: storage.PathLike) -> Optional[int]:
  """The newest committed orbax checkpoint step in `directory`, None if there is none.

  Uncommitted (in-progress or interrupted) step directories do not count.
  """
  d = storage.path(directory)
  if not d.exists():
    return None
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return manager.latest_step()
  finally:
    manager.close()
