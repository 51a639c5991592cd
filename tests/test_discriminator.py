"""The autoencoder's 3-D discriminator, its negatives and hinge losses, and the semantic-space losses
(InfoNCE with learnable temperatures, classification), on the tiny preset of configs/aist.py."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmldm_jax import config_lib
from mmldm_jax.models import discriminator as disc_lib
from mmldm_jax.models import semantic

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module")
def config():
  return config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))


@pytest.fixture(scope="module")
def disc_and_params(config):
  disc = disc_lib.discriminator_from_config(config)
  size = config.data.image_size
  variables = jax.jit(disc.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3, size, size, 3)))
  return disc, variables["params"]


def _images(value, batch=2, frames=None, size=8):
  shape = (batch,) + ((frames,) if frames else ()) + (size, size, 3)
  return jnp.full(shape, value, jnp.float32)


@pytest.mark.slow
def test_discriminator_shapes_and_logical_axes(config, disc_and_params):
  disc, params = disc_and_params
  size = config.data.image_size
  boxed = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(leaf, nn.Partitioned) for leaf in boxed)
  assert params["frame_embed"].value.shape == (3, size, size, 3)
  # One attention kind per configured resolution: spatio-temporal at ds 4, temporal at ds 2.
  names = set(nn.unbox(params))
  assert {"attn_1_0", "attn_2_0"} <= names and "attn_0_0" not in names
  # Spatio-temporal attention at ds 4 normalises [B, T, H, W, C] per clip; temporal per pixel.
  assert params["attn_1_0"]["SelfAttention_0"]["qkv"]["kernel"].value.shape == (8, 24)
  triples = jax.random.normal(jax.random.PRNGKey(1), (3, 3, size, size, 3))
  logits = jax.jit(disc.apply)({"params": nn.unbox(params)}, triples)
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


def test_triples_hold_the_four_kinds_of_negatives():
  # Each source gets a distinct constant so the stacks can be read back exactly.
  real_audio, fake_audio = _images(1.0), _images(-1.0)
  real_frames = jnp.stack([_images(2.0), _images(3.0), _images(4.0)], axis=1)   # K = 3
  fake_frames = jnp.stack([_images(-2.0), _images(-3.0), _images(-4.0)], axis=1)
  real, fakes = disc_lib.discriminator_triples(real_audio, real_frames, fake_audio, fake_frames)
  assert real.shape == (2, 3, 8, 8, 3) and fakes.shape == (8, 3, 8, 8, 3)
  values = lambda stack: [list(row) for row in np.asarray(stack[:, :, 0, 0, 0])]
  assert values(real) == [[1, 2, 4]] * 2
  assert values(fakes) == ([[-1, -2, -4]] * 2 + [[-1, -2, 4]] * 2 + [[-1, 2, -4]] * 2 +
                           [[-1, -4, -2]] * 2)
  generator = disc_lib.generator_triples(fake_audio, fake_frames)
  assert values(generator) == [[-1, -2, -4]] * 2


def test_hinge_losses():
  real = jnp.array([2.0, 0.5])
  fake = jnp.array([-3.0, 0.0, 0.25, -0.5])
  # Reals: relu(1 - x) = [0, 0.5]; fakes: relu(1 + x) = [0, 1, 1.25, 0.5]; one mean over six.
  np.testing.assert_allclose(disc_lib.discriminator_hinge_loss(real, fake), 3.25 / 6, rtol=1e-6)
  np.testing.assert_allclose(disc_lib.generator_hinge_loss(fake), (4 + 1 + 0.75 + 1.5) / 4,
                             rtol=1e-6)


@pytest.mark.slow
def test_discriminator_learns_to_separate(config, disc_and_params):
  """A few Adam steps on the hinge loss push real logits up and fake logits down."""
  disc, params = disc_and_params
  params = nn.unbox(params)
  size = config.data.image_size
  noise = 0.1 * jax.random.normal(jax.random.PRNGKey(2), (8, 3, size, size, 3))
  real, fake = 0.5 + noise[:4], -0.5 + noise[4:]
  optimizer = optax.adam(1e-2)

  def loss_fn(p):
    logits = disc.apply({"params": p}, jnp.concatenate([real, fake]))
    return disc_lib.discriminator_hinge_loss(logits[:4], logits[4:])

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  state = optimizer.init(params)
  first = None
  for _ in range(20):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  logits = jax.jit(disc.apply)({"params": params}, jnp.concatenate([real, fake]))
  assert float(loss) < 0.9 * first, (first, float(loss))
  assert float(jnp.mean(logits[:4])) > float(jnp.mean(logits[4:])) + 0.1, logits


def test_info_nce_matches_numpy_and_ranks_pairs():
  rng = np.random.default_rng(0)
  video = rng.normal(size=(6, 5))
  audio = video + 0.1 * rng.normal(size=(6, 5))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  video, audio = unit(video), unit(audio)
  t_v2a, t_a2v = 0.07, 0.2
  loss, accuracy = semantic.info_nce(jnp.asarray(video), jnp.asarray(audio), t_v2a, t_a2v)

  def cross_entropy(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_prob))
  sim = video @ audio.T
  expected = 0.5 * (cross_entropy(sim.T / t_a2v) + cross_entropy(sim / t_v2a))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(accuracy) == 1.0
  shuffled_loss, shuffled_acc = semantic.info_nce(jnp.asarray(video), jnp.asarray(audio[::-1]),
                                                  t_v2a, t_a2v)
  assert float(shuffled_loss) > float(loss) and float(shuffled_acc) < 1.0


def test_contrastive_head_temperatures_and_classifier(config):
  ae = config.autoencoder
  maps = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, ae.semantic_dim))
  head = semantic.ContrastiveHead(ae.contrastive_dim, norm_groups=config.unet.norm_groups)
  variables = jax.jit(head.init)(jax.random.PRNGKey(1), maps, maps)
  video_emb, audio_emb, t_v2a, t_a2v = jax.jit(head.apply)(variables, maps, maps)
  assert video_emb.shape == (3, ae.contrastive_dim)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(video_emb), axis=-1), 1.0, rtol=1e-5)
  assert float(t_v2a) == pytest.approx(0.07) and float(t_a2v) == pytest.approx(0.07)
  # The temperatures are parameters: the InfoNCE gradient reaches them.
  grads = jax.jit(jax.grad(lambda v: semantic.info_nce(*head.apply(v, maps, maps))[0]))(variables)
  assert float(jnp.abs(nn.unbox(grads)["params"]["temperature_v2a"]).sum()) > 0
  classifier = semantic.ClassificationHead(config.data.num_classes, config.unet.norm_groups)
  cls_vars = jax.jit(classifier.init)(jax.random.PRNGKey(2), maps, maps)
  logits = jax.jit(classifier.apply)(cls_vars, maps, maps)
  assert logits.shape == (3, config.data.num_classes)
  loss, _ = semantic.classification_loss(logits, jnp.array([0, 1, 2]))
  assert np.isfinite(float(loss))


def test_info_nce_clamps_the_temperatures():
  """A temperature pushed to or below zero by the optimiser acts as 0.01 (no sign flip)."""
  embedding = jnp.eye(3)
  loss, accuracy = semantic.info_nce(embedding, embedding, -0.5, 0.0)
  reference, _ = semantic.info_nce(embedding, embedding, semantic.MIN_TEMPERATURE,
                                   semantic.MIN_TEMPERATURE)
  assert float(accuracy) == 1.0 and np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(reference), rtol=1e-6)
