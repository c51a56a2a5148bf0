"""The stability study's plumbing (benchmarks/stability_study.py --quick) and seam fine-tuning
(lfm_jax/seam_train.py), with real checks."""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, default_config

from lfm_jax import artifacts
from lfm_jax import optim
from lfm_jax import seam
from lfm_jax import seam_train
from lfm_jax import trainer

sys.path.insert(0, os.path.join(REPO, "benchmarks"))


# ------------------------------------------------------------------------------ the quick study


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, digits_data_dir, reference_run):
  """`--quick` in this process, reading the tiny reference pipeline's autoencoder and digits
  classifier (the same sizes as --quick's) instead of training its own, on 2 of the 8 devices
  (this machine's cores)."""
  import stability_study  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("stability_study")
  ref = reference_run["workdir"]
  argv = ["--quick", "--workdir", str(root / "wd"), "--out", str(root / "study"),
          "--docs", str(root / "docs"), "--data-dir", digits_data_dir,
          "--autoencoder", os.path.join(ref, "autoencoder", "diffusers"),
          "--classifier", os.path.join(ref, "eval", "digits_classifier_8x8x1.npz"),
          "--devices", "2"]
  results = stability_study.main(argv)
  return {"root": root, "argv": argv, "results": results, "module": stability_study}


def test_reports_and_plots_are_written(quick_study):
  r, root = quick_study["results"], quick_study["root"]
  md = (root / "study" / "stability_study.md").read_text()
  for title in ("## Data pruning", "## Capacity", "## Coarse-to-fine", "## Seam fine-tuning",
                "## Guidance interval", "## Gradient scores in bounded memory",
                "## Same-seed pairs"):
    assert title in md, title
  assert "Inception Score" in md and "n/a" in md  # offline: the digits classifier's features
  saved = json.loads((root / "study" / "stability_study.json").read_text())
  for section in ("subsets", "capacity", "c2f", "seam", "guidance", "memory", "timing"):
    assert section in saved, section
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in ("stability_quality_vs_ratio", "stability_coarse_to_fine",
               "stability_same_seed_pairs"):
    path = root / "docs" / f"{name}.png"
    assert path.exists() and 1_000 < path.stat().st_size < 200_000, path
    w, h = Image.open(path).size
    assert w > 100 and h > 40
    assert f"{name}.png" in md
  # Every metric of every evaluated cell is a number in its range.
  for row in r["subsets"]["rows"]:
    assert np.isfinite(row["fd"]) and row["fd"] >= 0
    assert 0.0 <= row["class_agreement"] <= 1.0
    assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0
    assert row["inception_score"] is None


def test_self_similarity_is_one_and_beats_the_shuffled_baseline(quick_study):
  e = quick_study["results"]["subsets"]["self"]
  assert e["same_seed"]["cosine"] == pytest.approx(1.0, abs=1e-5)
  assert e["same_seed"]["ssim"] == pytest.approx(1.0, abs=1e-5)
  assert e["same_seed"]["psnr"] == float("inf")
  assert e["same_seed"]["cosine"] > e["shuffled"]["cosine"]
  assert e["same_seed"]["ssim"] > e["shuffled"]["ssim"]
  assert e["num_pairs"] == quick_study["module"].quick_plan().num_samples


def test_subset_sizes_match_the_ratios(quick_study):
  r, root = quick_study["results"], quick_study["root"]
  plan = quick_study["module"].quick_plan()
  n = r["shared"]["num_train"]
  rows = [row for row in r["subsets"]["rows"] if row["method"] != "full"]
  assert {(row["method"], row["ratio"]) for row in rows} == {
      (m, q) for m in plan.methods for q in plan.ratios}
  for row in rows:
    assert row["kept"] == row["expected_kept"] == int(round(n * (1 - row["ratio"])))
    name = f"{row['method']}_r{row['ratio']:g}".replace(".", "p") + f"_s{row['seed']}"
    kept = np.load(root / "wd" / "models" / name / "checkpoints" / "kept_ids.npy")
    assert len(np.unique(kept)) == row["kept"]
    # Same seed, different data: more alike than unrelated images, less than identical.
    assert row["same_seed"]["cosine"] > row["shuffled"]["cosine"]
    assert row["same_seed"]["psnr"] < float("inf")
  summary = {(e["method"], e["ratio"]): e for e in r["subsets"]["summary"]}
  assert summary[("full", 0.0)]["kept"] == n


def test_coarse_to_fine_and_guidance_sections(quick_study):
  r = quick_study["results"]
  plan = quick_study["module"].quick_plan()
  assert [c["light_variant"] for c in r["c2f"]["lights"]] == list(plan.c2f_lights)
  c = r["c2f"]["lights"][0]
  assert c["flops_ratio_heavy_over_light"] > 2.0  # half width: ~4x fewer FLOPs
  assert [e["light_fraction"] for e in c["sweep"]] == list(plan.fractions)
  for e in c["sweep"]:
    assert e["n_light"] + e["n_heavy"] == plan.sample_steps
    assert e["n_light"] == round(plan.sample_steps * e["light_fraction"])
    assert e["nfe_light"] == e["n_light"] and e["nfe_heavy"] == e["n_heavy"]
    assert e["speedup"] > 0 and e["ms_c2f"] > 0
    assert 0 < e["same_seed"]["cosine"] <= 1.0
  assert set(c["goal"]) >= {"met", "best_speedup", "target_speedup"}
  seam_row = r["seam"]["rows"][0]
  assert seam_row["seam"]["weight"] == plan.seam_weight
  assert seam_row["before"]["fd"] == pytest.approx(c["sweep"][0]["fd"])
  rows = r["guidance"]["rows"]
  assert [row["interval"] for row in rows] == [None, [0.3, 1.0]]
  assert "same_seed" in rows[1] and 0 < rows[1]["same_seed"]["cosine"] <= 1.0
  mem = {e["chunk_size"]: e["temp_bytes"] for e in r["memory"]["records"]}
  assert mem[8] < mem[None]


def test_rerun_reuses_models_and_evaluations(quick_study):
  first = quick_study["results"]
  again = quick_study["module"].main(quick_study["argv"] + ["--sections", "subsets"])
  assert again["timing"]["models_trained"] == 0
  assert again["timing"]["evaluations"] == 0
  assert len(first["subsets"]["rows"]) == len(again["subsets"]["rows"])
  for a, b in zip(first["subsets"]["rows"], again["subsets"]["rows"]):
    assert a["fd"] == b["fd"] and a.get("same_seed") == b.get("same_seed")


def test_goal_check_picks_the_best_qualifying_fraction():
  import stability_study  # pylint: disable=g-import-not-at-top
  sim = lambda c: {"same_seed": {"cosine": c}}
  sweep = [{"light_fraction": 0.5, "speedup": 1.8, "fd": 1.0, **sim(0.97)},
           {"light_fraction": 0.7, "speedup": 2.6, "fd": 1.05, **sim(0.93)},
           {"light_fraction": 0.9, "speedup": 4.0, "fd": 1.3, **sim(0.80)}]
  g = stability_study.goal_check(sweep, fd_heavy=1.0)
  assert g["best_light_fraction"] == 0.7 and g["met"]
  g = stability_study.goal_check(sweep[:1] + sweep[2:], fd_heavy=1.0)
  assert g["best_light_fraction"] == 0.5 and not g["met"]


# ------------------------------------------------------------------------------ seam fine-tuning


class _TinyVelocity(nn.Module):
  """A small class-conditional MLP velocity (x, t, y) -> v on (h, w, c) latents."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, t, y=None, cond=None, train=False):
    b = x.shape[0]
    h = [x.reshape(b, -1), t[:, None]]
    if y is not None:
      h.append(nn.Embed(self.num_classes + 1, 8)(y))
    h = jnp.tanh(nn.Dense(64)(jnp.concatenate(h, -1)))
    return nn.Dense(int(np.prod(x.shape[1:])))(h).reshape(x.shape)


class _Batches:
  """Host batches {"latent", "label", "id"} over fixed arrays, with state()/restore()."""

  def __init__(self, z, labels, ids, batch_size, seed=0):
    self.z, self.labels, self.ids, self.bs, self.seed, self.i = z, labels, ids, batch_size, seed, 0

  def state(self):
    return {"batch": self.i}

  def restore(self, state):
    self.i = int(state["batch"])
    return self

  def __next__(self):
    rows = np.random.default_rng([self.seed, self.i]).choice(len(self.z), self.bs, replace=False)
    self.i += 1
    return {"latent": self.z[rows], "label": self.labels[rows], "id": self.ids[rows]}


def _tiny_config(**train):
  c = default_config()
  c.model.num_classes = 3
  c.train.batch_size = 32
  c.train.num_steps = 60
  c.train.learning_rate = 1e-2
  c.train.ema_decay = 0.0
  c.train.log_every = 20
  c.train.checkpoint_every = 60
  for k, v in train.items():
    c.train[k] = v
  return c


def _model(seed, shape=(2, 2, 2)):
  module = _TinyVelocity()
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape), jnp.zeros((1,)),
                       jnp.zeros((1,), jnp.int32))["params"]
  return artifacts.FlowModel(module, params, shape, 1.0, _tiny_config().model, f"tiny {seed}")


def _data(n=64, shape=(2, 2, 2)):
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (n,) + shape), np.float32)
  labels = (np.arange(n) % 3).astype(np.int32)
  ids = np.arange(n, dtype=np.int64) * 7 + 3  # not 0..n-1: targets are looked up by id
  return z, labels, ids


def test_seam_targets_are_the_heavy_models_points_and_velocities():
  heavy = _model(0)
  z, labels, _ = _data(20)
  t_switch = 0.4
  targets = seam_train.seam_targets(heavy, z, labels, t_switch, num_steps=5, batch_size=8)
  fn = lambda t, zz, y: heavy.module.apply({"params": heavy.params}, zz, t, y)
  z_s, info = seam.seam_points(fn, jnp.asarray(z), t_switch, num_steps=5,
                               labels=jnp.asarray(labels))
  assert int(info["nfe"]) == 5
  np.testing.assert_allclose(targets["z_switch"], z_s, atol=1e-5)
  t = jnp.full((20,), t_switch)
  np.testing.assert_allclose(targets["v_cond"], fn(t, z_s, jnp.asarray(labels)), atol=1e-5)
  np.testing.assert_allclose(targets["v_null"], fn(t, z_s, jnp.full((20,), 3, jnp.int32)),
                             atol=1e-5)
  assert np.abs(targets["v_cond"] - targets["v_null"]).max() > 1e-3


def test_seam_batches_align_targets_by_id_and_resume():
  z, labels, ids = _data(16)
  targets = {k: np.asarray(z) * (i + 2) for i, k in enumerate(seam_train.TARGET_KEYS)}
  data = seam_train.SeamBatches(_Batches(z, labels, ids, 8), ids[::-1].copy(),
                                {k: v[::-1].copy() for k, v in targets.items()})
  b = next(data)
  assert "id" not in b
  for i, k in enumerate(seam_train.TARGET_KEYS):
    np.testing.assert_array_equal(b[k], b["latent"] * (i + 2))
  state = data.state()
  nxt = next(data)
  data.restore(state)
  np.testing.assert_array_equal(next(data)["z_switch"], nxt["z_switch"])
  with pytest.raises(ValueError, match="without seam targets"):
    next(seam_train.SeamBatches(_Batches(z, labels, ids, 8), ids[:4], {
        k: v[:4] for k, v in targets.items()}))


def test_seam_step_targets_the_branch_the_light_model_sees():
  """Every label dropped: the seam term compares against v_null; none dropped: v_cond."""
  light = _model(1)
  z, labels, _ = _data(16)
  t_switch = 0.3
  null = np.full((16,), 3, np.int32)
  v_light = lambda y: np.asarray(light.module.apply(
      {"params": light.params}, jnp.asarray(z), jnp.full((16,), t_switch), jnp.asarray(y)))
  v_light_null = v_light(null)
  batch = {"latent": z, "label": labels, "z_switch": z, "v_null": np.asarray(v_light_null),
           "v_cond": np.asarray(v_light_null) + 10.0}
  losses = {}
  for p in (1.0, 0.0):
    c = _tiny_config()
    c.flow.class_dropout_prob = p
    tx, schedule = optim.create_optimizer(c.train)
    step = seam_train.make_seam_step(light.module, c, tx, schedule, t_switch=t_switch,
                                     weight=0.1)
    state = trainer.new_state(light.params, tx, jax.random.PRNGKey(0))
    _, metrics = jax.jit(step)(state, batch)
    losses[p] = float(metrics["seam_loss"])
    assert np.isfinite(float(metrics["fm_loss"])) and bool(metrics["finite"])
  assert losses[1.0] == pytest.approx(0.0, abs=1e-8)
  expected = 0.1 * np.mean(np.square(v_light(labels) - batch["v_cond"]))
  assert losses[0.0] == pytest.approx(expected, rel=1e-5) and expected > 5.0


def test_finetune_pulls_the_light_model_to_the_heavy_one_at_the_switch(tmp_path):
  heavy, light = _model(0), _model(1)
  z, labels, ids = _data(64)
  t_switch = 0.5
  targets = seam_train.seam_targets(heavy, z, labels, t_switch, num_steps=4)

  def seam_gap(model):
    fn = lambda t, zz, y: model.module.apply({"params": model.params}, zz, t, y)
    return float(seam.seam_loss(fn, lambda t, zz, y: jnp.asarray(targets["v_cond"]),
                                jnp.asarray(targets["z_switch"]), t_switch,
                                labels=jnp.asarray(labels), weight=1.0))

  c = _tiny_config()
  data = seam_train.SeamBatches(_Batches(z, labels, ids, 32), ids, targets)
  tuned = seam_train.finetune(c, tmp_path / "seam", light, data, t_switch=t_switch, weight=1.0)
  assert tuned.step == 60 and tuned.module is light.module
  before, after = seam_gap(light), seam_gap(tuned)
  print(f"seam gap before {before:.4f}, after {after:.4f}")
  assert after < 0.5 * before
  # Resuming the finished run trains nothing and returns the same params.
  again = seam_train.finetune(c, tmp_path / "seam", light,
                              seam_train.SeamBatches(_Batches(z, labels, ids, 32), ids, targets),
                              t_switch=t_switch, weight=1.0)
  assert seam_gap(again) == pytest.approx(after, rel=1e-6)
  with pytest.raises(ValueError, match="t_switch"):
    seam_train.finetune(c, tmp_path / "bad", light, data, t_switch=1.0)


def test_readme_headline_is_the_committed_study():
  """README's stability table carries the committed run's numbers (study/stability_study.json)."""
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REPO, "study", "stability_study.json")) as f:
    summary = {(r["method"], r["ratio"]): r for r in json.load(f)["subsets"]["summary"]}
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  names = {"loss": "loss", "gradient": "gradient", "cluster, proportional": "cluster_proportional",
           "cluster, balanced": "cluster_balanced", "random": "random", "k-center": "kcenter",
           "herding": "herding"}
  seen = 0
  for line in readme.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 5 or cells[0] not in names:
      continue
    method = names[cells[0]]
    for ratio, fd_cell, cos_cell in ((0.5, cells[1], cells[3]), (0.75, cells[2], cells[4])):
      row = summary[(method, ratio)]
      fd_mean, fd_std = (float(v) for v in re.findall(r"[\d.]+", fd_cell))
      assert fd_mean == pytest.approx(row["fd"][0], abs=0.006), (method, ratio)
      assert fd_std == pytest.approx(row["fd"][1], abs=0.006), (method, ratio)
      assert float(cos_cell) == pytest.approx(row["same_seed"]["cosine"][0], abs=6e-4)
    seen += 1
  assert seen == len(names)
