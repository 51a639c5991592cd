#!/usr/bin/env bash
# Multi-node GPU training of mmldm_jax under SLURM: one process per GPU (JAX reads SLURM's variables and
# picks its GPU from SLURM_LOCALID), every process runs the same `python -m mmldm_jax.main` command.
#
#   launch/slurm_gpu.sh [--dry-run] [options] -- ARGS FOR mmldm_jax.main
#
# Options:
#   --nodes N            nodes [default 1]
#   --gpus-per-node G    GPUs per node [default 8]
#   --time HH:MM:SS      wall-clock limit [default 48:00:00]
#   --partition P        SLURM partition [default: the cluster's default]
#   --job-name NAME      [default mmldm]
#   --venv DIR           virtual environment to activate on the nodes [default: none]
#   --dry-run            print the batch script and the sbatch command instead of submitting
#
# Example (2 nodes x 8 GPUs, AIST++ at paper size):
#   launch/slurm_gpu.sh --nodes=2 --venv=$HOME/venv -- --config=configs/aist.py \
#       --workdir=/shared/runs/aist --config.data.data_dir=/shared/aist_rec
# The job gets SIGTERM 120 s before its time limit (--signal), so the trainer saves a checkpoint;
# submitting the same command again resumes it (and skips stages that are done).
set -euo pipefail

DRY_RUN=0
NODES=1
GPUS=8
TIME="48:00:00"
PARTITION=""
JOB_NAME="mmldm"
VENV=""
MAIN_ARGS=()

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes=*) NODES="${1#*=}" ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node=*) GPUS="${1#*=}" ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --time=*) TIME="${1#*=}" ;;
    --time) TIME="$2"; shift ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --partition) PARTITION="$2"; shift ;;
    --job-name=*) JOB_NAME="${1#*=}" ;;
    --job-name) JOB_NAME="$2"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --venv) VENV="$2"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "slurm_gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
((${#MAIN_ARGS[@]})) || { echo "slurm_gpu.sh: give the main arguments after --" >&2; exit 2; }
for value in "$NODES" "$GPUS"; do
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_gpu.sh: '$value' is not a count" >&2; exit 2; }
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
quoted=""
for arg in "${MAIN_ARGS[@]}"; do quoted+=" $(printf '%q' "$arg")"; done
activate=""
[[ -n "$VENV" ]] && activate="source $(printf '%q' "$VENV")/bin/activate"
partition_line=""
[[ -n "$PARTITION" ]] && partition_line="#SBATCH --partition=$PARTITION"

batch_script="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=8
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.log
$partition_line
set -euo pipefail
cd $(printf '%q' "$REPO_ROOT")
$activate
# One process per GPU; jax.distributed.initialize() finds the coordinator from SLURM's variables.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
srun --kill-on-bad-exit=1 python -m mmldm_jax.main$quoted
"

if ((DRY_RUN)); then
  printf '%s\n' "$batch_script"
  echo "+ sbatch <batch script above>"
else
  printf '%s' "$batch_script" | sbatch
fi
