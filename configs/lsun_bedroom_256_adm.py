"""LFM, LSUN Bedroom 256, ADM U-Net (EDM `DhariwalUNet`). Paper FID 7.05.

Official run (VinAIResearch/LFM, exp `bed_f8_adm`): SD KL-f8 latents 32x32x4 (0.18215);
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention at latent resolutions
16, 8, 4, 64 channels per head; batch 128 on 1 GPU, 500 epochs of the first 120,000 bedroom
images (= 468,500 steps), AdamW lr 1e-5 constant, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 7.05 (50k samples; official checkpoint epoch 425).

Files: $MANUAL_DIR/bedroom_train_lmdb/ (data.mdb; or bedroom_train_lmdb.zip) from fyu/lsun's
download.py -c bedroom (only the first 120,000 keys are prepared), and optionally
bedroom_val_lmdb[.zip]; $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/lsun_bedroom_256_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_bedroom_256_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_bedroom_256_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
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
