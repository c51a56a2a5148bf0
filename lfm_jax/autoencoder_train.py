"""First-stage KL autoencoder training (config.autoencoder.train), on the flow trainer's machinery.

Loss (per batch of images x in [-1, 1], NHWC): recon + kl_weight * KL, where
  recon = mean |x - x_hat| ("l1") or mean (x - x_hat)^2 ("l2") over all pixels, x_hat decoded from
          a posterior sample z ~ q(z|x);
  KL    = mean over the batch of sum over latent elements of
          0.5 * (mean^2 + exp(logvar) - 1 - logvar)   (as LDM's DiagonalGaussianDistribution.kl).
Same TrainState, sharded jitted step (batch on "data", state replicated and donated), orbax
checkpoints (<workdir>/autoencoder/checkpoints, resume + SIGTERM like the flow trainer) and clu
writers (<workdir>/autoencoder: TensorBoard + metrics.jsonl). At the end the params are exported as
a diffusers directory (<workdir>/autoencoder/diffusers) with lfm_jax.weights.export_autoencoder_kl,
so a trained autoencoder loads through the same code path as pretrained weights
(lfm_jax.weights.load_autoencoder_kl).
"""

import os
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
from clu import parameter_overview
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import parallel
from lfm_jax import train_utils
from lfm_jax.train import TrainState

AUTOENCODER_DIR = "autoencoder"


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over non-batch axes: (B, ...) -> (B,)."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)


def autoencoder_loss(module: nn.Module, params: Any, images: jax.Array, rng: jax.Array, *,
                     recon_loss: str = "l1", kl_weight: float = 1e-6
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, {"recon": ..., "kl": ...}) for images (B, H, W, C) in [-1, 1] (see module docstring)."""
  recon, mean, logvar = module.apply({"params": params}, images, rng)
  diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
  if recon_loss == "l1":
    rec = jnp.mean(jnp.abs(diff))
  elif recon_loss == "l2":
    rec = jnp.mean(jnp.square(diff))
  else:
    raise ValueError(f"autoencoder.train.recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
  kl = jnp.mean(kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
  return rec + kl_weight * kl, {"recon": rec, "kl": kl}


def make_autoencoder_step(module: nn.Module, tcfg: Any, tx: optax.GradientTransformation,
                          schedule: optax.Schedule) -> Callable:
  """The pure step (state, {"image": x}) -> (state, metrics); see train.make_train_step."""
  recon_loss = tcfg.get("recon_loss", "l1")
  kl_weight = float(tcfg.get("kl_weight", 1e-6))
  ema_decay = float(tcfg.get("ema_decay", 0.0) or 0.0)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: autoencoder_loss(module, p, batch["image"], rng, recon_loss=recon_loss,
                                   kl_weight=kl_weight), has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = train_utils.ema_update(state.ema_params, params, jnp.float32(ema_decay))
    params, ema_params, opt_state = train_utils.select_tree(
        finite, (params, ema_params, opt_state), (state.params, state.ema_params, state.opt_state))
    metrics = {"loss": loss, "recon_loss": aux["recon"], "kl": aux["kl"], "grad_norm": grad_norm,
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "finite": finite}
    return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                         opt_state=opt_state), metrics

  return step_fn


def reconstruct(module: nn.Module, params: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Deterministic reconstructions decode(mean(encode(x))) of (N, H, W, C) images, as numpy."""
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, None, sample_posterior=False)[0])
  out = [np.asarray(fn(params, jnp.asarray(images[i:i + batch_size])))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out, axis=0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
  mse = float(np.mean(np.square(np.clip(a, -1, 1).astype(np.float64) - b.astype(np.float64))))
  return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)


def evaluate_psnr(module: nn.Module, params: Any, images: np.ndarray, batch_size: int = 256) -> float:
  """Reconstruction PSNR (dB) of held-out images in [-1, 1]."""
  return psnr(reconstruct(module, params, images, batch_size), np.asarray(images))


def _as_image_dict(images: Any) -> dict[str, np.ndarray]:
  if isinstance(images, Mapping):
    if "image" not in images:
      raise KeyError(f"image arrays need an 'image' key, got {sorted(images)}")
    return {"image": np.asarray(images["image"], np.float32)}
  return {"image": np.asarray(images, np.float32)}


def train_autoencoder(
    config: Any,
    workdir: str,
    images: Optional[Any] = None,
    *,
    train_iter: Optional[Iterator[Mapping[str, np.ndarray]]] = None,
    eval_images: Optional[np.ndarray] = None,
    module: Optional[nn.Module] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    stop_after: Optional[int] = None,
    export: bool = True,
    print_fn: Callable[[str], None] = print,
) -> tuple[nn.Module, Any]:
  """Trains the first-stage KL autoencoder; resumes from <workdir>/autoencoder/checkpoints.

  Args:
    config: reads config.seed, config.autoencoder (architecture, .train: num_steps, batch_size,
      learning_rate, recon_loss, kl_weight, ema_decay, log_every, checkpoint_every; optional
      schedule keys as in config.train) and config.data.channels.
    workdir: outputs go to <workdir>/autoencoder/.
    images: training images (N, H, W, C) float32 in [-1, 1] (or {"image": ...}); or pass
    train_iter: an iterator of host-local {"image": (b, H, W, C)} batches with state()/restore().
    eval_images: held-out images for the PSNR before/after report (default: the first 256 images).
    module: default AutoencoderKL.from_config(config.autoencoder, in_channels=config.data.channels).
    stop_after: save and return after this step.
    export: write <workdir>/autoencoder/diffusers (diffusers layout) at the end, when the converter
      module is available.
  Returns:
    (module, params) — the EMA params when autoencoder.train.ema_decay > 0, else the live params
    (host numpy arrays).
  """
  ae_cfg = config.autoencoder
  tcfg = ae_cfg.train
  num_steps = int(tcfg.num_steps)
  batch_size = int(tcfg.batch_size)
  mesh = mesh or parallel.create_mesh()
  parallel.local_batch_size(batch_size, mesh)
  out_dir = os.path.join(workdir, AUTOENCODER_DIR)
  if (images is None) == (train_iter is None):
    raise ValueError("pass exactly one of `images` or `train_iter`")
  if train_iter is None:
    arrays = _as_image_dict(images)
    train_iter = train_utils.make_array_iterator(arrays, batch_size, int(config.seed))
    if eval_images is None:
      eval_images = arrays["image"][:256]
  if module is None:
    from lfm_jax.models.autoencoder import AutoencoderKL  # pylint: disable=g-import-not-at-top
    channels = int(config.data.channels) if "data" in config else None
    module = AutoencoderKL.from_config(ae_cfg, in_channels=channels)

  state_before = train_iter.state()
  image_shape = tuple(np.shape(next(train_iter)["image"])[1:])
  train_iter.restore(state_before)

  tx, schedule = train_utils.create_optimizer(tcfg)
  rng = jax.random.PRNGKey(int(config.seed) + 1)

  def init_fn(r):
    x = jnp.zeros((1,) + image_shape, jnp.float32)
    return module.init(r, x, None, sample_posterior=False)["params"]

  def create(r):
    rng_init, rng_train = jax.random.split(r)
    params = init_fn(rng_init)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(lambda p: p + jnp.zeros_like(p), params),
                      opt_state=tx.init(params), rng=rng_train)

  rep = parallel.replicated(mesh)
  section = {"autoencoder": ae_cfg.to_dict() if hasattr(ae_cfg, "to_dict") else dict(ae_cfg),
             "image_shape": list(image_shape)}
  section["autoencoder"].pop("train", None)
  digest, plain = ckpt_lib.config_fingerprint(section)
  meta = {"config": plain, "fingerprint": digest}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), max_to_keep=2)
  try:
    latest = checkpointer.latest_step()
    if latest is not None:
      abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                              jax.eval_shape(create, rng))
      state, input_state, _ = checkpointer.restore(abstract, latest, expected_meta=meta)
      if input_state:
        train_iter.restore(input_state)
      logging.info("Autoencoder: resumed from %s", checkpointer.step_path(latest))
    else:
      state = jax.jit(create, out_shardings=rep)(rng)
    if jax.process_index() == 0:
      parallel.print_shardings(state, title="Autoencoder state shardings", print_fn=print_fn,
                               batch_sharding=parallel.data_sharded(mesh))
    parameter_overview.log_parameter_overview(state.params)

    writer = train_utils.create_metric_writer(out_dir)
    psnr_before = None
    if eval_images is not None:
      psnr_before = evaluate_psnr(module, state.params, np.asarray(eval_images))
      writer.write_scalars(int(state.step), {"eval_psnr": psnr_before})
      logging.info("Autoencoder: held-out PSNR at step %d: %.2f dB", int(state.step), psnr_before)

    rep_data = parallel.data_sharded(mesh)
    step_fn = jax.jit(make_autoencoder_step(module, tcfg, tx, schedule),
                      in_shardings=(rep, rep_data), out_shardings=(rep, rep),
                      donate_argnames="state",
                      compiler_options=parallel.train_compiler_options())
    state = train_utils.run_loop(
        state=state, step_fn=step_fn, train_iter=train_iter, mesh=mesh,
        checkpointer=checkpointer, writer=writer, num_steps=num_steps, end_step=stop_after,
        log_every=int(tcfg.get("log_every", 100)),
        checkpoint_every=int(tcfg.get("checkpoint_every", 0) or 0), metadata=meta,
        name="autoencoder")
  finally:
    checkpointer.close()

  use_ema = float(tcfg.get("ema_decay", 0.0) or 0.0) > 0
  params = jax.tree.map(np.asarray, jax.device_get(state.ema_params if use_ema else state.params))
  if eval_images is not None:
    psnr_after = evaluate_psnr(module, params, np.asarray(eval_images))
    writer.write_scalars(int(state.step), {"eval_psnr": psnr_after})
    writer.flush()
    print_fn(f"Autoencoder held-out PSNR: {psnr_before:.2f} dB before, {psnr_after:.2f} dB after "
             f"{int(state.step)} steps")
  if export and jax.process_index() == 0 and int(state.step) >= num_steps:
    export_dir = export_for_loading(module, params, out_dir)
    if export_dir:
      print_fn(f"Autoencoder exported to {export_dir} (lfm_jax.weights.load_autoencoder_kl)")
  return module, params


def export_for_loading(module: nn.Module, params: Any, out_dir: str) -> Optional[str]:
  """Writes <out_dir>/diffusers with lfm_jax.weights.export_autoencoder_kl; None if unavailable
  (the converter is missing or `module` is not an AutoencoderKL)."""
  try:
    from lfm_jax import weights  # pylint: disable=g-import-not-at-top
    from lfm_jax.models.autoencoder import AutoencoderKL  # pylint: disable=g-import-not-at-top
    if not isinstance(module, AutoencoderKL):
      return None
    return weights.export_autoencoder_kl(module, params, os.path.join(out_dir, "diffusers"))
  except ImportError as e:
    logging.warning("Autoencoder not exported (%s); the orbax checkpoint is in %s", e, out_dir)
    return None
