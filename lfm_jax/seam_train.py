"""Seam fine-tuning of a light model at the coarse-to-fine switch, as a training routine.

The objective is lfm_jax/seam.py's `seam_finetune_loss`: the light model's flow-matching loss on
t ~ U[t_switch, t_switch + width] (its side of the switch) plus weight * ||v_light - v_heavy||^2 at
t_switch, on the points the heavy model's ODE carries data latents to (LFM's convention: t = 0
data, t = 1 noise; the light model runs t in (t_switch, 1], t_switch = 1 - light_fraction).

Both branches of classifier-free guidance are matched: the label of each seam point is dropped
to the null label with probability config.flow.class_dropout_prob, and the target is the heavy
velocity for the label the light model sees, so the guided combination matches at any scale.

The heavy side is computed once, before training (`seam_targets`): every training example's
posterior mean (times the scale factor) is integrated from t = 0 to t_switch with the heavy
model's conditional velocity (seam.seam_points), and the heavy velocities there for its label
and for the null label are stored. Batches then carry an example's seam point and both targets
(`SeamBatches`), so a step runs no heavy network and costs about one light-model train step.
`finetune` runs the steps on lfm_jax/trainer.py's `fit` (checkpoints, resume, logging).
"""

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import artifacts
from lfm_jax import flow
from lfm_jax import optim
from lfm_jax import parallel
from lfm_jax import seam
from lfm_jax import train
from lfm_jax import trainer
from lfm_jax import workdir as workdir_lib

TARGET_KEYS = ("z_switch", "v_cond", "v_null")


def _check_t_switch(t_switch: float) -> float:
  if not 0.0 < float(t_switch) < 1.0:
    raise ValueError(f"seam fine-tuning: t_switch must lie in (0, 1) (1 - light_fraction), "
                     f"got {t_switch}")
  return float(t_switch)


@dataclasses.dataclass(frozen=True)
class _HeavyField:
  """fn(t (B,), z, y, params) -> v of a velocity network; equal for equal networks, so the
  compiled solves are reused."""
  module: Any

  def __call__(self, t, z, y, params):
    return self.module.apply({"params": params}, z, t, y)


@functools.lru_cache(maxsize=16)
def _switch_velocities(field: _HeavyField, num_classes: int):
  """jit of (params, z, y, t) -> (v for y, v for the null label) at time t (one compile per
  network and shape)."""

  def velocities(params, zs, y, t_switch):
    t = jnp.full((zs.shape[0],), t_switch, zs.dtype)
    v_cond = field(t, zs, y, params)
    if not num_classes:
      return v_cond, v_cond
    return v_cond, field(t, zs, jnp.full_like(y, num_classes), params)

  return jax.jit(velocities)


def seam_targets(heavy: artifacts.FlowModel, latents: np.ndarray, labels: Optional[np.ndarray],
                 t_switch: float, *, num_steps: int, batch_size: int = 256,
                 solver: str = "euler") -> dict[str, np.ndarray]:
  """Seam points of data latents and the heavy velocities there.

  Args:
    heavy: the frozen heavy FlowModel.
    latents: (N, h, w, c) float32 data latents, already multiplied by the scale factor.
    labels: (N,) int labels (class-conditional heavy model) or None.
    t_switch: the switch time in (0, 1).
    num_steps: steps of the fixed-step solver from t = 0 to t_switch.
    batch_size: examples per solve (the last batch is padded).
  Returns:
    {"z_switch", "v_cond", "v_null"}: (N, h, w, c) float32 each; v_cond is the heavy velocity
    at (t_switch, z_switch) for the example's label, v_null for the null label (equal to v_cond
    for unconditional models).
  """
  t_switch = _check_t_switch(t_switch)
  z = np.asarray(latents, np.float32)
  n = z.shape[0]
  num_classes = int(heavy.num_classes)
  field = _HeavyField(heavy.module)
  velocities = _switch_velocities(field, num_classes)
  out = {k: np.zeros_like(z) for k in TARGET_KEYS}
  bs = max(1, min(int(batch_size), n))
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    zb = np.zeros((bs,) + z.shape[1:], np.float32)
    zb[:stop - start] = z[start:stop]
    yb = None
    if num_classes:
      yb = np.zeros((bs,), np.int32)
      yb[:stop - start] = np.asarray(labels, np.int32)[start:stop]
      yb = jnp.asarray(yb)
    zs, _ = seam.seam_points(field, jnp.asarray(zb), t_switch, num_steps=int(num_steps),
                             labels=yb, args=heavy.params, solver=solver)
    v_cond, v_null = velocities(heavy.params, zs, yb, jnp.float32(t_switch))
    for key, value in zip(TARGET_KEYS, (zs, v_cond, v_null)):
      out[key][start:stop] = np.asarray(value)[:stop - start]
  return out


class SeamBatches:
  """A latent iterator's batches with each example's seam targets added.

  latent_iterator: a latents.LatentIterator made with with_ids=True (its "id" key is used to look
  the targets up and is dropped). targets: {"z_switch", "v_cond", "v_null"} rows aligned with
  `ids`. state() / restore() are the latent iterator's (exact resume).
  """

  def __init__(self, latent_iterator, ids: np.ndarray, targets: Mapping[str, np.ndarray]):
    self._it = latent_iterator
    ids = np.asarray(ids, np.int64)
    self._order = np.argsort(ids, kind="stable")
    self._sorted_ids = ids[self._order]
    self._targets = {k: np.asarray(targets[k], np.float32) for k in TARGET_KEYS}
    self.latent_shape = getattr(latent_iterator, "latent_shape", None)
    self.num_examples = getattr(latent_iterator, "num_examples", None)

  def state(self) -> dict:
    return self._it.state()

  def restore(self, state: Mapping[str, int]) -> "SeamBatches":
    self._it.restore(state)
    return self

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._it))
    if "id" not in batch:
      raise ValueError("SeamBatches needs a latent iterator made with with_ids=True")
    ids = np.asarray(batch.pop("id"), np.int64)
    pos = np.searchsorted(self._sorted_ids, ids)
    pos = np.minimum(pos, len(self._sorted_ids) - 1)
    if not np.array_equal(self._sorted_ids[pos], ids):
      raise ValueError("SeamBatches: a batch holds examples without seam targets")
    rows = self._order[pos]
    for k in TARGET_KEYS:
      batch[k] = self._targets[k][rows]
    batch.pop("flipped", None)
    return batch


def make_seam_step(module, config: Any, tx, schedule, *, t_switch: float, width: float = 0.1,
                   weight: float = 0.1, scale_factor: float = 1.0):
  """The pure step `(state, batch) -> (state, metrics)` of seam fine-tuning (not jitted).

  batch: {"mean", "logvar" (or "latent"), "label", "z_switch", "v_cond", "v_null"} (SeamBatches).
  Metrics: loss, fm_loss, seam_loss, grad_norm, learning_rate, finite.
  """
  t_switch = _check_t_switch(t_switch)
  num_classes = int(config.model.num_classes)
  fcfg, tcfg = config.flow, config.train
  dropout = float(fcfg.class_dropout_prob) if num_classes else 0.0
  sigma_min = float(fcfg.sigma_min)
  ema_decay, ema_warmup = float(tcfg.ema_decay), bool(tcfg.ema_warmup)
  sample_posterior = bool(config.autoencoder.sample_posterior)

  def loss_fn(params, z0, labels, batch, rng):
    rng_fm, rng_drop, rng_dropout = jax.random.split(rng, 3)

    def light_fn(t, z, y):
      return module.apply({"params": params}, z, t, y=y, train=True,
                          rngs={"dropout": rng_dropout}).astype(jnp.float32)

    seam_labels, target = labels, batch["v_cond"]
    if num_classes and dropout > 0.0:
      seam_labels = flow.drop_labels(rng_drop, labels, dropout, num_classes)
      dropped = (seam_labels == num_classes)[:, None, None, None]
      target = jnp.where(dropped, batch["v_null"], batch["v_cond"])
    loss, aux = seam.seam_finetune_loss(
        light_fn, lambda t, z, y: target, z0, batch["z_switch"], rng_fm, t_switch,
        labels=labels, switch_labels=seam_labels, width=width, weight=weight,
        sigma_min=sigma_min, class_dropout_prob=dropout,
        null_label=num_classes if num_classes else None)
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: trainer.TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    rng_latent, rng_loss = jax.random.split(rng)
    z0 = train.batch_latents(batch, rng_latent, scale_factor, sample_posterior)
    labels = batch["label"].astype(jnp.int32) if num_classes else None
    (loss, aux), grads = grad_fn(state.params, z0, labels, batch, rng_loss)
    decay = optim.ema_decay_at(state.step, ema_decay, ema_warmup)
    new_state, info = trainer.apply_gradients(state, loss, grads, tx, decay)
    return new_state, {"loss": loss, "fm_loss": aux["fm_loss"], "seam_loss": aux["seam_loss"],
                       "grad_norm": info["grad_norm"],
                       "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
                       "finite": info["finite"]}

  return step


def finetune(config: Any, workdir: Any, light: artifacts.FlowModel, data: Any, *,
             t_switch: float, width: float = 0.1, weight: float = 0.1,
             mesh: Optional[jax.sharding.Mesh] = None,
             stop_after: Optional[int] = None) -> artifacts.FlowModel:
  """Fine-tunes `light` near t_switch; checkpoints in <workdir>/checkpoints (resumes there).

  Args:
    config: a run config whose model section is the light model's; config.train sets the
      schedule (num_steps, learning_rate, ema_decay, log_every, checkpoint_every, ...), config.flow
      the label dropout and sigma_min.
    workdir: where checkpoints and metrics go (write config.json there with Workdir.prepare so
      artifacts.load_flow_model can read the result back).
    light: the light FlowModel to start from (its params; EMA starts equal to them).
    data: SeamBatches (or any iterator of such batches with state()/restore()).
    t_switch, width, weight: the switch time, the FM band above it and the seam weight.
  Returns:
    The fine-tuned light model (EMA params when config.train.ema_decay > 0, else the live ones).
  """
  t_switch = _check_t_switch(t_switch)
  wd = workdir_lib.Workdir.of(workdir)
  mesh = mesh or parallel.mesh_from_config(config)
  parallel.local_batch_size(int(config.train.batch_size), mesh)
  tx, schedule = optim.create_optimizer(config.train)

  def create(rng, params):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return trainer.new_state(params, tx, rng)

  meta = train.checkpoint_metadata(config, light.latent_shape, light.scale_factor)
  meta["seam"] = {"t_switch": t_switch, "width": float(width), "weight": float(weight),
                  "from": light.source}
  state = trainer.fit(
      name="seam", create=create, create_args=(jax.random.PRNGKey(int(config.seed)), light.params),
      step_fn=make_seam_step(light.module, config, tx, schedule, t_switch=t_switch, width=width,
                             weight=weight, scale_factor=light.scale_factor),
      train_iter=data, mesh=mesh, checkpoint_dir=wd.checkpoints, logdir=wd.root,
      settings=trainer.LoopSettings.from_config(config.train), metadata=meta,
      stop_after=stop_after)
  params = state.ema_params if float(config.train.ema_decay) > 0 else state.params
  return artifacts.FlowModel(light.module, params, tuple(light.latent_shape),
                             float(light.scale_factor), light.model_config, str(wd),
                             step=int(jax.device_get(state.step)))


__all__ = ("seam_targets", "SeamBatches", "make_seam_step", "finetune", "TARGET_KEYS")
