"""PANNs Cnn14 (Kong et al. 2020, AudioSet tagging) in Flax: the embedding of `fad_panns_cnn14`.

What it is for: turning 32 kHz waveforms into the 2048-d embeddings whose Frechet distance is the
PANNs FAD (as `frechet-audio-distance`'s PANN mode and MMAudio's `FD_PANNs`). Evaluation only (no
SpecAugment, no mixup, no dropout).

Weights: `Cnn14_mAP=0.431.pth` of the PANNs release (zenodo.org/record/3987831), a torch file read
with weights_only=True (`load_cnn14`); nothing is downloaded. Every tensor of the file is used,
including the STFT kernels and the mel filterbank it stores, so the front end is the file's own;
only the `num_batches_tracked` counters are ignored.

The network, as the PANNs code (torchlibrosa front end), for a waveform [B, N] in [-1, 1]:
  reflect-pad n_fft / 2 both sides, STFT by the file's windowed DFT kernels (n_fft 1024, hop 320),
  power, the file's mel filterbank (64 bins, 50 Hz - 14 kHz), 10 log10(max(., 1e-10)),
  BatchNorm over the mel bins, six blocks of (3x3 conv -> BatchNorm -> ReLU) x 2 then 2x2 average
  pooling (none after the last), widths 64 ... 2048, mean over frequency, max + mean over time,
  `fc1` + ReLU = the embedding [B, 2048]; `fc_audioset` + sigmoid = the 527 AudioSet tags.
Inputs need >= 1 s (>= 32 frames survive the five poolings); BatchNorm epsilon 1e-5 (PyTorch's).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax.evaluation import devices as devices_lib

SAMPLE_RATE = 32000
N_FFT = 1024
HOP = 320
MEL_BINS = 64
NUM_CLASSES = 527
WIDTHS = (64, 128, 256, 512, 1024, 2048)
EMBEDDING_WIDTH = 2048
BATCH_NORM_EPSILON = 1e-5
WEIGHTS_FILE = "Cnn14_mAP=0.431.pth"
WEIGHTS_SOURCE = "the PANNs release on Zenodo, zenodo.org/record/3987831"
MIN_SAMPLES = SAMPLE_RATE


def _batch_norm(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Inference BatchNorm over the last axis with parameters `{name}_scale/_bias` and statistics
  `{name}_mean/_var`."""
  width = x.shape[-1]
  scale = module.param(f"{name}_scale", nn.initializers.ones, (width,))
  bias = module.param(f"{name}_bias", nn.initializers.zeros, (width,))
  mean = module.variable("batch_stats", f"{name}_mean", jnp.zeros, (width,)).value
  var = module.variable("batch_stats", f"{name}_var", jnp.ones, (width,)).value
  return (x - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPSILON) * scale + bias


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 convolution, stride 1, zero padding 1: x [B, H, W, C], kernel [3, 3, C, O] -> [B, H, W, O].

  On maps with a side under 3 (Cnn14's last block on 1 s clips is 3 x 2) XLA:CPU's convolution
  runs at about 1 GFLOP/s, a hundredth of its rate on larger maps (2026-12-06: 9.3 s for the
  3 x 2 x 2048 -> 2048 convolution of 11 clips). There it is one matmul instead: the nine
  shifted copies of the padded map side by side on the channel axis, times the kernel as a
  [9 C, O] matrix (the copies are small because the maps are)."""
  height, width = x.shape[1], x.shape[2]
  if min(height, width) >= 3:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([padded[:, dy:dy + height, dx:dx + width]
                             for dy in range(3) for dx in range(3)], axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])    # rows in (dy, dx, channel) order


class ConvBlock(nn.Module):
  """(3x3 conv without bias -> BatchNorm -> ReLU) x 2, then `pool` x `pool` average pooling."""
  width: int
  pool: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index in (1, 2):
      kernel = self.param(f"conv{index}", nn.initializers.lecun_normal(),
                          (3, 3, x.shape[-1], self.width))
      x = jax.nn.relu(_batch_norm(self, f"bn{index}", conv3x3(x, kernel)))
    if self.pool > 1:
      x = nn.avg_pool(x, (self.pool, self.pool), (self.pool, self.pool), padding="VALID")
    return x


class Cnn14(nn.Module):
  """Waveform [B, N] at 32 kHz -> {"embedding": [B, 2048], "clipwise": [B, 527]}."""

  @nn.compact
  def __call__(self, waveform: jax.Array) -> dict[str, jax.Array]:
    if waveform.ndim != 2 or waveform.shape[1] < MIN_SAMPLES:
      raise ValueError(f"Cnn14: expected waveforms [B, N >= {MIN_SAMPLES}] at {SAMPLE_RATE} Hz, got "
                       f"{waveform.shape}")
    bins = N_FFT // 2 + 1
    real = self.param("stft_real", nn.initializers.zeros, (N_FFT, bins))
    imag = self.param("stft_imag", nn.initializers.zeros, (N_FFT, bins))
    filterbank = self.param("mel_filterbank", nn.initializers.zeros, (bins, MEL_BINS))
    padded = jnp.pad(waveform, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    kernel = jnp.concatenate([real, imag], axis=1)[:, None, :]          # [n_fft, 1, 2 bins]
    spectrum = jax.lax.conv_general_dilated(padded[:, :, None], kernel, (HOP,), "VALID",
                                            dimension_numbers=("NWC", "WIO", "NWC"))
    power = spectrum[..., :bins] ** 2 + spectrum[..., bins:] ** 2       # [B, T, bins]
    log_mel = 10.0 * jnp.log10(jnp.maximum(power @ filterbank, 1e-10))  # ref 1.0: no offset
    x = _batch_norm(self, "bn0", log_mel)[..., None]                    # [B, T, mel, 1]
    for index, width in enumerate(WIDTHS, start=1):
      x = ConvBlock(width, 2 if index < len(WIDTHS) else 1, name=f"conv_block{index}")(x)
    x = jnp.mean(x, axis=2)                                             # over frequency
    x = jnp.max(x, axis=1) + jnp.mean(x, axis=1)                        # over time
    embedding = jax.nn.relu(nn.Dense(EMBEDDING_WIDTH, name="fc1")(x))
    clipwise = jax.nn.sigmoid(nn.Dense(NUM_CLASSES, name="fc_audioset")(embedding))
    return {"embedding": embedding, "clipwise": clipwise}


def _mapping() -> dict[tuple[str, ...], tuple[str, Any]]:
  """Flax variable path -> (torch key, transform) for the whole network."""
  from mmldm_jax.convert import common

  def stft(weight):          # torch Conv1d (bins, 1, n_fft) -> (n_fft, bins)
    return weight[:, 0, :].T

  def batch_norm(flax_scope, torch_prefix, name):
    return {("params", *flax_scope, f"{name}_scale"): (f"{torch_prefix}.weight", common.identity),
            ("params", *flax_scope, f"{name}_bias"): (f"{torch_prefix}.bias", common.identity),
            ("batch_stats", *flax_scope, f"{name}_mean"): (f"{torch_prefix}.running_mean",
                                                           common.identity),
            ("batch_stats", *flax_scope, f"{name}_var"): (f"{torch_prefix}.running_var",
                                                          common.identity)}

  mapping = {
      ("params", "stft_real"): ("spectrogram_extractor.stft.conv_real.weight", stft),
      ("params", "stft_imag"): ("spectrogram_extractor.stft.conv_imag.weight", stft),
      ("params", "mel_filterbank"): ("logmel_extractor.melW", common.identity),
      **batch_norm((), "bn0", "bn0"),
  }
  for index in range(1, len(WIDTHS) + 1):
    block = f"conv_block{index}"
    for conv in (1, 2):
      mapping[("params", block, f"conv{conv}")] = (f"{block}.conv{conv}.weight",
                                                   common.conv_kernel)
      mapping.update(batch_norm((block,), f"{block}.bn{conv}", f"bn{conv}"))
  for dense in ("fc1", "fc_audioset"):
    mapping[("params", dense, "kernel")] = (f"{dense}.weight", common.dense_kernel)
    mapping[("params", dense, "bias")] = (f"{dense}.bias", common.identity)
  return mapping


def convert_cnn14(state_dict: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
  """Cnn14 variables from a PANNs state dict; every key used (but the BatchNorm step counters)."""
  from mmldm_jax.convert import common
  template = jax.eval_shape(lambda: Cnn14().init(jax.random.key(0),
                                                 jnp.zeros((1, MIN_SAMPLES), jnp.float32)))
  return common.assign(template, _mapping(), state_dict, source=source,
                       ignore=common.batch_norm_counters(state_dict))


def load_cnn14(path: str) -> dict:
  """Cnn14 variables from a local `Cnn14_mAP=0.431.pth` (torch, read with weights_only=True)."""
  from mmldm_jax.convert import common
  return convert_cnn14(common.read_weight_file(path, "PANNs weights", WEIGHTS_FILE,
                                               WEIGHTS_SOURCE), path)


class Cnn14Embeddings:
  """Jitted Cnn14 from a weight file: float waveforms [B, N] at 32 kHz -> float64 [B, 2048]; the
  waveforms of a call are split over `devices` (default: every local device)."""

  def __init__(self, path: str, devices: Sequence[Any] | None = None):
    model = Cnn14()

    def embed(variables, waveform):
      with jax.default_matmul_precision("highest"):
        return model.apply(variables, waveform)["embedding"]
    self._embed = devices_lib.DataParallel(embed, load_cnn14(path), devices)

  def __call__(self, waveforms: np.ndarray) -> np.ndarray:
    return np.asarray(self._embed(np.asarray(waveforms, np.float32)), np.float64)
