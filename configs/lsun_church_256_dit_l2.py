"""LFM, LSUN Church 256, DiT-L/2. Paper FID 5.54 (users of the official code report 6.61).

Official run (VinAIResearch/LFM, exp `church_f8_dit`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-L/2 unconditional; batch 48 per GPU x 2 GPUs = 96, 600 epochs of the first 120,000
church_outdoor images (= 750,000 steps), AdamW lr 1e-4 constant, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 5.54 (50k samples; official checkpoint epoch 575).

Files: $MANUAL_DIR/church_outdoor_train_lmdb/ (data.mdb; or church_outdoor_train_lmdb.zip) from
fyu/lsun's download.py -c church_outdoor, and optionally church_outdoor_val_lmdb[.zip];
$SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/lsun_church_256_dit_l2.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_church_256_dit_l2.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_church_256_dit_l2.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 600
PAPER_FID = 5.54


def get_config():
  """Returns the LSUN Church 256 DiT-L/2 config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.lsun(config.data, "church_outdoor")
  _paper.dit(config.model, "L/2")

  train = config.train
  train.batch_size = 96
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["lsun"], 96)
  train.learning_rate = 1e-4
  train.schedule = "constant"
  return config
