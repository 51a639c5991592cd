"""Waveform <-> log-mel <-> "audio image", and Griffin-Lim to get a waveform back.

The forward chain is what the models consume (reference: MM-LDM's Audio_Manager + Img_Loader):

  waveform [..., N] (float32 in [-1, 1])
    -> log-mel [..., num_mels, num_frames]      exactly HiFi-GAN's `meldataset.mel_spectrogram`:
         reflect pad (n_fft - hop) / 2 on both sides, no centring, periodic Hann window, magnitude
         sqrt(re^2 + im^2 + 1e-9), Slaney mel filterbank built for `filterbank_sample_rate`,
         log(clamp(x, 1e-5))
    -> audio image [..., S, S, 3] in [-1, 1]    dB = 20 log10(exp(log-mel)), x = (dB - 20 + 100) / 100
         clipped to [0, 1], bicubic resize (aspect distorted) to S x S, clipped to [0, 1] again,
         3 identical channels, 2x - 1.

Orientation of the audio image: rows are mel bins and columns are time frames. Row 0 is the HIGHEST
mel bin, so the picture has low frequencies at the bottom like a usual spectrogram plot. (The reference
kept mel bin 0 in row 0; the flip changes nothing for a model trained from scratch.)

Resizing uses `jax.image.resize(..., 'bicubic')`: Keys' cubic (a = -0.5) with an antialiasing kernel
when shrinking, which matches PIL's float ('F' mode) bicubic to ~1e-6. The reference went through
8-bit PIL images (`uint8` before and after its resize), so its images differ from ours by that
quantisation (at most about one 8-bit level); nothing downstream depends on the last bit.

The inverse (`image_to_mel`) goes back with the least-squares inverse of that resize (the
pseudo-inverse of the resize matrix) instead of a second bicubic resize. Resizing is linear per axis,
so image -> mel -> image is then exact whenever the mel axes are not shrunk, and a projection
otherwise; a bicubic resize back (the reference's choice) blurs sharp onsets and harmonics.

Every function is jit-able and batched over leading dimensions; the config (`config.audio`) is read
in Python, so wrap calls in a closure to jit them: `jax.jit(lambda w: log_mel(w, audio_cfg))`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# dB range kept by the audio image: (dB - 20 + 100) / 100 in [0, 1] keeps dB in [-80, +20].
_DB_OFFSET = 100.0 - 20.0
_DB_SCALE = 100.0
_LOG_CLAMP = 1e-5         # HiFi-GAN's dynamic_range_compression clip value
_MAGNITUDE_EPS = 1e-9     # HiFi-GAN's sqrt(re^2 + im^2 + 1e-9)


# ----------------------------------------------------------------------------------------------
# Mel filterbank (NumPy port of librosa.filters.mel with htk=False, norm='slaney')
# ----------------------------------------------------------------------------------------------

def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
  hz = np.asarray(hz, np.float64)
  linear_step = 200.0 / 3
  log_start_hz = 1000.0
  log_start_mel = log_start_hz / linear_step
  log_step = math.log(6.4) / 27.0
  mels = hz / linear_step
  above = hz >= log_start_hz
  return np.where(above, log_start_mel + np.log(np.maximum(hz, 1e-10) / log_start_hz) / log_step,
                  mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
  """Inverse of `_hz_to_mel`."""
  mels = np.asarray(mels, np.float64)
  linear_step = 200.0 / 3
  log_start_hz = 1000.0
  log_start_mel = log_start_hz / linear_step
  log_step = math.log(6.4) / 27.0
  return np.where(mels >= log_start_mel,
                  log_start_hz * np.exp(log_step * (mels - log_start_mel)), linear_step * mels)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: float, n_fft: int, num_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """Slaney-normalised triangular mel filters, float32 [num_mels, n_fft // 2 + 1].

  Same numbers as `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin,
  fmax=fmax)` (htk=False, norm='slaney'): triangles equally spaced on Slaney's mel scale, each scaled
  to unit area in Hz. Computed in float64 and returned read-only (the result is cached).
  """
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f"mel_filterbank: expected 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, "
                     f"fmax={fmax}, sample_rate={sample_rate}")
  fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
  mel_edges = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), num_mels + 2)
  hz_edges = _mel_to_hz(mel_edges)
  widths = np.diff(hz_edges)
  ramps = hz_edges[:, None] - fft_freqs[None, :]
  rising = -ramps[:-2] / widths[:-1, None]
  falling = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
  weights = weights.astype(np.float32)
  weights.setflags(write=False)
  return weights


def _filterbank(audio_cfg: Any) -> np.ndarray:
  return mel_filterbank(float(audio_cfg.filterbank_sample_rate), int(audio_cfg.n_fft),
                        int(audio_cfg.num_mels), float(audio_cfg.fmin), float(audio_cfg.fmax))


# ----------------------------------------------------------------------------------------------
# STFT with HiFi-GAN framing
# ----------------------------------------------------------------------------------------------

def _pad_amount(audio_cfg: Any) -> int:
  return (int(audio_cfg.n_fft) - int(audio_cfg.hop_length)) // 2


def num_mel_frames(num_samples: int, audio_cfg: Any) -> int:
  """Mel frames of a waveform of `num_samples`: (N + 2 * pad - n_fft) // hop + 1, pad = (n_fft-hop)/2."""
  padded = num_samples + 2 * _pad_amount(audio_cfg)
  if padded < audio_cfg.n_fft:
    raise ValueError(f"num_mel_frames: {num_samples} samples is shorter than one STFT frame "
                     f"(audio.n_fft={audio_cfg.n_fft}, audio.hop_length={audio_cfg.hop_length})")
  return (padded - int(audio_cfg.n_fft)) // int(audio_cfg.hop_length) + 1


@functools.lru_cache(maxsize=16)
def _window(n_fft: int, win_length: int) -> np.ndarray:
  """Periodic Hann window of `win_length` (torch.hann_window), zero-padded centred to n_fft."""
  n = np.arange(win_length, dtype=np.float64)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
  left = (n_fft - win_length) // 2
  padded = np.zeros(n_fft, np.float64)
  padded[left:left + win_length] = window
  return padded.astype(np.float32)


def _stft(padded_waveform: jax.Array, audio_cfg: Any) -> jax.Array:
  """Complex STFT [..., n_fft // 2 + 1, num_frames] of an already padded waveform (no centring)."""
  n_fft, hop = int(audio_cfg.n_fft), int(audio_cfg.hop_length)
  num_frames = (padded_waveform.shape[-1] - n_fft) // hop + 1
  frame_index = hop * np.arange(num_frames)[:, None] + np.arange(n_fft)[None, :]
  frames = padded_waveform[..., frame_index] * _window(n_fft, int(audio_cfg.win_length))
  return jnp.swapaxes(jnp.fft.rfft(frames, axis=-1), -1, -2)


def _overlap_add(spectrum: jax.Array, audio_cfg: Any) -> jax.Array:
  """Inverse of `_stft`: windowed overlap-add over the whole padded span, (frames - 1) * hop + n_fft.

  Divides by the summed squared window (the least-squares inverse STFT); samples no window covers
  (the first one, where the periodic Hann window is 0) come out as 0.
  """
  n_fft, hop = int(audio_cfg.n_fft), int(audio_cfg.hop_length)
  num_frames = spectrum.shape[-1]
  window = _window(n_fft, int(audio_cfg.win_length))
  frames = jnp.fft.irfft(jnp.swapaxes(spectrum, -1, -2), n=n_fft, axis=-1) * window
  padded_length = (num_frames - 1) * hop + n_fft
  frame_index = (hop * np.arange(num_frames)[:, None] + np.arange(n_fft)[None, :]).reshape(-1)
  batch_shape = frames.shape[:-2]
  signal = jnp.zeros(batch_shape + (padded_length,), frames.dtype)
  signal = signal.at[..., frame_index].add(frames.reshape(batch_shape + (-1,)))
  envelope = np.zeros(padded_length, np.float64)
  np.add.at(envelope, frame_index, np.tile(window.astype(np.float64) ** 2, num_frames))
  inverse_envelope = np.where(envelope > 1e-8, 1.0 / np.maximum(envelope, 1e-8), 0.0)
  return signal * inverse_envelope.astype(np.float32)


def _magnitude_to_log_mel(magnitude: jax.Array, audio_cfg: Any) -> jax.Array:
  mel = jnp.einsum("mf,...ft->...mt", _filterbank(audio_cfg), magnitude,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, _LOG_CLAMP))


def log_mel(waveform: jax.Array, audio_cfg: Any) -> jax.Array:
  """HiFi-GAN log-mel spectrogram, float32 [..., num_mels, num_frames] of a waveform [..., N].

  `num_frames = num_mel_frames(N, audio_cfg)` (80 x 275 for 1.6 s at 44.1 kHz with the paper config).
  The reflect padding needs N > (n_fft - hop) / 2.
  """
  waveform = jnp.asarray(waveform, jnp.float32)
  pad = _pad_amount(audio_cfg)
  if waveform.shape[-1] <= pad:
    raise ValueError(f"log_mel: waveform of {waveform.shape[-1]} samples is too short for the reflect "
                     f"padding of {pad} samples (audio.n_fft={audio_cfg.n_fft}, "
                     f"audio.hop_length={audio_cfg.hop_length})")
  padded = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(pad, pad)], mode="reflect")
  spectrum = _stft(padded, audio_cfg)
  magnitude = jnp.sqrt(jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2 + _MAGNITUDE_EPS)
  return _magnitude_to_log_mel(magnitude, audio_cfg)


# ----------------------------------------------------------------------------------------------
# Log-mel <-> audio image
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """The linear map [size_out, size_in] that `jax.image.resize(..., 'bicubic')` applies along an axis."""
  identity = jnp.eye(size_in, dtype=jnp.float32)
  matrix = np.asarray(jax.image.resize(identity, (size_out, size_in), "bicubic"), np.float64)
  matrix.setflags(write=False)
  return matrix


@functools.lru_cache(maxsize=32)
def _inverse_resize_matrix(size_image: int, size_raw: int) -> np.ndarray:
  """Inverse [size_raw, size_image] of the raw -> image resize along one axis.

  With A the forward resize and U the plain bicubic resize back, this is
  pinv(A) + (I - pinv(A) A) U: the least-squares inverse of A, and where A shrinks the axis (so many
  inverses reproduce the image) the one closest to U's smooth answer.
  """
  forward = _resize_matrix(size_raw, size_image)
  backward = _resize_matrix(size_image, size_raw)
  pseudo_inverse = np.linalg.pinv(forward)
  inverse = pseudo_inverse + (np.eye(size_raw) - pseudo_inverse @ forward) @ backward
  inverse = inverse.astype(np.float32)
  inverse.setflags(write=False)
  return inverse


def mel_to_image(log_mel_spectrogram: jax.Array, image_size: int) -> jax.Array:
  """Audio image [..., image_size, image_size, 3] in [-1, 1] of a log-mel [..., num_mels, frames].

  Row 0 is the highest mel bin, column 0 the first frame (see the module docstring).
  """
  log_mel_spectrogram = jnp.asarray(log_mel_spectrogram, jnp.float32)
  decibels = (20.0 / math.log(10.0)) * log_mel_spectrogram      # 20 log10(exp(x))
  level = jnp.clip((decibels + _DB_OFFSET) / _DB_SCALE, 0.0, 1.0)
  level = jnp.flip(level, axis=-2)
  out_shape = level.shape[:-2] + (image_size, image_size)
  # Clipped like the reference's 8-bit image: bicubic overshoots next to silent regions.
  resized = jnp.clip(jax.image.resize(level, out_shape, "bicubic"), 0.0, 1.0)
  image = 2.0 * resized - 1.0
  return jnp.broadcast_to(image[..., None], out_shape + (3,))


def image_to_mel(image: jax.Array, num_mels: int, num_frames: int) -> jax.Array:
  """Log-mel [..., num_mels, num_frames] of an audio image [..., S, S, 3]: the inverse of mel_to_image.

  Channels are averaged and mapped to levels in [0, 1], the resize is undone by least squares, the
  levels are clipped to [0, 1] (the range of the forward map) and dB = 100 x - 80 is turned into a
  natural-log magnitude. Levels are clipped only AFTER the inverse resize: bicubic overshoot next to
  silent (level 0) regions is part of a valid image and needed to undo the resize exactly. The result
  lies in [-80, +20] dB: the forward clamp and clip are not invertible.

  Round trip: mel_to_image(image_to_mel(image)) == image (to float precision) for an image of the
  forward map as long as no clip acts (no level at 0 or 1 and no bicubic overshoot). Where an axis is
  shrunk, detail the image does not hold is gone and the inverse picks the smooth solution; next to
  saturated regions re-clipping then moves pixels (by less than one 8-bit level with the paper's
  80 x 275 -> 256 x 256, by several levels where time is shrunk 3x as in the demo config).
  """
  image = jnp.asarray(image, jnp.float32)
  rows, cols = image.shape[-3], image.shape[-2]
  level = (jnp.mean(image, axis=-1) + 1.0) / 2.0
  level = jnp.einsum("mr,...rc,tc->...mt", _inverse_resize_matrix(rows, num_mels), level,
                     _inverse_resize_matrix(cols, num_frames), precision=jax.lax.Precision.HIGHEST)
  level = jnp.clip(jnp.flip(level, axis=-2), 0.0, 1.0)
  decibels = _DB_SCALE * level - _DB_OFFSET
  return (math.log(10.0) / 20.0) * decibels


def waveform_to_image(waveform: jax.Array, audio_cfg: Any) -> jax.Array:
  """The audio image the models consume: `mel_to_image(log_mel(waveform), audio_cfg.image_size)`."""
  return mel_to_image(log_mel(waveform, audio_cfg), int(audio_cfg.image_size))


# ----------------------------------------------------------------------------------------------
# Griffin-Lim
# ----------------------------------------------------------------------------------------------

def griffin_lim(log_mel_spectrogram: jax.Array, audio_cfg: Any, num_iters: int | None = None,
                num_samples: int | None = None, momentum: float = 0.99,
                seed: int = 0) -> jax.Array:
  """Waveform [..., num_samples] whose log-mel approximates `log_mel_spectrogram` [..., mels, frames].

  The mel magnitudes are mapped to linear-frequency magnitudes with the filterbank's pseudo-inverse
  (negative values clipped to 0), then phases are estimated with "fast" Griffin-Lim (Perraudin et al.
  2013, as librosa.griffinlim with momentum 0.99). Initial phases are uniform random from a fixed
  `seed`, so results are deterministic. A stand-in vocoder: intelligible pitch and timing, audibly
  phasey; it has no access to the high frequencies the filterbank leaves out (above audio.fmax
  relative to filterbank_sample_rate).

  num_iters: default audio_cfg.griffin_lim_iters. num_samples: default the length the frames came
  from, (frames - 1) * hop + n_fft - 2 * pad.
  """
  num_iters = int(audio_cfg.griffin_lim_iters if num_iters is None else num_iters)
  log_mel_spectrogram = jnp.asarray(log_mel_spectrogram, jnp.float32)
  num_frames = log_mel_spectrogram.shape[-1]
  if num_samples is None:
    num_samples = ((num_frames - 1) * int(audio_cfg.hop_length) + int(audio_cfg.n_fft)
                   - 2 * _pad_amount(audio_cfg))
  inverse_filterbank = np.linalg.pinv(_filterbank(audio_cfg).astype(np.float64)).astype(np.float32)
  magnitude = jnp.maximum(0.0, jnp.einsum("fm,...mt->...ft", inverse_filterbank,
                                          jnp.exp(log_mel_spectrogram),
                                          precision=jax.lax.Precision.HIGHEST))

  # Griffin-Lim runs on the padded span the frames cover; the padding is cut off at the end.
  def rebuild(phases):
    return _stft(_overlap_add(magnitude * phases, audio_cfg), audio_cfg)

  angles = jax.random.uniform(jax.random.PRNGKey(seed), magnitude.shape, jnp.float32, 0, 2 * jnp.pi)
  phases = jnp.exp(1j * angles).astype(jnp.complex64)
  step = momentum / (1.0 + momentum)

  def body(_, state):
    phases, previous = state
    rebuilt = rebuild(phases)
    update = rebuilt - step * previous
    return update / (jnp.abs(update) + 1e-16), rebuilt

  phases, _ = jax.lax.fori_loop(0, num_iters, body, (phases, jnp.zeros_like(phases)))
  pad = _pad_amount(audio_cfg)
  waveform = _overlap_add(magnitude * phases, audio_cfg)[..., pad:pad + num_samples]
  missing = num_samples - waveform.shape[-1]
  if missing > 0:
    waveform = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(0, missing)])
  return waveform
