"""tfds builders of lfm_jax. Importing this package registers them with tfds.

- `lfm_digits`: scikit-learn's 8x8 digits, upsampled (offline, prepares in seconds).
- `ffhq`: FFHQ from the official PNGs (manual dir).
- `lfm_lsun`: LSUN categories from the official LMDB folders or zips (manual dir).
- `celebamask_hq`: CelebAMask-HQ images + 19-class label maps from the official zip (manual dir).
- `lfm_image_folder`: any folder of images (built with an `ImageFolderConfig`).

`manual` says which manual files each paper data set needs (ours and tfds' celeb_a_hq and
imagenet2012) and checks them before preparing.
"""

from lfm_jax.datasets import celebamask_hq  # noqa: F401  (registers "celebamask_hq")
from lfm_jax.datasets import ffhq  # noqa: F401  (registers "ffhq")
from lfm_jax.datasets import image_folder  # noqa: F401  (registers "lfm_image_folder")
from lfm_jax.datasets import lfm_digits  # noqa: F401  (registers "lfm_digits")
from lfm_jax.datasets import lsun_lmdb  # noqa: F401  (registers "lfm_lsun")
from lfm_jax.datasets import manual  # noqa: F401
