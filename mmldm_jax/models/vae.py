"""The stage-0 image VAE: Stable Diffusion's KL-f8 AutoencoderKL, and its fine-tuning loss.

`AutoencoderKL` computes exactly what diffusers' `AutoencoderKL` (and CompVis's `ldm.models.autoencoder
.AutoencoderKL`) computes, so the public SD VAE weights load through `mmldm_jax.convert.vae`. Sizes come
from `config.vae` (SD: ch 128, mult (1, 2, 4, 4), 2 res blocks, z 4, double_z, attention only in the mid
block). Images are NHWC in [-1, 1]; latents NHWC. Parameter names follow diffusers, flattened
(`down_blocks_0_resnets_1` for `down_blocks.0.resnets.1`).

The loss is the taming/LDM `LPIPSWithDiscriminator` recipe as pure functions: `generator_loss` (L1 +
LPIPS when `config.vae.lpips_path` is set + KL + adaptive-weight PatchGAN term) and `discriminator_loss`
(hinge). Limit: the loss's learnable log-variance is held at its initial 0, as in LDM, whose optimiser
never updates it.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmldm_jax.models import layers

Array = jax.Array
Dtype = Any


# ---------------------------------------------------------------------------------------------------
# Posterior


@flax.struct.dataclass
class DiagonalGaussian:
  """The VAE posterior N(mean, exp(logvar)), per latent element; logvar is clipped to [-30, 20]."""
  mean: Array
  logvar: Array

  @classmethod
  def from_moments(cls, moments: Array) -> "DiagonalGaussian":
    """Splits `[..., 2 * z]` moments (mean first, as LDM/diffusers) into a posterior."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: Array) -> Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over all non-batch axes: `[B]`."""
    per_element = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(per_element, axis=tuple(range(1, per_element.ndim)))


# ---------------------------------------------------------------------------------------------------
# Encoder / decoder


class _VAEBase(nn.Module):
  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _kwargs(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _resblock(self, out_channels: int, name: str) -> layers.ResBlock:
    return layers.ResBlock(out_channels, norm_groups=self.norm_groups, epsilon=1e-6, name=name,
                           **self._kwargs())

  def _mid_block(self, h: Array) -> Array:
    channels = h.shape[-1]
    h = self._resblock(channels, "mid_block_resnets_0")(h)
    h = layers.AttentionBlock(self.norm_groups, 1e-6, name="mid_block_attentions_0",
                              **self._kwargs())(h)
    return self._resblock(channels, "mid_block_resnets_1")(h)


class Encoder(_VAEBase):
  """Images `[B, H, W, C]` -> moments `[B, H/f, W/f, 2*z]` (z when not `double_z`), f = 2^(levels-1)."""
  double_z: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.Conv(self.channels, (3, 3), name="conv_in", **self._kwargs())(x)
    for level, mult in enumerate(self.channel_mult):
      for index in range(self.num_res_blocks):
        h = self._resblock(self.channels * mult, f"down_blocks_{level}_resnets_{index}")(h)
      if level < len(self.channel_mult) - 1:
        h = layers.Downsample(h.shape[-1], asymmetric_padding=True,
                              name=f"down_blocks_{level}_downsamplers_0", **self._kwargs())(h)
    h = self._mid_block(h)
    h = nn.silu(layers.GroupNorm(self.norm_groups, 1e-6, name="conv_norm_out", **self._kwargs())(h))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return layers.Conv(out, (3, 3), name="conv_out", **self._kwargs())(h)


class Decoder(_VAEBase):
  """Latents `[B, h, w, z]` -> images `[B, h*f, w*f, out_channels]`.

  `part='features'` stops before the last conv (for the adaptive GAN weight), `part='head'` applies only
  that conv to such features; `part='all'` (default) is the whole decoder.
  """
  out_channels: int = 3

  @nn.compact
  def __call__(self, z: Array, part: str = "all") -> Array:
    if part not in ("all", "features", "head"):
      raise ValueError(f"Decoder part={part!r}: expected 'all', 'features' or 'head'")
    h = z
    if part != "head":
      top = self.channels * self.channel_mult[-1]
      h = layers.Conv(top, (3, 3), name="conv_in", **self._kwargs())(h)
      h = self._mid_block(h)
      for up_index, mult in enumerate(reversed(self.channel_mult)):
        for index in range(self.num_res_blocks + 1):
          h = self._resblock(self.channels * mult, f"up_blocks_{up_index}_resnets_{index}")(h)
        if up_index < len(self.channel_mult) - 1:
          h = layers.Upsample(h.shape[-1], name=f"up_blocks_{up_index}_upsamplers_0",
                              **self._kwargs())(h)
      h = nn.silu(layers.GroupNorm(self.norm_groups, 1e-6, name="conv_norm_out",
                                   **self._kwargs())(h))
    if part == "features":
      return h
    return layers.Conv(self.out_channels, (3, 3), name="conv_out", **self._kwargs())(h)


class AutoencoderKL(nn.Module):
  """SD KL-VAE: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`; `__call__` reconstructs.

  `encode`/`decode` work on raw latents; `encode_scaled`/`decode_scaled` apply `scale_factor`
  (0.18215 for SD), which is what every later stage uses.
  """
  in_channels: int = 3
  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int = 4
  double_z: bool = True
  norm_groups: int = 32
  scale_factor: float = 0.18215
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    common = dict(channels=self.channels, channel_mult=tuple(self.channel_mult),
                  num_res_blocks=self.num_res_blocks, z_channels=self.z_channels,
                  norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(double_z=self.double_z, **common)
    self.decoder = Decoder(out_channels=self.in_channels, **common)
    moments = 2 * self.embed_dim if self.double_z else self.embed_dim
    self.quant_conv = layers.Conv(moments, (1, 1), name="quant_conv", **kwargs)
    self.post_quant_conv = layers.Conv(self.z_channels, (1, 1), name="post_quant_conv", **kwargs)

  def encode(self, x: Array) -> DiagonalGaussian:
    if not self.double_z:
      raise ValueError("config.vae.double_z=False gives no variance; the KL-VAE needs double_z=True")
    x = nn.with_logical_constraint(x, ("activation_batch", None, None, None))
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)).astype(jnp.float32))

  def decode_features(self, z: Array) -> Array:
    return self.decoder(self.post_quant_conv(z), part="features")

  def decode_head(self, features: Array) -> Array:
    return self.decoder(features, part="head")

  def decode(self, z: Array) -> Array:
    z = nn.with_logical_constraint(z, ("activation_batch", None, None, None))
    return self.decoder(self.post_quant_conv(z))

  def encode_scaled(self, x: Array, rng: Array | None = None) -> Array:
    """Images -> `scale_factor * z` with z sampled from the posterior (`rng`) or its mode (None)."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return z * self.scale_factor

  def decode_scaled(self, scaled_z: Array) -> Array:
    return self.decode(scaled_z / self.scale_factor)

  def __call__(self, x: Array, rng: Array | None = None) -> tuple[Array, DiagonalGaussian]:
    """Reconstruction from a posterior sample (`rng`) or the mode (None), and the posterior."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior


def measured_scale_factor(vae: AutoencoderKL, params, images: Array) -> float:
  """LDM's `scale_by_std`: 1 / std of the raw latents (posterior modes) of `images`.

  SD's 0.18215 is this number for SD's VAE. A VAE trained from scratch has latents of another scale
  (a freshly initialised one: std ~0.2), and with the SD factor every later stage would see
  near-constant latents; measure its factor on a batch of real images and set
  config.vae.scale_factor to it.
  """
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode").mode())
  std = float(jnp.std(encode(params, images).astype(jnp.float32)))
  if not std > 0:
    raise ValueError(f"the VAE's latents of {images.shape[0]} images have std {std}; cannot "
                     f"measure a scale factor from them")
  return 1.0 / std


def build_vae(config, dtype: Dtype = jnp.float32) -> AutoencoderKL:
  """The VAE sized by `config.vae`."""
  v = config.vae
  return AutoencoderKL(in_channels=v.in_channels, channels=v.channels,
                       channel_mult=tuple(v.channel_mult), num_res_blocks=v.num_res_blocks,
                       z_channels=v.z_channels, embed_dim=v.embed_dim, double_z=v.double_z,
                       norm_groups=v.norm_groups, scale_factor=v.scale_factor, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# PatchGAN discriminator and the stage-0 loss


class PatchDiscriminator(nn.Module):
  """taming's NLayerDiscriminator (pix2pix PatchGAN): `[B, H, W, 3]` -> patch logits `[B, h, w, 1]`.

  conv4x4/2 + LeakyReLU(0.2); (layers - 1) x [conv4x4/2 (no bias), BatchNorm, LeakyReLU]; conv4x4/1
  (no bias), BatchNorm, LeakyReLU; conv4x4/1 -> 1. Widths channels * min(2^n, 8); N(0, 0.02) init.
  """
  channels: int = 64
  num_layers: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda features, stride, bias, name: layers.Conv(
        features, (4, 4), strides=stride, padding=1, use_bias=bias, init_std=0.02, name=name,
        **kwargs)
    h = nn.leaky_relu(conv(self.channels, 2, True, "conv_0")(x), 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      h = conv(self.channels * min(2 ** n, 8), stride, False, f"conv_{n}")(h)
      h = nn.leaky_relu(layers.BatchStatNorm(name=f"norm_{n}", **kwargs)(h), 0.2)
    return conv(1, 1, True, f"conv_{self.num_layers + 1}")(h)


def build_discriminator(config, dtype: Dtype = jnp.float32) -> PatchDiscriminator:
  return PatchDiscriminator(config.vae.disc_channels, config.vae.disc_layers, dtype=dtype)


def trainable_mask(vae_params: Any, config) -> Any:
  """Pytree of bools, True where stage-0 training updates the parameter (for optax.masked).

  With `config.vae.freeze_encoder` only the decoder and `post_quant_conv` train (reference: fix_encoder).
  """
  frozen = {"encoder", "quant_conv"} if config.vae.freeze_encoder else set()
  return {name: jax.tree_util.tree_map(lambda _: name not in frozen, subtree)
          for name, subtree in vae_params.items()}


def _disc_factor(step: Array, config) -> Array:
  """0 before `disc_start`, 1 from it on (taming's adopt_weight)."""
  return jnp.where(jnp.asarray(step) >= config.vae.disc_start, 1.0, 0.0)


def generator_loss(vae_params: Any, disc_params: Any, images: Array, rng: Array, step: Array, *,
                   config, vae: AutoencoderKL | None = None,
                   disc: PatchDiscriminator | None = None,
                   perceptual: tuple[Callable, Any] | None = None) -> tuple[Array, dict]:
  """The VAE's training loss (taming/LDM LPIPSWithDiscriminator, optimizer_idx 0); differentiate it
  with respect to `vae_params`.

  loss = nll + kl_weight * kl + d_weight * disc_factor * g_loss, where
  nll = sum over pixels of (|x - x_rec| + perceptual_weight * LPIPS(x, x_rec)) / B (LDM adds the
  per-image LPIPS to every pixel; `config.vae.pixel_loss='l2'` squares the error instead of |.|),
  kl = sum KL / B, g_loss = -mean(D(x_rec)), d_weight = clip(|grad nll| / (|grad g_loss| + 1e-4),
  0, 1e4) * disc_weight with both gradients taken on the decoder's last conv kernel, and
  disc_factor = 1 from `disc_start` on.
  `perceptual`: `(distance_fn, lpips_params)` from `convert.lpips.load_lpips_distance(config)`; required
  when `config.vae.lpips_path` is set, refused otherwise. With `config.vae.disc_weight == 0` there is
  no adversarial term (pass disc_params=None): loss = nll + kl_weight * kl. Returns (loss, aux); aux
  holds the scalars to log and `reconstructions` (gradient-stopped) for `discriminator_loss`.
  """
  if bool(config.vae.lpips_path) != (perceptual is not None):
    raise ValueError(f"config.vae.lpips_path={config.vae.lpips_path!r} but perceptual="
                     f"{'given' if perceptual is not None else 'None'}: pass perceptual="
                     "mmldm_jax.convert.lpips.load_lpips_distance(config) exactly when the path is set")
  adversarial = config.vae.disc_weight > 0
  if adversarial != (disc_params is not None):
    raise ValueError(f"config.vae.disc_weight={config.vae.disc_weight} but disc_params="
                     f"{'given' if disc_params is not None else 'None'}: the discriminator's "
                     f"parameters are needed exactly when disc_weight > 0")
  vae = vae or build_vae(config)
  disc = disc or build_discriminator(config)
  params = dict(vae_params)
  if config.vae.freeze_encoder:
    params["encoder"] = jax.lax.stop_gradient(params["encoder"])
    params["quant_conv"] = jax.lax.stop_gradient(params["quant_conv"])
  posterior = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
  features = vae.apply({"params": params}, posterior.sample(rng),
                       method=AutoencoderKL.decode_features)

  def reconstruct(feature_map, last_kernel):
    swapped = dict(params, decoder=dict(params["decoder"],
                                        conv_out=dict(params["decoder"]["conv_out"],
                                                      kernel=last_kernel)))
    return vae.apply({"params": swapped}, feature_map, method=AutoencoderKL.decode_head)

  batch = images.shape[0]
  pixels_per_image = images[0].size

  pixel_loss = config.vae.pixel_loss
  if pixel_loss not in ("l1", "l2"):
    raise ValueError(f"config.vae.pixel_loss={pixel_loss!r}: expected 'l1' or 'l2'")

  def nll_of(recon):
    error = images.astype(jnp.float32) - recon.astype(jnp.float32)
    pixels = jnp.sum(jnp.abs(error) if pixel_loss == "l1" else jnp.square(error))
    if perceptual is None:
      return pixels / batch
    distance_fn, lpips_params = perceptual
    lpips = jnp.sum(distance_fn(lpips_params, images, recon).astype(jnp.float32))
    return (pixels + config.vae.perceptual_weight * pixels_per_image * lpips) / batch

  g_loss_of = lambda recon: -jnp.mean(disc.apply({"params": disc_params}, recon).astype(jnp.float32))
  last_kernel = nn.meta.unbox(params["decoder"]["conv_out"]["kernel"])
  reconstructions = reconstruct(features, last_kernel)
  nll = nll_of(reconstructions)
  kl = jnp.sum(posterior.kl()) / batch
  l1 = jnp.mean(jnp.abs(images - reconstructions))
  if not adversarial:   # vae.disc_weight == 0: no discriminator, no adaptive weight to compute
    loss = nll + config.vae.kl_weight * kl
    return loss, dict(loss=loss, nll=nll, kl=kl, l1=l1,
                      reconstructions=jax.lax.stop_gradient(reconstructions))
  g_loss = g_loss_of(reconstructions)
  # The last layer's gradients only pass through its own conv, so the features can be held fixed.
  fixed = jax.lax.stop_gradient(features)
  kernel = jax.lax.stop_gradient(last_kernel)
  nll_grad = jax.grad(lambda k: nll_of(reconstruct(fixed, k)))(kernel)
  g_grad = jax.grad(lambda k: g_loss_of(reconstruct(fixed, k)))(kernel)
  d_weight = jnp.clip(jnp.linalg.norm(nll_grad) / (jnp.linalg.norm(g_grad) + 1e-4), 0.0, 1e4)
  d_weight = jax.lax.stop_gradient(d_weight * config.vae.disc_weight)
  disc_factor = _disc_factor(step, config)
  loss = nll + config.vae.kl_weight * kl + d_weight * disc_factor * g_loss
  aux = dict(loss=loss, nll=nll, kl=kl, g_loss=g_loss, d_weight=d_weight, disc_factor=disc_factor,
             l1=l1,
             reconstructions=jax.lax.stop_gradient(reconstructions))
  return loss, aux


def discriminator_loss(disc_params: Any, images: Array, reconstructions: Array, step: Array, *,
                       config, disc: PatchDiscriminator | None = None) -> tuple[Array, dict]:
  """The discriminator's hinge loss, disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))).

  Differentiate with respect to `disc_params`; `reconstructions` come from `generator_loss`'s aux.
  """
  disc = disc or build_discriminator(config)
  logits_real = disc.apply({"params": disc_params}, images).astype(jnp.float32)
  logits_fake = disc.apply({"params": disc_params},
                           jax.lax.stop_gradient(reconstructions)).astype(jnp.float32)
  hinge = 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))
  loss = _disc_factor(step, config) * hinge
  return loss, dict(disc_loss=loss, logits_real=jnp.mean(logits_real),
                    logits_fake=jnp.mean(logits_fake))
