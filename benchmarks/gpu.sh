#!/usr/bin/env bash
# Training-step time, examples/s and MFU of every stage (generator, vae, autoencoder) at paper size
# (configs/aist.py) on the GPUs of this machine, in one run:
#
#   benchmarks/gpu.sh [--batch-per-device=N] [--stages=generator,vae,autoencoder] [--steps=10]
#
# Needs the CUDA build of jax (`pip install -U "jax[cuda12]==<the version setup.py pins>"`).
# MFU = XLA's FLOP count of one device's share of the step / step time / that device's bf16 peak
# (mmldm_jax.metrics.PEAK_FLOPS); precision 'auto' = bf16 activations, fp32 parameters.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
python - <<'PY'
import jax
devices = jax.devices()
assert devices[0].platform == "gpu", f"no GPU visible to jax: {devices}"
print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}")
PY
exec python benchmarks/train_step.py --paper --config=configs/aist.py --steps=10 "$@"
