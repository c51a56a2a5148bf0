"""LFM, LSUN Bedroom 256, DiT-L/2. Paper FID 4.92.

Official run (VinAIResearch/LFM, exp `bed_f8_dit`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-L/2 unconditional; batch 32 on 1 GPU, 600 epochs of the first 120,000 bedroom images
(= 2,250,000 steps), AdamW lr 1e-4 constant, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 4.92 (50k samples; official checkpoint epoch 550).

Files: $MANUAL_DIR/bedroom_train_lmdb/ (data.mdb; or bedroom_train_lmdb.zip) from fyu/lsun's
download.py -c bedroom (only the first 120,000 keys are prepared), and optionally
bedroom_val_lmdb[.zip]; $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/lsun_bedroom_256_dit_l2.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_bedroom_256_dit_l2.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_bedroom_256_dit_l2.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 600
PAPER_FID = 4.92


def get_config():
  """Returns the LSUN Bedroom 256 DiT-L/2 config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.lsun(config.data, "bedroom")
  _paper.dit(config.model, "L/2")

  train = config.train
  train.batch_size = 32
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["lsun"], 32)
  train.learning_rate = 1e-4
  train.schedule = "constant"
  return config
