"""First-stage KL autoencoder training (config.autoencoder.train) on the shared trainer skeleton.

Loss (per batch of images x in [-1, 1], NHWC): recon + kl_weight * KL, where
  recon = mean |x - x_hat| ("l1") or mean (x - x_hat)^2 ("l2") over all pixels, x_hat decoded from
          a posterior sample z ~ q(z|x);
  KL    = mean over the batch of sum over latent elements of
          0.5 * (mean^2 + exp(logvar) - 1 - logvar)   (as LDM's DiagonalGaussianDistribution.kl).
The loop, checkpoints (<workdir>/autoencoder/checkpoints, resume + SIGTERM), writers
(<workdir>/autoencoder: TensorBoard + metrics.jsonl) and shardings are lfm_jax/trainer.py's. At
the end the params are exported as a diffusers directory (<workdir>/autoencoder/diffusers), so a
trained autoencoder loads through the same code path as pretrained weights
(lfm_jax.weights.load_autoencoder_kl).
"""

from typing import Any, Callable, Iterator, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lfm_jax import checkpoint as ckpt_lib
from lfm_jax import optim
from lfm_jax import parallel
from lfm_jax import trainer
from lfm_jax import workdir as workdir_lib
from lfm_jax import writers
from lfm_jax.trainer import TrainState


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
                          schedule: optax.Schedule, *,
                          shard_mean_mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """The pure step (state, {"image": x}) -> (state, metrics); see train.make_train_step.

  shard_mean_mesh: average the gradient over that mesh's batch shards in shard order
  (parallel.shard_mean, config.mesh.deterministic_reduction); None: XLA's all-reduce.
  """
  recon_loss, kl_weight = tcfg.recon_loss, float(tcfg.kl_weight)
  ema_decay = jnp.float32(float(tcfg.ema_decay))

  def grad_fn(params, rng, images):
    return jax.value_and_grad(
        lambda p: autoencoder_loss(module, p, images, rng, recon_loss=recon_loss,
                                   kl_weight=kl_weight), has_aux=True)(params)

  if shard_mean_mesh is not None:
    grad_fn = parallel.shard_mean(grad_fn, shard_mean_mesh)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = grad_fn(state.params, rng, batch["image"])
    new_state, info = trainer.apply_gradients(state, loss, grads, tx, ema_decay)
    metrics = {"loss": loss, "recon_loss": aux["recon"], "kl": aux["kl"],
               "grad_norm": info["grad_norm"],
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "finite": info["finite"]}
    return new_state, metrics

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


def _metadata(ae_cfg: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  section = {"autoencoder": ae_cfg.to_dict(), "image_shape": list(image_shape)}
  section["autoencoder"].pop("train", None)
  digest, plain = ckpt_lib.config_fingerprint(section)
  return {"config": plain, "fingerprint": digest}


def train_autoencoder(config: Any, workdir: Any,
                      data: Union[np.ndarray, Iterator[Mapping[str, np.ndarray]]], *,
                      eval_images: Optional[np.ndarray] = None,
                      module: Optional[nn.Module] = None,
                      mesh: Optional[jax.sharding.Mesh] = None,
                      stop_after: Optional[int] = None, export: bool = True,
                      print_fn: Callable[[str], None] = writers.say) -> tuple[nn.Module, Any]:
  """Trains the first-stage KL autoencoder; resumes from <workdir>/autoencoder/checkpoints.

  Args:
    config: reads config.seed, config.autoencoder (architecture, .train: num_steps, batch_size,
      the optimizer keys, recon_loss, kl_weight, ema_decay, log_every, checkpoint_every, ...)
      and config.data.channels.
    workdir: a path or Workdir; outputs go to <workdir>/autoencoder/.
    data: training images (N, H, W, C) float32 in [-1, 1] (every host passes all of them; each
      feeds its rows of every batch), or an iterator of host-local {"image": (b, H, W, C)}
      batches with state()/restore().
    eval_images: held-out images for the PSNR before/after report (default: the first 256).
    module: default AutoencoderKL.from_config(config.autoencoder, in_channels=data.channels).
    stop_after: save and return after this step.
    export: write <workdir>/autoencoder/diffusers at the end (process 0; the other hosts wait).
  Returns:
    (module, params): the EMA params when autoencoder.train.ema_decay > 0, else the live params
    (host numpy arrays, on every host).
  """
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir.of(workdir)
  ae_cfg, tcfg = config.autoencoder, config.autoencoder.train
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.local_batch_size(int(tcfg.batch_size), mesh)
  if isinstance(data, np.ndarray):
    if eval_images is None:
      eval_images = data[:256]
    data = input_pipeline.ArrayIterator({"image": np.asarray(data, np.float32)},
                                        batch_size=int(tcfg.batch_size), seed=int(config.seed))
  if module is None:
    from lfm_jax.models.autoencoder import AutoencoderKL  # pylint: disable=g-import-not-at-top
    module = AutoencoderKL.from_config(ae_cfg, in_channels=int(config.data.channels))

  state_before = data.state()
  image_shape = tuple(np.shape(next(data)["image"])[1:])
  data.restore(state_before)
  tx, schedule = optim.create_optimizer(tcfg)

  def create(rng):
    rng_init, rng_train = jax.random.split(rng)
    x = jnp.zeros((1,) + image_shape, jnp.float32)
    params = module.init(rng_init, x, None, sample_posterior=False)["params"]
    return trainer.new_state(params, tx, rng_train)

  rng = jax.random.PRNGKey(int(config.seed) + 1)
  psnr_before = None
  if eval_images is not None and wd.latest_step(wd.autoencoder_checkpoints) is None:
    params0 = jax.jit(create)(rng).params
    psnr_before = evaluate_psnr(module, params0, np.asarray(eval_images))
  state = trainer.fit(
      name="autoencoder", create=create, create_args=(rng,),
      step_fn=make_autoencoder_step(
          module, tcfg, tx, schedule,
          shard_mean_mesh=mesh if bool(config.mesh.deterministic_reduction) else None),
      train_iter=data, mesh=mesh,
      checkpoint_dir=wd.autoencoder_checkpoints, logdir=wd.autoencoder,
      settings=trainer.LoopSettings(num_steps=int(tcfg.num_steps),
                                    log_every=max(int(tcfg.log_every), 1),
                                    checkpoint_every=int(tcfg.checkpoint_every)),
      metadata=_metadata(ae_cfg, image_shape), stop_after=stop_after, print_fn=print_fn)

  use_ema = float(tcfg.ema_decay) > 0
  params = parallel.to_host(state.ema_params if use_ema else state.params)
  if eval_images is not None:
    psnr_after = evaluate_psnr(module, params, np.asarray(eval_images))
    writer = writers.create_metric_writer(wd.autoencoder, tensorboard=False)
    writer.write_scalars(int(state.step), {"eval_psnr": psnr_after})
    writer.close()
    before = "" if psnr_before is None else f"{psnr_before:.2f} dB before, "
    print_fn(f"autoencoder: held-out PSNR {before}{psnr_after:.2f} dB after "
             f"{int(state.step)} steps")
  if export and int(state.step) >= int(tcfg.num_steps):
    if jax.process_index() == 0:
      from lfm_jax import weights  # pylint: disable=g-import-not-at-top
      weights.export_autoencoder_kl(module, params, wd.autoencoder_export)
      print_fn(f"autoencoder: exported to {wd.autoencoder_export} (diffusers layout)")
    parallel.sync("autoencoder_export")
  return module, params
