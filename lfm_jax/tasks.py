"""Conditional tasks (`config.data.task`): inpainting and semantic synthesis.

Both give the velocity network extra input channels, `cond`, concatenated to the noisy latent
(models/unet.py, models/dit.py: `model.extra_in_channels`); everything else (flow matching,
solvers, guidance, checkpoints) is the unconditional machinery.

inpainting (LFM's CelebA-HQ 256 task; 4 + 4 + 1 = 9 input channels with SD's KL-f8):
  cond = [scale * z(masked image), mask channel]: the masked image (masks.masked_image: holes
  black, -1) encoded by the frozen autoencoder, a posterior draw times the scale factor as for the
  training latents (LFM draws `latent_dist.sample()` for both), and the mask in LFM's {-1, +1}
  (masks.model_channel: +1 on holes) nearest-downsampled to the latent grid as PyTorch's
  `F.interpolate(mask, size)` does (pixel (f i, f j) of every f x f block, f = S / h).
  After decoding, the known pixels are pasted back (masks.paste_known).
semantic (CelebAMask-HQ, 19 classes; 4 + 4 = 8 input channels):
  cond = the class map (B, S, S) itself; models/semantic.py's wrapper one-hot encodes it on device,
  rescales it to the latent grid and maps it with a 1 x 1 conv (trained jointly) to
  model.extra_in_channels channels. `model.semantic_classes` (19) switches the wrapper on.

Training data:
  - inpainting, data.mask_per_epoch False: one mask per example, a function of (data.mask_seed,
    id), so the latent cache holds it: beside each example's posterior, `masked_mean`,
    `masked_logvar` (h, w, c) of its masked image and `mask_channel` (h, w, 1) in {-1, +1}; with
    data.random_flip the mirrored (image, mask) pair's too (`*_flip`).
  - inpainting, data.mask_per_epoch True: a new mask every epoch, as LFM's loader draws one per
    read; the images are then read and encoded on the fly every step (`OnTheFlyInpainting`).
  - semantic: the cache holds `segmentation`, uint8 (S, S) class ids (mirrored: flipped with
    left/right classes swapped); one-hot encoding happens on device.
  `batch_cond` turns these batch keys into the network's `cond` inside the jitted train step.

Sampling (`--mode=sample`): from files (data.inpaint_image + data.inpaint_mask, or
data.semantic_map: a PNG of class ids) or, without them, from the first sample.num_samples
examples of data.eval_split (their masks from data.mask_kind, or their label maps). The grid
shows masked input / mask / result (inpainting) or map / sample (semantic), one example a row.
Evaluation (`--mode=evaluate`): every example of data.eval_split (up to eval.num_samples) is
inpainted (holes from data.mask_kind) or synthesised from its map, and the metrics compare the
results with the split's real images (LFM's protocol: FID against the ground truth), so the
configs set eval.reference_split = data.eval_split.

Problems a user can fix raise config_validation.ConfigError naming the config key and file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import masks as masks_lib
from lfm_jax import parallel
from lfm_jax.config_validation import ConfigError

TASKS = ("generation", "inpainting", "semantic")
INPAINTING_KEYS = ("masked_mean", "masked_logvar", "mask_channel")
SEMANTIC_KEYS = ("segmentation",)
_COND_SEED = 0xC0D  # folded into the sampling seed for the conditioning latents' posterior draws


def task_of(config) -> str:
  """config.data.task: generation | inpainting | semantic."""
  return str(config.data.task)


def is_conditional(config) -> bool:
  return task_of(config) != "generation"


def _on_the_fly(config) -> bool:
  return task_of(config) == "inpainting" and bool(config.data.mask_per_epoch)


# ----------------------------------------------------------------------------- the maths


def downsample_nearest(mask, factor: int):
  """(..., S, S) -> (..., S / f, S / f): pixel (f i, f j) of each f x f block (F.interpolate's
  'nearest' at an integer factor)."""
  if factor < 1 or mask.shape[-1] % factor or mask.shape[-2] % factor:
    raise ValueError(f"a {mask.shape[-2]}x{mask.shape[-1]} mask cannot be downsampled by {factor}")
  return mask[..., ::factor, ::factor]


def mask_channel(mask, factor: int):
  """The network's mask input: (..., S, S) masks (1 = known) -> (..., S/f, S/f, 1), +1 on holes,
  -1 on known pixels."""
  return masks_lib.model_channel(downsample_nearest(mask, factor))[..., None]


def inpainting_cond(masked_latent, channel):
  """[scale * z(masked image) (B, h, w, c), mask channel (B, h, w, 1)] -> (B, h, w, c + 1)."""
  return jnp.concatenate([jnp.asarray(masked_latent, jnp.float32),
                          jnp.asarray(channel, jnp.float32)], axis=-1)


def batch_cond(batch: Mapping[str, jax.Array], rng: jax.Array, scale_factor: float,
               sample_posterior: bool = True) -> Optional[jax.Array]:
  """The network's `cond` for a training batch (traced inside the train step), or None.

  batch["cond"] as is; inpainting keys -> inpainting_cond of a fresh posterior draw of the masked
  image's latent (its mean with sample_posterior False), times the scale factor; semantic ->
  batch["segmentation"] (B, S, S) class ids (the network's wrapper one-hot encodes them).
  """
  from lfm_jax import latents as latents_lib  # pylint: disable=g-import-not-at-top
  if "cond" in batch:
    return batch["cond"]
  if "masked_mean" in batch:
    if sample_posterior:
      z = latents_lib.sample_latents(rng, batch["masked_mean"], batch["masked_logvar"],
                                     scale_factor)
    else:
      z = scale_factor * batch["masked_mean"].astype(jnp.float32)
    return inpainting_cond(z, batch["mask_channel"])
  if "segmentation" in batch:
    return batch["segmentation"]
  return None


def dummy_cond(config, latent_shape) -> Optional[jax.Array]:
  """A batch-1 zero `cond` of the shape the config's network takes (for init), or None."""
  extra = int(config.model.extra_in_channels)
  if int(config.model.semantic_classes):
    size = int(config.data.image_size)
    return jnp.zeros((1, size, size), jnp.float32)
  if extra:
    return jnp.zeros((1,) + tuple(latent_shape[:-1]) + (extra,), jnp.float32)
  return None


# ----------------------------------------------------------------------------- latent cache


def cache_fingerprint(config) -> Optional[dict]:
  """What the task adds to the latent cache's fingerprint (None: nothing, a plain cache)."""
  task = task_of(config)
  d = config.data
  if task == "inpainting" and not _on_the_fly(config):
    return {"task": task, "mask_kind": d.mask_kind, "mask_seed": int(d.mask_seed),
            "mask_path": d.mask_path, "mask_white": d.mask_white}
  if task == "semantic":
    return {"task": task}
  return None


def _flip_classes(data_config) -> Optional[np.ndarray]:
  if data_config.name == "celebamask_hq":
    from lfm_jax.datasets import celebamask_hq  # pylint: disable=g-import-not-at-top
    return np.asarray(celebamask_hq.FLIP_PERMUTATION, np.uint8)
  return None


def cache_extras(config, encode_fn: Callable, chunk: int) -> dict:
  """Keyword arguments of latents.build_cache for the task: {} for a plain cache, else
  {"extras": fn(group, flip) -> {name: array}, "extra_inputs": batch keys fn reads}.

  encode_fn(images) -> (mean, logvar) is the cache's encoder (chunks of `chunk` rows).
  """
  task = task_of(config)
  store = {"float32": np.float32, "float16": np.float16}[config.latents.dtype]
  if task == "inpainting" and not _on_the_fly(config):
    def inpainting_extras(group, flip):
      x, m = np.asarray(group["image"], np.float32), np.asarray(group["mask"], np.float32)
      if flip:
        x, m = x[:, :, ::-1], m[:, :, ::-1]
      mean, logvar = _encode_padded(encode_fn, masks_lib.masked_image(x, m), chunk)
      factor = x.shape[1] // mean.shape[1]
      return {"masked_mean": mean.astype(store), "masked_logvar": logvar.astype(store),
              "mask_channel": np.asarray(mask_channel(m, factor), np.float32)}
    return {"extras": inpainting_extras, "extra_inputs": ("mask",)}
  if task == "semantic":
    perm = _flip_classes(config.data)

    def semantic_extras(group, flip):
      seg = np.asarray(group["segmentation"])
      if flip:
        seg = seg[:, :, ::-1]
        if perm is not None:
          seg = perm[seg]
      return {"segmentation": seg.astype(np.uint8)}
    return {"extras": semantic_extras, "extra_inputs": ("segmentation",)}
  return {}


def _encode_padded(encode_fn, images, chunk):
  n = images.shape[0]
  pad = (-n) % chunk
  if pad:
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  mean, logvar = encode_fn(images)
  return np.asarray(mean, np.float32)[:n], np.asarray(logvar, np.float32)[:n]


def training_keys(config) -> tuple[str, ...]:
  """Batch keys of the latent cache the train step reads for the task."""
  task = task_of(config)
  if task == "inpainting":
    return INPAINTING_KEYS
  if task == "semantic":
    return SEMANTIC_KEYS
  return ()


# ----------------------------------------------------------------------------- training data


def training_iterator(session, cache, kept_ids=None):
  """The train stage's batches: the latent cache's (with the task's keys), or, for inpainting
  with data.mask_per_epoch, images read and encoded on the fly."""
  from lfm_jax import latents as latents_lib  # pylint: disable=g-import-not-at-top
  cfg = session.config
  if _on_the_fly(cfg):
    return OnTheFlyInpainting(cfg, session.autoencoder(False), kept_ids=kept_ids)
  kw = {"extra_keys": training_keys(cfg)} if is_conditional(cfg) else {}
  return latents_lib.LatentIterator(cache, batch_size=int(cfg.train.batch_size),
                                    seed=int(cfg.seed), kept_ids=kept_ids,
                                    flip=bool(cfg.data.random_flip),
                                    with_labels=bool(cfg.model.num_classes), **kw)


def _local_encoder(autoencoder) -> Callable:
  """encode(images) -> (mean, logvar) host arrays over this host's devices (rows padded)."""
  mesh = parallel.local_mesh()
  sharding = parallel.data_sharded(mesh)
  params = jax.device_put(autoencoder.params, parallel.replicated(mesh))
  module = autoencoder.module
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode),
               out_shardings=(sharding, sharding))
  ndev = mesh.devices.size

  def encode(images):
    n = images.shape[0]
    pad = (-n) % ndev
    x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else (
        images)
    mean, logvar = fn(params, jax.device_put(np.asarray(x, np.float32), sharding))
    return np.asarray(mean)[:n], np.asarray(logvar)[:n]

  return encode


class OnTheFlyInpainting:
  """Inpainting training batches encoded every step (data.mask_per_epoch: a new mask per epoch).

  Reads this host's rows of data.train_split through input_pipeline.ResumableIterator (shuffle,
  flip, masks drawn from (data.mask_seed, id, epoch)) and yields {"mean", "logvar",
  "masked_mean", "masked_logvar", "mask_channel"} like the cached path. state() / restore() are
  the image iterator's (an exact resume).
  """

  num_examples = None

  def __init__(self, config, autoencoder, *, kept_ids=None):
    from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    d = config.data
    self._images = input_pipeline.ResumableIterator(
        d, d.train_split, batch_size=int(config.train.batch_size), shuffle=True,
        seed=int(config.seed), repeat=True, ids=kept_ids)
    self._encode = _local_encoder(autoencoder)
    self._factor = autoencoder.downsample

  def state(self) -> dict:
    return self._images.state()

  def restore(self, state) -> "OnTheFlyInpainting":
    self._images.restore(state)
    return self

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._images)
    x, m = batch["image"], batch["mask"]
    mean, logvar = self._encode(x)
    masked_mean, masked_logvar = self._encode(masks_lib.masked_image(x, m))
    return {"mean": mean, "logvar": logvar, "masked_mean": masked_mean,
            "masked_logvar": masked_logvar,
            "mask_channel": np.asarray(mask_channel(m, self._factor), np.float32)}


# ----------------------------------------------------------------------------- conditions


@dataclasses.dataclass
class Conditions:
  """What samples are conditioned on (host arrays, N rows).

  images: (N, S, S, C) float32 in [-1, 1], the known image (inpainting; None for semantic);
  masks: (N, S, S) float32, 1 = known pixel (inpainting); maps: (N, S, S) uint8 class ids
  (semantic); source: where they came from.
  """
  images: Optional[np.ndarray] = None
  masks: Optional[np.ndarray] = None
  maps: Optional[np.ndarray] = None
  source: str = ""

  def __len__(self) -> int:
    return len(self.masks if self.masks is not None else self.maps)

  def repeat(self, num: int) -> "Conditions":
    """The first `num` rows, cycling through the rows when there are fewer."""
    idx = np.arange(num) % len(self)
    take = lambda a: None if a is None else a[idx]
    return Conditions(take(self.images), take(self.masks), take(self.maps), self.source)


def _read_image_file(path: str, size: int, channels: int, key: str) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lfm_jax import storage  # pylint: disable=g-import-not-at-top
  p = storage.path(path)
  if not p.exists():
    raise ConfigError(f"config.{key}: {path} does not exist")
  try:
    with Image.open(io.BytesIO(p.read_bytes())) as im:
      im = im.convert("RGB" if channels == 3 else "L")
      array = np.asarray(im)
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise ConfigError(f"config.{key}: {path} is not a readable image ({type(e).__name__})") from e
  if array.shape[:2] != (size, size):
    raise ConfigError(f"config.{key}: {path} is {array.shape[1]}x{array.shape[0]}, expected "
                      f"{size}x{size} (config.data.image_size)")
  array = array.reshape(size, size, channels)
  return array.astype(np.float32) / 127.5 - 1.0


def _read_class_map(path: str, size: int, num_classes: int) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lfm_jax import storage  # pylint: disable=g-import-not-at-top
  p = storage.path(path)
  if not p.exists():
    raise ConfigError(f"config.data.semantic_map: {path} does not exist")
  try:
    with Image.open(io.BytesIO(p.read_bytes())) as im:
      if im.mode not in ("L", "P", "I", "I;16"):
        raise ConfigError(f"config.data.semantic_map: {path} is a {im.mode} image; a class map "
                          "is a single-channel PNG whose pixel values are class ids")
      array = np.asarray(im)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise ConfigError(f"config.data.semantic_map: {path} is not a readable image "
                      f"({type(e).__name__})") from e
  if array.shape != (size, size):
    raise ConfigError(f"config.data.semantic_map: {path} is {array.shape[-1]}x{array.shape[0]}, "
                      f"expected {size}x{size} (config.data.image_size)")
  if array.max() >= num_classes:
    raise ConfigError(f"config.data.semantic_map: {path} holds class id {int(array.max())}, but "
                      f"the model has {num_classes} classes (0..{num_classes - 1})")
  return array.astype(np.uint8)


def user_conditions(config) -> Optional[Conditions]:
  """The conditions given as files (data.inpaint_image + data.inpaint_mask, data.semantic_map),
  or None when none is set."""
  d, task = config.data, task_of(config)
  size, channels = int(d.image_size), int(d.channels)
  if task == "inpainting" and (d.inpaint_image or d.inpaint_mask):
    if not (d.inpaint_image and d.inpaint_mask):
      missing = "inpaint_mask" if d.inpaint_image else "inpaint_image"
      raise ConfigError(f"config.data.{missing}: inpainting a given image needs both "
                        "config.data.inpaint_image and config.data.inpaint_mask")
    image = _read_image_file(d.inpaint_image, size, channels, "data.inpaint_image")
    try:
      mask = masks_lib.read_mask_file(d.inpaint_mask, size, d.mask_white)
    except ValueError as e:
      raise ConfigError(f"config.data.inpaint_mask: {e}") from e
    return Conditions(images=image[None], masks=mask[None],
                      source=f"{d.inpaint_image} with mask {d.inpaint_mask}")
  if task == "semantic" and d.semantic_map:
    classes = int(config.model.semantic_classes)
    return Conditions(maps=_read_class_map(d.semantic_map, size, classes)[None],
                      source=str(d.semantic_map))
  return None


def _batch_conditions(config, batch) -> Conditions:
  if task_of(config) == "inpainting":
    return Conditions(images=np.asarray(batch["image"], np.float32),
                      masks=np.asarray(batch["mask"], np.float32))
  return Conditions(maps=np.asarray(batch["segmentation"]).astype(np.uint8))


def split_conditions(config, split: str, num: Optional[int] = None,
                     batch_size: int = 64) -> Iterator[tuple[np.ndarray, Conditions]]:
  """(ids, Conditions) batches of the first `num` examples of `split` (all: None), in id order:
  the split's images with their masks (data.mask_kind), or its label maps."""
  from lfm_jax import data  # pylint: disable=g-import-not-at-top
  data.prepare(config.data)
  ids = data.split_ids(config.data, split)
  if num is not None:
    ids = ids[:int(num)]
  if not len(ids):
    raise ConfigError(f"config.data.eval_split: {split!r} of {config.data.name} has no examples")
  for batch in data.read_ids(config.data, split, ids, batch_size=batch_size, seed=config.seed):
    yield np.asarray(batch["id"]), _batch_conditions(config, batch)


def cond_array(config, autoencoder, conditions: Conditions, *, scale_factor: float, seed: int,
               indices: np.ndarray) -> np.ndarray:
  """The network's cond for `conditions` (host array, N rows).

  inpainting: (N, h, w, c + 1): scale * a posterior draw of the masked images' latents (noise
  of row r from (seed, indices[r]); the mean with autoencoder.sample_posterior False) and the
  mask channel. semantic: the (N, S, S) class maps.
  """
  if conditions.maps is not None:
    return conditions.maps
  masked = masks_lib.masked_image(conditions.images, conditions.masks)
  means, logvars = [], []
  for i in range(0, len(masked), 64):
    m, lv = autoencoder.encode(masked[i:i + 64])
    means.append(np.asarray(m, np.float32))
    logvars.append(np.asarray(lv, np.float32))
  mean, logvar = np.concatenate(means), np.concatenate(logvars)
  if bool(config.autoencoder.sample_posterior):
    eps = np.stack([np.random.default_rng([int(seed), _COND_SEED, int(i)]).standard_normal(
        mean.shape[1:]) for i in indices]).astype(np.float32)
    mean = mean + np.exp(0.5 * logvar) * eps
  factor = conditions.masks.shape[-1] // mean.shape[1]
  return np.asarray(inpainting_cond(scale_factor * mean, mask_channel(conditions.masks, factor)))


def finish(config, images: np.ndarray, conditions: Conditions) -> np.ndarray:
  """Decoded samples -> results: known pixels pasted back (inpainting); as is (semantic)."""
  if task_of(config) == "inpainting":
    return np.asarray(masks_lib.paste_known(images, conditions.images, conditions.masks),
                      np.float32)
  return images


# ----------------------------------------------------------------------------- pictures


def palette(num_classes: int) -> np.ndarray:
  """(K, 3) float32 colours in [-1, 1] of class ids: black background, evenly spaced hues."""
  import colorsys  # pylint: disable=g-import-not-at-top
  colours = [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95)
                                 for k in range(1, num_classes)]
  return np.asarray(colours, np.float32)[:num_classes] * 2.0 - 1.0


def _as_channels(gray, channels: int) -> np.ndarray:
  return np.repeat(np.asarray(gray, np.float32)[..., None], channels, axis=-1)


def picture_rows(config, conditions: Conditions, results: np.ndarray) -> tuple[np.ndarray, int]:
  """(images, columns) of a grid with one example a row: masked input, mask (white = known),
  result; or class map (colours), result."""
  c = results.shape[-1]
  if task_of(config) == "inpainting":
    shown = [masks_lib.masked_image(conditions.images, conditions.masks),
             _as_channels(conditions.masks * 2.0 - 1.0, c), results]
  else:
    colours = palette(int(config.model.semantic_classes))[conditions.maps.astype(np.int64)]
    if c == 1:
      colours = colours.mean(axis=-1, keepdims=True)
    shown = [colours, results]
  return np.stack(shown, axis=1).reshape((-1,) + results.shape[1:]), len(shown)


# ----------------------------------------------------------------------------- the stages


def _tag(config, light) -> str:
  tag = f"{task_of(config)}_{config.sample.solver}_g{config.sample.guidance_scale:g}"
  return tag + (f"_c2f{config.coarse_to_fine.light_fraction:g}" if light is not None else "")


def run_sample(session) -> dict:
  """`--mode=sample` for a conditional task (see the module docstring)."""
  from lfm_jax.writers import say  # pylint: disable=g-import-not-at-top
  s, cfg = session, session.config
  num = int(cfg.sample.num_samples)
  conditions = user_conditions(cfg)  # bad files fail here, before anything loads or compiles
  model, light = s.flow_model(), s.light_model()
  name = f"samples_{_tag(cfg, light)}"
  if conditions is not None:
    stem = os.path.splitext(os.path.basename(
        str(cfg.data.inpaint_image if task_of(cfg) == "inpainting" else cfg.data.semantic_map)))[0]
    name = f"samples_{stem}_{_tag(cfg, light)}"
  else:
    split = cfg.data.eval_split
    parts = list(split_conditions(cfg, split, num, batch_size=max(num, 1)))
    conditions = Conditions(
        *(None if getattr(parts[0][1], f) is None
          else np.concatenate([getattr(p, f) for _, p in parts])
          for f in ("images", "masks", "maps")), source=f"{cfg.data.name} {split}")
    say(f"sample: conditions from the first {len(conditions)} examples of {split}")
  conditions = conditions.repeat(num)
  indices = np.arange(num)
  ae = s.autoencoder(False)
  cond = cond_array(cfg, ae, conditions, scale_factor=model.scale_factor, seed=int(cfg.seed),
                    indices=indices)
  out = s.generate(model, num, seed=int(cfg.seed), batch_size=int(cfg.sample.batch_size),
                   cond=cond, light=light, progress=lambda m: say(f"sample: {m}"))
  results = finish(cfg, out.images, conditions)
  grid = s.wd.samples / f"{name}.png"
  shown, columns = picture_rows(cfg, conditions, results)
  s.wd.save_image_grid(grid, shown, columns)
  arrays = {"images": results, "latents": out.latents}
  if conditions.masks is not None:
    arrays.update(inputs=conditions.images, masks=conditions.masks)
  else:
    arrays.update(maps=conditions.maps)
  s.wd.write_npz(grid.with_suffix(".npz"), **arrays)
  record = {"stage": "sample", "task": task_of(cfg), "conditions": conditions.source,
            "solver": cfg.sample.solver, "guidance_scale": cfg.sample.guidance_scale,
            "num_samples": num, **out.metrics()}
  s.wd.append_metrics(record)
  say(f"sample: wrote {grid} ({num} samples of {task_of(cfg)} from {conditions.source}, "
      f"NFE {out.nfe:.0f})")
  return {"grid": str(grid), **record}


def grid_sampler(session, module, latent_shape, scale: float) -> Callable:
  """The trainer's preview callback for a conditional task: the first examples of
  data.eval_split, fixed seeds; rows of inputs, (masks,) results."""
  from lfm_jax import artifacts  # pylint: disable=g-import-not-at-top
  s, cfg = session, session.config
  k = 4 if task_of(cfg) == "inpainting" else 3
  state = {}

  def sample_fn(params, step):
    if "conditions" not in state:
      _, conditions = next(split_conditions(cfg, cfg.data.eval_split, k, batch_size=k))
      state["conditions"] = conditions.repeat(k)
    conditions = state["conditions"]
    model = artifacts.FlowModel(module, params, latent_shape, scale, cfg.model, f"step {step}")
    ae = s.autoencoder(False)
    cond = cond_array(cfg, ae, conditions, scale_factor=scale, seed=int(cfg.seed) + 7,
                      indices=np.arange(k))
    out = s.generate(model, k, seed=int(cfg.seed) + 7, batch_size=k, cond=cond, autoencoder=ae)
    shown, columns = picture_rows(cfg, conditions, finish(cfg, out.images, conditions))
    # Column-major for the trainer's square grid: a row of inputs, (of masks,) of results.
    return shown.reshape((k, columns) + shown.shape[1:]).swapaxes(0, 1).reshape(shown.shape)

  return sample_fn


def generate_for_evaluation(session, model, num: int, *, seed: int, batch_size: int,
                            light=None, on_batch: Optional[Callable] = None,
                            progress: Optional[Callable[[str], None]] = None) -> tuple[int, Any]:
  """(count, Generated) of `--mode=evaluate` for a conditional task: the first `num` examples of
  data.eval_split (all of them when it has fewer), inpainted / synthesised in batches;
  on_batch(images, start, n) sees the results (known pixels pasted back)."""
  from lfm_jax import data  # pylint: disable=g-import-not-at-top
  from lfm_jax import generate as generate_lib  # pylint: disable=g-import-not-at-top
  from lfm_jax.writers import say  # pylint: disable=g-import-not-at-top
  s, cfg = session, session.config
  split = cfg.data.eval_split
  data.prepare(cfg.data)
  available = len(data.split_ids(cfg.data, split))
  if num > available:
    say(f"evaluate: {task_of(cfg)} of the {available} examples of {split} (eval.num_samples "
        f"{num} is more than the split holds)")
    num = available
  ndev = parallel.num_batch_shards(s.mesh)
  bs = -(-max(int(batch_size), 1) // ndev) * ndev
  sharding = parallel.data_sharded(s.mesh)
  paste = jax.jit(masks_lib.paste_known, out_shardings=sharding)
  ae = s.autoencoder(False)
  parts, start = [], 0
  for ids, conditions in split_conditions(cfg, split, num, batch_size=bs):
    n = len(ids)
    indices = np.arange(start, start + n)
    cond = cond_array(cfg, ae, conditions, scale_factor=model.scale_factor, seed=seed,
                      indices=indices)

    def pasted(x, first, count, conditions=conditions, n=n, start=start):
      del first
      if conditions.images is not None:
        pad = lambda a: np.concatenate([a, np.zeros((x.shape[0] - n,) + a.shape[1:], a.dtype)])
        x = paste(x, parallel.global_from_full(pad(conditions.images), sharding),
                  parallel.global_from_full(pad(conditions.masks), sharding))
      if on_batch is not None:
        on_batch(x, start, count)

    out = s.generate(model, n, seed=seed, batch_size=bs, cond=cond, start_index=start,
                     light=light, keep_images=False, keep_latents=False, on_batch=pasted)
    parts.append((n, out))
    start += n
    if progress is not None:
      progress(f"{start}/{num} samples")
  weights = np.asarray([n for n, _ in parts], np.float64)
  avg = lambda f: float(np.average([f(o) for _, o in parts], weights=weights))
  merged = generate_lib.Generated(
      images=None, latents=None, labels=None, nfe=avg(lambda o: o.nfe),
      sec_per_image=avg(lambda o: o.sec_per_image),
      sec_per_image_without_decoder=avg(lambda o: o.sec_per_image_without_decoder),
      nfe_light=None if light is None else avg(lambda o: o.nfe_light),
      nfe_heavy=None if light is None else avg(lambda o: o.nfe_heavy))
  return num, merged
