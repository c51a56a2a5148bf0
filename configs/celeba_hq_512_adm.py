"""LFM, CelebA-HQ 512, ADM U-Net (guided-diffusion `UNetModel`), bf16. Paper FID 6.35.

Official run (VinAIResearch/LFM, exp `celeb512_f8_adm`, `--use_origin_adm`,
`--mixed_precision bf16`): SD KL-f8 latents 64x64x4 (0.18215); model_channels 256,
channel_mult (1, 2, 2, 2, 4), 2 res blocks, attention "16 8" as guided-diffusion downsample
factors (64x64 latent: attention at 4x4 and 8x8); batch 6 per GPU x 8 GPUs = 48, 1,000 epochs
of 27,000 images (= 562,000 steps), AdamW lr 2e-5 constant, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 6.35 (50k samples; official checkpoint epoch 425).

Files: $MANUAL_DIR/data512x512.tar (the 30,000 CelebA-HQ images at 512x512, PNG or JPEG: what
tfds' celeb_a_hq/512 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout
(config.json + diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/celeba_hq_512_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_512_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_512_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 1000
PAPER_FID = 6.35


def get_config():
  """Returns the CelebA-HQ 512 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=512)
  _paper.celeb_a_hq(config.data, 512)
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 2, 2, 4), attention=(16, 8))

  train = config.train
  train.batch_size = 48
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celeb_a_hq"], 48)
  train.learning_rate = 2e-5
  train.schedule = "constant"
  train.compute_dtype = "bfloat16"  # params and optimizer state stay float32

  config.eval.batch_size = 100
  config.sample.batch_size = 16
  config.sample.num_samples = 16
  return config
