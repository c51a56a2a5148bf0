"""Transparent huge pages for the host memory XLA:CPU allocates (Linux, glibc).

XLA:CPU allocates each execution's temporary buffer afresh, as one block (BENCH-D's train step:
3.1 GB per step, BENCH-U's: 250 MB), and glibc returns such a block to the kernel when the step
ends. The next step faults it in again, 4 KB at a time, each page zeroed by the kernel: BENCH-D
spends about 2.8 s of system time per step on 780k page faults. With glibc's malloc asked to use
transparent huge pages (the tunable `glibc.malloc.hugetlb=1`, glibc >= 2.35, for kernels whose
THP mode is `madvise`) the same block is faulted in 2 MB at a time: about 1,900 faults and
0.4 s. benchmarks/README.md has the measurements.

glibc reads its tunables only when a process starts, so `exec_with_huge_pages()` re-executes
the current command once with $GLIBC_TUNABLES extended (same pid, arguments and environment
otherwise). The command line (`python -m lfm_jax.main`, `lfm-jax`) and the benchmark scripts
call it first thing; Python API users who want the same can start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. $LFM_JAX_HUGE_PAGES=0 turns it off. Nothing here
imports jax.
"""

import os
import platform
import sys
from typing import Optional, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_BEFORE = "LFM_JAX_GLIBC_TUNABLES_BEFORE"  # what $GLIBC_TUNABLES was before the re-execution


def _thp_mode() -> Optional[str]:
  """The kernel's THP mode ("always", "madvise" or "never"), None where unknown."""
  try:
    with open(_THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  for word in text.split():
    if word.startswith("[") and word.endswith("]"):
      return word[1:-1]
  return None


def _glibc_supports_hugetlb() -> bool:
  name, version = platform.libc_ver()
  if name != "glibc":
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def wanted(environ=None) -> bool:
  """True where re-executing with the tunable would change something: Linux with glibc >= 2.35,
  THP in `madvise` mode, the tunable not yet set, and $LFM_JAX_HUGE_PAGES not 0."""
  env = os.environ if environ is None else environ
  if env.get("LFM_JAX_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return False  # already set (by us or by the user): keep it as it is
  if not sys.platform.startswith("linux") or not _glibc_supports_hugetlb():
    return False
  return _thp_mode() == "madvise"


def active(environ=None) -> bool:
  """Whether this process runs with huge pages for large mallocs (the tunable set at its start,
  or THP mode `always`)."""
  env = os.environ if environ is None else environ
  return TUNABLE in env.get("GLIBC_TUNABLES", "") or _thp_mode() == "always"


def exec_with_huge_pages(argv: Optional[Sequence[str]] = None) -> None:
  """Re-executes this process with $GLIBC_TUNABLES += glibc.malloc.hugetlb=1 when `wanted()`;
  returns without doing anything otherwise. `argv` defaults to the original command line
  (`sys.orig_argv`, so `python -m pkg.mod ...` is repeated as given)."""
  if not wanted():
    return
  args = list(argv if argv is not None else sys.orig_argv)
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
  env[_BEFORE] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, args, env)
  except OSError as e:  # not fatal: run on without huge pages
    print(f"lfm_jax: could not re-execute with {TUNABLE} ({e}); continuing without",
          file=sys.stderr)


def environ_before(environ=None) -> dict:
  """The environment as it was before `exec_with_huge_pages` re-executed this process (for
  child processes that should run with the defaults, e.g. a reference implementation)."""
  env = dict(os.environ if environ is None else environ)
  if _BEFORE in env:
    before = env.pop(_BEFORE)
    if before:
      env["GLIBC_TUNABLES"] = before
    else:
      env.pop("GLIBC_TUNABLES", None)
  return env
