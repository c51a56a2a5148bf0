"""A multi-process harness: run lfm_jax stages as P local processes under jax.distributed.

    results = multihost.run_stages(workdir, overrides, modes=("pipeline", "score"),
                                   processes=2, devices=4)

starts P copies of this file (`python tests/multihost.py SPEC.json`) with a localhost coordinator,
JAX_NUM_PROCESSES / JAX_PROCESS_ID and `devices` simulated CPU devices each; every process runs
`stages.run(tiny_config(data_dir, **overrides), workdir)` for each mode in turn, exactly as the
command line does. processes=1 is the same code on one process (no jax.distributed). The
processes share a persistent compilation cache, so later runs of the same programs start fast.
Outputs are compared through the files the runs write. `launch(...)` returns the Popen handles
for tests that signal the processes themselves.
"""

import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(process_id: int, processes: int, devices: int, port: int,
         extra: Optional[dict] = None) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
      os.environ.get("TMPDIR", "/tmp"), "lfm_jax_test_compile_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = os.pathsep.join([HERE, REPO, env.get("PYTHONPATH", "")])
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id), LFM_JAX_DISTRIBUTED_TIMEOUT="60")
  env.update(extra or {})
  return env


def launch(workdir: str, overrides: dict, modes: Sequence[str], *, data_dir: str,
           processes: int = 2, devices: int = 4, env: Optional[dict] = None,
           spec_dir: Optional[str] = None, num_processes_claimed: Optional[int] = None):
  """Starts the processes; returns (Popen list, log paths). The caller waits and reads logs."""
  spec_dir = spec_dir or workdir + ".spec"
  os.makedirs(spec_dir, exist_ok=True)
  spec = os.path.join(spec_dir, "spec.json")
  with open(spec, "w") as f:
    json.dump({"workdir": workdir, "overrides": overrides, "modes": list(modes),
               "data_dir": data_dir}, f)
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    log = os.path.join(spec_dir, f"process_{i}.log")
    extra = dict(env or {})
    if num_processes_claimed is not None:
      extra["JAX_NUM_PROCESSES"] = str(num_processes_claimed)
    with open(log, "w") as out:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), spec],
          env=_env(i, processes, devices, port, extra), stdout=out, stderr=subprocess.STDOUT,
          cwd=REPO))
    logs.append(log)
  return procs, logs


def wait(procs, logs, timeout: float = 900) -> list[str]:
  """Waits for every process; returns their logs; raises with the logs if one failed."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [open(log).read() for log in logs]
  bad = [i for i, p in enumerate(procs) if p.returncode != 0]
  if bad:
    raise AssertionError("process(es) %s failed:\n%s" % (
        bad, "\n".join(f"--- process {i} ---\n{texts[i][-6000:]}" for i in bad)))
  return texts


def run_stages(workdir: str, overrides: dict, modes: Sequence[str], *, data_dir: str,
               processes: int = 2, devices: int = 4, timeout: float = 900) -> list[str]:
  """Runs the modes in P processes x `devices` devices; returns the processes' logs."""
  procs, logs = launch(workdir, overrides, modes, data_dir=data_dir, processes=processes,
                       devices=devices)
  return wait(procs, logs, timeout)


def _main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["overrides"].items()}
  overrides.setdefault("stability.other_workdir", spec["workdir"])
  for mode in spec["modes"]:
    config = tiny_config(spec["data_dir"], mode=mode, **overrides)
    try:
      stages.run(config, spec["workdir"])
    except stages.UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
  print("ALL MODES DONE", flush=True)


if __name__ == "__main__":
  _main(sys.argv[1])
