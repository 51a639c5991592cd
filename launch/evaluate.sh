#!/usr/bin/env bash
# The evaluate stage alone, on an existing workdir (its sample stage's output) or on a folder of mp4
# files: FVD / KVD (I3D), FAD (AudioCLIP, PANNs) when their weight files are given, the sync and
# memorisation checks; writes <workdir>/metrics.json and TensorBoard scalars in
# <workdir>/evaluate/logs/.
#
#   launch/evaluate.sh [--dry-run] --config=CONFIG --workdir=DIR [options] [-- MORE ARGS FOR main]
#
# Options:
#   --config=CONFIG       the run's config (e.g. configs/aist.py), for data, clip length and protocol
#   --workdir=DIR         where metrics.json, the feature cache (DIR/evaluate/) and the list of real
#                         clips go; the samples are DIR/samples/<mode>/ unless --samples is given
#   --samples=FOLDER      evaluate every mp4 of FOLDER instead (a .wav of the same name is the sound)
#   --audioclip=PATH      AudioCLIP-Full-Training.pt: adds fad_audioclip_x1e4 (MM-LDM's FAD)
#   --panns=PATH          Cnn14_mAP=0.431.pth: adds fad_panns_cnn14
#   --dry-run             print the command instead of running it
#
# One host: the feature networks split their batches over every local device (evaluation/devices.py).
# Several hosts (a TPU slice, SLURM nodes): run the same main arguments on every process through
# launch/tpu_vm.sh run -- ... or launch/slurm_gpu.sh -- ... (print them with --dry-run here); each
# process computes its share of the features into DIR/evaluate/, so DIR must be a folder every host
# sees, and process 0 then scores. Example (2048 samples of an AIST++ run, FAD with AudioCLIP):
#   launch/evaluate.sh --config=configs/aist.py --workdir=/shared/runs/aist \
#       --audioclip=/shared/weights/AudioCLIP-Full-Training.pt
set -euo pipefail

DRY_RUN=0
CONFIG=""
WORKDIR=""
SAMPLES=""
AUDIOCLIP=""
PANNS=""
MAIN_ARGS=()

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --samples=*) SAMPLES="${1#*=}" ;;
    --audioclip=*) AUDIOCLIP="${1#*=}" ;;
    --panns=*) PANNS="${1#*=}" ;;
    -h|--help) usage 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "evaluate.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ -n "$CONFIG" ]] || { echo "evaluate.sh: --config=CONFIG is required" >&2; exit 2; }
[[ -n "$WORKDIR" ]] || { echo "evaluate.sh: --workdir=DIR is required" >&2; exit 2; }
for pair in "--samples:$SAMPLES" "--audioclip:$AUDIOCLIP" "--panns:$PANNS"; do
  option="${pair%%:*}"; path="${pair#*:}"
  if [[ -n "$path" && ! -e "$path" ]]; then
    echo "evaluate.sh: $option=$path does not exist" >&2; exit 2
  fi
done

COMMAND=(python -m mmldm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --config.stages=evaluate)
[[ -z "$SAMPLES" ]] || COMMAND+=("--config.evaluation.samples_folder=$SAMPLES")
[[ -z "$AUDIOCLIP" ]] || COMMAND+=("--config.evaluation.audioclip_path=$AUDIOCLIP")
[[ -z "$PANNS" ]] || COMMAND+=("--config.evaluation.panns_cnn14_path=$PANNS")
COMMAND+=("${MAIN_ARGS[@]}")

if ((DRY_RUN)); then
  printf '%q ' "${COMMAND[@]}"; echo
else
  exec "${COMMAND[@]}"
fi
