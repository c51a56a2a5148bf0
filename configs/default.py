"""The embedded default: offline, CPU, a few minutes.

scikit-learn's 8x8 digits (1,797 images, 10 classes) through the `lfm_digits` tfds builder,
bilinearly upsampled to 16x16x1 -> small KL autoencoder (4x down, 4x4x4 latents) -> latent cache
-> small class-conditional ADM U-Net trained by flow matching -> Euler samples with CFG -> PNG grid
per class and metrics (labelled offline metric; FID needs the Inception weights file).

Every other config imports this one and changes a few fields. Every value can be overridden on the
command line: `--config.train.num_steps=500`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
  """Returns the embedded-default config (see module docstring)."""
  # Optional values are typed placeholders (None until set) so the command line can set them.
  config = ml_collections.ConfigDict()
  config.mode = "pipeline"  # one of lfm_jax/modes.py: pipeline | autoencoder | encode | train | ... | export
  config.seed = 0

  # --- Devices (lfm_jax/parallel.py): a ("data", "fsdp") mesh over every device of every host.
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.fsdp = 1  # devices sharding params, EMA and optimizer state (FSDP); the rest form "data"
  # True: gradients are averaged over batch shards in shard order (parallel.shard_mean), so
  # host layouts of the same device count (1 x 8, 2 x 4) train alike up to each device's own
  # rounding; the training noise then depends on the shard count. False: XLA's all-reduce
  # (faster; its rounding depends on the layout; noise independent of the device count).
  mesh.deterministic_reduction = False

  # --- Data (lfm_jax/input_pipeline.py). Images are float32 in [-1, 1], NHWC.
  config.data = data = ml_collections.ConfigDict()
  data.name = "lfm_digits"  # a tfds name (e.g. "celeb_a_hq/256"), "lfm_digits", "ffhq", or "image_folder"
  data.data_dir = placeholder(str)  # tfds data dir; None: tfds default (~/tensorflow_datasets)
  data.manual_dir = placeholder(str)  # for data sets tfds cannot download (CelebA-HQ, ImageNet, FFHQ)
  data.image_folder = placeholder(str)  # path, for name == "image_folder" (class sub-folders optional)
  data.image_size = 16
  data.channels = 1
  data.train_split = "train"
  data.eval_split = "test"
  data.max_train_examples = placeholder(int)  # e.g. 120_000 for LSUN (the first N, as LFM does)
  data.crop = "none"  # none | center | adm (ADM's center crop)
  data.random_flip = False
  data.num_classes = 10  # 0 for unconditional data
  data.shuffle_buffer = 10_000
  # generation | inpainting (batches carry "mask": (S, S) float32, 1 = known, 0 = hole) |
  # semantic (batches carry "segmentation": (S, S) int32 class ids; data set celebamask_hq).
  data.task = "generation"
  data.mask_kind = "lfm"  # inpainting masks: lfm (LFM's strokes/boxes from (mask_seed, id)) | center | file | dir
  data.mask_seed = 0  # seed of the lfm masks (independent of config.seed)
  data.mask_per_epoch = False  # True: a new lfm mask each epoch (LFM's loader redraws on every read)
  data.mask_path = placeholder(str)  # file: one PNG for every example; dir: a folder of <id:06d>.png
  data.mask_white = "known"  # what white means in mask PNGs: known (LFM's eval masks) | hole
  # `sample` mode conditions (lfm_jax/tasks.py); unset: the first examples of data.eval_split.
  data.inpaint_image = placeholder(str)  # inpainting: an S x S image (PNG/JPEG) to inpaint ...
  data.inpaint_mask = placeholder(str)  # ... and its mask PNG (S x S; white per data.mask_white)
  data.semantic_map = placeholder(str)  # semantic: an S x S single-channel PNG of class ids
  # Train on a scored, pruned subset (lfm_jax/scoring.py). ratio = fraction REMOVED.
  data.subset = ml_collections.ConfigDict()
  data.subset.scores = placeholder(str)  # path to a scores file written by the `score` mode
  # highest | lowest | random | proportional_nearest | proportional_furthest | balanced |
  # balanced_nearest | balanced_furthest | kcenter | herding (see lfm_jax/scoring.py).
  data.subset.rule = "highest"
  data.subset.ratio = 0.0

  # --- First-stage autoencoder (models/autoencoder.py, autoencoder_train.py, latents.py).
  config.autoencoder = ae = ml_collections.ConfigDict()
  ae.pretrained = placeholder(str)  # path to diffusers dir or LDM/SD checkpoint; None: train one (below)
  ae.block_out_channels = (16, 32, 64)
  ae.layers_per_block = 1
  ae.latent_channels = 4
  ae.norm_num_groups = 8
  ae.attention = False  # mid-block self-attention (SD has it)
  ae.compute_dtype = "float32"  # float32 | bfloat16: encode (latent cache) and decode (samples)
  ae.scale_factor = placeholder(float)  # None: 1/std of the cached latents; 0.18215 for SD's KL-f8
  ae.sample_posterior = True  # LFM samples z ~ q(z|x) rather than using the mean
  ae.train = ml_collections.ConfigDict()
  ae.train.num_steps = 1000
  ae.train.batch_size = 64
  ae.train.learning_rate = 2e-3
  # The optimizer keys of config.train (optim.py), for the autoencoder.
  ae.train.optimizer = "adamw"
  ae.train.weight_decay = 0.0
  ae.train.schedule = "constant"
  ae.train.warmup_steps = 0
  ae.train.end_learning_rate = 0.0
  ae.train.grad_clip_norm = 0.0
  ae.train.b1 = 0.9
  ae.train.b2 = 0.999
  ae.train.eps = 1e-8
  ae.train.recon_loss = "l1"  # l1 | l2
  ae.train.kl_weight = 1e-5
  ae.train.ema_decay = 0.0  # 0 disables EMA for the autoencoder
  ae.train.log_every = 100
  ae.train.checkpoint_every = 500

  # --- Latent cache (latents.py).
  config.latents = lat = ml_collections.ConfigDict()
  lat.groups = 64  # group files = training-order groups; the process count must divide min(groups, N)
  lat.encode_batch_size = 32  # images per device per encoder call
  lat.dtype = "float32"  # float32 | float16 storage of the posteriors

  # --- Velocity network (models/unet.py, models/dit.py).
  config.model = model = ml_collections.ConfigDict()
  model.name = "unet"  # unet | dit
  model.dit_preset = placeholder(str)  # for dit: "S/2", "B/2", "L/2", "XL/2" (also /4, /8)
  # DiT shape keys; None: the preset's. Set, they override it (e.g. a narrower DiT-L/2).
  model.hidden_size = placeholder(int)
  model.depth = placeholder(int)
  model.patch_size = placeholder(int)
  model.mlp_ratio = placeholder(float)
  model.time_convention = "lfm"  # lfm | sit (a network trained with t = 0 noise; translated at load)
  model.learn_null_class = True  # False: the null label is a zero embedding (converted ADM weights)
  model.model_channels = 32
  model.channel_mult = (1, 2)
  model.num_res_blocks = 1
  model.attention_resolutions = ()
  model.attention_semantics = "resolution"  # resolution (EDM) | downsample (guided-diffusion)
  model.num_heads = 4
  model.num_head_channels = -1  # > 0 overrides num_heads with channels per head
  model.dropout = 0.0
  model.use_scale_shift_norm = True
  model.mid_attention = True  # ADM's middle-block self-attention
  model.norm_num_groups = 32
  model.norm_min_channels_per_group = 0  # > 0: groups = min(norm_num_groups, C // this); EDM DhariwalUNet: 4
  model.resblock_updown = False
  model.use_new_attention_order = False  # guided-diffusion QKVAttention: split q, k, v first, then heads
  model.num_heads_upsample = -1  # heads of the decoder's attention; -1: num_heads
  model.num_classes = 10  # 0: unconditional. The null (guidance) label is index num_classes.
  model.extra_in_channels = 0  # conditioning channels concatenated to the latent (inpainting: 5)
  # > 0: the network takes a class map (S, S) as cond: one-hot -> rescaled to the latent grid
  # -> 1x1 conv to extra_in_channels, trained jointly (models/semantic.py; CelebAMask-HQ: 19).
  model.semantic_classes = 0
  model.remat = "none"  # none | blocks | a jax.checkpoint_policies name (dots_saveable, ...)
  model.attention_implementation = placeholder(str)  # None, xla | cudnn (GPU flash, bf16 only)
  model.init_from = placeholder(str)  # a PyTorch checkpoint to start from (weights.load_velocity_checkpoint)
  model.checkpoint_entry = "ema"  # which entry of a {"model", "ema"} checkpoint init_from takes

  # --- Flow matching (flow.py). LFM convention: t = 0 data, t = 1 noise.
  config.flow = flow = ml_collections.ConfigDict()
  flow.sigma_min = 1e-5
  flow.time_sampling = "uniform"  # uniform | logit_normal
  flow.class_dropout_prob = 0.1  # label dropout for classifier-free guidance

  # --- Training (train.py).
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 128  # global
  train.num_steps = 2000
  train.optimizer = "adamw"
  train.learning_rate = 1e-3
  train.weight_decay = 0.0
  train.schedule = "constant"  # constant | cosine
  train.warmup_steps = 0
  train.end_learning_rate = 1e-5  # for cosine
  train.grad_clip_norm = 0.0  # 0 disables
  train.b1 = 0.9  # Adam(W) betas and epsilon (torch's defaults)
  train.b2 = 0.999
  train.eps = 1e-8
  train.grad_accum_steps = 1
  train.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
  train.ema_decay = 0.999
  train.ema_warmup = False
  train.log_every = 100
  train.checkpoint_every = 500
  train.keep_checkpoints = 2
  train.keep_every = 0  # also keep every K-th step's checkpoint; 0 disables
  train.sample_every = 1000  # sample grid from EMA params with fixed noise; 0 disables

  # --- Sampling (sampling.py).
  config.sample = sample = ml_collections.ConfigDict()
  sample.solver = "euler"  # euler | heun | midpoint | rk4 | dopri5 | tsit5
  sample.num_steps = 50
  sample.rtol = 1e-5
  sample.atol = 1e-5
  sample.max_steps = 4096  # step budget of the adaptive solvers (running out is an error)
  sample.guidance_scale = 1.5
  sample.guidance_interval = placeholder(tuple)  # (t_lo, t_hi): guidance only for t in the band
  sample.num_samples = 100  # `sample` mode: 10 per class
  sample.batch_size = 100
  sample.use_ema = True
  sample.compute_dtype = "float32"  # float32 | bfloat16: the velocity network while sampling

  # --- Evaluation (metrics/, `evaluate` mode).
  config.eval = ev = ml_collections.ConfigDict()
  ev.num_samples = 1000
  ev.batch_size = 250
  ev.feature_extractor = "digits_classifier"  # digits_classifier | autoencoder | inception
  ev.inception_weights = placeholder(str)  # pt_inception-2015-12-05-6726825d.pth (pytorch-fid)
  ev.reference_stats = placeholder(str)  # .npz with mu, sigma (pytorch-fid format); None: computed from
  ev.reference_split = "test"  # this split (LFM's FIDs use "train"; paper 2 the validation split)
  ev.kid_subsets = 100
  ev.kid_subset_size = 1000
  ev.precision_recall_k = 3
  # Metrics from lfm_jax/metrics/evaluate.py's registry: fd | precision_recall | kid |
  # class_agreement | inception_score (inapplicable ones are skipped with a note).
  ev.metrics = ("fd", "precision_recall", "kid", "class_agreement")
  ev.inception_score_splits = 10
  ev.compute_dtype = "float32"  # float32 | bfloat16: the feature extractor (Inception)

  # --- Scoring (scoring.py, `score` mode).
  config.score = sc = ml_collections.ConfigDict()
  sc.criterion = "cluster"  # loss | gradient | cluster | random | kcenter | herding
  sc.embedding = "autoencoder"  # autoencoder | inception | file
  sc.embedding_file = placeholder(str)  # .npz with `ids`, `features` for embedding == "file"
  sc.num_clusters = 10
  sc.num_times = 10
  sc.num_noises = 2
  sc.batch_size = 256
  sc.gradient_chunk_size = 8  # gradient scores: per-example gradients held at once (memory)
  sc.model_workdir = placeholder(str)  # loss/gradient scores: workdir of the (small) scoring model; None: this one

  # --- Stability (`stability` mode) and coarse-to-fine sampling.
  config.stability = st = ml_collections.ConfigDict()
  st.other_workdir = placeholder(str)  # the second model's workdir (same-seed comparison)
  st.num_samples = 256
  st.embedding = "digits_classifier"  # digits_classifier | autoencoder | inception | "" (pixels)
  config.coarse_to_fine = c2f = ml_collections.ConfigDict()
  c2f.light_workdir = placeholder(str)  # workdir (or checkpoint dir) of the light model; None disables
  c2f.light_fraction = 0.7  # share of the trajectory from the noise end run by the light model

  return config
