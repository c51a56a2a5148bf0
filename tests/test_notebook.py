"""The Colab notebook runs top to bottom (nbclient, CPU): install from its own checkout, the
embedded default shrunk by the parameters cell, samples through lfm_jax.load, the metrics."""

import json
import pathlib
import shutil

import pytest

from helpers import REPO, cli_flags

NOTEBOOK = pathlib.Path(REPO) / "launch" / "colab_tpu_demo.ipynb"


def test_notebook_executes(digits_data_dir, reference_run, tmp_path):
  """On a copy of the session's reference run (the same shrunk config): the notebook's pipeline
  reuses the trained stages, as a rerun in Colab does, and samples, evaluates and exports."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  params = [c for c in nb.cells if c.cell_type == "code" and "LFM_JAX_SOURCE =" in c.source]
  assert len(params) == 1, "the notebook needs one parameters cell"
  workdir = tmp_path / "demo"
  shutil.copytree(reference_run["workdir"], workdir)
  shutil.rmtree(workdir / "export")  # written again by the notebook's run
  (workdir / "eval" / "metrics.json").unlink()
  flags = cli_flags(digits_data_dir)
  params[0].source = (f'LFM_JAX_SOURCE = ""\nWORKDIR = {str(workdir)!r}\n'
                      f"OVERRIDES = {json.dumps(flags)}\n")
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.get("output_type") == "stream")
  assert "lfm_jax from" in text and f"{REPO}/lfm_jax" in text  # the notebook's own checkout
  assert "[lfm_jax] stage 6/6: export" in text
  assert "samples (80, 8, 8, 1) float32" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images, "no sample grid was displayed"
  assert "fd_digits_classifier" in text and "logged training steps" in text
  assert (workdir / "export" / "lfm_jax_export.json").exists()
