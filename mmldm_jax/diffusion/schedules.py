"""Noise schedules of the discrete-time (DDPM) forward process and the conversions between
model outputs (eps or v) and the clean-data estimate.

The forward process is x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with t in
[0, num_timesteps). Betas are built in float64 with numpy (as the PyTorch reference does) and stored
as float32 jnp arrays in a `Schedule` pytree, so a schedule can be passed through `jax.jit`.

Schedules (config.diffusion.schedule):
  'scaled_linear'  Stable Diffusion / LDM "linear": linspace(sqrt(beta_start), sqrt(beta_end))**2.
                   MM-LDM uses it with 0.00085 .. 0.012 for both diffusion models.
  'linear'         DDPM: linspace(beta_start, beta_end).
  'cosine'         Nichol & Dhariwal (2021): alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)**2,
                   s = 0.008, betas clipped at 0.999 (beta_start / beta_end are ignored).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTIONS = ("eps", "v")


@struct.dataclass
class Schedule:
  """Per-timestep constants of the forward process, each a float32 array [num_timesteps]."""
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> np.ndarray:
  """Betas (float64 numpy, [num_timesteps]) of one of the named schedules."""
  if num_timesteps <= 0:
    raise ValueError(f"num_timesteps={num_timesteps}: expected a positive count")
  if schedule == "scaled_linear":
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if schedule == "cosine":
    offset = 0.008
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
  raise ValueError(f"schedule={schedule!r}: expected 'scaled_linear', 'linear' or 'cosine'")


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Builds the `Schedule` pytree from float64 betas."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  as_jnp = lambda values: jnp.asarray(values, dtype=jnp.float32)
  # Concrete arrays even when built inside jax.jit, so samplers can read them at trace time.
  with jax.ensure_compile_time_eval():
    return Schedule(
        betas=as_jnp(betas),
        alphas_cumprod=as_jnp(alphas_cumprod),
        sqrt_alphas_cumprod=as_jnp(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=as_jnp(np.sqrt(1.0 - alphas_cumprod)))


def make_schedule(diffusion_config) -> Schedule:
  """The schedule described by `config.diffusion` (num_timesteps, schedule, beta_start, beta_end)."""
  return schedule_from_betas(make_betas(
      diffusion_config.schedule, diffusion_config.num_timesteps,
      diffusion_config.beta_start, diffusion_config.beta_end))


def broadcast_to(values: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes per-sample values [B] (or a scalar) so they broadcast against x [B, ...]."""
  values = jnp.asarray(values, dtype=x.dtype)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Forward noising: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, t int [B]."""
  return (broadcast_to(schedule.sqrt_alphas_cumprod[t], x0) * x0 +
          broadcast_to(schedule.sqrt_one_minus_alphas_cumprod[t], x0) * noise)


def training_target(x0: jnp.ndarray, noise: jnp.ndarray, alpha_bar: jnp.ndarray,
                    prediction: str) -> jnp.ndarray:
  """What the network regresses: eps, or v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
  if prediction == "eps":
    return noise
  if prediction == "v":
    alpha_bar = broadcast_to(alpha_bar, x0)
    return jnp.sqrt(alpha_bar) * noise - jnp.sqrt(1.0 - alpha_bar) * x0
  raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")


def output_to_x0_eps(x_t: jnp.ndarray, output: jnp.ndarray, alpha_bar: jnp.ndarray,
                     prediction: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Converts a network output (eps or v) at noise level alpha_bar into (x0, eps) estimates.

  alpha_bar is a scalar or per-sample [B]; it need not be on the discrete grid, so samplers can use it
  with any noise level.
  """
  alpha_bar = broadcast_to(alpha_bar, x_t)
  sqrt_a, sqrt_1ma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
  if prediction == "eps":
    return (x_t - sqrt_1ma * output) / sqrt_a, output
  if prediction == "v":
    return sqrt_a * x_t - sqrt_1ma * output, sqrt_1ma * x_t + sqrt_a * output
  raise ValueError(f"prediction={prediction!r}: expected one of {PREDICTIONS}")
