"""Denoising losses over a dict of modalities ({'audio': ..., 'video': ...}).

MM-LDM trains both of its diffusion models with plain MSE on the noise (logvar 0, no ELBO term) and sums
the per-modality means: loss = mean((eps_a - eps_hat_a)^2) + mean((eps_v - eps_hat_v)^2).
  - The DiT draws ONE timestep per sample, shared by both modalities (`shared_timesteps=True`).
  - The autoencoder's diffusion decoder draws INDEPENDENT timesteps for the audio items and for the video
    frames, whose batch sizes differ (B audio images, B*T frames) (`shared_timesteps=False`).

`model_fn(x_t, t) -> output` always receives dicts: x_t[m] [B_m, ...] and t[m] int32 [B_m]; with shared
timesteps every t[m] is the same array. The output dict holds eps or v (config.diffusion.prediction)
for each modality.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from mmldm_jax.diffusion import schedules

Batch = Mapping[str, jnp.ndarray]


def sample_timesteps(rng: jax.Array, x0: Batch, num_timesteps: int,
                     shared: bool) -> dict[str, jnp.ndarray]:
  """Uniform integer timesteps per modality: one draw per sample shared by all modalities, or
  independent draws (then the modalities may have different batch sizes)."""
  names = sorted(x0)
  if shared:
    sizes = {x0[name].shape[0] for name in names}
    if len(sizes) != 1:
      raise ValueError(f"shared timesteps need one batch size for all modalities, got "
                       f"{ {name: x0[name].shape[0] for name in names} }")
    t = jax.random.randint(rng, (sizes.pop(),), 0, num_timesteps, dtype=jnp.int32)
    return {name: t for name in names}
  keys = jax.random.split(rng, len(names))
  return {name: jax.random.randint(key, (x0[name].shape[0],), 0, num_timesteps, dtype=jnp.int32)
          for name, key in zip(names, keys)}


NoiseFn = Callable[[dict[str, jnp.ndarray], jax.Array], dict[str, jnp.ndarray]]


def noise_batch(schedule: schedules.Schedule, x0: Batch, t: Batch, rng: jax.Array,
                noise_fn: NoiseFn | None = None,
                ) -> tuple[dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
  """Draws Gaussian noise per modality and returns (x_t, noise). `noise_fn(noise, rng)`, when
  given, reshapes the draw's covariance (e.g. `samplers.share_across_groups`); it must keep every
  element standard normal, since the schedule assumes unit-variance noise."""
  names = sorted(x0)
  keys = jax.random.split(rng, len(names))
  noise = {name: jax.random.normal(key, x0[name].shape, x0[name].dtype)
           for name, key in zip(names, keys)}
  if noise_fn is not None:
    noise = noise_fn(noise, jax.random.fold_in(rng, len(names)))
  x_t = {name: schedules.q_sample(schedule, x0[name], t[name], noise[name]) for name in names}
  return x_t, noise


def min_snr_weights(alphas_cumprod_t: jnp.ndarray, prediction: str, gamma: float) -> jnp.ndarray:
  """Min-SNR-gamma loss weights (Hang et al. 2023) per example, for timesteps whose cumulative
  alpha is `alphas_cumprod_t` [B].

  In terms of the clean latent, eps-MSE weighs a timestep's x0 error by its SNR =
  alpha_bar / (1 - alpha_bar), which runs from about 1e3 at t=0 to 5e-3 at t=999 on SD's schedule:
  nearly all of the loss is spent on low-noise steps that only sharpen what x_t already shows,
  and the high-noise steps, where the decoder must take layout from its conditioning, barely
  count. Min-SNR caps that x0 weight at `gamma`: the eps loss is multiplied by
  min(SNR, gamma) / SNR (v loss: min(SNR, gamma) / (SNR + 1)), so steps with SNR <= gamma keep
  weight 1 and the easy ones are scaled down."""
  snr = alphas_cumprod_t / (1.0 - alphas_cumprod_t)
  capped = jnp.minimum(snr, gamma)
  return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def modality_losses(schedule: schedules.Schedule, x0: Batch, noise: Batch, t: Batch, output: Batch,
                    prediction: str, min_snr_gamma: float = 0.0) -> dict[str, jnp.ndarray]:
  """Mean squared error per modality between the network output and its target (float32).
  `min_snr_gamma` > 0 weighs each example by `min_snr_weights` (0: plain MSE, the reference)."""
  losses = {}
  for name in sorted(x0):
    alphas = schedule.alphas_cumprod[t[name]]
    target = schedules.training_target(x0[name], noise[name], alphas, prediction)
    error = output[name].astype(jnp.float32) - target.astype(jnp.float32)
    squared = jnp.square(error)
    if min_snr_gamma > 0:
      weights = min_snr_weights(alphas.astype(jnp.float32), prediction, min_snr_gamma)
      squared = squared * weights.reshape(weights.shape + (1,) * (squared.ndim - weights.ndim))
    losses[name] = jnp.mean(squared)
  return losses


def denoising_loss(model_fn: Callable[[Batch, Batch], Batch], schedule: schedules.Schedule,
                   x0: Batch, rng: jax.Array, *, prediction: str = "eps",
                   shared_timesteps: bool = True, weights: Mapping[str, float] | None = None,
                   noise_fn: NoiseFn | None = None, timesteps: Batch | None = None,
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The multi-modal diffusion training loss. `noise_fn`: see `noise_batch`. `timesteps`
  ({modality: int [B]}) replaces the uniform draw (`shared_timesteps` then has no effect).

  Returns (loss, metrics): loss = sum over modalities of weight_m * mean MSE_m (weights default 1, the
  reference); metrics holds 'loss_<modality>' for each modality.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = (sample_timesteps(t_rng, x0, schedule.num_timesteps, shared_timesteps)
       if timesteps is None else timesteps)
  x_t, noise = noise_batch(schedule, x0, t, noise_rng, noise_fn)
  output = model_fn(x_t, t)
  missing = sorted(set(x0) - set(output))
  if missing:
    raise ValueError(f"model_fn returned no output for modalities {missing}")
  losses = modality_losses(schedule, x0, noise, t, output, prediction)
  weights = weights or {}
  loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
  return loss, {f"loss_{name}": value for name, value in losses.items()}
