"""The hierarchical multi-modal autoencoder on the tiny preset of configs/aist.py: zero-initialised
paths, gradient routing between generator and discriminator, a short training run on synthetic
sounding clips (loss falls, audio matches its own video above chance, the decoder denoises a clip
better from its own latents than from another clip's), and the paper-size parameter count."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import synthetic
from mmldm_jax.diffusion import schedules
from mmldm_jax.models import autoencoder as ae_lib
from mmldm_jax.models import unet as unet_lib
from mmldm_jax.models import vae as vae_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
BATCH = 4
TARGETS = (3, 12)   # target frame indices inside the 16-frame clip
# The training test's steps. Measured (2026-12-07, learning rate 5e-4): after 50 steps the loss is
# 0.34 of its start, the late contrastive accuracy 0.58 and the weakest margin, the audio
# decoder's gain from its own latents, 2.7 times its bound; at 40 steps 2.3 times; at 80, 8 times
# (the test took 80 steps before, 30 more calls of the gradient program).
TRAINING_STEPS = 50


def stand_in_for_a_trained_vae(config):
  """A freshly initialised tiny VAE, made to resemble a trained one where the autoencoder notices.

  Fresh, its posterior std is ~1 against latents of std ~0.2, so the posterior samples the
  autoencoder trains on are almost pure noise (SD's VAE: std ~1e-3). Here the log-variance head is
  set to a constant -14, and config.vae.scale_factor is measured on the test clips (LDM's
  scale_by_std) instead of SD's 0.18215. Returns (config, VAE params)."""
  vae = vae_lib.build_vae(config)
  size = config.data.image_size
  params = nn.unbox(jax.jit(vae.init)(jax.random.PRNGKey(1), jnp.zeros((1, size, size, 3))))["params"]
  quant = dict(params["quant_conv"])
  half = quant["kernel"].shape[-1] // 2      # moments are [mean, logvar]
  quant["kernel"] = quant["kernel"].at[..., half:].set(0.0)
  quant["bias"] = quant["bias"].at[half:].set(-14.0)
  params = {**params, "quant_conv": quant}
  images = _clip_images(config)
  config = config.copy_and_resolve_references()
  config.vae.scale_factor = vae_lib.measured_scale_factor(vae, params, images)
  return config, params


def _clip_images(config):
  """The test clips' audio images and key frames, [N, H, W, 3] in [-1, 1]."""
  clips = _batch(config)
  audio_images = audio_lib.waveform_to_image(clips["audio"], config.audio)
  keys = clips["key_frames"]
  return jnp.concatenate([audio_images, keys.reshape((-1,) + keys.shape[2:])], axis=0)


@pytest.fixture(scope="module")
def config_and_vae():
  return stand_in_for_a_trained_vae(config_lib.load(os.path.join(CONFIGS, "aist.py:tiny")))


@pytest.fixture(scope="module")
def config(config_and_vae):
  return config_and_vae[0]


@pytest.fixture(scope="module")
def system(config):
  return ae_lib.AutoencoderSystem(config)


@pytest.fixture(scope="module")
def params(system, config_and_vae):
  # An RBG key: XLA compiles this init graph ~4x faster than with threefry keys on CPU.
  fresh = system.init(jax.random.key(0, impl="unsafe_rbg"))
  return dict(autoencoder=nn.unbox(fresh["autoencoder"]),
              discriminator=nn.unbox(fresh["discriminator"]), vae=config_and_vae[1])


@pytest.fixture(scope="module")
def batch(config):
  return _batch(config)


def _batch(config):
  """Four synthetic sounding clips, one per scene class (distinct backgrounds and sounds)."""
  frames_per_clip = config.data.num_frames
  samples = config_lib.clip_samples(config)
  clips = [synthetic.generate_video(seed, label, config) for seed, label in
           zip(range(BATCH), range(BATCH))]
  frames = np.stack([c["frames"][:frames_per_clip] for c in clips]).astype(np.float32) / 127.5 - 1
  audio = np.stack([c["audio"][:samples] for c in clips]).astype(np.float32)
  return dict(
      frames=jnp.asarray(frames),
      key_frames=jnp.asarray(frames[:, list(config.data.key_frames)]),
      target_frames=jnp.asarray(frames[:, list(TARGETS)]),
      target_indices=jnp.asarray(np.tile(np.array(TARGETS, np.float32) / frames_per_clip,
                                         (BATCH, 1))),
      audio=jnp.asarray(audio), label=jnp.asarray(np.arange(BATCH, dtype=np.int32)))


@pytest.fixture(scope="module")
def all_grads(system):
  """One compiled function for every gradient the tests need: the generator loss w.r.t. the
  autoencoder AND the discriminator, and the discriminator loss w.r.t. both."""
  def fn(ae, disc, vae, batch, rng):
    gen_rng, disc_rng = jax.random.split(rng)
    (g_loss, g_metrics), (g_ae, g_disc) = jax.value_and_grad(
        system.generator_loss, argnums=(0, 1), has_aux=True)(ae, disc, vae, batch, gen_rng)
    (d_loss, d_metrics), (d_disc, d_ae) = jax.value_and_grad(
        system.discriminator_loss, argnums=(0, 1), has_aux=True)(disc, ae, vae, batch, disc_rng)
    return dict(g_metrics=g_metrics, g_ae=g_ae, g_disc=g_disc, d_metrics=d_metrics,
                d_disc=d_disc, d_ae=d_ae)
  return jax.jit(fn)


def _model_inputs(batch):
  return {k: v for k, v in batch.items() if k != "frames"}


def _abs_sum(tree):
  # On the host: a jnp reduction per leaf would compile a program per leaf shape (75 of them,
  # 12 s here).
  return float(sum(np.abs(np.asarray(leaf, np.float64)).sum()
                   for leaf in jax.tree_util.tree_leaves(tree)))


class HostAdam:
  """Adam (Kingma & Ba, 2015) in NumPy on the host, for the training test: jitted over the
  autoencoder's 1,231 and the discriminator's 51 parameter leaves, optax's update took 17 s to
  compile, a fifth of what the test's 80 steps took then."""

  def __init__(self, params, learning_rate, b1=0.9, b2=0.999, eps=1e-8):
    self.params = jax.tree_util.tree_map(lambda leaf: np.array(leaf, np.float32), params)
    self.mu = jax.tree_util.tree_map(np.zeros_like, self.params)
    self.nu = jax.tree_util.tree_map(np.zeros_like, self.params)
    self.learning_rate, self.b1, self.b2, self.eps, self.count = learning_rate, b1, b2, eps, 0

  def step(self, grads):
    """Applies one update in place; returns the new parameters."""
    self.count += 1
    step_size = (self.learning_rate * np.sqrt(1 - self.b2 ** self.count)
                 / (1 - self.b1 ** self.count))

    def leaf(param, mu, nu, grad):
      grad = np.asarray(grad, np.float32)
      mu *= self.b1
      mu += (1 - self.b1) * grad
      nu *= self.b2
      nu += (1 - self.b2) * np.square(grad)
      param -= step_size * mu / (np.sqrt(nu) + self.eps)
    jax.tree_util.tree_map(leaf, self.params, self.mu, self.nu, grads)
    return self.params


def test_zero_initialised_paths_make_the_decoder_the_plain_unet(system, config, params):
  ae = params["autoencoder"]
  latent = system.latent_size
  rng = jax.random.split(jax.random.PRNGKey(5), 6)
  z_audio = jax.random.normal(
      rng[0], (BATCH, latent // 4, latent // 4, config.autoencoder.audio_z_channels))
  z_video = jax.random.normal(
      rng[1], (BATCH, latent // 2, latent // 2, config.autoencoder.video_z_channels))
  x = dict(audio=jax.random.normal(rng[2], (BATCH, latent, latent, 4)),
           video=jax.random.normal(rng[3], (BATCH, 3, latent, latent, 4)))
  t = dict(audio=jnp.array([10, 900, 250, 600]),
           video=jnp.array([[1, 500, 999], [20, 30, 40], [7, 300, 650], [100, 800, 2]]))

  @jax.jit
  def run(ae):
    apply = lambda *a, **k: system.model.apply({"params": ae}, *a, **k)
    index = jnp.tile(jnp.array([[0.0, 0.25, 0.5]]), (BATCH, 1))
    cond = apply(z_audio, z_video, index, jnp.arange(BATCH), jnp.ones(BATCH), jnp.ones(BATCH),
                 method="condition")
    ours = apply(x, t, cond, method="denoise")
    flat = lambda v: v.reshape((-1,) + v.shape[2:])
    plain = unet_lib.build_unet(config).apply(
        {"params": ae["unet"]}, jnp.concatenate([x["audio"], flat(x["video"])]),
        jnp.concatenate([t["audio"], flat(t["video"])]),
        jnp.concatenate([cond["audio"]["context"], flat(cond["video"]["context"])]))
    return cond, ours, plain

  cond, ours, plain = run(ae)
  for modality in ("audio", "video"):
    assert len(cond[modality]["residuals"]) == len(unet_lib.input_block_geometry(config.unet))
    assert _abs_sum(cond[modality]["residuals"]) == 0.0
    assert _abs_sum(cond[modality]["embedding"]) == 0.0
    semantic_tokens = cond[modality]["context"][..., -4:, :]   # the other modality's 2x2 tokens
    assert _abs_sum(semantic_tokens) == 0.0
    # prompt (randn * 0.1) and class token are live
    assert _abs_sum(cond[modality]["context"][..., :-4, :]) > 0.0
  assert cond["audio"]["context"].shape == (BATCH, config.autoencoder.prompt_tokens + 1 + 4,
                                            config.autoencoder.semantic_dim)
  np.testing.assert_allclose(np.asarray(ours["audio"]), np.asarray(plain[:BATCH]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours["video"]).reshape(3 * BATCH, latent, latent, 4),
                             np.asarray(plain[BATCH:]), atol=1e-5)
  # With the frame-index path still zero, only the starting noise can tell a clip's frames
  # apart: `decode_shared_frame_noise` (on) gives every frame the same noise, so the decoded
  # frames are the same computation on different rows of the batched products and reductions.
  # XLA:CPU's kernels may round rows differently (measured: 5e-6 on frames in [-1, 1]), so the
  # frames must agree to float32 rounding, a millionth-scale spread, far below the difference
  # between the two clips (other latents, other noise) that a frame the decoder told apart
  # would show: at most 1e-3 of it.
  assert config.autoencoder.decode_shared_frame_noise
  frames, _ = system.decode(ae, params["vae"], z_audio, z_video, jax.random.PRNGKey(3))
  frames = np.asarray(frames)
  spread = np.abs(frames - frames[:, :1]).max()
  between_clips = np.abs(frames[0] - frames[1]).max()
  assert between_clips > 0.1, between_clips
  assert spread <= 1e-3 * between_clips, (spread, between_clips)


def test_gradient_routing(system, params, batch, all_grads):
  ae, disc, vae = params["autoencoder"], params["discriminator"], params["vae"]
  grads = all_grads(ae, disc, vae, _model_inputs(batch), jax.random.PRNGKey(7))
  # The generator step never reaches the discriminator, nor the discriminator step the autoencoder.
  assert _abs_sum(grads["g_disc"]) == 0.0
  assert _abs_sum(grads["d_ae"]) == 0.0
  assert _abs_sum(grads["d_disc"]) > 0.0
  # At initialisation every group except the frame-index MLP (it feeds only zero-initialised
  # layers) already learns: encoders through KL, heads and projectors through their losses, the
  # U-Net with its time MLP, prompts and class token through the eps loss.
  g_ae = grads["g_ae"]
  dead = sorted(name for name, tree in g_ae.items() if _abs_sum(tree) == 0.0)
  assert dead == ["index_embed"], dead
  assert _abs_sum(g_ae["unet"]["time_embedding"]) > 0.0
  assert set(g_ae) >= {"video_encoder", "audio_encoder", "video_projector", "audio_projector",
                       "classifier", "contrastive", "unet", "video_prompt", "audio_prompt",
                       "class_embed", "video_features", "audio_features"}
  # Once the zero-initialised layers have moved (here: re-randomised), EVERY autoencoder parameter
  # gets a gradient, including the GAN path through the frozen VAE decoder. (Moved on the host:
  # as one jitted function over the 1,231 leaves it took 142 s to compile.)
  rng = np.random.default_rng(8)
  moved = jax.tree_util.tree_map(
      lambda leaf: (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)
      if not np.any(np.asarray(leaf)) else leaf, ae)
  grads = all_grads(moved, disc, vae, _model_inputs(batch), jax.random.PRNGKey(9))
  flat = jax.tree_util.tree_flatten_with_path(grads["g_ae"])[0]
  zero = {jax.tree_util.keystr(path) for path, leaf in flat if _abs_sum(leaf) == 0}
  assert not zero, zero
  assert float(grads["g_metrics"]["generator_gan_loss"]) > 0.0


def _denoising_errors(system):
  """A jitted fn(ae, vae, inputs, order) -> {'audio': [8], 'video': [8]}: the decoder's
  eps-prediction error (mean square) on the batch's own audio image and target frames, each draw
  at its own timesteps and noise (the same draws for every call), when the decoder is conditioned
  on the latents and labels of clip order[i] instead of clip i's."""
  draws = 8

  @jax.jit
  def fn(ae, vae, inputs, order):
    latents = system.batch_latents(vae, inputs, jax.random.PRNGKey(0))
    z_audio, z_video = system.encode(ae, vae, inputs)
    b, frames = latents["targets"].shape[:2]
    ones = jnp.ones((b,))
    apply = lambda *a, **k: system.model.apply({"params": ae}, *a, **k)
    cond = apply(z_audio[order], z_video[order], inputs["target_indices"],
                 inputs["label"][order], ones, ones, method="condition")
    x0 = dict(audio=latents["audio"], video=latents["targets"])
    num_t = system.schedule.num_timesteps

    def one_draw(rng):
      rngs = jax.random.split(rng, 4)
      t = dict(audio=jax.random.randint(rngs[0], (b,), 0, num_t),
               video=jax.random.randint(rngs[1], (b, frames), 0, num_t))
      noise = dict(audio=jax.random.normal(rngs[2], x0["audio"].shape),
                   video=jax.random.normal(rngs[3], x0["video"].shape))
      noisy = {m: schedules.q_sample(system.schedule, x0[m], t[m], noise[m]) for m in x0}
      out = apply(noisy, t, cond, method="denoise")
      return {m: jnp.mean(jnp.square(out[m] - noise[m])) for m in x0}
    return jax.lax.map(one_draw, jax.random.split(jax.random.PRNGKey(42), draws))
  return fn


def _other_over_own(denoising_errors, ae, vae, inputs):
  """Per modality: the mean denoising error over the three re-pairings with another clip's
  conditioning, divided by the error with the clip's own (paired draws)."""
  own = jnp.arange(BATCH)
  errors = [denoising_errors(ae, vae, inputs, jnp.roll(own, shift)) for shift in range(BATCH)]
  return {m: float(np.mean([np.mean(e[m]) for e in errors[1:]]) / np.mean(errors[0][m]))
          for m in ("audio", "video")}


def test_training_reduces_loss_aligns_modalities_and_denoises_best_from_own_latents(
    system, config, params, batch, all_grads):
  ae, disc, vae = params["autoencoder"], params["discriminator"], params["vae"]
  inputs = _model_inputs(batch)
  eval_rng = jax.random.PRNGKey(100)
  before = all_grads(ae, disc, vae, inputs, eval_rng)["g_metrics"]
  denoising_errors = _denoising_errors(system)
  ratio_before = _other_over_own(denoising_errors, ae, vae, inputs)
  ae_adam, disc_adam = HostAdam(ae, 5e-4), HostAdam(disc, 5e-4)
  contrastive = []
  for step in range(TRAINING_STEPS):
    grads = all_grads(ae, disc, vae, inputs, jax.random.PRNGKey(step))
    contrastive.append((float(grads["g_metrics"]["contrastive_loss"]),
                        float(grads["g_metrics"]["contrastive_accuracy"])))
    ae, disc = ae_adam.step(grads["g_ae"]), disc_adam.step(grads["d_disc"])
  after = all_grads(ae, disc, vae, inputs, eval_rng)["g_metrics"]
  assert float(after["loss"]) < 0.9 * float(before["loss"]), (before["loss"], after["loss"])
  # Audio finds its own video above chance (1/4 with four clips) and the InfoNCE loss falls below
  # ln 4, its value when the embeddings carry nothing. Per-step figures are noisy (CFG dropout
  # blanks an encoder input 10% of the time, posterior samples), so they are averaged over the
  # last 30 steps.
  late_loss, late_accuracy = np.mean(contrastive[-30:], axis=0)
  assert late_accuracy > 0.35, contrastive
  assert late_loss < np.log(BATCH) - 0.1, contrastive
  # The decoder uses each clip's own conditioning: its denoising error on a clip is lower with
  # that clip's latents and label than with another clip's. At initialisation the latent paths
  # are zero and only the random class token differs, so the ratio is 1 to within a few 1e-4
  # (measured: audio 0.9996, video 1.0005); after the 50 steps it was audio 1.0035, video 1.019
  # (after 80: 1.011, 1.053; 2026-12-07). The comparison is of the training objective at the same
  # timesteps and noise; decoding whole clips (4 DDIM steps and the VAE) and comparing pixels was
  # at its noise level at 80 steps (own/other 0.99-1.02 across sampler seeds).
  ratio_after = _other_over_own(denoising_errors, ae, vae, inputs)
  for modality in ("audio", "video"):
    gain, drift = ratio_after[modality] - 1, abs(ratio_before[modality] - 1)
    assert gain > 3 * drift and gain > 0, (modality, ratio_before, ratio_after)
  audio_latent, video_latent = jax.jit(system.encode)(ae, vae, inputs)
  assert audio_latent.shape == (BATCH, 2, 2, config.autoencoder.audio_z_channels)
  assert video_latent.shape == (BATCH, 4, 4, config.autoencoder.video_z_channels)


def test_paper_size_parameter_count():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  system = ae_lib.AutoencoderSystem(config)
  shapes = jax.eval_shape(system.init, jax.random.PRNGKey(0))
  assert ae_lib.parameter_count(shapes["autoencoder"]) == ae_lib.PAPER_PARAMETER_COUNT
  assert (ae_lib.parameter_count(shapes["discriminator"]) ==
          ae_lib.PAPER_DISCRIMINATOR_PARAMETER_COUNT)
  unet = nn.unbox(shapes["autoencoder"])["unet"]
  assert 859_000_000 < ae_lib.parameter_count(unet) < 860_000_000   # SD-1.5's 859.5 M
