"""Tests of mmldm_jax.data.audio against NumPy / librosa / torch references (HiFi-GAN's mel) and
behaviour tests of the audio image and Griffin-Lim."""
import math
import os

import jax
import jax.numpy as jnp
import librosa  # imported once per module: its first use is slow (numba)
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax.data import audio

AUDIO_CONFIGS = {"paper": os.path.join(CONFIGS, "aist.py:tiny"),
                 "demo": os.path.join(CONFIGS, "demo.py")}


@pytest.fixture(scope="module", params=sorted(AUDIO_CONFIGS))
def audio_cfg(request):
  return config_lib.load(AUDIO_CONFIGS[request.param]).audio


def _test_waveform(audio_cfg, seconds=1.6, seed=0):
  """Tones, a late high tone, broadband noise and a near-silent start (exercises the log clamp)."""
  rate = audio_cfg.sample_rate
  t = np.arange(int(round(seconds * rate))) / rate
  noise = np.random.default_rng(seed).standard_normal(len(t))
  waveform = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t) * (t > 0.8)
              + 0.02 * noise)
  waveform[:int(0.2 * rate)] *= 1e-3
  return waveform


def _reference_log_mel(waveform, audio_cfg):
  """HiFi-GAN mel_spectrogram in float64 NumPy with librosa's filterbank."""
  n_fft, hop, win = audio_cfg.n_fft, audio_cfg.hop_length, audio_cfg.win_length
  pad = (n_fft - hop) // 2
  padded = np.pad(np.asarray(waveform, np.float64), (pad, pad), mode="reflect")
  window = np.zeros(n_fft)
  left = (n_fft - win) // 2
  window[left:left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
  count = (len(padded) - n_fft) // hop + 1
  frames = np.stack([padded[i * hop:i * hop + n_fft] for i in range(count)]) * window
  spectrum = np.fft.rfft(frames, axis=-1).T
  magnitude = np.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
  filterbank = librosa.filters.mel(sr=audio_cfg.filterbank_sample_rate, n_fft=n_fft,
                                   n_mels=audio_cfg.num_mels, fmin=audio_cfg.fmin,
                                   fmax=audio_cfg.fmax, dtype=np.float64)
  return np.log(np.maximum(filterbank @ magnitude, 1e-5))


def _torch_log_mel(waveform, audio_cfg):
  """The same through torch.stft, as HiFi-GAN's meldataset.mel_spectrogram calls it (float64)."""
  n_fft, hop, win = audio_cfg.n_fft, audio_cfg.hop_length, audio_cfg.win_length
  pad = (n_fft - hop) // 2
  signal = torch.tensor(np.asarray(waveform), dtype=torch.float64)[None, None]
  signal = torch.nn.functional.pad(signal, (pad, pad), mode="reflect").squeeze(1)
  spectrum = torch.stft(signal, n_fft, hop_length=hop, win_length=win,
                        window=torch.hann_window(win, dtype=torch.float64), center=False,
                        normalized=False, onesided=True, return_complex=True)
  magnitude = torch.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
  filterbank = torch.from_numpy(librosa.filters.mel(
      sr=audio_cfg.filterbank_sample_rate, n_fft=n_fft, n_mels=audio_cfg.num_mels,
      fmin=audio_cfg.fmin, fmax=audio_cfg.fmax, dtype=np.float64))
  return torch.log(torch.clamp(filterbank @ magnitude, min=1e-5))[0].numpy()


# ------------------------------------------------------------------------------------------------
# Log-mel
# ------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_filterbank_matches_librosa(audio_cfg):
  ours = audio.mel_filterbank(audio_cfg.filterbank_sample_rate, audio_cfg.n_fft, audio_cfg.num_mels,
                              audio_cfg.fmin, audio_cfg.fmax)
  expected = librosa.filters.mel(sr=audio_cfg.filterbank_sample_rate, n_fft=audio_cfg.n_fft,
                                 n_mels=audio_cfg.num_mels, fmin=audio_cfg.fmin, fmax=audio_cfg.fmax)
  assert ours.shape == (audio_cfg.num_mels, audio_cfg.n_fft // 2 + 1) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="fmax"):
    audio.mel_filterbank(16000, 512, 64, 0.0, 9000.0)


def test_frame_counts_match_the_reference_geometry():
  paper = config_lib.load(os.path.join(CONFIGS, "aist.py")).audio
  demo = config_lib.load(os.path.join(CONFIGS, "demo.py")).audio
  assert audio.num_mel_frames(70560, paper) == 275      # 1.6 s at 44.1 kHz -> 80 x 275
  assert audio.num_mel_frames(176400, paper) == 689     # 4.0 s (AudioSet) -> 80 x 689
  assert audio.num_mel_frames(25600, demo) == 200
  with pytest.raises(ValueError, match="n_fft"):
    audio.num_mel_frames(10, paper)


@pytest.mark.parity
def test_log_mel_matches_numpy_and_torch_references(audio_cfg):
  waveform = _test_waveform(audio_cfg)
  ours = np.asarray(audio.log_mel(jnp.asarray(waveform, jnp.float32), audio_cfg))
  expected = _reference_log_mel(waveform, audio_cfg)
  frames = audio.num_mel_frames(len(waveform), audio_cfg)
  assert ours.shape == expected.shape == (audio_cfg.num_mels, frames)
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours, _torch_log_mel(waveform, audio_cfg), atol=1e-4, rtol=0)
  assert expected.min() == pytest.approx(math.log(1e-5))    # the clamp is exercised


def test_log_mel_is_batched_and_jits(audio_cfg):
  waveforms = np.stack([np.stack([_test_waveform(audio_cfg, 0.5, seed=3 * i + j) * (j + 1) / 3
                                  for j in range(3)]) for i in range(2)])
  jitted = jax.jit(lambda batch: audio.log_mel(batch, audio_cfg))
  batched = np.asarray(jitted(jnp.asarray(waveforms, jnp.float32)))
  assert batched.shape == (2, 3, audio_cfg.num_mels,
                           audio.num_mel_frames(waveforms.shape[-1], audio_cfg))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(batched[i, j], _reference_log_mel(waveforms[i, j], audio_cfg),
                                 atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="too short"):
    audio.log_mel(jnp.zeros((8,)), audio_cfg)


# ------------------------------------------------------------------------------------------------
# Audio image
# ------------------------------------------------------------------------------------------------

def _levels(image):
  """8-bit levels of an image in [-1, 1]: round((x + 1) * 127.5)."""
  return np.round((np.asarray(image, np.float64) + 1.0) * 127.5).astype(np.int64)


def test_audio_image_layout_and_orientation():
  cfg = config_lib.load(os.path.join(CONFIGS, "aist.py")).audio
  rate = cfg.sample_rate
  t = np.arange(70560) / rate
  # A low tone in the first half, a high tone in the second half.
  waveform = np.where(t < 0.8, 0.5 * np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 9000 * t))
  image = np.asarray(audio.waveform_to_image(jnp.asarray(waveform, jnp.float32), cfg))
  assert image.shape == (256, 256, 3) and image.dtype == np.float32
  assert image.min() >= -1.0 and image.max() <= 1.0
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  gray = image[..., 0]
  # Row 0 is the highest mel bin: the low tone is bright near the bottom-left, the high tone near
  # the top-right.
  low_rows, high_rows = slice(200, 256), slice(0, 128)
  assert gray[low_rows, :100].max() > gray[high_rows, :100].max() + 0.5
  assert gray[high_rows, 156:].max() > gray[low_rows, 156:].mean() + 0.5


@pytest.mark.parametrize("size_in,size_out", [(80, 256), (275, 256), (200, 64), (64, 64)])
def test_resize_matrix_is_jax_image_resize(size_in, size_out):
  values = np.random.default_rng(size_in).uniform(0, 1, (size_in, 3))
  expected = jax.image.resize(jnp.asarray(values, jnp.float32), (size_out, 3), "bicubic")
  np.testing.assert_allclose(audio._resize_matrix(size_in, size_out) @ values, expected, atol=2e-6)


def test_audio_image_matches_pil_bicubic():
  """Ours == PIL float bicubic; the reference's 8-bit PIL path differs by its quantisation only."""
  cfg = config_lib.load(os.path.join(CONFIGS, "aist.py")).audio
  log_mel = np.asarray(audio.log_mel(jnp.asarray(_test_waveform(cfg), jnp.float32), cfg))
  level = np.clip((20 * np.log10(np.exp(log_mel.astype(np.float64))) - 20 + 100) / 100, 0, 1)
  ours = (np.asarray(audio.mel_to_image(jnp.asarray(log_mel), 256))[::-1, :, 0] + 1) / 2
  pil_float = np.asarray(Image.fromarray(level.astype(np.float32), mode="F")
                         .resize((256, 256), Image.BICUBIC))
  np.testing.assert_allclose(ours, np.clip(pil_float, 0, 1), atol=1e-5)
  pil_8bit = np.asarray(Image.fromarray((level * 255).astype(np.uint8))
                        .resize((256, 256), Image.BICUBIC)) / 255.0
  # 8-bit: the reference truncates levels before resizing and PIL rounds and clips after each of
  # its two passes (so overshoot next to silence is clipped between passes).
  assert np.abs(ours - pil_8bit).max() * 255 <= 4.0
  assert np.abs(ours - pil_8bit).mean() * 255 <= 0.75


@pytest.mark.parametrize("name", ["paper", "tiny", "demo"])
def test_image_round_trip_is_exact_without_saturation(name):
  """Away from the clips (levels inside (0, 1), no overshoot), mel -> image -> mel -> image
  reproduces the image exactly: the inverse resize is a least-squares inverse, whatever the sizes."""
  path = {"paper": "aist.py", "tiny": "aist.py:tiny", "demo": "demo.py"}
  cfg = config_lib.load(os.path.join(CONFIGS, path[name])).audio
  frames = audio.num_mel_frames(int(round(1.6 * cfg.sample_rate)), cfg)
  # A smooth random spectrogram between -65 and +5 dB (random texture on a coarse grid, upsampled).
  coarse = np.random.default_rng(0).uniform(-65, 5, (2, cfg.num_mels // 8, frames // 16))
  decibels = jax.image.resize(jnp.asarray(coarse), (2, cfg.num_mels, frames), "linear")
  log_mel = jnp.asarray(decibels * math.log(10) / 20, jnp.float32)
  image = audio.mel_to_image(log_mel, cfg.image_size)
  back = audio.image_to_mel(image, cfg.num_mels, frames)
  assert back.shape == log_mel.shape
  np.testing.assert_allclose(audio.mel_to_image(back, cfg.image_size), image, atol=2e-4)
  if cfg.image_size >= max(cfg.num_mels, frames):     # no axis shrinks: the mel comes back too
    np.testing.assert_allclose(back, log_mel, atol=1e-3)


def test_image_round_trip_of_a_real_clip_in_8_bit_levels():
  """Paper geometry (80 x 275 -> 256 x 256) with silence (level 0): an 8-bit image (levels
  round((x + 1) * 127.5)) goes image -> mel -> image. Away from the clipped silence it comes back
  within one level (|delta| <= 2/255 in [-1, 1]); the clip of the bicubic overshoot next to silence
  moves a few pixels by up to 3 levels."""
  cfg = config_lib.load(os.path.join(CONFIGS, "aist.py")).audio
  waveform = _test_waveform(cfg)
  log_mel = audio.log_mel(jnp.asarray(waveform, jnp.float32), cfg)
  frames = log_mel.shape[-1]
  levels = _levels(audio.mel_to_image(log_mel, 256))
  assert (levels == 0).mean() > 0.05                       # silence is really there
  again = audio.mel_to_image(audio.image_to_mel(jnp.asarray(levels / 127.5 - 1.0, jnp.float32),
                                                cfg.num_mels, frames), 256)
  difference = np.abs(_levels(again) - levels)[..., 0]
  assert difference.max() <= 3
  assert (difference > 0).mean() < 0.03
  near_silence = jax.lax.reduce_window(levels[..., 0] == 0, False, jax.lax.bitwise_or,
                                       (5, 5), (1, 1), "SAME")
  assert difference[~np.asarray(near_silence)].max() <= 1


def test_image_to_mel_range_and_flip():
  # A constant image at level x is x*100 - 80 dB everywhere; a top-bright image is a high-mel one.
  image = jnp.full((64, 64, 3), 2 * 0.55 - 1.0)
  np.testing.assert_allclose(audio.image_to_mel(image, 80, 275),
                             (0.55 * 100 - 80) * math.log(10) / 20, atol=1e-4)
  top_bright = jnp.concatenate([jnp.ones((32, 64, 3)), -jnp.ones((32, 64, 3))], axis=0)
  log_mel = np.asarray(audio.image_to_mel(top_bright, 80, 275))
  assert log_mel[70:].mean() > log_mel[:10].mean() + 5
  assert log_mel.min() >= -80 * math.log(10) / 20 - 1e-5
  assert log_mel.max() <= 20 * math.log(10) / 20 + 1e-5


# ------------------------------------------------------------------------------------------------
# Griffin-Lim
# ------------------------------------------------------------------------------------------------

def _peak_hz(signal, rate):
  spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
  return np.argmax(spectrum) * rate / len(signal)


def test_griffin_lim_recovers_a_sine_with_the_paper_quirk():
  """44.1 kHz waveform, filterbank built for 22.05 kHz (the reference's set-up)."""
  cfg = config_lib.load(os.path.join(CONFIGS, "aist.py")).audio
  rate = cfg.sample_rate
  t = np.arange(70560) / rate
  log_mel = audio.log_mel(jnp.asarray(0.4 * np.sin(2 * np.pi * 1000 * t), jnp.float32), cfg)
  waveform = np.asarray(audio.griffin_lim(log_mel, cfg, num_samples=70560))
  assert waveform.shape == (70560,)
  middle = waveform[int(0.2 * rate):int(1.4 * rate)]
  assert _peak_hz(middle, rate) == pytest.approx(1000, abs=rate / cfg.n_fft)
  assert 0.1 < np.sqrt(np.mean(middle ** 2)) < 0.6                  # level of a 0.4 sine: 0.28


def test_griffin_lim_recovers_tone_burst_onsets_and_pitches():
  cfg = config_lib.load(os.path.join(CONFIGS, "demo.py")).audio
  rate, hop = cfg.sample_rate, cfg.hop_length
  samples = 25600
  t = np.arange(samples) / rate
  onsets, pitches = (0.2, 0.55, 0.9, 1.25), (500, 1000, 2000, 3000)
  waveform = 1e-4 * np.random.default_rng(0).standard_normal(samples)
  for onset, pitch in zip(onsets, pitches):
    burst = (t >= onset) & (t < onset + 0.15)
    waveform[burst] = 0.5 * np.sin(2 * np.pi * pitch * (t[burst] - onset))
  log_mel = audio.log_mel(jnp.asarray(waveform, jnp.float32), cfg)
  jitted = jax.jit(lambda mel: audio.griffin_lim(mel[None], cfg, num_samples=samples)[0])
  rebuilt = np.asarray(jitted(log_mel))
  # Deterministic: the same input gives the same waveform.
  np.testing.assert_array_equal(rebuilt, np.asarray(jitted(log_mel)))
  envelope = np.sqrt(np.convolve(rebuilt ** 2, np.ones(hop) / hop, mode="same"))
  for onset, pitch in zip(onsets, pitches):
    start = int((onset - 0.1) * rate)
    window = envelope[start:int((onset + 0.15) * rate)]
    detected = (start + np.argmax(window > 0.5 * window.max())) / rate
    assert abs(detected - onset) <= hop / rate, (onset, detected)
    body = rebuilt[int((onset + 0.02) * rate):int((onset + 0.13) * rate)]
    assert _peak_hz(body, rate) == pytest.approx(pitch, abs=pitch * 0.02 + rate / cfg.n_fft)
  # The rebuilt log-mel is close to the target where there is energy.
  loud = np.asarray(log_mel) > -4
  error = np.abs(np.asarray(audio.log_mel(jnp.asarray(rebuilt), cfg)) - np.asarray(log_mel))
  assert error[loud].mean() < 0.3
