"""Input pipelines: every image lfm_jax reads goes through tensorflow-datasets.

Data sets (`config.data.name`; the manual files each needs: lfm_jax/datasets/manual.py):
  "lfm_digits"       scikit-learn's digits (lfm_jax/datasets/lfm_digits.py); the builder config
                     follows data.image_size and data.channels ("16x16_gray", ...). Offline.
  "celeb_a_hq/256"   tfds CelebA-HQ; manual dir: data256x256.tar (a tar of the 256px images).
  "ffhq"             our builder over the official PNGs (lfm_jax/datasets/ffhq.py); manual dir.
  "lfm_lsun/church_outdoor", "lfm_lsun/bedroom"
                     our builder over the official LMDB folders or zips (datasets/lsun_lmdb.py),
                     stored in LMDB key order; with data.max_train_examples = N only the first N
                     train keys are prepared (config "<category>_first<N>").
  "lsun/church_outdoor", "lsun/bedroom"
                     tfds LSUN (needs a prepared copy: it is downloaded, never here);
                     data.max_train_examples keeps the first N in LMDB key order (tfds stores LSUN
                     shuffled; ids stay split indices).
  "imagenet2012"     tfds ImageNet; manual dir: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar.
  "celebamask_hq"    our builder over CelebAMask-HQ.zip (datasets/celebamask_hq.py): images and
                     19-class label maps; splits train (images 0..26999) and test (27000..29999).
  "image_folder"     data.image_folder (class sub-folders -> labels; see datasets/image_folder.py).
  any other tfds name (used as is).
`PAPER_PRESETS` lists the preprocessing the paper experiments use for each.

Splits: any tfds split expression of ONE split: "train", "train[:27000]", "train[27000:]",
"train[:90%]", "validation[10%:]" (tfds resolves it: percent boundaries round to the closest
example). An example's `id` is its index in the BASE split, whatever the slice: the ids of
"train[27000:]" start at 27000; `ids=` and data.max_train_examples speak the same ids.
data.max_train_examples = N keeps the first N examples of data.train_split's selection.

Examples: {"image": float32 (S, S, C) in [-1, 1], "label": int32 (0 when unconditional),
"id": int64}, plus "segmentation": int32 (S, S) class ids when the data set has label maps
(celebamask_hq; resized nearest, flipped with the image, left/right classes swapped), plus
"mask": float32 (S, S), 1 = known pixel, 0 = hole, when data.task == "inpainting"
(lfm_jax/masks.py; data.mask_kind: "lfm" draws LFM's masks from (data.mask_seed, id), the same
for any host count, epoch and batch size; "center"; "file" = one PNG for every example; "dir" =
<data.mask_path>/<id:06d>.png). Preprocessing (data.crop): "none" resizes to
S x S (bilinear, antialiased; a no-op at the stored size), "center" resizes the shorter side to S
then centre-crops (LSUN), "adm" is ADM's centre crop (halve with a box filter while the shorter
side >= 2S, bicubic to shorter side S, round to uint8, centre-crop; with tf's box and
antialiased Keys-cubic kernels this is within ~1 grey level of ADM's PIL code on average). data.random_flip adds a
horizontal flip drawn statelessly from (seed, epoch, id): identical whatever the host count.

Multi-host: each host reads only its own contiguous, even share of the selection (the arithmetic
of `tfds.even_splits`/`tfds.split_for_jax_process`, kept explicit so each example's id is exact).
`batch_size` is always the GLOBAL batch; each host yields batch_size // process_count rows.

Determinism and resume: files are read in order, the epoch-e order is a seeded buffer shuffle with
seed f(seed, host, e), and tf.data runs deterministically. Resuming after k batches rebuilds the
stream at epoch (k * host_batch) // host_examples and skips only within that epoch
(`ResumableIterator`). `ArrayIterator` gives the same contract for in-memory arrays (latent cache).

Offline safety: nothing here downloads. A data set that is not prepared is prepared at once when
that needs no network (lfm_digits, image folders, and the manual-file data sets above whose files
are in place and pass their checks), otherwise `DatasetNotAvailableError` is raised immediately,
saying which files to put where or which command to run on a machine with network access. A
manual file in the wrong format or resolution, a split or slice that selects nothing, or a bad
mask file is a one-line error naming it, raised before any compile.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lfm_jax import datasets as _datasets  # noqa: F401  (registers our builders)
from lfm_jax import masks as _masks
from lfm_jax.config_validation import with_defaults
from lfm_jax.datasets import celebamask_hq as _celebamask_hq
from lfm_jax.datasets import ffhq as _ffhq
from lfm_jax.datasets import image_folder as _image_folder
from lfm_jax.datasets import lfm_digits as _lfm_digits
from lfm_jax.datasets import lsun_lmdb as _lsun_lmdb
from lfm_jax.datasets import manual as _manual

__all__ = [
    "DatasetNotAvailableError", "DataConfigError", "ManualFileError", "PAPER_PRESETS", "TASKS", "MASK_KINDS",
    "get_builder", "ensure_prepared", "dataset_info", "num_examples", "split_range",
    "segmentation_classes", "preprocess_image", "create_dataset", "iterate_numpy",
    "ResumableIterator", "ArrayIterator", "host_range", "split_ids",
]

# Preprocessing of the paper experiments (for configs; the pipeline itself reads config.data).
PAPER_PRESETS = {
    "celeb_a_hq/256": dict(image_size=256, channels=3, crop="none", random_flip=True,
                           num_classes=0, train_split="train[:90%]",
                           eval_split="train[90%:]"),
    "ffhq": dict(image_size=256, channels=3, crop="none", random_flip=True, num_classes=0,
                 train_split="train[:90%]", eval_split="train[90%:]"),
    "lfm_lsun/church_outdoor": dict(image_size=256, channels=3, crop="center", random_flip=True,
                                    num_classes=0, max_train_examples=120_000,
                                    train_split="train", eval_split="validation"),
    "lfm_lsun/bedroom": dict(image_size=256, channels=3, crop="center", random_flip=True,
                             num_classes=0, max_train_examples=120_000, train_split="train",
                             eval_split="validation"),
    "lsun/church_outdoor": dict(image_size=256, channels=3, crop="center", random_flip=True,
                                num_classes=0, max_train_examples=120_000,
                                train_split="train", eval_split="validation"),
    "lsun/bedroom": dict(image_size=256, channels=3, crop="center", random_flip=True,
                         num_classes=0, max_train_examples=120_000, train_split="train",
                         eval_split="validation"),
    "imagenet2012": dict(image_size=256, channels=3, crop="adm", random_flip=True,
                         num_classes=1000, train_split="train", eval_split="validation"),
    "celebamask_hq": dict(image_size=256, channels=3, crop="none", random_flip=False,
                          num_classes=0, train_split="train", eval_split="test",
                          task="semantic"),
}

_CROPS = ("none", "center", "adm")
TASKS = ("generation", "inpainting", "semantic")
MASK_KINDS = ("lfm", "center", "file", "dir")

DatasetNotAvailableError = _manual.DatasetNotAvailableError
ManualFileError = _manual.ManualFileError


class DataConfigError(ValueError):
  """config.data names a split, task or option the data set cannot serve; the message says which."""


# ---------------------------------------------------------------------------------------------
# Builders and preparation.


def _data(data_config) -> Any:
  """config.data over configs/default.py's data section (a partial dict works too)."""
  return with_defaults("data", data_config)


def _data_dir(data_config) -> str:
  return os.path.expanduser(_data(data_config).data_dir or tfds.core.constants.DATA_DIR)


def _manual_dir(data_config) -> str:
  manual = _data(data_config).manual_dir
  if manual:
    return os.path.expanduser(manual)
  return os.path.join(_data_dir(data_config), "downloads", "manual")


def _smallest_stored(configs, size: int) -> int:
  stored = [c.resolution for c in configs]
  return min([r for r in stored if r >= size] or [max(stored)])


def _resolve_name(data_config) -> tuple[str, Optional[tfds.core.BuilderConfig]]:
  """(tfds name, BuilderConfig object or None) for config.data."""
  dc = _data(data_config)
  name = dc.name
  if not name:
    raise DataConfigError("config.data.name is empty")
  if name == "lfm_digits":
    return "lfm_digits", _lfm_digits.make_config(
        int(dc.image_size), int(dc.channels))
  if name == "ffhq":
    size = int(dc.image_size)
    return f"ffhq/{_smallest_stored(_ffhq.Ffhq.BUILDER_CONFIGS, size)}", None
  if name == "celebamask_hq":
    size = int(dc.image_size)
    r = _smallest_stored(_celebamask_hq.CelebamaskHq.BUILDER_CONFIGS, size)
    return "celebamask_hq", _celebamask_hq.make_config(r)
  if name.startswith("lfm_lsun/") or name == "lfm_lsun":
    category = name.partition("/")[2] or "church_outdoor"
    if category not in _lsun_lmdb.CATEGORIES:
      raise DatasetNotAvailableError(
          f"config.data.name {name!r}: unknown LSUN category; one of {_lsun_lmdb.CATEGORIES}")
    cap = dc.max_train_examples
    return "lfm_lsun", _lsun_lmdb.make_config(category, int(cap) if cap else None)
  if name == "image_folder":
    folder = dc.image_folder
    if not folder:
      raise DataConfigError("config.data.name == 'image_folder' needs config.data.image_folder")
    return "lfm_image_folder", _image_folder.ImageFolderConfig(root_dir=folder)
  return name, None


def get_builder(data_config) -> tfds.core.DatasetBuilder:
  """The tfds builder for config.data (not prepared; see `ensure_prepared`)."""
  name, config = _resolve_name(data_config)
  kwargs = {"data_dir": _data_dir(data_config)}
  if config is not None:
    kwargs["config"] = config
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotAvailableError(
        f"tfds knows no data set {name!r} (config.data.name). {e}") from e


def _tfds_is_mocked() -> bool:
  """True inside `tfds.testing.mock_data` (whose builders read fake data)."""
  fn = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(fn, "__module__", "").startswith("tensorflow_datasets.testing")


def _full_name(builder) -> str:
  return f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name


def ensure_prepared(builder, data_config) -> None:
  """Prepares `builder` if that needs no network; else raises DatasetNotAvailableError at once.

  Manual files are checked first (`lfm_jax.datasets.manual`): a wrong file raises
  ManualFileError naming it before the preparation starts. Never calls into tfds' download
  machinery for data sets that need a download (tfds would retry for minutes offline) and never
  asks GCS for a pre-built copy.
  """
  if _tfds_is_mocked() or builder.is_prepared():
    return
  name = builder.name
  full = _full_name(builder)
  manual_dir = _manual_dir(data_config)
  offline = name in ("lfm_digits", "lfm_image_folder")
  manual = None if offline else _manual.manual_files(builder, manual_dir)
  if manual is not None and not manual.present:
    raise DatasetNotAvailableError(
        f"Data set {full!r} is not prepared in {builder.data_dir} and its manual files are "
        f"missing: {manual.instructions} (config.data.manual_dir; default "
        f"<data_dir>/downloads/manual). The first run then prepares it offline into "
        f"{_data_dir(data_config)}.")
  if not offline and manual is None:
    data_dir = _data_dir(data_config)
    extra = ("pip install tensorflow-io  # tfds' LSUN builder reads LMDB with it\n  "
             if name == "lsun" else "")
    alternative = (f" Or use config.data.name = 'lfm_lsun/{builder.builder_config.name}', which "
                   f"reads the official LMDB files from the manual dir offline."
                   if name == "lsun" else "")
    raise DatasetNotAvailableError(
        f"Data set {full!r} is not prepared in {builder.data_dir} and lfm_jax never downloads "
        f"inside a pipeline.{alternative} On a machine with network access run\n  {extra}"
        f"tfds build {full} --data_dir={data_dir}\n"
        f"(or: python -c \"import tensorflow_datasets as tfds; tfds.builder('{full}', "
        f"data_dir='{data_dir}').download_and_prepare()\") and copy "
        f"{os.path.join(data_dir, name)} here; or set config.data.data_dir to where a prepared "
        f"copy lives.")
  if manual is not None:
    manual.check()
  logging.info("Preparing %s into %s (offline).", full, builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))


def _prepared_builder(data_config):
  builder = get_builder(data_config)
  ensure_prepared(builder, data_config)
  return builder


# ---------------------------------------------------------------------------------------------
# Splits: tfds split expressions resolved to (base split, [start, end)).


class SplitRange(NamedTuple):
  """A split expression resolved by tfds: examples [start, end) of split `base`."""
  base: str
  start: int
  end: int

  @property
  def size(self) -> int:
    return self.end - self.start


def _base_sizes(builder, names) -> dict[str, Any]:
  """{split name: SplitInfo-like (num_examples, shard_lengths)} for the named base splits."""
  splits = builder.info.splits
  if splits:
    missing = [n for n in names if n not in splits]
    if missing:
      raise DataConfigError(f"{_full_name(builder)} has no split {missing[0]!r}; splits: "
                       f"{sorted(splits)}")
    return {n: splits[n] for n in names}
  # Split sizes unknown (tfds.testing.mock_data): count.
  sizes = {}
  for n in names:
    card = int(builder.as_dataset(split=n).cardinality())
    if card < 0:
      card = sum(1 for _ in builder.as_dataset(split=n))
    sizes[n] = types.SimpleNamespace(num_examples=card, shard_lengths=[card])
  return sizes


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


def _split_range(builder, split: str) -> SplitRange:
  full = _full_name(builder)
  if not isinstance(split, str) or not split.strip():
    raise DataConfigError(f"split of {full} must be a split expression such as 'train[:90%]', "
                     f"got {split!r}")
  names = [part.split("[")[0].strip() for part in split.split("+")]
  if len(names) > 1 or names[0] == "all":
    raise DataConfigError(f"split {split!r} of {full} combines several splits; lfm_jax reads one "
                     f"split (ids are indices in it), e.g. 'train[:90%]'")
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
  except (ValueError, NotImplementedError) as e:
    raise DataConfigError(f"split {split!r} of {full} is not a tfds split expression: "
                     f"{_one_line(e)}") from e
  sizes = _base_sizes(builder, names)
  try:
    (absolute,) = instruction.to_absolute(sizes)
  except ValueError as e:
    raise DataConfigError(f"split {split!r} of {full}: {_one_line(e)}") from e
  total = int(sizes[absolute.splitname].num_examples)
  start = int(absolute.from_ or 0)
  end = total if absolute.to is None else int(absolute.to)
  if end <= start:
    raise DataConfigError(f"split {split!r} of {full} selects no examples ({total} in "
                     f"{absolute.splitname!r})")
  return SplitRange(absolute.splitname, start, end)


def split_range(data_config, split: str) -> SplitRange:
  """(base split, start, end) of a split expression of config.data's data set (prepares it)."""
  return _split_range(_prepared_builder(data_config), split)


def _first_by_source_key(builder, rng: SplitRange, count: int) -> np.ndarray:
  """Sorted base-split indices of the `count` examples of `rng` with the smallest `id` text.

  tfds stores LSUN in hashed-key order; the LMDB (and torchvision) order is the order of the
  LMDB keys, which tfds keeps in the `id` feature. Needs one pass over the selection's ids
  (images are not decoded); the result is cached next to the prepared data when writable.
  """
  cache = os.path.join(builder.data_dir,
                       f"lfm_jax_first_{rng.base}_{rng.start}_{rng.end}_{count}.npy")
  try:
    if tf.io.gfile.exists(cache):
      with tf.io.gfile.GFile(cache, "rb") as f:
        return np.load(f)
  except (OSError, tf.errors.OpError):
    pass
  mocked = _tfds_is_mocked()
  ds = builder.as_dataset(
      split=rng.base if mocked else f"{rng.base}[{rng.start}:{rng.end}]", shuffle_files=False,
      decoders=tfds.decode.PartialDecoding({"id": True}),
      read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
  if mocked:
    ds = ds.skip(rng.start).take(rng.size)
  keys = np.concatenate(list(tfds.as_numpy(ds.map(lambda ex: ex["id"]).batch(65536))))
  chosen = np.sort(np.argsort(keys, kind="stable")[:count]).astype(np.int64) + rng.start
  try:
    tmp = f"{cache}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "wb") as f:
      np.save(f, chosen)
    tf.io.gfile.rename(tmp, cache, overwrite=True)
  except (OSError, tf.errors.OpError):
    logging.info("Could not cache %s (read-only data dir?)", cache)
  return chosen


def _selection(builder, data_config, split: str) -> tuple[SplitRange, Optional[np.ndarray]]:
  """(the resolved split, base-split ids the pipeline may read, or None for all of them).

  data.max_train_examples keeps the first N of data.train_split's selection: the first N stored
  examples, except for tfds' LSUN where "first" is the LMDB key order (the order LFM reads).
  """
  dc = _data(data_config)
  rng = _split_range(builder, split)
  cap = dc.max_train_examples
  if not cap or split != dc.train_split or int(cap) >= rng.size:
    return rng, None
  if builder.name == "lsun":
    return rng, _first_by_source_key(builder, rng, int(cap))
  return rng, np.arange(rng.start, rng.start + int(cap), dtype=np.int64)


def split_ids(data_config, split: str) -> np.ndarray:
  """The ascending example ids (indices in the base split) the pipeline reads for `split`
  (slice expressions and data.max_train_examples applied)."""
  rng, allowed = _selection(_prepared_builder(data_config), data_config, split)
  if allowed is not None:
    return np.asarray(allowed, np.int64)
  return np.arange(rng.start, rng.end, dtype=np.int64)


def num_examples(data_config, split: str, builder=None) -> int:
  """Examples in `split` (a split expression; data.train_split capped at max_train_examples)."""
  builder = builder or _prepared_builder(data_config)
  rng, allowed = _selection(builder, data_config, split)
  return rng.size if allowed is None else int(allowed.size)


def _num_classes(builder) -> int:
  features = builder.info.features
  label = features["label"] if "label" in features.keys() else None
  if isinstance(label, tfds.features.ClassLabel):
    return int(label.num_classes)
  return 0


def segmentation_classes(data_config) -> int:
  """Classes of the data set's label maps (19 for celebamask_hq); 0 when it has none."""
  name = _data(data_config).name
  return _celebamask_hq.NUM_CLASSES if name == "celebamask_hq" else 0


def dataset_info(data_config) -> tuple[int, int, tuple[int, int, int]]:
  """(examples in the train split, number of classes (0: unlabelled), (S, S, C) image shape)."""
  dc = _data(data_config)
  builder = _prepared_builder(data_config)
  n = num_examples(data_config, dc.train_split, builder)
  size = int(dc.image_size)
  classes = _num_classes(builder)
  wanted = dc.num_classes
  if wanted is not None and int(wanted) != classes:
    logging.warning("config.data.num_classes = %s but %s has %d classes", wanted,
                    builder.name, classes)
  return n, classes, (size, size, int(dc.channels))


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def _center_crop(image, size: int):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  return tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)


def _resize_shorter(image, size: int, method: str):
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  scale = size / tf.minimum(h, w)
  nh = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
  nw = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
  return tf.image.resize(image, tf.stack([nh, nw]), method=method, antialias=True)


def preprocess_image(image, *, image_size: int, channels: int, crop: str = "none"):
  """uint8 (H, W, c) -> float32 (S, S, channels) in [-1, 1] (see the module docstring)."""
  if crop not in _CROPS:
    raise DataConfigError(f"config.data.crop must be one of {_CROPS}, got {crop!r}")
  size = int(image_size)
  in_channels = image.shape[-1]
  image = tf.cast(image, tf.float32)
  if crop == "none":
    static = image.shape[0] == size and image.shape[1] == size
    if not static:
      image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
  elif crop == "center":
    image = _center_crop(_resize_shorter(image, size, "bilinear"), size)
  else:  # ADM's center_crop_arr: BOX halving, BICUBIC to shorter side S, uint8, centre crop.
    def small_enough(im):
      return tf.minimum(tf.shape(im)[0], tf.shape(im)[1]) < 2 * size

    def halve(im):  # PIL's BOX resize to (h // 2, w // 2), rounded to uint8 like PIL.
      in_size = tf.shape(im)[:2]
      out_size = in_size // 2
      scale = tf.cast(out_size, tf.float32) / tf.cast(in_size, tf.float32)
      out = tf.raw_ops.ScaleAndTranslate(
          images=im[None], size=out_size, scale=scale, translation=tf.zeros([2]),
          kernel_type="box", antialias=True)[0]
      return [tf.clip_by_value(tf.round(out), 0.0, 255.0)]

    image = tf.while_loop(lambda im: tf.logical_not(small_enough(im)), halve, [image],
                          shape_invariants=[tf.TensorShape([None, None, in_channels])])[0]
    image = tf.clip_by_value(tf.round(_resize_shorter(image, size, "bicubic")), 0.0, 255.0)
    image = _center_crop(image, size)
  image = tf.ensure_shape(tf.reshape(image, [size, size, in_channels]),
                          [size, size, in_channels])
  if channels == 1 and in_channels == 3:
    image = tf.image.rgb_to_grayscale(image)
  elif channels == 3 and in_channels == 1:
    image = tf.image.grayscale_to_rgb(image)
  elif channels != in_channels:
    raise ValueError(f"cannot convert {in_channels} image channels to {channels}")
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def preprocess_segmentation(segmentation, *, image_size: int, crop: str = "none"):
  """uint8 (H, W, 1) class ids -> int32 (S, S), nearest (the geometry of `preprocess_image`)."""
  if crop not in _CROPS:
    raise DataConfigError(f"config.data.crop must be one of {_CROPS}, got {crop!r}")
  if crop == "adm":
    raise DataConfigError("config.data.crop = 'adm' is not defined for segmentation maps; use "
                     "'none' or 'center'")
  size = int(image_size)
  if crop == "none":
    seg = tf.image.resize(segmentation, [size, size], method="nearest")
  else:
    seg = _center_crop(_resize_shorter_nearest(segmentation, size), size)
  return tf.cast(tf.ensure_shape(tf.reshape(seg, [size, size]), [size, size]), tf.int32)


def _resize_shorter_nearest(image, size: int):
  h = tf.cast(tf.shape(image)[0], tf.float64)
  w = tf.cast(tf.shape(image)[1], tf.float64)
  scale = size / tf.minimum(h, w)
  nh = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
  nw = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
  return tf.image.resize(image, tf.stack([nh, nw]), method="nearest")


# ---------------------------------------------------------------------------------------------
# Inpainting masks in the pipeline (lfm_jax/masks.py).


def _task(data_config) -> str:
  task = _data(data_config).task
  if task not in TASKS:
    raise DataConfigError(f"config.data.task must be one of {TASKS}, got {task!r}")
  return task


def _mask_fn(data_config, size: int, ids_needed: Optional[np.ndarray]):
  """(id int64, epoch int64) -> float32 (S, S) mask tensor, per data.mask_* (checked here)."""
  dc = _data(data_config)
  kind = dc.mask_kind
  if kind not in MASK_KINDS:
    raise DataConfigError(f"config.data.mask_kind must be one of {MASK_KINDS}, got {kind!r}")
  white = dc.mask_white
  if white not in ("known", "hole"):
    raise DataConfigError(f"config.data.mask_white must be 'known' or 'hole', got {white!r}")
  if kind == "lfm":
    mask_seed = int(dc.mask_seed)
    per_epoch = bool(dc.mask_per_epoch)

    def draw(i, e):
      return _masks.inpainting_mask(mask_seed, int(i), size, int(e) if per_epoch else None)

    def fn(i, e):
      m = tf.numpy_function(draw, [i, e], tf.float32, stateful=False)
      return tf.ensure_shape(m, [size, size])
    return fn
  if kind == "center":
    const = tf.constant(_masks.center_mask(size))
    return lambda i, e: const
  path = dc.mask_path
  if not path:
    raise DataConfigError(f"config.data.mask_kind = {kind!r} needs config.data.mask_path")
  if kind == "file":
    const = tf.constant(_masks.read_mask_file(path, size, white))
    return lambda i, e: const
  # "dir": <mask_path>/<id:06d>.png for every id read; checked now, read by tf.data.
  from etils import epath  # pylint: disable=g-import-not-at-top

  folder = epath.Path(path)
  if not folder.is_dir():
    raise DataConfigError(f"config.data.mask_path {path} is not a folder (data.mask_kind = 'dir')")
  present = {p.name for p in folder.iterdir()}
  if ids_needed is not None and ids_needed.size:
    missing = [int(i) for i in ids_needed if f"{int(i):06d}.png" not in present]
    if missing:
      raise ValueError(f"mask folder {path} has no {missing[0]:06d}.png ({len(missing)} of the "
                       f"{ids_needed.size} ids read have no mask file)")
    _masks.read_mask_file(folder / f"{int(ids_needed[0]):06d}.png", size, white)
  prefix = os.fspath(folder).rstrip("/") + "/"

  def from_file(i, e):
    del e
    name = tf.strings.join([prefix, tf.strings.as_string(i, width=6, fill="0"), ".png"])
    grey = tf.io.decode_png(tf.io.read_file(name), channels=1)
    grey = tf.ensure_shape(tf.reshape(grey, [size, size]), [size, size])
    white_px = grey >= 128
    return tf.cast(white_px if white == "known" else tf.logical_not(white_px), tf.float32)
  return from_file


# ---------------------------------------------------------------------------------------------
# Per-host split and the tf.data pipeline.


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def host_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of host `process_index`'s even share of n items (first hosts get the rest)."""
  base, rest = divmod(n, process_count)
  start = process_index * base + min(process_index, rest)
  return start, start + base + (1 if process_index < rest else 0)


def _mix_seed(*values: int) -> int:
  s = 0
  for v in values:
    s = (s * 1_000_003 + int(v) + 0x9E3779B9) % (1 << 62)
  return s


def create_dataset(data_config, split: str, *, batch_size: int, shuffle: bool, seed: int,
                   repeat: bool, drop_remainder: bool = True,
                   process_index: Optional[int] = None, process_count: Optional[int] = None,
                   ids: Optional[Sequence[int]] = None, augment: Optional[bool] = None,
                   start_batch: int = 0) -> tf.data.Dataset:
  """Batched {"image", "label", "id"[, "segmentation"][, "mask"]} for this host.

  See the module docstring for the keys, shapes and conventions.

  Args:
    data_config: config.data.
    split: a tfds split expression of one split ("train", "train[:90%]", "train[27000:]").
    batch_size: GLOBAL batch size; this host yields batch_size // process_count rows.
    shuffle: shuffle (deterministically from `seed`, a new order every epoch).
    seed: shuffling and flip seed.
    repeat: repeat forever (epochs follow each other; batches may straddle them).
    drop_remainder: drop a final partial batch (only matters when repeat is False).
    process_index, process_count: this host and the host count (default: jax's).
    ids: optional example ids (indices in the BASE split, inside the selection) to read; the
      others are never decoded, and the hosts split the kept ids evenly.
    augment: apply data.random_flip; default: `shuffle` (training pipelines).
    start_batch: skip this many batches of this host's stream (exact resume); costs reading at
      most one epoch of (undecoded) records.
  """
  dc = _data(data_config)
  process_index, process_count = _process(process_index, process_count)
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                     f"{process_count} processes")
  host_batch = batch_size // process_count
  task = _task(data_config)
  builder = _prepared_builder(data_config)
  rng, allowed = _selection(builder, data_config, split)
  if ids is None and allowed is not None:
    ids = allowed

  if ids is None:
    a, b = host_range(rng.size, process_index, process_count)
    lo, hi = rng.start + a, rng.start + b
    keep = None
    host_n = hi - lo
    host_ids = None
  else:
    kept = np.unique(np.asarray(ids, dtype=np.int64))
    if kept.size and (kept[0] < rng.start or kept[-1] >= rng.end):
      raise ValueError(f"ids must lie in [{rng.start}, {rng.end}) (split {split!r} of "
                       f"{_full_name(builder)}: ids are indices in {rng.base!r})")
    if allowed is not None and not np.all(np.isin(kept, allowed)):
      raise ValueError("ids outside the first data.max_train_examples examples of the split")
    a, b = host_range(kept.size, process_index, process_count)
    host_ids = kept[a:b]
    host_n = int(host_ids.size)
    lo, hi = (int(host_ids[0]), int(host_ids[-1]) + 1) if host_n else (0, 0)
    keep = np.zeros(hi - lo, bool)
    keep[host_ids - lo] = True
  if host_n == 0:
    raise ValueError(f"process {process_index} of {process_count} has no examples of split "
                     f"{split!r} ({rng.size} examples, {None if ids is None else len(ids)} ids)")

  features = builder.info.features
  image_feature = features["image"]
  has_label = "label" in features.keys()
  seg_feature = features["segmentation"] if "segmentation" in features.keys() else None
  if task == "semantic" and seg_feature is None:
    raise DataConfigError(f"config.data.task = 'semantic' needs label maps, but "
                     f"{_full_name(builder)} has no 'segmentation' feature")
  size = int(dc.image_size)
  channels = int(dc.channels)
  crop = dc.crop
  if seg_feature is not None and crop == "adm":
    raise DataConfigError("config.data.crop = 'adm' is not defined for segmentation maps; use "
                     "'none' or 'center'")
  mask_fn = None
  if task == "inpainting":
    needed = host_ids if host_ids is not None else np.arange(lo, hi, dtype=np.int64)
    mask_fn = _mask_fn(data_config, size, needed)

  decoders = {"image": tfds.decode.SkipDecoding()}
  if seg_feature is not None:
    decoders["segmentation"] = tfds.decode.SkipDecoding()
  mocked = _tfds_is_mocked()  # tfds' mocks ignore split slices: slice by skip/take instead.
  ds = builder.as_dataset(
      split=rng.base if mocked else f"{rng.base}[{lo}:{hi}]", shuffle_files=False,
      decoders=decoders,
      read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False))
  if mocked:
    ds = ds.skip(lo).take(hi - lo)
  ds = ds.enumerate(start=lo)

  def select(i, ex):
    out = {"image": ex["image"],
           "label": tf.cast(ex["label"], tf.int32) if has_label else tf.constant(0, tf.int32),
           "id": tf.cast(i, tf.int64)}
    if seg_feature is not None:
      out["segmentation"] = ex["segmentation"]
    return out

  ds = ds.map(select)
  if keep is not None:
    keep_t = tf.constant(keep)
    ds = ds.filter(lambda ex: tf.gather(keep_t, ex["id"] - lo))
  base = ds

  position = int(start_batch) * host_batch  # examples of this host's stream already consumed
  first_epoch, offset = divmod(position, host_n)
  if not repeat and first_epoch > 0:
    first_epoch, offset = 0, host_n  # past the end: empty
  last_epoch = np.iinfo(np.int64).max if repeat else 1
  buffer = int(dc.shuffle_buffer)
  seed_host = _mix_seed(seed, process_index)

  def one_epoch(epoch):
    d = base
    if shuffle:
      d = d.shuffle(min(buffer, host_n), seed=seed_host + epoch * 7919,
                    reshuffle_each_iteration=False)
    return d.map(lambda ex: dict(ex, epoch=epoch))

  ds = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(one_epoch).skip(offset)

  flip = bool(dc.random_flip) and (
      shuffle if augment is None else augment)
  flip_seed = tf.constant([seed, 0x5EED], tf.int64)
  flip_classes = (tf.constant(_celebamask_hq.FLIP_PERMUTATION, tf.int32)
                  if builder.name == "celebamask_hq" else None)

  def prepare(ex):
    image = image_feature.decode_example(ex["image"])
    image = preprocess_image(image, image_size=size, channels=channels, crop=crop)
    out = {"label": ex["label"], "id": ex["id"]}
    seg = None
    if seg_feature is not None:
      seg = preprocess_segmentation(seg_feature.decode_example(ex["segmentation"]),
                                    image_size=size, crop=crop)
    if flip:
      key = tf.random.experimental.stateless_fold_in(
          tf.random.experimental.stateless_fold_in(flip_seed, ex["epoch"]), ex["id"])
      mirrored = tf.random.stateless_uniform([], seed=key) < 0.5
      image = tf.cond(mirrored, lambda: image[:, ::-1, :], lambda: image)
      if seg is not None:
        flipped = seg[:, ::-1]
        if flip_classes is not None:
          flipped = tf.gather(flip_classes, flipped)
        seg = tf.cond(mirrored, lambda: flipped, lambda: seg)
    out["image"] = image
    if seg is not None:
      out["segmentation"] = seg
    if mask_fn is not None:
      out["mask"] = mask_fn(ex["id"], ex["epoch"])
    return out

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.prefetch(tf.data.AUTOTUNE)


def iterate_numpy(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of a tf.data pipeline."""
  return iter(tfds.as_numpy(ds))


# ---------------------------------------------------------------------------------------------
# Checkpointable iterators.


def _check_state(kind: str, state: Mapping[str, Any], expected: Mapping[str, int], strict: bool):
  for key, value in expected.items():
    if key in state and int(state[key]) != int(value):
      msg = (f"{kind}.restore: state has {key}={int(state[key])} but this iterator has "
             f"{key}={int(value)}; the resumed stream would differ")
      if strict:
        raise ValueError(msg)
      logging.warning(msg)


class ResumableIterator:
  """Numpy batches of `create_dataset` with an exact, checkpointable position.

  `state()` is a dict of ints; `restore(state)` (or `state=` in the constructor) makes the next
  batch the one an uninterrupted iterator would have produced after `state["batch"]` batches.
  """

  def __init__(self, data_config, split: str, *, batch_size: int, shuffle: bool, seed: int,
               repeat: bool, drop_remainder: bool = True,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               ids: Optional[Sequence[int]] = None, augment: Optional[bool] = None,
               state: Optional[Mapping[str, int]] = None):
    self._process_index, self._process_count = _process(process_index, process_count)
    self._data_config = data_config
    self._split = split
    self._kwargs = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
                        drop_remainder=drop_remainder, ids=ids, augment=augment,
                        process_index=self._process_index,
                        process_count=self._process_count)
    self._batch = 0
    self._it = None
    if state is not None:
      self.restore(state)

  def _fingerprint(self) -> dict[str, int]:
    return {"seed": int(self._kwargs["seed"]), "batch_size": int(self._kwargs["batch_size"]),
            "process_count": self._process_count}

  def state(self) -> dict[str, int]:
    return {"batch": self._batch, **self._fingerprint()}

  def restore(self, state: Mapping[str, int], strict: bool = True) -> "ResumableIterator":
    _check_state("ResumableIterator", state, self._fingerprint(), strict)
    self._batch = int(state["batch"])
    self._it = None  # rebuilt lazily at the new position
    return self

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = iterate_numpy(create_dataset(
          self._data_config, self._split, start_batch=self._batch, **self._kwargs))
    batch = next(self._it)
    self._batch += 1
    return batch


class ArrayIterator:
  """Batches of in-memory arrays (dict, leading example axis) with the ResumableIterator contract.

  Epoch e's order is a permutation drawn from (seed, e); the stream of epochs is cut into global
  batches of `batch_size` (batches may straddle epochs when repeating) and this host gets rows
  [i * B/P, (i + 1) * B/P) of each. `restore` is O(1).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int = 0,
               shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               state: Optional[Mapping[str, int]] = None):
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {v.shape[0] for v in self._arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"arrays need one leading size, got {sizes}")
    self._n = sizes.pop()
    if self._n == 0:
      raise ValueError("ArrayIterator over empty arrays")
    self._process_index, self._process_count = _process(process_index, process_count)
    if batch_size % self._process_count:
      raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                       f"{self._process_count} processes")
    self._batch_size = int(batch_size)
    self._seed = int(seed)
    self._shuffle, self._repeat, self._drop = shuffle, repeat, drop_remainder
    self._orders: dict[int, np.ndarray] = {}
    self._batch = 0
    if state is not None:
      self.restore(state)

  @property
  def num_examples(self) -> int:
    return self._n

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = (
          np.random.default_rng([self._seed, epoch]).permutation(self._n)
          if self._shuffle else np.arange(self._n))
    return self._orders[epoch]

  def _fingerprint(self) -> dict[str, int]:
    return {"seed": self._seed, "batch_size": self._batch_size,
            "process_count": self._process_count}

  def state(self) -> dict[str, int]:
    return {"batch": self._batch, **self._fingerprint()}

  def restore(self, state: Mapping[str, int], strict: bool = True) -> "ArrayIterator":
    _check_state("ArrayIterator", state, self._fingerprint(), strict)
    self._batch = int(state["batch"])
    return self

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    start = self._batch * self._batch_size
    size = self._batch_size
    if not self._repeat:
      size = min(size, self._n - start)
      if size <= 0 or (self._drop and size < self._batch_size):
        raise StopIteration
    a, b = host_range(size, self._process_index, self._process_count)
    pos = np.arange(start + a, start + b)
    epochs, offsets = np.divmod(pos, self._n)
    idx = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      idx[sel] = self._order(int(e))[offsets[sel]]
    self._batch += 1
    return {k: v[idx] for k, v in self._arrays.items()}
