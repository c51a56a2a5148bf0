"""Paper 2 ("Exploring and Exploiting Stability in LFM"): training on a scored, pruned subset.

Parameterised: `--config=configs/stability_prune.py:CRITERION,RATIO[,DATASET[,PRESET]]`, e.g.
    --config=configs/stability_prune.py:cluster,0.5
    --config=configs/stability_prune.py:loss,0.75,ffhq
CRITERION in {loss, gradient, cluster, random, kcenter, herding}; RATIO = fraction REMOVED
(the paper uses 0.5 and 0.75); DATASET in {celeba_hq (default), ffhq, imagenet}; PRESET a DiT
preset (default "S/2", as in the official example command).

Protocol (official code briqr/explo-r-it-ing_lfm_stability, train_fm.py):
1. `--mode=score` scores every training image with `score.criterion`:
   - loss / gradient: a small DiT-S/2 scorer (30k steps on the full data) evaluates the FM loss /
     squared per-sample gradient norm at 10 fixed interior times with 2 shared noises, each time
     normalised by its running mean; the subset keeps the highest scores (the hardest images);
   - cluster (the paper's best): normalised image embeddings (CLIP ViT-B/32 in the paper; here
     Inception by default, CLIP through `score.embedding = "file"`), spherical k-means with k = 24
     (CelebA-HQ, FFHQ) or 1,000 (ImageNet), balanced selection (equal count per cluster, nearest
     to the centre, shortfalls of small clusters redistributed);
   - random / kcenter (k-center coreset) / herding (kernel herding): baselines.
2. `--mode=train` trains on the kept subset (the scores of step 1 in the same workdir, or
   `--config.data.subset.scores=PATH/scores_<criterion>.npz`).
Training (paper 2): AdamW lr 1e-4 constant, EMA 0.9999, global batch 128, checkpoints every 10k;
SD KL-f8 latents (the paper's own VQ-GAN f8 with scale 1/std, e.g. 0.8077 on CelebA-HQ, is the
alternative; its `vae_pretrained` option is this config's choice). Steps: 100k [uncertain].
Evaluation: FID (and precision/recall) on 4,096 samples against the validation split.
Reported [uncertain, secondary source]: pruning 50% of CelebA-HQ with balanced clustering slightly
improves FID; 75% of ImageNet can be pruned; same-seed outputs stay near-identical.

Files (CelebA-HQ, the default data set): $MANUAL_DIR/data256x256.tar (the 30,000 CelebA-HQ images at
256x256); $SD_VAE = stabilityai/sd-vae-ft-mse in the diffusers layout; $INCEPTION = pytorch-fid's
pt_inception-2015-12-05-6726825d.pth (the cluster score's embedding and FID). ffhq and imagenet
take the manual files of configs/ffhq_256_adm.py and configs/imagenet_256_adm.py. Score (encodes
the latents first), train on the kept half, sample, evaluate:

  python -m lfm_jax.main --config=configs/stability_prune.py:cluster,0.5 --workdir=$WORKDIR \
      --mode=score --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE \
      --config.eval.inception_weights=$INCEPTION
  python -m lfm_jax.main --config=configs/stability_prune.py:cluster,0.5 --workdir=$WORKDIR \
      --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/stability_prune.py:cluster,0.5 --workdir=$WORKDIR \
      --mode=sample --config.data.manual_dir=$MANUAL_DIR --config.autoencoder.pretrained=$SD_VAE
  python -m lfm_jax.main --config=configs/stability_prune.py:cluster,0.5 --workdir=$WORKDIR \
      --mode=evaluate --config.data.manual_dir=$MANUAL_DIR \
      --config.autoencoder.pretrained=$SD_VAE --config.eval.inception_weights=$INCEPTION

The loss and gradient criteria score with a small model trained first on all the data (the
official DiT-S/2 for 30k steps, e.g. `--config=configs/stability_prune.py:loss,0.5
--workdir=$SCORER --config.data.subset.ratio=0.0 --config.train.num_steps=30000`) and name it
with `--config.score.model_workdir=$SCORER` in the score command.
"""

from configs import _paper

CRITERIA = ("loss", "gradient", "cluster", "random", "kcenter", "herding")
RATIOS = (0.5, 0.75)  # the paper's pruning ratios (others are accepted)
# Which scores the subset keeps, per criterion (data.subset.rule).
RULE = {
    "loss": "highest",
    "gradient": "highest",
    "cluster": "balanced",
    "random": "random",
    "kcenter": "highest",  # scores = selection order of the greedy coreset
    "herding": "highest",  # scores = selection order of kernel herding
}
DATASETS = ("celeba_hq", "ffhq", "imagenet")
NUM_CLUSTERS = {"celeba_hq": 24, "ffhq": 24, "imagenet": 1000}
PAPER_FID = None  # see docstring


def parse_arg(arg):
  """"criterion,ratio[,dataset[,preset]]" -> (criterion, ratio, dataset, preset)."""
  parts = [p.strip() for p in (arg or "cluster,0.5").split(",")]
  if not 2 <= len(parts) <= 4:
    raise ValueError(f"stability_prune expects 'criterion,ratio[,dataset[,preset]]', got {arg!r}")
  criterion, ratio = parts[0], float(parts[1])
  dataset = parts[2] if len(parts) > 2 else "celeba_hq"
  preset = parts[3] if len(parts) > 3 else "S/2"
  if criterion not in CRITERIA:
    raise ValueError(f"criterion {criterion!r} not in {CRITERIA}")
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"ratio (fraction removed) must be in (0, 1), got {ratio}")
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r} not in {DATASETS}")
  return criterion, ratio, dataset, preset


def get_config(arg=None):
  """Returns the pruned-training config for "criterion,ratio[,dataset[,preset]]"."""
  criterion, ratio, dataset, preset = parse_arg(arg)
  config = _paper.paper_config(image_size=256)
  if dataset == "celeba_hq":
    _paper.celeb_a_hq(config.data, 256)
  elif dataset == "ffhq":
    _paper.ffhq(config.data)
  else:
    _paper.imagenet(config.data)
    config.model.num_classes = 1000
    config.flow.class_dropout_prob = 0.1
  _paper.dit(config.model, preset)

  subset = config.data.subset
  subset.rule = RULE[criterion]
  subset.ratio = ratio
  subset.scores = None  # the `score` mode's output: pass --config.data.subset.scores=...

  sc = config.score
  sc.criterion = criterion
  sc.num_clusters = NUM_CLUSTERS[dataset]
  sc.num_times = 10
  sc.num_noises = 2
  sc.embedding = "inception"  # CLIP ViT-B/32 (paper): "file" + score.embedding_file

  train = config.train
  train.batch_size = 128
  train.num_steps = 100_000
  train.learning_rate = 1e-4
  train.schedule = "constant"
  train.ema_decay = 0.9999
  train.checkpoint_every = 10_000
  config.sample.use_ema = True

  ev = config.eval
  ev.num_samples = 4096  # paper 2's protocol (torch-fidelity), against the validation split
  ev.reference_stats = None
  ev.reference_split = config.data.eval_split  # paper 2 compares against the validation split
  return config
