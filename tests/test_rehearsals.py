"""Every config in configs/ rehearsed: its documented commands, end to end, on tiny real files.

For each config file (enumerated, so a new config without a rehearsal fails here) the
`python -m lfm_jax.main ...` commands of its docstring run with the placeholders pointing at tiny
manual files in the data set's real format, a tiny random autoencoder in the diffusers layout
and random pytorch-fid-layout Inception weights, shrunk by overrides of sizes, steps and counts
only (tests/rehearsal.py's REHEARSALS). The rehearsals run in two worker processes with one CPU
device each (all of them compile-bound); the tests then check what they wrote, with numbers.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import rehearsal
from lfm_jax import latents as latents_lib
from lfm_jax import stages
from lfm_jax import workdir as workdir_lib

CONFIG_FILES = sorted(f for f in os.listdir(rehearsal.CONFIG_DIR)
                      if f.endswith(".py") and not f.startswith("_"))
# Two workers of about equal CPU time; a data set is prepared by one worker only; networks that
# shrink to the same program follow each other.
WORKERS = (
    ("celeba_hq_256_dit_l2.py", "coarse_to_fine_dit_s2_xl2.py", "stability_prune.py",
     "celeba_hq_256_adm.py", "celeba_hq_256_inpainting_adm.py", "celeba_hq_512_adm.py",
     "celebamask_hq_semantic_adm.py"),
    ("ffhq_256_dit_l2.py", "lsun_church_256_dit_l2.py", "lsun_bedroom_256_dit_l2.py",
     "imagenet_256_dit_b2.py", "ffhq_256_adm.py", "lsun_bedroom_256_adm.py",
     "lsun_church_256_adm.py", "imagenet_256_adm.py"),
)
TRAIN_EXAMPLES = {"celeb_a_hq/256": 72, "celeb_a_hq/512": 72, "ffhq": 72,
                  "lfm_lsun/church_outdoor": 40, "lfm_lsun/bedroom": 40, "imagenet2012": 18,
                  "celebamask_hq": 24}
FID_METRICS = ("fid", "kid", "precision_inception", "recall_inception", "inception_score")


def test_every_config_has_a_rehearsal():
  assert set(CONFIG_FILES) == set(rehearsal.REHEARSALS), (
      "configs/ and tests/rehearsal.py's REHEARSALS differ: "
      f"{sorted(set(CONFIG_FILES) ^ set(rehearsal.REHEARSALS))}")
  covered = sorted(n for n, r in rehearsal.REHEARSALS.items() if r.covered_by)
  assert sorted(sum(WORKERS, ()) + tuple(covered)) == CONFIG_FILES
  for name in covered:
    assert os.path.isfile(os.path.join(rehearsal.REPO, rehearsal.REHEARSALS[name].covered_by))


@pytest.mark.parametrize("config_file", [f for f in CONFIG_FILES if f != "default.py"])
def test_paper_configs_document_their_commands(config_file):
  commands = rehearsal.documented_commands(config_file)
  assert commands, f"configs/{config_file} documents no command"
  text = open(os.path.join(rehearsal.CONFIG_DIR, config_file)).read()
  assert "Needs (not yet" not in text
  for command in commands:
    args = rehearsal.command_arguments(command, {k: "X" for k in (
        "WORKDIR", "MANUAL_DIR", "SD_VAE", "INCEPTION", "HEAVY", "LIGHT", "IMAGE", "MASK", "MAP",
        "SCORER")})
    assert any(a.startswith(f"--config=configs/{config_file}") for a in args), command
    assert "--config.autoencoder.pretrained=X" in args, command
    if "--mode=evaluate" in args or "--mode=score" in args:
      assert "--config.eval.inception_weights=X" in args, command
  assert "$MANUAL_DIR" in text and "$SD_VAE" in text and "$INCEPTION" in text


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
  """Runs every rehearsal (two worker processes); {config file: the worker's record}."""
  root = str(tmp_path_factory.mktemp("rehearsals"))
  t0 = time.time()
  rehearsal.shared_inputs(root, sorted({r.data for r in rehearsal.REHEARSALS.values() if r.data}))
  inputs = time.time() - t0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [rehearsal.REPO, os.environ.get("PYTHONPATH", "")]))
  procs = []
  for i, names in enumerate(WORKERS):
    log = open(os.path.join(root, f"worker{i}.log"), "w")
    procs.append((subprocess.Popen([sys.executable, rehearsal.__file__, root, f"w{i}", *names],
                                   stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=rehearsal.REPO), log))
  for proc, log in procs:
    proc.wait(timeout=1800)
    log.close()
  records = {}
  for name in CONFIG_FILES:
    path = os.path.join(root, "results", name[:-3] + ".json")
    if os.path.exists(path):
      with open(path) as f:
        records[name] = json.load(f)
  print(f"\nrehearsals: inputs {inputs:.1f} s, workers {time.time() - t0 - inputs:.1f} s")
  for name, rec in sorted(records.items()):
    print(f"  {name:36s} {rec['total_seconds']:6.1f} s (cpu {rec.get('cpu_seconds', 0):6.1f} s)"
          f"  per command {[round(s, 1) for s in rec['seconds']]}")
  return root, records


# ----------------------------------------------------------------------------- checks


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def check_train(workdir, num_train, latent_shape=(8, 8, 4), steps=2):
  wd = workdir_lib.Workdir(workdir)
  assert wd.latest_step() == steps
  cache = latents_lib.LatentCache.open(wd.latents)
  assert cache.num_examples == num_train and cache.latent_shape == latent_shape
  assert 0.0 < cache.scale_factor < 1e3
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses) >= 2 and all(_finite(l) and l > 0 for l in losses), losses
  return cache


def check_sample(result, num=4, size=16, channels=3):
  assert os.path.isfile(result["grid"]) and result["num_samples"] == num
  z = np.load(result["grid"][:-4] + ".npz")
  images = z["images"]
  assert images.shape == (num, size, size, channels)
  assert np.isfinite(images).all() and np.abs(images).max() <= 1.0
  assert images.std() > 0
  assert result["nfe"] >= 1 and _finite(result["sec_per_image"])
  return z


def check_evaluate(result, workdir, num=4):
  assert result["stage"] == "evaluate" and result["num_samples"] == num
  wanted = FID_METRICS if "inception_score" in workdir_lib.Workdir(workdir).read_config(
  ).eval.metrics else FID_METRICS[:-1]
  for key in wanted:
    assert _finite(result.get(key)), (key, result)
  assert result["fid"] >= 0 and 0 <= result["precision_inception"] <= 1
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    assert json.load(f)["fid"] == pytest.approx(result["fid"])


def _record(rehearsed, name):
  root, records = rehearsed
  assert name in records, f"{name}: the worker wrote no record (see {root}/worker*.log)"
  rec = records[name]
  assert rec["error"] is None, f"{name} failed:\n{rec['error'][-4000:]}"
  return rec, rec["paths"], rec["results"]


def _generation(rehearsed, name, data, *, classes=0, guidance=1.0):
  rec, paths, (train, sample, evaluate) = _record(rehearsed, name)
  assert train["reused"] is False
  check_train(paths["WORKDIR"], TRAIN_EXAMPLES[data])
  z = check_sample(sample)
  assert sample["solver"] == "dopri5" and sample["guidance_scale"] == guidance
  if classes:
    assert z["labels"].shape == (4,) and z["labels"].max() < classes
  check_evaluate(evaluate, paths["WORKDIR"])
  return rec


@pytest.mark.parametrize("name,data", [
    ("celeba_hq_256_adm.py", "celeb_a_hq/256"), ("celeba_hq_256_dit_l2.py", "celeb_a_hq/256"),
    ("ffhq_256_adm.py", "ffhq"), ("ffhq_256_dit_l2.py", "ffhq"),
    ("lsun_church_256_adm.py", "lfm_lsun/church_outdoor"),
    ("lsun_church_256_dit_l2.py", "lfm_lsun/church_outdoor"),
    ("lsun_bedroom_256_adm.py", "lfm_lsun/bedroom"),
    ("lsun_bedroom_256_dit_l2.py", "lfm_lsun/bedroom")])
def test_unconditional_rehearsal(rehearsed, name, data):
  _generation(rehearsed, name, data)


@pytest.mark.parametrize("name,guidance", [("imagenet_256_adm.py", 1.25),
                                           ("imagenet_256_dit_b2.py", 1.5)])
def test_imagenet_rehearsal(rehearsed, name, guidance):
  _generation(rehearsed, name, "imagenet2012", classes=1000, guidance=guidance)


def test_celeba_hq_512_rehearsal(rehearsed):
  rec = _generation(rehearsed, "celeba_hq_512_adm.py", "celeb_a_hq/512")
  config = workdir_lib.Workdir(rec["paths"]["WORKDIR"]).read_config()
  assert config.train.compute_dtype == "bfloat16" and config.data.name == "celeb_a_hq/512"


def test_inpainting_rehearsal(rehearsed):
  _, paths, (train, sample, sample_file, evaluate) = _record(
      rehearsed, "celeba_hq_256_inpainting_adm.py")
  cache = check_train(paths["WORKDIR"], TRAIN_EXAMPLES["celeb_a_hq/256"])
  group = cache.read_group(0)
  assert group["masked_mean"].shape[1:] == (8, 8, 4)
  assert set(np.unique(group["mask_channel"])) <= {-1.0, 1.0}
  assert "mask_channel_flip" in group  # random_flip: the mirrored pairs too
  for result, source in ((sample, "celeb_a_hq/256 train[90%:]"), (sample_file, paths["IMAGE"])):
    assert result["task"] == "inpainting" and source in result["conditions"]
    z = check_sample(result)
    known = z["masks"] == 1.0
    assert known.any() and (~known).any()
    np.testing.assert_array_equal(z["images"][known], z["inputs"][known])  # pasted back
  assert sample["grid"] != sample_file["grid"]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = np.asarray(Image.open(sample_file["grid"]))
  assert grid.shape[1] == 3 * 16 + 4  # input / mask / result columns
  check_evaluate(evaluate, paths["WORKDIR"])


def test_semantic_rehearsal(rehearsed):
  _, paths, (train, sample, sample_file, evaluate) = _record(
      rehearsed, "celebamask_hq_semantic_adm.py")
  cache = check_train(paths["WORKDIR"], TRAIN_EXAMPLES["celebamask_hq"])
  seg = cache.read_group(0)["segmentation"]
  assert seg.dtype == np.uint8 and seg.shape[1:] == (16, 16) and seg.max() < 19
  assert len(np.unique(seg)) > 2  # background, skin, hair, ... survive the resize
  z = check_sample(sample)
  assert z["maps"].dtype == np.uint8 and z["maps"].shape == (4, 16, 16)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  zf = check_sample(sample_file)
  np.testing.assert_array_equal(zf["maps"][0], np.asarray(Image.open(paths["MAP"])))
  # Different maps give different images from the same noise.
  assert np.abs(z["images"][0] - zf["images"][0]).max() > 0
  check_evaluate(evaluate, paths["WORKDIR"])


def test_stability_prune_rehearsal(rehearsed):
  _, paths, (score, train, sample, evaluate) = _record(rehearsed, "stability_prune.py")
  with np.load(score["scores"]) as z:
    assert len(z["ids"]) == 16 and np.isfinite(z["scores"]).all()
    assert len(np.unique(z["clusters"])) <= 4
  check_train(paths["WORKDIR"], 16)
  kept = np.load(workdir_lib.Workdir(paths["WORKDIR"]).kept_ids)
  assert len(kept) == 8 and len(np.unique(kept)) == 8  # half of 16 removed
  check_sample(sample)
  check_evaluate(evaluate, paths["WORKDIR"])


def test_coarse_to_fine_rehearsal(rehearsed):
  _, paths, (heavy, light, sample, evaluate) = _record(rehearsed, "coarse_to_fine_dit_s2_xl2.py")
  for workdir in (paths["HEAVY"], paths["LIGHT"]):
    check_train(workdir, TRAIN_EXAMPLES["celeb_a_hq/256"])
  check_sample(sample)
  for result in (sample, evaluate):
    assert result["nfe_light"] + result["nfe_heavy"] == 59  # Euler 59, 70% light
    assert result["nfe_light"] == pytest.approx(0.7 * 59, abs=1)
  check_evaluate(evaluate, paths["HEAVY"])


def test_default_is_rehearsed_by_test_main_with_sizes_steps_and_counts_only():
  """configs/default.py's command (pipeline mode, no files) runs in tests/test_main.py's
  pipeline_run as helpers.tiny_config: the default config with only these keys changed."""
  import helpers  # pylint: disable=g-import-not-at-top
  size_words = ("image_size", "channels", "groups", "channel_mult", "mid_attention", "steps",
                "every", "batch_size", "num_samples", "subsets")
  for key in helpers.TINY:
    assert any(w in key for w in size_words), f"TINY changes {key}, not a size/step/count"
  source = open(os.path.join(rehearsal.REPO, "tests", "test_main.py")).read()
  assert "stages.run(tiny_config(data_dir), workdir)" in source  # the pipeline, end to end
  tiny = helpers.tiny_config("/tmp/tfds")
  default = helpers.default_config()
  assert tiny.mode == default.mode == "pipeline" and tiny.data.name == default.data.name


# ----------------------------------------------------------------------------- bad input


def _run(name, paths, *extra, command=0):
  reh = rehearsal.REHEARSALS[name]
  argv = rehearsal.command_arguments(rehearsal.documented_commands(name)[command], paths)
  config, workdir = rehearsal.parse_command(
      argv + rehearsal.override_flags(reh.shrink) + list(extra))
  return stages.run(config, workdir)


def test_wrong_manual_files_and_empty_split_fail_in_one_line(rehearsed, tmp_path):
  import manual_data  # pylint: disable=g-import-not-at-top
  root = rehearsed[0]
  name = "celeba_hq_256_adm.py"
  paths = rehearsal.case_paths(root, name, rehearsal.REHEARSALS[name], "bad")
  paths.update(WORKDIR=str(tmp_path / "w"), MANUAL_DIR=str(tmp_path / "manual"))
  manual_data.write_celeb_a_hq_tar(paths["MANUAL_DIR"], 256, 4, size=128)
  t0 = time.time()
  with pytest.raises(stages.UserError, match=r"data256x256\.tar:data256x256/00000\.png is "
                     r"128x128, expected 256x256") as e:
    _run(name, paths, f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert "\n" not in str(e.value) and time.time() - t0 < 60
  # An empty split of the rehearsed (prepared) data set.
  good = rehearsal.case_paths(root, name, rehearsal.REHEARSALS[name], "w0")
  good["WORKDIR"] = str(tmp_path / "w2")
  with pytest.raises(stages.UserError, match=r"split 'train\[100%:\]' .* selects no examples"):
    _run(name, good, f"--config.data.data_dir={good['TFDS']}",
         "--config.data.train_split=train[100%:]")


def test_cli_shows_one_line_for_a_mask_of_the_wrong_shape(rehearsed, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = rehearsed[0]
  name = "celeba_hq_256_inpainting_adm.py"
  paths = rehearsal.case_paths(root, name, rehearsal.REHEARSALS[name], "w0")
  paths["MASK"] = str(tmp_path / "mask_8px.png")
  Image.fromarray(np.full((8, 8), 255, np.uint8)).save(paths["MASK"])
  command = [c for c in rehearsal.documented_commands(name) if "inpaint_mask" in c][0]
  argv = rehearsal.command_arguments(command, paths) + rehearsal.override_flags(
      rehearsal.REHEARSALS[name].shrink)
  r = subprocess.run([sys.executable, "-m", "lfm_jax.main", *argv], cwd=rehearsal.REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert "config.data.inpaint_mask" in errors[0] and "mask_8px.png is 8x8, expected 16x16" in (
      errors[0])
