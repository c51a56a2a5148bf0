"""lfm_jax.huge_pages: the one re-execution with glibc's huge-page tunable."""

import os
import subprocess
import sys

import pytest

from lfm_jax import huge_pages

_SNIPPET = """
import os, sys
print("start", os.getpid(), flush=True)
from lfm_jax import huge_pages
huge_pages.exec_with_huge_pages()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), os.environ.get("KEEP"),
      huge_pages.environ_before().get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _run(env_extra, drop=("GLIBC_TUNABLES", "LFM_JAX_HUGE_PAGES")):
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", _SNIPPET, "a", "--b=1"], env=env, text=True,
                       capture_output=True, check=True, timeout=120).stdout
  return [line.split(" ", 1) for line in out.strip().splitlines()]


def test_wanted_follows_the_kernel_mode_the_opt_out_and_an_existing_tunable(monkeypatch):
  monkeypatch.setattr(huge_pages, "_glibc_supports_hugetlb", lambda: True)
  monkeypatch.setattr(huge_pages.sys, "platform", "linux")
  for mode, expected in (("madvise", True), ("always", False), ("never", False), (None, False)):
    monkeypatch.setattr(huge_pages, "_thp_mode", lambda mode=mode: mode)
    assert huge_pages.wanted({}) is expected, mode
  monkeypatch.setattr(huge_pages, "_thp_mode", lambda: "madvise")
  assert not huge_pages.wanted({"LFM_JAX_HUGE_PAGES": "0"})
  assert not huge_pages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice
  assert huge_pages.wanted({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"})
  monkeypatch.setattr(huge_pages, "_glibc_supports_hugetlb", lambda: False)
  assert not huge_pages.wanted({})


def test_reexecutes_once_in_the_same_process_keeping_arguments_and_environment():
  if not huge_pages.wanted({}):
    pytest.skip("this machine's kernel or libc gives no huge pages through the tunable")
  lines = _run({"KEEP": "yes"})
  assert [tag for tag, _ in lines] == ["start", "start", "after"]  # exactly one re-execution
  pids = {rest.split()[0] for _, rest in lines}
  assert len(pids) == 1  # exec, not a child process
  after = lines[-1][1].split(" ", 4)
  assert after[1:4] == ["glibc.malloc.hugetlb=1", "yes", "None"]
  assert after[4] == "['a', '--b=1']"


def test_a_users_tunables_are_kept_and_the_opt_out_runs_unchanged():
  if not huge_pages.wanted({}):
    pytest.skip("this machine's kernel or libc gives no huge pages through the tunable")
  lines = _run({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=8"})
  after = lines[-1][1].split(" ", 4)
  assert after[1] == "glibc.malloc.tcache_count=8:glibc.malloc.hugetlb=1"
  assert after[3] == "glibc.malloc.tcache_count=8"  # what a child process gets back
  lines = _run({"LFM_JAX_HUGE_PAGES": "0"})
  assert [tag for tag, _ in lines] == ["start", "after"]
  assert lines[-1][1].split(" ")[1] == "None"
