"""The `generator` stage: the joint audio-video DiT on the `latents` stage's latents (autoencoder
and VAE not loaded for training), trained by `train/loop.py` on the Task of `train/tasks.py`
(`generator_task`).

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=generator

Without the latents it raises `workdir.MissingInput('latents')` (`main.py` runs the latents stage
first). Skipped when its final checkpoint exists, resumed otherwise.
"""
from __future__ import annotations

from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import latents as latents_lib
from mmldm_jax.train import loop
from mmldm_jax.train import tasks


def run(config, workdir: str) -> None:
  """Trains the DiT on the latents of the `latents` stage."""
  finished = loop.is_complete(workdir, "generator", config.train_generator.num_steps)
  if (not finished and config.train_generator.eval_every > 0
      and not loop.has_checkpoint(workdir, "autoencoder")):
    raise ValueError(
        f"config.train_generator.eval_every={config.train_generator.eval_every}: the generator's "
        f"quality signals decode samples with the autoencoder, and "
        f"{workdir_lib.checkpoint_dir(workdir, 'autoencoder')} has no checkpoint; run the autoencoder "
        f"stage first or set --config.train_generator.eval_every=0")
  if not finished and not latents_lib.is_complete(workdir):
    raise workdir_lib.MissingInput(
        "latents", f"no latents in {workdir_lib.latents_dir(workdir)} yet (the latents stage "
        f"writes them)")
  loop.train(config, workdir, tasks.generator_task(config, workdir))
