"""AV-Align separates real-like clips whose sound follows their motion from the same clips with the
sound shifted in time, and its parts behave as published (peaks, IoU, the no-peak case)."""
import numpy as np
import pytest

pytest.importorskip("cv2", reason="AV-Align needs opencv-python-headless (the metrics extra)")
pytest.importorskip("librosa", reason="AV-Align needs librosa (the metrics extra)")

from mmldm_jax.evaluation import av_align  # noqa: E402

FPS, SECONDS, SIZE, RATE = 10.0, 4.0, 64, 16000


def real_like_clip(seed, shift_seconds=0.0):
  """A textured blob over a textured background, with camera noise, that jumps at random event
  frames and rests in between; its sound is quiet noise with a struck, decaying burst at each jump
  (shifted by `shift_seconds`). Frames uint8 [T, 64, 64, 3], sound float32 at 16 kHz. (A blob that
  also drifts by whole pixels between events gives flow peaks above AV-Align's 0.1 px threshold at
  every step: the published metric is that sensitive.)"""
  rng = np.random.default_rng(seed)
  count = int(FPS * SECONDS)
  events = np.sort(rng.choice(np.arange(3, count - 3), 4, replace=False))
  while np.any(np.diff(events) < 4):          # events at least 0.4 s apart
    events = np.sort(rng.choice(np.arange(3, count - 3), 4, replace=False))
  background = rng.integers(40, 120, (SIZE + 16, SIZE + 16, 3)).astype(np.float64)
  texture = rng.integers(150, 255, (14, 14, 3)).astype(np.float64)
  position, frames = np.array([25.0, 25.0]), []
  for index in range(count):
    if index in events:
      position += rng.choice([-1, 1], 2) * rng.uniform(5, 8, 2)
    position = np.clip(position, 2, SIZE - 16)
    frame = background[8:8 + SIZE, 8:8 + SIZE].copy()
    y, x = position.astype(int)
    frame[y:y + 14, x:x + 14] = texture
    frames.append(np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8))
  sound = rng.normal(0, 0.003, int(RATE * SECONDS))
  for event in events:
    start = int((event / FPS + shift_seconds) * RATE) % len(sound)
    burst = rng.normal(0, 0.5, 2000) * np.exp(-np.arange(2000) / 300)
    sound[start:start + 2000] += burst[:len(sound) - start]
  return np.stack(frames), sound.astype(np.float32)


def test_aligned_clips_score_above_shifted_ones():
  aligned, shifted = [], []
  for seed in range(6):
    frames, sound = real_like_clip(seed)
    aligned.append(av_align.clip_peaks(frames, sound, FPS, RATE))
    frames, sound = real_like_clip(seed, shift_seconds=0.25)
    shifted.append(av_align.clip_peaks(frames, sound, FPS, RATE))
  good, bad = av_align.matched(aligned), av_align.matched(shifted)
  chance = av_align.mismatched(aligned)
  assert good["clips"] == 6 and good["clips_without_peaks"] == 0
  assert good["mean"] > 0.5, good
  assert good["mean"] > bad["mean"] + 0.3, (good, bad)
  assert good["mean"] > chance["mean"] + 0.2, (good, chance)
  assert 0.5 < good["audio_peaks_per_second"] < 3 and 0.5 < good["video_peaks_per_second"] < 4


def test_peaks_and_iou_as_published():
  magnitudes = np.array([0.05, 0.2, 0.1, 0.1, 0.09, 0.3, 0.31, 0.2, 0.05])
  # Strict local maxima above 0.1: index 1 and 6 (index 3 is a plateau, 0.09 not a maximum).
  np.testing.assert_allclose(av_align.video_peaks(magnitudes, 10.0), [0.1, 0.6])
  # Within one frame (0.1 s): 0.15 hits 0.1, 0.75 is 1.5 frames from 0.6: 1 / (2 + 2 - 1).
  assert av_align.iou([0.15, 0.75], [0.1, 0.6], 10.0) == pytest.approx(1 / 3)
  assert av_align.iou([0.15], [], 10.0) == 0.0
  assert av_align.iou([], [], 10.0) is None
  still = np.full((6, 32, 32, 3), 128, np.uint8)
  np.testing.assert_allclose(av_align.flow_magnitudes(still), np.zeros(6), atol=1e-6)
  quiet = np.zeros(RATE, np.float32)
  summary = av_align.matched([av_align.clip_peaks(still, quiet, FPS, RATE)])
  assert summary == {"mean": None, "clips": 0, "clips_without_peaks": 1,
                     "audio_peaks_per_second": 0.0, "video_peaks_per_second": 0.0}
  with pytest.raises(ValueError, match="uint8 RGB frames"):
    av_align.flow_magnitudes(still[:1])
