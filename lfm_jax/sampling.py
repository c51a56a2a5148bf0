"""ODE sampling with diffrax, in LFM's time convention (t = 1 noise -> t = 0 data).

`sample` integrates dz/dt = v(t, z) from t = 1 (z = noise) to t = 0 with a fixed-step or an
adaptive solver; `sample_coarse_to_fine` runs a light velocity on the noise side of the trajectory
and a heavy one on the data side (the coarse-to-fine sampler of "Exploring and Exploiting Stability in Latent Flow Matching").

velocity_fn(t, z) -> v takes t as a scalar array and z of shape (B, ...) (NHWC latents), or, when
`args` is given, velocity_fn(t, z, args) -> v: pass network parameters through `args` so that
the compiled solve is reused across calls with new parameters (the function itself is a static
argument of the jitted solve: the same function object reuses the same compilation).

info["nfe"] is the number of velocity evaluations the solve made (each evaluates the whole batch).
For adaptive solvers (Dopri5, Tsit5: first-same-as-last) it is 1 + 6 per attempted (accepted or
rejected) step, checked against a counting velocity in tests/test_sampling.py; diffrax re-evaluates
the first stage when the very first attempted step is rejected, which this count omits (at most a
handful of evaluations; none at the default tolerances).
"""

import functools
from typing import Any, Callable, Optional, Sequence, Union

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax import parallel

VelocityFn = Callable[..., jax.Array]


class RK4(diffrax.AbstractERK):
  """The classical 4th-order Runge-Kutta method (fixed step; no error estimate)."""

  tableau = diffrax.ButcherTableau(
      c=np.array([0.5, 0.5, 1.0]),
      b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
      b_error=np.zeros(4),
      a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
  )
  interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

  def order(self, terms):
    del terms
    return 4


# name -> (solver class, velocity evaluations per step, adaptive)
_SOLVERS = {
    "euler": (diffrax.Euler, 1, False),
    "heun": (diffrax.Heun, 2, False),
    "midpoint": (diffrax.Midpoint, 2, False),
    "rk4": (RK4, 4, False),
    "dopri5": (diffrax.Dopri5, 6, True),
    "tsit5": (diffrax.Tsit5, 6, True),
}
SOLVERS = tuple(_SOLVERS)


def _canonical_solver(solver: str) -> str:
  name = str(solver).lower()
  if name not in _SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
  return name


def is_adaptive(solver: str) -> bool:
  """True for the adaptive (error-controlled) solvers."""
  return _SOLVERS[_canonical_solver(solver)][2]


def solve(velocity_fn: VelocityFn, z: jax.Array, args: Any = None, *, solver: str,
          num_steps: Optional[int] = None, rtol: float = 1e-5, atol: float = 1e-5,
          max_steps: int = 4096, t_start: float = 1.0, t_end: float = 0.0
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One diffrax solve from t_start to t_end, traceable (jit / vmap it as needed).

  Returns (z(t_end), nfe, failed): nfe the velocity evaluations made (int32 scalar), failed True
  when the adaptive solver ran out of `max_steps`. Under jax.vmap over z (and per-sample args)
  every sample gets its own step sizes and its own nfe.
  """
  solver = _canonical_solver(solver)
  cls, evals_per_step, adaptive = _SOLVERS[solver]
  if args is None:
    term = diffrax.ODETerm(lambda t, y, _: velocity_fn(t, y))
  else:
    term = diffrax.ODETerm(lambda t, y, a: velocity_fn(t, y, a))
  if adaptive:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = None
  else:
    if num_steps is None or int(num_steps) < 1:
      raise ValueError(f"solver {solver!r} is fixed-step and needs num_steps >= 1, got {num_steps}")
    controller = diffrax.ConstantStepSize()
    dt0 = (t_end - t_start) / int(num_steps)
  sol = diffrax.diffeqsolve(
      term, cls(), t0=t_start, t1=t_end, dt0=dt0, y0=z, args=args,
      stepsize_controller=controller, saveat=diffrax.SaveAt(t1=True),
      max_steps=max_steps if adaptive else int(num_steps),
      throw=False,
  )
  steps = sol.stats["num_accepted_steps"] + sol.stats["num_rejected_steps"]
  nfe = steps * evals_per_step
  if adaptive:
    nfe = nfe + 1  # the first-same-as-last initial stage (verified by counting in tests)
  failed = sol.result != diffrax.RESULTS.successful
  return sol.ys[0], nfe, failed


def _solve(velocity_fn, z, args, t_start, t_end, solver, num_steps, rtol, atol, max_steps):
  return solve(velocity_fn, z, args, solver=solver, num_steps=num_steps, rtol=rtol, atol=atol,
               max_steps=max_steps, t_start=t_start, t_end=t_end)


def _sample(velocity_fn, noise, args, *, solver, num_steps, rtol, atol, max_steps, t_start, t_end):
  return _solve(velocity_fn, noise, args, t_start, t_end, solver, num_steps, rtol, atol, max_steps)


@functools.lru_cache(maxsize=None)
def _sample_jit() -> Callable:
  """The jitted `_sample` with the forward-only compiler options, built on first use (not at
  import: the options query the backend, which jax.distributed must set up first)."""
  return jax.jit(_sample, static_argnames=("velocity_fn", "solver", "num_steps", "rtol", "atol",
                                           "max_steps", "t_start", "t_end"),
                 compiler_options=parallel.inference_compiler_options())


def _info(nfe, failed, solver):
  info = {"nfe": nfe, "failed": failed, "solver": solver}
  return info


def sample(
    velocity_fn: VelocityFn,
    noise: jax.Array,
    *,
    solver: str = "dopri5",
    num_steps: Optional[int] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    args: Any = None,
    t_start: float = 1.0,
    t_end: float = 0.0,
    max_steps: int = 4096,
) -> tuple[jax.Array, dict]:
  """Integrates dz/dt = velocity_fn(t, z) from t = 1 (z = noise) to t = 0.

  Args:
    velocity_fn: (t scalar, z (B, ...)) -> v, or (t, z, args) -> v when args is given. Any
      JAX-traceable function; it is a static argument of the compiled solve.
    noise: the starting point z(1), (B, ...). May be sharded across devices: the solve runs
      sharded (every operation is batch-parallel).
    solver: euler | heun | midpoint | rk4 (fixed step, need num_steps) | dopri5 | tsit5 (adaptive).
    num_steps: steps of a fixed-step solver (uniform in t); ignored by adaptive solvers.
    rtol, atol: tolerances of the adaptive solvers (PID step-size controller).
    args: a pytree passed to velocity_fn (e.g. network parameters); traced, not static.
    t_start, t_end: the integration interval (default 1 -> 0).
    max_steps: step budget of the adaptive solvers.
  Returns:
    (z, info): z = z(t_end), same shape as noise; info["nfe"] the velocity evaluations made
    (a scalar int array), info["failed"] True if the adaptive solver ran out of steps.
  """
  solver = _canonical_solver(solver)
  if not is_adaptive(solver):
    num_steps = int(num_steps) if num_steps is not None else None
    if num_steps is None or num_steps < 1:
      raise ValueError(f"solver {solver!r} is fixed-step and needs num_steps >= 1, got {num_steps}")
  else:
    num_steps = None
  z, nfe, failed = _sample_jit()(
      velocity_fn, noise, args, solver=solver, num_steps=num_steps, rtol=float(rtol),
      atol=float(atol), max_steps=int(max_steps), t_start=float(t_start), t_end=float(t_end))
  return z, _info(nfe, failed, solver)


def split_steps(num_steps: Union[int, Sequence[int]], light_fraction: float) -> tuple[int, int]:
  """Splits a fixed-step budget between the light (noise side) and heavy (data side) model.

  An int is split in proportion (n_light = round(num_steps * light_fraction)); a pair
  (n_light, n_heavy) is taken as given.
  """
  if isinstance(num_steps, (tuple, list)):
    if len(num_steps) != 2:
      raise ValueError(f"num_steps must be an int or (n_light, n_heavy), got {num_steps}")
    return int(num_steps[0]), int(num_steps[1])
  n = int(num_steps)
  n_light = int(round(n * light_fraction))
  return n_light, n - n_light


def solve_coarse_to_fine(light_fn: VelocityFn, heavy_fn: VelocityFn, z: jax.Array,
                         light_args: Any = None, heavy_args: Any = None, *, solver: str,
                         t_switch: float, n_light: Optional[int] = None,
                         n_heavy: Optional[int] = None, rtol: float = 1e-5, atol: float = 1e-5,
                         max_steps: int = 4096):
  """Light model from t = 1 to t_switch, heavy model from t_switch to 0; traceable.

  Returns (z(0), nfe_light, nfe_heavy, failed). See `coarse_to_fine_plan` for t_switch and the
  step split of fixed-step solvers.
  """
  zero = jnp.zeros((), jnp.int32)
  nfe_light, nfe_heavy, failed = zero, zero, jnp.zeros((), bool)
  if t_switch < 1.0:
    z, nfe_light, f = solve(light_fn, z, light_args, solver=solver, num_steps=n_light, rtol=rtol,
                            atol=atol, max_steps=max_steps, t_start=1.0, t_end=t_switch)
    failed = failed | f
  if t_switch > 0.0:
    z, nfe_heavy, f = solve(heavy_fn, z, heavy_args, solver=solver, num_steps=n_heavy, rtol=rtol,
                            atol=atol, max_steps=max_steps, t_start=t_switch, t_end=0.0)
    failed = failed | f
  return z, nfe_light, nfe_heavy, failed


@functools.lru_cache(maxsize=None)
def _coarse_to_fine_jit() -> Callable:
  """The jitted `_coarse_to_fine`, built on first use like `_sample_jit`."""
  return jax.jit(_coarse_to_fine, static_argnames=("light_fn", "heavy_fn", "solver", "n_light",
                                                   "n_heavy", "rtol", "atol", "max_steps",
                                                   "t_switch"),
                 compiler_options=parallel.inference_compiler_options())


def _coarse_to_fine(light_fn, heavy_fn, noise, light_args, heavy_args, *, solver, n_light,
                    n_heavy, rtol, atol, max_steps, t_switch):
  return solve_coarse_to_fine(light_fn, heavy_fn, noise, light_args, heavy_args, solver=solver,
                              t_switch=t_switch, n_light=n_light, n_heavy=n_heavy, rtol=rtol,
                              atol=atol, max_steps=max_steps)


def coarse_to_fine_plan(solver: str, num_steps: Union[int, Sequence[int], None],
                        light_fraction: float) -> tuple[float, Optional[int], Optional[int]]:
  """(t_switch, n_light, n_heavy) of a light -> heavy solve (see sample_coarse_to_fine)."""
  solver = _canonical_solver(solver)
  if not 0.0 <= float(light_fraction) <= 1.0:
    raise ValueError(f"light_fraction must lie in [0, 1], got {light_fraction}")
  t_switch = 1.0 - float(light_fraction)
  n_light = n_heavy = None
  if not is_adaptive(solver):
    if num_steps is None:
      raise ValueError(f"solver {solver!r} is fixed-step and needs num_steps")
    n_light, n_heavy = split_steps(num_steps, light_fraction)
    if not isinstance(num_steps, (tuple, list)):
      t_switch = 1.0 - n_light / int(num_steps)
    if t_switch < 1.0 and n_light < 1 or t_switch > 0.0 and n_heavy < 1:
      raise ValueError(f"split of num_steps={num_steps} at light_fraction={light_fraction} leaves "
                       f"a segment with no steps ({n_light}, {n_heavy})")
  return t_switch, n_light, n_heavy


def sample_coarse_to_fine(
    light_fn: VelocityFn,
    heavy_fn: VelocityFn,
    noise: jax.Array,
    *,
    light_fraction: float = 0.7,
    solver: str = "euler",
    num_steps: Union[int, Sequence[int], None] = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    light_args: Any = None,
    heavy_args: Any = None,
    max_steps: int = 4096,
) -> tuple[jax.Array, dict]:
  """Light velocity on the noise side, heavy velocity on the data side.

  The light model integrates t from 1 to t_switch = 1 - light_fraction and the heavy model from
  t_switch to 0 (LFM convention; paper 2's t_split = 0.7 is light_fraction = 0.7).
  light_fraction = 0 is heavy-only, 1 is light-only.

  Fixed-step solvers: num_steps is the total, split in proportion (see split_steps), and the
  switch is moved to the step grid, t_switch = 1 - n_light / num_steps, so that with
  light_fn == heavy_fn the result equals `sample` with the same solver and steps; or give
  num_steps = (n_light, n_heavy) to keep the switch exactly at 1 - light_fraction.
  Adaptive solvers run each segment adaptively (two solves, the switch exact).

  Returns:
    (z, info) with info["nfe_light"], info["nfe_heavy"], info["nfe"] (their sum), info["t_switch"].
  """
  solver = _canonical_solver(solver)
  t_switch, n_light, n_heavy = coarse_to_fine_plan(solver, num_steps, light_fraction)
  z, nfe_light, nfe_heavy, failed = _coarse_to_fine_jit()(
      light_fn, heavy_fn, noise, light_args, heavy_args, solver=solver, n_light=n_light,
      n_heavy=n_heavy, rtol=float(rtol), atol=float(atol), max_steps=int(max_steps),
      t_switch=t_switch)
  info = _info(nfe_light + nfe_heavy, failed, solver)
  info.update(nfe_light=nfe_light, nfe_heavy=nfe_heavy, t_switch=t_switch)
  return z, info
