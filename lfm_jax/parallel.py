"""Mesh and sharding helpers: data parallelism with `jax.jit` over a 1-D device mesh.

The mesh has one axis, "data". Batches are sharded on their leading axis over "data"; the train
state is replicated. Multi-host (TPU pods): `maybe_initialize_distributed()` is called first thing in
main; each host then feeds its own rows of every global batch and `host_local_to_global` assembles
the global arrays with `jax.make_array_from_process_local_data`.
"""

import functools
import os
from typing import Any, Callable, Mapping, Optional

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = "data"

# Environment variables that say "this is one process of a multi-process job".
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


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
  # SLURM with more than one task.
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return False


def maybe_initialize_distributed(environ: Optional[Mapping[str, str]] = None) -> bool:
  """Calls `jax.distributed.initialize()` when the platform describes a multi-process job.

  Must run before any other JAX call. Triggers: LFM_JAX_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS set,
  a TPU pod slice (TPU_WORKER_HOSTNAMES lists several hosts) or SLURM_NTASKS > 1. A plain
  single-host run (CPU, one GPU box, a single TPU VM) is never initialised. LFM_JAX_DISTRIBUTED=0
  forces it off. Returns True if initialised.
  """
  environ = os.environ if environ is None else environ
  if not _wants_distributed(environ):
    return False
  jax.distributed.initialize()
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


# XLA:CPU runs convolutions through YNNPACK by default in this jaxlib; its backward (input- and
# weight-gradient) convolutions are ~2.5x slower here than XLA's own (Eigen) ones. Training
# programs keep YNNPACK for what it does well here, dots and reductions, and leave convolutions
# (and elementwise fusions, which pull convolutions in and slow down small models) to XLA.
# Measured on 2 cores (benchmarks/README.md): BENCH-U step -25% on one device; the embedded
# default's step unchanged.
_CPU_TRAIN_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.lru_cache(maxsize=None)
def train_compiler_options() -> Optional[dict]:
  """XLA compiler options for jitted train steps: `jax.jit(..., compiler_options=...)`.

  None (XLA's defaults) on TPU/GPU, when $XLA_FLAGS already sets YNNPACK fusion, with
  $LFM_JAX_XLA_DEFAULTS=1, or when this jaxlib does not know the option (checked by compiling
  a tiny function once).
  """
  if jax.default_backend() != "cpu":
    return None
  if "ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return None
  if os.environ.get("LFM_JAX_XLA_DEFAULTS", "").lower() in ("1", "true", "yes"):
    return None
  options = dict(_CPU_TRAIN_COMPILER_OPTIONS)
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(np.zeros(2, np.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.info("XLA:CPU train compiler options not available (%s); using XLA's defaults", e)
    return None
  return options


def create_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh with axis "data" over the first `num_devices` devices (default: all).

  On multi-host jobs the mesh must span all devices (num_devices None or jax.device_count()).
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  if not 0 < num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
  if jax.process_count() > 1 and num_devices != len(devices):
    raise ValueError("On a multi-host job the mesh must use every device "
                     f"({len(devices)}), got num_devices={num_devices}")
  return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole on every device of the mesh."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of an array split along its leading (batch) axis over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of each global batch this host feeds; checks divisibility by devices and hosts."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {n} devices "
                     "of the mesh")
  return global_batch_size // jax.process_count()


def host_local_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This host's rows (dict of numpy arrays) -> global jax arrays sharded on "data".

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


def shard_state(state: Any, mesh: Mesh) -> Any:
  """Places every leaf of `state` replicated on the mesh (a copy; the input is left alone)."""
  return jax.device_put(state, replicated(mesh))


def _spec_str(sharding: Any) -> str:
  if isinstance(sharding, NamedSharding):
    return f"PartitionSpec{tuple(sharding.spec)}" if len(sharding.spec) else "replicated"
  return type(sharding).__name__


def sharding_table(tree: Any, max_rows: int = 12) -> str:
  """A short text table: one row per top-level field of `tree` (or per leaf group).

  Columns: field, number of arrays, number of elements, bytes, sharding spec(s), mesh.
  """
  if hasattr(tree, "__dataclass_fields__"):
    groups = [(name, getattr(tree, name)) for name in tree.__dataclass_fields__]
  elif isinstance(tree, Mapping):
    groups = list(tree.items())
  else:
    groups = [("tree", tree)]
  rows = [("field", "arrays", "elements", "MiB", "sharding", "mesh")]
  for name, sub in groups[:max_rows]:
    leaves = [x for x in jax.tree.leaves(sub) if hasattr(x, "shape")]
    specs, meshes = set(), set()
    for x in leaves:
      sharding = getattr(x, "sharding", None)
      specs.add(_spec_str(sharding) if sharding is not None else "host")
      if isinstance(sharding, NamedSharding):
        meshes.add(" x ".join(f"{k}={v}" for k, v in sharding.mesh.shape.items()))
    elements = sum(int(np.prod(x.shape)) for x in leaves)
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    rows.append((str(name), str(len(leaves)), f"{elements:,}", f"{nbytes / 2**20:.2f}",
                 ", ".join(sorted(specs)) or "-", ", ".join(sorted(meshes)) or "-"))
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
