"""Generation: velocity functions with guidance, and sharded, batched sampling from fixed seeds.

Randomness of a sample is a function of (seed, sample index) only: sample i starts from
noise_i = N(0, I) drawn with `fold_in(PRNGKey(seed), i)`, its label is given per index, and an
adaptive solver (Dopri5, Tsit5) controls each sample's step size on its own (the solve is
vmapped over samples, as LFM reports NFE averaged over single-sample solves). So a sample set is
the same for any batch size, device count and host count, up to float rounding.

`generate(model, autoencoder, num, ...)` runs the solve and the decoder in global batches over
every device of the mesh (each host computes the same loop; results come back to every host) and
returns a `Generated` record. With `keep_images=False` the images are only streamed to
`on_batch(images, start)` (e.g. feature statistics for FID) and never held all at once.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import flow
from lfm_jax import parallel
from lfm_jax import precision
from lfm_jax import sampling


class SolverError(RuntimeError):
  """An adaptive solve ran out of steps; the message names the solver settings."""


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """How to integrate (a config.sample-like section; hashable, so compiled solves are reused).

  guidance_interval: None, or (t_lo, t_hi) in LFM's convention: guidance only for t in the band.
  """
  solver: str = "euler"
  num_steps: Optional[int] = 50
  rtol: float = 1e-5
  atol: float = 1e-5
  max_steps: int = 4096
  guidance_scale: float = 1.0
  guidance_interval: Optional[tuple[float, float]] = None
  light_fraction: float = 0.7
  compute_dtype: str = "float32"
  decode_dtype: str = "float32"

  @classmethod
  def from_config(cls, config, **overrides) -> "SamplerSettings":
    """From config.sample (+ config.coarse_to_fine.light_fraction); None overrides are ignored."""
    s = config.sample
    interval = tuple(float(v) for v in s.guidance_interval) if s.guidance_interval else None
    kw = dict(solver=s.solver, num_steps=s.num_steps, rtol=float(s.rtol), atol=float(s.atol),
              max_steps=int(s.max_steps), guidance_scale=float(s.guidance_scale),
              guidance_interval=interval,
              light_fraction=float(config.coarse_to_fine.light_fraction),
              compute_dtype=s.compute_dtype, decode_dtype=config.autoencoder.compute_dtype)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if sampling.is_adaptive(kw["solver"]):
      kw["num_steps"] = None
    return cls(**kw)

  def describe(self) -> str:
    if sampling.is_adaptive(self.solver):
      return (f"sample.solver={self.solver} (rtol={self.rtol:g}, atol={self.atol:g}, "
              f"sample.max_steps={self.max_steps})")
    return f"sample.solver={self.solver} ({self.num_steps} steps)"


@dataclasses.dataclass(frozen=True)
class GuidedVelocity:
  """The sampler's velocity `(t, z, (params, labels, cond)) -> v` of a network, with
  classifier-free guidance for class-conditional models. A frozen dataclass: equal settings give
  an equal (hashable) function, so jitted solves are reused across calls."""
  module: Any
  num_classes: int
  guidance_scale: float = 1.0
  guidance_interval: Optional[tuple[float, float]] = None

  def __call__(self, t, z, args):
    params, labels, cond = args
    tb = jnp.broadcast_to(jnp.asarray(t, z.dtype), (z.shape[0],))

    def apply(tt, zz, yy):
      c = None if cond is None else jnp.concatenate([cond] * (zz.shape[0] // cond.shape[0]))
      return self.module.apply({"params": params}, zz, tt, yy, cond=c)

    if labels is None or not self.num_classes:
      return apply(tb, z, None)
    kw = {}
    if self.guidance_interval is not None:
      kw["interval"] = self.guidance_interval
    return flow.guided_velocity(apply, tb, z, labels, self.guidance_scale,
                                null_label=self.num_classes, **kw)


def noise_for(seed: jax.Array, indices: jax.Array, latent_shape: Sequence[int]) -> jax.Array:
  """(B, *latent_shape) standard normal noise; row r is drawn from fold_in(PRNGKey(seed), indices[r])."""
  key = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(latent_shape)))(
      indices)


def cycle_labels(num: int, num_classes: int) -> Optional[np.ndarray]:
  """Label i % num_classes for sample i (None for unconditional models)."""
  return (np.arange(num) % num_classes).astype(np.int32) if num_classes else None


def grid_labels(num: int, num_classes: int) -> Optional[np.ndarray]:
  """Class-major labels (a grid of `ceil(num / classes)` columns shows one class per row)."""
  if not num_classes:
    return None
  per = -(-num // num_classes)
  return np.repeat(np.arange(num_classes, dtype=np.int32), per)[:num]


@dataclasses.dataclass
class Generated:
  """What `generate` returns (host numpy arrays, the same on every host).

  images: (N, H, W, C) float32 in [-1, 1] (None with keep_images=False or without decoder);
  latents: (N, h, w, c) divided by the scale factor (the autoencoder's input); labels: (N,) or
  None; nfe: velocity evaluations per sample, averaged; nfe_light / nfe_heavy for coarse-to-fine;
  sec_per_image (with the decoder) and sec_per_image_without_decoder, from the batches after the
  first (compilation) when there are several.
  """
  images: Optional[np.ndarray]
  latents: Optional[np.ndarray]
  labels: Optional[np.ndarray]
  nfe: float
  sec_per_image: float
  sec_per_image_without_decoder: float
  nfe_light: Optional[float] = None
  nfe_heavy: Optional[float] = None

  def metrics(self) -> dict[str, float]:
    out = {"nfe": self.nfe, "sec_per_image": self.sec_per_image,
           "sec_per_image_without_decoder": self.sec_per_image_without_decoder}
    if self.nfe_light is not None:
      out.update(nfe_light=self.nfe_light, nfe_heavy=self.nfe_heavy)
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
  heavy: GuidedVelocity
  light: Optional[GuidedVelocity]
  settings: SamplerSettings
  latent_shape: tuple
  scale_factor: float


def _solve_batch(plan: _Plan, heavy_params, light_params, seed, indices, labels, cond):
  """z(0) / scale, nfe_light, nfe_heavy, failed for one global batch (traced)."""
  s = plan.settings
  noise = noise_for(seed, indices, plan.latent_shape)
  kw = dict(solver=s.solver, rtol=s.rtol, atol=s.atol, max_steps=s.max_steps)

  def run(z, y, c):
    if plan.light is None:
      z, nfe, failed = sampling.solve(plan.heavy, z, (heavy_params, y, c),
                                      num_steps=s.num_steps, **kw)
      return z, jnp.zeros_like(nfe), nfe, failed
    t_switch, n_light, n_heavy = sampling.coarse_to_fine_plan(s.solver, s.num_steps,
                                                              s.light_fraction)
    return sampling.solve_coarse_to_fine(
        plan.light, plan.heavy, z, (light_params, y, c), (heavy_params, y, c),
        t_switch=t_switch, n_light=n_light, n_heavy=n_heavy, **kw)

  if sampling.is_adaptive(s.solver):
    def one(z, y, c):
      y1 = None if y is None else y[None]
      c1 = None if c is None else c[None]
      z, nl, nh, f = run(z[None], y1, c1)
      return z[0], nl, nh, f
    z, nfe_l, nfe_h, failed = jax.vmap(one)(noise, labels, cond)
  else:
    z, nfe_l, nfe_h, failed = run(noise, labels, cond)
    b = noise.shape[0]
    nfe_l, nfe_h, failed = (jnp.broadcast_to(x, (b,)) for x in (nfe_l, nfe_h, failed))
  return z / plan.scale_factor, nfe_l, nfe_h, failed


@functools.lru_cache(maxsize=32)
def _compiled_solver(plan: _Plan, mesh) -> Callable:
  batch = parallel.data_sharded(mesh)
  return jax.jit(functools.partial(_solve_batch, plan), out_shardings=(batch, batch, batch, batch),
                 compiler_options=parallel.inference_compiler_options())


@functools.lru_cache(maxsize=8)
def _compiled_decoder(module, mesh) -> Callable:
  return jax.jit(lambda p, z: jnp.clip(module.apply({"params": p}, z, method=module.decode),
                                       -1.0, 1.0), out_shardings=parallel.data_sharded(mesh),
                 compiler_options=parallel.inference_compiler_options())


def generate(model, autoencoder, num: int, *, settings: SamplerSettings, seed: int,
             batch_size: int, labels: Optional[np.ndarray] = None, light=None,
             cond: Optional[np.ndarray] = None, start_index: int = 0,
             mesh: Optional[jax.sharding.Mesh] = None, keep_images: bool = True,
             keep_latents: bool = True,
             on_batch: Optional[Callable[[jax.Array, int, int], None]] = None,
             progress: Optional[Callable[[str], None]] = None) -> Generated:
  """Samples `num` images (indices start_index .. start_index + num - 1) from fixed seeds.

  Args:
    model: an artifacts.FlowModel (module, params, latent_shape, scale_factor, num_classes).
    autoencoder: an artifacts.Autoencoder to decode with, or None (latents only).
    settings: solver, steps, tolerances, guidance (SamplerSettings.from_config).
    seed: the sample set's seed.
    batch_size: samples per global batch (rounded up to a multiple of the device count; the
      padding rows are computed and dropped).
    labels: (num,) int labels (default: cycle_labels); ignored by unconditional models.
    light: a light FlowModel for coarse-to-fine (settings.light_fraction of the trajectory).
    cond: (num, h, w, Cc) conditioning channels (inpainting, semantic maps), or None.
    keep_images / keep_latents: hold the outputs in the result (False: stream only).
    on_batch(images, start, n): called per batch with the global (sharded) image array whose
      first n rows are samples start .. start + n - 1 (the rest is padding).
    progress: a message sink for per-batch progress lines.
  Raises:
    SolverError when an adaptive solve runs out of steps.
  """
  mesh = mesh or parallel.create_mesh()
  parallel.sync("generate")
  ndev = parallel.num_batch_shards(mesh)
  bs = -(-max(int(batch_size), 1) // ndev) * ndev
  rep, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
  num_classes = int(model.num_classes)
  if num_classes and labels is None:
    labels = cycle_labels(num, num_classes)
  if not num_classes:
    labels = None
  dtype = precision.dtype_from_name(settings.compute_dtype, "sample.compute_dtype")
  heavy = GuidedVelocity(precision.with_dtype(model.module, dtype), num_classes,
                         float(settings.guidance_scale), settings.guidance_interval)
  light_v = None
  if light is not None:
    light_v = GuidedVelocity(precision.with_dtype(light.module, dtype), num_classes,
                             float(settings.guidance_scale), settings.guidance_interval)
  plan = _Plan(heavy, light_v, settings, tuple(model.latent_shape), float(model.scale_factor))
  solve = _compiled_solver(plan, mesh)
  heavy_params = jax.device_put(model.params, parallel.state_sharding(model.params, mesh))
  light_params = None if light is None else jax.device_put(
      light.params, parallel.state_sharding(light.params, mesh))
  decode = ae_params = None
  if autoencoder is not None:
    decode = _compiled_decoder(precision.with_dtype(autoencoder.module, precision.dtype_from_name(
        settings.decode_dtype, "autoencoder.compute_dtype")), mesh)
    ae_params = jax.device_put(autoencoder.params, rep)
  seed_arr = jnp.asarray(seed, jnp.uint32)
  images, lats, nfe_l, nfe_h = [], [], [], []
  t_sample = t_decode = 0.0
  timed = 0
  for start in range(0, num, bs):
    n = min(bs, num - start)
    idx = np.arange(start_index + start, start_index + start + bs, dtype=np.int32)
    y = c = None
    if labels is not None:
      y = np.zeros((bs,), np.int32)
      y[:n] = labels[start:start + n]
      y = parallel.global_from_full(y, batch_sharding)
    if cond is not None:
      cb = np.zeros((bs,) + cond.shape[1:], np.float32)
      cb[:n] = cond[start:start + n]
      c = parallel.global_from_full(cb, batch_sharding)
    t0 = time.perf_counter()
    z, bl, bh, failed = solve(heavy_params, light_params, seed_arr,
                              parallel.global_from_full(idx, batch_sharding), y, c)
    z.block_until_ready()
    t1 = time.perf_counter()
    x = None
    if decode is not None:
      x = decode(ae_params, z)
      x.block_until_ready()
    t2 = time.perf_counter()
    if start > 0 or num <= bs:
      t_sample += t1 - t0
      t_decode += t2 - t1
      timed += n
    failed = parallel.to_host(failed)[:n]
    if failed.any():
      raise SolverError(f"{int(failed.sum())} of samples {start_index + start}.."
                        f"{start_index + start + n - 1} did not reach t = 0: {settings.describe()}"
                        " ran out of steps; raise sample.max_steps or loosen the tolerances")
    nfe_l.append(parallel.to_host(bl)[:n])
    nfe_h.append(parallel.to_host(bh)[:n])
    if on_batch is not None and x is not None:
      on_batch(x, start_index + start, n)
    if keep_images and x is not None:
      images.append(parallel.to_host(x)[:n])
    if keep_latents:
      lats.append(parallel.to_host(z)[:n])
    if progress is not None:
      progress(f"{start + n}/{num} samples")
  nfe_l, nfe_h = np.concatenate(nfe_l), np.concatenate(nfe_h)
  timed = max(timed, 1)
  return Generated(
      images=np.concatenate(images) if images else None,
      latents=np.concatenate(lats) if lats else None,
      labels=labels, nfe=float(np.mean(nfe_l + nfe_h)),
      sec_per_image=(t_sample + t_decode) / timed,
      sec_per_image_without_decoder=t_sample / timed,
      nfe_light=float(np.mean(nfe_l)) if light is not None else None,
      nfe_heavy=float(np.mean(nfe_h)) if light is not None else None)
