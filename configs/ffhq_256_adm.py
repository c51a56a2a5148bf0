"""LFM, FFHQ 256, ADM U-Net (EDM `DhariwalUNet`). Paper FID 6.12.

Official run (VinAIResearch/LFM, exp `ffhq_f8_adm`): SD KL-f8 latents 32x32x4 (0.18215);
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention at latent resolutions
16, 8, 4 (EDM semantics), 64 channels per head; batch 128 on 1 GPU, 500 epochs of 63,000 images
(= 246,000 steps), AdamW lr 2e-5 with per-epoch cosine decay to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 6.12 (50k samples; official checkpoint epoch 325).

Files: $MANUAL_DIR/images1024x1024/ (the official FFHQ PNGs, 00000/00000.png ..., from
NVlabs/ffhq-dataset's download_ffhq.py --images; resized by the builder); $SD_VAE =
stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/ffhq_256_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/ffhq_256_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/ffhq_256_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
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
