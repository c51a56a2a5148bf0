"""A gs:// workdir end to end against the local GCS emulator (tests/gcs_emulator.py): the embedded
default, shrunk, runs `pipeline` on gs://, is killed during training, resumes from the gs://
checkpoint and finishes; bad buckets and objects give one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

from etils import epath

from helpers import REPO, cli_flags


def _cli(workdir, data_dir, *extra, **overrides):
  return [sys.executable, "-m", "lfm_jax.main", f"--config={REPO}/configs/default.py",
          f"--workdir={workdir}", *cli_flags(data_dir, **overrides), *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _records(path):
  try:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
  except (FileNotFoundError, OSError, ValueError):
    return []


def test_pipeline_on_gs_killed_and_resumed(gcs_bucket, digits_data_dir):
  workdir = epath.Path(gcs_bucket) / "pipeline"
  overrides = {"train.num_steps": 60, "train.log_every": 5, "train.checkpoint_every": 10}
  cmd = _cli(str(workdir), digits_data_dir, **overrides)
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline, killed_at = time.time() + 900, None
  try:
    while time.time() < deadline and proc.poll() is None:
      steps = [r["step"] for r in _records(metrics) if "loss" in r]
      if steps and max(steps) >= 25:
        killed_at = max(steps)
        proc.send_signal(signal.SIGKILL)  # no chance to save: resume from the last gs:// save
        break
      time.sleep(0.5)
  finally:
    out = proc.communicate(timeout=120)[0] if proc.poll() is None or True else ""
  assert killed_at is not None, f"training ended before it could be killed:\n{out[-3000:]}"
  assert (workdir / "latents" / "manifest.json").exists()
  r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  resumed = [l for l in r.stdout.splitlines() if "train: resuming from gs://" in l]
  assert resumed, r.stdout[-3000:]
  step = int(resumed[0].split("(step ")[1].rstrip(")"))
  print(f"killed after step {killed_at}; resumed from the gs:// checkpoint of step {step}")
  # Saves are asynchronous: the newest one may still be in flight when the process is killed.
  assert 10 <= step <= killed_at and step % 10 == 0
  assert "autoencoder: reusing" in r.stdout and "latents: reusing the cache" in r.stdout
  for rel in ("config.json", "autoencoder/diffusers/config.json", "checkpoints/60",
              "samples/samples_euler_g1.5.png", "samples/samples_euler_g1.5.npz",
              "eval/metrics.json", "export/lfm_jax_export.json", "export/velocity.safetensors"):
    assert (workdir / rel).exists(), rel
  assert any(p.name.startswith("events.out.tfevents") for p in workdir.iterdir())
  losses = {rec["step"] for rec in _records(metrics) if "loss" in rec}
  assert {55, 60} <= losses
  ev = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert ev["num_samples"] == 48 and "fd_digits_classifier" in ev


def test_bad_gs_paths_are_one_line_errors(gcs_bucket, digits_data_dir, tmp_path):
  cases = [
      ([], "gs://no-such-bucket-lfm/run", "workdir gs://no-such-bucket-lfm/run is not writable"),
      (["--config.autoencoder.pretrained=" + gcs_bucket + "/nothing/here"],
       f"{gcs_bucket}/bad_pretrained",
       f"config.autoencoder.pretrained: {gcs_bucket}/nothing/here does not exist"),
  ]
  for extra, workdir, message in cases:
    t0 = time.time()
    r = subprocess.run(_cli(workdir, digits_data_dir, *extra), env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert message in errors[0], errors
    assert "Traceback" not in r.stderr
    print(f"{message!r}: {time.time() - t0:.1f} s")
