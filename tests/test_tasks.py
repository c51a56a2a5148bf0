"""Conditional tasks (lfm_jax/tasks.py, models/semantic.py): inpainting and semantic synthesis.

The numbers checked: the mask channel is PyTorch's nearest downsampling in LFM's {-1, +1}; the
cached extra channels are encode(masked image) of each (possibly mirrored) example; the train
step hands the network exactly scale * posterior draw + mask channel; known pixels survive
sampling bit for bit; the semantic rescaler equals LDM's SpatialRescaler (torch) and is trained;
bad condition files fail with one line naming the key and the file.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import default_config
from rehearsal import random_params
from lfm_jax import artifacts
from lfm_jax import config_validation
from lfm_jax import latents as latents_lib
from lfm_jax import masks as masks_lib
from lfm_jax import optim
from lfm_jax import tasks
from lfm_jax import train
from lfm_jax.models.autoencoder import AutoencoderKL
from lfm_jax.models.semantic import SemanticConditioned, SpatialRescaler, halvings
from lfm_jax.models.unet import UNet

S = 8  # image side
SCALE = 0.5


@pytest.fixture(scope="module")
def autoencoder():
  """A random 2x-downsampling KL autoencoder (8x8x3 images -> 4x4x4 latents)."""
  module = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, mid_block_attention=False)
  return artifacts.Autoencoder(module, random_params(module, (1, S, S, 3)), identity={"test": 1},
                               source="test")


def _images_and_masks(n, seed=0):
  rs = np.random.RandomState(seed)
  images = rs.uniform(-1, 1, (n, S, S, 3)).astype(np.float32)
  masks = np.stack([masks_lib.inpainting_mask(3, i, S) for i in range(n)])
  masks[0] = masks_lib.center_mask(S)  # at least one mask with a hole at 8 px
  return images, masks


def _inpainting_config(**data):
  c = default_config()
  c.data.task = "inpainting"
  c.data.image_size = S
  c.data.channels = 3
  c.data.num_classes = 0
  c.model.num_classes = 0
  c.model.extra_in_channels = 5
  for k, v in data.items():
    c.data[k] = v
  return c


# ----------------------------------------------------------------------------- the mask channel


def test_mask_channel_is_torch_nearest_in_lfm_convention():
  torch = pytest.importorskip("torch")
  mask = (np.random.RandomState(0).uniform(size=(3, 32, 32)) > 0.5).astype(np.float32)
  for factor in (2, 4, 8):
    ours = np.asarray(tasks.mask_channel(mask, factor))
    lfm = torch.nn.functional.interpolate(torch.from_numpy(1.0 - mask)[:, None] * 2 - 1,
                                          size=(32 // factor, 32 // factor)).numpy()
    assert ours.shape == (3, 32 // factor, 32 // factor, 1)
    np.testing.assert_array_equal(ours[..., 0], lfm[:, 0])
  assert set(np.unique(tasks.mask_channel(mask, 4))) == {-1.0, 1.0}
  hole = masks_lib.center_mask(8)
  ch = np.asarray(tasks.mask_channel(hole, 2))[..., 0]
  assert ch[2, 2] == 1.0 and ch[0, 0] == -1.0  # +1 on holes, -1 on known pixels
  with pytest.raises(ValueError, match="cannot be downsampled"):
    tasks.downsample_nearest(np.zeros((6, 6)), 4)


# ----------------------------------------------------------------------------- the cache


def _encoder(ae):
  return lambda x: tuple(np.asarray(a) for a in ae.encode(x))


def test_cached_extras_are_encoded_masked_images_both_orientations(autoencoder, tmp_path):
  images, masks = _images_and_masks(6)
  cfg = _inpainting_config()
  ids = np.arange(6, dtype=np.int64)

  def read(want):
    yield {"image": images[want], "label": np.zeros(len(want), np.int32), "id": ids[want],
           "mask": masks[want]}

  encode = _encoder(autoencoder)
  cache, _ = latents_lib.build_cache(
      tmp_path / "latents", {"t": 1}, ids=ids, read_images=read, encode_fn=encode, groups=2,
      chunk=4, flipped=True, log=lambda m: None, **tasks.cache_extras(cfg, encode, 4))
  arrays = cache.read()
  for flip in (False, True):
    x, m = (images[:, :, ::-1], masks[:, :, ::-1]) if flip else (images, masks)
    want_mean, want_logvar = encode(masks_lib.masked_image(x, m))
    sfx = "_flip" if flip else ""
    np.testing.assert_allclose(arrays["masked_mean" + sfx], want_mean, atol=1e-5)
    np.testing.assert_allclose(arrays["masked_logvar" + sfx], want_logvar, atol=1e-5)
    np.testing.assert_array_equal(arrays["mask_channel" + sfx][..., 0], 1.0 - 2.0 * m[:, ::2, ::2])
  # The image's own posterior is unchanged by the task.
  np.testing.assert_allclose(arrays["mean"], encode(images)[0], atol=1e-5)
  assert tasks.cache_fingerprint(cfg)["mask_seed"] == 0
  assert tasks.cache_fingerprint(_inpainting_config(mask_per_epoch=True)) is None


def test_train_step_feeds_the_network_scaled_masked_latent_and_mask(autoencoder, tmp_path):
  """A probe network records the cond it receives inside the jitted step."""
  images, masks = _images_and_masks(8)
  encode = _encoder(autoencoder)
  mean, logvar = encode(images)
  masked_mean, masked_logvar = encode(masks_lib.masked_image(images, masks))
  batch = {"mean": mean, "logvar": logvar, "masked_mean": masked_mean,
           "masked_logvar": masked_logvar,
           "mask_channel": np.asarray(tasks.mask_channel(masks, 2), np.float32)}
  seen = []  # the cond each call of the network received

  class Probe(nn.Module):
    extra_in_channels: int = 5

    @nn.compact
    def __call__(self, x, t, y=None, cond=None, train=False):
      w = self.param("w", nn.initializers.zeros, ())
      jax.debug.callback(lambda c: seen.append(np.asarray(c)), cond)
      return jnp.zeros_like(x) + w

  cfg = _inpainting_config()
  cfg.train.ema_decay = 0.0
  tx, schedule = optim.create_optimizer(cfg.train)
  state = train.create_train_state(jax.random.PRNGKey(0), Probe(), cfg, (4, 4, 4), tx=tx)
  step = jax.jit(train.make_train_step(Probe(), cfg, tx, schedule, scale_factor=SCALE))
  _, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  cond = seen[-1]
  assert cond.shape == (8, 4, 4, 5)
  # The step's randomness: rng_latent of fold_in(state.rng, step), folded with 1 for cond.
  rng_latent = jax.random.split(jax.random.fold_in(state.rng, 0))[0]
  want = latents_lib.sample_latents(jax.random.fold_in(rng_latent, 1), masked_mean,
                                    masked_logvar, SCALE)
  assert not np.allclose(want, SCALE * masked_mean, atol=1e-3)  # a draw, not the mean
  np.testing.assert_allclose(cond[..., :4], want, atol=1e-5)
  np.testing.assert_array_equal(cond[..., 4], 1.0 - 2.0 * masks[:, ::2, ::2])
  # autoencoder.sample_posterior False: the mean, scaled.
  mean_cond = jax.jit(lambda b: tasks.batch_cond(b, jax.random.PRNGKey(0), SCALE, False))(batch)
  np.testing.assert_allclose(mean_cond[..., :4], SCALE * masked_mean, atol=1e-6)
  np.testing.assert_array_equal(mean_cond[..., 4:], batch["mask_channel"])


def test_inpainting_unet_takes_nine_channels():
  cfg = _inpainting_config()
  cfg.model.model_channels = 16
  cfg.model.norm_num_groups = 8
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  module = models.create_model(cfg.model, (4, 4, 4))
  params = jax.eval_shape(lambda: train.init_params(module, jax.random.PRNGKey(0), cfg,
                                                    (4, 4, 4)))
  assert params["input_blocks_0_0"]["kernel"].shape[2] == 9
  assert params["out_2"]["kernel"].shape[-1] == 4


# ----------------------------------------------------------------------------- sampling


def test_known_pixels_are_exactly_preserved_and_cond_is_deterministic(autoencoder):
  images, masks = _images_and_masks(5, seed=3)
  cfg = _inpainting_config()
  conditions = tasks.Conditions(images=images, masks=masks)
  generated = np.random.RandomState(9).uniform(-1, 1, images.shape).astype(np.float32)
  results = tasks.finish(cfg, generated, conditions)
  known = masks.astype(bool)
  assert (~known).any() and known.any()
  np.testing.assert_array_equal(results[known], images[known])
  np.testing.assert_array_equal(results[~known], generated[~known])
  a = tasks.cond_array(cfg, autoencoder, conditions, scale_factor=SCALE, seed=4,
                       indices=np.arange(5))
  b = tasks.cond_array(cfg, autoencoder, tasks.Conditions(images=images[2:], masks=masks[2:]),
                       scale_factor=SCALE, seed=4, indices=np.arange(2, 5))
  assert a.shape == (5, 4, 4, 5)
  np.testing.assert_allclose(a[2:], b, atol=1e-5)  # row i depends on (seed, i) only
  mean = np.asarray(autoencoder.encode(masks_lib.masked_image(images, masks))[0])
  cfg.autoencoder.sample_posterior = False
  c = tasks.cond_array(cfg, autoencoder, conditions, scale_factor=SCALE, seed=4,
                       indices=np.arange(5))
  np.testing.assert_allclose(c[..., :4], SCALE * mean, atol=1e-5)
  shown, columns = tasks.picture_rows(cfg, conditions, results)
  assert columns == 3 and shown.shape == (15, S, S, 3)
  np.testing.assert_array_equal(shown[2::3], results)


# ----------------------------------------------------------------------------- semantic


def test_rescaler_matches_ldm_spatial_rescaler():
  torch = pytest.importorskip("torch")
  rs = np.random.RandomState(0)
  maps = rs.randint(0, 19, (2, 32, 32))
  module = SpatialRescaler(19, 4)
  params = module.init(jax.random.PRNGKey(0), jnp.asarray(maps), (4, 4))
  ours = np.asarray(module.apply(params, jnp.asarray(maps, jnp.float32), (4, 4)))
  kernel = np.asarray(params["params"]["channel_mapper"]["kernel"])  # (1, 1, 19, 4) HWIO
  x = torch.nn.functional.one_hot(torch.from_numpy(maps), 19).permute(0, 3, 1, 2).float()
  for _ in range(3):  # LDM SpatialRescaler(n_stages=3, method="bilinear", multiplier=0.5)
    x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear")
  conv = torch.nn.Conv2d(19, 4, 1, bias=False)
  conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
  ref = conv(x).detach().permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, 4, 4, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert halvings(256, 32) == 3
  with pytest.raises(ValueError, match="cannot be rescaled"):
    halvings(48, 32)


def test_semantic_wrapper_nests_the_unet_and_trains_the_rescaler():
  inner = UNet(model_channels=16, channel_mult=(1,), num_res_blocks=1, norm_num_groups=8,
               mid_attention=False, extra_in_channels=4)
  module = SemanticConditioned(inner, semantic_classes=19)
  x, t = jnp.zeros((2, 4, 4, 4)), jnp.full((2,), 0.5)
  maps = jnp.asarray(np.random.RandomState(1).randint(0, 19, (2, 8, 8)), jnp.uint8)
  params = random_params(module, x.shape, t=t, cond=maps)  # the output layer is not zero
  bare = jax.eval_shape(lambda: inner.init(jax.random.PRNGKey(0), x, t,
                                           cond=jnp.zeros((2, 4, 4, 4)))["params"])
  assert jax.tree.structure(params["inner"]) == jax.tree.structure(bare)
  assert params["cond_stage"]["channel_mapper"]["kernel"].shape == (1, 1, 19, 4)
  target = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  @jax.jit
  def loss(p, m):
    return jnp.mean((module.apply({"params": p}, x + 1.0, t, cond=m) - target) ** 2)

  grads = jax.jit(jax.grad(loss))(params, maps)
  g = np.abs(np.asarray(grads["cond_stage"]["channel_mapper"]["kernel"]))
  assert g.max() > 0  # trained jointly
  assert float(loss(params, maps)) != pytest.approx(float(loss(params, (maps + 1) % 19)))
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  cfg = default_config()
  cfg.model.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_num_groups=8,
                   num_classes=0, extra_in_channels=4, semantic_classes=19)
  assert isinstance(models.create_model(cfg.model, (4, 4, 4)), SemanticConditioned)


def test_semantic_cache_stores_uint8_maps_flipped_with_swapped_classes():
  from lfm_jax.datasets import celebamask_hq  # pylint: disable=g-import-not-at-top
  cfg = default_config()
  cfg.data.name, cfg.data.task = "celebamask_hq", "semantic"
  fn = tasks.cache_extras(cfg, encode_fn=None, chunk=1)
  assert fn["extra_inputs"] == ("segmentation",)
  seg = np.random.RandomState(0).randint(0, 19, (3, 8, 8)).astype(np.int32)
  plain = fn["extras"]({"image": None, "segmentation": seg}, False)["segmentation"]
  flipped = fn["extras"]({"image": None, "segmentation": seg}, True)["segmentation"]
  assert plain.dtype == np.uint8 and flipped.dtype == np.uint8
  np.testing.assert_array_equal(plain, seg)
  np.testing.assert_array_equal(flipped, celebamask_hq.FLIP_PERMUTATION[seg[:, :, ::-1]])
  l_eye, r_eye = (celebamask_hq.CLASS_NAMES.index(n) for n in ("l_eye", "r_eye"))
  assert celebamask_hq.FLIP_PERMUTATION[l_eye] == r_eye
  batch = {"mean": np.zeros((3, 4, 4, 4)), "segmentation": plain}
  np.testing.assert_array_equal(tasks.batch_cond(batch, None, 1.0), plain)


# ----------------------------------------------------------------------------- bad input


def test_condition_files_fail_with_one_line_naming_key_and_file(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image, mask, small, rgb_map, bad_map = (str(tmp_path / f) for f in (
      "image.png", "mask.png", "small.png", "rgb_map.png", "bad_map.png"))
  Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(image)
  Image.fromarray(np.full((S, S), 255, np.uint8)).save(mask)
  Image.fromarray(np.full((4, 4), 255, np.uint8)).save(small)
  Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(rgb_map)
  Image.fromarray(np.full((S, S), 19, np.uint8)).save(bad_map)
  cases = [
      (dict(inpaint_image=image, inpaint_mask=small), r"config\.data\.inpaint_mask: .*small\.png "
       r"is 4x4, expected 8x8"),
      (dict(inpaint_image=small, inpaint_mask=mask), r"config\.data\.inpaint_image: .*small\.png "
       r"is 4x4, expected 8x8"),
      (dict(inpaint_image=image), r"config\.data\.inpaint_mask: .*needs both"),
      (dict(inpaint_image=str(tmp_path / "nope.png"), inpaint_mask=mask),
       r"config\.data\.inpaint_image: .*nope\.png does not exist"),
  ]
  for data, pattern in cases:
    with pytest.raises(config_validation.ConfigError, match=pattern) as e:
      tasks.user_conditions(_inpainting_config(**data))
    assert "\n" not in str(e.value)
  good = tasks.user_conditions(_inpainting_config(inpaint_image=image, inpaint_mask=mask))
  assert good.images.shape == (1, S, S, 3) and good.masks.min() == 1.0
  cfg = default_config()
  cfg.data.update(task="semantic", image_size=S)
  cfg.model.semantic_classes = 19
  for path, pattern in [(rgb_map, r".*rgb_map\.png is a RGB image; a class map is a single-"),
                        (bad_map, r".*bad_map\.png holds class id 19, but the model has 19 "),
                        (small, r".*small\.png is 4x4, expected 8x8")]:
    cfg.data.semantic_map = path
    with pytest.raises(config_validation.ConfigError, match=r"config\.data\.semantic_map: "
                       + pattern):
      tasks.user_conditions(cfg)


@pytest.mark.parametrize("changes,key", [
    ({"data.task": "painting"}, "config.data.task"),
    ({"data.task": "inpainting"}, "config.model.extra_in_channels"),
    ({"data.task": "inpainting", "model.extra_in_channels": 5, "data.mask_kind": "dir"},
     "config.data.mask_path"),
    ({"data.task": "inpainting", "model.extra_in_channels": 5, "data.mask_kind": "stars"},
     "config.data.mask_kind"),
    ({"data.task": "semantic", "model.extra_in_channels": 4}, "config.model.semantic_classes"),
    ({"model.extra_in_channels": 3}, "config.model.extra_in_channels"),
    ({"data.semantic_map": "map.png"}, "config.data.semantic_map"),
])
def test_task_keys_are_validated(changes, key):
  cfg = default_config()
  for path, value in changes.items():
    section, name = path.split(".")
    cfg[section][name] = value
  with pytest.raises(config_validation.ConfigError, match=key.replace(".", r"\.")):
    config_validation.validate_config(cfg)


# ----------------------------------------------------------------------------- on the fly


@pytest.fixture(scope="module")
def digits_inpainting(tmp_path_factory):
  """The embedded digits (8x8, grey) as an inpainting data set, and a 1-channel autoencoder."""
  cfg = _inpainting_config(name="lfm_digits", channels=1, mask_per_epoch=True, mask_kind="lfm",
                           data_dir=str(tmp_path_factory.mktemp("tfds")))
  module = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8,
                         mid_block_attention=False)
  cfg.train.batch_size = 8
  return cfg, artifacts.Autoencoder(module, random_params(module, (1, S, S, 1)), identity={},
                                    source="test")


def test_on_the_fly_batches_and_resume(digits_inpainting, tmp_path):
  from lfm_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg, ae = digits_inpainting
  it = tasks.OnTheFlyInpainting(cfg, ae)
  first = next(it)
  state = it.state()
  second = next(it)
  assert sorted(first) == ["logvar", "mask_channel", "masked_logvar", "masked_mean", "mean"]
  assert first["mean"].shape == (8, 4, 4, 4) and first["mask_channel"].shape == (8, 4, 4, 1)
  assert set(np.unique(first["mask_channel"])) <= {-1.0, 1.0}
  images = input_pipeline.ResumableIterator(cfg.data, cfg.data.train_split, batch_size=8,
                                            shuffle=True, seed=int(cfg.seed), repeat=True)
  ref = next(images)
  np.testing.assert_allclose(first["masked_mean"],
                             ae.encode(masks_lib.masked_image(ref["image"], ref["mask"]))[0],
                             atol=1e-5)
  np.testing.assert_array_equal(first["mask_channel"][..., 0],
                                1.0 - 2.0 * ref["mask"][:, ::2, ::2])
  again = tasks.OnTheFlyInpainting(cfg, ae).restore(state)
  np.testing.assert_array_equal(next(again)["masked_mean"], second["masked_mean"])
  # It trains: two steps of a tiny 9-channel DiT from these batches.
  cfg.model.update(name="dit", hidden_size=16, depth=1, patch_size=2, num_heads=2)
  cfg.train.update(num_steps=2, log_every=1, checkpoint_every=2, sample_every=0)
  state = train.train_and_evaluate(cfg, str(tmp_path), tasks.OnTheFlyInpainting(cfg, ae),
                                   scale_factor=SCALE)
  assert int(state.step) == 2
  assert os.path.isdir(tmp_path / "checkpoints")
  assert isinstance(cfg, ml_collections.ConfigDict)


def test_training_preview_grid_shows_inputs_masks_and_pasted_results(digits_inpainting, tmp_path):
  """The trainer's sample_every callback for a conditional task (stages._grid_sampler)."""
  from lfm_jax import stages  # pylint: disable=g-import-not-at-top
  from lfm_jax.models.dit import DiT  # pylint: disable=g-import-not-at-top
  cfg, ae = digits_inpainting
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.sample.update(solver="euler", num_steps=2)
  session = stages.Session(cfg, str(tmp_path))
  session._autoencoder = ae  # pylint: disable=protected-access
  module = DiT(hidden_size=16, depth=1, patch_size=2, num_heads=2, extra_in_channels=5)
  params = random_params(module, (1, 4, 4, 4), t=jnp.zeros((1,)), cond=jnp.zeros((1, 4, 4, 5)))
  preview = stages._grid_sampler(session, module, (4, 4, 4), SCALE)  # pylint: disable=protected-access
  images = preview(params, 7)
  assert images.shape == (12, S, S, 1) and np.isfinite(images).all()
  inputs, masks, results = images[:4], images[4:8], images[8:]
  assert set(np.unique(masks)) <= {-1.0, 1.0}  # white = known
  known = masks == 1.0
  assert known.any() and (~known).any()
  np.testing.assert_array_equal(results[known], inputs[known])
  assert (inputs[~known] == -1.0).all()  # holes are black in the network's masked input
