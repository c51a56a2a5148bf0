#!/usr/bin/env bash
# Train / sample / evaluate lfm_jax on a Cloud TPU VM or pod slice.
#
# One program runs on every worker of the slice (`--worker=all`); JAX joins the hosts through
# jax.distributed, each host feeds its own slice of the data, and everything persistent lives in
# the gs:// workdir (orbax checkpoints, samples, metrics), so a preempted run resumes by running
# the same command again.
#
# Usage:
#   launch/tpu_vm.sh create                       # create the TPU VM / pod slice
#   launch/tpu_vm.sh setup                        # install lfm_jax + jax[tpu] on all workers
#   launch/tpu_vm.sh run CONFIG WORKDIR [FLAGS]   # start (or resume) a run on all workers
#   launch/tpu_vm.sh logs                         # follow worker 0's log
#   launch/tpu_vm.sh status                       # TPU state and whether the run is alive
#   launch/tpu_vm.sh stop                         # stop the run on all workers
#   launch/tpu_vm.sh keepalive CONFIG WORKDIR [FLAGS]
#                                                 # run; after a preemption recreate the VM,
#                                                 # reinstall and resume, until the run ends
#   launch/tpu_vm.sh fetch WORKDIR LOCAL_DIR      # copy samples/, metrics, config back from gs://
#   launch/tpu_vm.sh delete                       # delete the TPU VM
#
# Example (v4-32 = 4 hosts; bucket in the TPU's region):
#   export TPU_NAME=lfm-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 SPOT=1
#   export REPO_URL=https://github.com/OWNER/lfm_jax.git   # or unset: ship this checkout
#   launch/tpu_vm.sh create && launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run configs/celeba_hq_256_dit_l2.py gs://BUCKET/runs/celeba_dit_l2 \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
#       --config.autoencoder.pretrained=gs://BUCKET/pretrained/sd-vae-ft-mse
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh fetch gs://BUCKET/runs/celeba_dit_l2 ./results/celeba_dit_l2
# Parameterised configs keep their argument: configs/stability_prune.py:cluster,0.5
#
# Environment (defaults in brackets):
#   TPU_NAME [lfm-tpu]  ZONE [us-central2-b]  PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v4-8]  RUNTIME_VERSION [chosen from the accelerator type]
#   SPOT [0] (1: spot capacity, cheaper, preemptible)
#   REPO_URL [unset: the local checkout is packed with `git archive` and copied to all workers]
#   REPO_REF [main]  REMOTE_DIR [lfm_jax]  PYTHON [python3]
#   JAX_TPU_SPEC [jax[tpu]]  (pin e.g. "jax[tpu]==0.10.2" to match a tested version)
#   KEEPALIVE_POLL [300] seconds between liveness checks in `keepalive`
set -euo pipefail

TPU_NAME="${TPU_NAME:-lfm-tpu}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-lfm_jax}"
PYTHON="${PYTHON:-python3}"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]}"
KEEPALIVE_POLL="${KEEPALIVE_POLL:-300}"
REMOTE_LOG="lfm_run.log"
REMOTE_PID="lfm_run.pid"
REMOTE_RC="lfm_run.rc"  # exit status of the last finished run

die() { echo "tpu_vm.sh: $*" >&2; exit 1; }
log() { echo "[tpu_vm.sh $(date -u +%H:%M:%S)] $*" >&2; }

default_runtime() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator '$1'; set RUNTIME_VERSION" ;;
  esac
}
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"

# Common gcloud flags as an array (PROJECT optional).
gflags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  gflags+=(--project="$PROJECT")
fi

tpu() { gcloud compute tpus tpu-vm "$@" "${gflags[@]}"; }

# Runs a shell command on every worker of the slice (all hosts at once).
on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
on_worker0() { tpu ssh "$TPU_NAME" --worker=0 --command="$1"; }

state() { tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || echo "NOT_FOUND"; }

# Number of hosts (workers) of the slice: one network endpoint each.
num_workers() {
  tpu describe "$TPU_NAME" --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' |
    grep -c . || echo 1
}

cmd_create() {
  local extra=()
  if [[ "$SPOT" == "1" ]]; then
    extra+=(--spot)
  fi
  log "creating $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${extra[@]}"
}

cmd_delete() {
  log "deleting $TPU_NAME"
  tpu delete "$TPU_NAME" --quiet
}

# Installs the code on all workers: a git clone of REPO_URL, or this checkout shipped over scp.
cmd_setup() {
  local get_code
  if [[ -n "$REPO_URL" ]]; then
    get_code="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin && \
git -C $REMOTE_DIR checkout -q $REPO_REF && git -C $REMOTE_DIR pull -q --ff-only || true; \
else git clone -q $REPO_URL $REMOTE_DIR && git -C $REMOTE_DIR checkout -q $REPO_REF; fi"
  else
    local root archive
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    archive="$(mktemp -t lfm_jax.XXXXXX).tar.gz"
    log "packing $root (git HEAD) into $archive"
    git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    tpu scp "$archive" "$TPU_NAME:lfm_jax.tar.gz" --worker=all
    rm -f "$archive"
    get_code="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf lfm_jax.tar.gz -C $REMOTE_DIR"
  fi
  log "installing on all workers"
  on_all_workers "set -e; $get_code; cd $REMOTE_DIR && \
$PYTHON -m pip install -q -U pip && \
$PYTHON -m pip install -q -U '$JAX_TPU_SPEC' && \
$PYTHON -m pip install -q -e . && \
$PYTHON -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

# Builds the remote command line: quoted so configs like `x.py:cluster,0.5` survive ssh
# (arguments must not contain single quotes).
remote_main() {
  local config="$1" workdir="$2"
  shift 2
  local quoted=""
  local arg
  for arg in --config="$config" --workdir="$workdir" "$@"; do
    quoted+=" $(printf '%q' "$arg")"
  done
  echo "$PYTHON -m lfm_jax.main$quoted"
}

# Starts the program on every worker in the background (nohup), unless it is already running:
# rerunning `run` after a crash or preemption resumes from the workdir's latest checkpoint.
cmd_run() {
  [[ $# -ge 2 ]] || die "usage: run CONFIG WORKDIR [FLAGS...]"
  [[ "$2" == gs://* ]] || log "warning: WORKDIR '$2' is not gs://; multi-host runs need a shared workdir"
  local main workers
  main="$(remote_main "$@")"
  workers="$(num_workers)"
  if [[ "$workers" -gt 1 ]]; then
    # Every worker runs the same command; jax.distributed finds the coordinator (worker 0) and
    # the process count from the TPU metadata; a worker that cannot reach it fails within
    # LFM_JAX_DISTRIBUTED_TIMEOUT seconds instead of hanging.
    main="LFM_JAX_DISTRIBUTED=1 LFM_JAX_DISTRIBUTED_TIMEOUT=\${LFM_JAX_DISTRIBUTED_TIMEOUT:-300} $main"
  fi
  log "starting on all $workers worker(s): $main"
  on_all_workers "cd $REMOTE_DIR && \
if [ -f ~/$REMOTE_PID ] && kill -0 \$(cat ~/$REMOTE_PID) 2>/dev/null; then \
echo \"worker \$(hostname): already running (pid \$(cat ~/$REMOTE_PID))\"; else \
rm -f ~/$REMOTE_RC; \
nohup bash -c '$main; echo \$? > ~/$REMOTE_RC' > ~/$REMOTE_LOG 2>&1 < /dev/null & \
echo \$! > ~/$REMOTE_PID; \
echo \"worker \$(hostname): started pid \$(cat ~/$REMOTE_PID)\"; fi"
}

# Exit status 0 while the program runs on worker 0, 1 otherwise.
run_alive() {
  on_worker0 "[ -f ~/$REMOTE_PID ] && kill -0 \$(cat ~/$REMOTE_PID) 2>/dev/null" >/dev/null 2>&1
}

# Whether the finished program exited 0 on worker 0 (its status is written to ~/lfm_run.rc).
run_succeeded() {
  [[ "$(on_worker0 "cat ~/$REMOTE_RC 2>/dev/null" 2>/dev/null | tr -d '[:space:]')" == "0" ]]
}

cmd_logs() { on_worker0 "tail -n 100 -F ~/$REMOTE_LOG"; }

cmd_status() {
  local s
  s="$(state)"
  echo "TPU $TPU_NAME: $s"
  if [[ "$s" == "READY" ]]; then
    if run_alive; then echo "run: alive"; else echo "run: not running"; fi
  fi
}

cmd_stop() {
  on_all_workers "if [ -f ~/$REMOTE_PID ]; then kill \$(cat ~/$REMOTE_PID) 2>/dev/null || true; \
rm -f ~/$REMOTE_PID; fi"
}

# Run until done, recreating a preempted (spot) slice and resuming from the last checkpoint.
cmd_keepalive() {
  [[ $# -ge 2 ]] || die "usage: keepalive CONFIG WORKDIR [FLAGS...]"
  while true; do
    local s
    s="$(state)"
    case "$s" in
      READY) ;;
      NOT_FOUND) cmd_create; cmd_setup ;;
      PREEMPTED|TERMINATED|STOPPED)
        log "TPU is $s: recreating"
        cmd_delete || true
        cmd_create
        cmd_setup ;;
      *) log "TPU is $s; waiting"; sleep 60; continue ;;
    esac
    cmd_run "$@" || log "run command failed (workers unreachable?); retrying"
    sleep 60
    while [[ "$(state)" == "READY" ]] && run_alive; do
      sleep "$KEEPALIVE_POLL"
    done
    if [[ "$(state)" == "READY" ]]; then
      if run_succeeded; then
        log "run finished"
        return 0
      fi
      log "run exited with an error on worker 0; see: launch/tpu_vm.sh logs"
      return 1
    fi
    log "TPU left READY (preempted?); will resume from the latest checkpoint"
  done
}

# Copies what a run leaves in its gs:// workdir (not the checkpoints) to a local directory.
cmd_fetch() {
  [[ $# -eq 2 ]] || die "usage: fetch WORKDIR LOCAL_DIR"
  local src="${1%/}" dst="$2"
  mkdir -p "$dst"
  gcloud storage rsync --recursive "$src/samples" "$dst/samples" || log "no samples/ yet"
  local f
  for f in metrics.jsonl config.json; do
    gcloud storage cp "$src/$f" "$dst/$f" || log "no $f yet"
  done
  log "copied to $dst (checkpoints stay in $src/checkpoints)"
}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

main() {
  [[ $# -ge 1 ]] || { usage; exit 1; }
  local cmd="$1"
  shift
  case "$cmd" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run|resume) cmd_run "$@" ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    keepalive) cmd_keepalive "$@" ;;
    fetch) cmd_fetch "$@" ;;
    delete) cmd_delete ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$cmd' (try: help)" ;;
  esac
}

main "$@"
