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
