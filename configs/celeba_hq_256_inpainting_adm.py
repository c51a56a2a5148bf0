"""LFM, image inpainting on CelebA-HQ 256, ADM U-Net (guided-diffusion `UNetModel`).

Official run (VinAIResearch/LFM downstream_tasks/train_flow_latent_inpainting.py, exp
`inpainting_kl`): the network sees 9 input channels, the noisy latent (4) + the SD KL-f8 latent of
the masked image (4, a posterior draw times 0.18215) + the mask in {-1, +1} (+1 on holes)
nearest-downsampled to the 32x32 latent grid (1); it predicts the 4 velocity channels. Known
pixels are pasted back after decoding. model_channels 256, channel_mult (1, 2, 3, 4), 2 res
blocks, attention "16 8" as guided-diffusion downsample factors; batch 64 per GPU x 2 GPUs = 128,
500 epochs (27,000 images: 105,000 steps), AdamW lr 5e-5 with per-epoch cosine decay to 1e-5,
fp32, no EMA. Masks: LFM's training generator (free-form strokes or boxes, lfm_jax/masks.py),
one fixed mask per example drawn from (data.mask_seed, id) and cached with the latents;
`--config.data.mask_per_epoch=True` draws a new one every epoch as LFM's loader does (the images
are then encoded on the fly every step, which is slower).
Sampling: Dopri5, atol = rtol = 1e-5 (the official training-time preview used 1e-8).
Evaluation (LFM's protocol, after MAT): FID of the inpainted images of the test split against
the same images' ground truth (eval.reference_split = the eval split; every one of its 3,000
images once, eval.num_samples being larger). The paper's inpainting table uses MAT's fixed test
masks (its metrics, FID and possibly MAT's U-IDS / P-IDS, are not restated here [uncertain]); to
use such masks, give them as <dir>/<id:06d>.png with `--config.data.mask_kind=dir
--config.data.mask_path=<dir>` for the sample and evaluate commands.

Files: $MANUAL_DIR/data256x256.tar (the 30,000 CelebA-HQ images at 256x256: what tfds'
celeb_a_hq/256 reads); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout;
$INCEPTION = pytorch-fid's pt_inception-2015-12-05-6726825d.pth. Train (encodes the latents and
masked latents first); inpaint the first test images (grid: masked input / mask / result);
inpaint an image of yours ($IMAGE 256x256, $MASK a 256x256 PNG, white = known pixels);
evaluate:

  python -m lfm_jax.main --config=configs/celeba_hq_256_inpainting_adm.py --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_inpainting_adm.py --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/celeba_hq_256_inpainting_adm.py --workdir=$WORKDIR \
      --mode=sample --config.autoencoder.pretrained=$SD_VAE \
      --config.data.inpaint_image=$IMAGE --config.data.inpaint_mask=$MASK
  python -m lfm_jax.main --config=configs/celeba_hq_256_inpainting_adm.py --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

EPOCHS = 500
PAPER_FID = None  # the paper's inpainting table, with MAT's masks (see docstring)


def get_config():
  """Returns the CelebA-HQ 256 inpainting config (see module docstring)."""
  config = _paper.paper_config(image_size=256)
  _paper.celeb_a_hq(config.data, 256, task="inpainting")
  _paper.guided_diffusion_unet(config.model, channel_mult=(1, 2, 3, 4), attention=(16, 8))
  config.model.extra_in_channels = 5  # masked-image latent 4 + mask 1 -> 9 input channels

  train = config.train
  train.batch_size = 128
  train.num_steps = _paper.steps_for_epochs(EPOCHS, _paper.NUM_TRAIN["celeb_a_hq"], 128)
  train.learning_rate = 5e-5
  train.schedule = "cosine"

  config.eval.reference_split = config.data.eval_split  # inpainted vs. the same real images
  return config
