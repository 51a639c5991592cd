"""Trained weights for frozen use and inference: the parameters of a workdir's stages read without
building their training `Task`s (no optimiser, dataset or train state), and the pretrained SD VAE.

Used by the training stages for their frozen networks (the autoencoder stage's VAE, the latents
stage's autoencoder), by the `sample` stage and by the generator's quality signals.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from mmldm_jax import workdir as workdir_lib
from mmldm_jax.train import loop


def autoencoder_system(config, scale_factor: float):
  """The autoencoder system whose frozen VAE scales its latents by `scale_factor` (from
  `config_lib.resolve_scale_factor`). AutoencoderSystem sizes its VAE from the config's vae
  section, so it gets its own copy with that field set; the caller's config is left as it is."""
  from mmldm_jax.models import autoencoder as autoencoder_lib
  own = config.copy_and_resolve_references()
  own.vae.scale_factor = float(scale_factor)
  return autoencoder_lib.AutoencoderSystem(own, dtype=loop.compute_dtype(config))


def pretrained_vae_params(config):
  """SD VAE params from config.vae.pretrained_path (converted msgpack or a torch/safetensors
  file)."""
  from mmldm_jax.convert import vae as convert_vae
  logging.info("vae: weights from %s", config.vae.pretrained_path)
  return convert_vae.load_vae_params(config.vae.pretrained_path, config)


def restore_vae_params(config, workdir: str, mesh):
  """The `vae` stage's newest VAE parameters (EMA when kept) on `mesh`; its discriminator, if it
  trained one, is not read."""
  from mmldm_jax.models import vae as vae_lib
  vae = vae_lib.build_vae(config, dtype=loop.compute_dtype(config))
  image = jnp.zeros((1, config.data.image_size, config.data.image_size, 3))
  init = lambda rng: {"vae": vae.init(rng, image)["params"]}  # noqa: E731 - as vae_task's
  return loop.restore_stage_params(config, workdir, "vae", init, "conv", mesh)["vae"]


def restore_autoencoder_params(config, workdir: str, mesh, system):
  """The `autoencoder` stage's newest autoencoder parameters (EMA when kept) on `mesh`, shaped by
  `system` (`autoencoder_system`); its discriminator is not read."""
  init = lambda rng: {"autoencoder": system.init(rng)["autoencoder"]}  # noqa: E731
  return loop.restore_stage_params(config, workdir, "autoencoder", init, "conv",
                                   mesh)["autoencoder"]


def restore_dit_params(config, workdir: str, mesh, model):
  """The `generator` stage's newest DiT parameters (EMA when kept) on `mesh`, shaped by `model`
  (`models.dit.build_dit`)."""
  from mmldm_jax.models import dit as dit_lib
  init = lambda rng: {"dit": dit_lib.init_params(model, rng)}  # noqa: E731 - as generator_task's
  return loop.restore_stage_params(config, workdir, "generator", init, "dit", mesh)["dit"]


def frozen_vae_params(config, workdir: str, mesh):
  """The `vae` stage's final parameters on `mesh`, or (no vae checkpoint in the workdir) the
  pretrained SD VAE of config.vae.pretrained_path, replicated. Fails naming both when neither
  exists."""
  if loop.has_checkpoint(workdir, "vae"):
    return restore_vae_params(config, workdir, mesh)
  if config.vae.pretrained_path:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(pretrained_vae_params(config), replicated)
  raise FileNotFoundError(
      f"no VAE: {workdir_lib.checkpoint_dir(workdir, 'vae')} has no checkpoint and "
      f"config.vae.pretrained_path is empty; run the `vae` stage first or give SD VAE weights")
