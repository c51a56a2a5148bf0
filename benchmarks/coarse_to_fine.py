"""Coarse-to-fine benchmark: heavy-only vs light→heavy sampling at equal steps.

Heavy: ADM U-Net width 64 (channel_mult (1, 2, 2), 2 res blocks, attention at 8×8 + middle, as
BENCH-U); light: the same U-Net at width 32 (about a quarter of the FLOPs: every conv and dense
is ~4× cheaper; the script prints both models' forward FLOPs from their jaxprs). Latents
4×16×16, Euler 50 steps, light_fraction 0.7 (35 light steps from the noise end, 15 heavy).
Both runs start from the same noise (same seed).

Weights are random (benchmarks/_common.py make_velocity: analytic Gaussian-data flow + network
residual; all weights drawn on the host, kernels ~ N(0, 1/fan_in)), so `cosine` — the same-seed cosine
similarity of the final latents of heavy-only vs light→heavy, per sample, mean/min over the
batch — is a plumbing figure here: with trained checkpoints of the two models it measures what
the paper's stability claim is about.

One JSON line per run (heavy_only, coarse_to_fine: nfe_light, nfe_heavy, ms_per_batch median of
--iters, timed in alternation so that load changes hit both alike; compile_s) and one
"summary" line: speedup = heavy-only time / coarse-to-fine time (acceptance: >= 2; also from
CPU time), the ideal speedup from the two models' FLOPs and NFEs, flops ratio, cosine.

Run:  python benchmarks/coarse_to_fine.py
      python benchmarks/coarse_to_fine.py --steps 50 --light-fraction 0.7 --batch-size 16
      python benchmarks/coarse_to_fine.py --quick
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

from lfm_jax import sampling  # noqa: E402
from lfm_jax.models.dit import DiT, dit_config  # noqa: E402
from lfm_jax.models.unet import UNet  # noqa: E402


def build_unet(width: int, quick: bool) -> UNet:
  if quick:
    return UNet(model_channels=width, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), mid_attention=False, norm_num_groups=4)
  return UNet(model_channels=width, channel_mult=(1, 2, 2), num_res_blocks=2,
              attention_resolutions=(8,), attention_semantics="resolution", num_heads=4,
              norm_num_groups=32)


def build_dit(preset: str, quick: bool) -> DiT:
  """A DiT preset such as "S/2" (heavy) or "S/4" (light: the same blocks on 4x fewer tokens)."""
  if quick:
    return DiT(hidden_size=32, depth=2, num_heads=2, patch_size=int(preset.split("/")[1]))
  return DiT(**dit_config(preset))


def describe(model) -> str:
  """A short name of a velocity network: "UNet(width 64)", "DiT(384x12, patch 2)"."""
  model = getattr(model, "inner", model)
  if isinstance(model, DiT):
    return f"DiT({model.hidden_size}x{model.depth}, patch {model.patch_size})"
  return f"{type(model).__name__}(width {getattr(model, 'model_channels', '?')})"


def forward_flops(model, params, shape, batch) -> float:
  x = jnp.zeros((batch,) + tuple(shape), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, t)
  return C.jaxpr_matmul_flops(jaxpr)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--light-fraction", type=float, default=0.7)
  p.add_argument("--solver", default="euler")
  p.add_argument("--family", choices=("unet", "dit"), default="unet",
                 help="random-weight models: U-Nets of two widths, or two DiT presets")
  p.add_argument("--heavy-width", type=int, default=64, help="U-Net model_channels (heavy)")
  p.add_argument("--light-width", type=int, default=32, help="U-Net model_channels (light)")
  p.add_argument("--heavy-dit", default="S/2", help="DiT preset of the heavy model")
  p.add_argument("--light-dit", default="S/4",
                 help="DiT preset of the light model (S/4: S/2's blocks on 4x fewer tokens)")
  p.add_argument("--latent-size", type=int, default=16)
  p.add_argument("--heavy-workdir", default=None,
                 help="use the trained model of this lfm_jax workdir as the heavy model")
  p.add_argument("--light-workdir", default=None,
                 help="... and this one's as the light model (both or neither)")
  p.add_argument("--guidance-scale", type=float, default=1.0,
                 help="CFG scale for class-conditional trained models (--*-workdir)")
  args = p.parse_args(argv)
  if (args.heavy_workdir is None) != (args.light_workdir is None):
    p.error("--heavy-workdir and --light-workdir go together")
  C.post_jax_setup(args)
  if args.quick:
    args.iters, args.warmup = min(args.iters, 2), 1
    args.batch_size, args.steps, args.latent_size = min(args.batch_size, 4), 10, 4
    args.heavy_width, args.light_width = 16, 8

  counter = C.CompileCounter.install()
  if args.heavy_workdir:  # trained models: same-seed similarity means something
    from lfm_jax import artifacts, generate  # pylint: disable=g-import-not-at-top
    hm = artifacts.load_flow_model(args.heavy_workdir)
    lm = artifacts.load_flow_model(args.light_workdir)
    shape = hm.latent_shape
    labels = (jnp.arange(args.batch_size, dtype=jnp.int32) % hm.num_classes
              if hm.num_classes else None)
    heavy, light = hm.module, lm.module
    heavy_v = generate.GuidedVelocity(heavy, hm.num_classes, args.guidance_scale)
    light_v = generate.GuidedVelocity(light, lm.num_classes, args.guidance_scale)
    heavy_params, light_params = (hm.params, labels, None), (lm.params, labels, None)
    fl_heavy = forward_flops(heavy, hm.params, shape, args.batch_size)
    fl_light = forward_flops(light, lm.params, shape, args.batch_size)
  else:  # random weights: timing only
    shape = (args.latent_size, args.latent_size, 4)
    if args.family == "dit":
      heavy, light = build_dit(args.heavy_dit, args.quick), build_dit(args.light_dit, args.quick)
    else:
      heavy = build_unet(args.heavy_width, args.quick)
      light = build_unet(args.light_width, args.quick)
    heavy_params = C.init_model_params(heavy, shape, seed=0)
    light_params = C.init_model_params(light, shape, seed=1)
    heavy_v, light_v = C.make_velocity(heavy), C.make_velocity(light)
    fl_heavy = forward_flops(heavy, heavy_params, shape, args.batch_size)
    fl_light = forward_flops(light, light_params, shape, args.batch_size)
  noise = jax.random.normal(jax.random.PRNGKey(42), (args.batch_size,) + shape)
  env = C.environment()

  def heavy_only():
    return sampling.sample(heavy_v, noise, solver=args.solver, num_steps=args.steps,
                           args=heavy_params)

  def c2f():
    return sampling.sample_coarse_to_fine(
        light_v, heavy_v, noise, light_fraction=args.light_fraction, solver=args.solver,
        num_steps=args.steps, light_args=light_params, heavy_args=heavy_params)

  runs = {"heavy_only": heavy_only, "coarse_to_fine": c2f}
  results = {}
  for name, fn in runs.items():  # compile (and one run) each, apart from the timing
    before = len(counter.records)
    t0 = time.perf_counter()
    z, info = C.block(fn())
    results[name] = dict(
        z=np.asarray(z), first=time.perf_counter() - t0,
        compile_s=sum(s for _, s in counter.records[before:]),
        nfe_light=int(info.get("nfe_light", 0)),
        nfe_heavy=int(info["nfe_heavy"]) if "nfe_heavy" in info else int(info["nfe"]))
  # Timed in alternation (heavy, c2f, heavy, ...) so that load changes hit both alike.
  stats = C.time_interleaved({k: (lambda fn=fn: fn()[0]) for k, fn in runs.items()},
                             iters=args.iters, warmup=args.warmup)
  for name in runs:
    r, t = results[name], stats[name]
    r["ms"], r["cpu_ms"] = t["ms"], t["cpu_ms"]
    C.emit({"kind": "coarse_to_fine_run", "run": name, "solver": args.solver,
            "num_steps": args.steps,
            "light_fraction": args.light_fraction if name == "coarse_to_fine" else 0.0,
            "batch_size": args.batch_size, "latent_shape": list(shape),
            "nfe_light": r["nfe_light"], "nfe_heavy": r["nfe_heavy"],
            "ms_per_batch": round(t["ms"], 3), "ms_per_batch_min": round(t["ms_min"], 3),
            "cpu_ms_per_batch": round(t["cpu_ms"], 3), "first_call_s": round(r["first"], 3),
            "compile_s": round(r["compile_s"], 3), "iters": t["iters"], "loadavg": t["loadavg"],
            **env})

  za = results["heavy_only"]["z"].reshape(args.batch_size, -1).astype(np.float64)
  zb = results["coarse_to_fine"]["z"].reshape(args.batch_size, -1).astype(np.float64)
  cos = (za * zb).sum(1) / (np.linalg.norm(za, axis=1) * np.linalg.norm(zb, axis=1) + 1e-12)
  speedup = results["heavy_only"]["ms"] / results["coarse_to_fine"]["ms"]
  n_l, n_h = results["coarse_to_fine"]["nfe_light"], results["coarse_to_fine"]["nfe_heavy"]
  ideal = (n_l + n_h) * fl_heavy / (n_l * fl_light + n_h * fl_heavy)
  C.emit({"kind": "coarse_to_fine_summary", "solver": args.solver, "num_steps": args.steps,
          "light_fraction": args.light_fraction, "family": args.family,
          "heavy": describe(heavy), "light": describe(light), "forward_flops_heavy": fl_heavy,
          "forward_flops_light": fl_light, "flops_ratio_light_over_heavy": fl_light / fl_heavy,
          "nfe_light": n_l, "nfe_heavy": n_h,
          "speedup": round(speedup, 3),
          "speedup_cpu_time": round(results["heavy_only"]["cpu_ms"]
                                    / max(results["coarse_to_fine"]["cpu_ms"], 1e-9), 3),
          "speedup_ideal_from_flops": round(ideal, 3),
          "acceptance_speedup_ge_2": bool(speedup >= 2.0),
          "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
          "trained_models": bool(args.heavy_workdir), "loadavg": C.loadavg(), **env})
  h, c = results["heavy_only"], results["coarse_to_fine"]
  table = [
      f"{'':16s}{'heavy-only':>12s}{'light->heavy':>14s}",
      f"{'NFE light/heavy':16s}{'0/' + str(h['nfe_heavy']):>12s}{f'{n_l}/{n_h}':>14s}",
      f"{'ms per batch':16s}{h['ms']:12.1f}{c['ms']:14.1f}",
      f"speedup {speedup:.2f}x wall, {results['heavy_only']['cpu_ms'] / max(c['cpu_ms'], 1e-9):.2f}x "
      f"CPU time (ideal from FLOPs {ideal:.2f}x); same-seed cosine of final latents "
      f"{cos.mean():.4f} (min {cos.min():.4f})" + ("" if args.heavy_workdir else " [random weights]"),
  ]
  print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
  main()
