"""Accelerator benchmark: one prepared run (about 8 minutes on one GPU) of training and sampling.

Random weights, no data, nothing read from disk. Sections, in order (each one first checks the
time budget, --budget-s, default 480 s, and is skipped with a {"kind": "skipped"} line when its
estimate would not fit; an error in one section is printed as {"kind": "error"} and the next
one runs):

  matmul          a bf16 8192^3 jnp.dot: the device's measured matrix rate (a ceiling for MFU)
  train_dit_b2    DiT-B/2 train step, 256^2 images -> 32x32x4 latents, global batch 256
  train_dit_xl2   DiT-XL/2 train step, 32x32x4, global batch 128, model.remat "blocks"
  train_adm       the CelebA-HQ 256 ADM U-Net (configs/celeba_hq_256_adm.py), 32x32x4, batch 128
  sample_euler    DiT-XL/2, Euler 50 steps, batch 64
  sample_dopri5   DiT-XL/2, Dopri5 (rtol = atol = 1e-5, the paper's), batch 64, with its NFE
  coarse_to_fine  DiT-S/2 light -> DiT-XL/2 heavy, Euler 50 steps, light_fraction 0.7 (35 light
                  + 15 heavy evaluations) against XL/2 alone, timed in alternation, batch 64

Train steps are lfm_jax's own (train.make_train_step + jit_train_step: AdamW, EMA 0.9999, the
state donated), bf16 compute (train.compute_dtype and the network's dtype; params, norms and
softmax float32). Each is compiled ahead of time, then --warmup untimed and --iters timed steps
(median, each blocked until ready). Records: images_per_s, ms_per_step, compile_s, flops_model
(2 x MACs of every dot/conv of the step's jaxpr, traced without remat: the model FLOPs of MFU),
flops_xla (XLA's cost analysis of the compiled step: recomputation and elementwise work
included), achieved TFLOP/s from both, mfu = model TFLOP/s / --peak-tflops (default: the table
in _common.KNOWN_PEAK_BF16_TFLOPS by device kind, 790 for H100/H200; null when unknown),
mfu_measured_matmul (against the matmul section's rate) and the compiled step's memory analysis.

Sampling: the network's velocity + the analytic Gaussian-data flow (_common.make_velocity), bf16
network, float32 ODE state; images_per_s, nfe, ms_per_nfe, TFLOP/s from the forward FLOPs x NFE.

Imports only lfm_jax's TensorFlow-free core (models, flow, sampling, train, parallel, optim,
precision, generate) and ml_collections for the configs.

Run:  python benchmarks/accelerator.py | tee accelerator.jsonl
      python benchmarks/accelerator.py --peak-tflops 989 --compilation-cache /tmp/jax_cache
      python benchmarks/accelerator.py --sections train_dit_b2,sample_euler --iters 20
      python benchmarks/accelerator.py --quick      # tiny models on CPU (the test suite's)
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# lfm_jax and configs from this checkout also where the package is not installed (a bare
# accelerator image).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common as C  # noqa: E402

C.pre_jax_setup()
# A GPU run gives the XLA allocator most of the card (the default is 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lfm_jax import models  # noqa: E402
from lfm_jax import optim  # noqa: E402
from lfm_jax import parallel  # noqa: E402
from lfm_jax import precision  # noqa: E402
from lfm_jax import sampling  # noqa: E402
from lfm_jax import train  # noqa: E402

SECTIONS = ("matmul", "train_dit_b2", "train_dit_xl2", "train_adm", "sample_euler",
            "sample_dopri5", "coarse_to_fine")
# Seconds each section is expected to take on one H100/H200 (compile included); the budget
# guard skips a section whose estimate does not fit in what is left.
ESTIMATE_S = {"matmul": 10, "train_dit_b2": 45, "train_dit_xl2": 100, "train_adm": 70,
              "sample_euler": 45, "sample_dopri5": 75, "coarse_to_fine": 60}
QUICK_ESTIMATE_S = 15
LATENT = (32, 32, 4)  # 256^2 images through a KL-f8 autoencoder


class Budget:
  """Wall-clock budget of the whole run: sections ask before they start."""

  def __init__(self, seconds: float, quick: bool):
    self.t0 = time.perf_counter()
    self.seconds = float(seconds)
    self.quick = quick

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def allows(self, section: str) -> bool:
    estimate = QUICK_ESTIMATE_S if self.quick else ESTIMATE_S[section]
    if self.elapsed() + estimate <= self.seconds:
      return True
    C.emit({"kind": "skipped", "section": section, "reason": "time budget",
            "elapsed_s": round(self.elapsed(), 1), "estimate_s": estimate,
            "budget_s": self.seconds})
    return False

  def iters(self, wanted: int, seconds_per_iter: float, reserve_s: float = 0.0) -> int:
    """`wanted`, or fewer (at least 1) so that they end within the budget."""
    room = self.left() - reserve_s
    if seconds_per_iter <= 0:
      return wanted
    return int(max(1, min(wanted, room // seconds_per_iter)))


# ------------------------------------------------------------------------------------ models


def dit_config(preset: str, quick: bool):
  """A config.model for a DiT preset (quick: a tiny DiT standing in for it)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  m = config.model
  m.name = "dit"
  if quick:
    m.dit_preset = None
    m.hidden_size, m.depth, m.num_heads, m.patch_size, m.mlp_ratio = (
        {"S/2": (16, 1, 2, 2, 2.0), "B/2": (32, 1, 2, 2, 2.0)}.get(preset, (48, 1, 2, 2, 2.0)))
  else:
    m.dit_preset = preset
  return config


def adm_config(quick: bool):
  from configs import celeba_hq_256_adm  # pylint: disable=g-import-not-at-top
  config = celeba_hq_256_adm.get_config()
  if quick:
    m = config.model
    m.model_channels, m.channel_mult, m.num_res_blocks = 8, (1,), 1
    m.attention_resolutions, m.attention_semantics, m.num_heads = (), "resolution", 2
    m.mid_attention, m.norm_num_groups = False, 4
  return config


def prepare(config, remat: str, attention, batch_size: int):
  """The benchmark's training settings on a config (unconditional, AdamW, EMA, bf16)."""
  m, t = config.model, config.train
  m.num_classes, m.dropout, m.remat = 0, 0.0, remat
  m.attention_implementation = attention
  t.optimizer, t.learning_rate, t.weight_decay, t.grad_clip_norm = "adamw", 1e-4, 0.0, 0.0
  t.schedule, t.warmup_steps, t.ema_decay, t.grad_accum_steps = "constant", 0, 0.9999, 1
  t.compute_dtype, t.batch_size = "bfloat16", batch_size
  return config


def latent_shape(quick: bool):
  return (8, 8, 4) if quick else LATENT


def rates(flops: float, seconds: float, peak_tflops, matmul_tflops) -> dict:
  """TFLOP/s of `flops` done in `seconds`, and its fraction of the two peaks."""
  tflops = flops / seconds / 1e12 if seconds > 0 else None
  return {
      "tflops": None if tflops is None else round(tflops, 3),
      "mfu": None if (tflops is None or not peak_tflops) else round(tflops / peak_tflops, 4),
      "mfu_measured_matmul": (None if (tflops is None or not matmul_tflops)
                              else round(tflops / matmul_tflops, 4)),
  }


# ---------------------------------------------------------------------------------- sections


def section_matmul(args, ctx) -> dict:
  n = 256 if args.quick else 8192
  peak = C.matmul_peak(n, iters=3 if args.quick else 10, dtype="bfloat16")
  ctx["matmul_tflops"] = peak["flops_per_s"] / 1e12
  return {"kind": "matmul", "n": n, "dtype": "bfloat16", "ms": round(peak["ms"], 4),
          "tflops": round(peak["flops_per_s"] / 1e12, 2), "iters": peak["iters"]}


def section_train(args, ctx, budget, name: str) -> dict:
  quick = args.quick
  if name == "train_dit_b2":
    label, config, batch, remat = "DiT-B/2", dit_config("B/2", quick), args.b2_batch, "none"
  elif name == "train_dit_xl2":
    label, config, batch = "DiT-XL/2", dit_config("XL/2", quick), args.xl2_batch
    remat = args.xl2_remat
  else:
    label, config, batch = "ADM U-Net (CelebA-HQ 256)", adm_config(quick), args.adm_batch
    remat = "none"
  if quick:
    batch = 8
  shape = latent_shape(quick)
  config = prepare(config, remat, args.attention, batch)
  mesh = ctx["mesh"]
  parallel.local_batch_size(batch, mesh)
  cdt = precision.dtype_from_name(config.train.compute_dtype, "train.compute_dtype")
  model = models.create_model(config.model, shape, dtype=cdt)
  tx, schedule = optim.create_optimizer(config.train)
  rng = jax.random.PRNGKey(0)
  abstract = train.abstract_train_state(rng, model, config, shape, tx, mesh)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract.params)))
  batch_host = {"latent": np.random.default_rng(0).standard_normal(
      (batch,) + shape).astype(np.float32)}
  batch_struct = {"latent": jax.ShapeDtypeStruct((batch,) + shape, jnp.float32,
                                                 sharding=parallel.data_sharded(mesh))}

  # Model FLOPs: the step traced without rematerialisation (recomputation is not model work).
  t0 = time.perf_counter()
  plain = models.create_model(_without_remat(config.model), shape, dtype=cdt)
  raw_plain = train.make_train_step(plain, config, tx, schedule, mesh=mesh)
  flops_model = C.jaxpr_matmul_flops(jax.make_jaxpr(raw_plain)(abstract, batch_struct))
  trace_s = time.perf_counter() - t0

  limit = ctx.get("memory_limit")
  remat_fallback = False
  while True:
    step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh),
                                mesh, abstract)
    t0 = time.perf_counter()
    lowered = step.lower(abstract, batch_struct)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = C.memory_stats(compiled)
    del lowered
    too_big = bool(limit and mem and mem["total_bytes"] > 0.97 * limit)
    if not too_big or remat != "none":
      break
    # Would not fit in the device's memory: rematerialise the blocks instead of failing.
    C.log(f"[accelerator] {name}: {mem['total_bytes'] / 2**30:.1f} GiB > the device's "
          f"{limit / 2**30:.1f} GiB; recompiling with model.remat=blocks")
    remat, remat_fallback = "blocks", True
    config.model.remat = remat
    model = models.create_model(config.model, shape, dtype=cdt)
  flops_xla = C.xla_flops(compiled)
  flops_xla = None if flops_xla is None else flops_xla * mesh.devices.size  # per device -> step

  t_state = time.perf_counter()
  state = train.train_state_from_params(
      rng, _random_params(lambda r: train.init_params(model, r, config, shape), ctx["mesh"]),
      config, tx=tx, mesh=mesh)
  jax.block_until_ready(state)
  state_s = time.perf_counter() - t_state
  data = parallel.host_local_to_global(batch_host, mesh)
  t3 = time.perf_counter()
  state, metrics = compiled(state, data)
  loss0 = float(jax.block_until_ready(metrics["loss"]))
  first_s = time.perf_counter() - t3

  def one(carry):
    return compiled(carry[0], data)

  # One step's time from the first (already compiled) call bounds how many fit.
  iters = budget.iters(args.iters, max(first_s, 1e-3), reserve_s=5.0)
  (state, metrics), t = C.time_stateful(one, (state, metrics), iters=iters,
                                        warmup=min(args.warmup, iters))
  finite = bool(jax.device_get(metrics["finite"]))
  seconds = t["ms"] * 1e-3
  rec = {
      "kind": "train_step", "section": name, "model": label, "params": n_params,
      "latent_shape": list(shape), "global_batch": batch, "devices": int(mesh.devices.size),
      "compute_dtype": "bfloat16", "remat": remat, "remat_fallback": remat_fallback,
      "attention_implementation": args.attention,
      "ms_per_step": round(t["ms"], 3), "ms_per_step_min": round(t["ms_min"], 3),
      "images_per_s": round(batch / seconds, 2), "iters": t["iters"],
      "trace_s": round(trace_s, 2), "lower_s": round(t1 - t0, 2),
      "compile_s": round(t2 - t1, 2), "state_s": round(state_s, 2),
      "first_step_s": round(first_s, 3),
      "flops_model": flops_model, "flops_xla": flops_xla,
      **{f"model_{k}": v for k, v in rates(flops_model, seconds, ctx["peak_tflops"],
                                           ctx.get("matmul_tflops")).items()},
      **({f"xla_{k}": v for k, v in rates(flops_xla, seconds, ctx["peak_tflops"],
                                          ctx.get("matmul_tflops")).items()}
         if flops_xla else {"xla_tflops": None}),
      "memory": mem, "memory_total_gib": C.gib(mem.get("total_bytes")),
      "loss_first": loss0, "loss_last": float(metrics["loss"]), "finite": finite,
  }
  rec["mfu"] = rec["model_mfu"]
  return rec  # the state and the executable are freed with this frame


def _without_remat(model_config):
  cfg = model_config.copy_and_resolve_references()
  cfg.remat = "none"
  return cfg


def _random_params(init_fn, mesh, seed: int = 0):
  """Random params with init_fn's shapes (_common.random_params' distributions), replicated:
  drawn on the host on CPU (no compile for tiny models), on the device elsewhere (a host draw
  of DiT-XL/2's 675M values would take seconds)."""
  if jax.default_backend() == "cpu":
    return jax.device_put(C.random_params(init_fn, seed), parallel.replicated(mesh))
  return C.device_random_params(init_fn, seed, sharding=parallel.replicated(mesh))


def _sampling_models(args, ctx):
  """The XL/2 (heavy) and S/2 (light) velocity functions with random params, built once."""
  if "heavy" in ctx:
    return ctx["heavy"], ctx["light"]
  shape = latent_shape(args.quick)
  out = []
  for seed, preset in ((0, "XL/2"), (1, "S/2")):
    cfg = dit_config(preset, args.quick).model
    cfg.num_classes, cfg.dropout = 0, 0.0
    cfg.attention_implementation = args.attention
    model = models.create_model(cfg, shape, dtype=jnp.bfloat16)

    def init(rng, model=model):
      x = jnp.zeros((1,) + shape, jnp.float32)
      return model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,), jnp.float32))["params"]

    params = _random_params(init, ctx["mesh"], seed)
    x = jax.ShapeDtypeStruct((args.sample_batch,) + shape, jnp.float32)
    tt = jax.ShapeDtypeStruct((args.sample_batch,), jnp.float32)
    fwd = C.jaxpr_matmul_flops(jax.make_jaxpr(
        lambda p, x, t, model=model: model.apply({"params": p}, x, t))(params, x, tt))
    out.append({"name": "DiT-" + preset, "velocity": C.make_velocity(model), "params": params,
                "forward_flops": fwd,
                "params_count": int(sum(np.prod(v.shape) for v in jax.tree.leaves(params)))})
  ctx["heavy"], ctx["light"] = out
  ctx["noise"] = jax.device_put(
      jax.random.normal(jax.random.PRNGKey(42), (args.sample_batch,) + shape),
      parallel.data_sharded(ctx["mesh"]))
  return out


def section_sample(args, ctx, budget, solver: str) -> dict:
  heavy, _ = _sampling_models(args, ctx)
  noise = ctx["noise"]
  kw = dict(solver=solver, args=heavy["params"])
  if solver == "euler":
    kw["num_steps"] = 4 if args.quick else args.euler_steps
  else:
    tol = 1e-2 if args.quick else args.dopri5_tol
    kw.update(rtol=tol, atol=tol, max_steps=4096)
    ms_per_nfe = ctx.get("euler_ms_per_nfe")
    if ms_per_nfe and not args.quick:
      # Random weights make the NFE unknown in advance: cap the steps so that two solves (the
      # first, compiling one and one timed) leave the coarse-to-fine section its time. A solve
      # that runs out of steps reports failed = true with the NFE it made.
      room_s = budget.left() - ESTIMATE_S["coarse_to_fine"] - 30.0
      kw["max_steps"] = int(min(4096, max(16, room_s * 1e3 / (2 * 6 * ms_per_nfe))))

  def run():
    return sampling.sample(heavy["velocity"], noise, **kw)

  t0 = time.perf_counter()
  z, info = jax.block_until_ready(run())
  first_s = time.perf_counter() - t0
  # The first call (compile + one solve) bounds a solve's time, hence how many fit.
  iters = budget.iters(args.sample_iters, first_s, reserve_s=5.0)
  t = C.time_calls(lambda: run()[0], iters=iters, warmup=0)
  nfe = int(info["nfe"])
  seconds = t["ms"] * 1e-3
  rec = {
      "kind": "sampling", "section": f"sample_{solver}", "model": heavy["name"],
      "params": heavy["params_count"], "solver": solver, "num_steps": kw.get("num_steps"),
      "tol": kw.get("rtol"), "batch_size": int(noise.shape[0]),
      "latent_shape": list(noise.shape[1:]), "compute_dtype": "bfloat16", "nfe": nfe,
      "max_steps": kw.get("max_steps"),
      "failed": bool(info["failed"]), "ms_per_batch": round(t["ms"], 3),
      "ms_per_nfe": round(t["ms"] / max(nfe, 1), 4),
      "images_per_s": round(noise.shape[0] / seconds, 2), "iters": t["iters"],
      "first_call_s": round(first_s, 2), "forward_flops": heavy["forward_flops"],
      **{f"model_{k}": v for k, v in rates(heavy["forward_flops"] * nfe, seconds,
                                           ctx["peak_tflops"], ctx.get("matmul_tflops")).items()},
      "finite": bool(np.isfinite(np.asarray(z)).all()),
  }
  if solver == "euler":
    ctx["euler_ms_per_nfe"] = t["ms"] / max(nfe, 1)
  return rec


def section_coarse_to_fine(args, ctx, budget) -> list:
  heavy, light = _sampling_models(args, ctx)
  noise = ctx["noise"]
  steps = 10 if args.quick else args.euler_steps

  def heavy_only():
    return sampling.sample(heavy["velocity"], noise, solver="euler", num_steps=steps,
                           args=heavy["params"])

  def c2f():
    return sampling.sample_coarse_to_fine(
        light["velocity"], heavy["velocity"], noise, light_fraction=args.light_fraction,
        solver="euler", num_steps=steps, light_args=light["params"],
        heavy_args=heavy["params"])

  runs = {"heavy_only": heavy_only, "coarse_to_fine": c2f}
  first, info = {}, {}
  for k, fn in runs.items():
    t0 = time.perf_counter()
    _, info[k] = jax.block_until_ready(fn())
    first[k] = time.perf_counter() - t0
  iters = budget.iters(args.sample_iters, sum(first.values()), reserve_s=5.0)
  stats = C.time_interleaved({k: (lambda fn=fn: fn()[0]) for k, fn in runs.items()},
                             iters=iters, warmup=0)
  n_l, n_h = int(info["coarse_to_fine"]["nfe_light"]), int(info["coarse_to_fine"]["nfe_heavy"])
  fl_h, fl_l = heavy["forward_flops"], light["forward_flops"]
  ideal = (n_l + n_h) * fl_h / (n_l * fl_l + n_h * fl_h)
  speedup = stats["heavy_only"]["ms"] / stats["coarse_to_fine"]["ms"]
  out = []
  for k in runs:
    out.append({"kind": "coarse_to_fine_run", "run": k, "solver": "euler", "num_steps": steps,
                "light_fraction": args.light_fraction if k == "coarse_to_fine" else 0.0,
                "batch_size": int(noise.shape[0]), "ms_per_batch": round(stats[k]["ms"], 3),
                "images_per_s": round(noise.shape[0] / (stats[k]["ms"] * 1e-3), 2),
                "first_call_s": round(first[k], 2), "iters": stats[k]["iters"]})
  out.append({"kind": "coarse_to_fine_summary", "heavy": heavy["name"], "light": light["name"],
              "light_fraction": args.light_fraction, "num_steps": steps,
              "nfe_light": n_l, "nfe_heavy": n_h, "forward_flops_heavy": fl_h,
              "forward_flops_light": fl_l, "flops_ratio_light_over_heavy": fl_l / fl_h,
              "speedup": round(speedup, 3), "speedup_ideal_from_flops": round(ideal, 3)})
  return out


# -------------------------------------------------------------------------------------- main


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny models, few iterations (CPU smoke)")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help="comma list of " + ", ".join(SECTIONS))
  p.add_argument("--budget-s", type=float, default=480.0,
                 help="wall-clock budget; sections that would not fit are skipped")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's dense bf16 peak for MFU (default: known for H100/H200)")
  p.add_argument("--iters", type=int, default=10, help="timed train steps (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed train steps after the first")
  p.add_argument("--sample-iters", type=int, default=3, help="timed solves (median)")
  p.add_argument("--b2-batch", type=int, default=256)
  p.add_argument("--xl2-batch", type=int, default=128)
  p.add_argument("--xl2-remat", default="blocks", help="model.remat of the DiT-XL/2 step")
  p.add_argument("--adm-batch", type=int, default=128)
  p.add_argument("--sample-batch", type=int, default=64)
  p.add_argument("--euler-steps", type=int, default=50)
  p.add_argument("--dopri5-tol", type=float, default=1e-5)
  p.add_argument("--light-fraction", type=float, default=0.7)
  p.add_argument("--attention", default=None, choices=[None, "xla", "cudnn"],
                 help="model.attention_implementation (default: jax's choice)")
  p.add_argument("--devices", type=int, default=0, help="mesh size (0: every device)")
  p.add_argument("--compilation-cache", default="",
                 help="jax persistent compilation cache directory (reruns compile faster)")
  p.add_argument("--host-devices", type=int, default=0, help="simulated CPU devices")
  args = p.parse_args(argv)
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  for s in sections:
    if s not in SECTIONS:
      p.error(f"--sections: unknown section {s!r}; known: {', '.join(SECTIONS)}")
  if args.quick:
    args.iters, args.warmup, args.sample_iters = min(args.iters, 2), 1, min(args.sample_iters, 2)
    args.sample_batch = 4
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  budget = Budget(args.budget_s, args.quick)
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "")
  peak, source = args.peak_tflops, "--peak-tflops"
  if peak is None:
    peak, source = C.known_peak_tflops(kind), "known device kind"
    if peak is None:
      source = None
  num_devices = args.devices or (1 if args.quick else jax.device_count())
  mesh = parallel.create_mesh(num_devices)
  try:
    mem_limit = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except
    mem_limit = None
  import flax, optax, diffrax  # pylint: disable=g-import-not-at-top,multiple-imports
  C.emit({"kind": "environment", **C.environment(), "mesh_devices": num_devices,
          "jaxlib": _jaxlib_version(),
          "flax": flax.__version__, "optax": optax.__version__, "diffrax": diffrax.__version__,
          "peak_tflops": peak, "peak_source": source, "device_memory_limit_bytes": mem_limit,
          "budget_s": args.budget_s, "quick": args.quick, "sections": sections})
  ctx = {"mesh": mesh, "peak_tflops": peak, "memory_limit": mem_limit}
  for s in sections:
    if not budget.allows(s):
      continue
    C.log(f"[accelerator] {s} (elapsed {budget.elapsed():.0f} s) ...")
    t0 = time.perf_counter()
    try:
      if s == "matmul":
        recs = section_matmul(args, ctx)
      elif s.startswith("train_"):
        recs = section_train(args, ctx, budget, s)
      elif s == "sample_euler":
        recs = section_sample(args, ctx, budget, "euler")
      elif s == "sample_dopri5":
        recs = section_sample(args, ctx, budget, "dopri5")
      else:
        recs = section_coarse_to_fine(args, ctx, budget)
    except Exception as e:  # pylint: disable=broad-except
      C.emit({"kind": "error", "section": s, "error": f"{type(e).__name__}: {str(e)[:2000]}",
              "section_s": round(time.perf_counter() - t0, 1)})
      gc.collect()
      continue
    for r in recs if isinstance(recs, list) else [recs]:
      C.emit({**r, "section_s": round(time.perf_counter() - t0, 1),
              "elapsed_s": round(budget.elapsed(), 1)})
    gc.collect()  # device buffers of the section's state go before the next one starts
  C.emit({"kind": "done", "elapsed_s": round(budget.elapsed(), 1), "budget_s": args.budget_s})


def _jaxlib_version():
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


if __name__ == "__main__":
  main()
