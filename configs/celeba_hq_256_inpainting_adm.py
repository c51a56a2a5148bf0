"""LFM, image inpainting on CelebA-HQ 256, ADM U-Net (guided-diffusion `UNetModel`).

Official run (VinAIResearch/LFM downstream_tasks/train_flow_latent_inpainting.py, exp
`inpainting_kl`): the network sees 9 input channels, the noisy latent (4) + the SD KL-f8 latent of
the masked image (4) + the mask in {-1, +1} nearest-downsampled to the 32x32 latent grid (1); it
predicts the 4 velocity channels. Known pixels are pasted back after decoding. Masks and the
train/test protocol follow MAT (large-hole masks). model_channels 256, channel_mult (1, 2, 3, 4),
2 res blocks, attention "16 8" as guided-diffusion downsample factors; batch 64 per GPU x 2 GPUs
= 128, 500 epochs (27,000 images assumed: 105,000 steps; MAT's CelebA-HQ train list is 24,183
images [uncertain]), AdamW lr 5e-5 with per-epoch cosine decay to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5 (the official training-time preview used 1e-8).
Paper metrics: FID / U-IDS / P-IDS in the paper's inpainting table (not restated here
[uncertain]).

Conditioning keys the data pipeline still needs (see the report on issue 8): a mask generator
and a "task" switch; `model.extra_in_channels = 5` already makes the network 9-channel.
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = None  # see docstring


def get_config():
  """Returns the CelebA-HQ 256 inpainting config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.celeb_a_hq(config.data, 256)
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))
  config.model.extra_in_channels = 5  # masked-image latent 4 + mask 1 -> 9 input channels

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celeb_a_hq"], 128)
  train.learning_rate = 5e-5
  train.schedule = "cosine"
  return config
