"""Train-step benchmark: the real jitted lfm_jax flow train step (BENCH-U and BENCH-D).

BENCH-U  ADM U-Net (model_channels 64, channel_mult (1, 2, 2), 2 res blocks, attention at the
         8×8 level with 4 heads + the middle block), 4×16×16 latents, batch 32, fp32, AdamW, EMA.
BENCH-D  DiT-S/2 on 4×32×32 latents, batch 16, fp32, AdamW, EMA.

The step is lfm_jax.train.make_train_step + jit_train_step on a parallel.create_mesh() mesh
(state replicated and donated, batch sharded on "data"), i.e. what `train_and_evaluate` runs.
On CPU the script, like `python -m lfm_jax.main` for U-Nets, asks XLA for one host device per
core (at most 8; $LFM_JAX_CPU_DEVICES overrides) before importing jax, so the batch is split over
the cores; `--host-devices 1` measures a single device, which is what lfm_jax.main uses for DiT
(BENCH-D: 3.6 s/step on one device vs 10.7 s split over two on 2 cores).

Printed (one JSON line each):
  {"kind": "matmul_peak", ...}    jnp.dot of two 2048×2048 fp32 matrices, median of --iters.
  {"kind": "train_step", "bench": "U"|"D", ...}
      ms_per_step (median wall), cpu_ms_per_step, images_per_s, lower_s / compile_s (AOT, apart
      from the timed steps), flops_model (2×MACs of every dot/conv of the step's jaxpr, forward
      and backward, padding taps included: PyTorch's FLOP-counter convention, and independent
      of whether a conv runs as lax.conv or im2col + matmul), flops_xla (XLA's cost analysis of
      the compiled step: counts conv taps on padding as zero and all elementwise ops, so it
      changes with the conv formulation), achieved flop/s from both, and the model figure as a
      fraction of the measured matmul peak; compilations of the step during the run (must be 1)
      and the jit cache size.

Run:  python benchmarks/train_step.py                    # both benches, 20 timed steps each
      python benchmarks/train_step.py --bench U --iters 50
      python benchmarks/train_step.py --host-devices 1   # CPU: one device (default: one per core)
      python benchmarks/train_step.py --quick            # tiny smoke run
      python benchmarks/train_step.py --compare-torch    # ours vs PyTorch, interleaved (below)
      python benchmarks/train_step.py --compare-torch --bench U --sampling

--compare-torch: the PyTorch peers (benchmarks/peer_torch.py: LFM's guided-diffusion U-Net from
torchcfm, diffusers' DiT-S/2; LFM's loss, AdamW, EMA) run in a worker process, and the two sides
take turns (--rounds turns of --iters-per-round steps each, ABBA order) in one run; one line per
bench and op: {"kind": "compare_torch", "op": "train_step" | "forward" | "euler", "ours_ms",
"torch_ms", "ratio" (ours / torch, medians of all timed iterations), "ratio_per_round", ...}.
Ours uses the device split lfm_jax.main picks (one host device per core for U-Nets, one device
for DiT); torch every core. --sampling adds one velocity evaluation at --sample-batch and an
Euler sample of --euler-steps steps (lfm_jax.sampling.sample vs a Python Euler loop).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.pre_jax_setup(auto_host_devices=True)  # one CPU device per core, as lfm_jax.main

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lfm_jax import huge_pages  # noqa: E402
from lfm_jax import models  # noqa: E402
from lfm_jax import parallel  # noqa: E402
from lfm_jax import train  # noqa: E402
from lfm_jax import optim  # noqa: E402


def bench_config(bench: str, quick: bool = False):
  """(config, latent_shape, batch_size) of BENCH-U / BENCH-D (quick: tiny versions)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("lfm_default_config",
                                                os.path.join(root, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  m = config.model
  m.num_classes = 0  # unconditional (LFM's latent benchmarks)
  m.dropout = 0.0
  t = config.train
  t.optimizer, t.learning_rate, t.weight_decay = "adamw", 1e-4, 0.0
  t.compute_dtype, t.ema_decay, t.grad_accum_steps = "float32", 0.9999, 1
  if bench == "U":
    m.name = "unet"
    m.model_channels = 8 if quick else 64
    m.channel_mult = (1,) if quick else (1, 2, 2)
    m.num_res_blocks = 1 if quick else 2
    m.attention_semantics = "resolution"
    m.attention_resolutions = () if quick else (8,)
    m.num_heads = 2 if quick else 4
    m.norm_num_groups = 4 if quick else 32
    shape, batch = ((4, 4, 4), 8) if quick else ((16, 16, 4), 32)
  elif bench == "D":
    m.name = "dit"
    if quick:
      m.dit_preset = None
      m.hidden_size, m.depth, m.num_heads, m.patch_size, m.mlp_ratio = 16, 1, 2, 2, 2.0
      shape, batch = (4, 4, 4), 8
    else:
      m.dit_preset = "S/2"
      shape, batch = (32, 32, 4), 16
  else:
    raise ValueError(f"unknown bench {bench!r}")
  t.batch_size = batch
  return config, shape, batch


def run_train_bench(bench: str, args, counter: C.CompileCounter, peak=None, steps_for_loss=0) -> dict:
  ours = _our_bench(bench, args)
  config, model, mesh, state, batch = (ours[k] for k in ("config", "model", "mesh", "state", "batch"))
  shape, batch_size, n_params = ours["shape"], ours["batch_size"], ours["params"]
  raw_step, step = ours["raw_step"], ours["step"]

  # Model FLOPs from the jaxpr (load-independent, formulation-independent).
  flops_model = C.jaxpr_matmul_flops(jax.make_jaxpr(raw_step)(state, batch))

  # Compile ahead of time; the jitted function then reuses this executable.
  n_before = counter.count("train_step")
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  # XLA's cost analysis of an SPMD-partitioned program is per device; scale to the whole step.
  flops_xla_dev = C.xla_flops(compiled)
  flops_xla = None if flops_xla_dev is None else flops_xla_dev * mesh.devices.size
  if args.dump_hlo:
    with open(args.dump_hlo + f".{bench}.txt", "w") as f:
      f.write(compiled.as_text())

  t3 = time.perf_counter()
  state, metrics = step(state, batch)
  loss0 = float(jax.block_until_ready(metrics["loss"]))
  first_s = time.perf_counter() - t3
  compiles_first = counter.count("train_step") - n_before

  def one(carry):
    s, _ = carry
    return step(s, batch)

  (state, metrics), t = C.time_stateful(one, (state, metrics), iters=args.iters,
                                        warmup=args.warmup)
  compiles_total = counter.count("train_step") - n_before
  ms = t["ms"]
  rec = {
      "kind": "train_step",
      "bench": bench,
      "model": config.model.name,
      "latent_shape": list(shape),
      "batch_size": batch_size,
      "params": n_params,
      "ms_per_step": round(ms, 3),
      "ms_per_step_min": round(t["ms_min"], 3),
      "cpu_ms_per_step": round(t["cpu_ms"], 3),
      "images_per_s": round(batch_size / (ms * 1e-3), 2),
      "lower_s": round(t1 - t0, 3),
      "compile_s": round(t2 - t1, 3),
      "first_step_s": round(first_s, 3),
      "flops_model": flops_model,
      "flops_xla": flops_xla,
      "flops_xla_per_device": flops_xla_dev,
      "mesh_devices": int(mesh.devices.size),
      "flops_per_s_model": flops_model / (ms * 1e-3),
      "flops_per_s_xla": None if flops_xla is None else flops_xla / (ms * 1e-3),
      "matmul_peak_flops_per_s": peak["flops_per_s"] if peak else None,
      "fraction_of_matmul_peak": (round(flops_model / (ms * 1e-3) / peak["flops_per_s"], 4)
                                  if peak else None),
      "fraction_of_matmul_peak_xla_flops": (
          round(flops_xla / (ms * 1e-3) / peak["flops_per_s"], 4)
          if peak and flops_xla is not None else None),
      # The same ratio in FLOPs per CPU-second (step vs matmul): less sensitive to other
      # processes on a shared machine; equals the wall figure when both use all cores.
      "fraction_of_matmul_peak_cpu_time": (
          round((flops_model / (t["cpu_ms"] * 1e-3)) / (peak["flops"] / (peak["cpu_ms"] * 1e-3)), 4)
          if peak and t["cpu_ms"] > 0 and peak["cpu_ms"] > 0 else None),
      "compilations_first_step": compiles_first,
      "compilations_total": compiles_total,
      "recompiled_after_first_step": compiles_total > max(compiles_first, 1),
      "jit_cache_size": step._cache_size() if hasattr(step, "_cache_size") else None,
      "loss_first": loss0,
      "loss_last": float(metrics["loss"]),
      "iters": t["iters"],
      "loadavg": t["loadavg"],
      "small_map_threshold": getattr(models.unwrap(model), "small_map_threshold", None),
      **C.environment(),
  }
  return rec


def _our_bench(bench: str, args, num_devices=None) -> dict:
  """BENCH-U / BENCH-D as lfm_jax runs them (--batch-size and --small-map-threshold applied):
  the raw and jitted step, its state and a fixed batch, on a mesh of num_devices (None: all)."""
  config, shape, batch_size = bench_config(bench, args.quick)
  if args.batch_size:
    batch_size = config.train.batch_size = args.batch_size
  model = models.create_model(config.model, shape)
  if bench == "U" and args.small_map_threshold is not None:
    model = model.clone(small_map_threshold=args.small_map_threshold)
  mesh = parallel.create_mesh(num_devices)
  tx, schedule = optim.create_optimizer(config.train)
  state = train.create_train_state(jax.random.PRNGKey(0), model, config, shape, tx=tx, mesh=mesh)
  raw_step = train.make_train_step(model, config, tx, schedule, mesh=mesh)
  rng = np.random.default_rng(0)
  batch = parallel.host_local_to_global(
      {"latent": rng.standard_normal((batch_size,) + tuple(shape), np.float32)}, mesh)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {"config": config, "model": model, "mesh": mesh, "state": state, "raw_step": raw_step,
          "step": train.jit_train_step(raw_step, mesh), "batch": batch, "shape": shape,
          "batch_size": batch_size, "params": n_params}


class _Peer:
  """The PyTorch worker (benchmarks/peer_torch.py --serve) in its own process."""

  def __init__(self, benches, quick: bool, threads: int):
    import subprocess  # pylint: disable=g-import-not-at-top
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch.py"),
           "--serve", "--bench", ",".join(benches), "--threads", str(threads)]
    if quick:
      cmd.append("--quick")
    # The peer runs with the environment this command was started with (glibc's defaults), as
    # a PyTorch user runs it; ours may have re-executed itself with huge pages, as lfm_jax.main.
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=huge_pages.environ_before())
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmarks/peer_torch.py --serve exited ({self.proc.wait()}); "
                         "is torch (and torchcfm / diffusers) installed?")
    return json.loads(line)

  def __call__(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def _time_ours(fn, iters: int) -> list[float]:
  ms = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ms.append((time.perf_counter() - t0) * 1e3)
  return ms


def _interleave(ours_fn, peer: _Peer, cmd: dict, rounds: int, per_round: int, warmup: int) -> dict:
  """Alternates ours and the peer, `per_round` timed iterations each per round (ABBA order, so a
  drift of the machine's speed hits both sides alike); medians of all timed iterations."""
  _time_ours(ours_fn, warmup)
  peer(**cmd, iters=warmup)
  ours, theirs, ratios = [], [], []
  for r in range(rounds):
    if r % 2 == 0:
      a = _time_ours(ours_fn, per_round)
      b = peer(**cmd, iters=per_round)["ms"]
    else:
      b = peer(**cmd, iters=per_round)["ms"]
      a = _time_ours(ours_fn, per_round)
    ours += a
    theirs += b
    ratios.append(float(np.median(a) / np.median(b)))
  mo, mt = float(np.median(ours)), float(np.median(theirs))
  return {"ours_ms": round(mo, 3), "torch_ms": round(mt, 3), "ratio": round(mo / mt, 4),
          "ours_ms_min": round(min(ours), 3), "torch_ms_min": round(min(theirs), 3),
          "ratio_per_round": [round(x, 4) for x in ratios], "rounds": rounds,
          "iters_per_round": per_round}


def compare_torch(benches, args) -> None:
  """Ours vs the PyTorch peers in one interleaved run: one JSON line per bench and op."""
  from lfm_jax import sampling  # pylint: disable=g-import-not-at-top
  peer = _Peer(benches, args.quick, args.threads)
  try:
    for bench in benches:
      # The device split lfm_jax.main picks: one host device per core for U-Nets, one for DiT.
      ours = _our_bench(bench, args, None if bench == "U" else 1)
      box = {"state": ours["state"]}

      def train_once():
        box["state"], metrics = ours["step"](box["state"], ours["batch"])
        return metrics["loss"]

      base = {"bench": bench, "ours_params": ours["params"],
              "torch_params": peer.info["params"][bench], "batch_size": ours["batch_size"],
              "mesh_devices": int(ours["mesh"].devices.size), "torch_threads": peer.info["threads"],
              "torch": peer.info["torch"], "loadavg_start": C.loadavg()}
      C.log(f"[compare-torch] {bench} train step ...")
      rec = _interleave(train_once, peer, {"op": "train", "bench": bench}, args.rounds,
                        args.iters_per_round, args.warmup)
      C.emit({"kind": "compare_torch", "op": "train_step", **base, **rec,
              "loadavg_end": C.loadavg(), **C.environment()})
      if not args.sampling:
        continue
      model, mesh, params = ours["model"], ours["mesh"], box["state"].params
      sb = args.sample_batch
      z = parallel.global_from_full(
          np.random.default_rng(1).standard_normal((sb,) + tuple(ours["shape"]), np.float32),
          parallel.data_sharded(mesh))

      def velocity(t, x, p):
        tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        return model.apply({"params": p}, x, tb, train=False)

      # One evaluation compiled as the samplers compile theirs (forward-only compiler options).
      forward = jax.jit(lambda p, x: velocity(0.5, x, p),
                        compiler_options=parallel.inference_compiler_options())
      for op, fn, cmd, per_round in (
          ("forward", lambda: forward(params, z), {"op": "forward", "batch": sb},
           args.iters_per_round),
          ("euler", lambda: sampling.sample(velocity, z, solver="euler", num_steps=args.euler_steps,
                                            args=params)[0],
           {"op": "euler", "batch": sb, "steps": args.euler_steps}, 1)):
        if op == "euler" and args.euler_steps < 1:
          continue
        C.log(f"[compare-torch] {bench} {op} ...")
        rec = _interleave(fn, peer, {**cmd, "bench": bench}, args.rounds, per_round, 1)
        C.emit({"kind": "compare_torch", "op": op, **base, "batch_size": sb,
                "euler_steps": args.euler_steps if op == "euler" else None, **rec,
                "loadavg_end": C.loadavg(), **C.environment()})
  finally:
    peer.close()


def main(argv=None):
  """Entry point; `argv` lets tests run it in-process (jax flags from the caller then apply)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p)
  p.add_argument("--bench", default="U,D", help="comma list of U (U-Net), D (DiT-S/2)")
  p.add_argument("--batch-size", type=int, default=0, help="override the bench's batch size")
  p.add_argument("--small-map-threshold", type=int, default=None,
                 help="U-Net: maps smaller than this use im2col + matmul (default: the model's)")
  p.add_argument("--matmul-n", type=int, default=2048)
  p.add_argument("--dump-hlo", default="", help="write the compiled step's HLO to PREFIX.<bench>.txt")
  p.add_argument("--compare-torch", action="store_true",
                 help="ours vs the PyTorch peers (benchmarks/peer_torch.py), interleaved, ratios")
  p.add_argument("--rounds", type=int, default=6, help="--compare-torch: alternations")
  p.add_argument("--iters-per-round", type=int, default=5, help="--compare-torch: steps per turn")
  p.add_argument("--threads", type=int, default=0, help="--compare-torch: torch threads (0: all)")
  p.add_argument("--sampling", action="store_true",
                 help="--compare-torch: also one velocity evaluation and an Euler sample")
  p.add_argument("--sample-batch", type=int, default=32)
  p.add_argument("--euler-steps", type=int, default=50, help="0: no Euler sample")
  args = p.parse_args(argv)
  C.post_jax_setup(args)
  if args.compare_torch:
    if args.quick:
      args.rounds, args.iters_per_round, args.warmup = min(args.rounds, 2), 2, 1
      args.sample_batch, args.euler_steps = 8, 3
    compare_torch([b.strip().upper() for b in args.bench.split(",") if b.strip()], args)
    return
  if args.quick:
    args.iters, args.warmup, args.matmul_n = min(args.iters, 3), 1, min(args.matmul_n, 256)
  counter = C.CompileCounter.install()
  peak = C.matmul_peak(args.matmul_n, iters=args.iters)
  C.emit({"kind": "matmul_peak", "n": args.matmul_n, "dtype": "float32",
          "ms": round(peak["ms"], 3), "cpu_ms": round(peak["cpu_ms"], 3),
          "flops_per_s": peak["flops_per_s"], "iters": peak["iters"], "loadavg": peak["loadavg"],
          "matmul_precision": str(jax.config.jax_default_matmul_precision), **C.environment()})
  for bench in [b.strip().upper() for b in args.bench.split(",") if b.strip()]:
    C.log(f"[train_step] bench {bench} ...")
    C.emit(run_train_bench(bench, args, counter, peak))


if __name__ == "__main__":
  main()
