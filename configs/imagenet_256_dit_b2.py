"""LFM, ImageNet 256 class-conditional, DiT-B/2 with classifier-free guidance 1.5. Paper FID 4.46.

Official run (VinAIResearch/LFM, exp `imnet_f8_ditb2`): SD KL-f8 latents 32x32x4 (0.18215);
DiT-B/2 (12 layers, hidden 768, 12 heads, patch 2), 1,000 classes, label dropout 0.1 (null label
= index 1000); batch 160 per GPU x 8 GPUs = 1,280, 1,000 epochs of 1,281,167 images
(= 1,000,000 steps), AdamW lr 1e-4 constant, fp32, gradient checkpointing, no EMA.
Sampling: Dopri5, atol = rtol = 1e-5, CFG scale 1.5 (v = v_u + 1.5 (v_c - v_u)).
FID 4.46 (50k samples; official checkpoint epoch 875).

Files: $MANUAL_DIR/ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org, what tfds'
imagenet2012 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors); $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth.
Train (encodes the latents first), sample, evaluate:

  python -m lfm_jax.main --config=configs/imagenet_256_dit_b2.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/imagenet_256_dit_b2.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/imagenet_256_dit_b2.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 1000
PAPER_FID = 4.46


def get_config():
  """Returns the ImageNet 256 DiT-B/2 config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.imagenet(config.data)
  _paper.dit(config.model, "B/2")
  config.model.num_classes = 1000
  config.flow.class_dropout_prob = 0.1

  train = config.train
  train.batch_size = 1280
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["imagenet2012"], 1280)
  train.learning_rate = 1e-4
  train.schedule = "constant"

  config.sample.guidance_scale = 1.5
  config.sample.num_samples = 100  # `sample` mode grid: classes cycle over the batch
  config.sample.batch_size = 100
  return config
