"""AV-Align (Yariv et al., "Diverse and Aligned Audio-to-Video Generation via Text-to-Video Model
Adaptation", AAAI 2024): audio-visual synchrony of any sounding video, real or generated.

What it is for: the synthetic-sync score (`evaluation/sync.py`) only means something on the
synthetic dataset, whose objects and tones it can find; AV-Align needs nothing but motion and
sound, so it scores real data too. Per clip, as published:
  video peaks  dense optical flow (OpenCV's Farneback, pyramid scale 0.5, 3 levels, window 15,
               3 iterations, poly_n 5, poly_sigma 1.2) between consecutive grey frames; the mean
               flow magnitude per frame (frame 0 repeats the first pair's value); a peak is a
               strict local maximum above 0.1 pixel, at time index / fps;
  audio peaks  librosa's onset detection (onset strength, then its peak picking with default
               settings) on the sound resampled to 22,050 Hz (librosa.load's default rate);
  score        IoU = hits / (audio peaks + video peaks - hits), a hit being an audio peak with a
               video peak less than one frame (1 / fps) away.
A clip with no peak at all has no score; `aggregate` counts such clips apart instead of scoring
them 0 or 1. Frames are uint8 RGB at any size (the published script reads the video's own size).

Needs `opencv-python-headless` and `librosa` (the `metrics` extra); `available()` says why not.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

AUDIO_RATE = 22050
FLOW_THRESHOLD = 0.1
# cv2.calcOpticalFlowFarneback(prev, next, flow, pyr_scale, levels, winsize, iterations, poly_n,
# poly_sigma, flags) as AV-Align calls it.
FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)
INSTALL_HINT = ('AV-Align needs opencv-python-headless and librosa: pip install -e ".[metrics]"')


def available() -> str:
  """'' when AV-Align can run, else why not (the missing package and the install command)."""
  import importlib.util
  missing = [name for name in ("cv2", "librosa") if importlib.util.find_spec(name) is None]
  return f"{', '.join(missing)} not installed; {INSTALL_HINT}" if missing else ""


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
  """Mean Farneback flow magnitude per frame of uint8 RGB frames [T >= 2, H, W, 3] -> [T]."""
  import cv2
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
    raise ValueError(f"AV-Align: expected uint8 RGB frames [T >= 2, H, W, 3], got {frames.dtype} "
                     f"{frames.shape}")
  grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
  pairs = [np.linalg.norm(cv2.calcOpticalFlowFarneback(grey[i - 1], grey[i], None, *FARNEBACK),
                          axis=-1).mean() for i in range(1, len(grey))]
  return np.asarray(pairs[:1] + pairs, np.float64)


def video_peaks(magnitudes: np.ndarray, fps: float) -> np.ndarray:
  """Times (s) of the strict local maxima of the flow magnitudes above FLOW_THRESHOLD."""
  m = np.asarray(magnitudes, np.float64)
  inner = np.arange(1, len(m) - 1)
  keep = (m[inner] > m[inner - 1]) & (m[inner] > m[inner + 1]) & (m[inner] > FLOW_THRESHOLD)
  return inner[keep] / float(fps)


def audio_peaks(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
  """Onset times (s) of a mono waveform [N], found by librosa at AUDIO_RATE."""
  import librosa
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim != 1:
    raise ValueError(f"AV-Align: expected a mono waveform [N], got {waveform.shape}")
  if int(sample_rate) != AUDIO_RATE:
    waveform = librosa.resample(waveform, orig_sr=int(sample_rate), target_sr=AUDIO_RATE)
  envelope = librosa.onset.onset_strength(y=waveform, sr=AUDIO_RATE)
  onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=AUDIO_RATE)
  return librosa.frames_to_time(onsets, sr=AUDIO_RATE)


def iou(audio_times: np.ndarray, video_times: np.ndarray, fps: float) -> float | None:
  """Hits / (audio peaks + video peaks - hits); None when there are no peaks at all."""
  audio_times, video_times = np.asarray(audio_times), np.asarray(video_times)
  hits = sum(1 for t in audio_times if np.any(np.abs(video_times - t) < 1.0 / fps))
  union = len(audio_times) + len(video_times) - hits
  return hits / union if union else None


@dataclasses.dataclass(frozen=True)
class Peaks:
  """The peaks of one clip (kept so clips can be re-paired for the chance level)."""
  audio: np.ndarray
  video: np.ndarray
  fps: float
  seconds: float


def clip_peaks(frames: np.ndarray, waveform: np.ndarray, fps: float, sample_rate: int) -> Peaks:
  return Peaks(audio_peaks(waveform, sample_rate), video_peaks(flow_magnitudes(frames), fps),
               float(fps), len(frames) / float(fps))


def aggregate(pairs: Iterable[tuple[Peaks, Peaks]]) -> dict[str, float | int | None]:
  """Mean IoU over (video side, audio side) pairs, the pairs without any peak counted apart, and
  the peaks per second of each side (a score cannot hide a flood or a drought of peaks)."""
  scores, without_peaks, seconds, audio_count, video_count = [], 0, 0.0, 0, 0
  for video_side, audio_side in pairs:
    score = iou(audio_side.audio, video_side.video, video_side.fps)
    seconds += video_side.seconds
    audio_count += len(audio_side.audio)
    video_count += len(video_side.video)
    if score is None:
      without_peaks += 1
    else:
      scores.append(score)
  return {"mean": float(np.mean(scores)) if scores else None, "clips": len(scores),
          "clips_without_peaks": without_peaks,
          "audio_peaks_per_second": audio_count / seconds if seconds else None,
          "video_peaks_per_second": video_count / seconds if seconds else None}


def matched(peaks: list[Peaks]) -> dict[str, float | int | None]:
  """AV-Align of each clip with its own sound."""
  return aggregate((p, p) for p in peaks)


def mismatched(peaks: list[Peaks]) -> dict[str, float | int | None]:
  """The chance level: each clip's picture against the NEXT clip's sound."""
  return aggregate((p, peaks[(i + 1) % len(peaks)]) for i, p in enumerate(peaks))
