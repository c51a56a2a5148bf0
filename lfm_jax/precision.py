"""Compute dtypes: names in the config -> jnp dtypes, and casting parameter trees.

Parameters stay float32; a compute dtype (e.g. bfloat16) is what activations, matmuls and
convolutions run in. Normalisations and softmax stay in float32 inside the networks.
"""

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str, key: str = "compute_dtype") -> Any:
  """'float32' | 'bfloat16' | 'float16' -> the jnp dtype; ValueError naming `key` otherwise."""
  if name not in DTYPES:
    raise ValueError(f"config.{key}: must be one of {', '.join(DTYPES)}, got {name!r}")
  return DTYPES[name]


def with_dtype(module: Any, dtype: Any) -> Any:
  """A Linen module (and any module it wraps in `inner`) computing in `dtype`; same params."""
  if hasattr(module, "inner"):
    return module.clone(inner=with_dtype(module.inner, dtype))
  return module.clone(dtype=dtype)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating leaf of tree to dtype (other leaves unchanged)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
