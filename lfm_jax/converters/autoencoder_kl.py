"""Strict PyTorch <-> Flax conversion for the first-stage AutoencoderKL.

Sources (local files only; nothing is ever downloaded):
  (a) a diffusers directory: config.json + diffusion_pytorch_model.safetensors (or .bin); a full
      diffusers pipeline directory with a `vae/` sub-folder also works;
  (b) an original LDM / Stable-Diffusion single file (.ckpt/.pt/.pth/.bin or .safetensors), keys
      with or without the `first_stage_model.` prefix. When the prefix is present only those keys
      are used (a full SD checkpoint also holds the UNet, text encoder, ...). LDM autoencoder
      training checkpoints also hold `loss.*` (discriminator / LPIPS) keys and EMA counters
      (`model_ema.decay`, `model_ema.num_updates`), which are dropped.
      Without a config the architecture is inferred from the shapes; GroupNorm's group count
      cannot be, so it defaults to 32 (every LDM/SD autoencoder) unless given.

Both LDM attention layouts (1x1-conv q/k/v/proj_out, 4-D) and old diffusers names
(query/key/value/proj_attn) are accepted. Every missing, unexpected or mis-shaped key is reported in
one `WeightConversionError`; nothing is left at random init.

safetensors files are read with `safetensors.numpy` (no torch). .bin/.ckpt files need torch, which
is imported lazily and loaded with `weights_only=True` (pass `allow_pickle=True` to
`load_autoencoder_kl` to unpickle a trusted legacy checkpoint that needs more).
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lfm_jax import storage
from lfm_jax.converters.common import (WeightConversionError, check_keys, load_safetensors,
                                       save_safetensors, torch_load)
from lfm_jax.models.autoencoder import AutoencoderKL

LDM_PREFIX = "first_stage_model."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# ----------------------------------------------------------------------------- key names


def _flax_path_to_key(path: Tuple[str, ...]) -> str:
  """('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> diffusers key."""
  parts = []
  for seg in path[:-1]:
    m = re.fullmatch(r"(.*)_(\d+)", seg)
    parts.extend([m.group(1), m.group(2)] if m else [seg])
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]])
  return ".".join(parts)


def _torch_shape(flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  if len(flax_shape) == 4:  # HWIO -> OIHW
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:  # (in, out) -> (out, in)
    return (flax_shape[1], flax_shape[0])
  return tuple(flax_shape)


def _to_flax(a: np.ndarray, want_flax_shape: Tuple[int, ...]) -> np.ndarray:
  if len(want_flax_shape) == 4:
    return np.transpose(a, (2, 3, 1, 0))
  if len(want_flax_shape) == 2:
    return np.transpose(a)
  return a


def _to_torch(a: np.ndarray) -> np.ndarray:
  if a.ndim == 4:
    return np.transpose(a, (3, 2, 0, 1))
  if a.ndim == 2:
    return np.transpose(a)
  return a


_LDM_TRAINING_ONLY = ("model_ema.decay", "model_ema.num_updates")
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def ldm_to_diffusers_key(key: str, num_levels: int) -> str:
  """Maps one original-LDM AutoencoderKL key (no prefix) to the diffusers name."""
  k = key
  k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
  k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
  k = re.sub(r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
             lambda m: f".mid_block.attentions.0.{_LDM_ATTN[m.group(1)]}.", k)
  k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
  k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
  k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
             lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.",
             k)
  k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
             lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", k)
  k = k.replace(".nin_shortcut.", ".conv_shortcut.")
  return k


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
  """Inverse of `ldm_to_diffusers_key` (used to name missing keys in the source's own layout)."""
  inv_attn = {v: k for k, v in _LDM_ATTN.items()}
  k = key
  k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
  k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
  k = re.sub(r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
             lambda m: f".mid.attn_1.{inv_attn[m.group(1)]}.", k)
  k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
  k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
  k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
             lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
  k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
             lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.upsample.", k)
  k = k.replace(".conv_shortcut.", ".nin_shortcut.")
  return k


def _old_diffusers_to_new(key: str) -> str:
  return re.sub(r"\.attentions\.(\d+)\.(query|key|value|proj_attn)\.",
                lambda m: f".attentions.{m.group(1)}.{_OLD_DIFFUSERS_ATTN[m.group(2)]}.", key)


def _is_ldm_layout(keys) -> bool:
  return any(re.match(r"^(encoder\.down\.|encoder\.mid\.|decoder\.up\.|decoder\.mid\.)", k)
             for k in keys)


class _Normalized:
  """A state dict renamed to diffusers keys, remembering each key's original name."""

  def __init__(self, state_dict: Mapping[str, Any], num_levels: Optional[int] = None):
    keys = list(state_dict)
    self.prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in keys) else ""
    if self.prefix:
      keys = [k for k in keys if k.startswith(self.prefix)]
    stripped = {k[len(self.prefix):]: k for k in keys}
    self.ldm = _is_ldm_layout(stripped)
    if self.ldm:
      # Training-only entries of LDM autoencoder checkpoints: discriminator / LPIPS weights and
      # EMA bookkeeping scalars (not parameters of the autoencoder).
      stripped = {k: v for k, v in stripped.items()
                  if not k.startswith("loss.") and k not in _LDM_TRAINING_ONLY}
      if num_levels is None:
        num_levels = 1 + max(
            [int(m.group(1)) for k in stripped
             for m in [re.match(r"^encoder\.down\.(\d+)\.", k)] if m] + [0])
    self.num_levels = num_levels
    self.arrays: Dict[str, Any] = {}
    self.original: Dict[str, str] = {}
    for k, orig in stripped.items():
      new = ldm_to_diffusers_key(k, num_levels) if self.ldm else _old_diffusers_to_new(k)
      if new in self.arrays:  # two spellings of one parameter
        raise WeightConversionError(f"duplicate parameter {new!r}: {self.original[new]!r}, {orig!r}")
      self.arrays[new] = state_dict[orig]
      self.original[new] = orig

  def source_name(self, diffusers_key: str) -> str:
    """How `diffusers_key` is (or would be) spelled in the source checkpoint."""
    if diffusers_key in self.original:
      return self.original[diffusers_key]
    k = diffusers_to_ldm_key(diffusers_key, self.num_levels) if self.ldm else diffusers_key
    return self.prefix + k


# ----------------------------------------------------------------------------- conversion


def expected_shapes(module: AutoencoderKL) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
  """diffusers key -> (flax path, flax shape) for every parameter of `module`."""
  h = w = 8 * module.downsample_factor
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, h, w, module.in_channels), jnp.float32))
  flat = traverse_util.flatten_dict(shapes["params"])
  return {_flax_path_to_key(p): (p, tuple(s.shape)) for p, s in flat.items()}


def _as_numpy(a) -> np.ndarray:
  if isinstance(a, np.ndarray):
    return a
  if hasattr(a, "detach"):  # a torch tensor
    return a.detach().cpu().float().numpy()
  return np.asarray(a)


def convert_autoencoder_kl_state_dict(state_dict: Mapping[str, Any], module: AutoencoderKL,
                                      source: str = "<state dict>") -> Dict[str, Any]:
  """A PyTorch AutoencoderKL state dict (any accepted layout) -> Flax params (numpy, float32).

  Raises WeightConversionError listing every missing, unexpected and mis-shaped key.
  """
  norm = _Normalized(state_dict, len(module.block_out_channels))
  want = expected_shapes(module)
  missing = [norm.source_name(k) for k in want if k not in norm.arrays]
  unexpected = [norm.original[k] for k in norm.arrays if k not in want]
  mismatched = []
  flat = {}
  for k, (path, fshape) in want.items():
    if k not in norm.arrays:
      continue
    a = _as_numpy(norm.arrays[k])
    tshape = _torch_shape(fshape)
    if len(tshape) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
      a = a[:, :, 0, 0]  # LDM's 1x1-conv attention projections
    if tuple(a.shape) != tshape:
      mismatched.append((norm.original[k], tuple(a.shape), tshape))
      continue
    flat[path] = np.ascontiguousarray(_to_flax(a, fshape), dtype=np.float32)
  check_keys(source, missing, unexpected, mismatched)
  return traverse_util.unflatten_dict(flat)


def autoencoder_kl_to_state_dict(params) -> Dict[str, np.ndarray]:
  """Flax params -> diffusers-layout PyTorch state dict (numpy, NCHW / (out, in))."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  return {_flax_path_to_key(p): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32)))
          for p, v in flat.items()}


# ----------------------------------------------------------------------------- configs


def module_from_diffusers_config(cfg: Mapping[str, Any], **overrides) -> AutoencoderKL:
  """Builds the module from a diffusers AutoencoderKL config.json dict."""
  act = cfg.get("act_fn", "silu")
  if act != "silu":
    raise WeightConversionError(f"unsupported act_fn {act!r} (only silu)")
  for field, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    bad = [t for t in cfg.get(field, ()) if t != ok]
    if bad:
      raise WeightConversionError(f"unsupported {field} {bad} (only {ok})")
  block_out = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
  kwargs = dict(
      in_channels=int(cfg.get("in_channels", 3)),
      out_channels=int(cfg.get("out_channels", 3)),
      block_out_channels=block_out,
      layers_per_block=int(cfg.get("layers_per_block", 1)),
      latent_channels=int(cfg.get("latent_channels", 4)),
      norm_num_groups=int(cfg.get("norm_num_groups", 32)),
      mid_block_attention=bool(cfg.get("mid_block_add_attention", True)),
      use_quant_conv=bool(cfg.get("use_quant_conv", True)),
      use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
  )
  kwargs.update(overrides)
  return AutoencoderKL(**kwargs)


def diffusers_config(module: AutoencoderKL, scaling_factor: Optional[float] = None,
                     sample_size: Optional[int] = None) -> Dict[str, Any]:
  """The diffusers config.json dict describing `module`."""
  n = len(module.block_out_channels)
  cfg = {
      "_class_name": "AutoencoderKL",
      "in_channels": module.in_channels,
      "out_channels": module.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(module.block_out_channels),
      "layers_per_block": module.layers_per_block,
      "act_fn": "silu",
      "latent_channels": module.latent_channels,
      "norm_num_groups": module.norm_num_groups,
      "mid_block_add_attention": module.mid_block_attention,
      "use_quant_conv": module.use_quant_conv,
      "use_post_quant_conv": module.use_post_quant_conv,
  }
  if scaling_factor is not None:
    cfg["scaling_factor"] = float(scaling_factor)
  if sample_size is not None:
    cfg["sample_size"] = int(sample_size)
  return cfg


def infer_config_from_state_dict(state_dict: Mapping[str, Any], norm_num_groups: int = 32,
                                 source: str = "<state dict>") -> Dict[str, Any]:
  """Reads the architecture (diffusers config dict) off the shapes of a state dict.

  GroupNorm's group count is not visible in shapes: `norm_num_groups` (LDM/SD use 32).
  """
  norm = _Normalized(state_dict)
  sd = norm.arrays

  def shape(k):
    return tuple(sd[k].shape)

  try:
    block_out = []
    while f"encoder.down_blocks.{len(block_out)}.resnets.0.conv1.weight" in sd:
      block_out.append(shape(f"encoder.down_blocks.{len(block_out)}.resnets.0.conv1.weight")[0])
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in sd:
      layers += 1
    cfg = {
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": norm_num_groups,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
    }
  except KeyError as e:
    raise WeightConversionError(
        f"{source}: cannot infer the AutoencoderKL architecture, key {norm.source_name(e.args[0])!r}"
        " is missing (is this an autoencoder checkpoint?)") from None
  if not block_out or not layers:
    raise WeightConversionError(f"{source}: no encoder blocks found; not an AutoencoderKL checkpoint")
  return cfg


# ----------------------------------------------------------------------------- files


def _load_torch_file(path: str, allow_pickle: bool) -> Dict[str, Any]:
  obj = torch_load(path, trust_pickle=allow_pickle)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise WeightConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v for k, v in obj.items() if hasattr(v, "shape")}


def _load_state_dict_file(path: str, allow_pickle: bool = False) -> Dict[str, Any]:
  if path.endswith(".safetensors"):
    return load_safetensors(path)
  if path.endswith(_TORCH_SUFFIXES):
    return _load_torch_file(path, allow_pickle)
  raise WeightConversionError(f"{path}: unknown checkpoint format (want .safetensors, .ckpt, "
                              ".pt, .pth or .bin, or a diffusers directory)")


def load_autoencoder_kl(path: str, *, config: Optional[Mapping[str, Any]] = None,
                        norm_num_groups: Optional[int] = None, allow_pickle: bool = False,
                        **module_overrides) -> Tuple[AutoencoderKL, Dict[str, Any]]:
  """Loads a local diffusers directory or LDM/SD single file -> (AutoencoderKL, params).

  Args:
    path: a diffusers AutoencoderKL directory (config.json + weights), a diffusers pipeline
      directory (uses its `vae/`), or a single .safetensors/.ckpt/.pt/.pth/.bin file.
    config: a diffusers-style config dict for a single file (else inferred from shapes).
    norm_num_groups: GroupNorm groups for a single file without config (default 32).
    allow_pickle: let torch.load unpickle arbitrary objects (trusted legacy files only).
    module_overrides: extra AutoencoderKL fields, e.g. small_map_threshold.
  Never downloads: a path that does not exist raises FileNotFoundError.
  """
  root = storage.path(path)
  path = storage.display(root)
  if not root.exists():
    raise FileNotFoundError(f"autoencoder checkpoint {path!r} not found (nothing is "
                            "downloaded)")
  if root.is_dir():
    if not (root / "config.json").exists() and (root / "vae" / "config.json").exists():
      root = root / "vae"
    cfg_path = root / "config.json"
    if not cfg_path.exists():
      raise FileNotFoundError(f"{storage.display(root)}: a diffusers directory needs config.json")
    cfg = storage.read_json(cfg_path)
    if config:
      cfg.update(config)
    for name in DIFFUSERS_WEIGHTS:
      wpath = root / name
      if wpath.exists():
        break
    else:
      raise FileNotFoundError(f"{storage.display(root)}: no {' or '.join(DIFFUSERS_WEIGHTS)}")
    wpath = storage.display(wpath)
    state_dict = _load_state_dict_file(wpath, allow_pickle)
    source = wpath
  else:
    state_dict = _load_state_dict_file(path, allow_pickle)
    source = path
    if config is not None:
      cfg = dict(config)
    else:
      cfg = infer_config_from_state_dict(state_dict, norm_num_groups or 32, source)
  if norm_num_groups is not None:
    cfg["norm_num_groups"] = norm_num_groups
  module = module_from_diffusers_config(cfg, **module_overrides)
  params = convert_autoencoder_kl_state_dict(state_dict, module, source)
  return module, params


def export_autoencoder_kl(module: AutoencoderKL, params, out_dir: str, *,
                          scaling_factor: Optional[float] = None,
                          sample_size: Optional[int] = None) -> str:
  """Writes a diffusers directory (config.json + diffusion_pytorch_model.safetensors).

  Loadable with `diffusers.AutoencoderKL.from_pretrained(out_dir)` and with
  `load_autoencoder_kl(out_dir)`. Returns out_dir.
  """
  out = storage.path(out_dir)
  state_dict = autoencoder_kl_to_state_dict(params)
  want = expected_shapes(module)
  check_keys(
      "<params being exported>",
      missing=[k for k in want if k not in state_dict],
      unexpected=[k for k in state_dict if k not in want],
      mismatched=[(k, state_dict[k].shape, _torch_shape(want[k][1]))
                  for k in want if k in state_dict
                  and tuple(state_dict[k].shape) != _torch_shape(want[k][1])])
  save_safetensors(out / DIFFUSERS_WEIGHTS[0], state_dict, metadata={"format": "pt"})
  storage.write_json(out / "config.json", diffusers_config(module, scaling_factor, sample_size))
  return storage.display(out)
