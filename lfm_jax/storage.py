"""File I/O on user paths: local directories and `gs://` buckets through one abstraction.

Every path a user gives lfm_jax (workdir, weight files, reference statistics, manual data) goes
through `etils.epath`, the path library orbax itself uses, so `gs://bucket/run` works wherever a
local path does. This module adds what epath leaves to its callers:

- `path(p)`: an `epath.Path` for a str / os.PathLike / epath.Path (`~` expanded for local paths).
- Atomic writes (`write_bytes`, `write_text`, `write_json`, `write_npz`, `save_npy`): on a
  local disk the bytes go to a temporary file in the same directory that is then renamed over
  the target; an object store (gs://) makes a new object visible only once it is complete, so
  there the object is written directly. Either way a reader never sees a half-written file and
  an interrupted write leaves the previous version in place.
- Readers that name the path in their error (`read_json`, `read_bytes`, `load_npz`).
- `local_copy(p)`: a local file path for libraries that only open local files (downloaded once
  into a temporary directory for remote paths).

Errors a user can fix are raised as `StorageError` with the path in a one-line message.
"""

import contextlib
import io
import json
import os
import tempfile
import uuid
from typing import Any, Iterator, Union

from etils import epath
import numpy as np

# gs:// through fsspec/gcsfs whether or not TensorFlow is installed: one storage stack for the
# core (which runs without TensorFlow) and for full installs. EPATH_USE_TF=true chooses
# tf.io.gfile instead.
os.environ.setdefault("EPATH_USE_TF", "false")

PathLike = Union[str, os.PathLike, epath.Path]


class StorageError(OSError):
  """A path cannot be read or written; the message names it."""


def path(p: PathLike) -> epath.Path:
  """The epath.Path of a user path (local paths get `~` expanded; URIs are kept as given)."""
  if isinstance(p, epath.Path):
    return p
  text = os.fspath(p)
  if not is_remote(text):
    text = os.path.expanduser(text)
  return epath.Path(text)


def is_remote(p: PathLike) -> bool:
  """True for URI paths (gs://, s3://, ...), which live in an object store."""
  return "://" in os.fspath(p)


def display(p: PathLike) -> str:
  """The path as users write it (no `PosixGPath(...)` wrapper)."""
  return os.fspath(p)


def _wrap(p: PathLike, action: str, e: BaseException) -> StorageError:
  reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
  return StorageError(f"cannot {action} {display(p)}: {reason}")


def exists(p: PathLike) -> bool:
  return path(p).exists()


def makedirs(p: PathLike) -> epath.Path:
  """Creates directory p (and parents); returns it. Object stores need no directories."""
  p = path(p)
  try:
    p.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "create directory", e) from e
  return p


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
  """Writes `data` to p atomically (see the module docstring); parents are created."""
  p = path(p)
  makedirs(p.parent)
  try:
    if is_remote(p):
      with p.open("wb") as f:
        f.write(data)
    else:
      tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
      try:
        with tmp.open("wb") as f:
          f.write(data)
        os.replace(os.fspath(tmp), os.fspath(p))
      finally:
        if tmp.exists():
          tmp.unlink()
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "write", e) from e
  return p


def write_text(p: PathLike, text: str) -> epath.Path:
  return write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, indent: int = 2) -> epath.Path:
  """Writes obj as JSON (sorted keys; numpy scalars as numbers) atomically."""
  return write_text(p, json.dumps(obj, indent=indent, sort_keys=True, default=_json_default) + "\n")


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def write_npz(p: PathLike, **arrays: np.ndarray) -> epath.Path:
  """np.savez of the arrays, written atomically (the name is used as given: no '.npz' added)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return write_bytes(p, buf.getvalue())


def save_npy(p: PathLike, array: np.ndarray) -> epath.Path:
  buf = io.BytesIO()
  np.save(buf, np.asarray(array))
  return write_bytes(p, buf.getvalue())


def read_bytes(p: PathLike) -> bytes:
  p = path(p)
  try:
    return p.read_bytes()
  except FileNotFoundError as e:
    raise StorageError(f"{display(p)} does not exist") from e
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "read", e) from e


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode("utf-8")


def read_json(p: PathLike) -> Any:
  text = read_text(p)
  try:
    return json.loads(text)
  except ValueError as e:
    raise StorageError(f"{display(p)} is not valid JSON: {e}") from e


def load_npz(p: PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz file, read whole into memory (works for gs:// objects)."""
  data = read_bytes(p)
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{display(p)} is not a readable .npz file: {e}") from e


def load_npy(p: PathLike) -> np.ndarray:
  data = read_bytes(p)
  try:
    return np.load(io.BytesIO(data), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{display(p)} is not a readable .npy file: {e}") from e


def append_text(p: PathLike, text: str) -> None:
  """Appends text to p. Object stores cannot append: there the object is rewritten whole."""
  p = path(p)
  if is_remote(p):
    old = p.read_bytes() if p.exists() else b""
    write_bytes(p, old + text.encode("utf-8"))
    return
  makedirs(p.parent)
  try:
    with p.open("a") as f:
      f.write(text)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "append to", e) from e


def remove_tree(p: PathLike) -> None:
  """Deletes a directory tree (or file) if it exists."""
  p = path(p)
  if p.is_dir():
    p.rmtree()
  elif p.exists():
    p.unlink()


def largest_file(directory: PathLike) -> epath.Path:
  """The largest plain file directly in `directory` (the weights of an exported model dir)."""
  d = path(directory)
  files = [f for f in d.iterdir() if f.is_file()]
  if not files:
    raise StorageError(f"{display(d)} holds no files")
  return max(files, key=lambda f: f.stat().length)


def file_identity(p: PathLike) -> dict[str, Any]:
  """What identifies a file's content cheaply: its path, size and modification time."""
  p = path(p)
  try:
    st = p.stat()
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "stat", e) from e
  text = display(p) if is_remote(p) else os.path.abspath(display(p))
  return {"path": text, "size": int(st.length), "mtime": int(st.mtime)}


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
  """A local filesystem path holding p's content: p itself when local, else a downloaded copy
  (directories are copied whole) that is deleted on exit."""
  p = path(p)
  if not is_remote(p):
    yield display(p)
    return
  if not p.exists():
    raise StorageError(f"{display(p)} does not exist")
  with tempfile.TemporaryDirectory(prefix="lfm_jax_") as tmp:
    target = os.path.join(tmp, p.name)
    if p.is_dir():
      for root, _, files in p.walk():
        rel = os.path.relpath(os.fspath(root), os.fspath(p))
        os.makedirs(os.path.join(target, rel), exist_ok=True)
        for name in files:
          with open(os.path.join(target, rel, name), "wb") as f:
            f.write((root / name).read_bytes())
    else:
      with open(target, "wb") as f:
        f.write(read_bytes(p))
    yield target


def _write_probe(p: epath.Path) -> None:
  probe = p / f".lfm_jax_write_probe-{uuid.uuid4().hex[:8]}"
  probe.write_bytes(b"")
  probe.unlink()


def check_writable(p: PathLike, what: str = "directory") -> None:
  """Creates directory p and proves a file can be written and removed there; StorageError
  ("cannot create <what> ..." / "<what> ... is not writable") otherwise."""
  p = path(p)
  try:
    p.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"cannot create {what} {display(p)}: "
                       f"{getattr(e, 'strerror', None) or (str(e).splitlines() or [''])[0]}") from e
  try:
    _write_probe(p)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{what} {display(p)} is not writable: "
                       f"{getattr(e, 'strerror', None) or (str(e).splitlines() or [''])[0]}") from e
