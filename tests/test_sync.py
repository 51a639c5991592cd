"""The synthetic-sync metric: near-perfect on true synthetic clips, near chance when sound and picture
are shifted or swapped, and robust to Griffin-Lim resynthesis of the sound from its log-mel.

Clips: the demo config's 64x64 frames and 16 kHz audio, 1.6 s at 20 fps (32 frames). At the demo's
10 fps the +-1 frame window is +-100 ms and chance agreement between unrelated sound and picture is
about 0.38 F1 (measured: 64 clips, derangement); at 20 fps it is about 0.18.
"""
import os

import jax
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.data import audio
from mmldm_jax.data import synthetic
from mmldm_jax.evaluation import sync

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FPS = 20.0
NUM_CLIPS = 64


@pytest.fixture(scope="module")
def config():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py") + ":tiny")
  config.data.fps = FPS
  return config


@pytest.fixture(scope="module")
def clips(config):
  return [synthetic.generate_video(500 + n, n % config.synthetic.num_classes, config, seconds=1.6)
          for n in range(NUM_CLIPS)]


@pytest.fixture(scope="module")
def video_events(clips):
  return [sync.detect_video_events(clip["frames"]) for clip in clips]


def _score(clips, video_events, waveforms):
  scores = []
  for clip, (video_times, video_colours), waveform in zip(clips, video_events, waveforms):
    onsets, pitches = sync.detect_onsets(waveform, clip["sample_rate"])
    score, _ = sync.score_detections(video_times, video_colours, onsets * FPS, pitches,
                                     len(clip["frames"]))
    scores.append(score)
  return sync.aggregate(scores)


def test_true_clips_score_high(clips, video_events):
  total = _score(clips, video_events, [clip["audio"] for clip in clips])
  assert total.true_positives >= 2 * NUM_CLIPS   # the clips really have events
  assert total.f1 >= 0.95, total.as_dict()
  assert total.pitch_agreement >= 0.95, total.as_dict()


def test_video_events_match_ground_truth(clips, video_events):
  errors = []
  for clip, (times, colours) in zip(clips, video_events):
    events = clip["events"]
    inside = (events["frame"] >= 2.0) & (events["frame"] <= len(clip["frames"]) - 3.0)
    for frame, colour in zip(events["frame"][inside], events["colour"][inside]):
      same = times[colours == colour]
      assert same.size, (clip["video_id"], frame)
      errors.append(np.abs(same - frame).min())
  assert np.max(errors) < 0.5 and np.mean(errors) < 0.05, (np.max(errors), np.mean(errors))


def test_shifted_audio_scores_low(clips, video_events):
  shift = int(round(3 / FPS * clips[0]["sample_rate"]))
  late = [np.concatenate([np.zeros(shift, np.float32), c["audio"][:-shift]]) for c in clips]
  early = [np.concatenate([c["audio"][shift:], np.zeros(shift, np.float32)]) for c in clips]
  assert _score(clips, video_events, late).f1 <= 0.3
  assert _score(clips, video_events, early).f1 <= 0.3


def test_swapped_audio_scores_low(clips, video_events):
  derangement = np.roll(np.arange(NUM_CLIPS), 1)
  total = _score(clips, video_events, [clips[j]["audio"] for j in derangement])
  assert total.f1 <= 0.3, total.as_dict()


def test_griffin_lim_keeps_onsets(config, clips, video_events):
  count = 6
  waveforms = np.stack([clip["audio"] for clip in clips[:count]])
  resynthesise = jax.jit(lambda w: audio.griffin_lim(audio.log_mel(w, config.audio), config.audio,
                                                     num_samples=w.shape[-1]))
  rebuilt = np.asarray(resynthesise(waveforms))
  total = _score(clips[:count], video_events[:count], list(rebuilt))
  assert total.f1 >= 0.9, total.as_dict()
  assert total.pitch_agreement >= 0.9, total.as_dict()


def test_score_clip_and_matching_rules():
  # One-to-one matching that maximises pairs, then closeness.
  assert sync.match(np.array([5.0, 6.0]), np.array([5.9]), 1.0) == [(1, 0)]
  assert sorted(sync.match(np.array([5.0, 6.0]), np.array([5.9, 6.5]), 1.0)) == [(0, 0), (1, 1)]
  assert sync.match(np.array([5.0]), np.array([6.2]), 1.0) == []
  # Unmatched events in the margins do not count; inside they do.
  score, _ = sync.score_detections(np.array([0.5, 8.0]), np.array([0, 0]), np.array([15.5]),
                                   np.array([220.0]), num_frames=16)
  assert (score.true_positives, score.false_positives, score.false_negatives) == (0, 0, 1)
  assert sync.nearest_palette_colour(np.array([230.0, 1500.0])).tolist() == [0, 5]


def test_score_clip_any_frame_size():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py") + ":tiny")
  config.data.update(fps=FPS, image_size=96)
  clip = synthetic.generate_video(7, 1, config, seconds=2.0)
  score, detections = sync.score_clip(clip["frames"], clip["audio"], FPS, clip["sample_rate"])
  assert score.f1 >= 0.9 and score.false_positives == 0, (score, detections)
