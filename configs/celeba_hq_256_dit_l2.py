"""LFM, CelebA-HQ 256, DiT-L/2. Paper FID 5.26 (the data set's headline number).

Official run (VinAIResearch/LFM, exp `celeb_f8_dit`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-L/2 (24 layers, hidden 1024, 16 heads, patch 2, ~457M params), unconditional;
batch 32 on 1 GPU, 500 epochs of 27,000 images (= 421,500 steps), AdamW lr 2e-4 constant
(`--no_lr_decay`), fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 5.26 (50k samples; official checkpoint epoch 475).

Files: $MANUAL_DIR/data256x256.tar (the 30,000 CelebA-HQ images at 256x256, PNG or JPEG: what
tfds' celeb_a_hq/256 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout
(config.json + diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/celeba_hq_256_dit_l2.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_dit_l2.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_dit_l2.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
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
