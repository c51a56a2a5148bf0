"""Memory benchmark: per-device bytes of the compiled flow train step, from XLA's memory analysis.

The step is the real one (lfm_jax.train.make_train_step + jit_train_step: state sharded by the
FSDP rule and donated, batch sharded over ("data", "fsdp")), lowered against abstract inputs
(ShapeDtypeStructs from train.abstract_train_state: no parameter is ever materialised) and
compiled for a mesh of --devices devices. On CPU the script asks XLA for that many host devices
(default 8) before jax is imported, so an 8-device program is compiled and analysed on one host.

Models (`--models`):
  dit_xl2   DiT-XL/2 (675M params) on 32x32x4 latents (256^2 images, KL-f8), global batch 256.
  dit_b2    DiT-B/2 (130M params), the same latents and batch.
  adm       the CelebA-HQ 256 ADM U-Net of configs/celeba_hq_256_adm.py on 32x32x4 latents,
            global batch 112 (that config's).
  tiny_dit, tiny_unet   small stand-ins for --quick (seconds).
Every model trains unconditionally with AdamW (no clipping) and an EMA (decay 0.9999) in the
state: params, EMA, Adam mu and nu are four float32 copies of the parameters.

Grid: --fsdp (1,8) x --remat (none,blocks) x --dtypes (float32,bfloat16: train.compute_dtype,
params stay float32).

One JSON line per grid point ("kind": "memory"), per device: argument_bytes (state shard +
batch shard), output_bytes, temp_bytes, generated_code_bytes, alias_bytes (donated state reused
for the new state), total_bytes = arguments + outputs + temp - alias (what the executable holds
while it runs; XLA's own peak_memory_in_bytes is peak_xla_bytes, a heuristic on XLA:CPU), and
state_bytes_per_device (the state's shards by the FSDP rule, from the shardings alone). Then one
"memory_goal" line (DiT-XL/2, fsdp 8 + remat blocks <= 16 GB per device) and a table on stderr.

On CPU these are XLA:CPU's buffer assignment of the partitioned program, compiled with
--cpu-memory-model remat_aware (default; see CPU_MEMORY_MODELS: it keeps jax.checkpoint's
optimisation barriers, without which XLA:CPU undoes rematerialisation and `remat` saves nothing;
xla_cpu_default shows that). The state and batch parts (arguments, outputs, alias) are the same
on any backend. temp (activations, gradients, collective buffers) depends on the backend's
fusion and scheduling. XLA:CPU runs bfloat16 matmuls in float32 (f32 copies of their operands
and results appear among its buffers), so its bf16 temp stays close to the fp32 one where a GPU
or TPU keeps those activations in bf16: read the CPU's bf16 temp as an upper bound. On an
accelerator the script compiles for its real devices (accelerator.py reports each train step's
memory analysis too).

Run:  python benchmarks/memory.py                                  # both models, full grid
      python benchmarks/memory.py --models dit_xl2 --fsdp 8 --remat blocks --dtypes bfloat16
      python benchmarks/memory.py --models dit_xl2 --devices 1 --batch-size 128   # one device
      python benchmarks/memory.py --quick                          # tiny models (seconds)
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def _default_host_devices(argv) -> None:
  """8 host devices, unless --host-devices, --devices, XLA_FLAGS or an imported jax decide."""
  if "jax" in sys.modules or "xla_force_host_platform_device_count" in os.environ.get(
      "XLA_FLAGS", ""):
    return
  if any(a.startswith("--host-devices") for a in argv):
    return
  n = 8
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      n = int(a.split("=", 1)[1])
    elif a == "--devices" and i + 1 < len(argv):
      n = int(argv[i + 1])
  C.set_host_device_count(n)


if __name__ == "__main__":
  _default_host_devices(sys.argv[1:])
C.pre_jax_setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lfm_jax import models  # noqa: E402
from lfm_jax import optim  # noqa: E402
from lfm_jax import parallel  # noqa: E402
from lfm_jax import precision  # noqa: E402
from lfm_jax import train  # noqa: E402

GOAL_BYTES = 16 * 10 ** 9  # DiT-XL/2 with fsdp 8 + remat: at most 16 GB per device
MODELS = ("dit_xl2", "dit_b2", "adm", "tiny_dit", "tiny_unet")


def _ints(s):
  return [int(v) for v in str(s).split(",") if v.strip()]


def _names(s):
  return [v.strip() for v in str(s).split(",") if v.strip()]


def model_config(name: str):
  """(config, latent_shape, global batch size, display name) of a benchmark model."""
  if name == "adm":
    from configs import celeba_hq_256_adm  # pylint: disable=g-import-not-at-top
    config = celeba_hq_256_adm.get_config()
    shape, batch, label = (32, 32, 4), int(config.train.batch_size), "ADM U-Net (CelebA-HQ 256)"
  else:
    from configs import default  # pylint: disable=g-import-not-at-top
    config = default.get_config()
    m = config.model
    if name in ("dit_xl2", "dit_b2"):
      m.name, m.dit_preset = "dit", "XL/2" if name == "dit_xl2" else "B/2"
      shape, batch, label = (32, 32, 4), 256, "DiT-" + m.dit_preset
    elif name == "tiny_dit":
      # Wide enough (128) that its kernels reach parallel.FSDP_MIN_SIZE and are sharded.
      m.name, m.dit_preset = "dit", None
      # Batch 256 on 64 tokens: activations outweigh the state, as in the large models.
      m.hidden_size, m.depth, m.num_heads, m.patch_size, m.mlp_ratio = 128, 3, 4, 2, 4.0
      shape, batch, label = (16, 16, 4), 256, "tiny DiT (128x3, patch 2)"
    elif name == "tiny_unet":
      m.name = "unet"
      m.model_channels, m.channel_mult, m.num_res_blocks = 64, (1, 2), 1
      m.attention_resolutions, m.attention_semantics, m.num_heads = (4,), "resolution", 4
      m.norm_num_groups = 16
      shape, batch, label = (8, 8, 4), 32, "tiny U-Net (64, mult 1,2)"
    else:
      raise ValueError(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
  config.model.num_classes = 0
  config.model.dropout = 0.0
  t = config.train
  t.optimizer, t.learning_rate, t.weight_decay, t.grad_clip_norm = "adamw", 1e-4, 0.0, 0.0
  t.schedule, t.warmup_steps = "constant", 0
  t.ema_decay, t.grad_accum_steps = 0.9999, 1
  return config, shape, batch, label


# jax.checkpoint puts an optimization barrier on a rematerialised block's inputs so that XLA can
# neither merge the recomputation with the forward pass (CSE) nor run it before the gradient
# reaches the block. XLA:CPU expands these barriers early in its pipeline (the
# "cse_barrier_expander" pass), after which CSE and the scheduler undo the rematerialisation:
# remat saves nothing there. "remat_aware" keeps the barriers (disables that pass), as the
# GPU/TPU pipelines keep them through scheduling. The backend optimisation level only concerns
# LLVM code generation (the buffer assignment comes out byte-identical) and shortens compiles.
CPU_MEMORY_MODELS = {
    "remat_aware": {"xla_disable_hlo_passes": "cse_barrier_expander",
                    "xla_backend_optimization_level": 0},
    "xla_cpu_default": {"xla_backend_optimization_level": 0},
}


def measure(name: str, fsdp: int, remat: str, dtype: str, *, num_devices: int,
            batch_size: int = 0, cpu_memory_model: str = "remat_aware") -> dict:
  """Lowers and compiles the train step for one grid point and returns its memory record."""
  config, shape, batch, label = model_config(name)
  batch = batch_size or batch
  config.model.remat = remat
  config.train.compute_dtype = dtype
  config.train.batch_size = batch
  mesh = parallel.create_mesh(num_devices, fsdp=fsdp)
  parallel.local_batch_size(batch, mesh)  # a clear error when the batch does not divide
  model = models.create_model(config.model, shape,
                              dtype=precision.dtype_from_name(dtype, "train.compute_dtype"))
  tx, schedule = optim.create_optimizer(config.train)
  state = train.abstract_train_state(jax.random.PRNGKey(0), model, config, shape, tx, mesh)
  step = train.jit_train_step(train.make_train_step(model, config, tx, schedule, mesh=mesh),
                              mesh, state)
  batch_struct = {"latent": jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32,
                                                 sharding=parallel.data_sharded(mesh))}
  t0 = time.perf_counter()
  lowered = step.lower(state, batch_struct)
  t1 = time.perf_counter()
  options = (CPU_MEMORY_MODELS[cpu_memory_model] if jax.default_backend() == "cpu" else None)
  compiled = lowered.compile(options)
  t2 = time.perf_counter()
  mem = C.memory_stats(compiled)
  del compiled, lowered
  gc.collect()
  if not mem:
    raise RuntimeError(f"the {jax.default_backend()} backend has no memory_analysis()")
  state_total, state_dev = C.tree_bytes(state)
  params_total, params_dev = C.tree_bytes(state.params)
  _, batch_dev = C.tree_bytes(batch_struct)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  return {
      "kind": "memory", "model": name, "model_name": label, "params": n_params,
      "latent_shape": list(shape), "global_batch": batch,
      "batch_per_device": batch // num_devices, "devices": num_devices,
      "fsdp": fsdp, "data": num_devices // fsdp, "remat": remat, "compute_dtype": dtype,
      "optimizer": "adamw", "ema": True,
      "state_bytes_total": state_total, "state_bytes_per_device": state_dev,
      "params_bytes_per_device": params_dev, "batch_bytes_per_device": batch_dev,
      **mem,
      "total_gib": C.gib(mem["total_bytes"]), "temp_gib": C.gib(mem["temp_bytes"]),
      "state_gib_per_device": C.gib(state_dev),
      "total_formula": "argument + output + temp - alias",
      "backend": jax.default_backend(),
      "cpu_memory_model": cpu_memory_model if jax.default_backend() == "cpu" else None,
      "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
      **C.environment(),
  }


def table(records) -> str:
  """A compact text table of memory records (per device; GiB, or MiB for small models)."""
  big = max(r["total_bytes"] for r in records) >= 2 ** 30
  unit, scale = ("GiB", 2 ** 30) if big else ("MiB", 2 ** 20)
  head = ("model", "fsdp", "remat", "dtype", "state", "args", "out", "alias", "temp", "total")
  rows = [head]
  for r in records:
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(r["compute_dtype"], r["compute_dtype"])
    rows.append((r["model_name"], str(r["fsdp"]), r["remat"], dtype,
                 *(f"{r[k] / scale:.2f}" for k in ("state_bytes_per_device", "argument_bytes",
                                                   "output_bytes", "alias_bytes", "temp_bytes",
                                                   "total_bytes"))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  r0 = records[0]
  lines.append(f"({unit} per device on {r0['devices']} {r0['backend']} devices; "
               "total = args + out + temp - alias"
               + (f"; XLA:CPU options {r0['cpu_memory_model']}" if r0["cpu_memory_model"] else "")
               + ")")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="dit_xl2,adm", help=f"comma list of {', '.join(MODELS)}")
  p.add_argument("--fsdp", default="1,8", help="comma list of config.mesh.fsdp values")
  p.add_argument("--remat", default="none,blocks", help="comma list of config.model.remat values")
  p.add_argument("--dtypes", default="float32,bfloat16", help="train.compute_dtype values")
  p.add_argument("--devices", type=int, default=8, help="mesh size (data x fsdp)")
  p.add_argument("--batch-size", type=int, default=0, help="global batch (0: the model's)")
  p.add_argument("--quick", action="store_true",
                 help="the tiny DiT at (fsdp 1, none), (fsdp 8, none), (fsdp 8, blocks), float32")
  p.add_argument("--cpu-memory-model", default="remat_aware", choices=sorted(CPU_MEMORY_MODELS),
                 help="XLA:CPU compile options (see CPU_MEMORY_MODELS; ignored off CPU)")
  p.add_argument("--host-devices", type=int, default=0,
                 help="simulated CPU devices (default: --devices; set before jax is imported)")
  args = p.parse_args(argv)
  defaults = {a.dest: a.default for a in p._actions}  # pylint: disable=protected-access
  names, remats, dtypes = _names(args.models), _names(args.remat), _names(args.dtypes)
  fsdps = _ints(args.fsdp)
  points = [(f, r) for f in fsdps for r in remats]
  if args.quick:
    if args.models == defaults["models"]:
      names = ["tiny_dit"]
    if args.dtypes == defaults["dtypes"]:
      dtypes = ["float32"]
    if args.fsdp == defaults["fsdp"] and args.remat == defaults["remat"]:
      # fsdp alone, then remat alone: each effect measured against one reference.
      points = [(1, "none"), (args.devices, "none"), (args.devices, "blocks")]
  for n in names:
    if n not in MODELS:
      p.error(f"--models: unknown model {n!r}; known: {', '.join(MODELS)}")
  for r in remats:
    if r not in models.REMAT_CHOICES:
      p.error(f"--remat: {r!r} is not one of {list(models.REMAT_CHOICES)}")
  for d in dtypes:
    if d not in precision.DTYPES:
      p.error(f"--dtypes: {d!r} is not one of {list(precision.DTYPES)}")
  if jax.device_count() < args.devices:
    p.error(f"--devices {args.devices} but {jax.device_count()} {jax.default_backend()} devices "
            f"are available (on CPU: --host-devices {args.devices}, before jax is imported)")
  for f, _ in points:
    parallel.check_fsdp(f, args.devices)

  records = []
  for name in names:
    for dtype in dtypes:
      for fsdp, remat in points:
        C.log(f"[memory] {name} fsdp={fsdp} remat={remat} {dtype} ...")
        rec = measure(name, fsdp, remat, dtype, num_devices=args.devices,
                      batch_size=args.batch_size, cpu_memory_model=args.cpu_memory_model)
        C.emit(rec)
        records.append(rec)
  goal = [r for r in records if r["model"] == "dit_xl2" and r["fsdp"] == 8
          and r["remat"] != "none"]
  for r in goal:
    C.emit({"kind": "memory_goal", "model": r["model"], "fsdp": r["fsdp"], "remat": r["remat"],
            "compute_dtype": r["compute_dtype"], "global_batch": r["global_batch"],
            "devices": r["devices"], "total_bytes": r["total_bytes"],
            "total_gb": round(r["total_bytes"] / 1e9, 3), "total_gib": r["total_gib"],
            "goal_bytes": GOAL_BYTES, "meets_goal": r["total_bytes"] <= GOAL_BYTES,
            "backend": r["backend"], "cpu_memory_model": r["cpu_memory_model"]})
  if records:
    print(table(records), file=sys.stderr)
  return records


if __name__ == "__main__":
  main()
