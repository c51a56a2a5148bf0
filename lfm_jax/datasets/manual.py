"""Manual files of the paper data sets: what each builder expects, where, and checks of them.

`manual_files(builder, manual_dir)` says, for a builder that reads manually downloaded files,
whether they are there, what to put where (one line), and gives a check to run before preparing:
a wrong file (an archive at another resolution, a corrupt zip/tar/LMDB, a stray member) raises
`ManualFileError` naming the file, at once, instead of failing hours into a preparation or, later,
inside a compiled step.

Expected files (manual dir; default <data_dir>/downloads/manual):
  celeb_a_hq/<R>   tfds' builder: data<R>x<R>.tar, a tar of the R x R images (PNG or JPEG, any
                   folder inside, e.g. data256x256/00000.png); every non-hidden file is an image.
  imagenet2012     tfds' builder: ILSVRC2012_img_train.tar (one n<8 digits>.tar per synset, each a
                   tar of n..._<k>.JPEG) and ILSVRC2012_img_val.tar (ILSVRC2012_val_<8 digits>.JPEG,
                   numbered from 1: tfds gives the k-th sorted name the k-th bundled label).
  ffhq/<R>         ours (ffhq.py): images1024x1024/<5 digits>/<5 digits>.png.
  lfm_lsun/<cat>   ours (lsun_lmdb.py): <cat>_train_lmdb/ (data.mdb) or <cat>_train_lmdb.zip, and
                   optionally <cat>_val_lmdb[.zip].
  celebamask_hq/<R>  ours (celebamask_hq.py): CelebAMask-HQ.zip or the unpacked CelebAMask-HQ/.
"""

from __future__ import annotations

import dataclasses
import io
import re
import tarfile
from typing import Callable, Optional

from etils import epath

__all__ = ["DatasetNotAvailableError", "ManualFileError", "ManualFiles", "manual_files",
           "IMAGE_SUFFIXES", "check_image_bytes"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetNotAvailableError(RuntimeError):
  """The data set is not prepared and cannot be prepared offline; the message says how."""


class ManualFileError(DatasetNotAvailableError):
  """A manual file is there but is not what the builder reads (format, resolution, layout).

  The message is always one line (library messages quoted in it are flattened).
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class ManualFiles:
  """present: the files are there; instructions: what to put where; check: raises
  ManualFileError on a wrong file (run it before preparing)."""
  present: bool
  instructions: str
  check: Callable[[], None] = lambda: None


def _hidden(name: str) -> bool:
  """tfds' archive iterator skips these members (hidden files, backups, absolute paths)."""
  base = name.rstrip("/").split("/")[-1]
  return not base or base.startswith(".") or name.startswith(("/", ".")) or name.endswith("~")


def check_image_bytes(data: bytes, where: str, *, size: Optional[int] = None,
                      square: bool = False) -> tuple[int, int]:
  """(width, height) of an encoded image; ManualFileError naming `where` if it is not one."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      w, h = im.size
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise ManualFileError(f"{where} is not a readable image ({type(e).__name__}: {e})") from e
  if size is not None and (w, h) != (size, size):
    raise ManualFileError(f"{where} is {w}x{h}, expected {size}x{size}")
  if square and w != h:
    raise ManualFileError(f"{where} is {w}x{h}, expected a square image")
  return w, h


def _open_tar(path: epath.Path, what: str):
  try:
    f = path.open("rb")
    return f, tarfile.open(fileobj=f, mode="r:*")
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ManualFileError(f"{path} is not a readable tar archive ({e}); {what}") from e


def _members(tar, path) -> list[tarfile.TarInfo]:
  try:
    return [m for m in tar if m.isfile() and not _hidden(m.name)]
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ManualFileError(f"{path} is a truncated or corrupt tar archive ({e})") from e


# --------------------------------------------------------------------------- tfds' celeb_a_hq


def check_celeb_a_hq_tar(path: epath.Path, resolution: int, num_checked: int = 3) -> int:
  """Checks data<R>x<R>.tar: a tar of R x R images only (the first `num_checked` decoded, the
  others' sizes read from their headers). Returns the number of images."""
  f, tar = _open_tar(path, "celeb_a_hq reads a tar of the R x R images")
  with f, tar:
    members = _members(tar, path)
    if not members:
      raise ManualFileError(f"{path} holds no images")
    odd = [m.name for m in members if not m.name.lower().endswith(IMAGE_SUFFIXES)]
    if odd:
      raise ManualFileError(f"{path} holds {len(odd)} non-image member(s), e.g. {odd[0]!r}; "
                            f"celeb_a_hq stores every file of the tar as an image")
    for m in members[:num_checked]:  # decoded in full
      check_image_bytes(tar.extractfile(m).read(), f"{path}:{m.name}", size=resolution)
    for m in members[num_checked:]:  # the size in each header (a few seconds for 30,000)
      _check_header_size(tar.extractfile(m), f"{path}:{m.name}", resolution)
  return len(members)


def _check_header_size(fobj, where: str, size: int) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(fobj) as im:
      w, h = im.size
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise ManualFileError(f"{where} is not a readable image ({type(e).__name__}: {e})") from e
  if (w, h) != (size, size):
    raise ManualFileError(f"{where} is {w}x{h}, expected {size}x{size}")


def _celeb_a_hq(builder, manual_dir: epath.Path) -> ManualFiles:
  r = builder.builder_config.resolution
  fname = builder.builder_config.file_name
  path = manual_dir / fname
  hint = ""
  stem = fname[:-len(".tar")]
  if not path.exists() and ((manual_dir / stem).is_dir() or (manual_dir / f"{stem}.zip").exists()):
    hint = (f" (tfds reads only the .tar: `tar cf {fname} {stem}` in {manual_dir} after "
            f"unzipping)")
  return ManualFiles(
      path.exists(),
      f"put {fname} (a tar of the 30,000 CelebA-HQ images at {r}x{r}, PNG or JPEG) in "
      f"{manual_dir}{hint}",
      lambda: check_celeb_a_hq_tar(path, r))


# --------------------------------------------------------------------------- tfds' imagenet2012

_SYNSET = re.compile(r"^n\d{8}\.tar$")
_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")


def imagenet_synsets() -> list[str]:
  """The 1,000 synset ids in tfds' label order (label k = line k of tfds' labels.txt)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
  return path.read_text().split()


def imagenet_validation_synsets() -> list[str]:
  """Synset of validation image k (1-based) at position k - 1 (tfds' bundled labels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
  return path.read_text().split()


def check_imagenet(train: epath.Path, val: epath.Path) -> None:
  """Checks the two ImageNet tars' layout (names, nesting, the first JPEG)."""
  synsets = set(imagenet_synsets())
  f, tar = _open_tar(train, "it should be the tar of 1,000 per-synset tars")
  with f, tar:
    members = _members(tar, train)
    if not members:
      raise ManualFileError(f"{train} holds no synset tars")
    for m in members:
      if not _SYNSET.match(m.name) or m.name[:-4] not in synsets:
        raise ManualFileError(f"{train} holds {m.name!r}, not a per-synset tar n<8 digits>.tar "
                              f"of an ImageNet-1k synset")
    inner_f = tar.extractfile(members[0])
    try:
      inner = tarfile.open(fileobj=inner_f, mode="r|*")
      first = next(iter(inner), None)
      data = inner.extractfile(first).read() if first is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
      raise ManualFileError(f"{train}:{members[0].name} is not a readable tar ({e})") from e
    if first is None:
      raise ManualFileError(f"{train}:{members[0].name} holds no images")
    check_image_bytes(data, f"{train}:{members[0].name}:{first.name}")
  f, tar = _open_tar(val, "it should be a tar of ILSVRC2012_val_<8 digits>.JPEG")
  with f, tar:
    names = sorted(m.name for m in _members(tar, val))
    if not names:
      raise ManualFileError(f"{val} holds no images")
    for k, name in enumerate(names, 1):
      match = _VAL.match(name)
      if not match:
        raise ManualFileError(f"{val} holds {name!r}, not ILSVRC2012_val_<8 digits>.JPEG")
      if int(match.group(1)) != k:
        raise ManualFileError(
            f"{val}: the validation images must be numbered 1..{len(names)} without gaps "
            f"(tfds gives the k-th sorted name the k-th label), but image {k} is {name!r}")
    if len(names) > 50_000:
      raise ManualFileError(f"{val} holds {len(names)} images; ILSVRC2012 has 50,000")


def _imagenet(builder, manual_dir: epath.Path) -> ManualFiles:
  del builder
  train = manual_dir / "ILSVRC2012_img_train.tar"
  val = manual_dir / "ILSVRC2012_img_val.tar"
  return ManualFiles(
      train.exists() and val.exists(),
      f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
      f"https://image-net.org/download-images, after registering) in {manual_dir}",
      lambda: check_imagenet(train, val))


# --------------------------------------------------------------------------- dispatch


def manual_files(builder, manual_dir) -> Optional[ManualFiles]:
  """What `builder` needs from the manual dir; None when it needs no manual files."""
  # pylint: disable=g-import-not-at-top
  from lfm_jax.datasets import celebamask_hq, ffhq, lsun_lmdb

  manual_dir = epath.Path(manual_dir)
  name = builder.name
  if name == "celeb_a_hq":
    return _celeb_a_hq(builder, manual_dir)
  if name == "imagenet2012":
    return _imagenet(builder, manual_dir)
  if name == "ffhq":
    return ffhq.manual_files(manual_dir)
  if name == "lfm_lsun":
    return lsun_lmdb.manual_files(builder.builder_config, manual_dir)
  if name == "celebamask_hq":
    return celebamask_hq.manual_files(manual_dir)
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions:
    present = manual_dir.is_dir() and any(manual_dir.iterdir())
    return ManualFiles(present, f"put the files in {manual_dir}: {' '.join(instructions.split())}")
  return None
