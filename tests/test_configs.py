"""Every config under configs/ builds, stays inside the schema, validates, and its velocity
network traces (jax.eval_shape only: nothing is allocated, so paper-scale models are cheap)."""

import importlib
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

# Keys configs may set although configs/default.py does not have them (yet).
ALLOWED_EXTRA_KEYS = {"model.dit_preset", "model.time_convention"}


def load_config_module(path):
  """Imports a config file by path, as ml_collections' `--config=path` does."""
  spec = importlib.util.spec_from_file_location(f"lfm_test_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_files():
  return sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def config_cases():
  """(file name, get_config argument or None) for every config, incl. parameterised ones."""
  cases = []
  for path in config_files():
    module = load_config_module(path)
    if path.name == "stability_prune.py":
      cases += [(path.name, f"{c},{r}") for c in module.CRITERIA for r in module.RATIOS]
      cases += [(path.name, "cluster,0.75,imagenet"), (path.name, "loss,0.5,ffhq,B/2")]
    elif path.name == "coarse_to_fine_dit_s2_xl2.py":
      cases += [(path.name, stage) for stage in module.STAGES]
    else:
      cases.append((path.name, None))
  return cases


CASES = config_cases()
CASE_IDS = [name if arg is None else f"{name}:{arg}" for name, arg in CASES]


def build(name, arg):
  module = load_config_module(CONFIG_DIR / name)
  return module.get_config() if arg is None else module.get_config(arg)


def flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    full = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      keys |= flat_keys(value, full + ".")
    else:
      keys.add(full)
  return keys


def latent_shape(config):
  """(H, W, C) of the latents the velocity network sees."""
  ae = config.autoencoder
  factor = 8 if ae.pretrained else 2 ** (len(ae.block_out_channels) - 1)
  size = config.data.image_size // factor
  return (size, size, ae.latent_channels)


def test_expected_configs_exist():
  names = {p.name for p in config_files()}
  for expected in [
      "default.py", "celeba_hq_256_adm.py", "celeba_hq_256_dit_l2.py", "ffhq_256_adm.py",
      "ffhq_256_dit_l2.py", "lsun_church_256_adm.py", "lsun_church_256_dit_l2.py",
      "lsun_bedroom_256_adm.py", "lsun_bedroom_256_dit_l2.py", "imagenet_256_dit_b2.py",
      "imagenet_256_adm.py", "celeba_hq_512_adm.py", "celeba_hq_256_inpainting_adm.py",
      "celebamask_hq_semantic_adm.py", "stability_prune.py", "coarse_to_fine_dit_s2_xl2.py"]:
    assert expected in names


@pytest.mark.parametrize("name,arg", CASES, ids=CASE_IDS)
def test_config_builds_within_schema(name, arg):
  config = build(name, arg)
  assert isinstance(config, ml_collections.ConfigDict)
  schema = flat_keys(load_config_module(CONFIG_DIR / "default.py").get_config())
  unknown = flat_keys(config) - schema - ALLOWED_EXTRA_KEYS
  assert not unknown, f"{name}: keys missing from configs/default.py: {sorted(unknown)}"
  # Round-trips through JSON, as main writes workdir/config.json.
  assert ml_collections.ConfigDict(config.to_dict()).to_json()


@pytest.mark.parametrize("name,arg", CASES, ids=CASE_IDS)
def test_config_validates(name, arg):
  validation = pytest.importorskip("lfm_jax.config_validation")
  validation.validate_config(build(name, arg))


PAPER_CASES = [(n, a) for n, a in CASES if n != "default.py"]


@pytest.mark.parametrize("name,arg", PAPER_CASES,
                         ids=[i for i in CASE_IDS if not i.startswith("default.py")])
def test_paper_protocol(name, arg):
  config = build(name, arg)
  assert config.autoencoder.pretrained  # SD KL-f8, user-provided path
  assert config.autoencoder.scale_factor == pytest.approx(0.18215)
  assert config.data.channels == 3 and config.data.image_size in (256, 512)
  assert latent_shape(config) == (config.data.image_size // 8,) * 2 + (4,)
  assert config.eval.feature_extractor == "inception"
  assert config.train.num_steps > 0 and config.train.batch_size > 0
  if config.model.name == "dit":
    assert config.model.dit_preset in ("S/2", "B/2", "L/2", "XL/2")
  assert (config.model.num_classes > 0) == (config.data.num_classes > 0)
  assert (config.flow.class_dropout_prob > 0) == (config.model.num_classes > 0)
  if name.startswith("coarse_to_fine"):
    assert config.sample.solver == "euler" and config.sample.num_steps == 59
    assert config.coarse_to_fine.light_fraction == pytest.approx(0.7)
  else:
    assert config.sample.solver == "dopri5"
    assert config.sample.rtol == config.sample.atol == 1e-5
  if not name.startswith(("stability", "coarse_to_fine")):
    assert config.eval.num_samples == 50_000


def test_paper_specifics():
  cfg = build("imagenet_256_dit_b2.py", None)
  assert (cfg.model.dit_preset, cfg.model.num_classes, cfg.sample.guidance_scale) == ("B/2", 1000, 1.5)
  cfg = build("imagenet_256_adm.py", None)
  assert (cfg.model.name, cfg.sample.guidance_scale) == ("unet", 1.25)
  assert cfg.model.attention_semantics == "resolution"
  cfg = build("celeba_hq_256_adm.py", None)
  assert cfg.model.channel_mult == (1, 2, 2, 2) and cfg.model.attention_semantics == "downsample"
  cfg = build("celeba_hq_512_adm.py", None)
  assert latent_shape(cfg) == (64, 64, 4) and cfg.train.compute_dtype == "bfloat16"
  cfg = build("celeba_hq_256_inpainting_adm.py", None)
  assert cfg.model.extra_in_channels == 5  # 4 latent + 4 masked latent + 1 mask = 9 inputs
  for name in ("lsun_church_256_dit_l2.py", "lsun_bedroom_256_adm.py"):
    assert build(name, None).data.max_train_examples == 120_000
  cfg = build("stability_prune.py", "gradient,0.75")
  assert (cfg.score.criterion, cfg.data.subset.ratio, cfg.data.subset.rule) == (
      "gradient", 0.75, "highest")
  cfg = build("stability_prune.py", "cluster,0.5,imagenet")
  assert cfg.score.num_clusters == 1000 and cfg.data.subset.rule == "balanced"
  assert build("coarse_to_fine_dit_s2_xl2.py", "light").model.dit_preset == "S/2"
  assert build("coarse_to_fine_dit_s2_xl2.py", None).coarse_to_fine.light_workdir


@pytest.mark.parametrize("arg", ["nope,0.5", "loss,1.5", "loss", "loss,0.5,cifar"])
def test_stability_prune_rejects_bad_arguments(arg):
  with pytest.raises(ValueError):
    build("stability_prune.py", arg)


def test_coarse_to_fine_rejects_bad_stage():
  with pytest.raises(ValueError):
    build("coarse_to_fine_dit_s2_xl2.py", "medium")


def distinct_networks():
  """One (name, arg) per distinct (model config, latent shape): e.g. the four unconditional
  DiT-L/2 configs share one trace."""
  seen, cases = set(), []
  for name, arg in CASES:
    config = build(name, arg)
    key = (config.model.to_json(sort_keys=True), latent_shape(config))
    if key not in seen:
      seen.add(key)
      cases.append((name, arg))
  return cases


TRACE_CASES = distinct_networks()

# Published parameter counts (millions) of the DiT presets, checked loosely.
DIT_PARAMS_M = {"S/2": 33, "B/2": 130, "L/2": 458, "XL/2": 675}


@pytest.mark.parametrize("name,arg", TRACE_CASES,
                         ids=[n if a is None else f"{n}:{a}" for n, a in TRACE_CASES])
def test_velocity_model_traces(name, arg):
  models = pytest.importorskip("lfm_jax.models")
  if not hasattr(models, "create_model"):
    pytest.skip("lfm_jax.models.create_model not written yet")
  config = build(name, arg)
  shape = latent_shape(config)
  model = models.create_model(config.model, shape)
  batch = 2
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = (jax.ShapeDtypeStruct((batch,), jnp.int32) if config.model.num_classes > 0 else None)
  extra = config.model.extra_in_channels
  cond = (jax.ShapeDtypeStruct((batch,) + shape[:2] + (extra,), jnp.float32) if extra else None)
  if config.model.get("semantic_classes", 0):  # cond is the (B, S, S) class map at image size
    size = config.data.image_size
    cond = jax.ShapeDtypeStruct((batch, size, size), jnp.int32)

  def init_and_apply(key, x, t, y, cond):
    variables = model.init({"params": key, "dropout": key}, x, t, y=y, cond=cond, train=False)
    return variables, model.apply(variables, x, t, y=y, cond=cond, train=False)

  variables, v = jax.eval_shape(init_and_apply, jax.random.key(0), x, t, y, cond)
  assert v.shape == x.shape and v.dtype == jnp.float32
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(variables["params"]))
  assert num_params > 0
  if config.model.name == "dit":
    expected = DIT_PARAMS_M[config.model.dit_preset] * 1e6
    assert 0.9 * expected < num_params < 1.1 * expected, num_params
