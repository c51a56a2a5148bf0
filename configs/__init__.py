"""Experiment configs (ml_collections): `default.py` is the schema, the others derive from it.

Installed with lfm_jax as the package `configs`, so a config file can import its siblings
(`from configs import _paper`) from any working directory.
"""
