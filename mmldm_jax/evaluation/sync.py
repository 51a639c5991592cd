"""The synthetic-sync metric: do the sounds of a sounding video happen when (and sound like what) the
picture says they should? No pretrained network; it reads decoded frames and a waveform.

For videos of the synthetic dataset (`mmldm_jax.data.synthetic`), every wall hit of a coloured object
is a tone whose pitch is the object's colour. The metric

  1. tracks every palette colour in the frames (pixels nearest to that palette colour and within
     `colour_threshold`), takes each track's centroid per frame and finds reversals of the x or y
     velocity; a straight-line fit on two frames either side of a reversal gives its sub-frame time;
  2. finds onsets in the waveform (spectral flux of a log-compressed short-time spectrum, peaks above
     a threshold adapted to the clip's own background level) and each onset's dominant pitch (the
     strongest spectral peak after the onset, with the spectrum just before it subtracted);
  3. matches video events to audio onsets one-to-one within `tolerance_frames` (Hungarian matching on
     the time difference) and counts true positives, false positives (onsets without a bounce) and
     false negatives (bounces without an onset), plus how many matched pairs have the right pitch
     (the audio pitch is nearest, on a log axis, to the pitch of the bouncing object's colour).

Edges: a bounce less than one frame from the first frame or within two frames of the last cannot be
seen in the picture (a reversal needs a frame on each side), and an onset there may belong to a sound
that started before the clip; unmatched events and onsets in those margins are not counted.

Generated samples are scored exactly like real ones: `score_clip(frames, waveform, fps, sample_rate)`.
Scores over many clips add up their counts (`aggregate`).

Read F1 against chance, not 0: with the synthetic set's event rate (~1.5 per second), unrelated sound
and picture (audio of another clip) score F1 ~0.38 at 10 fps, where +-1 frame is +-100 ms, and ~0.18
at 20 fps (64 clips each; the demo's clips gave 0.18 at 10 fps); sound 3 frames off scores ~0.0,
the true sound ~1.0. The evaluate stage measures this chance level on real clips in every run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np
from scipy import ndimage
from scipy import optimize

from mmldm_jax.data import synthetic


@dataclasses.dataclass
class SyncScore:
  """Counts for one clip or a set of clips (they add)."""
  true_positives: int = 0
  false_positives: int = 0
  false_negatives: int = 0
  pitch_agreements: int = 0   # matched pairs whose audio pitch is the colour's pitch

  def __add__(self, other: "SyncScore") -> "SyncScore":
    return SyncScore(*(a + b for a, b in zip(dataclasses.astuple(self),
                                             dataclasses.astuple(other))))

  @property
  def precision(self) -> float:
    detected = self.true_positives + self.false_positives
    return self.true_positives / detected if detected else 0.0

  @property
  def recall(self) -> float:
    actual = self.true_positives + self.false_negatives
    return self.true_positives / actual if actual else 0.0

  @property
  def f1(self) -> float:
    total = 2 * self.true_positives + self.false_positives + self.false_negatives
    return 2 * self.true_positives / total if total else 0.0

  @property
  def pitch_agreement(self) -> float:
    return self.pitch_agreements / self.true_positives if self.true_positives else 0.0

  def as_dict(self) -> dict[str, float]:
    return dict(dataclasses.asdict(self), precision=self.precision, recall=self.recall, f1=self.f1,
                pitch_agreement=self.pitch_agreement)


# ----------------------------------------------------------------------------------------------------
# Video: colour tracks -> velocity reversals.

def track_colours(frames: np.ndarray, palette_rgb: np.ndarray = synthetic.PALETTE_RGB,
                  colour_threshold: float = 90.0, max_spread: float = 0.1) -> np.ndarray:
  """Centroid per palette colour and frame: [K, T, 2] (x, y) in pixels, NaN where absent.

  A colour is present where at least `max(3, 0.15% of the frame)` pixels are nearest to it and
  within `colour_threshold` (RGB distance), and they form one compact object: the root-mean-square
  distance of those pixels from their mean is at most `max_spread` of the frame's longer side (an
  object of the synthetic set's radius, 0.08, has 0.04; the palette colours that pixels of noise
  happen to fall near are spread over the frame, ~0.4, and their jittering centroids would
  otherwise read as bounces). Its centroid weighs the pixels around those (two pixels
  of dilation, so anti-aliased rims count) by their coverage: the fraction of the way from the
  background (the per-pixel median over time, as objects move) to the palette colour. That keeps
  centroids sub-pixel accurate instead of snapping to whole pixels.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames: expected uint8 [T, H, W, 3] (convert float frames in [-1, 1] with "
                     f"mmldm_jax.data.video.to_uint8), got {frames.dtype} {frames.shape}")
  pixels = frames.astype(np.float32)
  background = np.median(pixels, axis=0)
  palette = np.asarray(palette_rgb, np.float32)
  # Squared RGB distances [T, H, W, K] as |p|^2 - 2 p.c + |c|^2 (a matrix product, not a K x 3 loop).
  squared = ((pixels * pixels).sum(-1, keepdims=True) - 2.0 * pixels @ palette.T
             + (palette * palette).sum(-1))
  nearest = squared.argmin(-1)
  close = np.take_along_axis(squared, nearest[..., None], -1)[..., 0] < colour_threshold ** 2
  height, width = frames.shape[1:3]
  min_pixels = max(3, int(0.0015 * height * width))
  ys, xs = np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64)
  centres = np.full((len(palette), frames.shape[0], 2), np.nan)
  for colour in range(len(palette)):
    core = close & (nearest == colour)                                  # [T, H, W]
    count = core.sum((1, 2))
    safe = np.maximum(count, 1)
    mean_x, mean_y = core.sum(1) @ xs / safe, core.sum(2) @ ys / safe
    spread = np.sqrt(np.maximum(core.sum(1) @ xs ** 2 / safe - mean_x ** 2
                                + core.sum(2) @ ys ** 2 / safe - mean_y ** 2, 0.0))
    present = (count >= min_pixels) & (spread <= max_spread * max(height, width))
    if not present.any():
      continue
    region = ndimage.binary_dilation(core, structure=np.ones((1, 3, 3), bool), iterations=2)
    towards = palette[colour] - background                              # [H, W, 3]
    coverage = ((pixels - background) * towards).sum(-1) / np.maximum(
        (towards * towards).sum(-1), 1.0)
    weight = np.where(region, np.clip(coverage, 0.0, 1.0), 0.0)
    total = np.maximum(weight.sum((1, 2)), 1e-9)
    centres[colour, present, 0] = (weight.sum(1) @ xs)[present] / total[present]
    centres[colour, present, 1] = (weight.sum(2) @ ys)[present] / total[present]
  return centres


def _reversal_time(positions: np.ndarray, extreme: int) -> float:
  """Sub-frame time of a reversal whose most extreme frame is `extreme`: where the line through the
  two frames before (extreme-2, extreme-1) meets the line through the two after (extreme+1, +2)."""
  m, count = extreme, len(positions)
  if m < 2 or m + 2 >= count:
    return float(m)
  speed_in = positions[m - 1] - positions[m - 2]
  speed_out = positions[m + 2] - positions[m + 1]
  if speed_in * speed_out >= 0:
    return float(m)
  time = (positions[m + 1] - positions[m - 1] + speed_in * (m - 1) - speed_out * (m + 1)) / (
      speed_in - speed_out)
  return float(np.clip(time, m - 1.0, m + 1.0))


def _axis_reversals(positions: np.ndarray, min_step: float) -> list[float]:
  """Times (frames, relative to the track start) where one coordinate's motion changes direction."""
  steps = np.diff(positions)
  moving = np.flatnonzero(np.abs(steps) > min_step)
  times = []
  for before, after in zip(moving[:-1], moving[1:]):
    if np.sign(steps[before]) == np.sign(steps[after]):
      continue
    between = positions[before + 1:after + 1]
    offset = int(np.argmax(between) if steps[before] > 0 else np.argmin(between))
    times.append(_reversal_time(positions, before + 1 + offset))
  return times


def detect_video_events(frames: np.ndarray, palette_rgb: np.ndarray = synthetic.PALETTE_RGB,
                        colour_threshold: float = 90.0, merge_frames: float = 1.0,
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Bounces in a clip: (times in frames [E] float, palette colour index [E] int), sorted by time.

  An x reversal and a y reversal of the same colour within `merge_frames` are one bounce.
  Tracks are split where the colour disappears; each piece is analysed on its own.
  """
  frames = np.asarray(frames)
  centres = track_colours(frames, palette_rgb, colour_threshold)
  min_step = max(0.25, 0.002 * max(frames.shape[1:3]))   # pixels per frame that count as motion
  found_times, found_colours = [], []
  for colour, track in enumerate(centres):
    present = ~np.isnan(track[:, 0])
    times = []
    for start, stop in _runs(present):
      if stop - start < 3:
        continue
      for axis in (0, 1):
        times += [start + t for t in _axis_reversals(track[start:stop, axis], min_step)]
    for group in _merge(sorted(times), merge_frames):
      found_times.append(float(np.mean(group)))
      found_colours.append(colour)
  order = np.argsort(found_times, kind="stable")
  return np.asarray(found_times, np.float64)[order], np.asarray(found_colours, np.int64)[order]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, stop) of every run of True values."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _merge(times: list[float], within: float) -> list[list[float]]:
  groups: list[list[float]] = []
  for t in times:
    if groups and t - groups[-1][-1] <= within:
      groups[-1].append(t)
    else:
      groups.append([t])
  return groups


# ----------------------------------------------------------------------------------------------------
# Audio: onsets and their pitch.

def _spectrogram(waveform: np.ndarray, window_length: int, hop: int) -> np.ndarray:
  """Magnitude STFT [frames, bins] with frames centred at multiples of `hop` (reflect padding)."""
  pad = window_length // 2
  mode = "reflect" if len(waveform) > pad else "constant"
  padded = np.pad(waveform, (pad, pad), mode=mode)
  # A strided view of the frames (no gather): 5x faster than fancy indexing, the same values.
  frames = np.lib.stride_tricks.sliding_window_view(padded, window_length)[::hop]
  return np.abs(np.fft.rfft(frames * np.hanning(window_length), axis=-1))


def detect_onsets(waveform: np.ndarray, sample_rate: int, min_separation: float = 0.1,
                  sensitivity: float = 8.0, relative_threshold: float = 0.15,
                  min_prominence: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
  """Onsets in a mono waveform: (times in seconds [O], dominant pitch in Hz [O]).

  Spectral flux over 4 ms hops with ~16 ms windows of log(1 + residual / reference): the
  residual is the magnitude minus 3x the bin's median over the clip (the steady background), the
  reference that median plus 0.1x the clip's peak magnitude; bins below 150 Hz (hum) are ignored.
  Onsets are flux peaks at least `min_separation` seconds apart that exceed the clip's median flux
  by `sensitivity` times its median absolute deviation and `relative_threshold` times the strongest
  peak. Measured at 16 kHz: the weakest tone's peak is >= 0.34 of the strongest and the strongest
  background burst <= 0.06 (160 clips); after Griffin-Lim from the 64x64 audio image >= 0.23 and
  <= 0.10 (12 clips).
  An onset is kept only when it brings a tone: the power it adds at its strongest new spectral
  peak is at least `min_prominence` (40 dB) times the median power of the 50 ms before it over
  100 Hz - 4 kHz. Measured at 16 kHz: >= 4e4 for the synthetic tones, >= 1.7e4 after Griffin-Lim
  from the 64x64 audio image (24 clips); <= 3.3e3 for the flux peaks of white noise (24 clips).
  """
  waveform = np.asarray(waveform, np.float64)
  if waveform.ndim != 1:
    raise ValueError(f"waveform: expected a mono [N] array, got shape {waveform.shape}")
  hop = max(1, int(round(0.004 * sample_rate)))
  window_length = int(2 ** round(math.log2(0.016 * sample_rate)))
  if len(waveform) < window_length:
    return np.zeros(0), np.zeros(0)
  magnitude = _spectrogram(waveform, window_length, hop)
  freqs = np.fft.rfftfreq(window_length, 1.0 / sample_rate)
  magnitude = magnitude[:, freqs >= 150.0]
  # Spectral subtraction of the steady background (3x each bin's median over the clip), so that
  # its fluctuations in many bins do not add up to a flux as large as a tone's; what is left is
  # measured against that bin's background level plus a tenth of the clip's peak magnitude (pure
  # per-bin ratios would make faint resynthesis artefacts in quiet bins count like tones).
  background = np.median(magnitude, axis=0)
  residual = np.maximum(magnitude - 3.0 * background, 0.0)
  compressed = np.log1p(residual / (background + 0.1 * magnitude.max() + 1e-12))
  flux = np.zeros(len(compressed))
  flux[1:] = np.maximum(np.diff(compressed, axis=0), 0.0).sum(-1)
  median = np.median(flux)
  spread = np.median(np.abs(flux - median)) + 1e-9
  threshold = max(median + sensitivity * spread, relative_threshold * flux.max())
  radius = max(1, int(round(min_separation / (hop / sample_rate))))
  peaks = []
  for index in np.argsort(-flux, kind="stable"):
    if flux[index] <= threshold:
      break
    if all(abs(index - p) > radius for p in peaks):
      peaks.append(index)
  peaks = np.sort(np.array(peaks, np.int64))
  # The flux peaks when the window centre is ~a quarter window before the attack.
  times = peaks * hop / sample_rate + 0.25 * window_length / sample_rate
  found = [_new_peak(waveform, sample_rate, t) for t in times]
  tonal = np.array([prominence >= min_prominence for _, prominence in found], bool)
  pitches = np.array([pitch for pitch, _ in found], np.float64)
  return times[tonal], pitches[tonal]


def dominant_pitch(waveform: np.ndarray, sample_rate: int, onset: float,
                   length: float = 0.05) -> float:
  """Frequency (Hz) of the strongest new spectral peak in the `length` seconds after `onset`."""
  return _new_peak(waveform, sample_rate, onset, length)[0]


def _new_peak(waveform: np.ndarray, sample_rate: int, onset: float,
              length: float = 0.05) -> tuple[float, float]:
  """(frequency in Hz, prominence) of the strongest new spectral peak after `onset`: the power
  gained there over the `length` seconds before, divided by the median power before it over the
  100 Hz - 4 kHz band."""
  def power(start: float) -> np.ndarray:
    first = int(round(start * sample_rate))
    size = int(round(length * sample_rate))
    segment = np.zeros(size)
    piece = waveform[max(first, 0):max(first + size, 0)]
    segment[max(-first, 0):max(-first, 0) + len(piece)] = piece
    return np.abs(np.fft.rfft(segment * np.hanning(size), n=fft_size)) ** 2

  fft_size = 1 << max(12, int(math.ceil(math.log2(8 * length * sample_rate))))
  before = power(onset - length - 0.005)
  gain = np.maximum(power(onset + 0.002) - before, 0.0)
  freqs = np.fft.rfftfreq(fft_size, 1.0 / sample_rate)
  band = (freqs >= 100.0) & (freqs <= min(0.45 * sample_rate, 4000.0))
  index = int(np.flatnonzero(band)[np.argmax(gain[band])])
  prominence = float(gain[index] / (np.median(before[band]) + 1e-20))
  if 0 < index < len(gain) - 1 and gain[index] > 0:   # parabolic refinement on log power
    left, centre, right = np.log(gain[index - 1:index + 2] + 1e-20)
    denominator = left - 2 * centre + right
    if denominator < 0:
      return (float(freqs[index] + 0.5 * (left - right) / denominator * (freqs[1] - freqs[0])),
              prominence)
  return float(freqs[index]), prominence


# ----------------------------------------------------------------------------------------------------
# Matching and scores.

def match(video_times: np.ndarray, audio_times: np.ndarray,
          tolerance: float) -> list[tuple[int, int]]:
  """One-to-one pairs (video index, audio index) with |difference| <= tolerance, chosen to maximise
  the number of pairs and then minimise the summed time difference (Hungarian algorithm)."""
  if len(video_times) == 0 or len(audio_times) == 0:
    return []
  difference = np.abs(np.asarray(video_times)[:, None] - np.asarray(audio_times)[None, :])
  allowed = difference <= tolerance
  # Each allowed pair earns a bonus larger than any sum of normalised differences, so the assignment
  # first maximises the number of pairs.
  bonus = min(difference.shape) + 2.0
  cost = np.where(allowed, difference / (tolerance + 1e-12) - bonus, 0.0)
  rows, cols = optimize.linear_sum_assignment(cost)
  return [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c]]


def nearest_palette_colour(pitch_hz: np.ndarray,
                           palette_pitch_hz: np.ndarray = synthetic.PALETTE_PITCH_HZ) -> np.ndarray:
  """Palette index whose pitch is nearest on a log-frequency axis."""
  pitch = np.maximum(np.asarray(pitch_hz, np.float64), 1e-3)
  return np.abs(np.log(pitch)[..., None] - np.log(palette_pitch_hz)).argmin(-1)


@dataclasses.dataclass
class ClipDetections:
  """What `score_clip` saw, for inspection."""
  video_times: np.ndarray      # frames
  video_colours: np.ndarray
  audio_times: np.ndarray      # frames
  audio_pitches: np.ndarray    # Hz
  pairs: list[tuple[int, int]]
  num_frames: int              # length of the clip's picture


def score_detections(video_times: np.ndarray, video_colours: np.ndarray, audio_times: np.ndarray,
                     audio_pitches: np.ndarray, num_frames: int,
                     palette_pitch_hz: np.ndarray = synthetic.PALETTE_PITCH_HZ,
                     tolerance_frames: float = 1.0) -> tuple[SyncScore, list[tuple[int, int]]]:
  """Matches bounces (frames) to onsets (frames) and counts; unmatched ones in the clip's margins
  (before frame 1 or after frame num_frames - 2) are not counted. Returns the score and the pairs."""
  pairs = match(video_times, audio_times, tolerance_frames)

  def counted(times: np.ndarray, used: set[int]) -> int:
    inside = (np.asarray(times) >= 1.0) & (np.asarray(times) <= num_frames - 2.0)
    return sum(1 for i in range(len(times)) if i not in used and inside[i])

  agree = sum(int(nearest_palette_colour(audio_pitches[a], palette_pitch_hz) == video_colours[v])
              for v, a in pairs)
  score = SyncScore(true_positives=len(pairs),
                    false_positives=counted(audio_times, {a for _, a in pairs}),
                    false_negatives=counted(video_times, {v for v, _ in pairs}),
                    pitch_agreements=agree)
  return score, pairs


def score_clip(frames: np.ndarray, waveform: np.ndarray, fps: float, sample_rate: int,
               palette_rgb: np.ndarray = synthetic.PALETTE_RGB,
               palette_pitch_hz: np.ndarray = synthetic.PALETTE_PITCH_HZ,
               tolerance_frames: float = 1.0) -> tuple[SyncScore, ClipDetections]:
  """Scores one sounding clip: frames uint8 [T, H, W, 3] (any size) and a mono waveform."""
  video_times, video_colours = detect_video_events(frames, palette_rgb)
  onset_seconds, pitches = detect_onsets(waveform, sample_rate)
  audio_times = onset_seconds * fps
  score, pairs = score_detections(video_times, video_colours, audio_times, pitches,
                                  np.asarray(frames).shape[0], palette_pitch_hz, tolerance_frames)
  return score, ClipDetections(video_times, video_colours, audio_times, pitches, pairs,
                               np.asarray(frames).shape[0])


def aggregate(scores: Iterable[SyncScore]) -> SyncScore:
  """Sum of the counts of many clips (precision, recall and F1 then follow from the totals)."""
  total = SyncScore()
  for score in scores:
    total = total + score
  return total


def event_rates(scored: list, fps: float) -> dict[str, float]:
  """Bounces found in the pictures and onsets found in the sounds, per second of clip."""
  seconds = sum(detections.num_frames for _, detections in scored) / fps
  if not seconds:
    return {"video_per_second": 0.0, "audio_per_second": 0.0}
  return {"video_per_second": sum(len(d.video_times) for _, d in scored) / seconds,
          "audio_per_second": sum(len(d.audio_times) for _, d in scored) / seconds}


def repaired(video_side: "ClipDetections", sound_side: "ClipDetections") -> SyncScore:
  """The bounces of one scored clip matched against the onsets of another (no detection re-run)."""
  score, _ = score_detections(video_side.video_times, video_side.video_colours,
                              sound_side.audio_times, sound_side.audio_pitches,
                              video_side.num_frames)
  return score


def mismatched_scores(scored: list) -> list[SyncScore]:
  """Per clip, its picture scored against the NEXT clip's sound (the detections of `score_clip`,
  re-paired)."""
  return [repaired(video_side, scored[(index + 1) % len(scored)][1])
          for index, (_, video_side) in enumerate(scored)]


def mismatched_sync(scored: list) -> SyncScore:
  """The sync metric's chance level: each real clip's picture against the NEXT clip's sound. What a
  model that ignores the other modality scores."""
  return aggregate(mismatched_scores(scored))


def all_pairs_scores(scored: list, sources: list | None = None) -> list[SyncScore]:
  """Per clip, its picture scored against the sound of EVERY other clip, the counts averaged over
  those pairings (so fractional): the chance level of `mismatched_scores` without its dependence
  on which clip comes next. On 32 v2a samples the next-clip pairing scored between 0.12 and 0.44
  depending on the offset used to re-pair them (2026-12-07), so a single re-pairing can move a
  ratio to chance by a third. `sources` [len(scored)]: pairs whose sources are equal are left
  out (two samples generated from one real clip, two windows of one real video). A clip with no
  partner scores 0 counts."""
  if sources is not None and len(sources) != len(scored):
    raise ValueError(f"all_pairs_scores: {len(sources)} sources for {len(scored)} clips")
  averaged = []
  for index, (_, video_side) in enumerate(scored):
    partners = [other for other in range(len(scored)) if other != index
                and (sources is None or sources[other] != sources[index])]
    total = aggregate(repaired(video_side, scored[other][1]) for other in partners)
    share = 1.0 / len(partners) if partners else 0.0
    averaged.append(SyncScore(*(share * count for count in dataclasses.astuple(total))))
  return averaged


def f1_interval(scores: list[SyncScore], level: float = 0.95, draws: int = 2000,
                seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap interval of the aggregate F1 over clips (clips drawn with replacement,
  `draws` times). A set of 8 clips holds only ~20 events, and its F1 moves by +-0.2 from one set
  of samples to the next: read two F1s as different only where their intervals are apart."""
  if not scores:
    return (0.0, 0.0)
  counts = np.asarray([(s.true_positives, s.false_positives, s.false_negatives) for s in scores],
                      np.float64)
  picks = np.random.default_rng(seed).integers(0, len(scores), (draws, len(scores)))
  true_positives, false_positives, false_negatives = counts[picks].sum(axis=1).T
  total = 2 * true_positives + false_positives + false_negatives
  f1 = np.divide(2 * true_positives, total, out=np.zeros_like(total), where=total > 0)
  tail = (1.0 - level) / 2 * 100
  low, high = np.percentile(f1, [tail, 100 - tail])
  return float(low), float(high)
