"""LFM, LSUN Church 256, ADM U-Net (guided-diffusion `UNetModel`). Paper FID 7.7.

Official evaluation args (VinAIResearch/LFM test_args/church_adm.txt, exp `church_f8_adm`,
`USE_ORIGIN_ADM=true`): model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention
"16 8" as guided-diffusion downsample factors. The training command is not in the published
run.sh; batch, epochs and lr below follow the other ADM runs [uncertain]: batch 128, 500 epochs
of the first 120,000 church_outdoor images (= 468,500 steps), AdamW lr 2e-5 with cosine decay
to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 7.7 (50k samples; official checkpoint epoch 425).
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 7.7


def get_config():
  """Returns the LSUN Church 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.lsun(config.data, "church_outdoor")
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["lsun"], 128)
  train.learning_rate = 2e-5
  train.schedule = "cosine"
  return config
