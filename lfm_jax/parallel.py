"""Devices, meshes and shardings: data parallelism and FSDP with `jax.jit` over a 2-D mesh.

The mesh has two named axes, ("data", "fsdp") (`config.mesh.fsdp` devices on "fsdp", the rest on
"data"). Batches are sharded on their leading axis over both axes. Parameters, EMA and optimizer
state are sharded along "fsdp" by one rule (`fsdp_spec`): a leaf of at least
`FSDP_MIN_SIZE` elements is split along its largest dimension divisible by the fsdp size; smaller
leaves, and leaves with no such dimension, are replicated. With fsdp = 1 everything is replicated
(plain data parallelism). XLA inserts the all-gathers and reduce-scatters.

Hosts: `maybe_initialize_distributed()` starts `jax.distributed` when the platform describes a
multi-process job (first thing in a run, before any other JAX call). Each host then feeds its own
rows of every global batch (`host_local_to_global`), or every host computes the same global batch
and each device takes its slice (`global_from_full`); results come back to every host with
`to_host` (never `np.asarray` on an array other hosts hold parts of).
"""

import functools
import math
import os
import socket
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Leaves smaller than this stay replicated under FSDP (biases, norms, small tables).
FSDP_MIN_SIZE = 2 ** 14

# Environment variables that say "this is one process of a multi-process job".
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


class DistributedError(RuntimeError):
  """jax.distributed could not start; the message says what to check."""


def _wants_distributed(environ: Mapping[str, str]) -> bool:
  """True when the environment describes a multi-process JAX job."""
  if environ.get("LFM_JAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return True
  if environ.get("LFM_JAX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
    return False
  if any(environ.get(k) for k in _DISTRIBUTED_ENV):
    return True
  # Cloud TPU pod slice: one host name per worker.
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if hosts and len([h for h in hosts.split(",") if h]) > 1:
    return True
  # SLURM or Open MPI with more than one task.
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return False


def _explicit_cluster(environ: Mapping[str, str]) -> dict[str, Any]:
  """initialize() arguments given by environment variables (other platforms autodetect)."""
  kw = {}
  address = environ.get("JAX_COORDINATOR_ADDRESS") or environ.get("COORDINATOR_ADDRESS")
  if address:
    kw["coordinator_address"] = address
  if environ.get("JAX_NUM_PROCESSES"):
    kw["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
  if environ.get("JAX_PROCESS_ID"):
    kw["process_id"] = int(environ["JAX_PROCESS_ID"])
  return kw


def _wait_for_port(address: str, timeout_s: float) -> bool:
  """True once a TCP connection to host:port succeeds, False after `timeout_s` seconds."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return True
    except OSError:
      if time.monotonic() > deadline:
        return False
      time.sleep(0.5)


def maybe_initialize_distributed(environ: Optional[Mapping[str, str]] = None,
                                 timeout_s: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize()` when the platform describes a multi-process job.

  Must run before any other JAX call. Triggers: LFM_JAX_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS
  set, a TPU pod slice (TPU_WORKER_HOSTNAMES lists several hosts) or SLURM_NTASKS > 1; a plain
  single-host run is never initialised, and LFM_JAX_DISTRIBUTED=0 forces it off. The coordinator
  address, process count and process id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID when set (TPU pods and SLURM are detected by JAX itself). A coordinator that
  cannot be reached, or a process count that does not match the processes started, fails within
  `timeout_s` (default $LFM_JAX_DISTRIBUTED_TIMEOUT or 60 s) with DistributedError.
  Returns True if initialised.
  """
  environ = os.environ if environ is None else environ
  if not _wants_distributed(environ):
    return False
  if jax.distributed.is_initialized():
    return True
  timeout_s = int(timeout_s or environ.get("LFM_JAX_DISTRIBUTED_TIMEOUT", 60))
  kw = _explicit_cluster(environ)
  # CPU hosts talk over gloo; the option only concerns the CPU client.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  def fail(reason, cause=None):
    where = kw.get("coordinator_address", "the coordinator JAX detected")
    raise DistributedError(
        f"jax.distributed could not start within {timeout_s} s (coordinator {where}, "
        f"{kw.get('num_processes', '?')} processes, this is process {kw.get('process_id', '?')}):"
        f" {reason}. Check that every process runs the same command, that JAX_NUM_PROCESSES "
        "matches the processes started and that the coordinator address is reachable.") from cause

  # A client whose coordinator never answers is terminated from C++ (no Python exception), so
  # processes other than the coordinator's own first wait for its port here.
  if kw.get("coordinator_address") and kw.get("process_id", 0) != 0:
    if not _wait_for_port(kw["coordinator_address"], timeout_s):
      fail("nothing listens at the coordinator address")
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
  except Exception as e:  # pylint: disable=broad-except
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__, e)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# XLA:CPU runs convolutions through YNNPACK by default in this jaxlib; its backward (input- and
# weight-gradient) convolutions are slower than XLA's own (Eigen) ones. Training programs keep
# YNNPACK for what it does well here, dots and reductions, and leave convolutions (and
# elementwise fusions, which pull convolutions in and slow down small models) to XLA.
# Inference programs (forward passes only: ODE solves, decoders) keep YNNPACK for convolutions
# only: a DiT forward's dots and reductions are faster in XLA's own kernels, while a U-Net's
# forward convolutions are faster in YNNPACK; the results are the same.
# benchmarks/README.md has the measurements.
_CPU_COMPILER_OPTIONS = {
    "train": {
        "xla_cpu_experimental_ynn_fusion_type":
            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    },
    "inference": {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
}


@functools.lru_cache(maxsize=None)
def _cpu_compiler_options(kind: str) -> Optional[dict]:
  if jax.default_backend() != "cpu":
    return None
  if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return None
  if os.environ.get("LFM_JAX_XLA_DEFAULTS", "").lower() in ("1", "true", "yes"):
    return None
  options = dict(_CPU_COMPILER_OPTIONS[kind])
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.zeros(2, np.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.info("XLA:CPU %s compiler options not available (%s); using XLA's defaults", kind, e)
    return None
  return options


def train_compiler_options() -> Optional[dict]:
  """XLA compiler options for jitted train steps: `jax.jit(..., compiler_options=...)`.

  None (XLA's defaults) on TPU/GPU, when $XLA_FLAGS already sets YNNPACK fusion, with
  $LFM_JAX_XLA_DEFAULTS=1, or when this jaxlib does not know the option (checked by compiling
  a tiny function once).
  """
  return _cpu_compiler_options("train")


def inference_compiler_options() -> Optional[dict]:
  """XLA compiler options for jitted forward-only programs (sampling, decoding): on CPU,
  YNNPACK for convolutions only. None in the same cases as `train_compiler_options`."""
  return _cpu_compiler_options("inference")


# ----------------------------------------------------------------------------------- meshes


def check_fsdp(fsdp: int, num_devices: int) -> None:
  """Raises ValueError naming config.mesh.fsdp when it does not divide the device count."""
  if not isinstance(fsdp, int) or fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"config.mesh.fsdp: must be a positive integer dividing the "
                     f"{num_devices} devices, got {fsdp!r}")


def create_mesh(num_devices: Optional[int] = None, fsdp: int = 1) -> Mesh:
  """A ("data", "fsdp") mesh over the first `num_devices` devices (default: all).

  fsdp devices form the "fsdp" axis (neighbouring devices: on a TPU slice those share the fastest
  links), num_devices // fsdp the "data" axis. On multi-host jobs the mesh spans every device.
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  if not 0 < num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError("On a multi-host job the mesh must use every device "
                     f"({len(devices)}), got num_devices={num_devices}")
  check_fsdp(fsdp, num_devices)
  grid = np.asarray(devices[:num_devices]).reshape(num_devices // fsdp, fsdp)
  return Mesh(grid, BATCH_AXES)


def mesh_from_config(config) -> Mesh:
  """The mesh of a run: every device, config.mesh.fsdp of them on the "fsdp" axis."""
  return create_mesh(fsdp=int(config.mesh.fsdp))


def local_mesh() -> Mesh:
  """A mesh over this process's own devices (for work each host does on its own data)."""
  devices = np.asarray(jax.local_devices()).reshape(-1, 1)
  return Mesh(devices, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device of the mesh."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of an array split along its leading (batch) axis over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of a state leaf: split along its largest dimension divisible by fsdp
  (the last such one on ties) when it has at least min_size elements; replicated otherwise."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % fsdp == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def state_sharding(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (possibly abstract) state tree, by `fsdp_spec`."""
  fsdp = int(mesh.shape[FSDP_AXIS])
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp)), tree)


def with_sharding(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def shard_mean(fn: Callable, mesh: Mesh) -> Callable:
  """`fn(params, rng, batch) -> tree` computed per batch shard and averaged in shard order.

  The returned function takes the same arguments: `batch` (a pytree of batch-major arrays, None
  leaves allowed) is split over the batch axes, every device runs `fn` on its shard with
  `rng` folded with the shard's index, and the shards' results are all-gathered and averaged
  along the gathered axis. The sum's order is the shards' order, not the all-reduce's (whose
  rounding depends on the host layout), so layouts with the same number of shards (1 process x
  8 devices, 2 x 4, 8 x 1) agree as far as each shard's own computation does: exactly where
  the per-device program is the same; XLA:CPU partitions elementwise loops over threads by the
  local device count, which moves their last bits. Costs one gathered copy of the result per
  device (the number of shards times the gradient's size).
  """
  axes = BATCH_AXES

  def local(params, rng, batch):
    index = jax.lax.axis_index(axes)
    out = fn(params, jax.random.fold_in(rng, index), batch)
    gathered = jax.lax.all_gather(out, axes)
    return jax.tree.map(lambda g: (g.sum(axis=0) / g.shape[0]).astype(g.dtype), gathered)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axes)), out_specs=P(),
                       check_vma=False)


def num_batch_shards(mesh: Mesh) -> int:
  """How many pieces a batch is split into (every device holds one)."""
  return int(mesh.devices.size)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of each global batch this host feeds; checks divisibility by devices and hosts."""
  n = num_batch_shards(mesh)
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} devices "
                     "of the mesh")
  return global_batch_size // jax.process_count()


def host_local_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows (dict of numpy arrays) -> global jax arrays sharded on the batch axis.

  Each host passes its own slice (global_batch / process_count rows); on a single host that is the
  whole batch. Returns a dict with the same keys; the leading axis of each array is the global batch.
  """
  sharding = data_sharded(mesh)
  n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] == 0 or value.shape[0] % n_local:
      raise ValueError(f"batch[{key!r}] has shape {value.shape}: its leading axis must be divisible "
                       f"by this host's {n_local} devices")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def global_from_full(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every host holds whole (each device takes its slice)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: Any) -> Any:
  """numpy copies of (a tree of) global arrays, whole, on every host."""
  def one(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
      return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return jax.tree.map(one, x)


_BARRIERS = {}


def sync(name: str, timeout_s: float = 1800) -> None:
  """A barrier across hosts (no-op on one host).

  It waits in jax.distributed's coordination service, not in a device collective, so one host
  may spend minutes on work of its own (process 0 writing an export to a bucket) while the
  others wait; the CPU backend's collectives give up on a peer that is 30 s late to a new
  collective, so the hosts meet here before collectives that follow work of uneven length.
  """
  if jax.process_count() == 1:
    return
  count = _BARRIERS[name] = _BARRIERS.get(name, 0) + 1
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None or not hasattr(client, "wait_at_barrier"):
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"lfm_jax/{name}/{count}", int(timeout_s * 1000))


def broadcast_from_first(value: np.ndarray) -> np.ndarray:
  """process 0's value of a small numpy array, on every host."""
  if jax.process_count() == 1:
    return np.asarray(value)
  sync("broadcast")
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def sum_over_hosts(value: np.ndarray) -> np.ndarray:
  """The elementwise sum over hosts of a small numpy array (float64 kept), on every host."""
  value = np.asarray(value)
  if jax.process_count() == 1:
    return value
  sync("sum_over_hosts")
  gathered = np.asarray(multihost_utils.process_allgather(value))
  return gathered.sum(axis=0)


def shard_state(state: Any, mesh: Mesh) -> Any:
  """Places every leaf of `state` on the mesh by the FSDP rule (a copy; the input is left alone)."""
  return jax.device_put(state, state_sharding(state, mesh))


# ----------------------------------------------------------------------------------- reporting


def _spec_str(sharding: Any) -> str:
  if isinstance(sharding, NamedSharding):
    return f"PartitionSpec{tuple(sharding.spec)}" if len(sharding.spec) else "replicated"
  return type(sharding).__name__


def sharding_table(tree: Any, max_rows: int = 12) -> str:
  """A short text table: one row per top-level field of `tree` (or per leaf group).

  Columns: field, number of arrays, number of elements, MiB (whole), MiB per device, sharding
  spec(s), mesh.
  """
  if hasattr(tree, "__dataclass_fields__"):
    groups = [(name, getattr(tree, name)) for name in tree.__dataclass_fields__]
  elif isinstance(tree, Mapping):
    groups = list(tree.items())
  else:
    groups = [("tree", tree)]
  rows = [("field", "arrays", "elements", "MiB", "MiB/device", "sharding", "mesh")]
  for name, sub in groups[:max_rows]:
    leaves = [x for x in jax.tree.leaves(sub) if hasattr(x, "shape")]
    specs, meshes = set(), set()
    per_device = 0.0
    for x in leaves:
      sharding = getattr(x, "sharding", None)
      specs.add(_spec_str(sharding) if sharding is not None else "host")
      nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      if isinstance(sharding, NamedSharding):
        meshes.add(" x ".join(f"{k}={v}" for k, v in sharding.mesh.shape.items()))
        split = math.prod(sharding.mesh.shape[a] for s in sharding.spec if s is not None
                          for a in ((s,) if isinstance(s, str) else s))
        per_device += nbytes / split
      else:
        per_device += nbytes
    elements = sum(int(np.prod(x.shape)) for x in leaves)
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    rows.append((str(name), str(len(leaves)), f"{elements:,}", f"{nbytes / 2**20:.2f}",
                 f"{per_device / 2**20:.2f}", ", ".join(sorted(specs)) or "-",
                 ", ".join(sorted(meshes)) or "-"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def print_shardings(tree: Any, title: str = "Train state shardings",
                    print_fn: Callable[[str], None] = print,
                    batch_sharding: Optional[NamedSharding] = None) -> str:
  """Prints (via print_fn) and returns `sharding_table(tree)` under a title line.

  If batch_sharding is given, one more line states how batches are placed.
  """
  text = f"{title}:\n{sharding_table(tree)}"
  if batch_sharding is not None:
    text += (f"\nbatch: {_spec_str(batch_sharding)} over mesh "
             f"{dict(batch_sharding.mesh.shape)} ({jax.process_count()} process(es))")
  print_fn(text)
  return text
