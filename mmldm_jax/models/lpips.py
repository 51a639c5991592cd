"""LPIPS perceptual distance (VGG16 variant, `lpips` v0.1 linear heads) in Flax Linen.

What it computes, per image pair (as `lpips.LPIPS(net='vgg', version='0.1')` with its defaults
`lpips=True, spatial=False, normalize=False`):

    x -> (x - shift) / scale                       ImageNet statistics in [-1, 1] units (ScalingLayer)
    VGG16 conv features relu1_2, relu2_2, relu3_3, relu4_3, relu5_3   (torchvision `features[:30]`)
    per layer: f / (||f||_channels + 1e-10) for both images, squared difference, 1x1 conv to one
    channel (no bias), mean over H and W;  distance = sum over the five layers.

Images are NHWC in [-1, 1] (the VAE's range); the result is one distance per pair, shape [B].
Differentiable with respect to the images; the VGG weights are meant to stay frozen
(`mmldm_jax.convert.lpips.load_lpips_distance` stops their gradient). There is no dropout: the heads'
dropout is inactive in evaluation mode, the only mode in which LPIPS serves as a loss.

Weights come from ONE local file (see `mmldm_jax/convert/lpips.py` for how to assemble it): torchvision's
ImageNet VGG16 `features.*` and the lpips package's `lin{0..4}.model.1.weight` heads. Nothing is
downloaded. Parameter names: `features_{i}` for torchvision's `features.{i}` conv, `lin{k}` for a head.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmldm_jax.models import layers

# lpips.pretrained_networks ScalingLayer constants (RGB).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision VGG16 `features`: the conv indices of each block; each block ends at the tapped ReLU and
# the next block starts with a 2x2 max-pool. Output widths 64, 128, 256, 512, 512.
VGG16_BLOCKS = (((0, 64), (2, 64)),
                ((5, 128), (7, 128)),
                ((10, 256), (12, 256), (14, 256)),
                ((17, 512), (19, 512), (21, 512)),
                ((24, 512), (26, 512), (28, 512)))
EPS = 1e-10


def _conv(features: int, kernel_size: int, name: str, use_bias: bool, dtype: Any,
          param_dtype: Any, precision: Any) -> layers.Conv:
  """A 'same' Conv2d (padding k // 2); the weights are always loaded, so any init serves."""
  return layers.Conv(features, (kernel_size, kernel_size), use_bias=use_bias,
                     kernel_init=nn.initializers.lecun_normal(), precision=precision, dtype=dtype,
                     param_dtype=param_dtype, name=name)


class VGG16Features(nn.Module):
  """The five LPIPS taps of torchvision's VGG16 (`features[:30]`), NHWC."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for block_index, block in enumerate(VGG16_BLOCKS):
      if block_index:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for conv_index, width in block:
        x = nn.relu(_conv(width, 3, f"features_{conv_index}", True, self.dtype, self.param_dtype,
                          self.precision)(x))
      taps.append(x)
    return taps


def _channel_normalise(features: jax.Array) -> jax.Array:
  """lpips.normalize_tensor: divide by the L2 norm over channels (+ 1e-10)."""
  norm = jnp.sqrt(jnp.sum(features * features, axis=-1, keepdims=True))
  return features / (norm + EPS)


class LPIPS(nn.Module):
  """`__call__(images_a, images_b)` -> LPIPS distance per pair, [B]; images NHWC in [-1, 1]."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    if images_a.shape != images_b.shape or images_a.ndim != 4 or images_a.shape[-1] != 3:
      raise ValueError(f"LPIPS: expected two RGB batches [B, H, W, 3] of the same shape, got "
                       f"{images_a.shape} and {images_b.shape}")
    batch = images_a.shape[0]
    shift = jnp.asarray(SHIFT, self.dtype)
    scale = jnp.asarray(SCALE, self.dtype)
    both = (jnp.concatenate([images_a, images_b]).astype(self.dtype) - shift) / scale
    taps = VGG16Features(self.dtype, self.param_dtype, self.precision, name="vgg")(both)
    distance = jnp.zeros((batch,), jnp.float32)
    for index, tap in enumerate(taps):
      tap = _channel_normalise(tap.astype(jnp.float32))
      squared = (tap[:batch] - tap[batch:]) ** 2
      head = _conv(1, 1, f"lin{index}", False, self.dtype, self.param_dtype, self.precision)
      distance = distance + jnp.mean(head(squared.astype(self.dtype)).astype(jnp.float32),
                                     axis=(1, 2, 3))
    return distance


def init_params(rng: jax.Array, image_size: int = 32) -> dict:
  """Randomly initialised LPIPS parameters (boxed with logical axis names), for tests."""
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return LPIPS().init(rng, images, images)["params"]
