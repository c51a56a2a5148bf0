"""Paper 2's coarse-to-fine sampler: a light DiT-S/2 on the noise side, a heavy DiT-XL/2 after.

Parameterised: `--config=configs/coarse_to_fine_dit_s2_xl2.py:STAGE`, STAGE in
  heavy   train the heavy DiT-XL/2 (~675M params) on CelebA-HQ 256 (the official example),
  light   train the light DiT-S/2 (~33M params) on the same data,
  sample  (default) sample coarse-to-fine: the light model integrates the noise-side 70% of the
          trajectory (LFM convention: t in (0.3, 1]), the heavy one the data-side 30%
          (t in [0, 0.3]); Euler with 59 steps. Paper 2's `--t-split 0.7` (t = 0 noise there)
          is `coarse_to_fine.light_fraction = 0.7` here.
Training (paper 2): AdamW lr 1e-4 constant, EMA 0.9999, global batch 128, checkpoints every 10k,
100k steps (the official example fine-tunes from the heavy model's step-100k checkpoint).
The seam fine-tuning of the light model (0.1 x ||v_light - v_heavy||^2 at the switch time) is in
lfm_jax/seam.py as library functions; no command runs it.
Reported [uncertain, secondary source]: 2.15x speed-up at comparable outputs.

Files: $MANUAL_DIR/data256x256.tar (the 30,000 CelebA-HQ images at 256x256); $SD_VAE =
stabilityai/sd-vae-ft-mse in the diffusers layout; $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth. Train the heavy model into $HEAVY and the light one into
$LIGHT (each encodes its latents first), then sample and evaluate coarse-to-fine from $HEAVY:

  python -m lfm_jax.main --config=configs/coarse_to_fine_dit_s2_xl2.py:heavy --workdir=$HEAVY \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/coarse_to_fine_dit_s2_xl2.py:light --workdir=$LIGHT \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/coarse_to_fine_dit_s2_xl2.py:sample --workdir=$HEAVY \
      --config.coarse_to_fine.light_workdir=$LIGHT --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/coarse_to_fine_dit_s2_xl2.py:sample --workdir=$HEAVY \
      --config.coarse_to_fine.light_workdir=$LIGHT --mode=evaluate \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE \
      --config.eval.inception_weights=$INCEPTION
"""

from configs import _paper

STAGES = ("heavy", "light", "sample")
LIGHT_WORKDIR = "runs/c2f_light_dit_s2"  # placeholder; override on the command line
PAPER_SPEEDUP = 2.15  # [uncertain]


def get_config(arg=None):
  """Returns the coarse-to-fine config for STAGE in {heavy, light, sample} (default sample)."""
  stage = (arg or "sample").strip()
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r} not in {STAGES}")
  config = _paper.paper_config(image_size=256)
  _paper.celeb_a_hq(config.data, 256)
  _paper.dit(config.model, "S/2" if stage == "light" else "XL/2")

  train = config.train
  train.batch_size = 128
  train.num_steps = 100_000
  train.learning_rate = 1e-4
  train.schedule = "constant"
  train.ema_decay = 0.9999
  train.checkpoint_every = 10_000
  config.sample.use_ema = True

  sample = config.sample
  sample.solver = "euler"
  sample.num_steps = 59

  c2f = config.coarse_to_fine
  c2f.light_fraction = 0.7
  if stage == "sample":
    config.mode = "sample"
    c2f.light_workdir = LIGHT_WORKDIR
  ev = config.eval
  ev.num_samples = 4096  # paper 2's protocol
  return config
