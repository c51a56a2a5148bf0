"""Every mode on 2 processes x 4 CPU devices (jax.distributed, localhost coordinator) gives what
1 process x 8 devices gives (the session's reference run); preemption across processes; a
coordinator that cannot be reached fails fast with a clear message."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

import multihost
from conftest import REFERENCE_MODES, REFERENCE_OVERRIDES
from helpers import tree_max_abs_diff
from lfm_jax import artifacts
from lfm_jax import latents
from lfm_jax import weights
from lfm_jax import workdir as workdir_lib
from lfm_jax import writers


@pytest.fixture(scope="module")
def two_hosts(reference_run, digits_data_dir, tmp_path_factory):
  """`train` on a fresh workdir as 2 processes x 4 devices (it trains the autoencoder, encodes,
  trains the flow model): the training stages, compared with the reference run's."""
  workdir = str(tmp_path_factory.mktemp("two_hosts") / "w")
  t0 = time.time()
  logs = multihost.run_stages(workdir, REFERENCE_OVERRIDES, ["train"], data_dir=digits_data_dir,
                              processes=2, devices=4)
  print(f"2 processes x 4 devices, train: {time.time() - t0:.1f} s")
  assert all("ALL MODES DONE" in log for log in logs)
  return workdir, logs


@pytest.fixture(scope="module")
def two_hosts_inference(reference_run, digits_data_dir, tmp_path_factory):
  """The reference run's trained models, with every output the inference modes write removed,
  run through `encode`, `pipeline`, `score` and `stability` as 2 processes x 4 devices: the
  same artifacts in, so the outputs must be the reference's."""
  workdir = str(tmp_path_factory.mktemp("two_hosts_inference") / "w")
  shutil.copytree(reference_run["workdir"], workdir)
  for sub in ("latents", "samples", "scores", "stability", "export"):
    shutil.rmtree(os.path.join(workdir, sub))
  for f in os.listdir(os.path.join(workdir, "eval")):
    if not f.startswith("digits_classifier"):  # the trained classifier is an input, kept
      os.remove(os.path.join(workdir, "eval", f))
  t0 = time.time()
  modes = ("encode",) + REFERENCE_MODES[1:]
  logs = multihost.run_stages(workdir, REFERENCE_OVERRIDES, modes, data_dir=digits_data_dir, processes=2,
                              devices=4)
  print(f"2 processes x 4 devices, {modes}: {time.time() - t0:.1f} s")
  assert all("ALL MODES DONE" in log for log in logs)
  return workdir, logs


def test_only_process_0_reports(two_hosts):
  _, logs = two_hosts
  assert "[lfm_jax] train: step 20/20" in logs[0]
  assert "[lfm_jax]" not in logs[1]


def test_autoencoder_training_identical(reference_run, two_hosts):
  """mesh.deterministic_reduction averages gradients in shard order, so 2 x 4 devices train the
  autoencoder exactly as 1 x 8 do (XLA's all-reduce rounds differently per layout, and Adam
  turns the rounding of zero gradients, e.g. biases before a one-channel GroupNorm, into
  learning-rate-sized steps)."""
  ref, two = reference_run["workdir"], two_hosts[0]
  _, a = weights.load_autoencoder_kl(os.path.join(ref, "autoencoder", "diffusers"))
  _, b = weights.load_autoencoder_kl(os.path.join(two, "autoencoder", "diffusers"))
  diff = tree_max_abs_diff(a, b)
  print(f"autoencoder params, 1x8 vs 2x4: max |diff| = {diff:.3g}")
  assert diff <= 1e-6


def test_flow_training_identical(reference_run, two_hosts):
  """The same losses at every logged step, and params and EMA after 20 steps to 1e-6."""
  la = {r["step"]: r["loss"] for r in writers.read_jsonl(
      os.path.join(reference_run["workdir"], "metrics.jsonl")) if "loss" in r}
  lb = {r["step"]: r["loss"] for r in writers.read_jsonl(
      os.path.join(two_hosts[0], "metrics.jsonl")) if "loss" in r}
  print("flow losses 1x8 / 2x4:", {s: (la[s], lb.get(s)) for s in la})
  assert la.keys() == lb.keys() and all(abs(la[s] - lb[s]) <= 1e-6 * abs(la[s]) for s in la)
  for use_ema in (False, True):
    a = artifacts.load_flow_model(reference_run["workdir"], use_ema=use_ema)
    b = artifacts.load_flow_model(two_hosts[0], use_ema=use_ema)
    diff = tree_max_abs_diff(a.params, b.params)
    print(f"flow {'EMA' if use_ema else 'params'} after 20 steps, 1x8 vs 2x4: {diff:.3g}")
    assert diff <= 1e-6


def test_latent_cache_identical(reference_run, two_hosts_inference):
  ca = latents.LatentCache.open(os.path.join(reference_run["workdir"], "latents"))
  cb = latents.LatentCache.open(os.path.join(two_hosts_inference[0], "latents"))
  assert ca.num_examples == cb.num_examples == 1437 and ca.num_groups == cb.num_groups
  ra, rb = ca.read(), cb.read()
  np.testing.assert_array_equal(ra["id"], rb["id"])
  np.testing.assert_array_equal(ra["label"], rb["label"])
  for k in ("mean", "logvar"):
    print(f"latent cache {k}: max |diff| = {np.max(np.abs(ra[k] - rb[k])):.3g}")
    np.testing.assert_allclose(ra[k], rb[k], atol=1e-6, rtol=0)
  assert ca.manifest["latent_std"] == pytest.approx(cb.manifest["latent_std"], rel=1e-6)


def _npz(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def test_samples_identical(reference_run, two_hosts_inference):
  name = os.path.join("samples", "samples_euler_g1.5.npz")
  a = _npz(os.path.join(reference_run["workdir"], name))
  b = _npz(os.path.join(two_hosts_inference[0], name))
  diff = float(np.max(np.abs(a["images"] - b["images"])))
  print(f"sample images, 1x8 vs 2x4: max |diff| = {diff:.3g}")
  assert a["images"].shape == (20, 8, 8, 1) and diff <= 1e-6
  np.testing.assert_array_equal(a["labels"], b["labels"])


def test_evaluate_statistics_and_metrics_identical(reference_run, two_hosts_inference):
  ref, two = reference_run["workdir"], two_hosts_inference[0]
  a = _npz(os.path.join(ref, "eval", "generated_digits_classifier.npz"))
  b = _npz(os.path.join(two, "eval", "generated_digits_classifier.npz"))
  for k in ("mu", "sigma"):
    print(f"generated feature {k}: max |diff| = {np.max(np.abs(a[k] - b[k])):.3g}")
    np.testing.assert_allclose(a[k], b[k], atol=1e-10, rtol=0)
  refs = sorted(f for f in os.listdir(os.path.join(ref, "eval")) if f.startswith("reference_"))
  assert refs == sorted(f for f in os.listdir(os.path.join(two, "eval"))
                        if f.startswith("reference_"))
  for f in refs:
    np.testing.assert_allclose(_npz(os.path.join(ref, "eval", f))["features"],
                               _npz(os.path.join(two, "eval", f))["features"], atol=1e-10, rtol=0)
  with open(os.path.join(ref, "eval", "metrics.json")) as f:
    ma = json.load(f)
  with open(os.path.join(two, "eval", "metrics.json")) as f:
    mb = json.load(f)
  for k, v in ma.items():
    if k.startswith(("fd_", "precision_", "recall_", "kd_", "class_agreement")):
      assert mb[k] == pytest.approx(v, abs=1e-8), k


def test_score_and_stability_identical(reference_run, two_hosts_inference):
  ref, two = reference_run["workdir"], two_hosts_inference[0]
  a = _npz(os.path.join(ref, "scores", "scores_cluster.npz"))
  b = _npz(os.path.join(two, "scores", "scores_cluster.npz"))
  np.testing.assert_array_equal(a["ids"], b["ids"])
  np.testing.assert_array_equal(a["clusters"], b["clusters"])
  np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6, rtol=0)
  with open(os.path.join(ref, "stability", "report.json")) as f:
    ra = json.load(f)
  with open(os.path.join(two, "stability", "report.json")) as f:
    rb = json.load(f)
  for k, v in ra.items():
    if isinstance(v, float):
      assert rb[k] == pytest.approx(v, abs=1e-5), k


def test_sigterm_on_both_processes_resumes_bit_identically(two_hosts, digits_data_dir,
                                                           tmp_path):
  """SIGTERM both processes mid-training; the same command continues to the same params as the
  uninterrupted 2-process run."""
  two = two_hosts[0]
  workdir = str(tmp_path / "preempted")
  overrides = {**REFERENCE_OVERRIDES,  # the config of the uninterrupted run it is compared with
               "autoencoder.pretrained": os.path.join(two, "autoencoder", "diffusers"),
               "train.log_every": 2}
  procs, logs = multihost.launch(workdir, overrides, ["train"], data_dir=digits_data_dir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and any(r.get("step", 0) >= 4 for r in writers.read_jsonl(metrics)):
      break
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  texts = multihost.wait(procs, logs, timeout=300)
  stopped = workdir_lib.Workdir(workdir).latest_step()
  assert "stopped by signal" in texts[0], texts[0][-3000:]
  assert stopped is not None and 4 <= stopped < 20, stopped
  texts = multihost.run_stages(workdir, overrides, ["train"], data_dir=digits_data_dir)
  assert "resuming from" in texts[0] and f"(step {stopped})" in texts[0]
  for use_ema in (False, True):
    a = artifacts.load_flow_model(two, use_ema=use_ema)
    b = artifacts.load_flow_model(workdir, use_ema=use_ema)
    diff = tree_max_abs_diff(a.params, b.params)
    print(f"SIGTERM at step {stopped}, resumed: {'EMA' if use_ema else 'params'} diff {diff:.3g}")
    assert diff == 0.0


def test_unreachable_coordinator_fails_fast(digits_data_dir, tmp_path):
  """A process count that does not match the processes started (the coordinator waits for a
  process that never comes) fails within the timeout with a message, never hangs."""
  t0 = time.time()
  procs, logs = multihost.launch(str(tmp_path / "w"), {}, ["train"], data_dir=digits_data_dir,
                                 processes=1, devices=4, num_processes_claimed=2,
                                 env={"LFM_JAX_DISTRIBUTED_TIMEOUT": "10",
                                      "JAX_COORDINATOR_ADDRESS":
                                      f"127.0.0.1:{multihost.free_port()}",
                                      "JAX_PROCESS_ID": "1"})
  with pytest.raises(AssertionError) as err:
    multihost.wait(procs, logs, timeout=120)
  elapsed = time.time() - t0
  text = str(err.value)
  print(f"failed after {elapsed:.1f} s: {[l for l in text.splitlines() if 'error' in l][:1]}")
  assert elapsed < 60
  assert "error: jax.distributed could not start within 10 s" in text
  assert "Traceback" not in text
