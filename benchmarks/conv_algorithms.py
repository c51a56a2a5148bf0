"""3×3 convolution algorithms at BENCH-U's shapes: XLA's convolution vs Winograd through matmuls.

For each shape (batch, H, W, C_in) -> C_out, stride 1, SAME padding, this times the forward and
the forward + both gradients (autodiff of each formulation) of
  lax    `lax.conv_general_dilated` (what lfm_jax's U-Net runs on maps at or above
         `small_map_threshold`),
  f23    Winograd F(2×2, 3×3): 4×4 input tiles, 16 batched (N, C_in) @ (C_in, C_out) matmuls,
  f43    Winograd F(4×4, 3×3): 6×6 input tiles, 36 batched matmuls,
compiled with the train step's options (`parallel.train_compiler_options()`), interleaved, and
prints one JSON line per shape and algorithm with the medians and the largest relative error of
the output and both gradients against `lax`.

Winograd's transforms are written as strided slices and adds of the padded input (B^T d B),
a matmul per tile position with the transformed kernel (G g G^T), and adds of the products
(A^T m A), following Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016).

Run:  python benchmarks/conv_algorithms.py [--rounds 5 --iters 5]
      python benchmarks/conv_algorithms.py --quick
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.pre_jax_setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

from lfm_jax import parallel  # noqa: E402

# (m, B^T, G, A^T) of F(m×m, 3×3).
WINOGRAD = {
    "f23": (2,
            [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
            [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
            [[1, 1, 1, 0], [0, 1, -1, -1]]),
    "f43": (4,
            [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
             [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
            [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
             [0, 1, -1, 8, -8, 1]]),
}
SHAPES = (((32, 16, 16, 64), 64), ((32, 8, 8, 128), 128), ((32, 16, 16, 128), 64),
          ((32, 8, 8, 256), 128), ((32, 4, 4, 128), 128))
QUICK_SHAPES = (((2, 8, 8, 8), 8),)


def _combine(matrix, parts):
  """[sum_j matrix[i][j] * parts[j] for each row i], skipping zero coefficients."""
  out = []
  for row in matrix:
    acc = None
    for c, p in zip(row, parts):
      if c == 0:
        continue
      term = p if c == 1 else -p if c == -1 else p * np.float32(c)
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def winograd_conv(x, w, algorithm: str = "f23"):
  """3×3, stride 1, SAME convolution (cross-correlation, as lax's) of NHWC x with HWIO w;
  H and W must be multiples of the tile's output size m."""
  m, bt, g, at = WINOGRAD[algorithm]
  a = m + 2
  b, h, wd, c = x.shape
  co = w.shape[-1]
  th, tw = h // m, wd // m
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [lax.slice(xp, (0, i, 0, 0), (b, i + m * (th - 1) + 1, wd + 2, c), (1, m, 1, 1))
          for i in range(a)]
  v = []
  for r in _combine(bt, rows):
    cols = [lax.slice(r, (0, 0, j, 0), (b, th, j + m * (tw - 1) + 1, c), (1, 1, m, 1))
            for j in range(a)]
    v += _combine(bt, cols)
  v = jnp.stack(v).reshape(a * a, b * th * tw, c)
  gm = jnp.asarray(g, jnp.float32)
  u = jnp.einsum("ai,ijcd,bj->abcd", gm, w, gm, precision=lax.Precision.HIGHEST)
  prod = lax.dot_general(v, u.reshape(a * a, c, co), (((2,), (1,)), ((0,), (0,))))
  prod = prod.reshape(a, a, b, th, tw, co)
  y = [_combine(at, [row[l] for l in range(a)]) for row in _combine(at, [prod[k] for k in range(a)])]
  y = jnp.stack([jnp.stack(row) for row in y])  # (m, m, b, th, tw, co)
  return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, wd, co)


def lax_conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def run_shape(shape, cout, rounds: int, iters: int, options) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1]), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape[:3] + (cout,)), jnp.float32)
  fns = {"lax": lax_conv}
  for name, (m, *_) in WINOGRAD.items():
    if shape[1] % m == 0 and shape[2] % m == 0:
      fns[name] = lambda x, w, name=name: winograd_conv(x, w, name)
  built = {}
  for name, fn in fns.items():
    def fwd_bwd(x, w, g, fn=fn):
      y, vjp = jax.vjp(fn, x, w)
      return (y,) + vjp(g)
    fwd = jax.jit(fn, compiler_options=options).lower(x, w).compile()
    both = jax.jit(fwd_bwd, compiler_options=options).lower(x, w, g).compile()
    built[name] = (fwd, both, jax.block_until_ready(both(x, w, g)))
  times = {name: ([], []) for name in built}
  for r in range(rounds):
    for name in (list(built) if r % 2 == 0 else list(built)[::-1]):
      fwd, both, _ = built[name]
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(x, w))
        t1 = time.perf_counter()
        jax.block_until_ready(both(x, w, g))
        times[name][0].append((t1 - t0) * 1e3)
        times[name][1].append((time.perf_counter() - t1) * 1e3)
  ref = built["lax"][2]
  recs = []
  for name, (_, _, out) in built.items():
    err = max(float(jnp.abs(o - r).max() / jnp.abs(r).max()) for o, r in zip(out, ref))
    recs.append({"kind": "conv_algorithm", "algorithm": name, "input": list(shape),
                 "out_channels": cout, "fwd_ms": round(float(np.median(times[name][0])), 3),
                 "fwd_bwd_ms": round(float(np.median(times[name][1])), 3),
                 "max_rel_error": err, "samples": len(times[name][0]), "loadavg": C.loadavg(),
                 **C.environment()})
  return recs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  C.common_args(p, default_iters=5)  # --iters: calls per algorithm and round
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  args = p.parse_args(argv)
  C.post_jax_setup(args)
  rounds, iters = args.rounds, args.iters
  if args.quick:
    rounds, iters = 2, 1
  options = parallel.train_compiler_options()
  for shape, cout in (QUICK_SHAPES if args.quick else SHAPES):
    for rec in run_shape(shape, cout, rounds, iters, options):
      C.emit(rec)


if __name__ == "__main__":
  main()
