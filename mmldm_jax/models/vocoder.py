"""HiFi-GAN V1 generator: log-mel spectrogram -> waveform (Flax Linen).

This is the generator of jik876/hifi-gan (`models.Generator` with `config_v1.json`), the vocoder MM-LDM
runs on its generated mel spectrograms. Layer for layer it matches the original with its weight norm
folded away (inference only; there is no discriminator and no training code here):

    conv_pre (k=7) -> 4 x [leaky_relu(0.1) -> transposed conv (upsample) -> mean of 3 ResBlock1]
    -> leaky_relu(0.01) -> conv_post (k=7, 1 channel) -> tanh

Layout: channels-last. The input is the natural-log mel `[B, T, num_mels]` (as transformers'
`SpeechT5HifiGan` takes it; the original takes `[B, num_mels, T]`, so swap the last two axes of such
input), the output is the waveform `[B, T * prod(upsample_rates)]` (256 samples per frame for V1) in
[-1, 1].

The mel the vocoder receives must be computed the way its checkpoint was trained: for the public V1 /
UNIVERSAL_V1 checkpoints that is HiFi-GAN's `mel_spectrogram` with a 22.05 kHz filterbank, n_fft 1024,
hop 256, window 1024, 80 mels, fmin 0, fmax 8000, log(clamp(x, 1e-5)) - exactly MM-LDM's audio config
(`config.audio`, including its quirk of using the 22.05 kHz filterbank on 44.1 kHz audio; the result is
then saved at 44.1 kHz). `check_mel_matches` checks the fields it can. Without a checkpoint
(`config.vocoder.pretrained_path = ''`) the sampling chain inverts the mel with Griffin-Lim
(`mmldm_jax/data/audio.py`) instead.

Weights: `mmldm_jax/convert/hifigan.py` converts an original training checkpoint (weight_g / weight_v
pairs) or an already folded state dict (`SpeechT5HifiGan` naming), and its `load_vocoder` returns the
pretrained vocoder ready to apply.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mmldm_jax.models import layers

# LeakyReLU slope between layers; the last activation uses torch's default 0.01 (F.leaky_relu(x)).
LRELU_SLOPE = 0.1
FINAL_LRELU_SLOPE = 0.01

# The original initialises every conv weight from N(0, 0.01) (`init_weights`).
_KERNEL_STD = 0.01
_KERNEL_INIT = nn.with_logical_partitioning(nn.initializers.normal(_KERNEL_STD),
                                            (None, "conv_in", "conv_out"))
_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",))


def _conv(features: int, kernel_size: int, dilation: int, name: str, dtype: Any, param_dtype: Any,
          precision: Optional[lax.Precision]) -> layers.Conv:
  """A stride-1 'same' Conv1d with PyTorch's symmetric padding (k * d - d) // 2."""
  pad = (kernel_size * dilation - dilation) // 2
  return layers.Conv(features, (kernel_size,), padding=[(pad, pad)], dilation=dilation,
                     init_std=_KERNEL_STD, precision=precision, dtype=dtype,
                     param_dtype=param_dtype, name=name)


class TransposedConv1d(nn.Module):
  """PyTorch `ConvTranspose1d(in, out, kernel_size, stride, padding)` (no output_padding), NWC layout.

  Output length (L - 1) * stride - 2 * padding + kernel_size, as in PyTorch. The kernel is stored as
  `[kernel_size, in, out]`: torch's `(in, out, k)` weight transposed, not flipped. The transposed conv
  is computed as a correlation of the stride-dilated input, padded by kernel_size - 1 - padding on each
  side, with the spatially flipped kernel. (`flax.linen.ConvTranspose` pads differently.)
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Optional[lax.Precision] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    edge = self.kernel_size - 1 - self.padding
    if edge < 0:
      raise ValueError(f"TransposedConv1d: padding={self.padding} must be < kernel_size="
                       f"{self.kernel_size}")
    kernel = self.param("kernel", _KERNEL_INIT, (self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", _BIAS_INIT, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = lax.conv_general_dilated(
        x, kernel[::-1], window_strides=(1,), padding=[(edge, edge)], lhs_dilation=(self.stride,),
        dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision)
    return y + bias


class ResBlock1(nn.Module):
  """HiFi-GAN ResBlock1: per dilation d, x += conv_k(lrelu(conv_k,d(lrelu(x))))."""
  channels: int
  kernel_size: int
  dilations: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Optional[lax.Precision] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index, dilation in enumerate(self.dilations):
      h = nn.leaky_relu(x, LRELU_SLOPE)
      h = _conv(self.channels, self.kernel_size, dilation, f"convs1_{index}", self.dtype,
                self.param_dtype, self.precision)(h)
      h = nn.leaky_relu(h, LRELU_SLOPE)
      h = _conv(self.channels, self.kernel_size, 1, f"convs2_{index}", self.dtype,
                self.param_dtype, self.precision)(h)
      x = x + h
    return x


class HifiGanGenerator(nn.Module):
  """The HiFi-GAN generator (resblock type 1). `__call__(mel [B, T, num_mels]) -> wave [B, T * hop]`.

  Parameter names follow the original with `.` -> `_` (`ups_0`, `resblocks_4/convs1_2`, ...), which is
  what the converter relies on.
  """
  upsample_rates: Sequence[int] = (8, 8, 2, 2)
  upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4)
  upsample_initial_channel: int = 512
  resblock_kernel_sizes: Sequence[int] = (3, 7, 11)
  resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Optional[lax.Precision] = None

  @nn.compact
  def __call__(self, mel: jax.Array) -> jax.Array:
    if mel.ndim != 3:
      raise ValueError(f"HifiGanGenerator: expected a log-mel [batch, frames, mels], got shape "
                       f"{mel.shape}")
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    num_kernels = len(self.resblock_kernel_sizes)
    x = _conv(self.upsample_initial_channel, 7, 1, "conv_pre", **common)(mel)
    for i, (rate, kernel) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
      channels = self.upsample_initial_channel // 2 ** (i + 1)
      x = nn.leaky_relu(x, LRELU_SLOPE)
      x = TransposedConv1d(channels, kernel, rate, (kernel - rate) // 2, name=f"ups_{i}",
                           **common)(x)
      total = None
      for j, (res_kernel, dilations) in enumerate(
          zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)):
        branch = ResBlock1(channels, res_kernel, tuple(dilations),
                           name=f"resblocks_{i * num_kernels + j}", **common)(x)
        total = branch if total is None else total + branch
      x = total / num_kernels
    x = nn.leaky_relu(x, FINAL_LRELU_SLOPE)
    x = _conv(1, 7, 1, "conv_post", **common)(x)
    return jnp.tanh(x[..., 0])


def hop_length(config) -> int:
  """Waveform samples per mel frame: the product of the upsample rates (256 for V1)."""
  return math.prod(config.vocoder.upsample_rates)


def generator_from_config(config, dtype: Any = jnp.float32,
                          precision: Optional[lax.Precision] = None) -> HifiGanGenerator:
  """The generator described by `config.vocoder`."""
  section = config.vocoder
  if len(section.resblock_kernel_sizes) != len(section.resblock_dilation_sizes):
    raise ValueError(
        f"config.vocoder.resblock_dilation_sizes={tuple(section.resblock_dilation_sizes)!r}: expected "
        f"one dilation tuple per entry of resblock_kernel_sizes={tuple(section.resblock_kernel_sizes)}")
  if len(section.upsample_rates) != len(section.upsample_kernel_sizes):
    raise ValueError(
        f"config.vocoder.upsample_kernel_sizes={tuple(section.upsample_kernel_sizes)!r}: expected one "
        f"kernel per entry of upsample_rates={tuple(section.upsample_rates)}")
  return HifiGanGenerator(
      upsample_rates=tuple(section.upsample_rates),
      upsample_kernel_sizes=tuple(section.upsample_kernel_sizes),
      upsample_initial_channel=section.upsample_initial_channel,
      resblock_kernel_sizes=tuple(section.resblock_kernel_sizes),
      resblock_dilation_sizes=tuple(tuple(d) for d in section.resblock_dilation_sizes),
      dtype=dtype, precision=precision)


def init_params(config, rng: jax.Array, num_frames: int = 8) -> dict:
  """Randomly initialised generator parameters (boxed with logical axis names), for tests. One
  jitted program: run op by op, the init compiled a small program per initialiser and shape."""
  model = generator_from_config(config)
  mel = jnp.zeros((1, num_frames, config.vocoder.num_mels), jnp.float32)
  return jax.jit(model.init)(rng, mel)["params"]


def check_mel_matches(config) -> None:
  """Fails, naming the field, when `config.audio` makes mels the vocoder was not trained on."""
  audio, vocoder = config.audio, config.vocoder
  if audio.num_mels != vocoder.num_mels:
    raise ValueError(f"config.audio.num_mels={audio.num_mels}: expected config.vocoder.num_mels="
                     f"{vocoder.num_mels} (the vocoder's input width)")
  if audio.hop_length != hop_length(config):
    raise ValueError(f"config.audio.hop_length={audio.hop_length}: expected the vocoder's "
                     f"prod(upsample_rates)={hop_length(config)}")
  if audio.filterbank_sample_rate != vocoder.sample_rate:
    raise ValueError(
        f"config.audio.filterbank_sample_rate={audio.filterbank_sample_rate}: expected "
        f"config.vocoder.sample_rate={vocoder.sample_rate}, the rate of the vocoder's mel filterbank "
        "(otherwise leave config.vocoder.pretrained_path empty to use Griffin-Lim)")
