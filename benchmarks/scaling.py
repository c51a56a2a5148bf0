"""Data-parallel scaling benchmark: the train step with the batch sharded over N devices.

For each N in --devices (default 1,2,4,8) a fresh subprocess runs with
XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax is imported (on CPU: N
simulated devices sharing this machine's cores; on a GPU/TPU host the flag does nothing and
N = min(N, available accelerators) is used by building the mesh over the first N devices).
Each child runs benchmarks/train_step.py's measurement (the real lfm_jax jitted step on a
"data" mesh of N devices, same seed, same global batch) and prints its JSON line; the parent
re-emits it with the speedup over N = 1 and whether the sharded program's loss equals the
1-device one (first step from the same state and batch: |Δ| <= --loss-rtol · |loss|; also the
loss after all timed steps, reported).

Run:  python benchmarks/scaling.py                       # BENCH-U over 1, 2, 4, 8 devices
      python benchmarks/scaling.py --bench D --devices 1,2
      python benchmarks/scaling.py --quick
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402  (imports no jax at module level)


def measure(args, n: int) -> dict:
  """One train-step measurement on a mesh over the first n devices of this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import train_step as ts  # pylint: disable=g-import-not-at-top
  from lfm_jax import parallel  # pylint: disable=g-import-not-at-top

  C.post_jax_setup(args)
  n = min(n, jax.device_count())
  orig = parallel.create_mesh
  parallel.create_mesh = lambda num_devices=None: orig(n)  # the step and data use N devices
  try:
    counter = C.CompileCounter.install()
    rec = ts.run_train_bench(args.bench, args, counter)
  finally:
    parallel.create_mesh = orig
  rec["kind"] = "scaling"
  return rec


def child(args) -> None:
  """Runs in the subprocess (XLA_FLAGS set by the parent)."""
  C.emit(measure(args, args.child))


def run_subprocess(args, n: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--bench", args.bench,
         "--iters", str(args.iters), "--warmup", str(args.warmup)]
  if args.quick:
    cmd.append("--quick")
  if args.batch_size:
    cmd += ["--batch-size", str(args.batch_size)]
  if args.small_map_threshold is not None:
    cmd += ["--small-map-threshold", str(args.small_map_threshold)]
  if args.precision:
    cmd += ["--precision", args.precision]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return {"kind": "scaling", "mesh_devices": n, "error": proc.stderr[-2000:],
            "returncode": proc.returncode}
  return json.loads(lines[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p)
  p.add_argument("--bench", default="U", help="U (BENCH-U) or D (BENCH-D)")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--batch-size", type=int, default=0)
  p.add_argument("--small-map-threshold", type=int, default=None)
  p.add_argument("--loss-rtol", type=float, default=1e-5)
  p.add_argument("--timeout", type=float, default=3600.0, help="per child, seconds")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--in-process", action="store_true",
                 help="no subprocesses: use meshes over the first N of this process's devices "
                      "(needs max(--devices) devices already, e.g. under tests/conftest.py)")
  args = p.parse_args(argv)
  args.dump_hlo = ""
  if args.quick:
    args.iters, args.warmup = min(args.iters, 2), 1
    if not args.batch_size:
      args.batch_size = 8
  if args.child:
    child(args)
    return

  counts = [int(v) for v in args.devices.split(",") if v.strip()]
  if 1 not in counts:
    counts = [1] + counts
  base = None
  for n in counts:
    C.log(f"[scaling] {n} device(s) ...")
    rec = measure(args, n) if args.in_process else run_subprocess(args, n)
    if "error" in rec:
      C.emit(rec)
      continue
    if base is None:
      base = rec
    rec["speedup_vs_1_device"] = round(base["ms_per_step"] / rec["ms_per_step"], 3)
    d_first = abs(rec["loss_first"] - base["loss_first"])
    d_last = abs(rec["loss_last"] - base["loss_last"])
    rec["loss_first_abs_diff_vs_1_device"] = d_first
    rec["loss_last_abs_diff_vs_1_device"] = d_last
    rec["loss_matches_1_device"] = bool(d_first <= args.loss_rtol * abs(base["loss_first"]))
    C.emit(rec)


if __name__ == "__main__":
  main()
