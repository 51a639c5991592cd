"""The `autoencoder` stage: the multi-modal autoencoder and its 3-frame discriminator, with the VAE
frozen (the `vae` stage's final parameters, or without that stage the pretrained SD VAE), trained by
`train/loop.py` on the Task of `train/tasks.py` (`autoencoder_task`).

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=autoencoder

Skipped when its final checkpoint exists, resumed otherwise.
"""
from __future__ import annotations

from mmldm_jax import config_lib
from mmldm_jax.train import loop
from mmldm_jax.train import tasks


def run(config, workdir: str) -> None:
  scale_factor = config_lib.resolve_scale_factor(config, workdir)
  loop.train(config, workdir, tasks.autoencoder_task(config, workdir, scale_factor))
