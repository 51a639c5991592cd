"""`perceptual.FeatureInjector`: zero at initialisation either way; with a single zero-initialised
layer the frame index reaches the first update."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmldm_jax.models import perceptual

pytestmark = pytest.mark.slow   # each test compiles small models


def _injector(double_zero):
  return perceptual.FeatureInjector((16, 32), (1, 2), 2, norm_groups=8,
                                    zero_init_block_out=double_zero)


def _zero_conv_gradients(double_zero, emb):
  """Gradient of a fixed loss w.r.t. the zero 1x1 convs, at initialisation, for embedding `emb`."""
  injector = _injector(double_zero)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  params = nn.unbox(jax.jit(injector.init)(jax.random.key(1), z, emb))["params"]
  outputs = jax.jit(injector.apply)({"params": params}, z, emb)
  assert all(float(jnp.abs(out).max()) == 0.0 for out in outputs)   # zero at init either way

  def loss(zero_convs):
    merged = {**params, **zero_convs}
    return sum(jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape))
               for out in injector.apply({"params": merged}, z, emb))
  zero_convs = {name: value for name, value in params.items() if name.startswith("zero_conv")}
  return jax.jit(jax.grad(loss))(zero_convs)


def test_single_zero_init_lets_the_frame_index_reach_the_first_update():
  first, last = (jax.random.normal(jax.random.key(k), (2, 64)) for k in (2, 3))
  for double_zero, index_matters in ((True, False), (False, True)):
    a, b = (_zero_conv_gradients(double_zero, emb) for emb in (first, last))
    gap = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                           jax.tree_util.tree_leaves(b)))
    scale = max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(a))
    assert scale > 0.0
    if index_matters:
      assert gap > 1e-3 * scale, (double_zero, gap, scale)
    else:
      np.testing.assert_array_equal(gap, 0.0)


def _video_encoder(per_key_frame, z_channels=8):
  return perceptual.PerceptualEncoder(
      z_channels=z_channels, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
      attention_resolutions=(1,), head_channels=4, video=True, norm_groups=4,
      per_key_frame=per_key_frame)


def test_per_key_frame_video_latent_has_the_content_slot_shape_and_one_group_per_key_frame():
  key_latents = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 4))
  shapes = {}
  for per_key_frame in (False, True):
    encoder = _video_encoder(per_key_frame)
    # Jitted: run op by op, init and apply took 15 s on 2 cores (a program per op), jitted 2 s.
    variables = jax.jit(encoder.init)(jax.random.key(1), key_latents)
    (mean, logvar), state = jax.jit(functools.partial(
        encoder.apply, capture_intermediates=True, mutable=["intermediates"]))(
            variables, key_latents)
    shapes[per_key_frame] = mean.shape
    assert logvar.shape == mean.shape
    assert ("content" in variables["params"]) != per_key_frame   # no content slot when stacked
    if per_key_frame:
      # Channel group t (2 channels each) is the head's output at key frame t.
      per_frame_mean = state["intermediates"]["mean_head_out"]["__call__"][0]  # [B, T, h, w, 2]
      for t in range(4):
        np.testing.assert_array_equal(mean[..., 2 * t:2 * t + 2], per_frame_mean[:, t])
  assert shapes[False] == shapes[True] == (2, 4, 4, 8)
  with np.testing.assert_raises_regex(ValueError, "cannot be split over 4 key frames"):
    _video_encoder(True, z_channels=6).init(jax.random.key(1), key_latents)
