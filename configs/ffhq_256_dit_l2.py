"""LFM, FFHQ 256, DiT-L/2. Paper FID 4.55 (users of the official code report 7.60).

Official run (VinAIResearch/LFM, exp `ffhq_f8_dit`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-L/2 unconditional; batch 32 on 1 GPU, 500 epochs of 63,000 images (= 984,000 steps),
AdamW lr 2e-4 with per-epoch cosine decay to 1e-5 (no `--no_lr_decay` in this run), fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 4.55 (50k samples; official checkpoint epoch 475).

Files: $MANUAL_DIR/images1024x1024/ (the official FFHQ PNGs, 00000/00000.png ..., from
NVlabs/ffhq-dataset's download_ffhq.py --images; resized by the builder); $SD_VAE =
stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/ffhq_256_dit_l2.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/ffhq_256_dit_l2.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/ffhq_256_dit_l2.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 4.55


def get_config():
  """Returns the FFHQ 256 DiT-L/2 config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.ffhq(config.data)
  _paper.dit(config.model, "L/2")

  train = config.train
  train.batch_size = 32
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["ffhq"], 32)
  train.learning_rate = 2e-4
  train.schedule = "cosine"
  return config
