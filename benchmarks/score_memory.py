"""Memory of the gradient-score step: XLA's memory analysis of the compiled scoring batch.

The gradient criterion (lfm_jax/scoring.py) takes the squared norm of every example's own
parameter gradient. Vmapping jax.grad over a whole batch holds batch x params gradient values at
once; `score.gradient_chunk_size` runs the batch in chunks one after another, so only
chunk x params are live. This script lowers the real scoring batch function
(scoring's gradient batch function with the protocol's 10 times x 2 noises) for a model against
abstract inputs (jax.ShapeDtypeStruct: no parameter is materialised, nothing runs) and prints the
compiled executable's temp (scratch) bytes for each chunk size, from `memory_analysis()`.

Models (`--model`):
  dit_s2    DiT-S/2 (33M params; paper 2's scoring model), unconditional, 32x32x4 latents
            (256^2 images, KL-f8), batch 256.
  tiny      a 1-block DiT of width 32 on 4x4x4 latents, batch 16 (seconds; --quick, tests).

One JSON line per chunk size ("kind": "score_memory": temp_bytes, temp_gib, argument_bytes,
output_bytes, compile_s, params) on stdout, and a line per chunk on stderr. The figures are
XLA:CPU's buffer assignment (backend-dependent for temp; the ratio is the point).

Run:  python benchmarks/score_memory.py                       # DiT-S/2, batch 256, chunks whole,8
      python benchmarks/score_memory.py --chunks 0,8,32 --batch-size 256
      python benchmarks/score_memory.py --quick
"""

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

MODELS = {
    "dit_s2": dict(preset="S/2", latent=(32, 32, 4), batch_size=256),
    "tiny": dict(preset=None, latent=(4, 4, 4), batch_size=16),
}


def _build(name: str):
  from lfm_jax.models.dit import DiT, dit_config  # pylint: disable=g-import-not-at-top
  spec = MODELS[name]
  if spec["preset"] is None:
    return DiT(hidden_size=32, depth=1, num_heads=2, patch_size=2, num_classes=0), spec
  return DiT(**dit_config(spec["preset"]), num_classes=0), spec


def measure(model: str = "dit_s2", chunks: Sequence[Optional[int]] = (None, 8),
            batch_size: Optional[int] = None, num_times: int = 10,
            num_noises: int = 2) -> list[dict]:
  """Compiled temp bytes of the gradient-score batch step for each chunk size (None: whole
  batch vmapped at once). Returns one record per chunk size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lfm_jax import flow, scoring  # pylint: disable=g-import-not-at-top
  module, spec = _build(model)
  b = int(batch_size or spec["batch_size"])
  shape = tuple(spec["latent"])

  def init(rng):
    return module.init(rng, jnp.zeros((1,) + shape), jnp.zeros((1,)))["params"]

  params = jax.eval_shape(init, jax.random.PRNGKey(0))
  n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  vfn = scoring.module_velocity_fn(module)
  z = jax.ShapeDtypeStruct((b,) + shape, jnp.float32)
  bank = jax.ShapeDtypeStruct((num_noises,) + shape, jnp.float32)
  ts = jax.ShapeDtypeStruct((num_times * num_noises,), jnp.float32)
  ms = jax.ShapeDtypeStruct((num_times * num_noises,), jnp.int32)
  out = []
  for chunk in chunks:
    fn = scoring._make_grad_batch_fn(  # pylint: disable=protected-access
        vfn, num_times, num_noises, flow.SIGMA_MIN, chunk)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, z, None, bank, ts, ms).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    if isinstance(m, (list, tuple)):
      m = m[0]
    record = {"kind": "score_memory", "model": model, "params": n_params, "batch_size": b,
              "latent_shape": list(shape), "num_times": num_times, "num_noises": num_noises,
              "chunk_size": chunk, "temp_bytes": int(m.temp_size_in_bytes),
              "temp_gib": round(int(m.temp_size_in_bytes) / 2 ** 30, 3),
              "argument_bytes": int(m.argument_size_in_bytes),
              "output_bytes": int(m.output_size_in_bytes), "compile_s": round(seconds, 2),
              "platform": jax.default_backend()}
    out.append(record)
    C.log(f"score memory: {model} batch {b}, chunk {chunk or 'whole batch'}: temp "
          f"{record['temp_gib']} GiB (compiled in {seconds:.1f} s)")
  return out


def _chunks(text: str) -> list[Optional[int]]:
  return [None if v.strip() in ("0", "none", "whole") else int(v) for v in text.split(",")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", choices=sorted(MODELS), default="dit_s2")
  p.add_argument("--chunks", default="0,8", help="chunk sizes, 0 = the whole batch at once")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--quick", action="store_true", help="the tiny model (seconds)")
  args = p.parse_args(argv)
  model = "tiny" if args.quick else args.model
  records = measure(model, _chunks(args.chunks), args.batch_size)
  for r in records:
    print(json.dumps(r), flush=True)
  return records


if __name__ == "__main__":
  main()
