"""The command line and the stages: a tiny pipeline end to end, reuse, resume, bad inputs."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lfm_jax import artifacts
from lfm_jax import latents
from lfm_jax import main as main_lib
from lfm_jax import stages
from lfm_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(digits_data_dir):
  return digits_data_dir


@pytest.fixture(scope="module")
def pipeline_run(reference_run, tmp_path_factory):
  """A private copy of the reference run (conftest.py): `train` on a fresh workdir, then
  `pipeline`, `score`, `stability`; the tests here continue training and resample on it."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("pipeline") / "w")
  shutil.copytree(reference_run["workdir"], workdir)
  return (workdir, reference_run["results"]["pipeline"], reference_run["seconds"],
          reference_run["train_output"])


def test_train_on_a_fresh_workdir_runs_what_it_needs(pipeline_run):
  out = pipeline_run[3]
  assert "autoencoder: training 30 steps" in out
  assert "encode: encoding lfm_digits train" in out
  assert out.index("autoencoder: training") < out.index("encode:") < out.index("train: 20 steps")


def test_pipeline_writes_everything(pipeline_run):
  workdir, results, seconds, _ = pipeline_run
  print(f"tiny pipeline: {seconds:.1f} s")
  for path in ["config.json", "metrics.jsonl", "autoencoder/diffusers/config.json",
               "latents/manifest.json", "eval/metrics.json", "export/lfm_jax_export.json"]:
    assert os.path.exists(os.path.join(workdir, path)), path
  assert os.path.isfile(results["sample"]["grid"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == 20
  ev = results["evaluate"]
  assert ev["nfe"] == 8 and ev["sec_per_image"] > 0
  assert "fd_digits_classifier" in ev and "fid" not in ev  # labelled, never called FID
  assert 0.0 <= ev["class_agreement_digits_classifier"] <= 1.0
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("loss" in r for r in records) and any(r.get("stage") == "evaluate" for r in records)


def test_second_run_reuses_every_stage(pipeline_run, data_dir, capsys):
  workdir, _, first, _ = pipeline_run
  capsys.readouterr()
  t0 = time.time()
  stages.run(tiny_config(data_dir), workdir)
  second = time.time() - t0
  out = capsys.readouterr().out
  assert "autoencoder: reusing" in out
  assert "train: reusing the finished model" in out
  # A finished model needs no latents: nothing is encoded or trained again.
  assert "encode: encoding" not in out and "autoencoder: training" not in out
  assert "reusing the digits classifier" in out
  print(f"first run {first:.1f} s, second {second:.1f} s")
  assert second < first


def test_training_continues_from_last_checkpoint(pipeline_run, data_dir, capsys):
  workdir = pipeline_run[0]
  capsys.readouterr()
  stages.run(tiny_config(data_dir, mode="train", **{"train.num_steps": 30}), workdir)
  out = capsys.readouterr().out
  assert "resuming at step 20" in out
  assert workdir_lib.Workdir(workdir).latest_step() == 30


def test_sample_mode_with_coarse_to_fine_and_score_and_stability(pipeline_run, data_dir, tmp_path):
  workdir = pipeline_run[0]
  # A light model of another width, trained in its own workdir on the same autoencoder: it is
  # built from its own checkpoint's metadata. (score and stability ran in the reference run.)
  light = str(tmp_path / "light")
  light_kw = {"autoencoder.pretrained": os.path.join(workdir, "autoencoder", "diffusers"),
              "model.model_channels": 8, "train.num_steps": 10}
  stages.run(tiny_config(data_dir, mode="train", **light_kw), light)
  cfg = tiny_config(data_dir, mode="sample", **{"coarse_to_fine.light_workdir": light,
                                               "coarse_to_fine.light_fraction": 0.5})
  result = stages.run(cfg, workdir)
  assert result["nfe_light"] == 4 and result["nfe_heavy"] == 4
  with np.load(os.path.join(workdir, "scores", "scores_cluster.npz")) as z:
    assert len(z["ids"]) == 1437 and np.isfinite(z["scores"]).all()
  # The same model against itself: identical samples, far above the shuffled baseline.
  with open(os.path.join(workdir, "stability", "report.json")) as f:
    report = json.load(f)
  assert report["same_seed/cosine"] > 0.999 > report["shuffled/cosine"]
  assert os.path.isfile(os.path.join(workdir, "stability", "pairs.png"))


# --- bad inputs: each a one-line error before anything compiles ---


def test_invalid_value_names_the_key(tmp_path, data_dir):
  with pytest.raises(stages.UserError, match=r"config\.train\.batch_size"):
    stages.run(tiny_config(data_dir, **{"train.batch_size": -4}), str(tmp_path))
  with pytest.raises(stages.UserError, match=r"config\.sample\.solver"):
    stages.run(tiny_config(data_dir, **{"sample.solver": "rk45"}), str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "config.json"))  # nothing written


def test_unwritable_workdir(tmp_path, data_dir, monkeypatch):
  with pytest.raises(stages.UserError, match="cannot create workdir"):
    stages.run(tiny_config(data_dir), "/proc/lfm_jax_workdir")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(stages.UserError, match="cannot create workdir"):
    stages.run(tiny_config(data_dir), str(blocker / "sub"))
  from lfm_jax import storage  # pylint: disable=g-import-not-at-top

  def denied(path):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(storage, "_write_probe", denied)  # root ignores chmod: simulate it
  with pytest.raises(stages.UserError, match=f"workdir {tmp_path} is not writable: Permission"):
    stages.run(tiny_config(data_dir), str(tmp_path))


def test_missing_prerequisites(tmp_path, data_dir):
  for mode in ("sample", "evaluate", "export"):
    with pytest.raises(stages.UserError, match="run --mode=train first"):
      stages.run(tiny_config(data_dir, mode=mode), str(tmp_path))
  with pytest.raises(stages.UserError, match="config.stability.other_workdir"):
    stages.run(tiny_config(data_dir, mode="stability"), str(tmp_path))


def test_missing_data_set_offline_fails_fast(tmp_path):
  t0 = time.time()
  cfg = tiny_config(tmp_path / "empty_tfds", **{"data.name": "celeb_a_hq/256", "data.channels": 3})
  with pytest.raises(stages.UserError, match="celeb_a_hq"):
    stages.run(cfg, str(tmp_path / "w"))
  assert time.time() - t0 < 10


def test_weights_of_the_wrong_model(tmp_path, data_dir):
  from safetensors.numpy import save_file
  path = str(tmp_path / "not_a_vae.safetensors")
  save_file({"input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), np.float32)}, path)
  with pytest.raises(stages.UserError, match="autoencoder"):
    stages.run(tiny_config(data_dir, **{"autoencoder.pretrained": path}), str(tmp_path / "w"))


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "lfm_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
  cfg = os.path.join(REPO, "configs", "default.py")
  for extra, pattern in [
      ("--config.train.bogus=3", "unknown config key 'config.train.bogus'"),
      ("--config.train.batch_size=abc", "config.train.batch_size"),
      ("--config.train.ema_decay=1.5", "config.train.ema_decay"),
      # An optional (None by default) key set from the command line, pointing nowhere.
      ("--config.autoencoder.pretrained=/nonexistent/vae", "config.autoencoder.pretrained"),
  ]:
    r = _cli(f"--config={cfg}", f"--workdir={tmp_path}", extra)
    assert r.returncode != 0, (extra, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], (extra, r.stderr[-2000:])
    assert "Traceback" not in r.stderr


def test_parse_flags_rejects_unknown_key_inprocess(capsys):
  with pytest.raises(SystemExit) as e:
    main_lib.parse_flags(["prog", f"--config={REPO}/configs/default.py", "--workdir=/tmp/x",
                          "--config.model.nonexistent=1"])
  assert e.value.code == 2
  assert "config.model.nonexistent" in capsys.readouterr().err


def test_imported_pytorch_checkpoint_samples_and_fine_tunes(pipeline_run, data_dir, tmp_path):
  """model.init_from: a network exported to the guided-diffusion layout and imported back samples
  exactly like the original, and `train` fine-tunes from it."""
  from lfm_jax import weights
  workdir = pipeline_run[0]
  original = artifacts.load_flow_model(workdir)
  path = str(tmp_path / "model_0001.safetensors")
  weights.export_velocity_checkpoint(original.module, original.params, path)
  ae = os.path.join(workdir, "autoencoder", "diffusers")
  other = str(tmp_path / "imported")
  common = {"model.init_from": path, "autoencoder.pretrained": ae,
            "autoencoder.scale_factor": original.scale_factor}
  stages.run(tiny_config(data_dir, mode="sample"), workdir)
  imported = stages.run(tiny_config(data_dir, mode="sample", **common), other)
  ours = np.load(os.path.join(workdir, "samples", "samples_euler_g1.5.npz"))["images"]
  theirs = np.load(os.path.join(other, "samples", "samples_euler_g1.5.npz"))["images"]
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  assert imported["nfe"] == 8
  stages.run(tiny_config(data_dir, mode="train", **common, **{"train.num_steps": 10}), other)
  assert workdir_lib.Workdir(other).latest_step() == 10


def test_imported_edm_dhariwal_checkpoint_samples(pipeline_run, data_dir, tmp_path):
  """model.init_from with an EDM DhariwalUNet state dict: the network is built from its keys
  (EDM GroupNorm rule, up/down ResBlocks, zero null label) and samples with guidance."""
  import jax  # pylint: disable=g-import-not-at-top
  from lfm_jax import weights  # pylint: disable=g-import-not-at-top
  from lfm_jax.models.unet import UNet  # pylint: disable=g-import-not-at-top
  workdir = pipeline_run[0]
  module = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_semantics="resolution", num_head_channels=64, resblock_updown=True,
                mid_attention=False, num_classes=10, learn_null_class=False,
                norm_min_channels_per_group=4)
  x, t = np.zeros((1, 4, 4, 4), np.float32), np.zeros((1,), np.float32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t))["params"]
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(lambda s: 0.05 * rng.randn(*s.shape).astype(np.float32), shapes)
  path = str(tmp_path / "edm_adm.pt")
  weights.export_velocity_checkpoint(module, params, path, layout="edm_dhariwal", latent_size=4)
  scale = latents.LatentCache.open(os.path.join(workdir, "latents")).scale_factor
  other = str(tmp_path / "imported_edm")
  result = stages.run(tiny_config(data_dir, mode="sample", **{
      "model.init_from": path, "autoencoder.scale_factor": scale,
      "autoencoder.pretrained": os.path.join(workdir, "autoencoder", "diffusers")}), other)
  assert result["nfe"] == 8
  images = np.load(os.path.join(other, "samples", "samples_euler_g1.5.npz"))["images"]
  assert images.shape[0] == 20 and np.isfinite(images).all()
