"""Per-op time breakdown of the jitted train step (BENCH-U / BENCH-D) from a jax.profiler trace.

Compiles the real step (as benchmarks/train_step.py), runs --iters steps under
jax.profiler.trace(create_perfetto_trace=True), joins every executed HLO op (trace event
`args.hlo_op`) with the compiled HLO text (same executable, so names match) and prints JSON
lines: one "profile_category" per category — conv_fwd, conv_input_grad, conv_weight_grad
(window larger than the kernel: the weight gradient), dot_fwd / dot_bwd (matmuls: dense
layers, attention, im2col convs), elementwise (fusions, GroupNorm, SiLU, adds), elementwise_bwd,
copy (layout copies, state copies), optimizer (select / where over the state) — with
ms per step (summed op durations; ops on different threads overlap, so the sum can exceed the
step's wall time) and share; then the --top slowest ops with their Flax module path.

Op durations measured on a loaded machine are inflated like any timing; the shares are more
robust. Run:  python benchmarks/profile_step.py --bench U [--small-map-threshold N] [--top 30]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.pre_jax_setup(auto_host_devices=True)  # one CPU device per core, as lfm_jax.main

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402
from lfm_jax import models  # noqa: E402
from lfm_jax import parallel  # noqa: E402
from lfm_jax import train  # noqa: E402
from lfm_jax import optim  # noqa: E402


def _categorise(name: str, line: str, body: str) -> str:
  bwd = "transpose(" in line
  if name.startswith(("ynn", "dot", "conv", "xnn", "onednn")) or "convolution(" in line:
    if "convolution(" in body or "convolution(" in line:
      m = re.search(r"window=\{size=(\d+)x(\d+)", body + line)
      kernel_like = m and int(m.group(1)) <= 3 and int(m.group(2)) <= 3
      if not kernel_like:
        return "conv_weight_grad"
      return "conv_input_grad" if bwd else "conv_fwd"
    return "dot_bwd" if bwd else "dot_fwd"
  if name.startswith("copy.") or name == "copy":
    return "copy"
  if "select" in name:
    return "optimizer"
  return "elementwise_bwd" if bwd else "elementwise"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p, default_iters=5)
  p.add_argument("--bench", default="U")
  p.add_argument("--batch-size", type=int, default=0)
  p.add_argument("--small-map-threshold", type=int, default=None)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace-dir", default="", help="keep the trace here (default: a temp dir)")
  args = p.parse_args(argv)
  C.post_jax_setup(args)
  config, shape, batch_size = ts.bench_config(args.bench.upper(), args.quick)
  if args.batch_size:
    batch_size = config.train.batch_size = args.batch_size
  model = models.create_model(config.model, shape)
  if args.small_map_threshold is not None:
    model = model.clone(small_map_threshold=args.small_map_threshold)
  mesh = parallel.create_mesh()
  tx, schedule = optim.create_optimizer(config.train)
  state = train.create_train_state(jax.random.PRNGKey(0), model, config, shape, tx=tx, mesh=mesh)
  step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh), mesh)
  batch = parallel.host_local_to_global(
      {"latent": np.random.default_rng(0).standard_normal((batch_size,) + shape, np.float32)},
      mesh)
  text = step.lower(state, batch).compile().as_text()
  for _ in range(max(args.warmup, 1)):
    state, _ = jax.block_until_ready(step(state, batch))
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="lfm_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.iters):
      state, _ = jax.block_until_ready(step(state, batch))
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  if not args.trace_dir:
    shutil.rmtree(trace_dir, ignore_errors=True)

  dur = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
    if op:
      dur[op] += e["dur"] / args.iters / 1e3  # ms per step
  entry = text[text.index("ENTRY"):] if "ENTRY" in text else text
  lines = {m.group(1): m.group(2)
           for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = (.*)$", entry, re.M)}
  comps = {m.group(1): m.group(2)
           for m in re.finditer(r"^%([\w.-]+) .*?\{\n(.*?)\n\}", text, re.S | re.M)}
  cats = collections.Counter()
  counts = collections.Counter()
  described = {}
  for name, ms in dur.items():
    line = lines.get(name, "")
    call = re.search(r"calls=%([\w.-]+)", line)
    body = comps.get(call.group(1), "") if call else ""
    cat = _categorise(name, line, body)
    cats[cat] += ms
    counts[cat] += 1
    op_name = re.search(r'op_name="([^"]*)"', line)
    described[name] = (cat, line.split(" ")[0], op_name.group(1) if op_name else "")
  total = sum(cats.values())
  env = C.environment()
  for cat, ms in cats.most_common():
    C.emit({"kind": "profile_category", "bench": args.bench.upper(), "category": cat,
            "ms_per_step": round(ms, 3), "share": round(ms / total, 4), "ops": counts[cat],
            "loadavg": C.loadavg(), **env})
  for name, ms in dur.most_common(args.top):
    cat, shape_str, op_name = described[name]
    C.emit({"kind": "profile_op", "bench": args.bench.upper(), "op": name, "category": cat,
            "ms_per_step": round(ms, 3), "shape": shape_str, "op_name": op_name[-120:]})


if __name__ == "__main__":
  main()
