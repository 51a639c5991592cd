"""Samplers for multi-modal diffusion models: DDIM and DPM-Solver++(2M), as pure jittable functions.

Every sampler runs its steps in one `lax.scan` and works on a dict of modalities
({'audio': [B, ...], 'video': [B, ...]}), all with the same batch size B. The network is given as

    model_fn(x: dict, t: int32 [B'], cond) -> dict of eps (or v, see `prediction`)

where B' is B, or 2B when classifier-free guidance batches the unconditional and the conditional branch
into one call (unconditional first). `cond` / `uncond` are pytrees whose leaves have a leading batch
axis B (e.g. {'context': [B, 77, 768], 'cond_audio': ..., 'cond_video': ...}); `None` means the model
takes no conditioning.

Guidance: `guidance = {'audio': s_a, 'video': s_v}` (Python floats); per modality
out = out_u + s_m * (out_c - out_u). Scale 1 is the conditional model alone; when every scale is 1 (or
`uncond` is None) the unconditional branch is not evaluated at all. Guidance acts on the raw output
(eps or v); both conversions to x0/eps are affine in the output, so this equals guiding eps.

Replacement conditioning (`fixed = {'audio': clean_latent}`, MM-Diffusion-style zero-shot A2V/V2A):
before every model call the fixed modality is set to its clean latent noised to the current level with
fresh noise, and the sample returns the clean latent for it. This is beside the trained-in A2V/V2A
conditioning of the DiT, which goes through `cond`.

The schedule must be concrete (closed over, not a traced jit argument): step coefficients are computed
in float64 numpy from its betas when the sampler is traced.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax.diffusion import schedules

Batch = Mapping[str, jnp.ndarray]
ModelFn = Callable[[Batch, jnp.ndarray, Any], Batch]


# ------------------------------------------------------------------------------------------------
# Time discretisations

def ddim_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """LDM's `make_ddim_timesteps(..., 'uniform')`, ascending: range(0, T, T // steps) + 1.

  For T=1000 and 50 steps: 1, 21, ..., 981. The +1 makes the last step land on alpha_bar[0]. When the
  shifted grid would index past the schedule (steps == T, the LDM code fails there) the unshifted
  range(0, T, 1) is used instead.
  """
  if not 0 < steps <= num_timesteps:
    raise ValueError(f"steps={steps}: expected 1 <= steps <= num_timesteps={num_timesteps}")
  grid = np.arange(0, num_timesteps, num_timesteps // steps)
  return grid + 1 if grid[-1] + 1 < num_timesteps else grid


def _alphas_cumprod64(schedule: schedules.Schedule) -> np.ndarray:
  if isinstance(schedule.betas, jax.core.Tracer):
    raise ValueError("the sampler needs a concrete schedule: close over it (or build it with "
                     "make_schedule inside the jitted function) instead of passing it as a jit "
                     "argument")
  return np.cumprod(1.0 - np.asarray(schedule.betas, dtype=np.float64))


def dpm_solver_timesteps(schedule: schedules.Schedule, steps: int) -> np.ndarray:
  """Descending integer timesteps from T-1 to 0, uniform in log-SNR lambda = log(alpha / sigma).

  Uniform-lambda spacing is what DPM-Solver recommends for latent models of this size; rounding to
  the integer grid the network was trained on can merge neighbours, so fewer than `steps` times may come
  back when steps is close to T.
  """
  if steps < 2:
    raise ValueError(f"steps={steps}: DPM-Solver++ needs at least 2 steps")
  alpha_bar = _alphas_cumprod64(schedule)
  log_snr = 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))  # decreasing in t
  targets = np.linspace(log_snr[-1], log_snr[0], steps)        # from t = T-1 up to t = 0
  times = np.interp(targets, log_snr[::-1], np.arange(len(alpha_bar))[::-1])
  rounded = np.round(times).astype(np.int64)
  return np.unique(rounded)[::-1]


# ------------------------------------------------------------------------------------------------
# Shared pieces

def guided_output(model_fn: ModelFn, x: Batch, t: jnp.ndarray, cond: Any, uncond: Any,
                  guidance: Mapping[str, float] | None) -> dict[str, jnp.ndarray]:
  """One network evaluation with per-modality classifier-free guidance (see the module doc)."""
  scales = dict(guidance or {})
  if uncond is None or all(float(scale) == 1.0 for scale in scales.values()):
    return dict(model_fn(x, t, cond))
  if cond is None:
    raise ValueError("guidance needs `cond` and `uncond`; got cond=None")
  batch = t.shape[0]
  doubled = lambda values: jnp.concatenate([values, values], axis=0)
  both_x = {name: doubled(value) for name, value in x.items()}
  both_cond = jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
  both = model_fn(both_x, doubled(t), both_cond)
  result = {}
  for name, value in both.items():
    out_u, out_c = value[:batch], value[batch:]
    result[name] = out_u + scales.get(name, 1.0) * (out_c - out_u)
  return result


def _replace_fixed(x: dict, fixed: Batch | None, alpha_bar: jnp.ndarray, rng: jax.Array) -> dict:
  """Sets each fixed modality to its clean latent noised to alpha_bar (fresh noise)."""
  if not fixed:
    return x
  x = dict(x)
  for index, name in enumerate(sorted(fixed)):
    noise = jax.random.normal(jax.random.fold_in(rng, index), fixed[name].shape, fixed[name].dtype)
    x[name] = jnp.sqrt(alpha_bar) * fixed[name] + jnp.sqrt(1.0 - alpha_bar) * noise
  return x


def _check_inputs(x_init: Batch, fixed: Batch | None) -> None:
  sizes = {value.shape[0] for value in x_init.values()}
  if len(sizes) != 1:
    raise ValueError(f"x_init modalities need one batch size, got "
                     f"{ {name: value.shape for name, value in x_init.items()} }")
  for name, value in (fixed or {}).items():
    if name not in x_init or value.shape != x_init[name].shape:
      raise ValueError(f"fixed[{name!r}] has shape {getattr(value, 'shape', None)}; expected the "
                       f"shape of x_init[{name!r}] "
                       f"{x_init[name].shape if name in x_init else '(missing modality)'}")


def _finish(x: dict, fixed: Batch | None) -> dict:
  return {**x, **dict(fixed or {})}


# ------------------------------------------------------------------------------------------------
# DDIM

def ddim_sample(model_fn: ModelFn, schedule: schedules.Schedule, x_init: Batch, rng: jax.Array, *,
                steps: int, eta: float = 0.0, cond: Any = None, uncond: Any = None,
                guidance: Mapping[str, float] | None = None, prediction: str = "eps",
                fixed: Batch | None = None, timesteps: np.ndarray | None = None,
                ) -> dict[str, jnp.ndarray]:
  """DDIM (Song et al. 2021) as in LDM's DDIMSampler, over a dict of modalities.

  x_init: the starting noise per modality. timesteps: ascending model timesteps (default
  `ddim_timesteps(T, steps)`). Coefficients follow LDM's `make_ddim_sampling_parameters`:
  alpha_prev of the first (lowest) step is alpha_bar[0], sigma = eta * sqrt((1 - a_prev) / (1 - a) *
  (1 - a / a_prev)). eta = 1 with all T timesteps is ancestral (DDPM) sampling. Like LDM, the result
  is the last x_prev (at noise level alpha_bar[0] for the default grid), not the last x0 estimate.
  """
  _check_inputs(x_init, fixed)
  if timesteps is None:
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
  timesteps = np.asarray(timesteps, dtype=np.int64)
  alpha_bar = _alphas_cumprod64(schedule)
  alphas = alpha_bar[timesteps]
  alphas_prev = np.concatenate([alpha_bar[:1], alpha_bar[timesteps[:-1]]])
  sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  # The scan runs from the noisiest step down.
  per_step = tuple(jnp.asarray(values[::-1], dtype=jnp.float32)
                   for values in (alphas, alphas_prev, sigmas))
  step_keys = jax.random.split(rng, len(timesteps))
  batch = next(iter(x_init.values())).shape[0]

  def step(x, inputs):
    t, a_t, a_prev, sigma, key = inputs
    replace_key, noise_key = jax.random.split(key)
    x = _replace_fixed(x, fixed, a_t, replace_key)
    output = guided_output(model_fn, x, jnp.full((batch,), t, jnp.int32), cond, uncond, guidance)
    new_x = {}
    for index, name in enumerate(sorted(x)):
      x0, eps = schedules.output_to_x0_eps(x[name], output[name], a_t, prediction)
      direction = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma ** 2, 0.0)) * eps
      noise = jax.random.normal(jax.random.fold_in(noise_key, index), x[name].shape, x[name].dtype)
      new_x[name] = jnp.sqrt(a_prev) * x0 + direction + sigma * noise
    return new_x, None

  inputs = (jnp.asarray(timesteps[::-1], jnp.int32),) + per_step + (step_keys,)
  x, _ = jax.lax.scan(step, dict(x_init), inputs)
  return _finish(x, fixed)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)

def dpm_solver_pp_sample(model_fn: ModelFn, schedule: schedules.Schedule, x_init: Batch,
                         rng: jax.Array, *, steps: int, cond: Any = None, uncond: Any = None,
                         guidance: Mapping[str, float] | None = None, prediction: str = "eps",
                         fixed: Batch | None = None) -> dict[str, jnp.ndarray]:
  """DPM-Solver++(2M) (Lu et al. 2022): multistep, second order, data (x0) prediction.

  Evaluates the network at `dpm_solver_timesteps(schedule, steps)` (T-1 ... 0). Between evaluations i
  and i+1, with h = lambda_{i+1} - lambda_i and D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}
  (r = h_{i-1} / h_i; D = x0_i on the first step):
      x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h) - 1) D.
  After the last evaluation (t = 0) the sample is its x0 estimate. Deterministic; rng only feeds the
  replacement noise of `fixed` modalities.
  """
  _check_inputs(x_init, fixed)
  times = dpm_solver_timesteps(schedule, steps)
  alpha_bar = _alphas_cumprod64(schedule)[times]
  alpha, sigma = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
  log_snr = np.log(alpha) - np.log(sigma)
  h = np.diff(log_snr)                                   # > 0, one per update
  # Coefficients of x_next = sigma_ratio * x + data_coef * D, D = (1 + c) x0 - c x0_prev.
  sigma_ratio = np.append(sigma[1:] / sigma[:-1], 0.0)   # the final "update" returns D = x0
  data_coef = np.append(-alpha[1:] * np.expm1(-h), 1.0)
  extrapolation = np.zeros(len(times))
  extrapolation[1:-1] = 0.5 * h[1:] / h[:-1]             # 1/(2r); first and final steps first order
  per_step = tuple(jnp.asarray(values, jnp.float32)
                   for values in (alpha_bar, sigma_ratio, data_coef, extrapolation))
  step_keys = jax.random.split(rng, len(times))
  batch = next(iter(x_init.values())).shape[0]

  def step(carry, inputs):
    x, x0_prev = carry
    t, a_t, ratio, coef, c, key = inputs
    x = _replace_fixed(x, fixed, a_t, key)
    output = guided_output(model_fn, x, jnp.full((batch,), t, jnp.int32), cond, uncond, guidance)
    new_x, new_x0 = {}, {}
    for name in sorted(x):
      x0, _ = schedules.output_to_x0_eps(x[name], output[name], a_t, prediction)
      data = (1.0 + c) * x0 - c * x0_prev[name]
      new_x[name] = ratio * x[name] + coef * data
      new_x0[name] = x0
    return (new_x, new_x0), None

  zeros = {name: jnp.zeros_like(value) for name, value in x_init.items()}
  inputs = (jnp.asarray(times, jnp.int32),) + per_step + (step_keys,)
  (x, _), _ = jax.lax.scan(step, (dict(x_init), zeros), inputs)
  return _finish(x, fixed)


# ------------------------------------------------------------------------------------------------
# Config entry point

def initial_noise(rng: jax.Array, shapes: Mapping[str, tuple[int, ...]],
                  dtype=jnp.float32) -> dict[str, jnp.ndarray]:
  """Standard normal starting points, one per modality."""
  names = sorted(shapes)
  keys = jax.random.split(rng, len(names))
  return {name: jax.random.normal(key, tuple(shapes[name]), dtype) for name, key in zip(names, keys)}


def share_across_groups(rng: jax.Array, noise: jnp.ndarray, groups: int,
                        shared: float) -> jnp.ndarray:
  """Standard normal `noise` [..., groups * c] with a `shared` part of its variance common to its
  `groups` blocks of channels: sqrt(shared) * one draw (from `rng`) for every block + sqrt(1 -
  shared) * each block's own; every element stays standard normal, and two blocks correlate by
  `shared`. 0 returns `noise`; 1 gives every block the one draw.

  For the video latent with one block of channels per key frame
  (`autoencoder.video_latent_per_key_frame`): with independent starting noise per key frame a
  small DiT drew key frames whose objects disagree in colour and place, and the decoded clip
  jumped between them; started from one draw, the key frames come out alike
  (`config.sample.shared_key_frame_noise`). A DiT trained on independent noise was not trained
  from such starting points, so for it the effect is measured, not derived; with
  `config.dit.shared_key_frame_noise` the DiT is trained on the same correlated noise
  (`dit.key_frame_noise_fn`), as in PYoCo's mixed noise for video diffusion."""
  if not 0.0 <= shared <= 1.0:
    raise ValueError(f"share_across_groups: shared={shared}, expected a share in [0, 1]")
  if noise.shape[-1] % groups:
    raise ValueError(f"share_across_groups: {noise.shape[-1]} channels do not split into "
                     f"{groups} blocks")
  if shared == 0.0:
    return noise
  blocks = noise.reshape(noise.shape[:-1] + (groups, noise.shape[-1] // groups))
  common = jax.random.normal(rng, blocks.shape[:-2] + (1, blocks.shape[-1]), noise.dtype)
  mixed = math.sqrt(shared) * common + math.sqrt(1.0 - shared) * blocks
  return mixed.reshape(noise.shape)


def sample(config, model_fn: ModelFn, schedule: schedules.Schedule, x_init: Batch, rng: jax.Array,
           *, cond: Any = None, uncond: Any = None, guidance: Mapping[str, float] | None = None,
           fixed: Batch | None = None) -> dict[str, jnp.ndarray]:
  """Runs the sampler named by `config.sample` (sampler, steps, eta) with `config.diffusion.prediction`.

  guidance defaults to {'audio': config.sample.guidance_audio, 'video': config.sample.guidance_video}.
  """
  if guidance is None:
    guidance = {"audio": config.sample.guidance_audio, "video": config.sample.guidance_video}
  common = dict(steps=config.sample.steps, cond=cond, uncond=uncond, guidance=guidance,
                prediction=config.diffusion.prediction, fixed=fixed)
  if config.sample.sampler == "ddim":
    return ddim_sample(model_fn, schedule, x_init, rng, eta=config.sample.eta, **common)
  if config.sample.sampler == "dpm_solver++":
    return dpm_solver_pp_sample(model_fn, schedule, x_init, rng, **common)
  raise ValueError(f"config.sample.sampler={config.sample.sampler!r}: expected 'ddim' or "
                   f"'dpm_solver++'")
