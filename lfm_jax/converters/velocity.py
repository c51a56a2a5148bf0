"""PyTorch <-> Flax converters for the velocity networks.

Layouts:
- "guided_diffusion": guided-diffusion / LFM / torchcfm `UNetModel` state dicts
  (input_blocks.*, middle_block.*, output_blocks.*, time_embed.*, label_emb.weight, out.*).
- "facebook_dit": facebook DiT state dicts (LFM's models/DiT.py; the stability repo), incl. the
  fixed `pos_embed` buffer (recomputed here and checked).
- "edm_dhariwal": EDM `DhariwalUNet` state dicts (LFM's models/EDM.py, model_type "adm"):
  map_layer0/1, map_label, enc.<R>x<R>_{conv,down,block<i>}, dec.<R>x<R>_{in0,in1,up,block<i>},
  out_norm, out_conv, and the fixed [1, 1] `resample_filter` buffers of the up/down convolutions
  (checked, rewritten on export). It maps one-to-one onto our UNet with resblock_updown,
  scale-shift norm, attention by resolution with 64 channels per head, a zero null-label
  embedding (learn_null_class=False) and norm_min_channels_per_group=4; the qkv rows are permuted
  (EDM orders its 3C qkv outputs [head][channel][q, k, v]). EDM's SongUNet and LFM's
  "adm_context" variant are rejected with an error naming their keys.

Naming rule shared with lfm_jax/models: a Flax module name `a_3_b` is the torch path `a.3.b`;
Flax leaves `kernel`/`scale`/`embedding` are torch `weight`. Conv kernels HWIO <-> OIHW,
Dense kernels (in, out) <-> Linear weight (out, in); the U-Net attention `qkv`/`proj_out` are
torch Conv1d(k=1) weights (out, in, 1).

Every conversion is strict: all missing, unexpected and mis-shaped keys are reported at once
(converters.common.check_keys). torch is optional and imported lazily.
"""

import logging
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lfm_jax.converters.common import (WeightConversionError, check_keys, load_safetensors,
                                       save_safetensors, torch_load, torch_save)
from lfm_jax.models import SiTConventionWrapper, unwrap
from lfm_jax.models.dit import DIT_PRESETS, DiT
from lfm_jax.models.layers import num_groups_for, sincos_pos_embed_2d
from lfm_jax.models.unet import UNet, norm_groups

__all__ = [
    "load_velocity_checkpoint", "export_velocity_checkpoint", "read_state_dict",
    "extract_state_dict", "infer_unet", "infer_dit", "state_dict_to_params",
    "params_to_state_dict", "unet_state_dict_to_params", "unet_params_to_state_dict",
    "dit_state_dict_to_params", "dit_params_to_state_dict", "infer_edm_unet",
    "edm_state_dict_to_params", "edm_params_to_state_dict", "LAYOUTS", "WeightConversionError",
]

log = logging.getLogger(__name__)

_UNET_CONV1D = ("qkv", "proj_out")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
LAYOUTS = ("guided_diffusion", "edm_dhariwal", "facebook_dit")


def _get(cfg, key, default=None):
  if cfg is None:
    return default
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)


# ----------------------------------------------------------------------------- names


def _torch_component(name: str) -> str:
  return re.sub(r"_(\d+)(?=_|$)", r".\1", name)


def _torch_key(path: Tuple[str, ...]) -> str:
  *mods, leaf = path
  return ".".join([_torch_component(m) for m in mods] + [_LEAF_TO_TORCH[leaf]])


def _torch_value(path, value, layout):
  """Flax leaf -> torch tensor layout (numpy)."""
  value = np.asarray(value)
  leaf = path[-1]
  if leaf == "kernel":
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
    value = value.T
    if layout == "guided_diffusion" and path[-2] in _UNET_CONV1D:
      value = value[:, :, None]
  return value


def _flax_value(path, value, layout):
  """torch tensor (numpy) -> Flax leaf layout."""
  value = np.asarray(value)
  leaf = path[-1]
  if leaf == "kernel":
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 3:
      value = value[:, :, 0]
    return value.T
  return value


def _torch_shape(path, shape, layout):
  shape = tuple(shape)
  if path[-1] == "kernel":
    if len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
    shape = shape[::-1]
    if layout == "guided_diffusion" and path[-2] in _UNET_CONV1D:
      shape = shape + (1,)
  return shape


# ----------------------------------------------------------------------------- state dicts


def _to_numpy(v):
  if isinstance(v, np.ndarray):
    return v
  if hasattr(v, "detach"):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _is_state_dict(obj) -> bool:
  return isinstance(obj, Mapping) and obj and all(
      hasattr(v, "shape") for v in obj.values())


def extract_state_dict(obj: Any, prefer: str = "ema") -> Dict[str, np.ndarray]:
  """The weights inside a loaded checkpoint, as {key: numpy array} without DDP prefixes.

  Accepts a bare state dict or a dict with `ema` / `model` / `model_dict` / `state_dict`
  entries (the stability repo: `model` and `ema`; LFM's content.pth: `model_dict`).
  prefer: "ema" (default) or "model": which entry to use when both exist.
  """
  if not _is_state_dict(obj):
    if not isinstance(obj, Mapping):
      raise WeightConversionError(f"checkpoint is a {type(obj).__name__}, not a dict")
    order = ("ema", "model", "model_dict", "state_dict", "model_state_dict")
    if prefer != "ema":
      order = (prefer,) + tuple(k for k in order if k != prefer)
    for key in order:
      if key in obj and isinstance(obj[key], Mapping):
        log.info("velocity checkpoint: using entry %r", key)
        return extract_state_dict(obj[key], prefer)
    raise WeightConversionError(
        f"checkpoint has no state dict; top-level keys: {sorted(map(str, obj))[:20]}")
  sd = {str(k): _to_numpy(v) for k, v in obj.items()}
  changed = True
  while changed:
    changed = False
    for prefix in _STRIP_PREFIXES:
      if sd and all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
  # EMA wrappers sometimes keep bookkeeping scalars.
  for k in ("num_updates", "decay", "n_averaged"):
    if k in sd and sd[k].ndim == 0:
      del sd[k]
  return sd


def read_state_dict(path: str, prefer: str = "ema", trust_pickle: bool = False):
  """Reads .safetensors (safetensors.numpy) or .pt/.pth/.ckpt/.bin (torch, lazily imported).

  torch files are read with weights_only=True; pickled Python objects inside (e.g. an argparse
  Namespace in LFM's content.pth) need trust_pickle=True (only for files you trust).
  """
  if path.endswith(".safetensors"):
    return extract_state_dict(load_safetensors(path), prefer)
  obj = torch_load(path, trust_pickle=trust_pickle)
  return extract_state_dict(obj, prefer)


# ----------------------------------------------------------------------------- generic


def _param_shapes(module, example_hw: int, in_channels: int):
  inner = unwrap(module)
  extra = getattr(inner, "extra_in_channels", 0)
  c = in_channels - extra
  x = jax.ShapeDtypeStruct((1, example_hw, example_hw, c), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = jax.ShapeDtypeStruct((1, example_hw, example_hw, extra), jnp.float32) if extra else None
  shapes = jax.eval_shape(lambda x, t, cond: inner.init(jax.random.PRNGKey(0), x, t, cond=cond),
                          x, t, cond)
  return flax.core.unfreeze(shapes["params"])


def _example_hw(module, latent_size: Optional[int] = None) -> int:
  inner = unwrap(module)
  if latent_size is not None:
    return int(latent_size)
  if isinstance(inner, DiT):
    return 2 * inner.patch_size
  if inner.attention_semantics == "resolution" and tuple(inner.attention_resolutions):
    raise ValueError("a U-Net with attention_semantics='resolution' needs latent_size to place "
                     "its attention layers")
  return 2 ** (len(inner.channel_mult))


def _layout_of(module) -> str:
  return "facebook_dit" if isinstance(unwrap(module), DiT) else "guided_diffusion"


def _check_layout(module, layout: Optional[str]) -> str:
  own = _layout_of(module)
  if layout is None or layout == own:
    return own
  if layout == "edm_dhariwal" and own == "guided_diffusion":
    return layout
  raise ValueError(f"a {type(unwrap(module)).__name__} has no {layout!r} layout "
                   f"(layouts: {', '.join(LAYOUTS)})")


def state_dict_to_params(state_dict: Mapping[str, Any], module, *, in_channels: int,
                         source: str = "<state dict>", latent_size: Optional[int] = None,
                         layout: Optional[str] = None) -> Dict:
  """Strict torch state dict -> Flax params of `module` (U-Net or DiT, possibly wrapped).

  in_channels: the network's input channels (latent + extra conditioning channels).
  latent_size: input H (= W); needed for a U-Net with "resolution" attention semantics and for
  the "edm_dhariwal" layout (its keys name resolutions).
  layout: the state dict's layout (default: the module's own, "guided_diffusion" for a UNet;
  a UNet also reads "edm_dhariwal").
  For DiT, `pos_embed` is checked against the fixed sin-cos embedding and not stored.
  """
  inner = unwrap(module)
  layout = _check_layout(module, layout)
  if layout == "edm_dhariwal":
    state_dict = _edm_to_guided(state_dict, module, in_channels, latent_size, source)
    layout = "guided_diffusion"
  sd = dict(state_dict)
  shapes = _param_shapes(module, _example_hw(module, latent_size), in_channels)
  flat = flax.traverse_util.flatten_dict(shapes)
  expected = {_torch_key(p): (p, _torch_shape(p, s.shape, layout)) for p, s in flat.items()}
  missing, mismatched = [], []
  if layout == "facebook_dit":
    if "pos_embed" not in sd:
      missing.append("pos_embed")
    else:
      pe = np.asarray(sd.pop("pos_embed"))
      grid = int(round(math.sqrt(pe.shape[-2]))) if pe.ndim == 3 else -1
      if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != inner.hidden_size or \
          grid * grid != pe.shape[1]:
        mismatched.append(("pos_embed", pe.shape, (1, "T", inner.hidden_size)))
      elif not np.allclose(pe[0], sincos_pos_embed_2d(inner.hidden_size, grid), atol=1e-4):
        raise WeightConversionError(
            f"checkpoint {source}: pos_embed is not the fixed 2-D sin-cos embedding")
  unexpected = [k for k in sd if k not in expected]
  for k, (p, tshape) in expected.items():
    if k not in sd:
      missing.append(k)
    elif tuple(sd[k].shape) != tuple(tshape):
      mismatched.append((k, tuple(sd[k].shape), tuple(tshape)))
  check_keys(source, missing, unexpected, mismatched)
  out = {p: jnp.asarray(_flax_value(p, sd[k], layout), jnp.float32)
         for k, (p, _) in expected.items()}
  params = flax.traverse_util.unflatten_dict(out)
  if isinstance(module, SiTConventionWrapper):
    params = {"inner": params}
  return params


def params_to_state_dict(params: Mapping, module, *, latent_size: Optional[int] = None,
                         layout: Optional[str] = None) -> Dict[str, np.ndarray]:
  """Flax params -> torch-layout state dict {key: float32 numpy}.

  layout: default the module's own; a UNet can also be written as "edm_dhariwal" (if its
  options are EDM's, see edm_params_to_state_dict). latent_size (the input H = W) is required
  for DiT (to write the `pos_embed` buffer) and for "edm_dhariwal" (keys name resolutions).
  """
  inner = unwrap(module)
  layout = _check_layout(module, layout)
  if layout == "edm_dhariwal":
    return edm_params_to_state_dict(params, module, latent_size)
  params = flax.core.unfreeze(params)
  if "params" in params and len(params) == 1:
    params = params["params"]
  while isinstance(module, SiTConventionWrapper) and "inner" in params:
    params = params["inner"]
    module = module.inner
  flat = flax.traverse_util.flatten_dict(params)
  sd = {_torch_key(p): np.ascontiguousarray(_torch_value(p, np.asarray(v, np.float32), layout))
        for p, v in flat.items()}
  if layout == "facebook_dit":
    if latent_size is None:
      raise ValueError("exporting a DiT needs latent_size (input H = W) for pos_embed")
    grid = latent_size // inner.patch_size
    sd["pos_embed"] = sincos_pos_embed_2d(inner.hidden_size, grid)[None]
  return sd


# ----------------------------------------------------------------------------- U-Net


def _blocks(sd, prefix):
  """{index: {sub-key: array}} for keys `prefix.<i>.<rest>`."""
  out = {}
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(.*)$")
  for k, v in sd.items():
    m = pat.match(k)
    if m:
      out.setdefault(int(m.group(1)), {})[m.group(2)] = v
  return out


def infer_unet(sd: Mapping[str, np.ndarray], model_config=None, source="<state dict>") -> UNet:
  """Builds the UNet a guided-diffusion state dict describes.

  From the shapes: model_channels, channel_mult, num_res_blocks, in/out channels (extra
  conditioning channels = in - out), use_scale_shift_norm, resblock_updown, where attention is
  (returned as downsample factors, attention_semantics="downsample"), the class count.
  From the config: num_heads / num_head_channels, use_new_attention_order, dropout.
  Label table: R rows and config num_classes == R - 1 -> learned null row (an lfm_jax export);
  otherwise num_classes = R and the null label is a zero embedding (guided-diffusion/torchcfm).
  """
  need = ["time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"]
  check_keys(source, missing=[k for k in need if k not in sd])
  mc = int(sd["time_embed.0.weight"].shape[1])
  in_ch = int(sd["input_blocks.0.0.weight"].shape[1])
  out_ch = int(sd["out.2.weight"].shape[0])
  inputs = _blocks(sd, "input_blocks")
  outputs = _blocks(sd, "output_blocks")
  n_out = max(outputs) + 1 if outputs else 0

  def is_res(d, j):
    return f"{j}.in_layers.2.weight" in d

  def is_attn(d, j):
    return f"{j}.qkv.weight" in d

  # num_res_blocks: the first output block holding an upsampler (Upsample conv or up-ResBlock).
  def upsampler_index(d):
    for j in (1, 2):
      if f"{j}.conv.weight" in d or is_res(d, j):
        return j
    return None

  ups = [i for i in range(n_out) if upsampler_index(outputs.get(i, {})) is not None]
  nrb = ups[0] if ups else n_out - 1
  if nrb < 1 or n_out % (nrb + 1):
    raise WeightConversionError(f"checkpoint {source}: cannot read the U-Net layout "
                                f"({n_out} output blocks, upsamplers at {ups})")
  levels = n_out // (nrb + 1)
  resblock_updown = bool(ups) and is_res(outputs[ups[0]], upsampler_index(outputs[ups[0]]))
  mult, attn_ds = [], []
  idx = 1
  for level in range(levels):
    blk = inputs.get(idx, {})
    if not is_res(blk, 0):
      raise WeightConversionError(f"checkpoint {source}: input_blocks.{idx} is not a ResBlock")
    width = int(blk["0.out_layers.3.weight"].shape[0])
    mult.append(width / mc if width % mc else width // mc)
    if is_attn(blk, 1):
      attn_ds.append(2 ** level)
    idx += nrb + (1 if level != levels - 1 else 0)
  emb_rows = sd.get("input_blocks.1.0.emb_layers.1.weight")
  width0 = int(sd["input_blocks.1.0.out_layers.3.weight"].shape[0])
  scale_shift = emb_rows is not None and int(emb_rows.shape[0]) == 2 * width0
  mid_attention = "middle_block.1.qkv.weight" in sd
  cfg_classes = int(_get(model_config, "num_classes", 0) or 0)
  if "label_emb.weight" in sd:
    rows = int(sd["label_emb.weight"].shape[0])
    learn_null = rows == cfg_classes + 1
    num_classes = rows - 1 if learn_null else rows
  else:
    learn_null, num_classes = True, 0
  if cfg_classes and cfg_classes != num_classes:
    log.warning("%s: checkpoint has %d classes, config.model.num_classes is %d; using the "
                "checkpoint", source, num_classes, cfg_classes)
  cfg_sem = _get(model_config, "attention_semantics", None)
  cfg_attn = _get(model_config, "attention_resolutions", None)
  if cfg_sem == "downsample" and cfg_attn is not None:
    from lfm_jax.models import _ints
    want = sorted(d for d in _ints(cfg_attn) if d < 2 ** levels)
    if want != attn_ds:
      log.warning("%s: config attention downsample factors %s, checkpoint has attention at %s;"
                  " using the checkpoint", source, want, attn_ds)
  return UNet(
      model_channels=mc, channel_mult=tuple(mult), num_res_blocks=nrb,
      attention_resolutions=tuple(attn_ds), attention_semantics="downsample",
      num_heads=int(_get(model_config, "num_heads", 1)),
      num_head_channels=int(_get(model_config, "num_head_channels", -1)),
      num_heads_upsample=int(_get(model_config, "num_heads_upsample", -1)),
      dropout=float(_get(model_config, "dropout", 0.0)),
      use_scale_shift_norm=scale_shift, resblock_updown=resblock_updown,
      use_new_attention_order=bool(_get(model_config, "use_new_attention_order", False)),
      mid_attention=mid_attention, num_classes=num_classes, learn_null_class=learn_null,
      extra_in_channels=in_ch - out_ch, out_channels=None,
      # GroupNorm's group count is not in the weights: it comes from the config (ADM: 32).
      norm_num_groups=int(_get(model_config, "norm_num_groups", 32) or 32))


def unet_state_dict_to_params(sd, model_config=None, source="<state dict>", module=None,
                              latent_size=None):
  """guided-diffusion state dict -> (UNet, params). module: convert into this one instead
  (latent_size is then needed if it uses "resolution" attention semantics)."""
  sd = extract_state_dict(sd)
  module = module or infer_unet(sd, model_config, source)
  in_ch = int(sd["input_blocks.0.0.weight"].shape[1]) if "input_blocks.0.0.weight" in sd else 4
  return module, state_dict_to_params(sd, module, in_channels=in_ch, source=source,
                                      latent_size=latent_size)


def unet_params_to_state_dict(params, module) -> Dict[str, np.ndarray]:
  return params_to_state_dict(params, module)


# ----------------------------------------------------------------------------- DiT


def infer_dit(sd: Mapping[str, np.ndarray], model_config=None, source="<state dict>") -> DiT:
  """Builds the DiT a facebook-format state dict describes (heads from the preset/config)."""
  need = ["x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"]
  check_keys(source, missing=[k for k in need if k not in sd])
  hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
  depth = len(_blocks(sd, "blocks"))
  out_ch = int(sd["final_layer.linear.weight"].shape[0]) // (p * p)
  rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
  preset = _get(model_config, "dit_preset", None)
  if preset:
    from lfm_jax.models.dit import dit_config
    heads = dit_config(preset)["num_heads"]
  else:
    by_hidden = {v["hidden_size"]: v["num_heads"] for v in DIT_PRESETS.values()}
    heads = by_hidden.get(int(hidden)) or int(_get(model_config, "num_heads", 1))
  if out_ch > in_ch:
    raise WeightConversionError(
        f"checkpoint {source}: final_layer outputs {out_ch} channels for {in_ch} input channels "
        "(learn_sigma checkpoints are not supported)")
  mlp_hidden = sd.get("blocks.0.mlp.fc1.weight")
  mlp_ratio = float(mlp_hidden.shape[0]) / hidden if mlp_hidden is not None else 4.0
  return DiT(hidden_size=int(hidden), depth=depth, num_heads=heads, patch_size=int(p),
             mlp_ratio=mlp_ratio, num_classes=rows - 1, extra_in_channels=int(in_ch - out_ch))


def dit_state_dict_to_params(sd, model_config=None, source="<state dict>", module=None):
  """facebook DiT state dict -> (DiT, params). module: convert into this one instead."""
  sd = extract_state_dict(sd)
  module = module or infer_dit(sd, model_config, source)
  in_ch = int(sd["x_embedder.proj.weight"].shape[1]) if "x_embedder.proj.weight" in sd else 4
  return module, state_dict_to_params(sd, module, in_channels=in_ch, source=source)


def dit_params_to_state_dict(params, module, latent_size: int) -> Dict[str, np.ndarray]:
  return params_to_state_dict(params, module, latent_size=latent_size)


# ----------------------------------------------------------------------------- EDM DhariwalUNet

EDM_CHANNELS_PER_HEAD = 64  # DhariwalUNet's channels_per_head
# our ResBlock / AttentionBlock sub-modules (torch notation) -> EDM UNetBlock sub-modules
_EDM_RESBLOCK = (("in_layers.0", "norm0"), ("in_layers.2", "conv0"), ("emb_layers.1", "affine"),
                 ("out_layers.0", "norm1"), ("out_layers.3", "conv1"), ("skip_connection", "skip"))
_EDM_ATTENTION = (("norm", "norm2"), ("qkv", "qkv"), ("proj_out", "proj"))
_EDM_FILTER = np.full((1, 1, 2, 2), 0.25, np.float32)  # resample_filter [1, 1]: outer / sum**2
_EDM_BLOCK = re.compile(r"^(enc|dec)\.(\d+)x(\d+)_(conv|down|up|in0|in1|block(\d+))\.")


def _is_edm(sd) -> bool:
  prefixes = ("enc.", "dec.", "map_noise.", "map_label.", "map_layer0.", "map_augment.")
  return any(k.startswith(prefixes) for k in sd)


def _check_edm_variant(sd, source: str) -> None:
  """Rejects the EDM-family networks we do not model, naming their keys."""
  def named(keys):
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

  song = [k for k in sd if "_aux_" in k or k.startswith("map_noise.")]
  if song:
    raise WeightConversionError(
        f"checkpoint {source}: EDM SongUNet (LFM model_type 'ddpm++' / 'ncsn++') checkpoints are "
        f"not supported, only DhariwalUNet ('adm'); SongUNet keys: {named(song)}")
  context = [k for k in sd if k.startswith("map_label.embedding_table") or ".transformer." in k]
  if context:
    raise WeightConversionError(
        f"checkpoint {source}: EDM DhariwalUNet with use_context (LFM model_type 'adm_context') is "
        f"not supported; context keys: {named(context)}")
  augment = [k for k in sd if k.startswith("map_augment.")]
  if augment:
    raise WeightConversionError(
        f"checkpoint {source}: EDM DhariwalUNet with augment_dim > 0 is not supported "
        f"(augmentation-label keys: {named(augment)})")


def _edm_heads(unet: UNet, channels: int, up: bool) -> int:
  """Attention heads of one of our AttentionBlocks with `channels` (as UNet.__call__ sets them)."""
  if unet.num_head_channels != -1:
    return channels // unet.num_head_channels
  if up and unet.num_heads_upsample != -1:
    return unet.num_heads_upsample
  return unet.num_heads


def _edm_blocks(unet: UNet, img_res: int):
  """Our blocks in EDM's enc/dec order: tuples (ResBlock path, AttentionBlock path or None,
  attention channels, attention heads, EDM UNetBlock path, resamples), paths in torch notation."""
  mc, cm, nrb = unet.model_channels, tuple(unet.channel_mult), unet.num_res_blocks
  last = len(cm) - 1
  blocks, idx = [], 1
  for level, mult in enumerate(cm):
    res, c = img_res >> level, int(mult * mc)
    attn = unet._has_attention(2 ** level, res)  # pylint: disable=protected-access
    for i in range(nrb):
      blocks.append((f"input_blocks.{idx}.0", f"input_blocks.{idx}.1" if attn else None, c,
                     _edm_heads(unet, c, False), f"enc.{res}x{res}_block{i}", False))
      idx += 1
    if level != last:
      r = img_res >> (level + 1)
      blocks.append((f"input_blocks.{idx}.0", None, c, 0, f"enc.{r}x{r}_down", True))
      idx += 1
  res, c = img_res >> last, int(cm[last] * mc)
  blocks.append(("middle_block.0", "middle_block.1" if unet.mid_attention else None, c,
                 _edm_heads(unet, c, False), f"dec.{res}x{res}_in0", False))
  blocks.append((f"middle_block.{2 if unet.mid_attention else 1}", None, c, 0,
                 f"dec.{res}x{res}_in1", False))
  idx = 0
  for level in range(last, -1, -1):
    res, c = img_res >> level, int(cm[level] * mc)
    attn = unet._has_attention(2 ** level, res)  # pylint: disable=protected-access
    for i in range(nrb + 1):
      blocks.append((f"output_blocks.{idx}.0", f"output_blocks.{idx}.1" if attn else None, c,
                     _edm_heads(unet, c, True), f"dec.{res}x{res}_block{i}", False))
      if level and i == nrb:
        r = img_res >> (level - 1)
        blocks.append((f"output_blocks.{idx}.{2 if attn else 1}", None, c, 0, f"dec.{r}x{r}_up",
                       True))
      idx += 1
  return blocks


def _edm_names(unet: UNet, img_res: int):
  """({our torch-notation module: EDM module}, {our attention module: (channels, heads)},
  [EDM resample_filter buffer keys])."""
  names = {"time_embed.0": "map_layer0", "time_embed.2": "map_layer1", "label_emb": "map_label",
           "input_blocks.0.0": f"enc.{img_res}x{img_res}_conv", "out.0": "out_norm",
           "out.2": "out_conv"}
  attention, buffers = {}, []
  for res_path, attn_path, c, heads, edm, resample in _edm_blocks(unet, img_res):
    for ours, theirs in _EDM_RESBLOCK:
      names[f"{res_path}.{ours}"] = f"{edm}.{theirs}"
    if attn_path:
      attention[attn_path] = (c, heads)
      for ours, theirs in _EDM_ATTENTION:
        names[f"{attn_path}.{ours}"] = f"{edm}.{theirs}"
    if resample:
      buffers += [f"{edm}.conv0.resample_filter", f"{edm}.skip.resample_filter"]
  return names, attention, buffers


def _edm_qkv_rows(channels: int, heads: int, new_order: bool) -> np.ndarray:
  """For each row of our qkv output, the row of EDM's: ours = edm[rows].

  Ours: [head][q, k, v][channel] (legacy) or [q, k, v][head][channel] (new order);
  EDM: [head][channel][q, k, v] (its qkv output is reshaped to (heads, C / heads, 3, HW)).
  """
  ch = channels // heads
  h = np.arange(heads)[:, None, None]
  s = np.arange(3)[:, None, None]
  j = np.arange(ch)[None, None, :]
  if new_order:
    rows = s + np.swapaxes(h, 0, 1) * 3 * ch + j * 3  # (3, heads, ch)
  else:
    rows = h * 3 * ch + np.swapaxes(s, 0, 1) + j * 3  # (heads, 3, ch)
  return rows.reshape(-1)


class _EdmTable:
  """Key and value correspondence between our guided-diffusion-notation state dict and EDM's."""

  def __init__(self, unet: UNet, img_res: int):
    self.unet = unet
    self.names, self.attention, self.buffers = _edm_names(unet, img_res)

  def key(self, gd_key: str) -> str:
    module, leaf = gd_key.rsplit(".", 1)
    if module not in self.names:
      raise WeightConversionError(f"internal: no EDM name for {gd_key}")
    return f"{self.names[module]}.{leaf}"

  def _qkv(self, gd_key):
    module, leaf = gd_key.rsplit(".", 1)
    attn, part = module.rsplit(".", 1)
    if part != "qkv":
      return None
    c, heads = self.attention[attn]
    return _edm_qkv_rows(c, heads, self.unet.use_new_attention_order)

  def shape(self, gd_key: str, shape) -> tuple:
    shape = tuple(shape)
    if gd_key == "label_emb.weight":
      return shape[::-1]
    if gd_key.rsplit(".", 2)[-2] in _UNET_CONV1D and gd_key.endswith(".weight"):
      return shape + (1,)  # Conv1d (out, in, 1) -> Conv2d (out, in, 1, 1)
    return shape

  def to_guided(self, gd_key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if gd_key == "label_emb.weight":
      return value.T
    if gd_key.rsplit(".", 2)[-2] in _UNET_CONV1D and gd_key.endswith(".weight"):
      value = value[..., 0]
    rows = self._qkv(gd_key)
    return value if rows is None else value[rows]

  def to_edm(self, gd_key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if gd_key == "label_emb.weight":
      return value.T
    rows = self._qkv(gd_key)
    if rows is not None:
      out = np.empty_like(value)
      out[rows] = value
      value = out
    if gd_key.rsplit(".", 2)[-2] in _UNET_CONV1D and gd_key.endswith(".weight"):
      value = value[..., None]
    return value


def _edm_image_resolution(sd, source) -> int:
  convs = [m for m in map(_EDM_BLOCK.match, sd)
           if m and m.group(1) == "enc" and m.group(4) == "conv"]
  if not convs:
    check_keys(source, missing=["enc.<R>x<R>_conv.weight"])
  resolutions = sorted({int(m.group(2)) for m in convs})
  if len(resolutions) != 1 or any(m.group(2) != m.group(3) for m in convs):
    raise WeightConversionError(f"checkpoint {source}: expected one square enc.<R>x<R>_conv, found "
                                f"{sorted({m.group(0) for m in convs})}")
  return resolutions[0]


def infer_edm_unet(sd: Mapping[str, np.ndarray], model_config=None, source="<state dict>"
                   ) -> Tuple[UNet, int]:
  """Builds the UNet an EDM DhariwalUNet state dict describes -> (UNet, img_resolution).

  From the keys and shapes: img_resolution (enc.<R>x<R>_conv), model_channels (map_layer0),
  channel_mult (block widths / model_channels), num_blocks, in/out channels (extra conditioning
  channels = in - out), the resolutions with attention (blocks holding qkv; in0's decides
  mid_attention), label_dim (map_label: the null label is a zero embedding, learn_null_class
  False). From the config: dropout; num_head_channels > 0 overrides EDM's 64 channels per head.
  Fixed by DhariwalUNet: scale-shift norm, up/down ResBlocks, GroupNorm min(32, C // 4) groups.
  """
  _check_edm_variant(sd, source)
  img_res = _edm_image_resolution(sd, source)
  conv = f"enc.{img_res}x{img_res}_conv.weight"
  check_keys(source, missing=[k for k in ("map_layer0.weight", conv, "out_conv.weight")
                              if k not in sd])
  emb, mc = (int(v) for v in sd["map_layer0.weight"].shape)
  if emb != 4 * mc:
    raise WeightConversionError(f"checkpoint {source}: map_layer0.weight {(emb, mc)} means "
                                f"channel_mult_emb {emb / mc:g}; only 4 is supported")
  in_ch, out_ch = int(sd[conv].shape[1]), int(sd["out_conv.weight"].shape[0])
  if in_ch < out_ch:
    raise WeightConversionError(f"checkpoint {source}: {in_ch} input channels < {out_ch} outputs")
  blocks = {}  # resolution -> {block name: channels out}
  for k in sd:
    m = _EDM_BLOCK.match(k)
    if m and m.group(5) is not None:
      blocks.setdefault((m.group(1), int(m.group(2))), set()).add(int(m.group(5)))
  levels = []
  res = img_res
  while ("enc", res) in blocks:
    levels.append(res)
    res //= 2
  if not levels:
    raise WeightConversionError(f"checkpoint {source}: no enc.{img_res}x{img_res}_block<i> keys")
  num_blocks = len(blocks[("enc", img_res)])
  head_channels = int(_get(model_config, "num_head_channels", -1) or -1)
  head_channels = head_channels if head_channels > 0 else EDM_CHANNELS_PER_HEAD
  mult, attn_res = [], []
  for res in levels:
    width_key = f"enc.{res}x{res}_block0.conv1.weight"
    if width_key not in sd:
      check_keys(source, missing=[width_key])
    width = int(sd[width_key].shape[0])
    mult.append(width / mc if width % mc else width // mc)
    # Attention where most of this resolution's blocks hold qkv (the strict check then names any
    # other); never below one head's width (EDM: C // 64 = 0 heads -> no attention).
    names = [f"{part}.{res}x{res}_block{i}" for part, n in (("enc", 0), ("dec", 1))
             for i in range(num_blocks + n)]
    with_qkv = sum(f"{name}.qkv.weight" in sd for name in names)
    if 2 * with_qkv > len(names) and width >= head_channels:
      attn_res.append(res)
  last = levels[-1]
  mid_attention = (f"dec.{last}x{last}_in0.qkv.weight" in sd and
                   int(mult[-1] * mc) >= head_channels)
  cfg_classes = int(_get(model_config, "num_classes", 0) or 0)
  num_classes = int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0
  if cfg_classes and cfg_classes != num_classes:
    log.warning("%s: checkpoint has %d classes, config.model.num_classes is %d; using the "
                "checkpoint", source, num_classes, cfg_classes)
  unet = UNet(
      model_channels=mc, channel_mult=tuple(mult), num_res_blocks=num_blocks,
      attention_resolutions=tuple(attn_res), attention_semantics="resolution",
      num_heads=1, num_head_channels=head_channels,
      dropout=float(_get(model_config, "dropout", 0.0)),
      use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False,
      mid_attention=mid_attention, num_classes=num_classes, learn_null_class=False,
      extra_in_channels=in_ch - out_ch, out_channels=None,
      norm_num_groups=32, norm_min_channels_per_group=4)
  return unet, img_res


def _edm_to_guided(state_dict, module, in_channels: int, latent_size: Optional[int], source: str):
  """Strictly checks an EDM state dict against `module` (every missing / unexpected /
  mis-shaped key at once, the resample filters' values) -> the guided-diffusion-notation dict."""
  inner = unwrap(module)
  if latent_size is None:
    raise ValueError("reading an edm_dhariwal state dict needs latent_size (its keys name "
                     "resolutions)")
  table = _EdmTable(inner, int(latent_size))
  shapes = _param_shapes(module, int(latent_size), in_channels)
  flat = flax.traverse_util.flatten_dict(shapes)
  expected = {}  # EDM key -> (our key, EDM shape)
  for p, s in flat.items():
    gd_key = _torch_key(p)
    expected[table.key(gd_key)] = (gd_key, table.shape(gd_key, _torch_shape(p, s.shape,
                                                                            "guided_diffusion")))
  for k in table.buffers:
    expected[k] = (None, _EDM_FILTER.shape)
  sd = dict(state_dict)
  missing = [k for k in expected if k not in sd]
  unexpected = [k for k in sd if k not in expected]
  mismatched = [(k, tuple(np.shape(sd[k])), tuple(shape)) for k, (_, shape) in expected.items()
                if k in sd and tuple(np.shape(sd[k])) != tuple(shape)]
  check_keys(source, missing, unexpected, mismatched)
  bad = [k for k in table.buffers if not np.allclose(np.asarray(sd[k]), _EDM_FILTER, atol=1e-6)]
  if bad:
    raise WeightConversionError(f"checkpoint {source}: resample filters other than EDM's [1, 1] "
                                f"are not supported: {', '.join(sorted(bad))}")
  return {gd_key: table.to_guided(gd_key, sd[k]) for k, (gd_key, _) in expected.items() if gd_key}


_EDM_REFUSED = "cannot export as edm_dhariwal: "


def _check_edm_options(unet: UNet, img_res: int) -> None:
  """ValueError naming the first option of `unet` that EDM's DhariwalUNet cannot express."""
  why = _EDM_REFUSED
  if len(unet.channel_mult) > 1 and not unet.resblock_updown:
    raise ValueError(why + "resblock_updown=False (EDM resamples inside ResBlocks)")
  if not unet.use_scale_shift_norm:
    raise ValueError(why + "use_scale_shift_norm=False (EDM's adaptive_scale modulation)")
  if unet.num_classes and unet.learn_null_class:
    raise ValueError(why + "learn_null_class=True: EDM's map_label has no row for the null label "
                     "(its null label is a zero embedding), so the learned null row would be lost")
  for _, attn_path, c, heads, edm, _ in _edm_blocks(unet, img_res):
    if attn_path and heads != c // EDM_CHANNELS_PER_HEAD:
      raise ValueError(why + f"{attn_path} ({edm}) has {heads} attention heads for {c} channels; "
                       f"EDM uses {c // EDM_CHANNELS_PER_HEAD} (num_head_channels=64)")
    if edm.endswith("_in0") and not attn_path and c >= EDM_CHANNELS_PER_HEAD:
      raise ValueError(why + f"mid_attention=False, but EDM's {edm} always has attention at "
                       f"{c} >= 64 channels")


def _check_edm_groups(unet: UNet, gd_sd: Mapping[str, np.ndarray]) -> None:
  """ValueError if a GroupNorm of `unet` has a group count other than EDM's min(32, C // 4)."""
  why = _EDM_REFUSED
  for k, v in gd_sd.items():
    if k.endswith(("in_layers.0.weight", "out_layers.0.weight", ".norm.weight", "out.0.weight")):
      c = int(np.shape(v)[0])
      ours = num_groups_for(c, norm_groups(c, unet.norm_num_groups,
                                           unet.norm_min_channels_per_group))
      if ours != min(32, c // 4):
        raise ValueError(why + f"{k}: {ours} GroupNorm groups for {c} channels, EDM uses "
                         f"min(32, {c} // 4) = {min(32, c // 4)} (norm_min_channels_per_group=4, "
                         "norm_num_groups=32)")


def edm_state_dict_to_params(sd, model_config=None, source="<state dict>", module=None,
                             latent_size=None):
  """EDM DhariwalUNet state dict -> (UNet, params). module: convert into this one instead
  (latent_size, the image resolution of its keys, then defaults to the checkpoint's)."""
  sd = extract_state_dict(sd)
  _check_edm_variant(sd, source)
  if module is None:
    module, img_res = infer_edm_unet(sd, model_config, source)
  else:
    img_res = latent_size or _edm_image_resolution(sd, source)
  conv = f"enc.{img_res}x{img_res}_conv.weight"
  in_ch = int(sd[conv].shape[1]) if conv in sd else 4
  return module, state_dict_to_params(sd, module, in_channels=in_ch, source=source,
                                      latent_size=img_res, layout="edm_dhariwal")


def edm_params_to_state_dict(params, module, latent_size: int) -> Dict[str, np.ndarray]:
  """UNet params -> EDM DhariwalUNet state dict (incl. the resample_filter buffers).

  latent_size: the input H = W (EDM's img_resolution, named in the keys). Raises ValueError if
  the UNet has options DhariwalUNet cannot express (resblock_updown, use_scale_shift_norm,
  learn_null_class, heads != C // 64, mid_attention, GroupNorm group counts), and
  WeightConversionError if params do not match the module.
  """
  inner = unwrap(module)
  if not isinstance(inner, UNet):
    raise ValueError(f"cannot export a {type(inner).__name__} as edm_dhariwal")
  if latent_size is None:
    raise ValueError("exporting as edm_dhariwal needs latent_size (EDM keys name resolutions)")
  _check_edm_options(inner, int(latent_size))
  gd_sd = params_to_state_dict(params, module)
  in_ch = int(gd_sd["input_blocks.0.0.weight"].shape[1]) if "input_blocks.0.0.weight" in gd_sd \
      else inner.extra_in_channels + (inner.out_channels or 4)
  shapes = flax.traverse_util.flatten_dict(_param_shapes(module, int(latent_size), in_ch))
  expected = {_torch_key(p): _torch_shape(p, s.shape, "guided_diffusion")
              for p, s in shapes.items()}
  check_keys("<params>", [k for k in expected if k not in gd_sd],
             [k for k in gd_sd if k not in expected],
             [(k, v.shape, expected[k]) for k, v in gd_sd.items()
              if k in expected and tuple(v.shape) != tuple(expected[k])])
  _check_edm_groups(inner, gd_sd)
  table = _EdmTable(inner, int(latent_size))
  sd = {table.key(k): np.ascontiguousarray(table.to_edm(k, v)) for k, v in gd_sd.items()}
  for k in table.buffers:
    sd[k] = _EDM_FILTER.copy()
  return sd


# ----------------------------------------------------------------------------- public


def _detect_layout(sd, source: str = "<state dict>") -> str:
  if any(k.startswith("input_blocks.") for k in sd):
    return "guided_diffusion"
  if any(k.startswith("x_embedder.") for k in sd):
    return "facebook_dit"
  if _is_edm(sd):
    _check_edm_variant(sd, source)  # SongUNet, adm_context, augment labels: an error
    return "edm_dhariwal"
  raise WeightConversionError(f"checkpoint {source}: unknown velocity checkpoint layout; first "
                              f"keys: {list(sd)[:8]}")


def load_velocity_checkpoint(path: str, model_config=None, *, prefer: Optional[str] = None,
                             trust_pickle: bool = False):
  """Loads a PyTorch velocity network -> (module, params).

  Layouts (detected from the keys): guided-diffusion UNetModel and EDM DhariwalUNet (both become
  a UNet), facebook DiT.

  The architecture comes from the checkpoint shapes plus model_config (heads, attention order,
  dropout, class-count disambiguation); model_config.time_convention == "sit" wraps the module
  (v_LFM(x, t) = -v_SiT(x, 1 - t)) and nests the params under "inner". prefer: "ema" (default,
  or model_config.checkpoint_entry) or "model" for checkpoints holding both.
  Use as `module.apply({"params": params}, x, t, y)`.
  """
  prefer = prefer or _get(model_config, "checkpoint_entry", "ema") or "ema"
  sd = read_state_dict(os.fspath(path), prefer=prefer, trust_pickle=trust_pickle)
  layout = _detect_layout(sd, str(path))
  name = _get(model_config, "name", None)
  if name is not None and layout not in {"unet": ("guided_diffusion", "edm_dhariwal"),
                                         "dit": ("facebook_dit",)}.get(name, ()):
    log.warning("%s: config.model.name is %r but the checkpoint is a %s", path, name, layout)
  if layout == "guided_diffusion":
    module, params = unet_state_dict_to_params(sd, model_config, source=str(path))
  elif layout == "edm_dhariwal":
    module, params = edm_state_dict_to_params(sd, model_config, source=str(path))
  else:
    module, params = dit_state_dict_to_params(sd, model_config, source=str(path))
  convention = _get(model_config, "time_convention", "lfm") or "lfm"
  if convention == "sit":
    module, params = SiTConventionWrapper(module), {"inner": params}
  elif convention != "lfm":
    raise ValueError(f"model.time_convention must be 'lfm' or 'sit', got {convention!r}")
  return module, params


def export_velocity_checkpoint(module, params, path: str, *, layout: Optional[str] = None,
                               latent_size: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Writes params in a PyTorch layout: a UNet as "guided_diffusion" (default) or
  "edm_dhariwal" (EDM-compatible options only, see edm_params_to_state_dict), a DiT as
  "facebook_dit". .safetensors via safetensors.numpy, otherwise torch.save of a plain state dict.
  DiT and "edm_dhariwal" need latent_size (the input H = W). Returns the state dict written.
  A time-convention wrapper is stripped: the file holds the network in its own convention.
  """
  sd = params_to_state_dict(params, module, latent_size=latent_size, layout=layout)
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    save_safetensors(path, sd)
  else:
    torch_save(path, sd)
  return sd
