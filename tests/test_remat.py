"""Rematerialisation (config.unet.remat_policy, config.autoencoder.remat_policy) changes memory, not
the model: the same parameter tree, the same loss and the same gradients as without it (tiny
preset).

Tolerance: remat recomputes the forward pass inside the backward pass with the same operations, so
the loss comes out bitwise equal here, but XLA fuses the recomputed forward differently, which
reorders float32 sums in the gradients (measured on CPU, U-Net: up to 1.7e-6 of a leaf's largest
entry, median 5e-7). The bound is derived from the computation itself: the float32 noise floor of
the same gradients computed with the batch in reverse order (the same function, another summation
order; U-Net: 7e-7), times 4.
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.models import autoencoder as ae_lib
from mmldm_jax.models import perceptual, semantic
from mmldm_jax.models import unet as unet_lib

from conftest import CONFIGS

NOISE_FACTOR = 4.0
FLOOR = 1e-2


@pytest.fixture(scope="module")
def config():
  return config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))


def shapes(tree):
  return jax.tree_util.tree_map(jnp.shape, nn.unbox(tree))


def relative_differences(grads_a, grads_b) -> np.ndarray:
  """Per leaf: max |a - b| / max |a| (the trees must have the same paths). A leaf whose gradient is
  zero in exact arithmetic (a conv bias right before a GroupNorm) holds only rounding noise; its
  scale is floored at FLOOR times the largest gradient of the tree."""
  paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(grads_a)[0])
  paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(grads_b)[0])
  assert paths_a == paths_b
  leaves_a = [np.asarray(a) for a in leaves_a]
  floor = FLOOR * max(float(np.abs(a).max()) for a in leaves_a)
  return np.array([np.abs(a - np.asarray(b)).max() / max(float(np.abs(a).max()), floor)
                   for a, b in zip(leaves_a, leaves_b)])


def perturbed(params, seed=1, scale=0.05):
  """Non-zero everywhere (zero-initialised convs would hide the blocks behind them)."""
  rng = np.random.default_rng(seed)   # on the host: no program to compile per leaf shape
  return jax.tree_util.tree_map(
      lambda leaf: leaf + (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype), params)


def assert_remat_within_noise(loss_fn, params, plain, remat, batch, reversed_batch):
  """loss_fn(model, params, batch) -> scalar. Compares value_and_grad under `plain` and `remat`
  against the noise floor of `plain` on the reversed batch."""
  # The batch is an argument, not a constant, so that both batches share one compiled program.
  plain_step, remat_step = (jax.jit(jax.value_and_grad(
      lambda p, b, model=model: loss_fn(model, p, b))) for model in (plain, remat))
  loss, grads = plain_step(params, batch)
  loss_reversed, grads_reversed = plain_step(params, reversed_batch)
  loss_remat, grads_remat = remat_step(params, batch)
  loss_noise = abs(float(loss_reversed) - float(loss)) / abs(float(loss))
  assert abs(float(loss_remat) - float(loss)) <= NOISE_FACTOR * max(loss_noise, 1.2e-7) * abs(
      float(loss))
  noise = relative_differences(grads, grads_reversed).max()
  assert 0 < noise < 1e-5, noise  # float32 rounding, not a different function
  differences = relative_differences(grads, grads_remat)
  assert differences.max() <= NOISE_FACTOR * noise, (differences.max(), noise)


def test_unet_remat_same_parameters_loss_and_gradients(config):
  # Two levels of one ResBlock each, with attention at the second level and in the mid block:
  # every kind of rematerialised block (ResBlock with and without a channel change,
  # SpatialTransformer), 12 blocks instead of the tiny preset's 38: the two gradient programs are
  # most of this test's time, and their compile time grows with the number of blocks (with
  # attention at both levels, 15 blocks: 19.6 s against 14.7 s alone, 2026-12-07).
  config = config.copy_and_resolve_references()
  config.unet.update(channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,))
  plain = unet_lib.build_unet(config)
  remat = unet_lib.build_unet(config, remat="nothing_saveable")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, config.unet.in_channels)), jnp.float32)
  batch = dict(x=x, t=jnp.array([3.0, 711.0]),
               context=jnp.asarray(rng.normal(size=(2, 5, config.unet.context_dim)), jnp.float32),
               target=jnp.asarray(rng.normal(size=x.shape), jnp.float32))
  init = lambda model: (lambda key: model.init(key, batch["x"], batch["t"], batch["context"])[
      "params"])
  key = jax.random.PRNGKey(0)
  assert shapes(jax.eval_shape(init(remat), key)) == shapes(jax.eval_shape(init(plain), key))
  params = perturbed(nn.unbox(jax.jit(init(plain))(key)))

  def loss_fn(model, p, b):
    out = model.apply({"params": p}, b["x"], b["t"], b["context"])
    return jnp.mean(jnp.square(out - b["target"]))
  assert_remat_within_noise(loss_fn, params, plain, remat, batch,
                            jax.tree_util.tree_map(lambda v: v[::-1], batch))


def test_build_unet_reads_the_config_policy():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  config.unet.remat_policy = "nothing_saveable"
  assert unet_lib.build_unet(config).remat == "nothing_saveable"
  with pytest.raises(ValueError, match="config.unet.remat_policy='everything'"):
    unet_lib.build_unet(config, remat="everything").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)),
        jnp.zeros((1, 2, config.unet.context_dim)))


def test_autoencoder_remat_same_parameters_loss_and_gradients():
  """The autoencoder's rematerialised parts (encoders, feature injector, projector) at small
  widths; one loss over all their outputs."""

  def parts(remat):
    return dict(
        video=perceptual.PerceptualEncoder(8, 16, (1, 2), 1, (2,), 8, True, norm_groups=8,
                                           remat=remat),
        audio=perceptual.PerceptualEncoder(8, 16, (1, 2), 1, (1,), 8, False, norm_groups=8,
                                           remat=remat),
        inject=perceptual.FeatureInjector((16, 16, 32), (1, 2, 4), 2, norm_groups=8, remat=remat),
        project=semantic.Projector(16, 16, (1, 2), 1, 8, 8, remat=remat))

  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  batch = dict(video=normal(2, 3, 8, 8, 4), audio=normal(2, 8, 8, 4), z=normal(2, 4, 4, 8),
               emb=normal(2, 20))
  inputs = lambda b: dict(video=(b["video"],), audio=(b["audio"],), inject=(b["z"], b["emb"]),
                          project=(b["z"],))

  class Parts(nn.Module):
    remat: str

    @nn.compact
    def __call__(self, b):
      outs = {name: module(*inputs(b)[name]) for name, module in parts(self.remat).items()}
      return sum(jnp.mean(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(outs))

  plain, remat = Parts("none"), Parts("nothing_saveable")
  key = jax.random.PRNGKey(0)
  init = lambda model: (lambda k: model.init(k, batch)["params"])
  assert shapes(jax.eval_shape(init(remat), key)) == shapes(jax.eval_shape(init(plain), key))
  params = perturbed(nn.unbox(jax.jit(init(plain))(key)))
  assert_remat_within_noise(lambda model, p, b: model.apply({"params": p}, b), params, plain,
                            remat, batch, jax.tree_util.tree_map(lambda v: v[::-1], batch))


def test_autoencoder_passes_its_policy_on():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  config.autoencoder.remat_policy = "nothing_saveable"
  model = ae_lib.AutoencoderSystem(config).model
  policies, _ = model.init_with_output(  # runs setup(), which builds the submodules
      jax.random.PRNGKey(0), method=lambda m: {m.video_encoder.remat, m.audio_encoder.remat,
                                                 m.video_features.remat, m.audio_features.remat,
                                                 m.video_projector.remat, m.audio_projector.remat})
  assert policies == {"nothing_saveable"}
