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

Resizing is bicubic (Keys' cubic, a = -0.5, with an antialiasing kernel when shrinking), applied as one
small matrix per axis that equals `jax.image.resize(..., 'bicubic')` and PIL's float ('F' mode)
bicubic to ~1e-6 (tested); as matrices it is two matmuls on an accelerator and easy to invert. It is not bit-identical to the
reference, which truncated the levels to uint8 and resized an 8-bit PIL image (rounding and clipping
after each of PIL's two passes): ours differs from that by under one 8-bit level on average and by up
to 4 levels next to silence. That is quantisation noise the VAE does not care about, and it keeps the
whole chain in float, jit-able and differentiable.

The inverse (`image_to_mel`) undoes the resize by least squares (pseudo-inverse of the resize
matrix; where the forward shrinks an axis, the exact inverse closest to a plain bicubic resize back).
Then image -> mel -> image is exact wherever no clip acts; a bicubic resize back, the reference's
choice, blurs sharp onsets and harmonics instead (off by up to 15 levels on a real clip).

Every function is batched over leading dimensions and jitted inside (one compile per shape and
setting), and works under an outer `jax.jit` too. The config (`config.audio`) is read in Python, so
close over it: `jax.jit(lambda w: log_mel(w, audio_cfg))`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# dB range kept by the audio image: (dB - 20 + 100) / 100 in [0, 1] keeps dB in [-80, +20].
_DB_OFFSET = 100.0 - 20.0
_DB_SCALE = 100.0
# The quietest level the audio image keeps (-80 dB, as a natural-log magnitude): anything below
# it decodes to it, so the chain cannot tell it from silence.
IMAGE_FLOOR_LOG = -_DB_OFFSET * math.log(10.0) / 20.0
_LOG_CLAMP = 1e-5         # HiFi-GAN's dynamic_range_compression clip value
_MAGNITUDE_EPS = 1e-9     # HiFi-GAN's sqrt(re^2 + im^2 + 1e-9)


# ----------------------------------------------------------------------------------------------
# Mel filterbank (NumPy port of librosa.filters.mel with htk=False, norm='slaney')
# ----------------------------------------------------------------------------------------------

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_MEL_LINEAR_HZ = 200.0 / 3
_MEL_LOG_START_HZ = 1000.0
_MEL_LOG_START = _MEL_LOG_START_HZ / _MEL_LINEAR_HZ
_MEL_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz) -> np.ndarray:
  hz = np.asarray(hz, np.float64)
  logarithmic = _MEL_LOG_START + np.log(np.maximum(hz, 1e-10) / _MEL_LOG_START_HZ) / _MEL_LOG_STEP
  return np.where(hz >= _MEL_LOG_START_HZ, logarithmic, hz / _MEL_LINEAR_HZ)


def _mel_to_hz(mels) -> np.ndarray:
  mels = np.asarray(mels, np.float64)
  logarithmic = _MEL_LOG_START_HZ * np.exp(_MEL_LOG_STEP * (mels - _MEL_LOG_START))
  return np.where(mels >= _MEL_LOG_START, logarithmic, _MEL_LINEAR_HZ * mels)


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


class _Spec(NamedTuple):
  """The STFT / mel settings of `config.audio`, hashable so that jitted functions can key on them."""
  n_fft: int
  hop: int
  win_length: int
  filterbank_rate: float
  num_mels: int
  fmin: float
  fmax: float

  @property
  def pad(self) -> int:
    """HiFi-GAN's reflect padding on each side, (n_fft - hop) / 2."""
    return (self.n_fft - self.hop) // 2

  @property
  def filterbank(self) -> np.ndarray:
    return mel_filterbank(self.filterbank_rate, self.n_fft, self.num_mels, self.fmin, self.fmax)


def _spec(audio_cfg: Any) -> _Spec:
  return _Spec(int(audio_cfg.n_fft), int(audio_cfg.hop_length), int(audio_cfg.win_length),
               float(audio_cfg.filterbank_sample_rate), int(audio_cfg.num_mels),
               float(audio_cfg.fmin), float(audio_cfg.fmax))


# ----------------------------------------------------------------------------------------------
# STFT with HiFi-GAN framing
# ----------------------------------------------------------------------------------------------

def num_mel_frames(num_samples: int, audio_cfg: Any) -> int:
  """Mel frames of a waveform of `num_samples`: (N + 2 * pad - n_fft) // hop + 1, pad = (n_fft-hop)/2."""
  spec = _spec(audio_cfg)
  padded = num_samples + 2 * spec.pad
  if padded < spec.n_fft:
    raise ValueError(f"num_mel_frames: {num_samples} samples is shorter than one STFT frame "
                     f"(audio.n_fft={spec.n_fft}, audio.hop_length={spec.hop})")
  return (padded - spec.n_fft) // spec.hop + 1


@functools.lru_cache(maxsize=16)
def _window(n_fft: int, win_length: int) -> np.ndarray:
  """Periodic Hann window of `win_length` (torch.hann_window), zero-padded centred to n_fft."""
  n = np.arange(win_length, dtype=np.float64)
  window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)
  left = (n_fft - win_length) // 2
  padded = np.zeros(n_fft, np.float64)
  padded[left:left + win_length] = window
  padded = padded.astype(np.float32)
  padded.setflags(write=False)
  return padded


def _frame_index(num_frames: int, spec: _Spec) -> np.ndarray:
  return spec.hop * np.arange(num_frames)[:, None] + np.arange(spec.n_fft)[None, :]


def _stft(padded_waveform: jax.Array, spec: _Spec) -> jax.Array:
  """Complex STFT [..., n_fft // 2 + 1, num_frames] of an already padded waveform (no centring)."""
  num_frames = (padded_waveform.shape[-1] - spec.n_fft) // spec.hop + 1
  frames = padded_waveform[..., _frame_index(num_frames, spec)] * _window(spec.n_fft,
                                                                          spec.win_length)
  return jnp.swapaxes(jnp.fft.rfft(frames, axis=-1), -1, -2)


def _overlap_add(spectrum: jax.Array, spec: _Spec) -> jax.Array:
  """Inverse of `_stft`: windowed overlap-add over the whole padded span, (frames - 1) * hop + n_fft.

  Divides by the summed squared window (the least-squares inverse STFT); samples no window covers
  (the first one, where the periodic Hann window is 0) come out as 0.
  """
  num_frames = spectrum.shape[-1]
  window = _window(spec.n_fft, spec.win_length)
  frames = jnp.fft.irfft(jnp.swapaxes(spectrum, -1, -2), n=spec.n_fft, axis=-1) * window
  padded_length = (num_frames - 1) * spec.hop + spec.n_fft
  frame_index = _frame_index(num_frames, spec).reshape(-1)
  batch_shape = frames.shape[:-2]
  signal = jnp.zeros(batch_shape + (padded_length,), frames.dtype)
  signal = signal.at[..., frame_index].add(frames.reshape(batch_shape + (-1,)))
  envelope = np.zeros(padded_length, np.float64)
  np.add.at(envelope, frame_index, np.tile(window.astype(np.float64) ** 2, num_frames))
  inverse_envelope = np.where(envelope > 1e-8, 1.0 / np.maximum(envelope, 1e-8), 0.0)
  return signal * inverse_envelope.astype(np.float32)


def log_mel(waveform: jax.Array, audio_cfg: Any) -> jax.Array:
  """HiFi-GAN log-mel spectrogram, float32 [..., num_mels, num_frames] of a waveform [..., N].

  `num_frames = num_mel_frames(N, audio_cfg)` (80 x 275 for 1.6 s at 44.1 kHz with the paper config).
  The reflect padding needs N > (n_fft - hop) / 2.
  """
  spec = _spec(audio_cfg)
  if jnp.shape(waveform)[-1] <= spec.pad:
    raise ValueError(f"log_mel: waveform of {jnp.shape(waveform)[-1]} samples is too short for the "
                     f"reflect padding of {spec.pad} samples (audio.n_fft={spec.n_fft}, "
                     f"audio.hop_length={spec.hop})")
  return _log_mel(jnp.asarray(waveform, jnp.float32), spec)


@functools.partial(jax.jit, static_argnums=1)
def _log_mel(waveform: jax.Array, spec: _Spec) -> jax.Array:
  padded = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(spec.pad, spec.pad)],
                   mode="reflect")
  spectrum = _stft(padded, spec)
  magnitude = jnp.sqrt(jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2 + _MAGNITUDE_EPS)
  mel = jnp.einsum("mf,...ft->...mt", spec.filterbank, magnitude,
                   precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, _LOG_CLAMP))


# ----------------------------------------------------------------------------------------------
# Log-mel <-> audio image
# ----------------------------------------------------------------------------------------------

def _keys_cubic(distance: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (PIL's and jax.image's 'bicubic')."""
  x = np.abs(distance)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return np.where(x >= 2.0, 0.0, np.where(x >= 1.0, far, near))


@functools.lru_cache(maxsize=32)
def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """The linear map [size_out, size_in] of a bicubic resize along one axis, float64.

  Equal to what `jax.image.resize(..., 'bicubic')` (antialias=True) applies: pixel centres aligned,
  the kernel widened by size_in / size_out when shrinking, weights renormalised at the borders.
  """
  scale = size_out / size_in
  kernel_scale = max(1.0 / scale, 1.0)
  centres = (np.arange(size_out) + 0.5) / scale - 0.5
  weights = _keys_cubic((centres[:, None] - np.arange(size_in)[None, :]) / kernel_scale)
  weights /= weights.sum(axis=1, keepdims=True)
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=32)
def _inverse_resize_matrix(size_image: int, size_raw: int) -> np.ndarray:
  """Inverse [size_raw, size_image] of the raw -> image resize along one axis.

  With A the forward resize and U the plain bicubic resize back, this is
  pinv(A) + (I - pinv(A) A) U: the least-squares inverse of A, and where A shrinks the axis (so many
  inverses reproduce the image) the one closest to U's smooth answer.
  """
  forward = _resize_matrix(size_raw, size_image)
  backward = _resize_matrix(size_image, size_raw)
  # Bicubic resize matrices have full rank (condition number about 2), so the pseudo-inverse is a
  # small linear solve (cheaper than an SVD).
  if size_image >= size_raw:
    pseudo_inverse = np.linalg.solve(forward.T @ forward, forward.T)
  else:
    pseudo_inverse = np.linalg.solve(forward @ forward.T, forward).T
  inverse = pseudo_inverse + (np.eye(size_raw) - pseudo_inverse @ forward) @ backward
  inverse = inverse.astype(np.float32)
  inverse.setflags(write=False)
  return inverse


@functools.partial(jax.jit, static_argnums=1)
def mel_to_image(log_mel_spectrogram: jax.Array, image_size: int) -> jax.Array:
  """Audio image [..., image_size, image_size, 3] in [-1, 1] of a log-mel [..., num_mels, frames].

  Row 0 is the highest mel bin, column 0 the first frame (see the module docstring).
  """
  log_mel_spectrogram = jnp.asarray(log_mel_spectrogram, jnp.float32)
  decibels = (20.0 / math.log(10.0)) * log_mel_spectrogram      # 20 log10(exp(x))
  level = jnp.clip((decibels + _DB_OFFSET) / _DB_SCALE, 0.0, 1.0)
  level = jnp.flip(level, axis=-2)
  rows = _resize_matrix(level.shape[-2], image_size).astype(np.float32)
  cols = _resize_matrix(level.shape[-1], image_size).astype(np.float32)
  resized = jnp.einsum("rm,...mt,ct->...rc", rows, level, cols,
                       precision=jax.lax.Precision.HIGHEST)
  # Clipped like the reference's 8-bit image: bicubic overshoots next to silent regions.
  image = 2.0 * jnp.clip(resized, 0.0, 1.0) - 1.0
  return jnp.broadcast_to(image[..., None], image.shape + (3,))


@functools.partial(jax.jit, static_argnums=(1, 2))
def image_to_mel(image: jax.Array, num_mels: int, num_frames: int) -> jax.Array:
  """Log-mel [..., num_mels, num_frames] of an audio image [..., S, S, 3]: the inverse of mel_to_image.

  Channels are averaged and mapped to levels in [0, 1], the resize is undone by least squares (see
  `_inverse_resize_matrix`), levels are clipped to [0, 1] and dB = 100 x - 80 becomes a natural-log
  magnitude, so the result lies in [-80, +20] dB (the forward clamp and clips are not invertible).

  Round trip: mel_to_image(image_to_mel(image)) == image to float precision for an image of the
  forward map wherever no clip acts. Next to silence (level 0) the forward clipped the bicubic
  overshoot, which no mel reproduces exactly: there a few pixels move, by up to 3 8-bit levels with
  the paper's 80 x 275 -> 256 x 256, more where time is shrunk 3x (demo: 200 frames -> 64 columns).
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
  `seed`, so results are deterministic. A stand-in vocoder: right pitch and timing, audibly phasey,
  and silent above the filterbank's top (audio.fmax scaled by sample_rate / filterbank_sample_rate:
  16 kHz with the paper's 44.1 kHz waveform and 22.05 kHz filterbank).

  num_iters: default audio_cfg.griffin_lim_iters. num_samples: default the length the frames came
  from, (frames - 1) * hop + n_fft - 2 * pad.
  """
  spec = _spec(audio_cfg)
  num_iters = int(audio_cfg.griffin_lim_iters if num_iters is None else num_iters)
  num_frames = jnp.shape(log_mel_spectrogram)[-1]
  if num_samples is None:
    num_samples = (num_frames - 1) * spec.hop + spec.n_fft - 2 * spec.pad
  return _griffin_lim(jnp.asarray(log_mel_spectrogram, jnp.float32), spec, num_iters,
                      int(num_samples), float(momentum), int(seed))


@functools.lru_cache(maxsize=16)
def _inverse_filterbank(spec: _Spec) -> np.ndarray:
  inverse = np.linalg.pinv(spec.filterbank.astype(np.float64)).astype(np.float32)
  inverse.setflags(write=False)
  return inverse


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _griffin_lim(log_mel_spectrogram: jax.Array, spec: _Spec, num_iters: int, num_samples: int,
                 momentum: float, seed: int) -> jax.Array:
  magnitude = jnp.maximum(0.0, jnp.einsum("fm,...mt->...ft", _inverse_filterbank(spec),
                                          jnp.exp(log_mel_spectrogram),
                                          precision=jax.lax.Precision.HIGHEST))

  # Griffin-Lim runs on the padded span the frames cover; the padding is cut off at the end.
  def rebuild(phases):
    return _stft(_overlap_add(magnitude * phases, spec), spec)

  angles = jax.random.uniform(jax.random.PRNGKey(seed), magnitude.shape, jnp.float32, 0, 2 * jnp.pi)
  phases = jnp.exp(1j * angles).astype(jnp.complex64)
  step = momentum / (1.0 + momentum)

  def body(_, state):
    phases, previous = state
    rebuilt = rebuild(phases)
    update = rebuilt - step * previous
    return update / (jnp.abs(update) + 1e-16), rebuilt

  phases, _ = jax.lax.fori_loop(0, num_iters, body, (phases, jnp.zeros_like(phases)))
  waveform = _overlap_add(magnitude * phases, spec)[..., spec.pad:spec.pad + num_samples]
  missing = num_samples - waveform.shape[-1]
  if missing > 0:
    waveform = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(0, missing)])
  return waveform
