"""What a run reports: progress lines for people, metrics for TensorBoard and metrics.jsonl.

- `say(message)`: one progress line on stdout, `[lfm_jax] ...` (process 0 only).
- `create_metric_writer(logdir)`: TensorBoard event files (clu's SummaryWriter, loaded only here,
  so the core imports without TensorFlow) and `<logdir>/metrics.jsonl`, on process 0; other
  processes write nothing. Both go through lfm_jax.storage paths, so gs:// works.
- `ProgressLine`: the one line per log interval a trainer prints (metrics, steps/s, ETA).
"""

import json
import math
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from lfm_jax import storage


def say(message: str) -> None:
  """A progress line for people (stdout, process 0)."""
  if jax.process_index() == 0:
    print(f"[lfm_jax] {message}", flush=True)


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLine:
  """Steps/s and ETA between two log points; `line(step, metrics)` formats the one line."""

  def __init__(self, name: str, start_step: int, num_steps: int):
    self.name, self.num_steps = name, num_steps
    self._step, self._time = start_step, time.monotonic()
    self._t0 = self._time

  def update(self, step: int) -> tuple[float, float]:
    """(steps/s since the last update, ETA in seconds)."""
    now = time.monotonic()
    rate = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else float("inf")
    return rate, eta

  @property
  def uptime(self) -> float:
    return time.monotonic() - self._t0

  def line(self, step: int, metrics: Mapping[str, float], rate: float, eta: float) -> str:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    return (f"{self.name}: step {step}/{self.num_steps} ({100.0 * step / max(self.num_steps, 1):.0f}%)"
            f" {shown}; {rate:.2f} steps/s, ETA {format_eta(eta)}")


class MetricWriter:
  """The writer interface the trainers use (a subset of clu's MetricWriter)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    pass

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    pass

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()


class MultiWriter(MetricWriter):

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self._writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


class JsonlWriter(MetricWriter):
  """Appends one JSON object per step to a metrics.jsonl file.

  Scalars written for the same step in consecutive calls are merged into one record
  {"step": s, name: value, ...}, emitted when another step arrives or on flush/close; hparams
  become a record {"hparams": {...}}. On an object store the file is rewritten at each flush.
  """

  def __init__(self, path: storage.PathLike):
    self._path = storage.path(path)
    self._pending_step: Optional[int] = None
    self._pending: dict[str, Any] = {}
    self._lines: list[str] = []

  def _emit(self, record: Mapping[str, Any]) -> None:
    self._lines.append(json.dumps(record, sort_keys=True) + "\n")

  def _flush_pending(self) -> None:
    if self._pending_step is not None and self._pending:
      self._emit({"step": self._pending_step, **self._pending})
    self._pending_step, self._pending = None, {}

  def write_scalars(self, step, scalars):
    step = int(step)
    if self._pending_step is not None and step != self._pending_step:
      self._flush_pending()
    self._pending_step = step
    for k, v in scalars.items():
      self._pending[k] = float(np.asarray(v))

  def write_hparams(self, hparams):
    self._flush_pending()
    self._emit({"hparams": {k: (v if isinstance(v, (int, float, str, bool)) or v is None
                                else str(v)) for k, v in hparams.items()}})

  def flush(self):
    self._flush_pending()
    if self._lines:
      storage.append_text(self._path, "".join(self._lines))
      self._lines = []


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files through clu's SummaryWriter (TensorFlow's summary ops)."""

  def __init__(self, logdir: storage.PathLike):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self._writer = metric_writers.SummaryWriter(storage.display(logdir))

  def write_scalars(self, step, scalars):
    self._writer.write_scalars(int(step), {k: float(np.asarray(v)) for k, v in scalars.items()})

  def write_images(self, step, images):
    self._writer.write_images(int(step), images)

  def write_hparams(self, hparams):
    self._writer.write_hparams(dict(hparams))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def create_metric_writer(logdir: storage.PathLike, jsonl_name: Optional[str] = "metrics.jsonl",
                         tensorboard: bool = True) -> MetricWriter:
  """TensorBoard event files + <logdir>/<jsonl_name> on process 0; nothing on other processes.

  Without TensorFlow/clu installed the TensorBoard part is left out, with one log line saying so.
  """
  if jax.process_index() > 0:
    if tensorboard:  # the same import work on every host keeps them in step
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top,unused-import
      except ImportError:
        pass
    return MetricWriter()
  storage.makedirs(logdir)
  writers: list[MetricWriter] = []
  if jsonl_name:
    writers.append(JsonlWriter(storage.path(logdir) / jsonl_name))
  if tensorboard:
    try:
      writers.append(TensorBoardWriter(logdir))
    except ImportError as e:
      logging.warning("TensorBoard events are not written (%s); metrics.jsonl is.", e)
  return MultiWriter(writers)


def read_jsonl(path: storage.PathLike) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (for tests and notebooks)."""
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def append_record(path: storage.PathLike, record: Mapping[str, Any]) -> None:
  """Appends one JSON record to a metrics.jsonl (process 0 only)."""
  if jax.process_index() == 0:
    storage.append_text(path, json.dumps(record, sort_keys=True, default=float) + "\n")
