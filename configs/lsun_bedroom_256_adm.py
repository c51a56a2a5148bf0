"""LFM, LSUN Bedroom 256, ADM U-Net (EDM `DhariwalUNet`). Paper FID 7.05.

Official run (VinAIResearch/LFM, exp `bed_f8_adm`): SD KL-f8 latents 32x32x4 (0.18215);
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention at latent resolutions
16, 8, 4, 64 channels per head; batch 128 on 1 GPU, 500 epochs of the first 120,000 bedroom
images (= 468,500 steps), AdamW lr 1e-5 constant, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 7.05 (50k samples; official checkpoint epoch 425).
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 7.05


def get_config():
  """Returns the LSUN Bedroom 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.lsun(config.data, "bedroom")
  _paper.edm_dhariwal_unet(config.model)

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["lsun"], 128)
  train.learning_rate = 1e-5
  train.schedule = "constant"
  return config
