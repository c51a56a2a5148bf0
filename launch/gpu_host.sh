#!/usr/bin/env bash
# Train / sample / evaluate lfm_jax on one GPU host (all its GPUs, one process).
#
# JAX sees every local GPU; lfm_jax shards the batch over them on a `data` mesh axis, so no
# launcher (torchrun, accelerate) is needed. Checkpoints go to WORKDIR/checkpoints (orbax): running
# the same `run` command again resumes from the latest one (after a crash, a reboot or a
# preempted cloud VM).
#
# Usage (from anywhere; the script finds the checkout it lives in):
#   launch/gpu_host.sh setup                         # venv + jax[cuda12] + lfm_jax (editable)
#   launch/gpu_host.sh run CONFIG WORKDIR [FLAGS]    # foreground run, log tee'd to WORKDIR
#   launch/gpu_host.sh start CONFIG WORKDIR [FLAGS]  # same, detached (nohup); prints the pid
#   launch/gpu_host.sh logs WORKDIR                  # follow the detached run's log
#   launch/gpu_host.sh check                         # print the devices JAX sees
#
# Examples:
#   launch/gpu_host.sh setup
#   launch/gpu_host.sh run configs/default.py runs/demo              # the embedded default
#   launch/gpu_host.sh start configs/ffhq_256_dit_l2.py runs/ffhq_dit \
#       --config.data.manual_dir=/data/ffhq \
#       --config.autoencoder.pretrained=/data/pretrained/sd-vae-ft-mse
#   CUDA_VISIBLE_DEVICES=0,1 launch/gpu_host.sh run configs/stability_prune.py:cluster,0.5 runs/p50
#
# Batch sizes in configs are global: a config written for 8 GPUs runs on fewer with the same
# optimisation if memory allows; otherwise set --config.train.grad_accum_steps=K (same global
# batch) or lower --config.train.batch_size (a different run).
# Several hosts: start one process per host with the same command and a shared (e.g. gs://)
# WORKDIR. jax.distributed picks up SLURM's or Open MPI's environment (`srun launch/gpu_host.sh
# run ...`), or set on every host JAX_COORDINATOR_ADDRESS=<host 0>:<port>, JAX_NUM_PROCESSES=<N>
# and JAX_PROCESS_ID=<0..N-1>. A host that cannot reach the coordinator, or a process count that
# does not match, fails within LFM_JAX_DISTRIBUTED_TIMEOUT seconds [60] with a message.
#
# Environment (defaults in brackets):
#   VENV [<checkout>/.venv; set VENV=none to use the current Python]  PYTHON [python3]
#   JAX_GPU_SPEC [jax[cuda12]]
#   XLA_PYTHON_CLIENT_MEM_FRACTION [0.9]  (share of each GPU's memory JAX preallocates)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
JAX_GPU_SPEC="${JAX_GPU_SPEC:-jax[cuda12]}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

die() { echo "gpu_host.sh: $*" >&2; exit 1; }
log() { echo "[gpu_host.sh $(date -u +%H:%M:%S)] $*" >&2; }

activate() {
  if [[ "$VENV" != "none" ]]; then
    [[ -f "$VENV/bin/activate" ]] || die "no virtualenv at $VENV; run: launch/gpu_host.sh setup"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    PYTHON=python
  fi
}

cmd_setup() {
  if [[ "$VENV" != "none" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  activate
  "$PYTHON" -m pip install -q -U pip
  "$PYTHON" -m pip install -q -U "$JAX_GPU_SPEC"
  "$PYTHON" -m pip install -q -e "$ROOT"
  cmd_check
}

cmd_check() {
  "$PYTHON" -c 'import jax; print("backend:", jax.default_backend()); print(jax.devices())'
}

# Local log file of a run: inside a local workdir, under <checkout>/logs for a gs:// one.
log_file() {
  if [[ "$1" == gs://* ]]; then
    mkdir -p "$ROOT/logs"
    echo "$ROOT/logs/$(basename "$1").log"
  else
    mkdir -p "$1"
    echo "$(cd "$1" && pwd)/run.log"
  fi
}

# Runs lfm_jax.main from the checkout root (configs/ paths are relative to it).
cmd_run() {
  [[ $# -ge 2 ]] || die "usage: run CONFIG WORKDIR [FLAGS...]"
  local config="$1" workdir="$2" logfile
  shift 2
  logfile="$(log_file "$workdir")"
  if [[ "$workdir" != gs://* ]]; then
    workdir="$(cd "$workdir" && pwd)"  # absolute: the program runs from the checkout root
  fi
  cd "$ROOT"
  log "python -m lfm_jax.main --config=$config --workdir=$workdir $* (log: $logfile)"
  "$PYTHON" -m lfm_jax.main --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$logfile"
}

cmd_start() {
  [[ $# -ge 2 ]] || die "usage: start CONFIG WORKDIR [FLAGS...]"
  local logfile
  logfile="$(log_file "$2")"
  nohup "${BASH_SOURCE[0]}" run "$@" > /dev/null 2>&1 < /dev/null &
  echo "$!" > "${logfile%.log}.pid"
  log "started pid $! (follow with: launch/gpu_host.sh logs $2)"
}

cmd_logs() {
  [[ $# -eq 1 ]] || die "usage: logs WORKDIR"
  tail -n 100 -F "$(log_file "$1")"
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

main() {
  [[ $# -ge 1 ]] || { usage; exit 1; }
  local cmd="$1"
  shift
  case "$cmd" in
    setup) cmd_setup ;;
    check) activate; cmd_check ;;
    run) activate; cmd_run "$@" ;;
    start) cmd_start "$@" ;;
    logs) cmd_logs "$@" ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$cmd' (try: help)" ;;
  esac
}

main "$@"
