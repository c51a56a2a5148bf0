"""Shared helpers of the benchmark scripts (timing, JSON output, FLOP counting, compile counting).

Every script prints one JSON object per line and nothing else on stdout (progress goes to
stderr). Timings are medians over timed iterations after warm-up; compile time is reported
separately. Each record carries the platform, device count and the machine's load average at
the start of the measurement, because on a shared machine a timing taken under load is not
comparable with one taken on an idle machine.

Must be imported *after* the script has set XLA_FLAGS (see `set_host_device_count`).
"""

import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

from lfm_jax import huge_pages  # imports no jax


_HERE = os.path.dirname(os.path.abspath(__file__))


def set_host_device_count(n: Optional[int]) -> None:
  """Asks XLA for `n` host (CPU) devices; must run before jax is imported. No-op for None/0.

  Only the host platform is affected: on GPU/TPU the accelerator devices are used as they are.
  """
  if not n:
    return
  if "jax" in sys.modules:
    raise RuntimeError("set_host_device_count must run before jax is imported")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={int(n)}")
  os.environ["XLA_FLAGS"] = " ".join(flags)


def log(*args) -> None:
  print(*args, file=sys.stderr, flush=True)


def loadavg() -> Optional[float]:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def _busy_cpu_seconds() -> Optional[float]:
  """CPU seconds every process has spent busy since boot (/proc/stat), None off Linux."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
  except OSError:
    return None
  if not fields or fields[0] != "cpu":
    return None
  # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
  ticks = [int(v) for v in fields[1:]]
  busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
  return busy / os.sysconf("SC_CLK_TCK")


def cpu_mark() -> tuple:
  """A mark for `other_busy_cores`: (machine busy CPU s, this process's CPU s, wall s)."""
  return _busy_cpu_seconds(), time.process_time(), time.perf_counter()


def other_busy_cores(mark: Optional[tuple] = None, window_s: float = 2.0) -> Optional[float]:
  """Cores kept busy by *other* processes since `mark` (or over a `window_s` sleep); None off
  Linux.

  The machine's busy CPU time minus this process's own, divided by the wall time: unlike the
  load average, it does not count what this process itself ran a minute ago.
  """
  if mark is None:
    mark = cpu_mark()
    time.sleep(window_s)
  busy0, own0, wall0 = mark
  busy1, own1, wall1 = cpu_mark()
  if busy0 is None or busy1 is None or wall1 <= wall0:
    return None
  return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0), 2)


def environment() -> dict:
  """Platform facts attached to every record."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {
      "platform": dev.platform,
      "device_kind": getattr(dev, "device_kind", ""),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "huge_pages": huge_pages.active(),
  }


def emit(record: dict) -> None:
  """Prints one measurement as one JSON line on stdout."""
  print(json.dumps(record, sort_keys=False, default=_json_default), flush=True)


def _json_default(x):
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, np.ndarray):
      return x.tolist()
  except ImportError:
    pass
  return str(x)


def block(x: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int = 2) -> dict:
  """Runs fn() `warmup` times, then `iters` timed times (each blocked until ready).

  Returns wall-clock and process-CPU medians in ms (CPU time / wall time ≈ threads kept busy;
  CPU time is less sensitive to other processes on the machine than wall time), min and the
  load average before the timed loop.
  """
  for _ in range(warmup):
    block(fn())
  load = loadavg()
  walls, cpus = [], []
  for _ in range(iters):
    w0, c0 = time.perf_counter(), time.process_time()
    block(fn())
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return {
      "ms": 1e3 * statistics.median(walls),
      "ms_min": 1e3 * min(walls),
      "cpu_ms": 1e3 * statistics.median(cpus),
      "iters": iters,
      "loadavg": load,
  }


def time_stateful(step: Callable[[Any], Any], carry: Any, iters: int, warmup: int = 2):
  """Like time_calls for a step carry -> carry (e.g. a train step with a donated state)."""
  for _ in range(warmup):
    carry = block(step(carry))
  load = loadavg()
  walls, cpus = [], []
  for _ in range(iters):
    w0, c0 = time.perf_counter(), time.process_time()
    carry = block(step(carry))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  stats = {
      "ms": 1e3 * statistics.median(walls),
      "ms_min": 1e3 * min(walls),
      "cpu_ms": 1e3 * statistics.median(cpus),
      "iters": iters,
      "loadavg": load,
  }
  return carry, stats


def time_interleaved(fns: dict, iters: int, warmup: int = 2) -> dict:
  """Times several callables in alternation (A, B, A, B, ...) so that a change of machine load
  during the run hits all of them alike; returns {name: stats as time_calls}."""
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  load = loadavg()
  walls = {k: [] for k in fns}
  cpus = {k: [] for k in fns}
  for _ in range(iters):
    for k, fn in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      block(fn())
      walls[k].append(time.perf_counter() - w0)
      cpus[k].append(time.process_time() - c0)
  return {k: {"ms": 1e3 * statistics.median(walls[k]), "ms_min": 1e3 * min(walls[k]),
              "cpu_ms": 1e3 * statistics.median(cpus[k]), "iters": iters, "loadavg": load}
          for k in fns}


def xla_flops(compiled: Any) -> Optional[float]:
  """FLOPs of a compiled executable from XLA's cost analysis (None if the backend has none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def matmul_peak(n: int = 2048, iters: int = 20, dtype: str = "float32") -> dict:
  """This machine's dense matmul rate: jnp.dot of two n×n matrices (default precision)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(jnp.dot)
  t = time_calls(lambda: f(a, b), iters=iters, warmup=2)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": dtype, "flops": flops, "flops_per_s": flops / (t["ms"] * 1e-3),
          **t}


# ---------------------------------------------------------------------------------------------
# Analytic FLOPs of the model maths: 2 * multiply-adds of every dot_general and convolution in a
# jaxpr, kernel taps on padding included (the convention of PyTorch's FLOP counter and of
# fvcore-style counters), so that a convolution and its im2col + matmul form count the same.


def _conv_flops(eqn) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out feature dim, in feature dim, *spatial dims)
  rhs_spec = dn.rhs_spec
  kernel_spatial = np.prod([rhs.shape[d] for d in rhs_spec[2:]])
  cin_per_group = rhs.shape[rhs_spec[1]]
  del lhs
  # A transposed (input-gradient) conv of a strided conv has lhs_dilation > 1: only one tap in
  # prod(lhs_dilation) meets a real input element; the holes are not model maths.
  holes = float(np.prod(eqn.params.get("lhs_dilation", None) or (1,)))
  return 2.0 * float(np.prod(out.shape)) * float(kernel_spatial) * float(cin_per_group) / holes


def _dot_flops(eqn) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lc, _), _ = eqn.params["dimension_numbers"]
  contract = np.prod([lhs.shape[d] for d in lc]) if lc else 1
  return 2.0 * float(np.prod(out.shape)) * float(contract)


def jaxpr_matmul_flops(closed_jaxpr) -> float:
  """2 × MACs of all dot_general / conv_general_dilated in a (closed) jaxpr, sub-jaxprs included
  (scan bodies times their length; cond: the most expensive branch; while: one iteration)."""
  from jax.extend import core as jcore  # pylint: disable=g-import-not-at-top

  def walk(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        total += _dot_flops(eqn)
      elif name == "conv_general_dilated":
        total += _conv_flops(eqn)
      elif name == "scan":
        total += eqn.params["length"] * walk(eqn.params["jaxpr"].jaxpr)
      elif name == "cond":
        total += max(walk(b.jaxpr) for b in eqn.params["branches"])
      else:
        for v in eqn.params.values():
          for sub in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(sub, jcore.ClosedJaxpr):
              total += walk(sub.jaxpr)
            elif isinstance(sub, jcore.Jaxpr):
              total += walk(sub)
    return total

  return walk(closed_jaxpr.jaxpr)


# ---------------------------------------------------------------------------------------------
# Compilation counting via jax_log_compiles.


class CompileCounter(logging.Handler):
  """Counts "Finished XLA compilation of <name>" log records (jax_log_compiles) per function.

  Usage: counter = CompileCounter.install(); ...; counter.count("train_step").
  """

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.records: list[tuple[str, float]] = []

  def emit(self, record: logging.LogRecord) -> None:
    msg = record.getMessage()
    if msg.startswith("Finished XLA compilation of "):
      rest = msg[len("Finished XLA compilation of "):]
      name, _, tail = rest.rpartition(" in ")
      try:
        secs = float(tail.split()[0])
      except (ValueError, IndexError):
        secs = float("nan")
      self.records.append((name, secs))

  def count(self, substring: str = "") -> int:
    return sum(1 for name, _ in self.records if substring in name)

  def seconds(self, substring: str = "") -> float:
    return sum(s for name, s in self.records if substring in name)

  _instance: Optional["CompileCounter"] = None

  @classmethod
  def install(cls) -> "CompileCounter":
    """Turns on jax_log_compiles and attaches one shared counter (idempotent)."""
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_log_compiles", True)
    if cls._instance is not None:
      return cls._instance
    handler = cls._instance = cls()
    for name in ("jax._src.dispatch", "jax._src.interpreters.pxla"):
      lg = logging.getLogger(name)
      lg.addHandler(handler)
      lg.setLevel(logging.WARNING)
      lg.propagate = False  # keep stderr quiet; the handler still sees the records
    return handler


def common_args(parser, default_iters: int = 20) -> None:
  """--iters, --warmup, --quick, --host-devices, --out (also append the JSON lines to a file)."""
  parser.add_argument("--iters", type=int, default=default_iters,
                      help="timed iterations per measurement (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed iterations after compile")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few iterations (a smoke test, seconds)")
  parser.add_argument("--host-devices", type=int, default=0,
                      help="simulate N host (CPU) devices via XLA_FLAGS (0: the script's "
                           "default; train_step/profile_step: one per core like lfm_jax.main)")
  parser.add_argument("--precision", default=None,
                      help="jax_default_matmul_precision (default: jax's default)")


def default_host_devices() -> int:
  """What `python -m lfm_jax.main` uses for U-Nets: one host device per CPU core (at most 8), or
  $LFM_JAX_CPU_DEVICES (for DiT configs lfm_jax.main uses one device)."""
  return int(os.environ.get("LFM_JAX_CPU_DEVICES", min(os.cpu_count() or 1, 8)))


def pre_jax_setup(argv: Optional[Sequence[str]] = None, auto_host_devices: bool = False) -> None:
  """Applies --host-devices before jax is imported (scans argv by hand).

  auto_host_devices: without --host-devices, use default_host_devices() like lfm_jax.main
  does, unless XLA_FLAGS already sets a count or jax is already imported (tests).
  """
  main = sys.modules.get("__main__")
  if os.path.dirname(os.path.abspath(getattr(main, "__file__", None) or "")) == _HERE:
    # A script of this folder run as a program (not imported by a test): run as lfm_jax.main
    # runs, with huge pages for XLA's host buffers (lfm_jax/huge_pages.py).
    huge_pages.exec_with_huge_pages()
  argv = list(sys.argv[1:] if argv is None else argv)
  chosen = None
  for i, a in enumerate(argv):
    if a.startswith("--host-devices="):
      chosen = int(a.split("=", 1)[1])
    elif a == "--host-devices" and i + 1 < len(argv):
      chosen = int(argv[i + 1])
  if chosen is None and auto_host_devices and "jax" not in sys.modules and (
      "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
    chosen = default_host_devices()
  if chosen and "jax" not in sys.modules:
    set_host_device_count(chosen)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def post_jax_setup(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if args.precision:
    jax.config.update("jax_default_matmul_precision", args.precision)


# ---------------------------------------------------------------------------------------------
# Untrained velocity fields for the sampling benchmarks.


def random_params(init_fn: Callable[[Any], Any], seed: int = 0) -> Any:
  """Random parameters with the shapes of init_fn(rng)'s tree, drawn on the host (numpy).

  jax.eval_shape gives the shapes without compiling anything (a jitted Flax init of a U-Net
  compiles for longer than the quick benchmarks run). Kernels (ndim >= 2) ~ N(0, 1/fan_in),
  norm scales 1, other vectors N(0, 0.02²): an untrained but well-scaled network (timing does
  not depend on the values).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = str(path[-1]) if path else ""
    if len(s.shape) >= 2:
      fan_in = int(np.prod(s.shape[:-1]))
      x = rng.standard_normal(s.shape) / np.sqrt(max(fan_in, 1))
    elif "scale" in name:
      x = np.ones(s.shape)
    else:
      x = 0.02 * rng.standard_normal(s.shape)
    return jax.device_put(x.astype(s.dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def init_model_params(model: Any, shape: Sequence[int], seed: int = 0) -> Any:
  """Random params of a velocity network (batch-1, unconditional shapes), see random_params."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def init(rng):
    x = jnp.zeros((1,) + tuple(shape), jnp.float32)
    return model.init({"params": rng, "dropout": rng}, x, jnp.zeros((1,), jnp.float32))["params"]

  return random_params(init, seed)


def make_velocity(model: Any, data_std: float = 0.5):
  """velocity(t, z, params) = Gaussian-data marginal velocity (std data_std) + network(z, t).

  The analytic term (lfm_jax.flow.gaussian_marginal_velocity) gives the ODE the large-scale
  behaviour of a trained flow (noise contracts towards data); the untrained network adds a
  model-dependent residual and all of the cost. A module-level function of (t, z, args) so that
  lfm_jax.sampling reuses one compilation across parameter sets.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lfm_jax import flow  # pylint: disable=g-import-not-at-top

  def velocity(t, z, params):
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z.shape[0],))
    v_net = model.apply({"params": params}, z, tb, train=False)
    v_base = flow.gaussian_marginal_velocity(tb, z, 0.0, data_std)
    return v_base + v_net

  return velocity


def device_random_params(init_fn: Callable[[Any], Any], seed: int = 0, sharding: Any = None) -> Any:
  """Like random_params (same distributions), but drawn on the device under one jax.jit.

  For networks whose host-side draw would be slow (DiT-XL/2: 675M float32 values, seconds of
  numpy and a 2.7 GB transfer). `sharding`: the out_shardings of the jit (None: default
  placement).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
  paths = jax.tree_util.tree_flatten_with_path(shapes)[0]

  def draw(key):
    keys = jax.random.split(key, max(len(paths), 1))
    leaves = []
    for (path, s), k in zip(paths, keys):
      name = str(path[-1]) if path else ""
      if len(s.shape) >= 2:
        fan_in = int(np.prod(s.shape[:-1]))
        x = jax.random.normal(k, s.shape, jnp.float32) / np.sqrt(max(fan_in, 1))
      elif "scale" in name:
        x = jnp.ones(s.shape, jnp.float32)
      else:
        x = 0.02 * jax.random.normal(k, s.shape, jnp.float32)
      leaves.append(x.astype(s.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), leaves)

  return jax.jit(draw, out_shardings=sharding)(jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------
# Compiled memory and device peaks.


def memory_stats(compiled: Any) -> dict:
  """Per-device bytes of a compiled executable from XLA's `memory_analysis()`.

  arguments / outputs / temp / generated_code / alias are XLA's figures (an SPMD program's are
  those of one device's partition); total = arguments + outputs + temp - alias (a donated
  argument aliased to an output is counted once): what the executable holds while it runs.
  peak_xla is XLA's own `peak_memory_in_bytes` where this jaxlib reports one (None otherwise;
  on XLA:CPU it is a heuristic that can be below total). Returns {} when the backend has no
  memory analysis.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  if isinstance(m, (list, tuple)):
    m = m[0] if m else None
    if m is None:
      return {}
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "generated_code_bytes": int(m.generated_code_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
  }
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  peak = getattr(m, "peak_memory_in_bytes", None)
  out["peak_xla_bytes"] = int(peak) if peak is not None else None
  return out


def tree_bytes(tree: Any) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) of a tree of arrays or ShapeDtypeStructs;
  leaves without a sharding count whole on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = per_device = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape"):
      continue
    item = np.dtype(x.dtype).itemsize
    total += int(np.prod(x.shape, dtype=np.int64)) * item
    sharding = getattr(x, "sharding", None)
    shard = sharding.shard_shape(tuple(x.shape)) if sharding is not None else tuple(x.shape)
    per_device += int(np.prod(shard, dtype=np.int64)) * item
  return total, per_device


def gib(nbytes: Optional[float]) -> Optional[float]:
  return None if nbytes is None else round(nbytes / 2 ** 30, 3)


# Dense bf16 matrix rate (TFLOP/s) by device kind, for MFU. The H100/H200 SXM figure is what a
# large random bf16 matmul (8192^3) reaches on such a chip (769-798 measured); the vendor's
# datasheet gives 989 dense (1979 with 2:4 sparsity). Ordered: the first substring that
# matches the device kind wins.
KNOWN_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", None),  # other clocks and power: pass --peak-tflops
    ("H100 NVL", None),
    ("H200 NVL", None),
    ("H200", 790.0),
    ("H100", 790.0),
)


def known_peak_tflops(device_kind: str) -> Optional[float]:
  """The bf16 peak (TFLOP/s) this file knows for a device kind, or None."""
  for key, value in KNOWN_PEAK_BF16_TFLOPS:
    if key.lower() in str(device_kind).lower():
      return value  # None for the parts listed without a figure
  return None
