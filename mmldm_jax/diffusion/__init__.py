"""Diffusion core shared by the autoencoder's diffusion decoder and the DiT generator.

  schedules  `Schedule`, `make_schedule(config.diffusion)`, `q_sample`, `training_target`,
             `output_to_x0_eps` (eps or v prediction)
  losses     `denoising_loss` (sum over modalities of the mean MSE; shared or independent timesteps)
  samplers   `ddim_sample`, `dpm_solver_pp_sample`, `sample(config, ...)`: jittable `lax.scan` samplers
             over a dict of modalities with per-modality guidance and replacement conditioning

Import the submodules (`from mmldm_jax.diffusion import samplers, schedules`); the package
re-exports nothing.
"""
