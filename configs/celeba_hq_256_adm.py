"""LFM, CelebA-HQ 256, ADM U-Net (guided-diffusion `UNetModel`). Paper FID 5.67.

Official run (VinAIResearch/LFM, exp `celeb256_f8_adm`, `--use_origin_adm`):
  SD KL-f8 latents 32x32x4 (scale 0.18215); model_channels 256, channel_mult (1, 2, 2, 2),
  2 res blocks, attention "16 8" read as guided-diffusion downsample factors, 4 heads;
  batch 112 on 1 GPU, 500 epochs of 27,000 images (= 120,500 steps), AdamW lr 2e-5 with
  per-epoch cosine decay to 1e-5, fp32, no EMA, no clipping.
Sampling: Dopri5, atol = rtol = 1e-5. FID 5.67 (50k samples, pytorch-fid Inception, train stats;
official checkpoint: epoch 480).

Files: $MANUAL_DIR/data256x256.tar (the 30,000 CelebA-HQ images at 256x256, PNG or JPEG: what
tfds' celeb_a_hq/256 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout
(config.json + diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth. Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/celeba_hq_256_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 5.67


def get_config():
  """Returns the CelebA-HQ 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.celeb_a_hq(config.data, 256)
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 2, 2), attention=(16, 8))

  train = config.train
  train.batch_size = 112
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celeb_a_hq"], 112)
  train.learning_rate = 2e-5
  train.schedule = "cosine"  # decays to train.end_learning_rate = 1e-5
  return config
