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


def noise_batch(schedule: schedules.Schedule, x0: Batch, t: Batch,
                rng: jax.Array) -> tuple[dict[str, jnp.ndarray], dict[str, jnp.ndarray]]:
  """Draws Gaussian noise per modality and returns (x_t, noise)."""
  names = sorted(x0)
  keys = jax.random.split(rng, len(names))
  noise = {name: jax.random.normal(key, x0[name].shape, x0[name].dtype)
           for name, key in zip(names, keys)}
  x_t = {name: schedules.q_sample(schedule, x0[name], t[name], noise[name]) for name in names}
  return x_t, noise


def modality_losses(schedule: schedules.Schedule, x0: Batch, noise: Batch, t: Batch, output: Batch,
                    prediction: str) -> dict[str, jnp.ndarray]:
  """Mean squared error per modality between the network output and its target (float32)."""
  losses = {}
  for name in sorted(x0):
    target = schedules.training_target(x0[name], noise[name], schedule.alphas_cumprod[t[name]],
                                       prediction)
    error = output[name].astype(jnp.float32) - target.astype(jnp.float32)
    losses[name] = jnp.mean(jnp.square(error))
  return losses


def denoising_loss(model_fn: Callable[[Batch, Batch], Batch], schedule: schedules.Schedule,
                   x0: Batch, rng: jax.Array, *, prediction: str = "eps",
                   shared_timesteps: bool = True, weights: Mapping[str, float] | None = None,
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The multi-modal diffusion training loss.

  Returns (loss, metrics): loss = sum over modalities of weight_m * mean MSE_m (weights default 1, the
  reference); metrics holds 'loss_<modality>' for each modality.
  """
  t_rng, noise_rng = jax.random.split(rng)
  t = sample_timesteps(t_rng, x0, schedule.num_timesteps, shared_timesteps)
  x_t, noise = noise_batch(schedule, x0, t, noise_rng)
  output = model_fn(x_t, t)
  missing = sorted(set(x0) - set(output))
  if missing:
    raise ValueError(f"model_fn returned no output for modalities {missing}")
  losses = modality_losses(schedule, x0, noise, t, output, prediction)
  weights = weights or {}
  loss = sum(weights.get(name, 1.0) * value for name, value in losses.items())
  return loss, {f"loss_{name}": value for name, value in losses.items()}
