"""LFM, ImageNet 256 class-conditional, ADM U-Net (EDM `DhariwalUNet`), CFG 1.25. Paper FID 8.58.

Official run (VinAIResearch/LFM, exp `imnet_f8_adm`): SD KL-f8 latents 32x32x4 (0.18215);
model_channels 256, channel_mult (1, 2, 3, 4), 2 res blocks, attention at latent resolutions
16, 8, 4, 64 channels per head, 1,000-class label embedding; batch 96 per GPU x 8 GPUs = 768,
1,200 epochs of 1,281,167 images (= 2,001,600 steps), AdamW lr 1e-4 constant, fp32, no EMA.
Label dropout 0.1 for guidance (EDM's null label is the zero one-hot; lfm_jax: index 1000).
Sampling: Dopri5, atol = rtol = 1e-5, CFG scale 1.25. FID 8.58 (50k samples; official
checkpoint epoch 1125).

Files: $MANUAL_DIR/ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org, what tfds'
imagenet2012 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/imagenet_256_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/imagenet_256_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/imagenet_256_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 1200
PAPER_FID = 8.58


def get_config():
  """Returns the ImageNet 256 ADM config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.imagenet(config.data)
  _paper.edm_dhariwal_unet(config.model)
  config.model.num_classes = 1000
  config.flow.class_dropout_prob = 0.1

  train = config.train
  train.batch_size = 768
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["imagenet2012"], 768)
  train.learning_rate = 1e-4
  train.schedule = "constant"

  config.sample.guidance_scale = 1.25
  config.sample.num_samples = 100
  config.sample.batch_size = 100
  return config
