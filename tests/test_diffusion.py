"""Schedules, forward noising, eps/v conversions and the multi-modal denoising loss."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax.diffusion import losses, schedules


@pytest.mark.parametrize("name, diffusers_name, start, end", [
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("linear", "linear", 0.0001, 0.02),
    ("cosine", "squaredcos_cap_v2", 0.0001, 0.02),
])
@pytest.mark.parity
def test_betas_match_diffusers(name, diffusers_name, start, end):
  from diffusers import DDPMScheduler
  reference = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end,
                            beta_schedule=diffusers_name)
  ours = schedules.make_betas(name, 1000, start, end)
  np.testing.assert_allclose(ours, reference.betas.double().numpy(), rtol=1e-6, atol=1e-9)
  schedule = schedules.schedule_from_betas(ours)
  np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(),
                             rtol=1e-5, atol=1e-7)


def test_config_schedule_is_the_sd_schedule():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  schedule = schedules.make_schedule(config.diffusion)
  assert schedule.num_timesteps == 1000
  np.testing.assert_allclose(np.asarray(schedule.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)
  # Mid-point of a sqrt-space linspace, squared (not the mean of the end points).
  mid = (0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * 500 / 999) ** 2
  np.testing.assert_allclose(schedule.betas[500], mid, rtol=1e-6)
  np.testing.assert_allclose(schedule.alphas_cumprod[-1], 0.0046600, rtol=1e-4)
  with pytest.raises(ValueError, match="schedule='quadratic'"):
    schedules.make_betas("quadratic", 1000)


def test_q_sample_statistics_and_jit():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  schedule = schedules.make_schedule(config.diffusion)
  x0 = jnp.full((4, 8, 8, 2), 2.0)
  t = jnp.array([0, 100, 500, 999])
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  x_t = jax.jit(schedules.q_sample)(schedule, x0, t, noise)
  a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
  expected = np.sqrt(a)[:, None, None, None] * 2.0 + np.sqrt(1 - a)[:, None, None, None] * noise
  np.testing.assert_allclose(x_t, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_and_conversion_round_trip(prediction):
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  x0 = jax.random.normal(keys[0], (3, 4, 4, 2))
  noise = jax.random.normal(keys[1], x0.shape)
  alpha_bar = jnp.array([0.9, 0.5, 0.01])
  a = alpha_bar[:, None, None, None]
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
  target = schedules.training_target(x0, noise, alpha_bar, prediction)
  x0_hat, eps_hat = schedules.output_to_x0_eps(x_t, target, alpha_bar, prediction)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-5)
  if prediction == "v":
    np.testing.assert_allclose(target, jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0, atol=1e-6)
  with pytest.raises(ValueError, match="prediction='x0'"):
    schedules.training_target(x0, noise, alpha_bar, "x0")


@pytest.fixture(scope="module")
def schedule():
  return schedules.make_schedule(config_lib.load(os.path.join(CONFIGS, "aist.py:tiny")).diffusion)


def batch(audio_batch=4, video_batch=4):
  keys = jax.random.split(jax.random.PRNGKey(2), 2)
  return {"audio": jax.random.normal(keys[0], (audio_batch, 2, 2, 4)),
          "video": jax.random.normal(keys[1], (video_batch, 4, 4, 4))}


def test_shared_timesteps_are_one_per_sample(schedule):
  seen = {}

  def model_fn(x_t, t):
    seen.update(t)
    return {name: jnp.zeros_like(value) for name, value in x_t.items()}

  losses.denoising_loss(model_fn, schedule, batch(), jax.random.PRNGKey(3))
  np.testing.assert_array_equal(seen["audio"], seen["video"])
  with pytest.raises(ValueError, match="one batch size"):
    losses.denoising_loss(model_fn, schedule, batch(4, 8), jax.random.PRNGKey(3))


def test_independent_timesteps_allow_different_batches(schedule):
  t = losses.sample_timesteps(jax.random.PRNGKey(4), batch(64, 64), 1000, shared=False)
  assert not np.array_equal(t["audio"], t["video"])
  t = losses.sample_timesteps(jax.random.PRNGKey(4), batch(2, 32), 1000, shared=False)
  assert t["audio"].shape == (2,) and t["video"].shape == (32,)
  assert int(jnp.min(t["video"])) >= 0 and int(jnp.max(t["video"])) < 1000


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_the_sum_of_per_modality_mse(schedule, prediction):
  x0 = batch(2, 6)

  def oracle(x_t, t):  # knows x0, so it can output the exact target
    out = {}
    for name in x_t:
      a = schedules.broadcast_to(schedule.alphas_cumprod[t[name]], x_t[name])
      noise = (x_t[name] - jnp.sqrt(a) * x0[name]) / jnp.sqrt(1 - a)
      out[name] = schedules.training_target(x0[name], noise, schedule.alphas_cumprod[t[name]],
                                            prediction)
    return out

  loss, metrics = jax.jit(lambda key: losses.denoising_loss(
      oracle, schedule, x0, key, prediction=prediction, shared_timesteps=False))(
          jax.random.PRNGKey(5))
  assert float(loss) < 1e-6 and set(metrics) == {"loss_audio", "loss_video"}

  def zeros(x_t, t):
    return {name: jnp.zeros_like(value) for name, value in x_t.items()}

  x0 = batch(256, 256)
  loss, metrics = losses.denoising_loss(zeros, schedule, x0, jax.random.PRNGKey(6))
  np.testing.assert_allclose(loss, metrics["loss_audio"] + metrics["loss_video"], rtol=1e-6)
  if prediction == "eps":  # E[eps^2] = 1 per modality
    np.testing.assert_allclose(loss, 2.0, rtol=0.05)
  weighted, _ = losses.denoising_loss(zeros, schedule, x0, jax.random.PRNGKey(6),
                                      weights={"audio": 0.0})
  np.testing.assert_allclose(weighted, metrics["loss_video"], rtol=1e-6)


def test_min_snr_weighting_caps_the_clean_latent_weight_at_gamma():
  config = config_lib.diffusion_config()
  schedule = schedules.make_schedule(config)
  t = jnp.array([0, 100, 300, 500, 800, 999], jnp.int32)
  alphas = schedule.alphas_cumprod[t]
  snr = np.asarray(alphas / (1.0 - alphas))
  gamma = 5.0
  weights = np.asarray(losses.min_snr_weights(alphas, "eps", gamma))
  # As an x0 error, eps-MSE weighs a step by its SNR; the weighted loss by min(SNR, gamma).
  np.testing.assert_allclose(weights * snr, np.minimum(snr, gamma), rtol=1e-5)
  assert np.all(weights[snr <= gamma] == 1.0) and np.all(weights[snr > gamma] < 1.0)
  v_weights = np.asarray(losses.min_snr_weights(alphas, "v", gamma))
  np.testing.assert_allclose(v_weights * (snr + 1.0), np.minimum(snr, gamma), rtol=1e-5)

  # In the per-modality loss: gamma 0 is plain MSE; a per-example weight multiplies each item's
  # squared error, for audio [B] and video [B, F] timesteps alike.
  rng = np.random.default_rng(0)
  x0 = {"audio": jnp.asarray(rng.normal(size=(6, 2, 2, 3)), jnp.float32),
        "video": jnp.asarray(rng.normal(size=(3, 2, 2, 2, 3)), jnp.float32)}
  noise = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in x0.items()}
  output = {k: jnp.zeros_like(v) for k, v in x0.items()}
  steps = {"audio": t, "video": t.reshape(3, 2)}
  plain = losses.modality_losses(schedule, x0, noise, steps, output, "eps")
  same = losses.modality_losses(schedule, x0, noise, steps, output, "eps", 0.0)
  weighted = losses.modality_losses(schedule, x0, noise, steps, output, "eps", gamma)
  for name in x0:
    assert float(same[name]) == float(plain[name])
    per_item = np.mean(np.square(np.asarray(noise[name])).reshape(6, -1), axis=1)
    assert float(weighted[name]) == pytest.approx(float(np.mean(per_item * weights)), rel=1e-5)


def test_noise_fn_shapes_the_noise_of_both_the_input_and_the_target(schedule):
  """`noise_fn` replaces the draw before noising, so x_t and the training target see the same
  noise: an oracle that reads the noise back from x_t still scores 0, and a noise_fn that gives
  the video one draw for all of its 4 channel blocks shows up in x_t."""
  from mmldm_jax.diffusion import samplers
  x0 = batch(8, 8)
  seen = {}

  def one_draw(noise, rng):
    return dict(noise, video=samplers.share_across_groups(rng, noise["video"], 4, 1.0))

  def oracle(x_t, t):
    out = {}
    for name in x_t:
      a = schedules.broadcast_to(schedule.alphas_cumprod[t[name]], x_t[name])
      seen[name] = (x_t[name] - jnp.sqrt(a) * x0[name]) / jnp.sqrt(1 - a)
      out[name] = seen[name]
    return out

  loss, _ = losses.denoising_loss(oracle, schedule, x0, jax.random.PRNGKey(7), noise_fn=one_draw)
  assert float(loss) < 1e-6
  blocks = np.asarray(seen["video"]).reshape(8, 4, 4, 4, 1)
  np.testing.assert_allclose(blocks, np.broadcast_to(blocks[..., :1, :], blocks.shape), atol=1e-4)
  independent, _ = losses.denoising_loss(oracle, schedule, x0, jax.random.PRNGKey(7))
  blocks = np.asarray(seen["video"]).reshape(8, 4, 4, 4, 1)
  assert np.abs(blocks - blocks[..., :1, :]).max() > 0.5
