"""LFM, FFHQ 256, ADM U-Net (EDM `DhariwalUNet`). Paper FID 6.12.

Official run (VinAIResearch/LFM, exp `ffhq_f8_adm`): SD KL-f8 latents 32x32x4 (0.18215);
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention at latent resolutions
16, 8, 4 (EDM semantics), 64 channels per head; batch 128 on 1 GPU, 500 epochs of 63,000 images
(= 246,000 steps), AdamW lr 2e-5 with per-epoch cosine decay to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 6.12 (50k samples; official checkpoint epoch 325).
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 6.12


def get_config():
  """Returns the FFHQ 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.ffhq(config.data)
  _paper.edm_dhariwal_unet(config.model)

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["ffhq"], 128)
  train.learning_rate = 2e-5
  train.schedule = "cosine"
  return config
