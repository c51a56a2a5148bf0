"""Sampling benchmark: NFE and wall time per batch of lfm_jax.sampling.sample (diffrax).

Solvers: Euler and Heun at the given step counts, Dopri5 at the given tolerances (rtol = atol),
each without and with the VAE decoder (lfm_jax AutoencoderKL built from configs/default.py's
autoencoder section: the embedded default's small KL autoencoder, 4× downsampling).

Velocity network: the embedded default's U-Net (configs/default.py model section, made
unconditional) on the default's latent shape (4×4×4) unless --model/--latent-size say
otherwise, with random weights (kernels ~ N(0, 1/fan_in), output layers included; see
benchmarks/_common.py make_velocity: velocity = analytic Gaussian-data flow + network). Timing
does not depend on the weights for the fixed-step solvers; Dopri5's NFE does (a trained model's
count will differ).

One JSON line per (solver, setting, decoder): nfe, ms_per_batch (median of --iters after
warm-up), ms_per_nfe, images_per_s, first_call_s (compile + one run) and compile_s (XLA backend
compile seconds logged by jax during that first call), decode_ms (the decoder alone).

Run:  python benchmarks/sampling.py
      python benchmarks/sampling.py --batch-size 100 --euler-steps 10,50 --dopri5-tol 1e-3,1e-5
      python benchmarks/sampling.py --quick
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.pre_jax_setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lfm_jax import models  # noqa: E402
from lfm_jax import sampling  # noqa: E402
from lfm_jax.models.autoencoder import AutoencoderKL  # noqa: E402


def _floats(s):
  return [float(v) for v in str(s).split(",") if v.strip()]


def _ints(s):
  return [int(v) for v in str(s).split(",") if v.strip()]


def load_default_config():
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("lfm_default_config",
                                                os.path.join(root, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--euler-steps", default="10,50")
  p.add_argument("--heun-steps", default="5,25")
  p.add_argument("--dopri5-tol", default="1e-3,1e-5")
  p.add_argument("--no-decoder", action="store_true", help="skip the with-decoder runs")
  p.add_argument("--model-channels", type=int, default=0, help="U-Net width (0: the default's)")
  args = p.parse_args(argv)
  C.post_jax_setup(args)
  if args.quick:
    args.iters, args.warmup = min(args.iters, 2), 1
    args.batch_size = min(args.batch_size, 8)
    defaults = {a.dest: a.default for a in p._actions}  # pylint: disable=protected-access
    for key, value in (("euler_steps", "4"), ("heun_steps", "2"), ("dopri5_tol", "1e-2")):
      if getattr(args, key) == defaults[key]:
        setattr(args, key, value)

  counter = C.CompileCounter.install()
  config = load_default_config()
  config.model.num_classes = 0
  if args.model_channels:
    config.model.model_channels = args.model_channels
  if args.quick:
    config.model.model_channels = 8
    config.model.channel_mult = (1,)
    config.model.mid_attention = False
    config.model.norm_num_groups = 4
    config.autoencoder.block_out_channels = (8,)
    config.autoencoder.norm_num_groups = 4
  ae = AutoencoderKL.from_config(config.autoencoder, in_channels=int(config.data.channels))
  f = ae.downsample_factor
  size = int(config.data.image_size)
  latent_shape = (size // f, size // f, int(config.autoencoder.latent_channels))
  model = models.create_model(config.model, latent_shape)
  params = C.init_model_params(model, latent_shape, seed=0)
  ae_params = C.random_params(
      lambda r: ae.init(r, jnp.zeros((1, size, size, int(config.data.channels))))["params"], 1)
  velocity = C.make_velocity(model)
  noise = jax.random.normal(jax.random.PRNGKey(3), (args.batch_size,) + latent_shape)

  decode = jax.jit(lambda pa, z: ae.apply({"params": pa}, z, method=ae.decode))
  before = len(counter.records)
  t0 = time.perf_counter()
  C.block(decode(ae_params, noise))
  dec_first = time.perf_counter() - t0
  dec_compile = sum(s for _, s in counter.records[before:])
  dec = C.time_calls(lambda: decode(ae_params, noise), iters=args.iters, warmup=args.warmup)
  env = C.environment()
  C.emit({"kind": "decode", "batch_size": args.batch_size, "latent_shape": list(latent_shape),
          "image_size": size, "ms_per_batch": round(dec["ms"], 3), "cpu_ms": round(dec["cpu_ms"], 3),
          "first_call_s": round(dec_first, 3), "compile_s": round(dec_compile, 3),
          "iters": dec["iters"], "loadavg": dec["loadavg"], **env})

  settings = ([("euler", n, None) for n in _ints(args.euler_steps)]
              + [("heun", n, None) for n in _ints(args.heun_steps)]
              + [("dopri5", None, tol) for tol in _floats(args.dopri5_tol)])
  for solver, steps, tol in settings:
    kw = dict(solver=solver, num_steps=steps, args=params)
    if tol is not None:
      kw.update(rtol=tol, atol=tol)

    def run(kw=kw):
      return sampling.sample(velocity, noise, **kw)

    def run_dec(kw=kw):
      z, info = sampling.sample(velocity, noise, **kw)
      return decode(ae_params, z), info

    for with_decoder in ([False] if args.no_decoder else [False, True]):
      fn = run_dec if with_decoder else run
      rec_before = len(counter.records)
      t0 = time.perf_counter()
      out, info = C.block(fn())
      first = time.perf_counter() - t0
      compile_s = sum(s for _, s in counter.records[rec_before:])
      t = C.time_calls(lambda fn=fn: fn()[0], iters=args.iters, warmup=args.warmup)
      nfe = int(info["nfe"])
      C.emit({
          "kind": "sampling", "solver": solver, "num_steps": steps, "tol": tol,
          "decoder": with_decoder, "batch_size": args.batch_size,
          "latent_shape": list(latent_shape), "nfe": nfe, "failed": bool(info["failed"]),
          "ms_per_batch": round(t["ms"], 3), "ms_per_batch_min": round(t["ms_min"], 3),
          "cpu_ms_per_batch": round(t["cpu_ms"], 3),
          "ms_per_nfe": round((t["ms"] - (dec["ms"] if with_decoder else 0.0)) / max(nfe, 1), 4),
          "images_per_s": round(args.batch_size / (t["ms"] * 1e-3), 2),
          "first_call_s": round(first, 3), "compile_s": round(compile_s, 3),
          "finite": bool(np.isfinite(np.asarray(out)).all()),
          "iters": t["iters"], "loadavg": t["loadavg"], **env})


if __name__ == "__main__":
  main()
