"""LFM, semantic-to-image synthesis on CelebAMask-HQ 256, ADM U-Net (guided-diffusion).

Official run (VinAIResearch/LFM downstream_tasks/train_flow_latent_semantic_syn.py, exp
`semantic_kl`): the 19-class one-hot segmentation map goes through LDM's SpatialRescaler (three
bilinear halvings 256 -> 32, then a 1x1 conv without bias to 4 channels), concatenated with the
noisy latent: 8 input channels, 4 output channels (lfm_jax/models/semantic.py; here the conv is
trained jointly with the network, which LFM's script intends but computes under no_grad).
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention "16 8" as guided-diffusion
downsample factors; batch 64 per GPU x 2 GPUs = 128, 175 epochs of the first 27,000 CelebAMask-HQ
images (= 36,750 steps; images 27000..29999 are the test set), AdamW lr 5e-5 with per-epoch
cosine decay to 1e-5, fp32, no EMA, no flips. The class maps are cached beside the latents as
uint8 and one-hot encoded on device.
Sampling: Dopri5, atol = rtol = 1e-5. Evaluation (LFM's protocol): FID of images synthesised
from the 3,000 test maps against the test images (eval.reference_split = "test"). The paper's
table also reports mIoU, which needs a face parser lfm_jax does not ship.

Files: $MANUAL_DIR/CelebAMask-HQ.zip (the official archive, or its unpacked CelebAMask-HQ/
folder: CelebA-HQ-img/ and CelebAMask-HQ-mask-anno/); $SD_VAE = stabilityai/sd-vae-ft-mse in
the diffusers layout; $INCEPTION = pytorch-fid's pt_inception-2015-12-05-6726825d.pth. Train
(prepares the data set, encodes the latents and stores the maps first); sample from the first
test maps (grid: map / sample); sample from a map of yours ($MAP: a 256x256 single-channel PNG
whose pixel values are class ids 0..18 in lfm_jax/datasets/celebamask_hq.py's CLASS_NAMES
order); evaluate:

  python -m lfm_jax.main --config=configs/celebamask_hq_semantic_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celebamask_hq_semantic_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celebamask_hq_semantic_adm.py --workdir=$WORKDIR \
      --mode=sample --config.autoencoder.pretrained=$SD_VAE --config.data.semantic_map=$MAP
  python -m lfm_jax.main --config=configs/celebamask_hq_semantic_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 175
PAPER_FID = None  # the paper's semantic synthesis table (FID / mIoU)


def get_config():
  """Returns the CelebAMask-HQ semantic synthesis config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.celebamask_hq(config.data, 256)
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))
  config.model.extra_in_channels = 4  # the rescaled map: 1x1 conv 19 -> 4 channels
  config.model.semantic_classes = 19  # CelebAMask-HQ: background + 18 parts

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celebamask_hq"], 128)
  train.learning_rate = 5e-5
  train.schedule = "cosine"

  config.eval.reference_split = config.data.eval_split  # synthesised vs. the test images
  return config
