"""The stages behind the command-line modes: which artifacts each reads and writes.

    autoencoder -> encode -> train -> sample / evaluate / score / stability / export

A stage finds what it needs in the workdir or makes it first, saying so in one line: `train` on
a fresh workdir trains (or loads) the autoencoder and encodes the latents; modes that need a
trained model (sample, evaluate, stability, export) say which command trains it. `run` validates
the config, starts jax.distributed when the platform asks for it, prepares the workdir and
dispatches; library errors a user can fix become one `UserError` line here, in one place.
"""

import time
from typing import Callable, Optional

import jax
import numpy as np

from lfm_jax import artifacts
from lfm_jax import config_validation
from lfm_jax import generate
from lfm_jax import latents as latents_lib
from lfm_jax import modes
from lfm_jax import parallel
from lfm_jax import precision
from lfm_jax import storage
from lfm_jax import tasks
from lfm_jax import workdir as workdir_lib
from lfm_jax.writers import say


class UserError(Exception):
  """A problem the user can fix; main prints the message on one line and exits non-zero."""


def _fixable_errors() -> tuple:
  from lfm_jax import checkpoint, input_pipeline, trainer  # pylint: disable=g-import-not-at-top
  from lfm_jax.metrics import features  # pylint: disable=g-import-not-at-top
  return (artifacts.ArtifactError, storage.StorageError, latents_lib.CacheError,
          generate.SolverError, checkpoint.CheckpointError, trainer.NonFiniteError,
          input_pipeline.DatasetNotAvailableError, input_pipeline.DataConfigError,
          features.FeatureExtractorUnavailable,
          config_validation.ConfigError, parallel.DistributedError)


def _one_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


class Session:
  """One command: the config, the workdir, the mesh, and the artifacts loaded so far."""

  def __init__(self, config, workdir):
    self.config = config
    self.wd = workdir_lib.Workdir.of(workdir)
    self.mesh = parallel.mesh_from_config(config)
    self._autoencoder: Optional[artifacts.Autoencoder] = None
    self._cache: Optional[latents_lib.LatentCache] = None

  # ------------------------------------------------------------------------- autoencoder
  def autoencoder(self, train_if_missing: bool = True) -> artifacts.Autoencoder:
    """config.autoencoder.pretrained, this workdir's trained one, or one trained now."""
    if self._autoencoder is None:
      cfg = self.config
      if cfg.autoencoder.pretrained:
        self._autoencoder = artifacts.load_autoencoder_file(cfg.autoencoder.pretrained)
        say(f"autoencoder: loaded pretrained weights from {cfg.autoencoder.pretrained}")
      elif artifacts.autoencoder_trained(cfg, self.wd):
        self._autoencoder = artifacts.load_autoencoder(cfg, self.wd)
        say(f"autoencoder: reusing the one trained in {self.wd.autoencoder_export}")
      elif not train_if_missing:
        self._autoencoder = artifacts.load_autoencoder(cfg, self.wd)  # raises, naming the command
      else:
        self._train_autoencoder()
        self._autoencoder = artifacts.load_autoencoder(cfg, self.wd)
    return self._autoencoder

  def _train_autoencoder(self) -> None:
    from lfm_jax import autoencoder_train, data, input_pipeline  # pylint: disable=g-import-not-at-top
    cfg, d = self.config, self.config.data
    data.prepare(d)
    n = input_pipeline.num_examples(d, d.train_split)
    say(f"autoencoder: training {cfg.autoencoder.train.num_steps} steps on {n} images of {d.name}"
        f" (block_out_channels={tuple(cfg.autoencoder.block_out_channels)})")
    eval_images = data.load_images(d, d.eval_split, max_examples=256, seed=cfg.seed)[0]
    if n * d.image_size ** 2 * d.channels * 4 < 2 ** 30:
      train_data = data.load_images(d, d.train_split, seed=cfg.seed)[0]
    else:
      train_data = input_pipeline.ResumableIterator(
          d, d.train_split, batch_size=int(cfg.autoencoder.train.batch_size), shuffle=True,
          seed=cfg.seed, repeat=True)
    autoencoder_train.train_autoencoder(cfg, self.wd, train_data, eval_images=eval_images,
                                        mesh=self.mesh)

  # ------------------------------------------------------------------------- latents
  def latents(self) -> latents_lib.LatentCache:
    """The latent cache of the training split, encoded now when missing or stale."""
    if self._cache is None:
      cfg = self.config
      ae = self.autoencoder()
      fp = latents_lib.fingerprint(cfg, ae.identity)
      if tasks.cache_fingerprint(cfg):  # the task's conditioning is cached too
        fp = {**fp, "task": tasks.cache_fingerprint(cfg)}
      cache = latents_lib.LatentCache.open(self.wd.latents)
      if cache is None or cache.manifest["fingerprint"] != latents_lib._normalize(fp):  # pylint: disable=protected-access
        say(f"encode: encoding {cfg.data.name} {cfg.data.train_split} with the autoencoder")
        _data().prepare(cfg.data)
      encode_fn = _local_encoder(ae, int(cfg.latents.encode_batch_size),
                                 precision.dtype_from_name(cfg.autoencoder.compute_dtype))
      self._cache, _ = latents_lib.build_cache(
          self.wd.latents, fp, ids=_data().split_ids(cfg.data, cfg.data.train_split),
          read_images=lambda ids: _data().read_ids(cfg.data, cfg.data.train_split, ids,
                                                   seed=cfg.seed),
          encode_fn=encode_fn,
          groups=int(cfg.latents.groups), chunk=int(cfg.latents.encode_batch_size),
          flipped=bool(cfg.data.random_flip), dtype=cfg.latents.dtype, seed=int(cfg.seed),
          log=say, **tasks.cache_extras(cfg, encode_fn, int(cfg.latents.encode_batch_size)))
    return self._cache

  @property
  def scale_factor(self) -> float:
    return float(self.config.autoencoder.scale_factor or self.latents().scale_factor)

  # ------------------------------------------------------------------------- flow models
  def flow_model(self, workdir=None) -> artifacts.FlowModel:
    wd = self.wd if workdir is None else workdir_lib.Workdir.of(workdir)
    if wd.latest_step() is None and wd.root == self.wd.root and self.config.model.init_from:
      say(f"model: sampling the imported checkpoint {self.config.model.init_from}")
      return artifacts.imported_flow_model(self.config, self.wd)
    return artifacts.load_flow_model(wd, use_ema=bool(self.config.sample.use_ema), mesh=self.mesh)

  def light_model(self) -> Optional[artifacts.FlowModel]:
    light = self.config.coarse_to_fine.light_workdir
    if not light:
      return None
    say(f"coarse-to-fine: light model from {light}, light_fraction "
        f"{self.config.coarse_to_fine.light_fraction:g}")
    return self.flow_model(light)

  def generate(self, model, num, *, seed, batch_size, **kw) -> generate.Generated:
    return generate.generate(model, kw.pop("autoencoder", self.autoencoder(False)), num,
                             settings=generate.SamplerSettings.from_config(self.config),
                             seed=seed, batch_size=batch_size, mesh=self.mesh, **kw)


def _data():
  from lfm_jax import data  # pylint: disable=g-import-not-at-top
  return data


def _local_encoder(ae: artifacts.Autoencoder, chunk: int, dtype) -> Callable:
  """encode_fn for the latent cache: chunks of `chunk` rows, one per local device per call."""
  mesh = parallel.local_mesh()
  per_call = chunk * mesh.devices.size
  sharding = parallel.data_sharded(mesh)
  params = jax.device_put(ae.params, parallel.replicated(mesh))
  module = precision.with_dtype(ae.module, dtype)
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode),
               out_shardings=(sharding, sharding))

  def encode(images):
    means, logvars = [], []
    for i in range(0, len(images), per_call):
      x = images[i:i + per_call]
      n = len(x)
      x = np.concatenate([x, np.zeros((per_call - n,) + x.shape[1:], x.dtype)])
      m, lv = fn(params, jax.device_put(x, sharding))
      means.append(np.asarray(m)[:n])
      logvars.append(np.asarray(lv)[:n])
    return np.concatenate(means), np.concatenate(logvars)

  return encode


# ----------------------------------------------------------------------------- the modes


def run_autoencoder(s: Session) -> dict:
  return {"autoencoder": s.autoencoder().source}


def run_encode(s: Session) -> dict:
  cache = s.latents()
  say(f"latents: {cache.num_examples} examples, shape {cache.latent_shape}, scale factor "
      f"{s.scale_factor:.4f}")
  return {"latents": storage.display(cache.directory)}


def _kept_ids(s: Session, cache: latents_lib.LatentCache) -> Optional[np.ndarray]:
  sub = s.config.data.subset
  if not sub.ratio:
    return None
  from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
  path = sub.scores or s.wd.scores_file(s.config.score.criterion)
  if not storage.exists(path):
    raise UserError(f"config.data.subset.scores: {path} not found (run --mode=score first)")
  kept = scoring.select_from_scores_file(path, rule=sub.rule, ratio=float(sub.ratio),
                                         seed=s.config.seed)
  ids = cache.read()["id"] if len(kept) else np.zeros(0, np.int64)
  missing = np.setdiff1d(kept, ids)
  if missing.size:
    raise UserError(f"config.data.subset.scores: {path}: {missing.size} kept ids are not in the "
                    "latent cache (scores of another data set?)")
  s.wd.save_npy(s.wd.kept_ids, kept)
  say(f"subset: keeping {kept.size} of {cache.num_examples} examples (rule {sub.rule}, "
      f"{float(sub.ratio):.0%} removed, scores {path})")
  return kept


def _grid_sampler(s: Session, module, latent_shape, scale) -> Callable:
  """The trainer's sample-grid callback: fixed seeds, one row per class, EMA params."""
  if tasks.is_conditional(s.config):
    return tasks.grid_sampler(s, module, latent_shape, scale)
  nc = int(s.config.model.num_classes)
  num = 10 * min(nc, 10) if nc else 64
  labels = np.repeat(np.arange(min(nc, 10), dtype=np.int32), 10) if nc else None
  ae = s.autoencoder(False)

  def sample_fn(params, step):
    model = artifacts.FlowModel(module, params, latent_shape, scale, s.config.model, f"step {step}")
    return s.generate(model, num, seed=s.config.seed + 7, batch_size=num, labels=labels,
                      autoencoder=ae).images

  return sample_fn


def run_train(s: Session) -> dict:
  from lfm_jax import train  # pylint: disable=g-import-not-at-top
  cfg = s.config
  done = s.wd.latest_step()
  if done is not None and done >= cfg.train.num_steps:
    say(f"train: reusing the finished model in {s.wd.checkpoints} (step {done})")
    return {"checkpoints": str(s.wd.checkpoints), "reused": True}
  cache = s.latents()
  it = tasks.training_iterator(s, cache, kept_ids=_kept_ids(s, cache))
  init_params = None
  module = artifacts.build_velocity_network(cfg.model, cache.latent_shape,
                                            precision.dtype_from_name(cfg.train.compute_dtype))
  if cfg.model.init_from and done is None:
    init_params = artifacts.import_velocity(cfg.model)[1]
    say(f"train: fine-tuning from {cfg.model.init_from}")
  say(f"train: {cfg.train.num_steps} steps of {cfg.model.name} on "
      f"{it.num_examples or cache.num_examples} latents {cache.latent_shape}"
      + (f", resuming at step {done}" if done else ""))
  sample_fn = None
  if cfg.train.sample_every:
    sample_fn = _grid_sampler(s, module, cache.latent_shape, s.scale_factor)
  train.train_and_evaluate(cfg, s.wd, it, model=module, mesh=s.mesh, scale_factor=s.scale_factor,
                           sample_fn=sample_fn, initial_params=init_params)
  return {"checkpoints": str(s.wd.checkpoints), "reused": False}


def _tag(cfg, light) -> str:
  tag = f"{cfg.sample.solver}_g{cfg.sample.guidance_scale:g}"
  return tag + (f"_c2f{cfg.coarse_to_fine.light_fraction:g}" if light is not None else "")


def run_sample(s: Session) -> dict:
  cfg = s.config
  if tasks.is_conditional(cfg):  # inpainting / semantic: conditions, grid, pasting in tasks.py
    return tasks.run_sample(s)
  model, light = s.flow_model(), s.light_model()
  num = int(cfg.sample.num_samples)
  labels = generate.grid_labels(num, model.num_classes)
  out = s.generate(model, num, seed=cfg.seed, batch_size=int(cfg.sample.batch_size),
                   labels=labels, light=light, progress=lambda m: say(f"sample: {m}"))
  grid = s.wd.samples / f"samples_{_tag(cfg, light)}.png"
  s.wd.save_image_grid(grid, out.images, -(-num // model.num_classes) if model.num_classes else None)
  s.wd.write_npz(grid.with_suffix(".npz"), images=out.images, latents=out.latents,
                 labels=labels if labels is not None else np.zeros((0,), np.int32))
  record = {"stage": "sample", "solver": cfg.sample.solver,
            "guidance_scale": cfg.sample.guidance_scale, "num_samples": num, **out.metrics()}
  s.wd.append_metrics(record)
  say(f"sample: wrote {grid} ({num} samples, NFE {out.nfe:.0f})")
  return {"grid": str(grid), **record}


def _extractor(s: Session, name: str):
  from lfm_jax.metrics import features  # pylint: disable=g-import-not-at-top
  cfg = s.config
  if name == "inception":
    return features.get_feature_extractor(
        "inception", weights_path=cfg.eval.inception_weights,
        dtype=precision.dtype_from_name(cfg.eval.compute_dtype, "eval.compute_dtype"))
  if name == "autoencoder":
    ae = s.autoencoder(False)
    flat = lambda x: ae.encode(x)[0].reshape(x.shape[0], -1)
    dim = int(np.prod(s.latents().latent_shape))
    return features.CallableFeatureExtractor("autoencoder", dim, flat)
  shape = (cfg.data.image_size, cfg.data.image_size, cfg.data.channels)
  path = features.digits_classifier_cache_path(s.wd.eval, shape)
  if storage.exists(path):
    say(f"evaluate: reusing the digits classifier {path}")
    return features.get_feature_extractor("digits_classifier", path=path)
  images, labels, _ = _data().load_images(cfg.data, cfg.data.train_split, seed=cfg.seed)
  say(f"evaluate: training the offline digits classifier on {len(images)} images")
  return features.get_feature_extractor("digits_classifier", path=path, train_images=images,
                                        train_labels=labels,
                                        num_classes=max(cfg.data.num_classes, 1))


def run_evaluate(s: Session) -> dict:
  from lfm_jax.metrics import evaluate as ev, features  # pylint: disable=g-import-not-at-top
  cfg, names = s.config, tuple(s.config.eval.metrics)
  model, light = s.flow_model(), s.light_model()
  try:
    extractor = _extractor(s, cfg.eval.feature_extractor)
  except features.FeatureExtractorUnavailable as e:
    say(f"evaluate: {_one_line(e)} -- skipping feature metrics")
    extractor = None
  num = int(cfg.eval.num_samples)
  collector = None if extractor is None else ev.FeatureCollector(extractor, ev.needs_logits(names))
  on_batch = None if collector is None else (lambda x, start, n: collector.add(x, n))
  if tasks.is_conditional(cfg):  # the eval split's examples, inpainted / from their maps
    num, out = tasks.generate_for_evaluation(
        s, model, num, seed=cfg.seed + 1, batch_size=int(cfg.eval.batch_size), light=light,
        on_batch=on_batch, progress=lambda m: say(f"evaluate: {m}"))
  else:
    out = s.generate(model, num, seed=cfg.seed + 1, batch_size=int(cfg.eval.batch_size),
                     light=light, keep_images=False, keep_latents=False, on_batch=on_batch,
                     progress=lambda m: say(f"evaluate: {m}"))
  record = {"stage": "evaluate", "num_samples": num, "solver": cfg.sample.solver,
            "num_steps": cfg.sample.num_steps, "guidance_scale": cfg.sample.guidance_scale,
            **out.metrics()}
  if collector is not None:
    reference = None
    if ev.needs_reference(names):
      reference = ev.reference_features(extractor, cfg.data, cfg.eval.reference_split, num,
                                        int(cfg.eval.batch_size), s.wd.eval, s.mesh,
                                        seed=cfg.seed, log=say)
      if cfg.eval.reference_stats:
        reference.given_mean_cov = ev.load_reference_stats(cfg.eval.reference_stats)
    mu, sigma = collector.stats.mean_cov()
    s.wd.write_npz(s.wd.eval / f"generated_{extractor.name}.npz", mu=mu, sigma=sigma)
    obs = ev.Observations(extractor.name, collector.features, collector.stats, reference,
                          labels=out.labels, logits=collector.logits, settings=cfg.eval)
    record.update(ev.compute_metrics(names, obs, note=say))
  s.wd.write_json(s.wd.eval / "metrics.json", record)
  s.wd.append_metrics(record)
  if jax.process_index() == 0:
    from lfm_jax import writers  # pylint: disable=g-import-not-at-top
    w = writers.create_metric_writer(s.wd.eval, jsonl_name=None)
    w.write_scalars(0, {k: v for k, v in record.items() if isinstance(v, (int, float))})
    w.close()
  say("evaluate: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in record.items() if k != "stage"))
  return record


def run_score(s: Session) -> dict:
  from lfm_jax import scoring  # pylint: disable=g-import-not-at-top
  cfg, sc = s.config, s.config.score
  cache = s.latents()
  arrays = cache.read()
  embeddings = velocity_fn = params = None
  if sc.criterion in ("cluster", "kcenter", "herding"):
    if sc.embedding == "file":
      z = storage.load_npz(sc.embedding_file)
      order = {int(i): r for r, i in enumerate(z["ids"])}
      missing = [int(i) for i in arrays["id"] if int(i) not in order]
      if missing:
        raise UserError(f"config.score.embedding_file: {len(missing)} example ids missing "
                        f"(e.g. {missing[0]})")
      embeddings = z["features"][[order[int(i)] for i in arrays["id"]]].astype(np.float32)
    elif sc.embedding == "inception":
      images, _, ids = _data().load_images(cfg.data, cfg.data.train_split, seed=cfg.seed)
      feats = _extractor(s, "inception").extract(images, batch_size=int(sc.batch_size))
      pos = {int(i): r for r, i in enumerate(ids)}
      embeddings = feats[[pos[int(i)] for i in arrays["id"]]]
    else:
      embeddings = arrays["mean"].reshape(len(arrays["mean"]), -1).astype(np.float32)
  if sc.criterion in ("loss", "gradient"):
    model = s.flow_model(sc.model_workdir or s.wd)
    velocity_fn, params = scoring.module_velocity_fn(model.module), model.params
    say(f"score: {sc.criterion} score with the model in {model.source}")
  labels = arrays["label"].astype(np.int32) if cfg.model.num_classes else None
  scores, clusters = scoring.compute_scores(
      sc.criterion, arrays["id"], embeddings=embeddings,
      latents=arrays["mean"].astype(np.float32) * s.scale_factor, labels=labels,
      velocity_fn=velocity_fn, params=params, num_clusters=int(sc.num_clusters),
      num_times=int(sc.num_times), num_noises=int(sc.num_noises), batch_size=int(sc.batch_size),
      seed=int(cfg.seed), gradient_chunk_size=int(sc.gradient_chunk_size))
  path = s.wd.scores_file(sc.criterion)
  if jax.process_index() == 0:
    scoring.save_scores(path, arrays["id"], scores, clusters, criterion=sc.criterion,
                        meta={"embedding": sc.embedding, "num_clusters": sc.num_clusters})
  say(f"score: wrote {path} ({len(arrays['id'])} examples, criterion {sc.criterion})")
  return {"scores": str(path)}


def run_stability(s: Session) -> dict:
  from lfm_jax.metrics import features, stability  # pylint: disable=g-import-not-at-top
  cfg, st = s.config, s.config.stability
  if not st.other_workdir:
    raise UserError("config.stability.other_workdir: the second model's workdir is required")
  a, b = s.flow_model(), s.flow_model(st.other_workdir)
  num = int(st.num_samples)
  gen = [s.generate(m, num, seed=cfg.seed + 2, batch_size=int(cfg.sample.batch_size))
         for m in (a, b)]
  embed = None
  if st.embedding:
    try:
      embed = _extractor(s, st.embedding)
    except features.FeatureExtractorUnavailable as e:
      say(f"stability: embedding {st.embedding} unavailable ({_one_line(e)}); using pixels")
  report = stability.stability_report(gen[0].images, gen[1].images, embed,
                                      latents_a=gen[0].latents, latents_b=gen[1].latents,
                                      seed=cfg.seed)
  png = s.wd.stability / "pairs.png"
  if jax.process_index() == 0:
    storage.makedirs(s.wd.stability)
    stability.save_pairs_png(png, gen[0].images, gen[1].images, n=min(16, num))
  record = {"stage": "stability", "other_workdir": st.other_workdir, **report}
  s.wd.write_json(s.wd.stability / "report.json", record)
  s.wd.append_metrics(record)
  say("stability: same-seed cosine {:.4f} vs shuffled {:.4f}; SSIM {:.4f} vs {:.4f}; pairs {}".format(
      report["same_seed/cosine"], report["shuffled/cosine"], report["same_seed/ssim"],
      report["shuffled/ssim"], png))
  return record


def run_export(s: Session) -> dict:
  out = artifacts.export_model(s.flow_model(), s.autoencoder(False), s.wd.export,
                               run_config=s.config)
  say(f"export: wrote {out} (lfm_jax.load({out!r}) reads it)")
  return {"export": out}


def run_pipeline(s: Session) -> dict:
  t0 = time.time()
  results = {}
  names = modes.MODES[1:4] + ("sample", "evaluate", "export")
  for i, name in enumerate(names, 1):
    t = time.time()
    say(f"stage {i}/{len(names)}: {name}")
    results[name] = MODES[name](s)
    say(f"stage {name} done in {time.time() - t:.1f} s (total {time.time() - t0:.1f} s)")
  return results


MODES: dict[str, Callable[[Session], dict]] = {
    "pipeline": run_pipeline, "autoencoder": run_autoencoder, "encode": run_encode,
    "train": run_train, "sample": run_sample, "evaluate": run_evaluate, "score": run_score,
    "stability": run_stability, "export": run_export,
}
assert tuple(MODES) == modes.MODES


def run(config, workdir) -> dict:
  """Validates the config, prepares the workdir and runs config.mode; UserError on bad input."""
  errors = _fixable_errors()
  try:
    config_validation.validate_config(config)
    parallel.maybe_initialize_distributed()
    config_validation.validate_for_devices(config, jax.device_count(), jax.process_count())
    session = Session(config, workdir)
    session.wd.prepare(config)
    say(f"mode {config.mode}, workdir {workdir}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
    return MODES[config.mode](session)
  except UserError:
    raise
  except errors as e:
    raise UserError(_one_line(e)) from e
