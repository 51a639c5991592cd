"""The `vae` stage: the stage-0 image VAE (decoder fine-tuned on frames and audio images) and its
PatchGAN, trained by `train/loop.py` on the Task of `train/tasks.py` (`vae_task`).

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=vae

Starts from `config.vae.pretrained_path` (SD VAE weights) or random; with
`config.vae.measure_scale_factor` the finished VAE's scale factor is measured and written to
`<workdir>/vae/scale_factor.json`. Skipped when its final checkpoint exists, resumed otherwise.
"""
from __future__ import annotations

from mmldm_jax.train import loop
from mmldm_jax.train import tasks


def run(config, workdir: str) -> None:
  if config.vae.freeze_encoder and not config.vae.pretrained_path:
    raise ValueError(
        "config.vae.freeze_encoder=True with config.vae.pretrained_path='' would freeze a randomly "
        "initialised encoder: give SD VAE weights (--config.vae.pretrained_path=...) or train the "
        "VAE from scratch with --config.vae.freeze_encoder=False "
        "--config.vae.measure_scale_factor=True")
  loop.train(config, workdir, tasks.vae_task(config, workdir))
  if config.vae.measure_scale_factor:
    tasks.write_measured_scale_factor(config, workdir)
