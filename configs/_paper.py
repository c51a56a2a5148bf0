"""Shared paper-scale settings for the experiment configs (not a config itself).

Every `configs/<experiment>.py` starts from `configs/default.py`'s `get_config()` through
`paper_config()` below, which switches the embedded default (digits, own small autoencoder,
Euler, digits-classifier metrics) to the protocol of "Flow Matching in Latent Space" (LFM):

- first stage: Stable Diffusion's KL-f8 AutoencoderKL ("sd-vae-ft-mse"), frozen, 4 latent channels,
  scale factor 0.18215, posterior sampled (256x256x3 image -> 32x32x4 latent);
- sampling: adaptive Dopri5, atol = rtol = 1e-5, integrating t = 1 (noise) -> 0 (data);
- evaluation: FID with the pytorch-fid InceptionV3 on 50,000 samples, reference statistics from
  the training split (computed when `eval.reference_stats` is None).

The experiment files then set data, network and optimisation explicitly, so each reads on its own.
Paths to weights the user downloads are placeholders under `pretrained/`; override them on the
command line, e.g. `--config.autoencoder.pretrained=/data/sd-vae-ft-mse`.
"""

from configs import default as default_lib

# Placeholder paths: where the README tells users to put downloaded weights.
SD_VAE = "pretrained/sd-vae-ft-mse"  # diffusers dir of stabilityai/sd-vae-ft-mse
SD_VAE_SCALE = 0.18215
INCEPTION = "pretrained/pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid weights

# Training-set sizes used to turn the official runs' epochs into optimizer steps.
NUM_TRAIN = {
    "celeb_a_hq": 27_000,  # NVAE's split of CelebA-HQ: the first 27,000 of 30,000
    "ffhq": 63_000,  # NVAE's split of FFHQ: the first 63,000 of 70,000
    "lsun": 120_000,  # LFM keeps the first 120k LSUN training images
    "imagenet2012": 1_281_167,
    "celebamask_hq": 27_000,  # LFM semantic synthesis: first 27,000 train, 3,000 test
}


def steps_for_epochs(epochs, num_train, batch_size):
  """Optimizer steps of `epochs` passes over `num_train` images at global `batch_size`.

  The official PyTorch loaders drop the last partial batch, hence the floor division.
  """
  return epochs * (num_train // batch_size)


def paper_config(image_size=256):
  """Default config switched to the LFM paper protocol (see module docstring)."""
  config = default_lib.get_config()
  config.mode = "train"  # the pipeline's tiny-autoencoder stage does not apply at paper scale

  data = config.data
  data.image_size = image_size
  data.channels = 3
  data.num_classes = 0
  data.random_flip = True
  data.shuffle_buffer = 50_000

  ae = config.autoencoder
  ae.pretrained = SD_VAE
  ae.scale_factor = SD_VAE_SCALE
  ae.sample_posterior = True  # LFM samples z ~ q(z|x), computed on the fly
  # Architecture of SD's KL-f8 (read by the loader as a check; weights come from `pretrained`).
  ae.block_out_channels = (128, 256, 512, 512)
  ae.layers_per_block = 2
  ae.latent_channels = 4
  ae.norm_num_groups = 32
  ae.attention = True

  model = config.model
  model.num_classes = 0  # unconditional (LFM's DiT `num_classes 1` == our 0: no label input)
  model.dropout = 0.0

  config.flow.class_dropout_prob = 0.0  # only class-conditional configs use label dropout

  train = config.train
  train.optimizer = "adamw"  # torch AdamW defaults: betas (0.9, 0.999), weight decay 0
  train.weight_decay = 0.0
  train.grad_clip_norm = 0.0  # the official runs do not clip
  train.warmup_steps = 0
  train.end_learning_rate = 1e-5  # CosineAnnealingLR(eta_min=1e-5) where the run decays
  train.compute_dtype = "float32"
  # EMA 0.9999 exists in the official code but the published runs did not switch it on.
  train.ema_decay = 0.0
  train.log_every = 100
  train.checkpoint_every = 5_000  # also the resume granularity after a TPU preemption
  train.keep_checkpoints = 2
  train.keep_every = 50_000
  train.sample_every = 10_000

  sample = config.sample
  sample.solver = "dopri5"
  sample.rtol = 1e-5
  sample.atol = 1e-5
  sample.guidance_scale = 1.0  # guidance only where a config says s > 1
  sample.num_samples = 64
  sample.batch_size = 64
  sample.use_ema = False  # matches ema_decay = 0 (no EMA in the published runs)

  ev = config.eval
  ev.num_samples = 50_000
  ev.batch_size = 250
  ev.feature_extractor = "inception"
  ev.inception_weights = INCEPTION
  ev.reference_stats = None  # computed from data.train_split, as LFM's stats are
  ev.reference_split = "train"  # LFM computes its reference statistics on the training set
  ev.metrics = ("fd", "precision_recall", "kid", "inception_score")

  config.stability.embedding = "inception"
  config.score.embedding = "inception"
  return config


def guided_diffusion_unet(model, channel_mult, attention=(16, 8)):
  """ADM as guided-diffusion's `UNetModel` (LFM's `--use_origin_adm`).

  LFM passes its `--attn_resolution 16 8` list straight to `attention_resolutions` of guided
  diffusion, which reads the numbers as *downsample factors* of the 32x32 latent. With 4 levels
  (factors 1, 2, 4, 8) only factor 8 exists, so attention runs at 4x4 (and in the middle block).
  """
  model.name = "unet"
  model.model_channels = 256
  model.channel_mult = tuple(channel_mult)
  model.num_res_blocks = 2
  model.attention_resolutions = tuple(attention)
  model.attention_semantics = "downsample"
  model.num_heads = 4
  model.num_head_channels = -1
  model.use_scale_shift_norm = True
  model.resblock_updown = False


def edm_dhariwal_unet(model):
  """ADM as EDM's `DhariwalUNet` (LFM's default ADM: FFHQ, LSUN Bedroom, ImageNet).

  channel_mult (1, 2, 3, 4), attention at latent *resolutions* 16, 8 and 4, 64 channels per head,
  embedding width 4 x 256 = 1024, down/up-sampling inside residual blocks.
  """
  model.name = "unet"
  model.model_channels = 256
  model.channel_mult = (1, 2, 3, 4)
  model.num_res_blocks = 2
  model.attention_resolutions = (16, 8, 4)
  model.attention_semantics = "resolution"
  model.num_heads = 4
  model.num_head_channels = 64
  model.use_scale_shift_norm = True
  model.resblock_updown = True


def dit(model, preset):
  """DiT (adaLN-Zero, fixed 2-D sin-cos positions, no learned sigma), e.g. preset "L/2"."""
  model.name = "dit"
  model.dit_preset = preset  # S/2 | B/2 | L/2 | XL/2 (models/dit.py)


def celeb_a_hq(data, image_size=256, task="generation"):
  """CelebA-HQ through tfds (`celeb_a_hq/<size>`, manual data<size>x<size>.tar), 27k/3k split.

  "train[:90%]" of the 30,000 images is 27,000 ("train[90%:]" the other 3,000); tfds stores
  CelebA-HQ in its own hashed order, so these are a fixed 27,000, not images 0..26999.
  task="inpainting" adds LFM's training masks (`mask`, lfm_jax/masks.py), drawn from
  (data.mask_seed, id).
  """
  data.name = f"celeb_a_hq/{image_size}"
  data.train_split = "train[:90%]"
  data.eval_split = "train[90%:]"
  data.crop = "none"  # already square: resize only
  data.random_flip = True
  data.task = task
  if task == "inpainting":
    data.mask_kind = "lfm"


def ffhq(data):
  """FFHQ 256 through lfm_jax's `ffhq` builder: NVAE's first 63,000 (90%) of 70,000 train."""
  data.name = "ffhq"
  data.train_split = "train[:90%]"
  data.eval_split = "train[90%:]"
  data.crop = "none"
  data.random_flip = True


def lsun(data, category):
  """LSUN church_outdoor / bedroom from the official LMDB files (`lfm_lsun/<category>`): the
  first 120k training images in LMDB key order, resize + center crop + flip."""
  data.name = f"lfm_lsun/{category}"
  data.train_split = "train"
  data.eval_split = "validation"
  data.max_train_examples = NUM_TRAIN["lsun"]
  data.crop = "center"
  data.random_flip = True


def imagenet(data):
  """ImageNet 256 class-conditional: ADM's center crop + flip, 1,000 classes."""
  data.name = "imagenet2012"
  data.train_split = "train"
  data.eval_split = "validation"
  data.crop = "adm"
  data.random_flip = True
  data.num_classes = 1000


def celebamask_hq(data, image_size=256):
  """CelebAMask-HQ semantic synthesis (`celebamask_hq`, manual CelebAMask-HQ.zip): LFM's split,
  images 0..26999 train and 27000..29999 test; batches carry `segmentation` (19 classes)."""
  data.name = "celebamask_hq"
  data.image_size = image_size
  data.train_split = "train"
  data.eval_split = "test"
  data.crop = "none"
  data.random_flip = False  # LFM does not flip (a flip would also swap left/right classes)
  data.task = "semantic"
