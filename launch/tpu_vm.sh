#!/usr/bin/env bash
# Cloud TPU VM lifecycle for mmldm_jax: create a TPU VM (one host or a multi-host slice, or several
# slices through queued resources), install this checkout on every worker, run the same command on
# every worker, stream the logs, tear down.
#
#   launch/tpu_vm.sh [--dry-run] ACTION [options] [-- ARGS FOR mmldm_jax.main]
#
# Actions:
#   create    create the TPU VM (or the queued resource for --slices > 1)
#   setup     copy this checkout to every worker and `pip install -e .` there
#   run       start `python -m mmldm_jax.main ARGS` on every worker in the background (log: ~/run.log)
#   logs      stream worker 0's log (--worker=N for another)
#   ssh       run an arbitrary command (--command='...') on every worker
#   delete    tear everything down
#
# Options (or the environment variables in brackets):
#   --name NAME              TPU name [TPU_NAME, default mmldm]
#   --zone ZONE              [TPU_ZONE, default us-central2-b]
#   --project PROJECT        [TPU_PROJECT, default: gcloud's configured project]
#   --type TYPE              accelerator type [TPU_TYPE, default v4-8]; v4-32 etc. is multi-host
#   --version VERSION        TPU software version [TPU_VERSION, default tpu-ubuntu2204-base]
#   --slices N               number of slices (multi-slice over DCN via queued resources) [default 1]
#   --spot                   spot (preemptible) capacity; the trainer saves on SIGTERM and resumes
#   --worker N               worker for `logs` [default 0]
#   --command CMD            command for `ssh`
#   --dry-run                print the gcloud commands instead of running them
#
# Example (a 2-host v4-16, paper-size AIST++ run writing to a bucket):
#   launch/tpu_vm.sh create --type=v4-16 && launch/tpu_vm.sh setup
#   launch/tpu_vm.sh run -- --config=configs/aist.py --workdir=/mnt/bucket/aist \
#       --config.data.data_dir=/mnt/bucket/aist_rec
#   launch/tpu_vm.sh logs; launch/tpu_vm.sh delete
# JAX finds the other workers by itself on a TPU VM (config.distributed='auto'); every worker runs the
# identical command and reads its own slice of the data.
set -euo pipefail

DRY_RUN=0
ACTION=""
NAME="${TPU_NAME:-mmldm}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v4-8}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
SLICES=1
SPOT=0
WORKER=0
COMMAND=""
MAIN_ARGS=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --name) NAME="$2"; shift ;;
    --zone=*) ZONE="${1#*=}" ;;
    --zone) ZONE="$2"; shift ;;
    --project=*) PROJECT="${1#*=}" ;;
    --project) PROJECT="$2"; shift ;;
    --type=*) TYPE="${1#*=}" ;;
    --type) TYPE="$2"; shift ;;
    --version=*) VERSION="${1#*=}" ;;
    --version) VERSION="$2"; shift ;;
    --slices=*) SLICES="${1#*=}" ;;
    --slices) SLICES="$2"; shift ;;
    --spot) SPOT=1 ;;
    --worker=*) WORKER="${1#*=}" ;;
    --worker) WORKER="$2"; shift ;;
    --command=*) COMMAND="${1#*=}" ;;
    --command) COMMAND="$2"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    create|setup|run|logs|ssh|delete) ACTION="$1" ;;
    *) echo "tpu_vm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$ACTION" ]] || { echo "tpu_vm.sh: no action given (see --help)" >&2; exit 2; }
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_vm.sh: --slices=$SLICES is not a count" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")

# Prints the command (shell-quoted); runs it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if ((DRY_RUN == 0)); then "$@"; fi
}

# Every worker (of every slice): the queued resource for several slices, else the TPU VM.
remote_ssh() {
  if ((SLICES > 1)); then
    run gcloud compute tpus queued-resources ssh "$NAME" "${COMMON[@]}" --worker=all --node=all "$@"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker=all "$@"
  fi
}

remote_copy() {  # LOCAL_FILE REMOTE_PATH
  if ((SLICES > 1)); then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" "${COMMON[@]}" --worker=all --node=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${COMMON[@]}" --worker=all
  fi
}

# The jax version setup.py pins, so the TPU plugin (libtpu) matches it.
JAX_VERSION="$(sed -n 's/.*"jax==\([0-9.]*\)".*/\1/p' "$REPO_ROOT/setup.py" | head -n 1)"

case "$ACTION" in
  create)
    if ((SLICES > 1)); then
      extra=()
      ((SPOT)) && extra+=(--spot)
      run gcloud compute tpus queued-resources create "$NAME" "${COMMON[@]}" \
        --accelerator-type="$TYPE" --runtime-version="$VERSION" --node-count="$SLICES" \
        --node-prefix="$NAME" "${extra[@]}"
    else
      extra=()
      ((SPOT)) && extra+=(--spot)
      run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" \
        --accelerator-type="$TYPE" --version="$VERSION" "${extra[@]}"
    fi
    ;;
  setup)
    archive="/tmp/mmldm_jax-src.tar.gz"
    run tar -C "$REPO_ROOT" --exclude=.git --exclude=.jax_cache --exclude=runs -czf "$archive" .
    remote_copy "$archive" "mmldm_jax-src.tar.gz"
    remote_ssh --command="mkdir -p ~/mmldm_jax && tar -xzf ~/mmldm_jax-src.tar.gz -C ~/mmldm_jax \
&& python3 -m pip install -q -U pip \
&& python3 -m pip install -q -e ~/mmldm_jax 'jax[tpu]==${JAX_VERSION}'"
    ;;
  run)
    ((${#MAIN_ARGS[@]})) || { echo "tpu_vm.sh run: give the main arguments after --" >&2; exit 2; }
    quoted=""
    for arg in "${MAIN_ARGS[@]}"; do quoted+=" $(printf '%q' "$arg")"; done
    remote_ssh --command="cd ~/mmldm_jax && nohup python3 -m mmldm_jax.main${quoted} \
> ~/run.log 2>&1 &"
    ;;
  logs)
    if ((SLICES > 1)); then
      run gcloud compute tpus queued-resources ssh "$NAME" "${COMMON[@]}" --worker="$WORKER" --node=0 \
        --command="tail -n 200 -f ~/run.log"
    else
      run gcloud compute tpus tpu-vm ssh "$NAME" "${COMMON[@]}" --worker="$WORKER" \
        --command="tail -n 200 -f ~/run.log"
    fi
    ;;
  ssh)
    [[ -n "$COMMAND" ]] || { echo "tpu_vm.sh ssh: --command is required" >&2; exit 2; }
    remote_ssh --command="$COMMAND"
    ;;
  delete)
    if ((SLICES > 1)); then
      run gcloud compute tpus queued-resources delete "$NAME" "${COMMON[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
    fi
    ;;
esac
