"""PyTorch <-> Flax converters for the velocity networks (issue 10).

Layouts:
- "guided_diffusion": guided-diffusion / LFM / torchcfm `UNetModel` state dicts
  (input_blocks.*, middle_block.*, output_blocks.*, time_embed.*, label_emb.weight, out.*).
- "facebook_dit": facebook DiT state dicts (LFM's models/DiT.py; the stability repo), incl. the
  fixed `pos_embed` buffer (recomputed here and checked).
EDM's DhariwalUNet layout is not implemented.

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

from lfm_jax.converters.common import WeightConversionError, check_keys, torch_load
from lfm_jax.models import SiTConventionWrapper, unwrap
from lfm_jax.models.dit import DIT_PRESETS, DiT
from lfm_jax.models.layers import sincos_pos_embed_2d
from lfm_jax.models.unet import UNet

__all__ = [
    "load_velocity_checkpoint", "export_velocity_checkpoint", "read_state_dict",
    "extract_state_dict", "infer_unet", "infer_dit", "state_dict_to_params",
    "params_to_state_dict", "unet_state_dict_to_params", "unet_params_to_state_dict",
    "dit_state_dict_to_params", "dit_params_to_state_dict", "WeightConversionError",
]

log = logging.getLogger(__name__)

_UNET_CONV1D = ("qkv", "proj_out")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")


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
    from safetensors.numpy import load_file
    return extract_state_dict(load_file(path), prefer)
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


def state_dict_to_params(state_dict: Mapping[str, Any], module, *, in_channels: int,
                         source: str = "<state dict>", latent_size: Optional[int] = None
                         ) -> Dict:
  """Strict torch state dict -> Flax params of `module` (U-Net or DiT, possibly wrapped).

  in_channels: the network's input channels (latent + extra conditioning channels).
  latent_size: input H (= W); only needed for a U-Net with "resolution" attention semantics.
  For DiT, `pos_embed` is checked against the fixed sin-cos embedding and not stored.
  """
  inner = unwrap(module)
  layout = _layout_of(module)
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


def params_to_state_dict(params: Mapping, module, *, latent_size: Optional[int] = None
                         ) -> Dict[str, np.ndarray]:
  """Flax params -> torch-layout state dict {key: float32 numpy}.

  For DiT, latent_size (the input H = W) is required to write the `pos_embed` buffer.
  """
  inner = unwrap(module)
  layout = _layout_of(module)
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


# ----------------------------------------------------------------------------- public


def _detect_layout(sd) -> str:
  if any(k.startswith("input_blocks.") for k in sd):
    return "guided_diffusion"
  if any(k.startswith("x_embedder.") for k in sd):
    return "facebook_dit"
  if any(k.startswith(("enc.", "dec.", "map_noise", "map_label")) for k in sd):
    raise WeightConversionError("EDM DhariwalUNet/SongUNet checkpoints are not supported yet")
  raise WeightConversionError(f"unknown velocity checkpoint layout; first keys: {list(sd)[:8]}")


def load_velocity_checkpoint(path: str, model_config=None, *, prefer: Optional[str] = None,
                             trust_pickle: bool = False):
  """Loads a PyTorch velocity network (guided-diffusion U-Net or facebook DiT) -> (module, params).

  The architecture comes from the checkpoint shapes plus model_config (heads, attention order,
  dropout, class-count disambiguation); model_config.time_convention == "sit" wraps the module
  (v_LFM(x, t) = -v_SiT(x, 1 - t)) and nests the params under "inner". prefer: "ema" (default,
  or model_config.checkpoint_entry) or "model" for checkpoints holding both.
  Use as `module.apply({"params": params}, x, t, y)`.
  """
  prefer = prefer or _get(model_config, "checkpoint_entry", "ema") or "ema"
  sd = read_state_dict(os.fspath(path), prefer=prefer, trust_pickle=trust_pickle)
  layout = _detect_layout(sd)
  name = _get(model_config, "name", None)
  if name is not None and {"unet": "guided_diffusion", "dit": "facebook_dit"}.get(name) != layout:
    log.warning("%s: config.model.name is %r but the checkpoint is a %s", path, name, layout)
  if layout == "guided_diffusion":
    module, params = unet_state_dict_to_params(sd, model_config, source=str(path))
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
  """Writes params in the PyTorch layout ("guided_diffusion" for UNet, "facebook_dit" for DiT;
  default: the module's own). .safetensors via safetensors.numpy, otherwise torch.save of a
  plain state dict. DiT needs latent_size (for pos_embed). Returns the state dict written.
  A time-convention wrapper is stripped: the file holds the network in its own convention.
  """
  own = _layout_of(module)
  if layout is not None and layout != own:
    raise ValueError(f"cannot export a {type(unwrap(module)).__name__} as {layout!r}")
  sd = params_to_state_dict(params, module, latent_size=latent_size)
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(sd, path)
  else:
    import torch
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)
  return sd
