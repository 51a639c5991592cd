"""AudioCLIP's audio head (ESResNeXt-fbsp, Guzhov et al. 2021) in Flax: the embedding of
`fad_audioclip_x1e4`, the FAD that MM-LDM and MM-Diffusion report.

What it is for: turning 44.1 kHz waveforms into the 1024-d audio embeddings whose Frechet distance
(x 1e4) is that FAD. Evaluation only: no training losses (the fbsp norm loss), no augmentation.

Weights: `AudioCLIP-Full-Training.pt` of AudioCLIP's v0.1 release (github.com/AndreyGuzhov/AudioCLIP,
releases), a torch state dict of the whole AudioCLIP model read with weights_only=True (`load_audio_head`);
nothing is downloaded. Only the audio branch (`audio.*`) is used, and every one of its tensors must
land in the module below (the analysis window included); the image and text branches are not read.

The network, for waveforms [B, N] (MM-Diffusion's evaluator feeds samples in [-1, 1]):
  1. (`int16_scaling`, in NumPy before the jitted module) the model's own input scaling, meant for int16 values: x -> (x + 32768) / 32767.5 - 1, so a
     [-1, 1] signal reaches the frontend at about 1 / 32768 of its amplitude plus a 1.5e-5 offset
     (the published FAD numbers were made this way, so it is kept);
  2. framing: 1654-sample frames every 561 samples, the signal zero-padded (half before, half after)
     to whole frames, each frame times the file's window (Blackman-Harris), zero-padded to 2048;
  3. the fbsp frontend ("frequency B-spline"): a trainable complex filterbank of 1025 filters whose
     weights are made from three vectors per filter, m (window exponent), fb (bandwidth) and fc
     (centre): over t = pi * linspace(-1, 1, 2048) + 1e-8,
        w = sqrt(fb) * sinc(fb * t / (m + 1e-8)) ** m * exp(-i fc t) / sqrt(2048)
     (the sinc raised to a real power as a complex number: a negative base gets the phase pi m);
     the spectrogram is frames @ w (real and imaginary part);
  4. power, the first 3 x 341 frequency bins split into 3 bands that are the 3 input channels of
     the image network, 10 log10(power) (exact zeros -> 1e-18 first);
  5. ResNeXt-50 (32 x 4d) with attention: after each of the four stages and after the final pooling
     the output is multiplied by an attention map made from the stage's input (adaptive max
     pooling to the output size, depthwise conv, 1x1 conv, BatchNorm, sigmoid); global average
     pooling; `fc` to 1024 = the embedding (raw, not L2-normalised: what the FAD uses).
BatchNorm epsilon 1e-5 (PyTorch's). Any N >= 1 works; the FAD protocol (`AudioCLIPEmbeddings`)
feeds exactly 1.6 s = 70,560 samples at 44.1 kHz, cut or zero-padded at the end.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax.evaluation import devices as devices_lib

SAMPLE_RATE = 44100
CLIP_SAMPLES = 70560            # 1.6 s at 44.1 kHz: MM-Diffusion's AudioCLIP FAD protocol
N_FFT = 2048
HOP = 561
WINDOW_LENGTH = 1654
BINS = N_FFT // 2 + 1            # onesided
CHANNELS = 3                     # frequency bands stacked as the image network's input channels
EMBEDDING_WIDTH = 1024
BATCH_NORM_EPSILON = 1e-5
FBSP_EPSILON = 1e-8
LOG_FLOOR = 1e-18
GROUPS, WIDTH_PER_GROUP = 32, 4
STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
# Attention after each stage and after the pooling: (depthwise kernel size), padding is kernel // 2.
ATTENTION_KERNELS = ((3, 1), (1, 5), (3, 1), (1, 5), (3, 5))
WEIGHTS_FILE = "AudioCLIP-Full-Training.pt"
WEIGHTS_SOURCE = "the v0.1 release of github.com/AndreyGuzhov/AudioCLIP"
PREFIX = "audio."


def int16_scaling(waveform: np.ndarray) -> np.ndarray:
  """The model's input scaling from [-32768, 32767] to [-1, 1], applied to whatever comes in.

  Done on the host in NumPy float32, one correctly rounded operation at a time as PyTorch does it:
  adding 32768 keeps only about 8 bits of a [-1, 1] signal, so the rounding of every step shows in
  the embedding, and XLA's division is not correctly rounded (it differs in most samples)."""
  waveform = np.asarray(waveform, np.float32)
  return (waveform + np.float32(32768.0)) * np.float32(2.0) / np.float32(65535.0) - np.float32(1.0)


def frame_signal(waveform: jax.Array, window: jax.Array) -> jax.Array:
  """[B, N] -> windowed frames [B, F, N_FFT]: WINDOW_LENGTH samples every HOP, the signal
  zero-padded (floor half before, the rest after) to whole frames, each frame centred in N_FFT."""
  length = waveform.shape[-1]
  count = 1 if length <= WINDOW_LENGTH else 1 + math.ceil((length - WINDOW_LENGTH) / HOP)
  extra = max(0, (count - 1) * HOP + WINDOW_LENGTH - length)
  padded = jnp.pad(waveform, ((0, 0), (extra // 2, extra - extra // 2)))
  indices = np.arange(count)[:, None] * HOP + np.arange(WINDOW_LENGTH)[None, :]
  frames = padded[:, indices] * window
  left = (N_FFT - WINDOW_LENGTH) // 2
  return jnp.pad(frames, ((0, 0), (0, 0), (left, N_FFT - WINDOW_LENGTH - left)))


def fbsp_weights(m: jax.Array, fb: jax.Array, fc: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(real, imaginary) fbsp filterbank [BINS, N_FFT] from its per-filter parameters [BINS]."""
  t = jnp.pi * jnp.linspace(-1.0, 1.0, N_FFT, dtype=jnp.float32)[None, :] + FBSP_EPSILON
  m, fb, fc = m[:, None], fb[:, None], fc[:, None]
  argument = fb * t / (m + FBSP_EPSILON)
  sinc = jnp.where(argument == 0, 1.0, jnp.sin(argument) / argument)
  # sinc ** m for a real exponent, taken on the complex plane: |sinc| ** m with phase m * arg(sinc),
  # arg being pi for a negative sinc (the imaginary part of the exponent is zero in this layer).
  magnitude = jnp.power(sinc * sinc, 0.5 * m)
  phase = m * jnp.where(sinc < 0, jnp.pi, 0.0)
  window_real, window_imag = magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)
  kernel_real, kernel_imag = jnp.cos(fc * t), -jnp.sin(fc * t)
  scale = jnp.sqrt(fb) / math.sqrt(N_FFT)   # the release is built with normalized=True
  return (scale * (window_real * kernel_real - window_imag * kernel_imag),
          scale * (window_real * kernel_imag + window_imag * kernel_real))


def adaptive_max_pool(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """PyTorch's adaptive_max_pool2d on NHWC: output cell i of an axis of length n -> out is the max
  over [floor(i n / out), ceil((i + 1) n / out))."""
  for axis, out in zip((1, 2), size):
    length = x.shape[axis]
    starts = (np.arange(out) * length) // out
    ends = -((-(np.arange(out) + 1) * length) // out)
    span = int((ends - starts).max())
    # Each cell reads `span` positions; shorter cells repeat their last one (max is unchanged).
    indices = np.minimum(starts[:, None] + np.arange(span)[None, :], ends[:, None] - 1)
    x = jnp.take(x, indices.reshape(-1), axis=axis)
    x = x.reshape(x.shape[:axis] + (out, span) + x.shape[axis + 1:]).max(axis=axis + 1)
  return x


def _batch_norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name=name)


def _conv(features: int, kernel: Sequence[int], stride: int = 1, groups: int = 1,
          bias: bool = False, name: str | None = None) -> nn.Conv:
  padding = tuple((k // 2, k // 2) for k in kernel)
  return nn.Conv(features, tuple(kernel), (stride, stride), padding, use_bias=bias,
                 feature_group_count=groups, name=name)


class Bottleneck(nn.Module):
  """ResNeXt bottleneck: 1x1 -> grouped 3x3 (the stride) -> 1x1 (x EXPANSION), plus the shortcut."""
  planes: int
  stride: int
  project: bool          # shortcut through a strided 1x1 conv + BatchNorm (first block of a stage)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = self.planes * WIDTH_PER_GROUP // 64 * GROUPS
    out = jax.nn.relu(_batch_norm("bn1")(_conv(width, (1, 1), name="conv1")(x)))
    out = jax.nn.relu(_batch_norm("bn2")(_conv(width, (3, 3), self.stride, GROUPS,
                                               name="conv2")(out)))
    out = _batch_norm("bn3")(_conv(self.planes * EXPANSION, (1, 1), name="conv3")(out))
    if self.project:
      x = _batch_norm("downsample_bn")(_conv(self.planes * EXPANSION, (1, 1), self.stride,
                                             name="downsample_conv")(x))
    return jax.nn.relu(out + x)


class Attention(nn.Module):
  """The attention map of a stage: its input max-pooled to the output size, depthwise conv,
  1x1 conv, BatchNorm, sigmoid; the stage output is multiplied by it."""
  features: int
  kernel: tuple[int, int]

  @nn.compact
  def __call__(self, stage_input: jax.Array, size: Sequence[int]) -> jax.Array:
    x = adaptive_max_pool(stage_input, size)
    x = _conv(x.shape[-1], self.kernel, groups=x.shape[-1], bias=True, name="conv_depth")(x)
    x = _conv(self.features, (1, 1), bias=True, name="conv_point")(x)
    return jax.nn.sigmoid(_batch_norm("bn")(x))


class ESResNeXtFBSP(nn.Module):
  """Waveforms [B, N] after `int16_scaling` (float, [-1, 1] before it by the FAD protocol) ->
  embeddings [B, 1024]. The scaling is not inside the module because it has to run in NumPy."""

  @nn.compact
  def __call__(self, waveform: jax.Array) -> jax.Array:
    if waveform.ndim != 2 or waveform.shape[1] < 1:
      raise ValueError(f"ESResNeXtFBSP: expected waveforms [B, N >= 1], got {waveform.shape}")
    window = self.param("window", nn.initializers.ones, (WINDOW_LENGTH,))
    m = self.param("fbsp_m", nn.initializers.zeros, (BINS,))
    fb = self.param("fbsp_fb", nn.initializers.ones, (BINS,))
    fc = self.param("fbsp_fc", lambda _, shape: jnp.arange(shape[0], dtype=jnp.float32), (BINS,))
    frames = frame_signal(waveform.astype(jnp.float32), window)
    weight_real, weight_imag = fbsp_weights(m, fb, fc)
    power = (frames @ weight_real.T) ** 2 + (frames @ weight_imag.T) ** 2     # [B, F, BINS]
    band = BINS // CHANNELS
    power = power[..., :band * CHANNELS].reshape(power.shape[:2] + (CHANNELS, band))
    power = jnp.where(power > 0, power, LOG_FLOOR)
    x = jnp.transpose(10.0 * jnp.log10(power), (0, 3, 1, 2))   # NHWC: [B, freq, time, band]

    x = jax.nn.relu(_batch_norm("bn1")(_conv(64, (7, 7), 2, name="conv1")(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, (blocks, planes) in enumerate(zip(STAGE_BLOCKS, STAGE_PLANES), start=1):
      stage_input = x
      for block in range(blocks):
        x = Bottleneck(planes, 2 if stage > 1 and block == 0 else 1, block == 0,
                       name=f"layer{stage}_{block}")(x)
      x = x * Attention(x.shape[-1], ATTENTION_KERNELS[stage - 1], name=f"att{stage}")(
          stage_input, x.shape[1:3])
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = pooled * Attention(x.shape[-1], ATTENTION_KERNELS[4], name="att5")(x, (1, 1))
    return nn.Dense(EMBEDDING_WIDTH, name="fc")(pooled[:, 0, 0])


def _mapping() -> dict[tuple[str, ...], tuple[str, Any]]:
  """Flax variable path -> (torch key of the AudioCLIP file, transform) for the audio head."""
  from mmldm_jax.convert import common

  def batch_norm(flax_name, torch_name):
    return {("params", flax_name, "scale"): (f"{torch_name}.weight", common.identity),
            ("params", flax_name, "bias"): (f"{torch_name}.bias", common.identity),
            ("batch_stats", flax_name, "mean"): (f"{torch_name}.running_mean", common.identity),
            ("batch_stats", flax_name, "var"): (f"{torch_name}.running_var", common.identity)}

  def conv(flax_name, torch_name, bias=False):
    entries = {("params", flax_name, "kernel"): (f"{torch_name}.weight", common.conv_kernel)}
    if bias:
      entries[("params", flax_name, "bias")] = (f"{torch_name}.bias", common.identity)
    return entries

  def nested(scope, entries):
    return {(collection, scope, *rest): value for (collection, *rest), value in entries.items()}

  a = PREFIX
  mapping = {("params", "window"): (a + "window", common.identity),
             ("params", "fbsp_m"): (a + "fbsp.m", common.identity),
             ("params", "fbsp_fb"): (a + "fbsp.fb", common.identity),
             ("params", "fbsp_fc"): (a + "fbsp.fc", common.identity),
             ("params", "fc", "kernel"): (a + "fc.weight", common.dense_kernel),
             ("params", "fc", "bias"): (a + "fc.bias", common.identity),
             **conv("conv1", a + "conv1"), **batch_norm("bn1", a + "bn1")}
  for stage, blocks in enumerate(STAGE_BLOCKS, start=1):
    for block in range(blocks):
      torch_block = f"{a}layer{stage}.{block}"
      entries = {}
      for index in (1, 2, 3):
        entries.update(conv(f"conv{index}", f"{torch_block}.conv{index}"))
        entries.update(batch_norm(f"bn{index}", f"{torch_block}.bn{index}"))
      if block == 0:
        entries.update(conv("downsample_conv", f"{torch_block}.downsample.0"))
        entries.update(batch_norm("downsample_bn", f"{torch_block}.downsample.1"))
      mapping.update(nested(f"layer{stage}_{block}", entries))
  for index in range(1, len(ATTENTION_KERNELS) + 1):
    torch_att = f"{a}att{index}"
    mapping.update(nested(f"att{index}", {**conv("conv_depth", f"{torch_att}.conv_depth", True),
                                          **conv("conv_point", f"{torch_att}.conv_point", True),
                                          **batch_norm("bn", f"{torch_att}.bn")}))
  return mapping


def convert_audio_head(state_dict: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
  """ESResNeXtFBSP variables from an AudioCLIP state dict. Every `audio.*` tensor must be used (but
  the BatchNorm step counters); the other branches' keys are not read. Raises ConversionError
  listing every missing, left-over or misshaped key."""
  from mmldm_jax.convert import common
  audio = {key: value for key, value in state_dict.items() if key.startswith(PREFIX)}
  if not audio:
    raise common.ConversionError(f"{source}: no `{PREFIX}*` keys: not an AudioCLIP checkpoint "
                                 f"with its audio head (expected {WEIGHTS_FILE})")
  template = jax.eval_shape(lambda: ESResNeXtFBSP().init(jax.random.key(0),
                                                         jnp.zeros((1, HOP), jnp.float32)))
  return common.assign(template, _mapping(), audio, source=source,
                       ignore=common.batch_norm_counters(audio))


def load_audio_head(path: str) -> dict:
  """ESResNeXtFBSP variables from a local `AudioCLIP-Full-Training.pt` (weights_only=True)."""
  from mmldm_jax.convert import common
  return convert_audio_head(common.read_weight_file(path, "AudioCLIP weights", WEIGHTS_FILE,
                                                    WEIGHTS_SOURCE), path)


def fit_to_clip(waveforms: np.ndarray) -> np.ndarray:
  """[B, N] -> [B, CLIP_SAMPLES]: the first 1.6 s, zero-padded at the end when shorter."""
  waveforms = np.asarray(waveforms, np.float32)
  if waveforms.shape[1] >= CLIP_SAMPLES:
    return waveforms[:, :CLIP_SAMPLES]
  return np.pad(waveforms, ((0, 0), (0, CLIP_SAMPLES - waveforms.shape[1])))


class AudioCLIPEmbeddings:
  """Jitted audio head from a weight file, with the FAD protocol's input: float waveforms [B, N]
  in [-1, 1] at 44.1 kHz -> float64 [B, 1024] (cut or zero-padded to 70,560 samples first); the
  waveforms of a call are split over `devices` (default: every local device)."""

  def __init__(self, path: str, devices: Sequence[Any] | None = None):
    model = ESResNeXtFBSP()

    def embed(variables, waveform):
      with jax.default_matmul_precision("highest"):
        return model.apply(variables, waveform)
    self._embed = devices_lib.DataParallel(embed, load_audio_head(path), devices)

  def __call__(self, waveforms: np.ndarray) -> np.ndarray:
    waveforms = np.asarray(waveforms)
    if waveforms.ndim != 2:
      raise ValueError(f"AudioCLIPEmbeddings: expected waveforms [B, N], got {waveforms.shape}")
    return np.asarray(self._embed(int16_scaling(fit_to_clip(waveforms))), np.float64)
