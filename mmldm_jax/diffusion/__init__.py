"""Diffusion core shared by the autoencoder's diffusion decoder and the DiT generator.

  schedules  `Schedule`, `make_schedule(config.diffusion)`, `q_sample`, `training_target`,
             `output_to_x0_eps` (eps or v prediction)
  losses     `denoising_loss` (sum over modalities of the mean MSE; shared or independent timesteps)
  samplers   `ddim_sample`, `dpm_solver_pp_sample`, `sample(config, ...)`: jittable `lax.scan` samplers
             over a dict of modalities with per-modality guidance and replacement conditioning
"""
from mmldm_jax.diffusion.losses import denoising_loss, modality_losses, noise_batch, sample_timesteps
from mmldm_jax.diffusion.samplers import (ddim_sample, ddim_timesteps, dpm_solver_pp_sample,
                                          dpm_solver_timesteps, guided_output, initial_noise, sample)
from mmldm_jax.diffusion.schedules import (Schedule, make_betas, make_schedule, output_to_x0_eps,
                                           q_sample, schedule_from_betas, training_target)
