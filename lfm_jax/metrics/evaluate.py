"""Evaluation declared in the config: metrics chosen by name from a registry.

    config.eval.metrics = ("fd", "precision_recall", "kid", "class_agreement")

Every metric is a function of `Observations` (features of generated and reference images in one
extractor, their exact statistics, the generated labels and the extractor's class logits) that
returns named values, registered with `@register_metric(name)`; adding a metric is a new
function, not an edit to the evaluation loop. A metric that cannot run with what was observed
(class agreement without a classifier, IS without Inception logits) raises MetricUnavailable and
is skipped with a note.

Features are streamed: `FeatureCollector.add` takes one (possibly sharded, multi-host) batch of
images at a time, gathers its features to every host and updates float64 sums
(metrics/fid.FeatureStats), so images are never all held at once; the features themselves
(N x D float32) are kept for precision/recall and KID. Reference features of a data split are
computed the same way (every host reads its share) and cached in a file whose name hashes
everything they depend on (data set, split, count, resolution, preprocessing, extractor).
"""

import dataclasses
import hashlib
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from lfm_jax import parallel
from lfm_jax import storage
from lfm_jax.metrics import features as features_lib
from lfm_jax.metrics import fid
from lfm_jax.metrics import precision_recall


class MetricUnavailable(RuntimeError):
  """A metric cannot be computed from what was observed; the message says what is missing."""


# ----------------------------------------------------------------------------- observations


class FeatureCollector:
  """Features (and the extractor's logits, when it has them and they are wanted) of a stream of
  image batches, in stream order, with their exact statistics."""

  def __init__(self, extractor, want_logits: bool = False):
    self.extractor = extractor
    self.want_logits = want_logits and getattr(extractor, "has_logits", False)
    self.stats = fid.FeatureStats(extractor.dim)
    self._features: list[np.ndarray] = []
    self._logits: list[np.ndarray] = []
    self._ids: list[np.ndarray] = []

  def add(self, images, n: Optional[int] = None, valid=None, ids=None) -> None:
    """Adds the first n rows of `images` (or the rows where `valid`); ids are kept to sort by."""
    if self.want_logits:
      feats, logits = self.extractor.features_and_logits(images)
    else:
      feats, logits = self.extractor(images), None
    keep = slice(None, n) if valid is None else np.asarray(parallel.to_host(valid), bool)
    feats = np.asarray(parallel.to_host(feats), np.float32)[keep]
    self.stats.add(feats)
    self._features.append(feats)
    if logits is not None:
      self._logits.append(np.asarray(parallel.to_host(logits), np.float32)[keep])
    if ids is not None:
      self._ids.append(np.asarray(parallel.to_host(ids))[keep])

  @property
  def features(self) -> np.ndarray:
    return np.concatenate(self._features) if self._features else np.zeros((0, self.extractor.dim),
                                                                           np.float32)

  @property
  def logits(self) -> Optional[np.ndarray]:
    return np.concatenate(self._logits) if self._logits else None

  @property
  def ids(self) -> Optional[np.ndarray]:
    return np.concatenate(self._ids) if self._ids else None


@dataclasses.dataclass
class Reference:
  """Reference features of real images, their statistics, and (optionally) given statistics
  (a pytorch-fid .npz) that the Fréchet distance uses instead."""
  features: np.ndarray
  stats: fid.FeatureStats
  given_mean_cov: Optional[tuple[np.ndarray, np.ndarray]] = None

  def mean_cov(self):
    return self.given_mean_cov if self.given_mean_cov is not None else self.stats.mean_cov()


@dataclasses.dataclass
class Observations:
  """What metrics are computed from (host numpy arrays)."""
  extractor: str
  generated: np.ndarray
  generated_stats: fid.FeatureStats
  reference: Optional[Reference]
  labels: Optional[np.ndarray] = None
  logits: Optional[np.ndarray] = None
  settings: Any = None


# ----------------------------------------------------------------------------- registry

_METRICS: dict[str, Callable[[Observations], dict[str, float]]] = {}


def register_metric(name: str):
  """Decorator: registers fn(observations) -> {name: value} under `name`."""
  def wrap(fn):
    if name in _METRICS:
      raise ValueError(f"metric {name!r} is already registered")
    _METRICS[name] = fn
    return fn
  return wrap


def available_metrics() -> tuple[str, ...]:
  return tuple(sorted(_METRICS))


def needs_logits(names: Sequence[str]) -> bool:
  return any(n in ("class_agreement", "inception_score") for n in names)


def needs_reference(names: Sequence[str]) -> bool:
  return any(n in ("fd", "precision_recall", "kid") for n in names)


def _reference(obs: Observations) -> Reference:
  if obs.reference is None:
    raise MetricUnavailable("no reference features")
  return obs.reference


@register_metric("fd")
def _frechet(obs: Observations) -> dict[str, float]:
  mu, sigma = _reference(obs).mean_cov()
  g_mu, g_sigma = obs.generated_stats.mean_cov()
  return {features_lib.metric_name("fd", obs.extractor): fid.frechet_distance(g_mu, g_sigma, mu,
                                                                               sigma)}


@register_metric("precision_recall")
def _precision_recall(obs: Observations) -> dict[str, float]:
  ref = _reference(obs).features
  n = min(len(ref), len(obs.generated))
  pr = precision_recall.precision_recall(ref[:n], obs.generated, k=int(obs.settings.precision_recall_k))
  return {features_lib.metric_name("precision", obs.extractor): float(pr["precision"]),
          features_lib.metric_name("recall", obs.extractor): float(pr["recall"])}


@register_metric("kid")
def _kid(obs: Observations) -> dict[str, float]:
  ref = _reference(obs).features
  n = min(len(ref), len(obs.generated))
  sub = min(int(obs.settings.kid_subset_size), n)
  out = precision_recall.kid(ref[:n], obs.generated, num_subsets=int(obs.settings.kid_subsets),
                             subset_size=sub)
  return {features_lib.metric_name("kid", obs.extractor): float(out["mean"])}


@register_metric("class_agreement")
def _class_agreement(obs: Observations) -> dict[str, float]:
  if obs.labels is None:
    raise MetricUnavailable("the model is unconditional")
  if obs.logits is None or obs.extractor == "inception":
    raise MetricUnavailable(f"the {obs.extractor} features have no classifier for these classes")
  predicted = np.argmax(obs.logits, axis=-1)
  return {f"class_agreement_{obs.extractor}": float(np.mean(predicted == obs.labels))}


@register_metric("inception_score")
def _inception_score(obs: Observations) -> dict[str, float]:
  if obs.extractor != "inception" or obs.logits is None:
    raise MetricUnavailable("the Inception Score needs the inception feature extractor's logits")
  from lfm_jax.metrics import inception_score  # pylint: disable=g-import-not-at-top
  mean, std = inception_score.inception_score(obs.logits,
                                              splits=int(obs.settings.inception_score_splits))
  return {"inception_score": float(mean), "inception_score_std": float(std)}


def compute_metrics(names: Sequence[str], obs: Observations,
                    note: Callable[[str], None] = print) -> dict[str, float]:
  """The named metrics; unavailable ones are skipped with a note."""
  out: dict[str, float] = {}
  for name in names:
    if name not in _METRICS:
      raise ValueError(f"config.eval.metrics: unknown metric {name!r}; known: "
                       f"{', '.join(available_metrics())}")
    try:
      out.update(_METRICS[name](obs))
    except MetricUnavailable as e:
      note(f"evaluate: metric {name} skipped ({e})")
  return out


# ----------------------------------------------------------------------------- reference


def reference_key(data_config, split: str, num: int, extractor) -> dict[str, Any]:
  """Everything reference features depend on."""
  return {"data": data_config.name, "image_folder": data_config.image_folder, "split": split,
          "num": int(num), "image_size": int(data_config.image_size),
          "channels": int(data_config.channels), "crop": data_config.crop,
          "extractor": extractor.name, "extractor_identity": getattr(extractor, "identity", None)}


def reference_cache_path(directory: storage.PathLike, key: Mapping[str, Any]):
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
  return storage.path(directory) / f"reference_{key['extractor']}_{digest}.npz"


def reference_features(extractor, data_config, split: str, num: int, batch_size: int,
                       cache_dir: storage.PathLike, mesh: jax.sharding.Mesh, *,
                       seed: int = 0, log: Callable[[str], None] = print) -> Reference:
  """Features of the first `num` examples of `split` (cached under cache_dir, by key)."""
  from lfm_jax import data  # pylint: disable=g-import-not-at-top
  key = reference_key(data_config, split, num, extractor)
  path = reference_cache_path(cache_dir, key)
  if path.exists():
    cached = storage.load_npz(path)
    log(f"evaluate: reusing reference features {storage.display(path)}")
    feats = cached["features"]
    return Reference(feats, fid.FeatureStats.from_features(feats))
  data.prepare(data_config)
  ids = data.split_ids(data_config, split)[:int(num)]
  if len(ids) == 0:
    raise ValueError(f"config.eval.reference_split: split {split!r} has no examples")
  ndev = parallel.num_batch_shards(mesh)
  bs = -(-int(batch_size) // ndev) * ndev
  collector = FeatureCollector(extractor)
  parallel.sync("reference_features")
  log(f"evaluate: reference features of {len(ids)} images of {data_config.name} {split}")
  for batch in data.host_image_batches(data_config, split, ids, bs, seed=seed):
    g = parallel.host_local_to_global(
        {"image": batch["image"], "valid": batch["valid"], "id": batch["id"].astype(np.int32)},
        mesh)
    collector.add(g["image"], valid=g["valid"], ids=g["id"])
  order = np.argsort(collector.ids, kind="stable")
  feats = collector.features[order]
  if jax.process_index() == 0:
    storage.write_npz(path, features=feats, ids=collector.ids[order],
                      key=np.asarray(json.dumps(key, sort_keys=True, default=str)))
  return Reference(feats, fid.FeatureStats.from_features(feats))


def load_reference_stats(path: storage.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of a pytorch-fid statistics .npz (local or gs://)."""
  arrays = storage.load_npz(path)
  if "mu" not in arrays or "sigma" not in arrays:
    raise ValueError(f"config.eval.reference_stats: {storage.display(path)} has no mu/sigma "
                     f"arrays (keys: {sorted(arrays)})")
  return np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
