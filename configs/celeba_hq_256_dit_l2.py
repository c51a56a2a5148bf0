"""LFM, CelebA-HQ 256, DiT-L/2. Paper FID 5.26 (the data set's headline number).

Official run (VinAIResearch/LFM, exp `celeb_f8_dit`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-L/2 (24 layers, hidden 1024, 16 heads, patch 2, ~457M params), unconditional;
batch 32 on 1 GPU, 500 epochs of 27,000 images (= 421,500 steps), AdamW lr 2e-4 constant
(`--no_lr_decay`), fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 5.26 (50k samples; official checkpoint epoch 475).
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 5.26


def get_config():
  """Returns the CelebA-HQ 256 DiT-L/2 config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.celeb_a_hq(config.data, 256)
  _paper.dit(config.model, "L/2")

  train = config.train
  train.batch_size = 32
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celeb_a_hq"], 32)
  train.learning_rate = 2e-4
  train.schedule = "constant"
  return config
