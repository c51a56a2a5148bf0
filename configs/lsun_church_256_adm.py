"""LFM, LSUN Church 256, ADM U-Net (guided-diffusion `UNetModel`). Paper FID 7.7.

Official evaluation args (VinAIResearch/LFM test_args/church_adm.txt, exp `church_f8_adm`,
`USE_ORIGIN_ADM=true`): model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention
"16 8" as guided-diffusion downsample factors. The training command is not in the published
run.sh; batch, epochs and lr below follow the other ADM runs [uncertain]: batch 128, 500 epochs
of the first 120,000 church_outdoor images (= 468,500 steps), AdamW lr 2e-5 with cosine decay
to 1e-5, fp32, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5. FID 7.7 (50k samples; official checkpoint epoch 425).

Files: $MANUAL_DIR/church_outdoor_train_lmdb/ (data.mdb; or church_outdoor_train_lmdb.zip) from
fyu/lsun's download.py -c church_outdoor, and optionally church_outdoor_val_lmdb[.zip];
$SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/lsun_church_256_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_church_256_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/lsun_church_256_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = 7.7


def get_config():
  """Returns the LSUN Church 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.lsun(config.data, "church_outdoor")
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["lsun"], 128)
  train.learning_rate = 2e-5
  train.schedule = "cosine"
  return config
