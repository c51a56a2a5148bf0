"""Stability study: paper 2's claims measured with lfm_jax on the embedded default, at CPU scale.

    python benchmarks/stability_study.py             # the full study (about an hour, 2 idle cores)
    python benchmarks/stability_study.py --quick     # tiny sizes: the plumbing, in under a minute
    python benchmarks/stability_study.py --estimate  # one model trained + evaluated, extrapolated
    python benchmarks/stability_study.py --sections subsets,capacity    # some sections only

Everything trains on the embedded default's data (scikit-learn digits at 16x16): the autoencoder
is trained once and the training split encoded once (stage `encode`), and every model trains on
that latent cache with lfm_jax.train.train_and_evaluate. Models of one architecture share their
compiled programs (a subset changes only the data), and XLA's persistent cache under the workdir
keeps compilations across models and reruns.

Sections (paper 2, "Exploring and Exploiting Stability in Latent Flow Matching"):
  subsets   the full model, and models trained on subsets at pruning ratios (fraction removed)
            chosen by each criterion: loss and gradient score (a small scoring model trained on
            the full data scores every example), cluster score with the proportional and the
            balanced rule, and the random, k-center and herding baselines (lfm_jax/scoring.py);
            several training seeds, the selection seed following the training seed.
  capacity  smaller U-Nets (half and quarter width, fewer levels) trained on the full data.
  c2f       coarse-to-fine sampling with trained models: a light model (>= 4x fewer FLOPs per
            evaluation, counted in the jaxpr) on the noise side, the full model on the data side;
            a light_fraction sweep with the wall-time speedup over heavy-only (interleaved
            timing, medians, the same batch) beside FD and same-seed similarity to heavy-only.
  seam      seam fine-tuning of the light model at each switch (lfm_jax/seam_train.py), with a
            control fine-tuned by the near-switch flow-matching loss alone; before / after.
  guidance  classifier-free guidance restricted to an interval of t (sample.guidance_interval).
  memory    compiled temp memory of the gradient-score step, whole batch vs chunks
            (benchmarks/score_memory.py).

Metrics of a model (`evaluate`): from --num-samples samples (Euler, the default's guidance 1.5,
labels i % 10, noise of sample i from (seed, i)), the Fréchet distance, precision and recall
(k = 3) in the offline digits classifier's features against the test split, and class agreement
(the classifier's prediction = the intended label). Inception Score and FID need the Inception
extractor, whose weights are not shipped (--inception-weights PATH switches to it). Same-seed
similarity (lfm_jax.metrics.stability.stability_report): cosine of classifier embeddings, SSIM and
PSNR of pairs of images from the same noise, beside pairs with shuffled seeds.

Outputs: <out>/stability_study.md (tables), <out>/stability_study.json (raw numbers),
<docs>/stability_*.png (plots). A rerun reuses what --workdir holds (trained models, scores,
evaluations); an interrupted run continues where it stopped. Wall times are only comparable on
an idle machine: the script warns when the load average says otherwise.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import numpy as np  # noqa: E402

C.pre_jax_setup(auto_host_devices=True)  # one host device per core, as lfm_jax.main for U-Nets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (scoring criterion, selection rule); lfm_jax/scoring.py
METHODS = {
    "loss": ("loss", "highest"),
    "gradient": ("gradient", "highest"),
    "cluster_proportional": ("cluster", "proportional"),
    "cluster_balanced": ("cluster", "balanced"),
    "random": ("random", "random"),
    "kcenter": ("kcenter", "kcenter"),
    "herding": ("herding", "herding"),
}
# Criteria whose scores do not depend on a seed here (a fixed noise bank; herding's bandwidth
# sample covers the whole training split): computed once.
SEEDLESS = ("loss", "gradient", "herding")
# U-Net variants relative to the base model: (width factor, number of resolution levels kept).
VARIANTS = {
    "full": (1.0, None),
    "half": (0.5, None),
    "quarter": (0.25, None),
    "shallow": (1.0, 1),
    "half_shallow": (0.5, 1),
    "quarter_shallow": (0.25, 1),
}
EVAL_SEED = 1000  # noise seed of every evaluation sample set (same-seed pairs across models)
STUDY_FILE = "stability_study"


# Config overrides of every plan. EMA warm-up: with the default's constant decay 0.999 and no
# warm-up, a model of a few hundred steps is still mostly its initialisation in EMA
# (0.999 ** 800 = 0.45).
STUDY_OVERRIDES = {"train.ema_warmup": True}


@dataclasses.dataclass
class Plan:
  """What the study runs (the full study's values; `quick_plan` shrinks them)."""
  steps: int = 800
  batch_size: int = 128
  num_samples: int = 500
  eval_batch: int = 250
  sample_steps: int = 50
  seeds: tuple = (0, 1, 2)
  ratios: tuple = (0.5, 0.75)
  methods: tuple = tuple(METHODS)
  capacity: tuple = ("half", "quarter", "shallow", "half_shallow")
  capacity_seeds: tuple = (0, 1, 2)
  scoring_variant: str = "half"
  light: str = "quarter"  # the light model of the seam section
  # Light models of the coarse-to-fine sweeps. On these 4x4x4 latents a U-Net's wall time falls
  # much slower than its FLOPs (overhead per op), so the light models cut width and levels both
  # (their measured speed: benchmarks/README.md, "Stability study").
  c2f_lights: tuple = ("quarter", "quarter_shallow", "half_shallow")
  fractions: tuple = (0.3, 0.5, 0.7, 0.8, 0.9)
  seam_fractions: tuple = (0.5, 0.7, 0.9)
  seam_steps: int = 300
  seam_learning_rate: float = 2e-4
  seam_ema_decay: float = 0.99
  seam_weight: float = 0.1
  seam_width: float = 0.1
  guidance_scales: tuple = (1.5, 2.0)
  guidance_intervals: tuple = (None, (0.0, 0.7), (0.3, 1.0))
  seam_control: bool = True  # also fine-tune with the near-switch FM loss alone (weight 0)
  timing_iters: int = 5
  memory_model: str = "dit_s2"
  classifier_steps: int = 400
  score_batch: int = 256
  overrides: dict = dataclasses.field(default_factory=lambda: dict(STUDY_OVERRIDES))


# The quick plan's config: tests/helpers.py's TINY sizes (8x8 digits, tiny widths), with one
# U-Net level (fewer ops to compile) and a higher learning rate (its few steps move the models).
QUICK_OVERRIDES = {
    "data.image_size": 8, "autoencoder.block_out_channels": (8, 16),
    "autoencoder.norm_num_groups": 8, "autoencoder.train.num_steps": 30,
    "autoencoder.train.log_every": 10, "model.model_channels": 16,
    "model.norm_num_groups": 8, "model.mid_attention": False, "model.channel_mult": (1,),
    "train.learning_rate": 5e-3, **STUDY_OVERRIDES,
}


def quick_plan() -> Plan:
  return Plan(steps=30, batch_size=64, num_samples=48, eval_batch=48, sample_steps=6,
              seeds=(0,), ratios=(0.5, 0.75), methods=("random", "cluster_balanced"),
              capacity=("half",), capacity_seeds=(0,), scoring_variant="half", light="half",
              c2f_lights=("half",),
              fractions=(0.5,), seam_fractions=(0.5,), seam_steps=4,
              guidance_scales=(1.5,), guidance_intervals=(None, (0.3, 1.0)),
              seam_control=False, timing_iters=2, memory_model="tiny", classifier_steps=30,
              score_batch=64,
              overrides=dict(QUICK_OVERRIDES))


def _say(msg: str) -> None:
  print(f"[study] {msg}", file=sys.stderr, flush=True)


def load_warning(where: str, mark: Optional[tuple] = None) -> Optional[str]:
  """A warning line (also printed) when other processes kept more than a quarter of a core busy
  since `mark` (C.cpu_mark(); None: over the next two seconds) — this process's own work is not
  counted. None when the machine is idle enough for wall times to mean something."""
  others = C.other_busy_cores(mark)
  if others is None:  # not Linux: the load average, which includes this process's own work
    others = C.loadavg()
  if others is None or others <= 0.25:
    return None
  msg = (f"WARNING: other processes kept {others:.2f} of {os.cpu_count()} CPUs busy {where}, so "
         "wall times (and the coarse-to-fine speedups) are not those of an idle machine")
  print(msg, file=sys.stderr, flush=True)
  return msg


# Class agreement of the full model below which its samples are too poor for the study to mean
# anything (chance is 1 / 10; the embedded default trained for 2,000 steps reaches 0.998).
MIN_CLASS_AGREEMENT = 0.9


def undertrained_warning(full_metrics: dict) -> Optional[str]:
  """A warning line when the full model's samples are near chance (too few steps)."""
  agree = full_metrics.get("class_agreement")
  if agree is None or agree >= MIN_CLASS_AGREEMENT:
    return None
  msg = (f"WARNING: the full model's class agreement is {agree:.3f} (< {MIN_CLASS_AGREEMENT}; "
         "chance 0.1): its models are undertrained, and the comparisons below say little; "
         "train longer (--steps)")
  print(msg, file=sys.stderr, flush=True)
  return msg


def _finite(x):
  """JSON-safe numbers: inf / nan become the strings "inf" / "nan"."""
  if isinstance(x, float) and not math.isfinite(x):
    return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def _unfinite(x):
  if isinstance(x, str) and x in ("inf", "-inf", "nan"):
    return float(x)
  if isinstance(x, dict):
    return {k: _unfinite(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_unfinite(v) for v in x]
  return x


def _json_value(x):
  """json.dump's default: numpy scalars and arrays as Python numbers and lists."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _tag(x: float) -> str:
  return f"{x:g}".replace(".", "p")


class Study:
  """The shared pieces (config, autoencoder, latents, classifier, reference) and memoised
  models, scores and evaluations, all under `root`."""

  def __init__(self, plan: Plan, root: str, *, data_dir: Optional[str] = None,
               inception_weights: Optional[str] = None, autoencoder: Optional[str] = None,
               classifier: Optional[str] = None, devices: Optional[int] = None):
    from lfm_jax import parallel  # pylint: disable=g-import-not-at-top
    self.plan, self.root = plan, os.path.abspath(root)
    self.inception_weights, self.classifier_path = inception_weights, classifier
    self.config = self._base_config(data_dir)
    if autoencoder:
      self.config.autoencoder.pretrained = autoencoder
    self.mesh = (parallel.create_mesh(int(devices)) if devices
                 else parallel.mesh_from_config(self.config))
    self.num_devices = int(self.mesh.devices.size)
    self._models: dict[str, Any] = {}
    self._evals: dict[str, dict] = {}
    self._scores: dict[tuple, tuple] = {}
    self.trained: list[dict] = []
    self.evaluated: list[dict] = []
    for d in ("models", "results", "scores", "eval"):
      os.makedirs(os.path.join(self.root, d), exist_ok=True)

  # ----------------------------------------------------------------------------- config
  def _base_config(self, data_dir):
    if REPO not in sys.path:
      sys.path.insert(0, REPO)
    from configs import default  # pylint: disable=g-import-not-at-top
    c = default.get_config()
    p = self.plan
    c.data.data_dir = data_dir
    c.latents.groups = 1  # one lane: a subset may leave any group short (LatentIterator)
    c.train.num_steps = p.steps
    c.train.batch_size = p.batch_size
    c.train.sample_every = 0
    c.train.checkpoint_every = p.steps
    c.train.keep_checkpoints = 1
    c.train.log_every = max(1, p.steps // 4)
    c.sample.num_steps = p.sample_steps
    c.eval.num_samples = p.num_samples
    c.eval.batch_size = p.eval_batch
    for key, value in p.overrides.items():
      node = c
      *path, leaf = key.split(".")
      for part in path:
        node = node[part]
      node[leaf] = value
    return c

  def model_config(self, variant: str, seed: int):
    """The run config of a U-Net variant (VARIANTS) with training seed `seed`."""
    if variant not in VARIANTS:
      raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    c = self.config.copy_and_resolve_references()
    factor, levels = VARIANTS[variant]
    width = max(1, int(round(c.model.model_channels * factor)))
    c.model.model_channels = width
    c.model.norm_num_groups = min(int(c.model.norm_num_groups), width)
    if levels is not None:
      c.model.channel_mult = tuple(c.model.channel_mult)[:levels]
    c.seed = int(seed)
    return c

  # ----------------------------------------------------------------------------- shared pieces
  def prepare(self) -> None:
    """Autoencoder + latent cache (stage `encode`), evaluation classifier, reference features."""
    from lfm_jax import artifacts, data, latents, stages  # pylint: disable=g-import-not-at-top
    from lfm_jax.metrics import evaluate as ev, features, fid  # pylint: disable=g-import-not-at-top
    cfg = self.config.copy_and_resolve_references()
    cfg.mode = "encode"
    base = os.path.join(self.root, "base")
    t0, c0 = time.time(), time.process_time()
    stages.run(cfg, base)
    self.base_seconds = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    self.autoencoder = artifacts.load_autoencoder(cfg, base)
    self.cache = latents.LatentCache.open(os.path.join(base, "latents"))
    self.scale = float(cfg.autoencoder.scale_factor or self.cache.scale_factor)
    arrays = self.cache.read()
    self.ids = arrays["id"].astype(np.int64)
    self.labels = arrays["label"].astype(np.int32)
    self.means = arrays["mean"].astype(np.float32)
    self.latent_shape = tuple(self.cache.latent_shape)
    images, labels, _ = data.load_images(cfg.data, cfg.data.train_split, seed=cfg.seed)
    eval_dir = os.path.join(self.root, "eval")
    if self.inception_weights:
      self.extractor = features.get_feature_extractor("inception",
                                                      weights_path=self.inception_weights)
    elif self.classifier_path:
      self.extractor = features.get_feature_extractor("digits_classifier",
                                                      path=self.classifier_path)
    else:
      self.extractor = features.get_feature_extractor(
          "digits_classifier", cache_dir=eval_dir, train_images=images, train_labels=labels,
          num_classes=int(cfg.data.num_classes), num_steps=self.plan.classifier_steps)
    self.reference = ev.reference_features(
        self.extractor, cfg.data, cfg.eval.reference_split, 100_000, int(cfg.eval.batch_size),
        eval_dir, self.mesh, seed=cfg.seed, log=_say)
    train_feats = self.extractor.extract(images, batch_size=int(cfg.eval.batch_size))
    mu, sigma = fid.FeatureStats.from_features(train_feats).mean_cov()
    self.real_fd = fid.frechet_distance(mu, sigma, *self.reference.mean_cov())
    _say(f"shared pieces ready: {len(self.ids)} training latents {self.latent_shape}, scale "
         f"{self.scale:.4f}, reference {len(self.reference.features)} test images, FD(train, "
         f"test) {self.real_fd:.3f}")

  # ----------------------------------------------------------------------------- models
  def model(self, name: str, variant: str = "full", seed: int = 0,
            kept_ids: Optional[np.ndarray] = None):
    """The trained FlowModel `name` (trained now, or restored from its workdir)."""
    if name in self._models:
      return self._models[name]
    from lfm_jax import artifacts, latents, train, workdir  # pylint: disable=g-import-not-at-top
    cfg = self.model_config(variant, seed)
    wd = workdir.Workdir(os.path.join(self.root, "models", name))
    if not wd.exists():
      wd.prepare(cfg)
    if kept_ids is not None:
      wd.save_npy(wd.kept_ids, kept_ids)  # where --mode=train keeps a subset's ids
    done = wd.latest_step()
    it = latents.LatentIterator(self.cache, batch_size=int(cfg.train.batch_size), seed=int(seed),
                                kept_ids=kept_ids)
    module = artifacts.build_velocity_network(cfg.model, self.latent_shape)
    t0, c0 = time.time(), time.process_time()
    state = train.train_and_evaluate(cfg, wd, it, model=module, mesh=self.mesh,
                                     scale_factor=self.scale)
    if done is None or done < int(cfg.train.num_steps):
      self.trained.append({"name": name, "variant": variant, "steps": int(cfg.train.num_steps),
                           "examples": int(it.num_examples), "wall_s": time.time() - t0,
                           "cpu_s": time.process_time() - c0})
      _say(f"trained {name}: {self.trained[-1]['wall_s']:.1f} s wall, "
           f"{self.trained[-1]['cpu_s']:.1f} s CPU")
    model = artifacts.FlowModel(module, state.ema_params, self.latent_shape, self.scale,
                                cfg.model, str(wd), step=int(cfg.train.num_steps))
    self._models[name] = model
    return model

  def variant_model(self, variant: str, seed: int):
    return self.model(f"{variant}_s{seed}", variant, seed)

  # ----------------------------------------------------------------------------- scores
  def scores(self, criterion: str, seed: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(scores, clusters) of every training example (cached in <root>/scores)."""
    from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
    seed = 0 if criterion in SEEDLESS else int(seed)
    key = (criterion, seed)
    if key in self._scores:
      return self._scores[key]
    path = os.path.join(self.root, "scores", f"{criterion}_s{seed}.npz")
    if os.path.exists(path):
      s = scoring.load_scores(path)
      order = np.argsort(s["ids"])
      pos = order[np.searchsorted(s["ids"][order], self.ids)]
      out = (s["scores"][pos], None if s["clusters"] is None else s["clusters"][pos])
    else:
      velocity_fn = params = None
      if criterion in ("loss", "gradient"):
        scorer = self.variant_model(self.plan.scoring_variant, 0)
        velocity_fn, params = scoring.module_velocity_fn(scorer.module), scorer.params
      t0 = time.time()
      sc = self.config.score
      out = scoring.compute_scores(
          criterion, self.ids, embeddings=self.means.reshape(len(self.ids), -1),
          latents=self.means * self.scale, labels=self.labels, velocity_fn=velocity_fn,
          params=params, num_clusters=int(sc.num_clusters), num_times=int(sc.num_times),
          num_noises=int(sc.num_noises), batch_size=self.plan.score_batch, seed=seed,
          gradient_chunk_size=int(sc.gradient_chunk_size))
      scoring.save_scores(path, self.ids, out[0], out[1], criterion=criterion,
                          meta={"seed": seed, "seconds": time.time() - t0})
      _say(f"scores {criterion} (seed {seed}): {time.time() - t0:.1f} s")
    self._scores[key] = out
    return out

  def kept_ids(self, method: str, ratio: float, seed: int) -> np.ndarray:
    from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
    criterion, rule = METHODS[method]
    scores, clusters = self.scores(criterion, seed)
    return scoring.select_subset(self.ids, scores, rule=rule, ratio=float(ratio),
                                 clusters=clusters, seed=int(seed))

  # ----------------------------------------------------------------------------- evaluation
  def settings(self, **overrides):
    from lfm_jax import generate  # pylint: disable=g-import-not-at-top
    return generate.SamplerSettings.from_config(self.config, **overrides)

  def evaluate(self, key: str, model, settings=None, light=None) -> dict:
    """Metrics and images of `model`'s evaluation samples (cached in <root>/results)."""
    if key in self._evals:
      return self._evals[key]
    from lfm_jax import generate  # pylint: disable=g-import-not-at-top
    from lfm_jax.metrics import evaluate as ev, features  # pylint: disable=g-import-not-at-top
    settings = settings or self.settings()
    json_path = os.path.join(self.root, "results", f"{key}.json")
    npz_path = os.path.join(self.root, "results", f"{key}.npz")
    if os.path.exists(json_path) and os.path.exists(npz_path):
      with open(json_path) as f:
        metrics = _unfinite(json.load(f))
      result = {"metrics": metrics, "images": np.load(npz_path)["images"]}
      self._evals[key] = result
      return result
    n = self.plan.num_samples
    name = self.extractor.name
    collector = ev.FeatureCollector(self.extractor, want_logits=True)
    t0, c0 = time.time(), time.process_time()
    out = generate.generate(model, self.autoencoder, n, settings=settings, seed=EVAL_SEED,
                            batch_size=self.plan.eval_batch,
                            labels=generate.cycle_labels(n, model.num_classes), light=light,
                            mesh=self.mesh, keep_latents=False,
                            on_batch=lambda x, start, k: collector.add(x, k))
    obs = ev.Observations(name, collector.features, collector.stats, self.reference,
                          labels=out.labels, logits=collector.logits, settings=self.config.eval)
    raw = ev.compute_metrics(("fd", "precision_recall", "class_agreement", "inception_score"),
                             obs, note=lambda m: None)
    metrics = {
        "fd": raw.get(features.metric_name("fd", name)),
        "precision": raw.get(features.metric_name("precision", name)),
        "recall": raw.get(features.metric_name("recall", name)),
        "class_agreement": raw.get(f"class_agreement_{name}"),
        "inception_score": raw.get("inception_score"),
        "nfe": out.nfe, "nfe_light": out.nfe_light, "nfe_heavy": out.nfe_heavy,
        "guidance_scale": settings.guidance_scale,
        "guidance_interval": settings.guidance_interval,
        "light_fraction": settings.light_fraction if light is not None else 0.0,
    }
    self.evaluated.append({"key": key, "wall_s": time.time() - t0,
                           "cpu_s": time.process_time() - c0})
    with open(json_path, "w") as f:
      json.dump(_finite(metrics), f, indent=1)
    np.savez(npz_path, images=out.images.astype(np.float32))
    result = {"metrics": metrics, "images": out.images}
    self._evals[key] = result
    return result

  def has_evaluation(self, key: str) -> bool:
    """True when `key` was evaluated in this run or is cached in <root>/results."""
    where = os.path.join(self.root, "results", key)
    return key in self._evals or all(os.path.exists(where + ext) for ext in (".json", ".npz"))

  def evaluation(self, key: str) -> Optional[dict]:
    """A finished evaluation of this run (None when `key` was not evaluated)."""
    return self._evals.get(key)

  def similarity(self, a: dict, b: dict) -> dict:
    """Same-seed similarity of two evaluations' images, and the shuffled-pair baseline."""
    from lfm_jax.metrics import stability  # pylint: disable=g-import-not-at-top
    r = stability.stability_report(a["images"], b["images"], self.extractor, seed=0,
                                   batch_size=self.plan.eval_batch)
    return {"same_seed": {k: r[f"same_seed/{k}"] for k in ("cosine", "ssim", "psnr")},
            "shuffled": {k: r[f"shuffled/{k}"] for k in ("cosine", "ssim", "psnr")},
            "num_pairs": r["num_pairs"]}

  def model_eval(self, name: str, variant: str = "full", seed: int = 0,
                 kept_ids: Optional[np.ndarray] = None) -> dict:
    return self.evaluate(name, self.model(name, variant, seed, kept_ids))


# ----------------------------------------------------------------------------------- sections


def section_subsets(s: Study) -> dict:
  """Full-data models, subset models per method x ratio x seed, training-seed pairs."""
  p = s.plan
  full = {seed: s.model_eval(f"full_s{seed}", "full", seed) for seed in p.seeds}
  rows = []
  for seed in p.seeds:
    rows.append({"method": "full", "ratio": 0.0, "seed": seed, "kept": len(s.ids),
                 "expected_kept": len(s.ids), **full[seed]["metrics"]})
  from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
  for method in p.methods:
    for ratio in p.ratios:
      for seed in p.seeds:
        kept = s.kept_ids(method, ratio, seed)
        name = f"{method}_r{_tag(ratio)}_s{seed}"
        result = s.model_eval(name, "full", seed, kept_ids=kept)
        rows.append({"method": method, "ratio": float(ratio), "seed": seed,
                     "kept": int(len(kept)),
                     "expected_kept": scoring.keep_count(len(s.ids), float(ratio)),
                     **result["metrics"], **s.similarity(result, full[seed])})
  seed_pairs = []
  for i, a in enumerate(p.seeds):
    for b in p.seeds[i + 1:]:
      seed_pairs.append({"seeds": [a, b], **s.similarity(full[a], full[b])})
  self_pair = s.similarity(full[p.seeds[0]], full[p.seeds[0]])
  return {"rows": rows, "summary": summarize(rows, ("method", "ratio")),
          "training_seed": seed_pairs, "self": self_pair}


def _params_and_flops(module, latent_shape, num_classes) -> tuple[int, float]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1,) + tuple(latent_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = jnp.zeros((1,), jnp.int32) if num_classes else None
  params = jax.eval_shape(lambda r: module.init(r, x, t, y), jax.random.PRNGKey(0))["params"]
  jaxpr = jax.make_jaxpr(lambda p_, x_, t_, y_: module.apply({"params": p_}, x_, t_, y_))(
      params, x, t, y)
  return sum(int(v.size) for v in jax.tree_util.tree_leaves(params)), C.jaxpr_matmul_flops(jaxpr)


def architecture(s: Study, variant: str) -> dict:
  from lfm_jax import artifacts  # pylint: disable=g-import-not-at-top
  cfg = s.model_config(variant, 0)
  module = artifacts.build_velocity_network(cfg.model, s.latent_shape)
  n, flops = _params_and_flops(module, s.latent_shape, int(cfg.model.num_classes))
  return {"variant": variant, "model_channels": int(cfg.model.model_channels),
          "channel_mult": list(cfg.model.channel_mult), "params": n,
          "forward_flops_per_sample": flops}


def section_capacity(s: Study) -> dict:
  p = s.plan
  archs = {v: architecture(s, v) for v in ("full",) + tuple(p.capacity)}
  rows = []
  for variant in p.capacity:
    for seed in p.capacity_seeds:
      full = s.model_eval(f"full_s{seed}", "full", seed)
      result = s.model_eval(f"{variant}_s{seed}", variant, seed)
      rows.append({"variant": variant, "seed": seed, **result["metrics"],
                   **s.similarity(result, full)})
  for a in archs.values():
    a["flops_ratio_full_over_this"] = (archs["full"]["forward_flops_per_sample"]
                                       / a["forward_flops_per_sample"])
  return {"architectures": list(archs.values()), "rows": rows,
          "summary": summarize(rows, ("variant",))}


def _timing(s: Study, heavy, lights: dict, fractions) -> dict:
  """Wall times of heavy-only, coarse-to-fine and light-only sampling of one batch (the
  evaluation's batch shape, so the evaluation's compiled solves are reused), interleaved:
  {"heavy", "<light>/c2f_<lf>", "<light>/only"} -> C.time_interleaved stats."""
  from lfm_jax import generate  # pylint: disable=g-import-not-at-top
  p = s.plan
  b = p.eval_batch
  labels = generate.cycle_labels(b, heavy.num_classes)

  def run(model, light_model=None, lf=None):
    st = s.settings() if lf is None else s.settings(light_fraction=float(lf))
    return lambda: generate.generate(model, None, b, settings=st, seed=EVAL_SEED, batch_size=b,
                                     labels=labels, light=light_model, mesh=s.mesh,
                                     keep_images=False, keep_latents=False).nfe

  fns = {"heavy": run(heavy)}
  for name, light in lights.items():
    for lf in fractions:
      fns[f"{name}/c2f_{lf:g}"] = run(heavy, light, lf)
    fns[f"{name}/only"] = run(light)
  warning = load_warning("before the coarse-to-fine timing")
  mark = C.cpu_mark()
  stats = C.time_interleaved(fns, iters=p.timing_iters, warmup=1)
  warning = load_warning("during the coarse-to-fine timing", mark) or warning
  return {"batch_size": b, "iters": p.timing_iters, "stats": stats, "warning": warning,
          "loadavg_after": C.loadavg()}


def section_c2f(s: Study) -> dict:
  """Light -> heavy sweeps over light_fraction, one per light model."""
  from lfm_jax import sampling  # pylint: disable=g-import-not-at-top
  p = s.plan
  heavy = s.variant_model("full", 0)
  arch_h = architecture(s, "full")
  heavy_eval = s.evaluate("full_s0", heavy)
  lights = {name: s.variant_model(name, 0) for name in p.c2f_lights}
  evals = {(name, lf): s.evaluate(f"c2f_{name}_lf{_tag(lf)}", heavy,
                                  s.settings(light_fraction=float(lf)), light=light)
           for name, light in lights.items() for lf in p.fractions}
  timing = _timing(s, heavy, lights, p.fractions)
  stats = timing["stats"]
  t_heavy = stats["heavy"]["ms"]
  out = []
  for name, light in lights.items():
    arch_l = architecture(s, name)
    flops_ratio = arch_h["forward_flops_per_sample"] / arch_l["forward_flops_per_sample"]
    sweep = []
    for lf in p.fractions:
      st = s.settings(light_fraction=float(lf))
      t = stats[f"{name}/c2f_{lf:g}"]
      _, n_light, n_heavy = sampling.coarse_to_fine_plan(st.solver, st.num_steps, float(lf))
      sweep.append({"light_fraction": float(lf), "n_light": n_light, "n_heavy": n_heavy,
                    "ms_heavy": t_heavy, "ms_c2f": t["ms"], "speedup": t_heavy / t["ms"],
                    "speedup_cpu_time": stats["heavy"]["cpu_ms"] / max(t["cpu_ms"], 1e-9),
                    "speedup_ideal_from_flops": (n_light + n_heavy) / (n_light / flops_ratio
                                                                       + n_heavy),
                    **evals[(name, lf)]["metrics"], **s.similarity(evals[(name, lf)],
                                                                   heavy_eval)})
    light_eval = s.evaluate(f"{name}_s0", light)
    t_only = stats[f"{name}/only"]["ms"]
    light_only = {"light_fraction": 1.0, "ms_light": t_only, "speedup": t_heavy / t_only,
                  **light_eval["metrics"], **s.similarity(light_eval, heavy_eval)}
    out.append({"light_variant": name, "light": arch_l,
                "flops_ratio_heavy_over_light": flops_ratio, "sweep": sweep,
                "light_only": light_only, "goal": goal_check(sweep, heavy_eval["metrics"]["fd"])})
  return {"heavy": arch_h, "heavy_only": heavy_eval["metrics"], "ms_heavy": t_heavy,
          "lights": out, "timing": {k: v for k, v in timing.items() if k != "stats"},
          "timing_stats": stats}


def goal_check(sweep: Sequence[dict], fd_heavy: float, *, speedup: float = 2.5,
               similarity: float = 0.9, fd_tolerance: float = 0.10) -> dict:
  """The best speedup among fractions with same-seed cosine >= similarity and FD within
  fd_tolerance of heavy-only; met when it reaches `speedup`."""
  ok = [r for r in sweep if r["same_seed"]["cosine"] >= similarity
        and r["fd"] <= fd_heavy * (1 + fd_tolerance)]
  best = max(ok, key=lambda r: r["speedup"], default=None)
  return {"target_speedup": speedup, "min_cosine": similarity, "fd_tolerance": fd_tolerance,
          "best_light_fraction": None if best is None else best["light_fraction"],
          "best_speedup": None if best is None else best["speedup"],
          "met": bool(best is not None and best["speedup"] >= speedup)}


def section_seam(s: Study, c2f: Optional[dict] = None) -> dict:
  """Seam fine-tuning (and an FM-only control) of the light model at each switch."""
  from lfm_jax import latents, sampling, seam_train, workdir  # pylint: disable=g-import-not-at-top
  p = s.plan
  heavy, light = s.variant_model("full", 0), s.variant_model(p.light, 0)
  heavy_eval = s.evaluate("full_s0", heavy)
  rows = []
  for lf in p.seam_fractions:
    st = s.settings(light_fraction=float(lf))
    t_switch, _, n_heavy = sampling.coarse_to_fine_plan(st.solver, st.num_steps, float(lf))
    before = s.evaluate(f"c2f_{p.light}_lf{_tag(lf)}", heavy, st, light=light)
    row = {"light_fraction": float(lf), "t_switch": t_switch,
           "before": {**before["metrics"], **s.similarity(before, heavy_eval)}}
    targets = None
    kinds = (("seam", p.seam_weight),) + ((("fm_only", 0.0),) if p.seam_control else ())
    for kind, weight in kinds:
      name = f"{kind}_{p.light}_lf{_tag(lf)}"
      key = f"c2f_{name}"
      if not s.has_evaluation(key):
        cfg = s.model_config(p.light, 0)
        cfg.train.num_steps = p.seam_steps
        cfg.train.learning_rate = p.seam_learning_rate
        cfg.train.ema_decay = p.seam_ema_decay
        cfg.train.checkpoint_every = p.seam_steps
        cfg.train.log_every = max(1, p.seam_steps // 3)
        wd = workdir.Workdir(os.path.join(s.root, "models", name))
        if not wd.exists():
          wd.prepare(cfg)
        if targets is None:
          t0 = time.time()
          targets = seam_train.seam_targets(heavy, s.means * s.scale, s.labels, t_switch,
                                            num_steps=n_heavy, batch_size=p.score_batch)
          row["targets_s"] = time.time() - t0
        data = seam_train.SeamBatches(
            latents.LatentIterator(s.cache, batch_size=int(cfg.train.batch_size), seed=0,
                                   with_ids=True), s.ids, targets)
        t0, c0 = time.time(), time.process_time()
        tuned = seam_train.finetune(cfg, wd, light, data, t_switch=t_switch, width=p.seam_width,
                                    weight=weight, mesh=s.mesh)
        s.trained.append({"name": name, "variant": p.light, "steps": p.seam_steps,
                          "examples": len(s.ids), "wall_s": time.time() - t0,
                          "cpu_s": time.process_time() - c0})
      else:
        tuned = light  # the evaluation is cached; the model is not needed
      after = s.evaluate(key, heavy, st, light=tuned)
      row[kind] = {**after["metrics"], **s.similarity(after, heavy_eval), "weight": weight}
    for entry in (c2f or {}).get("lights", []):  # not `light`: that is the model fine-tuned
      for r in entry["sweep"] if entry["light_variant"] == p.light else ():
        if abs(r["light_fraction"] - lf) < 1e-9:
          row["speedup"] = r["speedup"]
    rows.append(row)
  return {"steps": p.seam_steps, "learning_rate": p.seam_learning_rate,
          "ema_decay": p.seam_ema_decay, "weight": p.seam_weight, "width": p.seam_width,
          "rows": rows}


def section_guidance(s: Study) -> dict:
  p = s.plan
  model = s.variant_model("full", 0)
  rows = []
  for g in p.guidance_scales:
    plain = None
    for interval in p.guidance_intervals:
      st = s.settings(guidance_scale=float(g), guidance_interval=(
          None if interval is None else tuple(float(v) for v in interval)))
      key = "full_s0" if (interval is None and abs(g - s.config.sample.guidance_scale) < 1e-9) \
          else f"guidance_g{_tag(g)}_" + ("all" if interval is None
                                          else f"{_tag(interval[0])}-{_tag(interval[1])}")
      result = s.evaluate(key, model, st)
      if interval is None:
        plain = result
      row = {"guidance_scale": float(g), "interval": None if interval is None else list(interval),
             **result["metrics"]}
      if plain is not None and interval is not None:
        row.update(s.similarity(result, plain))
      rows.append(row)
  return {"rows": rows}


def section_memory(s: Study) -> dict:
  import score_memory  # pylint: disable=g-import-not-at-top
  path = os.path.join(s.root, "results", f"score_memory_{s.plan.memory_model}.json")
  if os.path.exists(path):
    with open(path) as f:
      records = json.load(f)
  else:
    records = score_memory.measure(s.plan.memory_model, (None, 8))
    with open(path, "w") as f:
      json.dump(records, f, indent=1)
  return {"records": records, "command": "python benchmarks/score_memory.py"
          + (" --quick" if s.plan.memory_model == "tiny" else "")}


SECTIONS = ("subsets", "capacity", "c2f", "seam", "guidance", "memory")


# ----------------------------------------------------------------------------------- summaries

STATS = ("fd", "precision", "recall", "class_agreement", "inception_score")
SIMS = ("cosine", "ssim", "psnr")


def _mean_std(values) -> Optional[list]:
  vals = [float(v) for v in values if v is not None and not isinstance(v, str)]
  if not vals:
    return None
  finite = [v for v in vals if math.isfinite(v)]
  if len(finite) < len(vals):
    return [float("inf"), 0.0]
  return [float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0]


def summarize(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
  """mean and std (over seeds) of every metric, per group of `keys`."""
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  out = []
  for gk, rs in groups.items():
    entry = dict(zip(keys, gk))
    entry["n"] = len(rs)
    entry["kept"] = rs[0].get("kept")
    for m in STATS:
      entry[m] = _mean_std(r.get(m) for r in rs)
    for side in ("same_seed", "shuffled"):
      if side in rs[0]:
        entry[side] = {m: _mean_std(r[side][m] for r in rs) for m in SIMS}
    out.append(entry)
  return out


# Plan fields (and options) that change what a trained model or a cached evaluation is: a
# workdir made with other values cannot be reused. Lists of cells (seeds, methods, ratios,
# fractions, ...) may grow or shrink between runs.
FINGERPRINT_FIELDS = ("steps", "batch_size", "num_samples", "sample_steps", "overrides",
                      "classifier_steps", "seam_steps", "seam_learning_rate", "seam_ema_decay",
                      "seam_weight", "seam_width")


def check_workdir(root: str, plan: Plan, args) -> None:
  """Records what the workdir's models and evaluations depend on (<root>/plan.json) and refuses
  a workdir made with other values, naming the first difference."""
  want = {k: getattr(plan, k) for k in FINGERPRINT_FIELDS}
  want.update(autoencoder=args.autoencoder, classifier=args.classifier,
              inception_weights=args.inception_weights, quick=bool(args.quick))
  want = json.loads(json.dumps(want, default=str))
  path = os.path.join(root, "plan.json")
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    for k in sorted(set(want) | set(have)):
      if have.get(k) != want.get(k):
        raise SystemExit(f"error: --workdir {root} holds a study made with {k}={have.get(k)!r},"
                         f" this run has {k}={want.get(k)!r}; use another --workdir")
    return
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump(want, f, indent=1, sort_keys=True)


def per_kind_timing(s: Study, plan: Plan) -> dict:
  """Median / first wall and CPU seconds of the models and evaluations of this run, by kind."""
  kinds: dict[str, list] = {}
  for t in s.trained:
    kind = ("seam fine-tuning" if t["steps"] == plan.seam_steps and t["name"].startswith(
        ("seam_", "fm_only_")) else f"{t['variant']} U-Net, {t['steps']} steps")
    kinds.setdefault(kind, []).append(t)
  kinds[f"evaluation, {plan.num_samples} samples"] = list(s.evaluated)
  return {k: {"n": len(v), "median_wall_s": float(np.median([t["wall_s"] for t in v])),
              "median_cpu_s": float(np.median([t["cpu_s"] for t in v])),
              "first_wall_s": float(v[0]["wall_s"])} for k, v in kinds.items() if v}


# ----------------------------------------------------------------------------------- report

def _f(ms, digits=3) -> str:
  if ms is None:
    return "n/a"
  if isinstance(ms, (int, float)):
    return "inf" if math.isinf(ms) else f"{ms:.{digits}f}"
  m, sd = ms
  if math.isinf(m):
    return "inf"
  return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _pct(ms) -> str:
  if ms is None:
    return "n/a"
  if isinstance(ms, (int, float)):
    return f"{100 * ms:.1f}%"
  return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}%"


def headline_table(subsets: dict) -> list[str]:
  lines = ["| method | pruned | kept | FD | class agr. | same-seed cosine | shuffled cosine |"
           " same-seed SSIM |",
           "|---|---|---|---|---|---|---|---|"]
  for e in subsets["summary"]:
    ss = e.get("same_seed")
    sh = e.get("shuffled")
    lines.append(f"| {e['method']} | {e['ratio']:.0%} | {e['kept']} | {_f(e['fd'], 2)} | "
                 f"{_pct(e['class_agreement'])} | "
                 f"{_f(ss['cosine']) if ss else '—'} | {_f(sh['cosine']) if sh else '—'} | "
                 f"{_f(ss['ssim']) if ss else '—'} |")
  return lines


def readme_section(results: dict, plots: dict, out_dir: str) -> str:
  """The README's stability section: what was measured, the headline table, the plots, and the
  command that regenerates them (written to <out>/stability_readme.md)."""
  r = results
  p = r["plan"]
  rel = lambda path: os.path.relpath(path, REPO) if path.startswith(REPO) else path
  L = ["## Stability (paper 2) on the embedded default", "",
       f"`{r['command']}` trains on the embedded digits (one autoencoder, one latent cache): "
       f"the full model and models on subsets chosen by each scoring criterion and baseline at "
       f"pruning ratios {', '.join(f'{q:.0%}' for q in p['ratios'])}, "
       f"{len(p['seeds'])} training seeds each, smaller U-Nets, coarse-to-fine sampling with a "
       "light model, seam fine-tuning and guidance intervals. Fréchet distance (FD) is in the "
       "offline digits classifier's features; same-seed cosine compares each model's samples "
       "with the full model's from the same noise (unrelated pairs: the shuffled baseline). "
       f"Tables: `{rel(os.path.join(out_dir, STUDY_FILE + '.md'))}`, raw numbers: "
       f"`{rel(os.path.join(out_dir, STUDY_FILE + '.json'))}`.", ""]
  if "subsets" in r:
    summary = {(e["method"], e["ratio"]): e for e in r["subsets"]["summary"]}
    ratios = list(p["ratios"])
    head = (["method"] + [f"FD {q:.0%} pruned" for q in ratios]
            + [f"cosine {q:.0%} pruned" for q in ratios])
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    full = summary.get(("full", 0.0))
    if full:
      L.append(f"| full data | FD {_f(full['fd'], 2)} |" + " |" * (len(head) - 2))
    shuffled = []
    for m in p["methods"]:
      cells = [m]
      for q in ratios:
        e = summary.get((m, float(q)))
        cells.append(_f(e["fd"], 2) if e else "—")
      for q in ratios:
        e = summary.get((m, float(q)))
        cells.append(_f(e["same_seed"]["cosine"]) if e else "—")
        if e:
          shuffled.append(e["shuffled"]["cosine"][0])
      L.append("| " + " | ".join(cells) + " |")
    if shuffled:
      L += ["", f"Shuffled-pair cosine: {np.mean(shuffled):.3f}.", ""]
  if "c2f" in r:
    for light in r["c2f"]["lights"]:
      g = light["goal"]
      best = ("no light_fraction qualifies" if g["best_speedup"] is None else
              f"{g['best_speedup']:.2f}x at light_fraction {g['best_light_fraction']:g}")
      L.append(f"Coarse-to-fine, light `{light['light_variant']}` "
               f"({light['flops_ratio_heavy_over_light']:.1f}x fewer FLOPs): best speedup with "
               f"same-seed cosine >= {g['min_cosine']} and FD within {g['fd_tolerance']:.0%} of "
               f"heavy-only: {best}.")
    L.append("")
  for key, title in (("ratio", "quality vs pruning ratio"), ("c2f", "coarse-to-fine trade-off"),
                     ("pairs", "same-seed pairs")):
    if key in plots:
      L.append(f"![{title}]({rel(plots[key])})")
  return "\n".join(L) + "\n"


def write_report(results: dict, out_dir: str, docs_dir: str, plots: dict) -> str:
  os.makedirs(out_dir, exist_ok=True)
  r = results
  p = r["plan"]
  fd_name = r["shared"]["fd_name"]
  L = [f"# Stability study (paper 2) on the embedded default",
       "",
       f"Generated by `{r['command']}`; raw numbers in `{STUDY_FILE}.json`. "
       "Every figure below comes from that run.",
       "",
       f"Data: {r['shared']['num_train']} training digits at {r['shared']['image_size']}x"
       f"{r['shared']['image_size']} (latents {tuple(r['shared']['latent_shape'])}, scale "
       f"{r['shared']['scale_factor']:.4f}), one autoencoder and one latent cache for every "
       f"model. Models: class-conditional U-Nets, {p['steps']} steps at batch {p['batch_size']}"
       f" (AdamW, EMA), seeds {list(p['seeds'])}. Evaluation: {p['num_samples']} samples, "
       f"Euler {p['sample_steps']} steps, guidance {r['shared']['guidance_scale']:g}, noise "
       f"seed {EVAL_SEED} (sample i: label i % 10).",
       "",
       f"Metrics are in the features of the {r['shared']['extractor']}: "
       f"Fréchet distance (`{fd_name}`), precision and recall (k = 3) against the "
       f"{r['shared']['reference_count']} test images, class agreement (the classifier's "
       "prediction equals the intended label). "
       + ("Inception Score and FID are reported with the Inception extractor "
          "(`--inception-weights`); its weights are not shipped and are offline-unavailable "
          "here, so this run uses the digits classifier and the IS column reads n/a "
          "(the metric exists as eval.metrics `inception_score`). "
          if r["shared"]["extractor"] != "inception" else
          "Inception Score from the same extractor's logits. ")
       + f"Fréchet distance between the real training and test images: "
       f"{r['shared']['real_fd']:.3f}.",
       "",
       "Same-seed similarity: images of two models from the same noise and label, paired; "
       "cosine of classifier embeddings, SSIM and PSNR (lfm_jax.metrics.stability), beside "
       "the same figures for pairs with shuffled seeds (unrelated images).",
       ""]
  for w in r.get("warnings", []):
    L += [f"> {w}", ""]
  if "subsets" in r:
    sub = r["subsets"]
    L += ["## Data pruning: quality and same-seed similarity to the full model", "",
          "Each subset model is compared with the full model of the same training seed; "
          "mean ± std over seeds. Pruned = fraction of the training set removed.", ""]
    L += headline_table(sub)
    L += ["", "Precision, recall and PSNR:", "",
          "| method | pruned | precision | recall | same-seed PSNR (dB) | shuffled PSNR | "
          "shuffled SSIM |", "|---|---|---|---|---|---|---|"]
    for e in sub["summary"]:
      ss, sh = e.get("same_seed"), e.get("shuffled")
      L.append(f"| {e['method']} | {e['ratio']:.0%} | {_f(e['precision'])} | "
               f"{_f(e['recall'])} | {_f(ss['psnr'], 2) if ss else '—'} | "
               f"{_f(sh['psnr'], 2) if sh else '—'} | {_f(sh['ssim']) if sh else '—'} |")
    if sub["training_seed"]:
      L += ["", "Training-seed stability (full models with different training seeds, same "
            "noise):", "", "| seeds | same-seed cosine | shuffled cosine | same-seed SSIM | "
            "shuffled SSIM | same-seed PSNR |", "|---|---|---|---|---|---|"]
    for e in sub["training_seed"]:
      L.append(f"| {e['seeds'][0]} vs {e['seeds'][1]} | {_f(e['same_seed']['cosine'])} | "
               f"{_f(e['shuffled']['cosine'])} | {_f(e['same_seed']['ssim'])} | "
               f"{_f(e['shuffled']['ssim'])} | {_f(e['same_seed']['psnr'], 2)} |")
    e = sub["self"]
    L += ["", f"Check: the full model against itself gives cosine {_f(e['same_seed']['cosine'], 4)}"
          f", SSIM {_f(e['same_seed']['ssim'], 4)}, PSNR {_f(e['same_seed']['psnr'], 2)} "
          f"(shuffled: {_f(e['shuffled']['cosine'], 4)}, {_f(e['shuffled']['ssim'], 4)}).", ""]
    L += [f"![quality vs pruning ratio]({os.path.relpath(plots['ratio'], out_dir)})", ""]
  if "capacity" in r:
    cap = r["capacity"]
    L += ["## Capacity: smaller U-Nets against the full model (same training seed)", "",
          "| variant | width | levels | params | forward MFLOP | FLOPs full/this | FD | "
          "class agr. | same-seed cosine | shuffled cosine | same-seed SSIM | same-seed PSNR |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    archs = {a["variant"]: a for a in cap["architectures"]}
    full_rows = [e for e in r.get("subsets", {}).get("summary", []) if e["method"] == "full"]
    a = archs["full"]
    if full_rows:
      e = full_rows[0]
      L.append(f"| full | {a['model_channels']} | {len(a['channel_mult'])} | {a['params']:,} | "
               f"{a['forward_flops_per_sample'] / 1e6:.2f} | 1.0 | {_f(e['fd'], 2)} | "
               f"{_pct(e['class_agreement'])} | — | — | — | — |")
    for e in cap["summary"]:
      a = archs[e["variant"]]
      L.append(f"| {e['variant']} | {a['model_channels']} | {len(a['channel_mult'])} | "
               f"{a['params']:,} | {a['forward_flops_per_sample'] / 1e6:.2f} | "
               f"{a['flops_ratio_full_over_this']:.1f} | {_f(e['fd'], 2)} | "
               f"{_pct(e['class_agreement'])} | {_f(e['same_seed']['cosine'])} | "
               f"{_f(e['shuffled']['cosine'])} | {_f(e['same_seed']['ssim'])} | "
               f"{_f(e['same_seed']['psnr'], 2)} |")
    L.append("")
  if "c2f" in r:
    c = r["c2f"]
    t = c["timing"]
    h = c["heavy_only"]
    L += ["## Coarse-to-fine sampling with trained models", "",
          f"Heavy: the full model (width {c['heavy']['model_channels']}, "
          f"{c['heavy']['forward_flops_per_sample'] / 1e6:.2f} MFLOP per sample and "
          "evaluation, counted in the jaxpr by benchmarks/_common.py jaxpr_matmul_flops). A "
          "light model integrates the noise-side light_fraction of the trajectory, the heavy "
          f"one the rest (Euler {p['sample_steps']} steps in all). Speedup: heavy-only wall "
          f"time / coarse-to-fine wall time, medians of {t['iters']} interleaved repeats on one"
          f" batch of {t['batch_size']} (lfm_jax.generate without the decoder, guidance "
          f"included; heavy-only {c['ms_heavy']:.0f} ms). Similarity is to heavy-only samples "
          "from the same noise.", ""]
    if t.get("warning"):
      L += [f"> {t['warning']}", ""]
    for light in c["lights"]:
      a = light["light"]
      L += [f"### Light model `{light['light_variant']}`: width {a['model_channels']}, "
            f"{len(a['channel_mult'])} level(s), {a['params']:,} params, "
            f"{a['forward_flops_per_sample'] / 1e6:.2f} MFLOP: "
            f"{light['flops_ratio_heavy_over_light']:.1f}x fewer FLOPs per evaluation", "",
            "| light_fraction | light/heavy steps | speedup (wall) | speedup (CPU time) | "
            "ideal (FLOPs) | FD | class agr. | same-seed cosine | same-seed SSIM | "
            "same-seed PSNR |", "|---|---|---|---|---|---|---|---|---|---|",
            f"| 0 (heavy only) | 0/{p['sample_steps']} | 1.00 | 1.00 | 1.00 | {_f(h['fd'], 2)}"
            f" | {_pct(h['class_agreement'])} | 1 | 1 | inf |"]
      for e in light["sweep"]:
        L.append(f"| {e['light_fraction']:g} | {e['n_light']}/{e['n_heavy']} | "
                 f"{e['speedup']:.2f} | {e['speedup_cpu_time']:.2f} | "
                 f"{e['speedup_ideal_from_flops']:.2f} | {_f(e['fd'], 2)} | "
                 f"{_pct(e['class_agreement'])} | {_f(e['same_seed']['cosine'])} | "
                 f"{_f(e['same_seed']['ssim'])} | {_f(e['same_seed']['psnr'], 2)} |")
      e = light["light_only"]
      L.append(f"| 1 (light only) | {p['sample_steps']}/0 | {e['speedup']:.2f} | — | "
               f"{light['flops_ratio_heavy_over_light']:.2f} | {_f(e['fd'], 2)} | "
               f"{_pct(e['class_agreement'])} | {_f(e['same_seed']['cosine'])} | "
               f"{_f(e['same_seed']['ssim'])} | {_f(e['same_seed']['psnr'], 2)} |")
      g = light["goal"]
      best = ("none qualifies" if g["best_speedup"] is None else
              f"{g['best_speedup']:.2f}x at light_fraction {g['best_light_fraction']:g}")
      L += ["", f"Goal: >= {g['target_speedup']}x with same-seed cosine >= {g['min_cosine']} "
            f"and FD within {g['fd_tolerance']:.0%} of heavy-only (paper 2: 2.15x). Best "
            f"qualifying speedup: {best}: **{'met' if g['met'] else 'not met'}**.", ""]
    L += [f"![coarse-to-fine trade-off]({os.path.relpath(plots['c2f'], out_dir)})", ""]
  if "seam" in r:
    sm = r["seam"]
    L += ["## Seam fine-tuning of the light model", "",
          f"{sm['steps']} steps (lr {sm['learning_rate']:g}, EMA {sm['ema_decay']:g}) from the "
          f"light model: flow-matching loss on t in [t_switch, t_switch + {sm['width']:g}] plus"
          f" {sm['weight']:g} x ||v_light - v_heavy||^2 at t_switch on seam points (training "
          "latents carried from t = 0 to t_switch by the heavy model), both guidance branches"
          " (lfm_jax/seam_train.py). The control fine-tunes with the flow-matching term "
          "alone (seam weight 0), the same steps.", "",
          "| light_fraction | t_switch | model | FD | class agr. | same-seed cosine | "
          "same-seed SSIM | same-seed PSNR |", "|---|---|---|---|---|---|---|---|"]
    for row in sm["rows"]:
      for kind, label in (("before", "before"), ("fm_only", "FM-only control"),
                          ("seam", "seam fine-tuned")):
        if kind not in row:
          continue
        e = row[kind]
        L.append(f"| {row['light_fraction']:g} | {row['t_switch']:.2f} | {label} | "
                 f"{_f(e['fd'], 2)} | {_pct(e['class_agreement'])} | "
                 f"{_f(e['same_seed']['cosine'])} | {_f(e['same_seed']['ssim'])} | "
                 f"{_f(e['same_seed']['psnr'], 2)} |")
    L.append("")
  if "guidance" in r:
    L += ["## Guidance interval", "",
          "Classifier-free guidance applied only for t in the interval (LFM's convention, "
          "t = 0 data; `sample.guidance_interval`, flow.guided_velocity), the full model "
          "(seed 0). Similarity is to the same scale without an interval.", "",
          "| guidance | interval | FD | precision | recall | class agr. | cosine to no "
          "interval | SSIM to no interval |", "|---|---|---|---|---|---|---|---|"]
    for e in r["guidance"]["rows"]:
      iv = "all t" if e["interval"] is None else f"[{e['interval'][0]:g}, {e['interval'][1]:g}]"
      ss = e.get("same_seed")
      L.append(f"| {e['guidance_scale']:g} | {iv} | {_f(e['fd'], 2)} | {_f(e['precision'])} | "
               f"{_f(e['recall'])} | {_pct(e['class_agreement'])} | "
               f"{_f(ss['cosine']) if ss else '—'} | {_f(ss['ssim']) if ss else '—'} |")
    L.append("")
  if "memory" in r:
    m = r["memory"]
    L += ["## Gradient scores in bounded memory", "",
          "Temp (scratch) memory of the compiled gradient-score step from XLA's memory "
          "analysis (lowered against abstract inputs: nothing is allocated or run), "
          f"measured by `{m['command']}`:", "",
          "| model | params | batch | per-example gradients held at once | temp GiB | "
          "temp MiB |", "|---|---|---|---|---|---|"]
    for e in m["records"]:
      L.append(f"| {e['model']} | {e['params']:,} | {e['batch_size']} | "
               f"{'whole batch' if e['chunk_size'] is None else e['chunk_size']} | "
               f"{e['temp_bytes'] / 2 ** 30:.2f} | {e['temp_bytes'] / 2 ** 20:.1f} |")
    L.append("")
  if "pairs" in plots:
    L += ["## Same-seed pairs", "",
          "Column i is sample i (same noise, same label) from each model:", "",
          f"![same-seed pairs]({os.path.relpath(plots['pairs'], out_dir)})", ""]
  tm = r["timing"]
  L += ["## Run time", "",
        f"Total {tm['total_wall_s']:.0f} s wall, {tm['total_cpu_s']:.0f} s CPU (load average "
        f"{tm['loadavg_start']} at the start); shared pieces (autoencoder, latents) "
        f"{tm['base']['wall_s']:.0f} s. Per model trained in this run (the first of an "
        "architecture compiles; the others load its programs from the compilation cache):", "",
        "| what | count | median wall s | median CPU s | first wall s |", "|---|---|---|---|---|"]
  for kind, e in tm["per_kind"].items():
    L.append(f"| {kind} | {e['n']} | {e['median_wall_s']:.1f} | {e['median_cpu_s']:.1f} | "
             f"{e['first_wall_s']:.1f} |")
  L.append("")
  path = os.path.join(out_dir, f"{STUDY_FILE}.md")
  with open(path, "w") as f:
    f.write("\n".join(L))
  with open(os.path.join(out_dir, "stability_readme.md"), "w") as f:
    f.write(readme_section(results, plots, out_dir))
  return path


# ----------------------------------------------------------------------------------- plots

def write_plots(s: Study, results: dict, docs_dir: str) -> dict:
  import _plots as P  # pylint: disable=g-import-not-at-top
  os.makedirs(docs_dir, exist_ok=True)
  paths = {}
  if "subsets" in results:
    summary = results["subsets"]["summary"]
    full = [e for e in summary if e["method"] == "full"][0]
    methods = [m for m in s.plan.methods]
    panels = []
    for metric, title, ylabel in (("fd", "Frechet distance vs pruning ratio", "FD"),
                                  ("class_agreement", "Class agreement", "agreement"),
                                  ("cosine", "Same-seed cosine to the full model", "cosine")):
      series = []
      for m in methods:
        es = sorted([e for e in summary if e["method"] == m], key=lambda e: e["ratio"])
        if metric == "cosine":
          xs, ys = [e["ratio"] for e in es], [e["same_seed"]["cosine"] for e in es]
        else:
          xs = [0.0] + [e["ratio"] for e in es]
          ys = [full[metric]] + [e[metric] for e in es]
        series.append(P.Series(m, xs, [y[0] if y else None for y in ys],
                               yerr=[y[1] if y else None for y in ys]))
      if metric == "cosine":
        es = [e for e in summary if e["method"] != "full"]
        shuffled = float(np.mean([e["shuffled"]["cosine"][0] for e in es])) if es else None
        panels.append(P.Panel(title, "pruning ratio (fraction removed)", ylabel, series,
                              hline=shuffled, hline_label="shuffled pairs"))
      else:
        panels.append(P.Panel(title, "pruning ratio (fraction removed)", ylabel, series))
    paths["ratio"] = os.path.join(docs_dir, "stability_quality_vs_ratio.png")
    P.save_panels(paths["ratio"], panels, panel_size=(400, 300))
  if "c2f" in results:
    c = results["c2f"]
    series_fd, series_cos = [], []
    for light in c["lights"]:
      pts = light["sweep"] + [light["light_only"]]
      ann = [f"{e['light_fraction']:g}" for e in pts]
      label = f"{light['light_variant']} -> full"
      series_fd.append(P.Series(label, [e["speedup"] for e in pts], [e["fd"] for e in pts],
                                annotations=ann))
      series_cos.append(P.Series(label, [e["speedup"] for e in pts],
                                 [e["same_seed"]["cosine"] for e in pts], annotations=ann))
    if "seam" in results:
      rows = results["seam"]["rows"]
      sp = [r.get("speedup") for r in rows]
      if rows and all(v is not None for v in sp):
        a2 = [f"{r['light_fraction']:g}" for r in rows]
        label = f"{s.plan.light} + seam"
        series_fd.append(P.Series(label, sp, [r["seam"]["fd"] for r in rows], annotations=a2,
                                  dashed=True))
        series_cos.append(P.Series(label, sp, [r["seam"]["same_seed"]["cosine"] for r in rows],
                                   annotations=a2, dashed=True))
    fd_h = c["heavy_only"]["fd"]
    panels = [P.Panel("FD vs speedup (labels: light_fraction)",
                      "wall-time speedup over heavy-only", "FD", series_fd, hline=fd_h * 1.1,
                      hline_label="heavy-only FD + 10%", vline=2.5, vline_label="2.5x"),
              P.Panel("Same-seed cosine to heavy-only vs speedup",
                      "wall-time speedup over heavy-only", "cosine", series_cos, hline=0.9,
                      hline_label="0.9", vline=2.5, vline_label="2.5x")]
    paths["c2f"] = os.path.join(docs_dir, "stability_coarse_to_fine.png")
    P.save_panels(paths["c2f"], panels, panel_size=(460, 330))
  rows = []
  n = min(10, s.plan.num_samples)
  if s.evaluation("full_s0") is not None:
    rows.append(("full (seed 0)", s.evaluation("full_s0")["images"][:n]))
    for key, label in pair_rows(s):
      if s.evaluation(key) is not None:
        rows.append((label, s.evaluation(key)["images"][:n]))
  if len(rows) > 1:
    paths["pairs"] = os.path.join(docs_dir, "stability_same_seed_pairs.png")
    P.save_image_rows(paths["pairs"], rows, scale=2 if s.latent_shape[0] >= 4 else 4)
  return paths


def pair_rows(s: Study) -> list[tuple[str, str]]:
  """(evaluation key, label) of the rows of the same-seed pairs figure."""
  p = s.plan
  out = []
  if len(p.seeds) > 1:
    out.append((f"full_s{p.seeds[1]}", f"full (seed {p.seeds[1]})"))
  for method in p.methods:
    r = max(p.ratios)
    out.append((f"{method}_r{_tag(r)}_s0", f"{method} {r:.0%} pruned"))
  for v in p.capacity:
    out.append((f"{v}_s0", f"{v} U-Net"))
  for name in p.c2f_lights:  # the two largest light fractions of each sweep
    for lf in sorted(p.fractions)[-2:]:
      out.append((f"c2f_{name}_lf{_tag(lf)}", f"c2f {name} {lf:g}"))
  if p.seam_fractions:
    lf = max(p.seam_fractions)
    out.append((f"c2f_seam_{p.light}_lf{_tag(lf)}", f"c2f {p.light} {lf:g} + seam"))
  return out


# ----------------------------------------------------------------------------------- main

def estimate(s: Study, t_start: float, c_start: float) -> dict:
  """Trains and evaluates one full model, then extrapolates the whole plan's time."""
  m = s.model_eval("full_s0", "full", 0)["metrics"]
  p = s.plan
  train = s.trained[-1] if s.trained else None
  ev = s.evaluated[-1] if s.evaluated else None
  if train is None or ev is None:
    _say("full_s0 was already trained and evaluated in this workdir: use a fresh --workdir "
         "to measure")
    return {}
  # Model-equivalents of the full architecture: a smaller U-Net is taken as 0.6 of a full
  # model's training time (they are overhead-bound at these sizes, not FLOP-bound), a seam
  # fine-tuning step of the light model as 0.6 of a full step.
  n_subset = len(p.methods) * len(p.ratios) * len(p.seeds)
  n_capacity = len(set(p.capacity) | {p.scoring_variant, p.light, *p.c2f_lights}) * len(
      p.capacity_seeds)
  n_seam = 2 * len(p.seam_fractions) * p.seam_steps / p.steps
  models = len(p.seeds) + n_subset + 0.6 * n_capacity + 0.6 * n_seam
  evals = (len(p.seeds) + n_subset + len(p.capacity) * len(p.capacity_seeds)
           + len(p.c2f_lights) * len(p.fractions) + 2 * len(p.seam_fractions)
           + len(p.guidance_scales) * len(p.guidance_intervals))
  cores = max(1, min(os.cpu_count() or 1, s.num_devices))
  per_model = {"train_wall_s": train["wall_s"], "train_cpu_s": train["cpu_s"],
               "eval_wall_s": ev["wall_s"], "eval_cpu_s": ev["cpu_s"]}
  wall = models * train["wall_s"] + evals * ev["wall_s"]
  cpu = models * train["cpu_s"] + evals * ev["cpu_s"]
  out = {"per_model": per_model, "model_equivalents": models, "evaluations": evals,
         "base_wall_s": s.base_seconds["wall_s"], "estimate_wall_s": wall,
         "estimate_idle_wall_s_from_cpu": cpu / cores, "loadavg": C.loadavg(),
         "elapsed_wall_s": time.time() - t_start, "elapsed_cpu_s": time.process_time() - c_start}
  out["full_s0"] = {k: m[k] for k in ("fd", "precision", "recall", "class_agreement")}
  out["warning"] = undertrained_warning(m)
  _say(f"full_s0: FD {m['fd']:.2f}, precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
       f"class agreement {m['class_agreement']:.3f}")
  _say(f"one model: train {train['wall_s']:.1f} s wall / {train['cpu_s']:.1f} s CPU "
       f"({p.steps} steps), evaluation {ev['wall_s']:.1f} s wall / {ev['cpu_s']:.1f} s CPU "
       f"({p.num_samples} samples)")
  _say(f"the plan: ~{models:.0f} model-equivalents and {evals} evaluations -> "
       f"{wall / 60:.0f} min at this load, ~{cpu / cores / 60:.0f} min on {cores} idle cores "
       f"(CPU time / cores), plus the shared pieces ({s.base_seconds['wall_s']:.0f} s here), "
       "the coarse-to-fine timing and the memory compile")
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, 2 criteria (plumbing)")
  p.add_argument("--estimate", action="store_true",
                 help="train and evaluate one full model and extrapolate the plan's time")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated subset of {','.join(SECTIONS)}")
  p.add_argument("--workdir", default=None,
                 help="where models, scores and evaluations are kept (default runs/stability_study"
                      ", runs/stability_study_quick with --quick)")
  p.add_argument("--out", default=None,
                 help="report directory (default study/; --quick: <workdir>/study)")
  p.add_argument("--docs", default=None,
                 help="plot directory (default docs/; --quick: <workdir>/docs)")
  p.add_argument("--data-dir", default=None, help="tfds data dir (config.data.data_dir)")
  p.add_argument("--autoencoder", default=None,
                 help="a trained autoencoder to use instead of training one "
                      "(config.autoencoder.pretrained: diffusers dir or LDM/SD checkpoint)")
  p.add_argument("--classifier", default=None,
                 help="a trained digits classifier .npz to evaluate with instead of training one")
  p.add_argument("--devices", type=int, default=None,
                 help="devices of the mesh models train and sample on (default: all)")
  p.add_argument("--inception-weights", default=None,
                 help="pytorch-fid Inception weights: FID + Inception Score instead of the "
                      "digits classifier's features")
  p.add_argument("--compile-cache", default=None,
                 help="XLA persistent compilation cache dir (default <workdir>/xla_cache; "
                      "'none' disables)")
  p.add_argument("--steps", type=int, default=None, help="training steps per model")
  p.add_argument("--num-samples", type=int, default=None, help="evaluation samples per model")
  p.add_argument("--seeds", default=None, help="training seeds, e.g. 0,1,2")
  p.add_argument("--methods", default=None, help=f"subset methods from {','.join(METHODS)}")
  p.add_argument("--light", default=None, choices=sorted(VARIANTS),
                 help="the light model of the seam section (also swept in the c2f section)")
  p.add_argument("--timing-iters", type=int, default=None)
  return p.parse_args(argv)


def make_plan(args) -> Plan:
  plan = quick_plan() if args.quick else Plan()
  if args.steps:
    plan.steps = args.steps
  if args.num_samples:
    plan.num_samples = args.num_samples
  if args.seeds:
    plan.seeds = tuple(int(v) for v in args.seeds.split(","))
    plan.capacity_seeds = tuple(v for v in plan.capacity_seeds if v in plan.seeds) or plan.seeds[:1]
  if args.methods:
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
      raise SystemExit(f"error: --methods: unknown {bad[0]!r}; known: {', '.join(METHODS)}")
    plan.methods = tuple(args.methods.split(","))
  if args.light:
    plan.light = args.light
    plan.c2f_lights = (args.light,) + tuple(v for v in plan.c2f_lights if v != args.light)
  if args.timing_iters:
    plan.timing_iters = args.timing_iters
  if 0 not in plan.seeds:
    raise SystemExit("error: --seeds must include 0 (the capacity, coarse-to-fine and guidance "
                     "sections use seed 0)")
  return plan


@contextlib.contextmanager
def compilation_cache(path: Optional[str]):
  """XLA's persistent compilation cache in `path` for the block (None: left as it is).

  Models of one architecture lower to the same programs (a subset changes only the data), so
  every model after the first of its kind loads its compiled train step from here, in this run
  and in reruns. The caller's cache settings are restored afterwards.
  """
  if not path:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import (  # pylint: disable=g-import-not-at-top
      compilation_cache as cc)
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cc.reset_cache()
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()


def main(argv=None) -> dict:
  """Runs the study (see the module docstring); returns the results (and "paths")."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  sections = [x for x in args.sections.split(",") if x]
  bad = [x for x in sections if x not in SECTIONS]
  if bad:
    raise SystemExit(f"error: --sections: unknown {bad[0]!r}; known: {', '.join(SECTIONS)}")
  plan = make_plan(args)
  root = args.workdir or os.path.join(
      REPO, "runs", "stability_study_quick" if args.quick else "stability_study")
  check_workdir(root, plan, args)
  cache_dir = args.compile_cache or os.path.join(root, "xla_cache")
  import jax  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    if args.quick:
      # The non-partitionable threefry form compiles a network's init ~3x faster on CPU (other
      # random draws, the same distributions); scoped, so the caller's setting stays.
      stack.enter_context(jax.threefry_partitionable(False))
    stack.enter_context(compilation_cache(None if cache_dir == "none" else cache_dir))
    return run_study(args, argv, plan, sections, root)


def run_study(args, argv: Sequence[str], plan: Plan, sections: Sequence[str],
              root: str) -> dict:
  from lfm_jax.metrics import features  # pylint: disable=g-import-not-at-top
  # The committed report comes from the full run; --quick writes beside its workdir.
  base = root if args.quick else REPO
  out_dir = args.out or os.path.join(base, "study")
  docs_dir = args.docs or os.path.join(base, "docs")
  t_start, c_start = time.time(), time.process_time()
  load_start = C.loadavg()
  warnings = [w for w in [load_warning("at the start")] if w]
  s = Study(plan, root, data_dir=args.data_dir, inception_weights=args.inception_weights,
            autoencoder=args.autoencoder, classifier=args.classifier, devices=args.devices)
  s.prepare()
  if args.estimate:
    return estimate(s, t_start, c_start)
  results: dict[str, Any] = {
      "command": ("python benchmarks/stability_study.py " + " ".join(argv)).rstrip(),
      "plan": dataclasses.asdict(plan), "environment": C.environment(),
      "shared": {"num_train": int(len(s.ids)), "image_size": int(s.config.data.image_size),
                 "latent_shape": list(s.latent_shape), "scale_factor": s.scale,
                 "extractor": s.extractor.name,
                 "fd_name": features.metric_name("fd", s.extractor.name),
                 "reference_count": int(len(s.reference.features)), "real_fd": s.real_fd,
                 "guidance_scale": float(s.config.sample.guidance_scale)}}
  if "subsets" in sections:
    results["subsets"] = section_subsets(s)
  if "capacity" in sections:
    results["capacity"] = section_capacity(s)
  if "c2f" in sections:
    results["c2f"] = section_c2f(s)
    if results["c2f"]["timing"].get("warning"):
      warnings.append(results["c2f"]["timing"]["warning"])
  if "seam" in sections:
    results["seam"] = section_seam(s, results.get("c2f"))
  if "guidance" in sections:
    results["guidance"] = section_guidance(s)
  if "memory" in sections:
    results["memory"] = section_memory(s)
  full = s._evals.get("full_s0")  # pylint: disable=protected-access  (evaluated by a section)
  if full and (w := undertrained_warning(full["metrics"])):
    warnings.append(w)
  results["warnings"] = warnings
  results["timing"] = {
      "base": s.base_seconds, "models_trained": len(s.trained), "trained": s.trained,
      "evaluations": len(s.evaluated), "evaluated": s.evaluated,
      "per_kind": per_kind_timing(s, plan),
      "total_wall_s": time.time() - t_start, "total_cpu_s": time.process_time() - c_start,
      "loadavg_start": load_start}
  plots = write_plots(s, results, docs_dir)
  results["plots"] = {k: os.path.relpath(v, REPO) if v.startswith(REPO) else v
                      for k, v in plots.items()}
  md = write_report(results, out_dir, docs_dir, plots)
  json_path = os.path.join(out_dir, f"{STUDY_FILE}.json")
  with open(json_path, "w") as f:
    json.dump(_finite(results), f, indent=1, default=_json_value)
  _say(f"wrote {md}, {json_path} and {', '.join(plots.values())} "
       f"({time.time() - t_start:.0f} s)")
  results["paths"] = {"md": md, "json": json_path, **plots}
  return results


if __name__ == "__main__":
  main()
