"""Kernel bound of a train step: its convolutions and matmuls timed alone, one by one.

Every `conv_general_dilated` and `dot_general` of the real jitted step's jaxpr (forward,
backward and optimizer; what `benchmarks/train_step.py` compiles) is rebuilt as a one-op
program with the same shapes and parameters, compiled with the same compiler options as the
train step (`lfm_jax.parallel.train_compiler_options()`) and timed alone on the whole machine
(median of --iters). The sum over all ops is the time the step would take if everything else
(GroupNorm, SiLU, adds, the optimizer, layout copies) were free and the ops ran back to back:

  {"kind": "kernel_op", ...}      one line per distinct op (shapes, count, ms, GFLOP/s), --top
  {"kind": "kernel_bound", ...}   sum of op times, their FLOPs (train_step.py's flops_model
      convention), achieved FLOP/s and that as a fraction of the matmul peak measured in the
      same run: the ceiling of `fraction_of_matmul_peak` for this step with these kernels.

It answers "how far can fusing and removing the elementwise work take the step?"
(benchmarks/README.md has the measured answer for BENCH-U on a 2-core CPU).

Run:  python benchmarks/kernel_bound.py --bench U [--top 15]
      python benchmarks/kernel_bound.py --quick
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.pre_jax_setup()  # one device: each op gets every core, as XLA's intra-op threads give it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

from lfm_jax import models, optim, parallel, train  # noqa: E402
import train_step as TS  # noqa: E402

_KERNELS = ("conv_general_dilated", "dot_general")


def kernel_eqns(closed_jaxpr):
  """{key: (eqn, count)} of the conv / dot equations of a jaxpr, sub-jaxprs included."""
  found = collections.OrderedDict()

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _KERNELS:
        key = (eqn.primitive.name, tuple(str(v.aval) for v in eqn.invars), repr(eqn.params))
        prev = found.get(key)
        found[key] = (eqn, (prev[1] if prev else 0) + times)
        continue
      mult = eqn.params["length"] if eqn.primitive.name == "scan" else 1
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else (v,)):
          if isinstance(sub, jcore.ClosedJaxpr):
            walk(sub.jaxpr, times * mult)
          elif isinstance(sub, jcore.Jaxpr):
            walk(sub, times * mult)

  walk(closed_jaxpr.jaxpr, 1)
  return found


def time_eqn(eqn, iters: int, warmup: int, options) -> float:
  """Median ms of the equation alone, on random inputs of its shapes."""
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.standard_normal(v.aval.shape).astype(v.aval.dtype)) for v in eqn.invars]
  fn = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params), compiler_options=options)
  return C.time_calls(lambda: fn(*args), iters=iters, warmup=warmup)["ms"]


def op_flops(eqn) -> float:
  return C._conv_flops(eqn) if eqn.primitive.name == "conv_general_dilated" else C._dot_flops(eqn)  # pylint: disable=protected-access


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p)
  p.add_argument("--bench", default="U", help="U (U-Net) or D (DiT-S/2)")
  p.add_argument("--top", type=int, default=10, help="print the N slowest ops")
  args = p.parse_args(argv)
  C.post_jax_setup(args)
  if args.quick:
    args.iters, args.warmup = min(args.iters, 3), 1
  config, shape, batch_size = TS.bench_config(args.bench, args.quick)
  model = models.create_model(config.model, shape)
  mesh = parallel.create_mesh(1)
  tx, schedule = optim.create_optimizer(config.train)
  state = train.create_train_state(jax.random.PRNGKey(0), model, config, shape, tx=tx, mesh=mesh)
  raw_step = train.make_train_step(model, config, tx, schedule, mesh=mesh)
  batch = {"latent": jnp.zeros((batch_size,) + tuple(shape), jnp.float32)}
  eqns = kernel_eqns(jax.make_jaxpr(raw_step)(state, batch))
  options = parallel.train_compiler_options()
  peak = C.matmul_peak(256 if args.quick else 2048, iters=args.iters)

  rows = []
  for (name, avals, _), (eqn, count) in eqns.items():
    ms = time_eqn(eqn, args.iters, args.warmup, options)
    fl = op_flops(eqn)
    rows.append(dict(op=name, inputs=list(avals), count=count, ms=ms, flops=fl))
  total_ms = sum(r["ms"] * r["count"] for r in rows)
  total_flops = sum(r["flops"] * r["count"] for r in rows)
  for r in sorted(rows, key=lambda r: -r["ms"] * r["count"])[:args.top]:
    C.emit({"kind": "kernel_op", "bench": args.bench, **r,
            "ms_total": round(r["ms"] * r["count"], 3),
            "gflop_per_s": round(r["flops"] / (r["ms"] * 1e-3) / 1e9, 1)})
  by_kind = {k: sum(r["ms"] * r["count"] for r in rows if r["op"] == k) for k in _KERNELS}
  C.emit({"kind": "kernel_bound", "bench": args.bench, "batch_size": batch_size,
          "latent_shape": list(shape), "ops": sum(r["count"] for r in rows),
          "distinct_ops": len(rows), "ms_kernels": round(total_ms, 3),
          "ms_convolutions": round(by_kind["conv_general_dilated"], 3),
          "ms_matmuls": round(by_kind["dot_general"], 3),
          "flops_model": total_flops, "flops_per_s": total_flops / (total_ms * 1e-3),
          "matmul_peak_flops_per_s": peak["flops_per_s"],
          "fraction_of_matmul_peak_bound": round(
              total_flops / (total_ms * 1e-3) / peak["flops_per_s"], 4),
          "compiler_options": options, "iters": args.iters, **C.environment()})


if __name__ == "__main__":
  main()
