"""Smoke test of benchmarks/*.py: each script's --quick run prints valid JSON lines.

The scripts run in-process (their main(argv)), on the 8 simulated CPU devices of conftest.py,
with tiny models and 1-2 timed iterations; figures are not checked, only the records' shape.
"""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name):
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _records(capsys):
  out = capsys.readouterr().out
  lines = [l for l in out.splitlines() if l.strip()]
  assert lines, "no output"
  recs = [json.loads(l) for l in lines]  # every stdout line must be one JSON object
  assert all(isinstance(r, dict) and "kind" in r for r in recs)
  return recs


def test_train_step_quick(capsys):
  _load("train_step").main(["--quick", "--bench", "D"])
  recs = _records(capsys)
  peak = [r for r in recs if r["kind"] == "matmul_peak"]
  steps = [r for r in recs if r["kind"] == "train_step"]
  assert len(peak) == 1 and peak[0]["flops_per_s"] > 0
  assert len(steps) == 1
  r = steps[0]
  for key in ("ms_per_step", "images_per_s", "compile_s", "flops_model", "flops_xla",
              "fraction_of_matmul_peak", "compilations_total", "jit_cache_size"):
    assert key in r, key
  assert r["flops_model"] > 0 and r["ms_per_step"] > 0
  assert r["compilations_total"] == 1 and not r["recompiled_after_first_step"]


def test_sampling_quick(capsys):
  _load("sampling").main(["--quick", "--dopri5-tol", "1e-2", "--heun-steps", ""])
  recs = _records(capsys)
  runs = [r for r in recs if r["kind"] == "sampling"]
  assert any(r["kind"] == "decode" for r in recs)
  assert {r["solver"] for r in runs} == {"euler", "dopri5"}
  assert {r["decoder"] for r in runs} == {False, True}
  for r in runs:
    assert r["nfe"] >= 1 and r["ms_per_batch"] > 0 and r["finite"]
  assert [r["nfe"] for r in runs if r["solver"] == "euler"] == [4, 4]


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_coarse_to_fine_quick(capsys, family):
  _load("coarse_to_fine").main(["--quick", "--family", family])
  recs = _records(capsys)
  summary = [r for r in recs if r["kind"] == "coarse_to_fine_summary"]
  assert len(summary) == 1
  s = summary[0]
  assert s["nfe_light"] + s["nfe_heavy"] == 10 and s["nfe_light"] == 7
  assert -1.0 <= s["cosine_mean"] <= 1.0 and s["speedup"] > 0
  assert s["flops_ratio_light_over_heavy"] < 0.5
  assert s["family"] == family and s["heavy"] != s["light"]


def test_scaling_quick(capsys):
  _load("scaling").main(["--quick", "--bench", "D", "--devices", "1,2", "--in-process",
                         "--loss-rtol", "1e-4"])
  recs = [r for r in _records(capsys) if r["kind"] == "scaling"]
  assert [r["mesh_devices"] for r in recs] == [1, 2]
  assert all("error" not in r for r in recs)
  assert all(r["loss_matches_1_device"] for r in recs)


def test_kernel_bound_quick_counts_the_step_flops(capsys):
  _load("train_step").main(["--quick", "--bench", "U"])
  step = [r for r in _records(capsys) if r["kind"] == "train_step"][0]
  _load("kernel_bound").main(["--quick", "--bench", "U", "--top", "3"])
  recs = _records(capsys)
  ops = [r for r in recs if r["kind"] == "kernel_op"]
  bound = [r for r in recs if r["kind"] == "kernel_bound"]
  assert len(ops) == 3 and len(bound) == 1
  b = bound[0]
  # Every conv / dot of the step is timed once per occurrence: the same FLOPs as train_step's.
  assert b["flops_model"] == step["flops_model"]
  assert b["ms_kernels"] > 0 and b["ms_kernels"] >= max(r["ms_total"] for r in ops)
  assert abs(b["ms_convolutions"] + b["ms_matmuls"] - b["ms_kernels"]) < 1e-2


def test_memory_quick_fsdp_shards_the_state_and_remat_lowers_temp(capsys):
  _load("memory").main(["--quick"])
  recs = [r for r in _records(capsys) if r["kind"] == "memory"]
  assert [(r["fsdp"], r["remat"]) for r in recs] == [(1, "none"), (8, "none"), (8, "blocks")]
  ref, sharded, remat = recs
  for r in recs:
    assert r["devices"] == 8 and r["batch_per_device"] * 8 == r["global_batch"]
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                - r["alias_bytes"])
    # Arguments are the state's shards and the batch's; the donated state is reused whole.
    assert r["argument_bytes"] == r["state_bytes_per_device"] + r["batch_bytes_per_device"]
    assert r["alias_bytes"] == r["state_bytes_per_device"]
  # Four float32 copies of the params (params, EMA, Adam mu and nu) plus a few scalars.
  assert 4 * ref["params_bytes_per_device"] <= ref["state_bytes_per_device"] < (
      4 * ref["params_bytes_per_device"] + 1024)
  # fsdp 8: 1/8 of the state per device, plus the small leaves kept whole (biases, norms).
  ratio = sharded["state_bytes_per_device"] / ref["state_bytes_per_device"]
  assert 1 / 8 <= ratio < 1.25 / 8, ratio
  assert sharded["argument_bytes"] < ref["argument_bytes"] / 6
  # Rematerialised blocks: same state, far fewer activation bytes kept for the backward pass.
  assert remat["argument_bytes"] == sharded["argument_bytes"]
  assert remat["temp_bytes"] < 0.7 * sharded["temp_bytes"], (remat["temp_bytes"],
                                                            sharded["temp_bytes"])


def test_accelerator_budget_guard_skips_every_section(capsys):
  _load("accelerator").main(["--quick", "--budget-s", "0"])
  recs = _records(capsys)
  assert recs[0]["kind"] == "environment" and recs[-1]["kind"] == "done"
  skipped = [r for r in recs if r["kind"] == "skipped"]
  assert [r["section"] for r in skipped] == list(recs[0]["sections"])
  assert len(skipped) == 7 and all(r["reason"] == "time budget" for r in skipped)
  assert len(recs) == len(skipped) + 2


def test_accelerator_quick_runs_without_tensorflow():
  """--quick in a fresh interpreter where tensorflow, tensorflow_datasets and clu cannot be
  imported: every section runs (no "error" line) and prints its records."""
  import subprocess  # pylint: disable=g-import-not-at-top
  script = os.path.join(BENCH, "accelerator.py")
  code = (
      "import sys, runpy\n"
      "for m in ('tensorflow', 'tensorflow_datasets', 'clu'):\n"
      "  sys.modules[m] = None\n"
      f"sys.argv = [{script!r}, '--quick', '--peak-tflops', '1']\n"
      f"runpy.run_path({script!r}, run_name='__main__')\n"
      "blocked = ('tensorflow', 'tensorflow_datasets', 'clu')\n"
      "loaded = sorted(k for k, v in sys.modules.items()\n"
      "                if k.split('.')[0] in blocked and v is not None)\n"
      "assert not loaded, loaded\n")
  # LLVM's optimisation level only changes how fast the CPU code runs: level 0 halves the
  # compile time of this smoke run.
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_backend_optimization_level=0").strip())
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  recs = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
  kinds = [r["kind"] for r in recs]
  assert "error" not in kinds and "skipped" not in kinds, [r for r in recs if r["kind"] in
                                                           ("error", "skipped")]
  env_rec = recs[0]
  assert env_rec["kind"] == "environment" and env_rec["peak_tflops"] == 1.0
  assert env_rec["peak_source"] == "--peak-tflops" and kinds[-1] == "done"
  assert [r for r in recs if r["kind"] == "matmul"][0]["tflops"] > 0
  steps = {r["section"]: r for r in recs if r["kind"] == "train_step"}
  assert sorted(steps) == ["train_adm", "train_dit_b2", "train_dit_xl2"]
  for r in steps.values():
    assert r["finite"] and r["images_per_s"] > 0 and r["flops_model"] > 0
    assert r["flops_xla"] > 0 and r["compute_dtype"] == "bfloat16"
    # MFU is the model FLOP rate over the given peak (1 TFLOP/s here).
    assert abs(r["mfu"] - r["model_tflops"] / 1.0) <= 1e-3 * max(1.0, r["model_tflops"])
    assert r["memory"]["total_bytes"] > 0
  assert steps["train_dit_xl2"]["remat"] == "blocks"
  runs = {r["solver"]: r for r in recs if r["kind"] == "sampling"}
  assert runs["euler"]["nfe"] == 4 and runs["dopri5"]["nfe"] >= 7
  assert all(r["finite"] and r["images_per_s"] > 0 for r in runs.values())
  summary = [r for r in recs if r["kind"] == "coarse_to_fine_summary"][0]
  assert (summary["nfe_light"], summary["nfe_heavy"]) == (7, 3)
  assert summary["flops_ratio_light_over_heavy"] < 1 and summary["speedup"] > 0


def test_common_device_random_params_and_peaks():
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  import _common as C  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def init(rng):
    del rng
    return {"dense": {"kernel": jnp.zeros((256, 512)), "bias": jnp.zeros((512,))},
            "norm": {"scale": jnp.zeros((512,))}}

  for fn in (C.random_params, C.device_random_params):
    p = fn(init, 3)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), p) == jax.tree.map(
        lambda x: (x.shape, x.dtype), jax.eval_shape(init, jax.random.PRNGKey(0)))
    k = np.asarray(p["dense"]["kernel"])
    assert abs(k.mean()) < 3e-3 and abs(k.std() * np.sqrt(256) - 1.0) < 0.02  # N(0, 1/fan_in)
    assert abs(np.asarray(p["dense"]["bias"]).std() / 0.02 - 1.0) < 0.15
    assert np.all(np.asarray(p["norm"]["scale"]) == 1.0)
  # Two seeds give different draws; one seed the same draw.
  a, b = C.device_random_params(init, 0), C.device_random_params(init, 1)
  assert not np.allclose(a["dense"]["kernel"], b["dense"]["kernel"])
  again = C.device_random_params(init, 0)
  np.testing.assert_array_equal(a["dense"]["kernel"], again["dense"]["kernel"])
  assert C.known_peak_tflops("NVIDIA H200") == 790.0
  assert C.known_peak_tflops("NVIDIA H100 80GB HBM3") == 790.0
  assert C.known_peak_tflops("NVIDIA H100 PCIe") is None and C.known_peak_tflops("cpu") is None
  total, per_device = C.tree_bytes({"a": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
  assert total == per_device == 128


def test_peer_torch_has_our_parameter_count():
  """BENCH-U's PyTorch peer (LFM's guided-diffusion U-Net) is our BENCH-U: 6,950,340 params."""
  pytest.importorskip("torch")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lfm_jax import models  # pylint: disable=g-import-not-at-top
  peer, ours = _load("peer_torch"), _load("train_step")
  model, _, shape_chw, batch = peer.build("U")
  theirs = sum(p.numel() for p in model.parameters())
  config, shape, our_batch = ours.bench_config("U")
  net = models.create_model(config.model, shape)
  abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), np.zeros((1,) + shape, np.float32),
                                             np.zeros((1,), np.float32), train=False))
  mine = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
  assert theirs == mine == 6_950_340
  assert tuple(shape_chw) == (shape[2], shape[0], shape[1]) and batch == our_batch


def test_conv_algorithms_winograd_equals_lax_convolution(capsys):
  """conv_algorithms.py --quick: Winograd F(2,3) and F(4,3), forward and both gradients, equal
  lax's 3x3 convolution (float32 rounding), and every algorithm is timed."""
  _load("conv_algorithms").main(["--quick"])
  recs = {r["algorithm"]: r for r in _records(capsys) if r["kind"] == "conv_algorithm"}
  assert set(recs) == {"lax", "f23", "f43"}
  assert recs["lax"]["max_rel_error"] == 0.0
  assert recs["f23"]["max_rel_error"] < 1e-5 and recs["f43"]["max_rel_error"] < 1e-4
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in recs.values())


def test_peer_torch_profile_splits_the_step_by_kind(capsys):
  """peer_torch.py --profile: torch's self CPU time per step by kind (convolutions, matmuls, the
  rest; shares sum to 1) and its slowest ops."""
  pytest.importorskip("torch")
  _load("peer_torch").main(["--quick", "--bench", "U", "--profile", "--iters", "1",
                            "--warmup", "1", "--top", "3"])
  recs = _records(capsys)
  cats = {r["category"]: r for r in recs if r["kind"] == "peer_profile_category"}
  assert set(cats) == {"convolution", "matmul", "other"}
  assert sum(r["share"] for r in cats.values()) == pytest.approx(1.0, abs=1e-3)
  assert cats["convolution"]["self_cpu_ms_per_step"] > 0  # a U-Net's step convolves
  ops = [r for r in recs if r["kind"] == "peer_profile_op"]
  assert len(ops) == 3 and ops[0]["self_cpu_ms_per_step"] >= ops[-1]["self_cpu_ms_per_step"]


def test_compare_torch_quick(capsys):
  """--compare-torch: ours and the PyTorch worker alternate; one record per bench and op."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  _load("train_step").main(["--quick", "--compare-torch", "--bench", "U,D", "--sampling"])
  recs = [r for r in _records(capsys) if r["kind"] == "compare_torch"]
  assert sorted((r["bench"], r["op"]) for r in recs) == sorted(
      (b, op) for b in "UD" for op in ("train_step", "forward", "euler"))
  for r in recs:
    assert r["ours_ms"] > 0 and r["torch_ms"] > 0
    assert r["ratio"] == pytest.approx(r["ours_ms"] / r["torch_ms"], rel=1e-2, abs=1e-3)
    assert len(r["ratio_per_round"]) == r["rounds"] == 2
