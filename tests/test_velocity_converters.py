"""PyTorch <-> Flax velocity-network converters (parity, round trip, strictness)."""

import importlib.machinery
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lfm_jax.converters import velocity as V
from lfm_jax.converters.common import WeightConversionError
from lfm_jax.models import SiTConventionWrapper
from lfm_jax.models.dit import DiT
from lfm_jax.models.unet import UNet

TIMES = (0.0, 0.3, 0.7, 1.0)


def _torchcfm_unet_module():
  """torchcfm's guided-diffusion UNetModel (loaded as benchmarks/peer_torch.py loads it)."""
  pytest.importorskip("torch")
  if importlib.machinery.PathFinder.find_spec("torchcfm") is None:
    pytest.skip("torchcfm not installed")
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "peer_torch.py")
  sys.path.insert(0, os.path.dirname(path))  # peer_torch imports its sibling _common
  spec = importlib.util.spec_from_file_location("bench_peer_torch", path)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  return peer.torchcfm_unet_module()


def _perturb_torch(model, seed=0, std=0.05):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * std)
  model.eval()
  return model


def _perturb_jax(params, seed=0, std=0.05):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [l + std * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def _cfg(**kw):
  c = ml_collections.ConfigDict()
  c.name = kw.pop("name", "unet")
  c.num_classes = 0
  c.num_heads = 1
  c.num_head_channels = -1
  c.time_convention = "lfm"
  c.update(kw)
  return c


def _sd_numpy(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("num_classes,new_order", [(10, False), (0, False), (10, True)])
def test_unet_parity_with_torchcfm(num_classes, new_order):
  import torch
  unet_mod = _torchcfm_unet_module()
  torch.manual_seed(0)
  ref = unet_mod.UNetModel(
      image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
      attention_resolutions=(2,), channel_mult=(1, 2), num_classes=num_classes or None,
      num_heads=2, use_scale_shift_norm=True, use_new_attention_order=new_order)
  _perturb_torch(ref)
  cfg = _cfg(num_classes=num_classes, num_heads=2, use_new_attention_order=new_order)
  module, params = V.unet_state_dict_to_params(_sd_numpy(ref), cfg)
  assert isinstance(module, UNet)
  assert module.channel_mult == (1, 2) and module.num_res_blocks == 1
  assert module.attention_resolutions == (2,) and module.num_classes == num_classes
  assert not (num_classes and module.learn_null_class)

  rng = np.random.RandomState(0)
  x = rng.randn(4, 4, 8, 8).astype(np.float32)
  y = np.array([0, 3, 9, 5]) if num_classes else None
  apply = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y=y))
  errs = []
  for tv in TIMES:
    t = np.full((4,), tv, np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(t), torch.from_numpy(x),
                 y=None if y is None else torch.from_numpy(y)).numpy()
    got = np.asarray(apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                           None if y is None else jnp.asarray(y)))
    errs.append(np.abs(got.transpose(0, 3, 1, 2) - want).max())
    assert np.abs(want).max() > 1e-2  # not a trivially zero network
  print(f"U-Net parity (classes={num_classes}, new_order={new_order}): max abs err "
        f"{max(errs):.2e}")
  assert max(errs) < 1e-4

  if num_classes:
    # Null label (index num_classes) == the torch network with a zero label embedding.
    t = np.full((4,), 0.4, np.float32)
    with torch.no_grad():
      ref.label_emb.weight.zero_()
      want = ref(torch.from_numpy(t), torch.from_numpy(x), y=torch.zeros(4, dtype=torch.long))
    got = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), None)
    assert np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want.numpy()).max() < 1e-4


def test_unet_round_trip_and_file(tmp_path):
  module = UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(2,), attention_semantics="downsample", num_heads=2,
                num_classes=10, learn_null_class=True, extra_in_channels=2)
  x = jnp.zeros((1, 8, 8, 4))
  params = jax.jit(lambda x: module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)),
                                        cond=jnp.zeros((1, 8, 8, 2))))(x)
  params = _perturb_jax(params["params"])
  path = tmp_path / "unet.safetensors"
  sd = V.export_velocity_checkpoint(module, params, str(path))
  assert sd["input_blocks.0.0.weight"].shape == (32, 6, 3, 3)
  assert sd["label_emb.weight"].shape == (11, 128)
  cfg = _cfg(num_classes=10, num_heads=2)
  module2, params2 = V.load_velocity_checkpoint(str(path), cfg)
  assert module2.learn_null_class and module2.num_classes == 10
  assert module2.extra_in_channels == 2
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)
  # .pt through torch as well
  pytest.importorskip("torch")
  V.export_velocity_checkpoint(module2, params2, str(tmp_path / "unet.pt"))
  _, params3 = V.load_velocity_checkpoint(str(tmp_path / "unet.pt"), cfg)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, params3)


def test_unet_strict_errors_name_every_key():
  module = UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_classes=0)
  params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                                              jnp.zeros((1,))))["params"]
  params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), params)
  sd = V.params_to_state_dict(params, module)
  sd = dict(sd)
  del sd["middle_block.1.qkv.bias"]
  sd["input_blocks.1.0.in_layers.2.weight"] = np.zeros((32, 32, 3, 1), np.float32)
  sd["bogus.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(WeightConversionError) as err:
    V.state_dict_to_params(sd, module, in_channels=4, source="test.pt")
  msg = str(err.value)
  assert "missing key: middle_block.1.qkv.bias" in msg
  assert "unexpected key: bogus.weight" in msg
  assert "wrong shape: input_blocks.1.0.in_layers.2.weight" in msg


# ----------------------------------------------------------------------------- DiT


def _facebook_to_diffusers(sd, depth):
  """Public facebook-DiT -> diffusers DiTTransformer2DModel key correspondence."""
  out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"],
         "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
         "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
         "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
         "proj_out_2.weight": sd["final_layer.linear.weight"],
         "proj_out_2.bias": sd["final_layer.linear.bias"]}
  for i in range(depth):
    d, f = f"transformer_blocks.{i}.", f"blocks.{i}."
    emb = d + "norm1.emb."
    for a, b in (("linear_1", "0"), ("linear_2", "2")):
      for w in ("weight", "bias"):
        out[f"{emb}timestep_embedder.{a}.{w}"] = sd[f"t_embedder.mlp.{b}.{w}"]
    out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    for w in ("weight", "bias"):
      out[f"{d}norm1.linear.{w}"] = sd[f"{f}adaLN_modulation.1.{w}"]
      q, k, v = np.split(sd[f"{f}attn.qkv.{w}"], 3, axis=0)
      out[f"{d}attn1.to_q.{w}"], out[f"{d}attn1.to_k.{w}"], out[f"{d}attn1.to_v.{w}"] = q, k, v
      out[f"{d}attn1.to_out.0.{w}"] = sd[f"{f}attn.proj.{w}"]
      out[f"{d}ff.net.0.proj.{w}"] = sd[f"{f}mlp.fc1.{w}"]
      out[f"{d}ff.net.2.{w}"] = sd[f"{f}mlp.fc2.{w}"]
  return out


def test_dit_parity_with_diffusers_and_round_trip():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  module = DiT(hidden_size=64, depth=2, num_heads=2, patch_size=2, num_classes=10)
  x = np.random.RandomState(1).randn(4, 8, 8, 4).astype(np.float32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.asarray(x), jnp.zeros((4,)))["params"]
  params = _perturb_jax(params, std=0.1)
  sd = V.dit_params_to_state_dict(params, module, latent_size=8)
  assert sd["pos_embed"].shape == (1, 16, 64)

  ref = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
  missing, unexpected = ref.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in _facebook_to_diffusers(sd, 2).items()},
      strict=True)
  assert not missing and not unexpected
  # facebook's timestep embedding divides the frequency exponent by `half`; diffusers' DiT
  # uses downscale_freq_shift=1 (half - 1). Use facebook's (our) definition on both sides.
  for blk in ref.transformer_blocks:
    blk.norm1.emb.time_proj.downscale_freq_shift = 0
  ref.eval()

  apply = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y=y))
  errs = []
  for labels in (np.array([0, 3, 9, 5]), None):
    for tv in TIMES:
      t = np.full((4,), tv, np.float32)
      yt = labels if labels is not None else np.full((4,), 10)
      with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
                   class_labels=torch.from_numpy(yt)).sample.numpy()
      got = np.asarray(apply(params, jnp.asarray(x), jnp.asarray(t),
                             None if labels is None else jnp.asarray(labels)))
      assert np.abs(want).max() > 1e-2
      errs.append(np.abs(got.transpose(0, 3, 1, 2) - want).max())
  print(f"DiT parity with diffusers: max abs err {max(errs):.2e}")
  assert max(errs) < 1e-4

  # facebook layout -> params: identity; stability-style {"model", "ema"} with module. prefix.
  ckpt = {"model": {"module." + k: v * 0 for k, v in sd.items()},
          "ema": {"module." + k: v for k, v in sd.items()}}
  module2, params2 = V.dit_state_dict_to_params(ckpt, _cfg(name="dit", num_classes=10))
  assert (module2.hidden_size, module2.depth, module2.patch_size, module2.num_classes) == \
      (64, 2, 2, 10)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)
  sd_bad = dict(sd)
  sd_bad["blocks.1.mlp.fc2.weight"] = sd_bad["blocks.1.mlp.fc2.weight"][:, :10]
  del sd_bad["final_layer.linear.bias"]
  with pytest.raises(WeightConversionError) as err:
    V.state_dict_to_params(sd_bad, module, in_channels=4)
  assert "blocks.1.mlp.fc2.weight" in str(err.value)
  assert "final_layer.linear.bias" in str(err.value)


# ----------------------------------------------------------------------------- time convention


def test_sit_convention_euler_equivalence(tmp_path):
  """A SiT-convention net imported with time_convention="sit", integrated t = 1 -> 0 in LFM's
  convention, equals Euler t = 0 -> 1 of the original in its own convention."""
  module = UNet(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, num_heads=1)
  z0 = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
  params = jax.jit(module.init)(jax.random.PRNGKey(0), z0, jnp.zeros((2,)))["params"]
  params = _perturb_jax(params)
  path = tmp_path / "sit.safetensors"
  V.export_velocity_checkpoint(module, params, str(path))
  lfm_module, lfm_params = V.load_velocity_checkpoint(str(path), _cfg(time_convention="sit"))
  assert isinstance(lfm_module, SiTConventionWrapper)

  n = 8
  v_sit = jax.jit(lambda z, s: module.apply({"params": params}, z, s))
  v_lfm = jax.jit(lambda z, t: lfm_module.apply({"params": lfm_params}, z, t))
  z_sit = z0
  for k in range(n):
    z_sit = z_sit + (1.0 / n) * v_sit(z_sit, jnp.full((2,), k / n))
  ts = np.linspace(1.0, 0.0, n + 1)
  z_lfm = z0
  for k in range(n):
    z_lfm = z_lfm + (ts[k + 1] - ts[k]) * v_lfm(z_lfm, jnp.full((2,), ts[k]))
  err = float(jnp.abs(z_lfm - z_sit).max())
  print(f"SiT-convention Euler equivalence: max abs err {err:.2e}")
  assert float(jnp.abs(z_sit - z0).max()) > 1e-2
  assert err < 1e-5


# ----------------------------------------------------------------------------- EDM DhariwalUNet

# Small widths where EDM's GroupNorm rule min(32, C // 4) differs from guided-diffusion's 32, an
# 8x8 level without attention (32 < 64 channels: EDM then has no heads), one head at 4x4 and two
# at 2x2 (so the qkv row order matters).
EDM_KW = dict(img_resolution=8, model_channels=32, channel_mult=(1, 2, 4), num_blocks=1,
              attn_resolutions=(8, 4, 2))


def _edm_reference(label_dim=10, in_channels=4, seed=0):
  pytest.importorskip("torch")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import _edm_dhariwal_reference as ref_lib  # pylint: disable=g-import-not-at-top
  return ref_lib.DhariwalUNet(in_channels=in_channels, out_channels=4, label_dim=label_dim,
                              **EDM_KW).randomize(seed)


@pytest.fixture(scope="module")
def edm_labelled():
  """(torch reference, its state dict, imported UNet, params) with 10 classes."""
  ref = _edm_reference()
  sd = _sd_numpy(ref)
  module, params = V.edm_state_dict_to_params(sd, _cfg(num_classes=10))
  return ref, sd, module, params


_EDM_APPLY = {}


def _edm_errors(ref, module, params, x, cond=None, labels=None):
  """Max abs error Flax vs torch over TIMES. labels None: torch y=None (no label term) against
  Flax y=None (the null index for all); labels may mix in the null index (num_classes)."""
  import torch
  if module not in _EDM_APPLY:  # one compile per architecture
    _EDM_APPLY[module] = jax.jit(
        lambda p, x, t, y, c: module.apply({"params": p}, x, t, y=y, cond=c))
  apply = _EDM_APPLY[module]
  xt = np.concatenate([x, cond], axis=1) if cond is not None else x
  errs = []
  for tv in TIMES:
    t = np.full((x.shape[0],), tv, np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(t), torch.from_numpy(xt)).numpy()  # y=None: no label term
      if labels is not None:
        null = labels >= ref.label_dim
        with_y = ref(torch.from_numpy(t), torch.from_numpy(xt),
                     torch.from_numpy(np.where(null, 0, labels))).numpy()
        want = np.where(null[:, None, None, None], want, with_y)
    got = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
                None if labels is None else jnp.asarray(labels),
                None if cond is None else jnp.asarray(cond.transpose(0, 2, 3, 1)))
    assert np.abs(want).max() > 1e-1  # not a trivially zero network
    errs.append(np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max())
  return max(errs)


def test_edm_dhariwal_parity(edm_labelled):
  ref, _, module, params = edm_labelled
  assert isinstance(module, UNet)
  assert (module.model_channels, module.channel_mult, module.num_res_blocks) == (32, (1, 2, 4), 1)
  assert module.attention_semantics == "resolution" and module.attention_resolutions == (4, 2)
  assert module.mid_attention and module.resblock_updown and module.use_scale_shift_norm
  assert module.num_classes == 10 and not module.learn_null_class
  assert module.norm_min_channels_per_group == 4 and module.num_head_channels == 64
  x = np.random.RandomState(0).randn(4, 4, 8, 8).astype(np.float32)
  err_labels = _edm_errors(ref, module, params, x, labels=np.array([0, 3, 9, 5]))
  err_null = _edm_errors(ref, module, params, x, labels=np.full((4,), 10))
  err_mixed = _edm_errors(ref, module, params, x, labels=np.array([0, 10, 9, 10]))
  print(f"EDM DhariwalUNet parity: max abs err labels {err_labels:.2e}, null {err_null:.2e}, "
        f"mixed {err_mixed:.2e}")
  assert max(err_labels, err_null, err_mixed) < 1e-4


def test_edm_dhariwal_parity_unconditional_with_extra_channels():
  ref = _edm_reference(label_dim=0, in_channels=6, seed=1)
  module, params = V.edm_state_dict_to_params(_sd_numpy(ref))
  assert module.num_classes == 0 and module.extra_in_channels == 2
  rng = np.random.RandomState(1)
  x = rng.randn(3, 4, 8, 8).astype(np.float32)
  cond = rng.randn(3, 2, 8, 8).astype(np.float32)
  err = _edm_errors(ref, module, params, x, cond=cond)
  print(f"EDM DhariwalUNet parity (unconditional, 2 extra channels): max abs err {err:.2e}")
  assert err < 1e-4


def test_edm_dhariwal_round_trip_and_files(edm_labelled, tmp_path):
  import torch
  ref, sd, module, params = edm_labelled
  out = V.params_to_state_dict(params, module, latent_size=8, layout="edm_dhariwal")
  assert sorted(out) == sorted(sd)
  for k in sd:
    assert out[k].shape == sd[k].shape, k
    np.testing.assert_array_equal(out[k], sd[k], err_msg=k)
  for name in ("edm.safetensors", "edm.pt"):
    path = str(tmp_path / name)
    written = V.export_velocity_checkpoint(module, params, path, layout="edm_dhariwal",
                                           latent_size=8)
    assert sorted(written) == sorted(sd)
    module2, params2 = V.load_velocity_checkpoint(path, _cfg(num_classes=10))
    assert module2 == module
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  # The torch reference loads the export strictly (buffers included).
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in out.items()}, strict=True)
  # The default export of a UNet stays guided-diffusion.
  gd = V.export_velocity_checkpoint(module, params, str(tmp_path / "gd.safetensors"))
  assert "input_blocks.0.0.weight" in gd


def test_edm_dhariwal_export_from_config(edm_labelled):
  """A UNet from create_model with EDM's options (the imported architecture) exports random
  params to a state dict the torch reference loads strictly and evaluates identically; options
  DhariwalUNet cannot express are refused by name."""
  import torch
  from lfm_jax.models import create_model
  _, _, imported, _ = edm_labelled
  cfg = _cfg(num_classes=10, model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
             attention_resolutions=(4, 2), attention_semantics="resolution", num_heads=1,
             num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True,
             mid_attention=True, learn_null_class=False, norm_num_groups=32,
             norm_min_channels_per_group=4, dropout=0.0)
  module = create_model(cfg, (8, 8, 4))
  assert module == imported
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                                              jnp.zeros((1,))))["params"]
  rng = np.random.RandomState(2)  # numpy: per-leaf jax.random calls compile per shape (slow)
  params = jax.tree_util.tree_map_with_path(  # GroupNorm scales around 1
      lambda path, s: (path[-1].key == "scale") + 0.1 * rng.randn(*s.shape).astype(np.float32),
      shapes)
  sd = V.params_to_state_dict(params, module, latent_size=8, layout="edm_dhariwal")
  ref = _edm_reference()
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  x = np.random.RandomState(2).randn(4, 4, 8, 8).astype(np.float32)
  err = _edm_errors(ref, module, params, x, labels=np.array([1, 10, 4, 2]))
  print(f"EDM DhariwalUNet export parity: max abs err {err:.2e}")
  assert err < 1e-4

  # Option checks come before the params check: the same params serve every variant.
  for change, option in ((dict(learn_null_class=True), "learn_null_class"),
                         (dict(norm_min_channels_per_group=0), "norm_min_channels_per_group"),
                         (dict(resblock_updown=False), "resblock_updown"),
                         (dict(use_scale_shift_norm=False), "use_scale_shift_norm"),
                         (dict(num_head_channels=32), "attention heads"),
                         (dict(mid_attention=False), "mid_attention")):
    with pytest.raises(ValueError, match=option):
      V.params_to_state_dict(params, module.clone(**change), latent_size=8, layout="edm_dhariwal")
  with pytest.raises(ValueError, match="latent_size"):
    V.params_to_state_dict(params, module, layout="edm_dhariwal")
  with pytest.raises(ValueError, match="edm_dhariwal"):
    V.params_to_state_dict({}, DiT(hidden_size=64, depth=1, num_heads=2, patch_size=2),
                           latent_size=8, layout="edm_dhariwal")


def test_edm_dhariwal_strict_errors(edm_labelled, tmp_path):
  _, sd, module, _ = edm_labelled
  bad = dict(sd)
  del bad["dec.4x4_block1.qkv.bias"]
  bad["enc.8x8_block0.conv0.weight"] = bad["enc.8x8_block0.conv0.weight"][:, :, :, :1]
  bad["enc.8x8_block0.qkv.weight"] = np.zeros((96, 32, 1, 1), np.float32)
  del bad["enc.4x4_down.skip.resample_filter"]
  with pytest.raises(WeightConversionError) as err:
    V.edm_state_dict_to_params(bad, module=module, source="edm.pt")
  msg = str(err.value)
  assert "checkpoint edm.pt" in msg
  assert "missing key: dec.4x4_block1.qkv.bias" in msg
  assert "missing key: enc.4x4_down.skip.resample_filter" in msg
  assert "wrong shape: enc.8x8_block0.conv0.weight" in msg
  assert "unexpected key: enc.8x8_block0.qkv.weight" in msg
  # The same file through the loader (inferred architecture): every problem at once as well.
  with pytest.raises(WeightConversionError) as err:
    V.edm_state_dict_to_params(bad, _cfg(num_classes=10), source="edm.pt")
  assert "dec.4x4_block1.qkv.bias" in str(err.value)
  assert "enc.8x8_block0.conv0.weight" in str(err.value)

  other_filter = dict(sd)
  other_filter["dec.8x8_up.conv0.resample_filter"] = np.full((1, 1, 2, 2), 0.5, np.float32)
  with pytest.raises(WeightConversionError, match="dec.8x8_up.conv0.resample_filter"):
    V.edm_state_dict_to_params(other_filter)

  song = {"map_noise.freqs": np.zeros(16, np.float32), "map_layer0.weight": np.zeros((128, 32)),
          "enc.8x8_conv.weight": np.zeros((32, 4, 3, 3)),
          "enc.4x4_aux_residual.weight": np.zeros((64, 4, 3, 3)),
          "dec.8x8_aux_norm.weight": np.zeros(32)}
  context = dict(sd)
  context["map_label.embedding_table.weight"] = context.pop("map_label.weight").T
  augment = dict(sd, **{"map_augment.weight": np.zeros((32, 9), np.float32)})
  for keys, what, named in ((song, "SongUNet", "map_noise.freqs"),
                            (context, "adm_context", "map_label.embedding_table.weight"),
                            (augment, "augment_dim", "map_augment.weight")):
    path = str(tmp_path / f"{what}.safetensors")
    from safetensors.numpy import save_file
    save_file({k: np.asarray(v, np.float32) for k, v in keys.items()}, path)
    with pytest.raises(WeightConversionError) as err:
      V.load_velocity_checkpoint(path, _cfg())
    assert what in str(err.value) and named in str(err.value) and path in str(err.value)


def test_edm_dhariwal_ddp_checkpoint_loads(edm_labelled, tmp_path):
  """A `module.`-prefixed {"model", "ema"} torch file: "ema" by default, "model" on request."""
  import torch
  _, sd, module, params = edm_labelled
  path = str(tmp_path / "edm_ddp.pt")
  half = {k: v if k.endswith("resample_filter") else v * 0.5 for k, v in sd.items()}
  torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in half.items()},
              "ema": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  module2, params2 = V.load_velocity_checkpoint(path, _cfg(num_classes=10))
  assert module2 == module
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
  _, params3 = V.load_velocity_checkpoint(path, _cfg(num_classes=10, checkpoint_entry="model"))
  np.testing.assert_allclose(params3["time_embed_0"]["kernel"],
                             0.5 * np.asarray(params["time_embed_0"]["kernel"]))
