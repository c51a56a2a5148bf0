"""lfm_jax: latent flow matching in JAX/Flax.

`lfm_jax.load(path)` returns a trained run to sample from (lfm_jax/api.py); the command line is
`python -m lfm_jax.main --config=configs/default.py --workdir=DIR`.
"""


def __getattr__(name):
  if name in ("load", "Run"):
    from lfm_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'lfm_jax' has no attribute {name!r}")
