"""SD KL-VAE: parity with diffusers' AutoencoderKL (random weights, tiny preset), full-size parameter
count, posterior, and the stage-0 loss (freezing, adaptive weight, discriminator start, hinge)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.convert import vae as convert_vae
from mmldm_jax.models import vae as vae_lib

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD_VAE_PARAMS = 83_653_863


def torch_vae(vae_config, device=None):
  levels = len(vae_config.channel_mult)
  with torch.device(device or "cpu"):
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vae_config.channels * m for m in vae_config.channel_mult),
        layers_per_block=vae_config.num_res_blocks, latent_channels=vae_config.z_channels,
        norm_num_groups=vae_config.norm_groups).eval()


def randomise(module, seed=0):
  """Every weight random and O(1)-preserving (no zero-init layer may hide a mismatch)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return module


@pytest.fixture(scope="module")
def config():
  return config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))


@pytest.fixture(scope="module")
def converted(config):
  reference = randomise(torch_vae(config.vae))
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  params, report = convert_vae.convert_vae_state_dict(state_dict, config)
  assert report["format"] == "diffusers"
  return reference, params


def test_encoder_and_decoder_match_diffusers(config, converted):
  reference, params = converted
  model = vae_lib.build_vae(config)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  posterior = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, images)
  latents = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
  decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, latents)
  with torch.no_grad():
    dist = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    ref_decoded = reference.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  assert np.abs(nhwc(dist.mean)).max() > 0.1 and np.abs(nhwc(ref_decoded)).max() > 0.1
  np.testing.assert_allclose(posterior.mean, nhwc(dist.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(posterior.logvar, nhwc(dist.logvar), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(decoded, nhwc(ref_decoded), atol=1e-4, rtol=1e-4)
  assert decoded.shape == (2, 32, 32, 3)


def test_measured_scale_factor_gives_unit_variance_latents(config, converted):
  _, params = converted
  model = vae_lib.build_vae(config)
  images = np.random.default_rng(2).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  factor = vae_lib.measured_scale_factor(model, params, images)
  scaled = model.clone(scale_factor=factor).apply({"params": params}, images,
                                                  method="encode_scaled")
  np.testing.assert_allclose(float(jnp.std(scaled)), 1.0, rtol=1e-4)
  blank = jax.tree_util.tree_map(jnp.zeros_like, params)   # every latent 0: nothing to measure
  with pytest.raises(ValueError, match="std 0.0"):
    vae_lib.measured_scale_factor(model, blank, images)


def test_full_size_parameter_count_equals_pytorch():
  reference = torch_vae(config_lib.base_config().vae, device="meta")
  assert sum(p.numel() for p in reference.parameters()) == SD_VAE_PARAMS
  model = vae_lib.AutoencoderKL()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)) == SD_VAE_PARAMS


def test_posterior():
  moments = jnp.concatenate([jnp.ones((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 50.0)], axis=-1)
  posterior = vae_lib.DiagonalGaussian.from_moments(moments)
  assert float(posterior.logvar.max()) == 20.0  # clipped
  zero = vae_lib.DiagonalGaussian(jnp.zeros((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4)))
  np.testing.assert_allclose(zero.kl(), np.zeros(3), atol=1e-7)
  standard = vae_lib.DiagonalGaussian(jnp.ones((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)))
  np.testing.assert_allclose(standard.kl(), [0.5 * 16], rtol=1e-6)
  samples = standard.sample(jax.random.key(0))
  assert samples.shape == (1, 2, 2, 4) and not np.allclose(samples, standard.mode())


@pytest.fixture(scope="module")
def loss_setup(config, converted):
  params = nn.meta.unbox(converted[1])
  disc = vae_lib.build_discriminator(config)
  images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
  disc_params = nn.meta.unbox(jax.jit(disc.init)(jax.random.key(4), images)["params"])
  return params, disc_params, images


def _loss_and_grads(config):
  """One jitted (loss, aux), grads function per config; the step is traced, so it compiles once."""
  def loss_fn(params, disc_params, images, step):
    return vae_lib.generator_loss(params, disc_params, images, jax.random.key(5), step, config=config)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.fixture(scope="module")
def frozen_step(config):
  return _loss_and_grads(config)


def test_generator_loss_terms_and_frozen_encoder(config, loss_setup, frozen_step):
  params, disc_params, images = loss_setup
  (loss, aux), grads = frozen_step(params, disc_params, images, config.vae.disc_start)
  assert float(aux["disc_factor"]) == 1.0 and float(aux["d_weight"]) > 0
  expected = aux["nll"] + config.vae.kl_weight * aux["kl"] + aux["d_weight"] * aux["g_loss"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert config.vae.freeze_encoder
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["encoder"]))
  assert float(jnp.abs(grads["decoder"]["conv_in"]["kernel"]).max()) > 0
  mask = vae_lib.trainable_mask(params, config)
  assert not any(jax.tree_util.tree_leaves(mask["encoder"]))
  assert all(jax.tree_util.tree_leaves(mask["decoder"]))
  # Before disc_start the GAN term is off.
  (loss, aux), plain_grads = frozen_step(params, disc_params, images, config.vae.disc_start - 1)
  assert float(aux["disc_factor"]) == 0.0
  np.testing.assert_allclose(loss, aux["nll"] + config.vae.kl_weight * aux["kl"], rtol=1e-6)
  # disc_weight == 0 has no discriminator: the same loss and gradients as before disc_start.
  no_gan = config.copy_and_resolve_references()
  no_gan.vae.disc_weight = 0.0
  (loss_no_gan, aux_no_gan), grads_no_gan = _loss_and_grads(no_gan)(
      params, None, images, config.vae.disc_start - 1)
  assert "g_loss" not in aux_no_gan
  np.testing.assert_allclose(loss_no_gan, loss, rtol=1e-6)
  for ours, reference in zip(jax.tree_util.tree_leaves(grads_no_gan),
                             jax.tree_util.tree_leaves(plain_grads)):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="disc_weight=0.0 but disc_params=given"):
    vae_lib.generator_loss(params, disc_params, images, jax.random.key(5), 0, config=no_gan)


def test_unfrozen_encoder_gets_gradients(config, loss_setup):
  params, disc_params, images = loss_setup
  unfrozen = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  unfrozen.unlock()
  unfrozen.vae.freeze_encoder = False
  (_, _), grads = _loss_and_grads(unfrozen)(params, disc_params, images, 0)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).max()) > 0


def test_adaptive_weight_uses_last_layer_gradients(config, loss_setup, frozen_step):
  """d_weight = |d nll / d W_last| / (|d g_loss / d W_last| + 1e-4) * disc_weight, with the gradients
  taken through the whole model (the loss computes them on fixed features)."""
  params, disc_params, images = loss_setup
  model = vae_lib.build_vae(config)
  disc = vae_lib.build_discriminator(config)
  rng = jax.random.key(5)

  def terms(p):
    posterior = model.apply({"params": p}, images, method=model.encode)
    recon = model.apply({"params": p}, posterior.sample(rng), method=model.decode)
    nll = jnp.sum(jnp.abs(images - recon)) / images.shape[0]
    return nll, -jnp.mean(disc.apply({"params": disc_params}, recon))

  @jax.jit
  def last_layer_grads(p):
    jacobian = jax.jacrev(lambda q: jnp.stack(terms(q)))(p)
    return jacobian["decoder"]["conv_out"]["kernel"], jnp.stack(terms(p))

  grads, values = last_layer_grads(params)
  expected = min(float(jnp.linalg.norm(grads[0]) / (jnp.linalg.norm(grads[1]) + 1e-4)), 1e4)
  (_, aux), _ = frozen_step(params, disc_params, images, 0)
  np.testing.assert_allclose(aux["nll"], values[0], rtol=1e-5)
  np.testing.assert_allclose(aux["g_loss"], values[1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(aux["d_weight"], expected * config.vae.disc_weight, rtol=1e-4)


def test_discriminator_hinge_loss(config, loss_setup):
  _, disc_params, images = loss_setup
  disc = vae_lib.build_discriminator(config)
  fakes = -images
  loss_fn = lambda p: vae_lib.discriminator_loss(p, images, fakes, config.vae.disc_start,
                                                 config=config)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(disc_params)
  real = disc.apply({"params": disc_params}, images)
  fake = disc.apply({"params": disc_params}, fakes)
  assert real.shape == (2, 6, 6, 1)  # 32 -> 16 -> 8 (two stride-2 convs) -> 7 -> 6 (4x4, stride 1)
  expected = 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(jnp.abs(grads["conv_0"]["kernel"]).max()) > 0
  off, _ = vae_lib.discriminator_loss(disc_params, images, fakes, 0, config=config)
  assert float(off) == 0.0


def test_perceptual_term_is_added_per_pixel(config, loss_setup):
  """With a perceptual distance, nll gains perceptual_weight * d(x, x_rec) on every pixel (LDM's
  broadcast). A cheap stand-in with `load_lpips_distance`'s signature, (params, a, b) -> [B], keeps the
  test fast; the LPIPS network itself is tested in test_lpips.py."""
  params, disc_params, images = loss_setup
  distance_fn = lambda weight, a, b: weight * jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  with_lpips = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  with_lpips.unlock()
  with_lpips.vae.lpips_path = "lpips_vgg16.pth"  # only its presence matters to the loss
  rng = jax.random.key(5)
  _, aux = vae_lib.generator_loss(params, disc_params, images, rng, 0, config=with_lpips,
                                  perceptual=(distance_fn, jnp.float32(2.0)))
  _, plain = vae_lib.generator_loss(params, disc_params, images, rng, 0, config=config)
  distance = distance_fn(2.0, images, aux["reconstructions"])
  assert float(jnp.min(distance)) > 0
  extra = config.vae.perceptual_weight * 32 * 32 * 3 * jnp.mean(distance)
  np.testing.assert_allclose(aux["nll"] - plain["nll"], extra, rtol=1e-4)
  assert float(aux["d_weight"]) != float(plain["d_weight"])  # the adaptive weight sees it too
  with pytest.raises(ValueError, match="lpips_path"):
    vae_lib.generator_loss(params, disc_params, images, rng, 0, config=with_lpips)



def test_pixel_loss_l2_squares_the_error(config, loss_setup):
  """vae.pixel_loss='l2': nll is the summed squared error per image (the reconstruction the loss
  makes is recomputed here from the same posterior sample); anything else is refused."""
  params, _, images = loss_setup
  squared = config.copy_and_resolve_references()
  squared.vae.update(pixel_loss="l2", disc_weight=0.0)
  _, aux = vae_lib.generator_loss(params, None, images, jax.random.key(5), 0, config=squared)
  model = vae_lib.build_vae(squared)
  posterior = model.apply({"params": params}, images, method=model.encode)
  recon = model.apply({"params": params}, posterior.sample(jax.random.key(5)), method=model.decode)
  np.testing.assert_allclose(aux["nll"], jnp.sum((images - recon) ** 2) / images.shape[0],
                             rtol=1e-5)
  squared.vae.pixel_loss = "l3"
  with pytest.raises(ValueError, match="pixel_loss='l3'"):
    vae_lib.generator_loss(params, None, images, jax.random.key(5), 0, config=squared)
