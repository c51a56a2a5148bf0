"""Feature extractors for evaluation metrics, behind one interface.

    extractor = get_feature_extractor(name, **kw)
    extractor.name, extractor.dim
    features = extractor(images)        # images: float NHWC in [-1, 1] -> (B, D) float32

Built in:
- "inception": the FID InceptionV3 pool3 (2048-d). Needs pytorch-fid's weights file
  (`weights_path=`, config key `eval.inception_weights`); without it `get_feature_extractor`
  raises `FeatureExtractorUnavailable` and the caller skips FID and runs the other metrics.
  Images are mapped to [0, 255], quantised like a saved PNG, grey repeated to RGB, resized to 299
  with TF1 bilinear resizing (models/inception.py documents the protocol).
- "digits_classifier": a small CNN trained in seconds on the embedded digits data
  (`train_digits_classifier(images, labels)`), saved/loaded as an .npz in a cache dir. Features
  are its penultimate layer (128-d); `.predict(images)` gives class ids for class agreement of
  conditional samples. Metrics in these features are named after it (`metric_name("fd", name)`
  -> "fd_digits_classifier", `metric_name("kid", name)` -> "kd_digits_classifier"), never "FID".

Others (e.g. an autoencoder-latent extractor) are added with
`register_feature_extractor(name, factory)` where `factory(**kw) -> FeatureExtractor`, or by
wrapping any function with `CallableFeatureExtractor(name, dim, fn)`.
"""

import time
from typing import Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import storage

INCEPTION_WEIGHTS_HINT = (
    "FID needs pytorch-fid's InceptionV3 weights, pt_inception-2015-12-05-6726825d.pth "
    "(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth, ~91 MB; torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth also works). Download it once and set "
    "--config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth. "
    "lfm_jax never downloads it itself.")


class FeatureExtractorUnavailable(RuntimeError):
  """The extractor cannot be built here (missing weights / training data); the message says why."""


class FeatureExtractor:
  """Interface: `.name`, `.dim`, `__call__(images NHWC in [-1, 1]) -> (B, dim) float32`."""

  name: str = ""
  dim: int = 0

  def __call__(self, images) -> jnp.ndarray:
    raise NotImplementedError

  def extract(self, images, batch_size: int = 256) -> np.ndarray:
    """Runs `__call__` over `images` in batches -> numpy (N, dim) float32."""
    images = np.asarray(images)
    out = [np.asarray(self(images[s:s + batch_size])) for s in range(0, len(images), batch_size)]
    if not out:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate(out).astype(np.float32)


class CallableFeatureExtractor(FeatureExtractor):
  """Wraps any `fn(images) -> (B, dim)` as a FeatureExtractor."""

  def __init__(self, name: str, dim: int, fn: Callable):
    self.name, self.dim, self._fn = name, int(dim), fn

  def __call__(self, images):
    return self._fn(images)


def metric_name(kind: str, extractor_name: str) -> str:
  """Metric label that names the features it was computed in.

  Fréchet / kernel distances ("fd" or "fid", "kd" or "kid") are "fid" / "kid" only in the FID
  Inception features, else "fd_<name>" / "kd_<name>" (e.g. "fd_digits_classifier"). Any other
  kind is "<kind>_<name>" (e.g. "precision_inception").
  """
  base = {"fd": "fd", "fid": "fd", "kd": "kd", "kid": "kd"}.get(kind)
  if base is None:
    return f"{kind}_{extractor_name}"
  if extractor_name == "inception":
    return {"fd": "fid", "kd": "kid"}[base]
  return f"{base}_{extractor_name}"


# ----------------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Callable[..., FeatureExtractor]] = {}


def register_feature_extractor(name: str, factory: Callable[..., FeatureExtractor],
                               overwrite: bool = False) -> None:
  """Registers `factory(**kw) -> FeatureExtractor` under `name`."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"feature extractor {name!r} is already registered")
  _REGISTRY[name] = factory


def available_feature_extractors() -> Sequence[str]:
  return tuple(sorted(_REGISTRY))


def get_feature_extractor(name: str, **kw) -> FeatureExtractor:
  """Builds the named extractor. Raises FeatureExtractorUnavailable when it cannot run here."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown feature extractor {name!r}; known: {available_feature_extractors()}")
  return _REGISTRY[name](**kw)


# ----------------------------------------------------------------------------- inception


class InceptionFeatureExtractor(FeatureExtractor):
  """FID InceptionV3 pool3 features of [-1, 1] images (grey or RGB, any size)."""

  name = "inception"
  dim = 2048

  def __init__(self, weights_path: Optional[str], quantize: bool = True, dtype=jnp.float32):
    if not weights_path or not storage.path(weights_path).is_file():
      where = f" (not found: {weights_path})" if weights_path else ""
      raise FeatureExtractorUnavailable(f"Inception features unavailable{where}. "
                                        + INCEPTION_WEIGHTS_HINT)
    from lfm_jax.converters import inception as converter
    from lfm_jax.converters.common import WeightConversionError
    from lfm_jax.models.inception import images_to_uint8_range

    try:  # pool3 and the 1008-way logits (Inception Score) in one pass
      module, variables = converter.load_inception_with_logits(weights_path)
      self.has_logits = True
    except WeightConversionError:  # a file without the fc layer: pool3 only
      module, variables = converter.load_inception(weights_path)
      self.has_logits = False
    self.module = module = module.clone(dtype=dtype)
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.quantize = quantize
    self.identity = storage.file_identity(weights_path)

    @jax.jit
    def fn(variables, images):  # weights are an argument, not ~90 MB of baked-in constants
      out = module.apply(variables, images_to_uint8_range(images, quantize=quantize))
      if isinstance(out, dict):
        return out["pool3"], out["logits_unbiased"]
      return out, None

    self._fn = fn

  def _check(self, images):
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"expected (B, H, W, 1 or 3) images in [-1, 1], got {images.shape}")
    return images

  def __call__(self, images):
    return self._fn(self.variables, self._check(images))[0]

  def features_and_logits(self, images):
    """(pool3 (B, 2048), logits_unbiased (B, 1008)): what FID and the Inception Score read."""
    return self._fn(self.variables, self._check(images))


def _inception_factory(weights_path: Optional[str] = None, inception_weights: Optional[str] = None,
                       quantize: bool = True, dtype=jnp.float32, **unused) -> FeatureExtractor:
  return InceptionFeatureExtractor(weights_path or inception_weights, quantize=quantize,
                                   dtype=dtype)


register_feature_extractor("inception", _inception_factory)

# ----------------------------------------------------------------------------- digits classifier


class DigitsCNN(nn.Module):
  """Small CNN: [conv3x3-relu-avgpool2] x len(channels) -> dense(features) -> dense(classes)."""

  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    feats = nn.relu(nn.Dense(self.feature_dim, name="features")(x))
    logits = nn.Dense(self.num_classes, name="logits")(feats)
    return feats, logits


class DigitsClassifier(FeatureExtractor):
  """Penultimate-layer features and class predictions of a trained `DigitsCNN`."""

  name = "digits_classifier"
  has_logits = True

  def __init__(self, params, image_shape: Sequence[int], num_classes: int = 10,
               channels: Sequence[int] = (32, 64), feature_dim: int = 128):
    self.image_shape = tuple(int(s) for s in image_shape)  # (H, W, C)
    self.num_classes = int(num_classes)
    self.channels = tuple(int(c) for c in channels)
    self.dim = int(feature_dim)
    self.module = DigitsCNN(self.num_classes, self.channels, self.dim)
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self._apply = jax.jit(lambda p, x: self.module.apply({"params": p}, x))

  def _prepare(self, images):
    x = jnp.asarray(images, jnp.float32)
    h, w, c = self.image_shape
    if x.ndim != 4 or x.shape[-1] != c:
      raise ValueError(f"expected (B, H, W, {c}) images in [-1, 1], got {x.shape}")
    if x.shape[1:3] != (h, w):
      x = jax.image.resize(x, (x.shape[0], h, w, c), "linear")
    return x

  def features_and_logits(self, images):
    return self._apply(self.params, self._prepare(images))

  def __call__(self, images):
    return self.features_and_logits(images)[0]

  def logits(self, images):
    return self.features_and_logits(images)[1]

  def predict(self, images, batch_size: int = 512) -> np.ndarray:
    images = np.asarray(images)
    out = [np.asarray(jnp.argmax(self.logits(images[s:s + batch_size]), -1))
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int32)

  def accuracy(self, images, labels) -> float:
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def class_agreement(self, images, labels) -> float:
    """Fraction of (conditional) samples the classifier assigns to their intended label."""
    return self.accuracy(images, labels)

  # -- persistence: one .npz, parameters flattened with "/" plus the architecture
  def save(self, path: str) -> None:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
    arrays = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
    storage.write_npz(path, image_shape=np.array(self.image_shape),
                      num_classes=np.array(self.num_classes), channels=np.array(self.channels),
                      feature_dim=np.array(self.dim), **arrays)

  @classmethod
  def load(cls, path: str) -> "DigitsClassifier":
    from flax import traverse_util

    f = storage.load_npz(path)
    flat = {k[len("params/"):]: np.asarray(v) for k, v in f.items() if k.startswith("params/")}
    return cls(traverse_util.unflatten_dict(flat, sep="/"), image_shape=f["image_shape"],
               num_classes=int(f["num_classes"]), channels=f["channels"],
               feature_dim=int(f["feature_dim"]))


def _shift_augment(rng, x, max_shift: int):
  """Random per-image integer translation by up to `max_shift` pixels (edge padding)."""
  b, h, w, _ = x.shape
  p = max_shift
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
  offs = jax.random.randint(rng, (b, 2), 0, 2 * p + 1)

  def crop(img, o):
    return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))

  return jax.vmap(crop)(xp, offs)


def train_digits_classifier(images, labels, *, num_classes: int = 10, num_steps: int = 400,
                            batch_size: int = 128, learning_rate: float = 2e-3,
                            weight_decay: float = 1e-4, channels: Sequence[int] = (32, 64),
                            feature_dim: int = 128, max_shift: int = 1, seed: int = 0,
                            log: Optional[Callable[[str], None]] = None) -> DigitsClassifier:
  """Trains the evaluation classifier on numpy arrays.

  Args:
    images: (N, H, W, C) float in [-1, 1] (H, W divisible by 2**len(channels)).
    labels: (N,) ints in [0, num_classes).
    num_steps, batch_size, learning_rate, weight_decay: AdamW with cosine decay.
    max_shift: random-translation augmentation in pixels (0 disables).
  Returns:
    a DigitsClassifier (a FeatureExtractor named "digits_classifier").
  """
  import optax

  x = np.asarray(images, np.float32)
  y = np.asarray(labels, np.int32)
  if x.ndim != 4 or len(x) != len(y):
    raise ValueError(f"expected (N, H, W, C) images and (N,) labels, got {x.shape}, {y.shape}")
  module = DigitsCNN(num_classes, tuple(channels), feature_dim)
  key = jax.random.PRNGKey(seed)
  key, init_key = jax.random.split(key)
  # (the data set is small: it lives on the device and batches are gathered inside the step)
  params = jax.jit(module.init)(init_key, jnp.zeros((1,) + x.shape[1:], jnp.float32))["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05),
                   weight_decay=weight_decay)
  opt_state = tx.init(params)
  xd, yd = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def step(params, opt_state, idx, rng):
    xb, yb = xd[idx], yd[idx]
    if max_shift > 0:
      xb = _shift_augment(rng, xb, max_shift)

    def loss_fn(p):
      _, logits = module.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  bs = min(batch_size, len(x))
  perm, pos = rng.permutation(len(x)), 0
  t0 = time.time()
  for i in range(num_steps):
    if pos + bs > len(perm):
      perm, pos = rng.permutation(len(x)), 0
    idx = perm[pos:pos + bs]
    pos += bs
    params, opt_state, loss = step(params, opt_state, idx, jax.random.fold_in(key, i))
    if log is not None and (i + 1) % 100 == 0:
      log(f"digits classifier step {i + 1}/{num_steps}: loss {float(loss):.4f} "
          f"({time.time() - t0:.1f}s)")
  return DigitsClassifier(params, x.shape[1:], num_classes, channels, feature_dim)


def digits_classifier_cache_path(cache_dir: str, image_shape: Sequence[int]) -> str:
  h, w, c = (int(s) for s in image_shape)
  return storage.path(cache_dir) / f"digits_classifier_{h}x{w}x{c}.npz"


def _digits_factory(path: Optional[str] = None, cache_dir: Optional[str] = None,
                    train_images=None, train_labels=None, image_shape=None,
                    num_classes: int = 10, log=None, **train_kw) -> FeatureExtractor:
  """Loads `path` or `<cache_dir>/digits_classifier_HxWxC.npz`; else trains on the given data and
  saves it there; else raises FeatureExtractorUnavailable."""
  if path is None and cache_dir is not None:
    shape = image_shape if image_shape is not None else (
        None if train_images is None else np.shape(train_images)[1:])
    if shape is not None:
      path = digits_classifier_cache_path(cache_dir, shape)
  if path is not None and storage.exists(path):
    return DigitsClassifier.load(path)
  if train_images is None or train_labels is None:
    raise FeatureExtractorUnavailable(
        "digits_classifier: no trained classifier found"
        + (f" at {path}" if path else "") + " and no training data given "
        "(pass train_images=, train_labels= to train one in ~10 s).")
  clf = train_digits_classifier(train_images, train_labels, num_classes=num_classes, log=log,
                                **train_kw)
  if path is not None and jax.process_index() == 0:
    clf.save(path)
  return clf


register_feature_extractor("digits_classifier", _digits_factory)

__all__ = ("FeatureExtractor", "FeatureExtractorUnavailable", "CallableFeatureExtractor",
           "InceptionFeatureExtractor", "DigitsClassifier", "DigitsCNN", "get_feature_extractor",
           "register_feature_extractor", "available_feature_extractors", "metric_name",
           "train_digits_classifier", "digits_classifier_cache_path", "INCEPTION_WEIGHTS_HINT")
