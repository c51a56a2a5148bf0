"""AutoencoderKL: parity with diffusers (both checkpoint layouts), strictness, export round trip.

No downloads: every reference model is diffusers' AutoencoderKL at random init.
"""

import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lfm_jax.converters.common import WeightConversionError
from lfm_jax.models.autoencoder import AutoencoderKL, conv3x3, sample_posterior
from lfm_jax import weights

TOL = 1e-4
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)


def _torch_ae(in_channels=3, groups=8, attention=True, seed=0, **kw):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  cfg = dict(SMALL, **kw)
  n = len(cfg["block_out_channels"])
  torch.manual_seed(seed)
  m = diffusers.AutoencoderKL(
      in_channels=in_channels, out_channels=in_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      norm_num_groups=groups, mid_block_add_attention=attention, **cfg)
  with torch.no_grad():  # perturb every tensor (GroupNorm affine included) so the mapping shows
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


def _torch_outputs(m, x_nhwc, z_nhwc):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    dist = m.encode(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).latent_dist
    dec = m.decode(torch.from_numpy(z_nhwc.transpose(0, 3, 1, 2))).sample
  t = lambda a: a.numpy().transpose(0, 2, 3, 1)
  return t(dist.mean), t(dist.logvar), t(dec)


def _assert_parity(module, params, tm, size=16, in_channels=3):
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (2, size, size, in_channels)).astype(np.float32)
  f = module.downsample_factor
  z = rs.randn(2, size // f, size // f, module.latent_channels).astype(np.float32)
  ref_mean, ref_logvar, ref_dec = _torch_outputs(tm, x, z)
  mean, logvar = jax.jit(partial(module.apply, method=module.encode))({"params": params}, x)
  dec = jax.jit(partial(module.apply, method=module.decode))({"params": params}, z)
  errs = {
      "mean": float(np.max(np.abs(np.asarray(mean) - ref_mean))),
      "logvar": float(np.max(np.abs(np.asarray(logvar) - ref_logvar))),
      "decode": float(np.max(np.abs(np.asarray(dec) - ref_dec))),
  }
  print("max abs err", errs)
  assert all(e < TOL for e in errs.values()), errs
  return errs


# ------------------------------------------------------------------ diffusers -> LDM key mapping
# Written independently of the converter (which maps the other way) so the test checks it.


def diffusers_to_ldm_state_dict(sd, num_levels):
  out = {}
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  for key, v in sd.items():
    parts = key.split(".")
    side = parts[0]
    if parts[1] == "down_blocks":
      i, kind = parts[2], parts[3]
      if kind == "resnets":
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        new = f"{side}.down.{i}.block.{parts[4]}.{rest}"
      else:  # downsamplers.0.conv.weight
        new = f"{side}.down.{i}.downsample.{'.'.join(parts[5:])}"
    elif parts[1] == "up_blocks":
      level = num_levels - 1 - int(parts[2])
      kind = parts[3]
      if kind == "resnets":
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        new = f"{side}.up.{level}.block.{parts[4]}.{rest}"
      else:
        new = f"{side}.up.{level}.upsample.{'.'.join(parts[5:])}"
    elif parts[1] == "mid_block":
      if parts[2] == "resnets":
        new = f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
      else:  # attentions.0.<name>.(weight|bias)
        name = ".".join(parts[4:-1])
        new = f"{side}.mid.attn_1.{attn[name]}.{parts[-1]}"
        if name != "group_norm" and parts[-1] == "weight":
          v = v.reshape(*v.shape, 1, 1)  # LDM uses 1x1 convs
    elif parts[1] == "conv_norm_out":
      new = f"{side}.norm_out.{parts[2]}"
    else:
      new = key
    out[new] = v
  return out


def _random_params(module, seed=0, size=16):
  """Random params from shapes with numpy (avoids compiling JAX's RNG, slow on a busy CPU)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32))
  rs = np.random.RandomState(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rs.randn(*s.shape).astype(np.float32) / np.sqrt(fan_in))
    base = 1.0 if "scale" in name else 0.0
    return jnp.asarray((base + 0.05 * rs.randn(*s.shape)).astype(np.float32))
  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def _state_dict_numpy(tm):
  return {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("stride,size", [(1, 2), (1, 5), (1, 9), (2, 4), (2, 10)])
def test_small_map_conv_equals_lax_conv(stride, size):
  rs = np.random.RandomState(stride * 100 + size)
  x = jnp.asarray(rs.randn(2, size, size + 1, 6).astype(np.float32))
  k = jnp.asarray(rs.randn(3, 3, 6, 5).astype(np.float32))
  b = jnp.asarray(rs.randn(5).astype(np.float32))
  pad = ((1, 1), (1, 1)) if stride == 1 else ((0, 1), (0, 1))
  ref = jax.lax.conv_general_dilated(x, k, (stride, stride), pad,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  small = conv3x3(x, k, b, stride=stride, padding=pad, small_map_threshold=10 ** 6)
  big = conv3x3(x, k, b, stride=stride, padding=pad, small_map_threshold=0)
  assert small.shape == ref.shape
  np.testing.assert_allclose(small, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(big, ref, atol=1e-5, rtol=1e-5)


def test_parity_diffusers_directory(tmp_path):
  tm = _torch_ae(groups=8)
  tm.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
  module, params = weights.load_autoencoder_kl(str(tmp_path / "vae"))
  assert module.block_out_channels == (32, 64) and module.norm_num_groups == 8
  _assert_parity(module, params, tm)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_parity_ldm_single_file(tmp_path, suffix):
  torch = pytest.importorskip("torch")
  tm = _torch_ae(groups=32, in_channels=3, seed=1)  # 32 groups: what inference assumes
  ldm = diffusers_to_ldm_state_dict(_state_dict_numpy(tm), 2)
  full = {"first_stage_model." + k: v for k, v in ldm.items()}
  # The rest of a Stable Diffusion checkpoint must be ignored.
  full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((8, 4, 3, 3), np.float32)
  full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
  path = str(tmp_path / ("sd" + suffix))
  if suffix == ".safetensors":
    from safetensors.numpy import save_file
    save_file(full, path)
  else:
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in full.items()},
                "global_step": 7}, path)
  module, params = weights.load_autoencoder_kl(path)
  assert module.block_out_channels == (32, 64) and module.layers_per_block == 1
  assert module.mid_block_attention and module.latent_channels == 4
  _assert_parity(module, params, tm)


def test_ldm_without_prefix_and_old_attention_names(tmp_path):
  from safetensors.numpy import save_file
  tm = _torch_ae(groups=8, attention=True, seed=2)
  sd = _state_dict_numpy(tm)
  module, ref = weights.load_autoencoder_kl(_save_dir(tm, tmp_path / "d"))
  # LDM layout, no prefix, explicit group count.
  ldm = diffusers_to_ldm_state_dict(sd, 2)
  ldm["loss.logvar"] = np.zeros((), np.float32)  # training-only entries are dropped
  ldm["loss.discriminator.main.0.weight"] = np.zeros((64, 3, 4, 4), np.float32)
  ldm["model_ema.num_updates"] = np.zeros((), np.int32)
  save_file(ldm, str(tmp_path / "vae.safetensors"))
  _, p1 = weights.load_autoencoder_kl(str(tmp_path / "vae.safetensors"), norm_num_groups=8)
  # Old diffusers attention names.
  old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
         .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
  p2 = weights.convert_autoencoder_kl_state_dict(old, module)
  for p in (p1, p2):
    jax.tree_util.tree_map(np.testing.assert_array_equal, p, ref)


def _save_dir(tm, path):
  tm.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def test_strict_reports_every_problem(tmp_path):
  from safetensors.numpy import save_file
  tm = _torch_ae(groups=8, seed=3)
  d = _save_dir(tm, tmp_path / "vae")
  wpath = os.path.join(d, "diffusion_pytorch_model.safetensors")
  sd = _state_dict_numpy(tm)
  removed = "encoder.down_blocks.0.resnets.0.conv2.bias"
  renamed = "decoder.up_blocks.1.resnets.1.norm1.weight"
  reshaped = "decoder.mid_block.attentions.0.to_k.weight"
  del sd[removed]
  sd["decoder.up_blocks.1.resnets.1.normX.weight"] = sd.pop(renamed)
  sd[reshaped] = sd[reshaped][:, :32].copy()
  save_file(sd, wpath)
  with pytest.raises(WeightConversionError) as e:
    weights.load_autoencoder_kl(d)
  msg = str(e.value)
  print(msg)
  assert f"missing key: {removed}" in msg
  assert f"missing key: {renamed}" in msg
  assert "unexpected key: decoder.up_blocks.1.resnets.1.normX.weight" in msg
  assert f"wrong shape: {reshaped}: checkpoint (64, 32), model expects (64, 64)" in msg
  assert len(msg.strip().splitlines()) == 5  # header + exactly the four problems


def test_export_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  module = AutoencoderKL(in_channels=1, out_channels=1, norm_num_groups=8, **SMALL)
  params = _random_params(module)  # non-trivial GroupNorm affine and biases too
  out = weights.export_autoencoder_kl(module, params, str(tmp_path / "export"),
                                      scaling_factor=0.5)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["scaling_factor"] == 0.5
  tm = diffusers.AutoencoderKL.from_pretrained(out).eval()
  assert tm.config.norm_num_groups == 8
  _assert_parity(module, params, tm, in_channels=1)
  module2, params2 = weights.load_autoencoder_kl(out)
  assert module2 == module
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         params, params2)
  del torch


def test_methods_and_from_config():
  from configs.default import get_config
  config = get_config()
  module = AutoencoderKL.from_config(config.autoencoder, in_channels=config.data.channels)
  assert module.block_out_channels == (16, 32, 64) and not module.mid_block_attention
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
  params = _random_params(module, seed=1)

  @jax.jit
  def run(params, x, rng):
    v = {"params": params}
    mean, logvar = module.apply(v, x, method=module.encode)
    dec = module.apply(v, mean, method=module.decode)
    rec, _, _ = module.apply(v, x)  # no rng: decodes the posterior mean
    rec_s, _, _ = module.apply(v, x, rng)  # rng: decodes a posterior sample
    return mean, logvar, dec, rec, rec_s

  mean, logvar, dec, rec, rec_s = run(params, x, jax.random.PRNGKey(3))
  assert mean.shape == (2, 4, 4, 4) and logvar.shape == (2, 4, 4, 4)
  assert float(logvar.max()) <= 20 and float(logvar.min()) >= -30
  np.testing.assert_allclose(rec, dec, atol=1e-5)
  assert rec_s.shape == x.shape and not np.allclose(rec_s, rec)
  z = sample_posterior(jax.random.PRNGKey(0), mean, jnp.full_like(logvar, -2.0))
  assert abs(float(jnp.std(z - mean)) - np.exp(-1.0)) < 0.1
  with pytest.raises(ValueError):
    jax.eval_shape(partial(module.apply, sample_posterior=True), {"params": params}, x)


def test_missing_path_never_downloads():
  with pytest.raises(FileNotFoundError):
    weights.load_autoencoder_kl("stabilityai/sd-vae-ft-mse")


@pytest.mark.slow
def test_parity_full_sd_config(tmp_path):
  torch = pytest.importorskip("torch")
  tm = _torch_ae(groups=32, seed=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2)
  ldm = diffusers_to_ldm_state_dict(_state_dict_numpy(tm), 4)
  path = str(tmp_path / "sd.ckpt")
  torch.save({"state_dict": {"first_stage_model." + k: torch.from_numpy(v)
                             for k, v in ldm.items()}}, path)
  module, params = weights.load_autoencoder_kl(path)
  assert module == AutoencoderKL()
  _assert_parity(module, params, tm, size=64)
  d = _save_dir(tm, tmp_path / "vae")
  module, params = weights.load_autoencoder_kl(d)
  _assert_parity(module, params, tm, size=64)
