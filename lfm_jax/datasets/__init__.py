"""tfds builders of lfm_jax. Importing this package registers them with tfds.

- `lfm_digits`: scikit-learn's 8x8 digits, upsampled (offline, prepares in seconds).
- `ffhq`: FFHQ from the official PNGs (manual dir).
- `lfm_image_folder`: any folder of images (built with an `ImageFolderConfig`).
"""

from lfm_jax.datasets import ffhq  # noqa: F401  (registers "ffhq")
from lfm_jax.datasets import image_folder  # noqa: F401  (registers "lfm_image_folder")
from lfm_jax.datasets import lfm_digits  # noqa: F401  (registers "lfm_digits")
