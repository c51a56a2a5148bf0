"""LFM, semantic-to-image synthesis on CelebAMask-HQ 256, ADM U-Net (guided-diffusion).

Official run (VinAIResearch/LFM downstream_tasks/train_flow_latent_semantic_syn.py, exp
`semantic_kl`): the 19-class one-hot segmentation map goes through a learned rescaler
(256 -> 32) and a 1x1 conv to 4 channels, concatenated with the noisy latent: 8 input channels,
4 output channels. model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention "16 8"
as guided-diffusion downsample factors; batch 64 per GPU x 2 GPUs = 128, 175 epochs of the first
27,000 CelebAMask-HQ images (= 36,750 steps; the last 3,000 are the test set), AdamW lr 5e-5
with per-epoch cosine decay to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. Paper metrics: FID / mIoU in the paper's semantic
synthesis table (not restated here [uncertain]).

Needs (not yet in configs/default.py): a CelebAMask-HQ tfds builder ("celebamask_hq", image +
19-class mask) and a semantic-map encoder switch in the model config. Until then
`model.extra_in_channels = 4` describes the 4 conditioning channels the encoder produces.
"""

from configs import _paper

EPOCHS = 175
PAPER_FID = None  # see docstring


def get_config():
  """Returns the CelebAMask-HQ semantic synthesis config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  data = config.data
  data.name = "celebamask_hq"
  data.train_split = "train[:27000]"
  data.eval_split = "train[27000:]"
  data.crop = "none"
  data.random_flip = False  # the map and the image would have to flip together
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))
  config.model.extra_in_channels = 4  # encoded 19-class map: rescaler + 1x1 conv -> 4 channels

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celebamask_hq"], 128)
  train.learning_rate = 5e-5
  train.schedule = "cosine"
  return config
