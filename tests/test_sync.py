"""The synthetic-sync metric: near-perfect on true synthetic clips, near chance when sound and picture
are shifted or swapped, and robust to Griffin-Lim resynthesis of the sound from its log-mel.

Clips: the demo config's 64x64 frames and 16 kHz audio, 1.6 s at 20 fps (32 frames). At the demo's
10 fps the +-1 frame window is +-100 ms and chance agreement between unrelated sound and picture is
about 0.38 F1 (measured: 64 clips, derangement); at 20 fps it is about 0.18.
"""
import dataclasses
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
CLIP_FRAMES = 32   # 1.6 s
SHIFT = 3          # frames


@pytest.fixture(scope="module")
def config():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py") + ":tiny")
  config.data.fps = FPS
  return config


@pytest.fixture(scope="module")
def videos(config):
  """Videos SHIFT frames longer than a clip on each side: the clip shows frames SHIFT..SHIFT+31,
  and sound windows starting 0, SHIFT or 2 SHIFT frames in are late, aligned or early (real offsets,
  no padding or cuts in the sound)."""
  seconds = (CLIP_FRAMES + 2 * SHIFT) / FPS
  return [synthetic.generate_video(500 + n, n % config.synthetic.num_classes, config, seconds=seconds)
          for n in range(NUM_CLIPS)]


def sound(video, start_frame):
  rate = video["sample_rate"]
  first = int(round(start_frame / FPS * rate))
  return video["audio"][first:first + int(round(CLIP_FRAMES / FPS * rate))]


@pytest.fixture(scope="module")
def video_events(videos):
  return [sync.detect_video_events(v["frames"][SHIFT:SHIFT + CLIP_FRAMES]) for v in videos]


def _score(video_events, waveforms):
  scores = []
  for (video_times, video_colours), waveform in zip(video_events, waveforms):
    onsets, pitches = sync.detect_onsets(waveform, 16000)
    score, _ = sync.score_detections(video_times, video_colours, onsets * FPS, pitches,
                                     CLIP_FRAMES)
    scores.append(score)
  return sync.aggregate(scores)


def test_true_clips_score_high(videos, video_events):
  total = _score(video_events, [sound(v, SHIFT) for v in videos])
  assert total.true_positives >= 2 * NUM_CLIPS   # the clips really have events
  assert total.f1 >= 0.95, total.as_dict()
  assert total.pitch_agreement >= 0.95, total.as_dict()


def test_video_events_match_ground_truth(videos, video_events):
  errors = []
  for video, (times, colours) in zip(videos, video_events):
    frames, events_colour = video["events"]["frame"] - SHIFT, video["events"]["colour"]
    inside = (frames >= 2.0) & (frames <= CLIP_FRAMES - 3.0)
    for frame, colour in zip(frames[inside], events_colour[inside]):
      same = times[colours == colour]
      assert same.size, (video["video_id"], frame)
      errors.append(np.abs(same - frame).min())
  assert np.max(errors) < 0.5 and np.mean(errors) < 0.05, (np.max(errors), np.mean(errors))


def test_shifted_audio_scores_low(videos, video_events):
  late = _score(video_events, [sound(v, 0) for v in videos])
  early = _score(video_events, [sound(v, 2 * SHIFT) for v in videos])
  assert late.f1 <= 0.3, late.as_dict()
  assert early.f1 <= 0.3, early.as_dict()


def test_swapped_audio_scores_low(videos, video_events):
  derangement = np.roll(np.arange(NUM_CLIPS), 1)
  total = _score(video_events, [sound(videos[j], SHIFT) for j in derangement])
  assert total.f1 <= 0.3, total.as_dict()


def test_griffin_lim_keeps_onsets(config, videos, video_events):
  """Sound rebuilt by Griffin-Lim from the log-mel, and from the 64x64 audio image the models see
  (image -> mel by the least-squares inverse), still lines up with the picture."""
  count = 6
  waveforms = np.stack([sound(v, SHIFT) for v in videos[:count]])
  num_mel_frames = audio.num_mel_frames(waveforms.shape[-1], config.audio)

  def from_mel(w):
    return audio.griffin_lim(audio.log_mel(w, config.audio), config.audio, num_samples=w.shape[-1])

  def from_image(w):
    mel = audio.image_to_mel(audio.waveform_to_image(w, config.audio), config.audio.num_mels,
                             num_mel_frames)
    return audio.griffin_lim(mel, config.audio, num_samples=w.shape[-1])

  for rebuild in (from_mel, from_image):
    rebuilt = np.asarray(jax.jit(rebuild)(waveforms))
    total = _score(video_events[:count], list(rebuilt))
    assert total.true_positives >= 2 * count, (rebuild.__name__, total.as_dict())
    assert total.f1 >= 0.9, (rebuild.__name__, total.as_dict())
    assert total.pitch_agreement >= 0.9, (rebuild.__name__, total.as_dict())


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
  with pytest.raises(ValueError, match="uint8"):
    sync.detect_video_events(np.zeros((4, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="mono"):
    sync.detect_onsets(np.zeros((2, 100)), 16000)


def test_score_clip_any_frame_size():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py") + ":tiny")
  config.data.update(fps=FPS, image_size=96)
  clip = synthetic.generate_video(7, 1, config, seconds=2.0)
  score, detections = sync.score_clip(clip["frames"], clip["audio"], FPS, clip["sample_rate"])
  assert score.f1 >= 0.9 and score.false_positives == 0, (score, detections)


def test_noise_scores_nothing_and_shuffled_pairs_score_chance(videos, video_events):
  """The metric cannot be fooled by noise: uniform random frames (their palette-coloured pixels
  are scattered, not objects), blurred colour noise (an untrained decoder's look) and white noise
  (no tone) give no events, so F1 <= 0.1; the true clips with their sounds shuffled among them
  score at the chance level of unrelated sound (test_swapped_audio_scores_low), far below the
  true pairs."""
  from scipy import ndimage
  rng = np.random.default_rng(0)
  scores = []
  for _ in range(16):
    uniform = rng.integers(0, 256, (CLIP_FRAMES, 64, 64, 3), dtype=np.uint8)
    blurred = np.clip(128 + 600 * ndimage.gaussian_filter(
        rng.normal(size=(CLIP_FRAMES, 64, 64, 3)), (0, 3, 3, 0)), 0, 255).astype(np.uint8)
    white = rng.normal(0.0, 0.1, int(CLIP_FRAMES / FPS * 16000))
    for frames in (uniform, blurred):
      score, detections = sync.score_clip(frames, white, FPS, 16000)
      assert len(detections.video_times) == 0 and len(detections.audio_times) <= 1
      scores.append(score)
  assert sync.aggregate(scores).f1 <= 0.1
  # Real pictures with white noise for sound: no onsets, so no matches.
  noisy_sound = _score(video_events[:16], [rng.normal(0.0, 0.1, int(CLIP_FRAMES / FPS * 16000))
                                           for _ in range(16)])
  assert noisy_sound.true_positives == 0, noisy_sound.as_dict()
  true = _score(video_events, [sound(v, SHIFT) for v in videos])
  shuffled = _score(video_events, [sound(videos[j], SHIFT)
                                   for j in np.random.default_rng(1).permutation(NUM_CLIPS)])
  assert shuffled.f1 <= 0.3 and shuffled.f1 < 0.35 * true.f1, (shuffled.as_dict(), true.as_dict())


def test_f1_interval_is_a_bootstrap_over_clips():
  """Clips that all score alike give a zero-width interval at their F1; a mixed set's interval holds
  its aggregate F1, and shrinks as the same mixture comes from more clips."""
  alike = [sync.SyncScore(2, 1, 1)] * 8
  assert sync.f1_interval(alike) == pytest.approx((2 / 3, 2 / 3))
  mixed = [sync.SyncScore(2, 0, 0), sync.SyncScore(0, 2, 2)] * 4
  low, high = sync.f1_interval(mixed)
  assert low < sync.aggregate(mixed).f1 == 0.5 < high
  wide, narrow = high - low, np.subtract(*sync.f1_interval(mixed * 16)[::-1])
  assert narrow < 0.5 * wide
  assert sync.f1_interval([]) == (0.0, 0.0)


def test_all_pairs_chance_level_averages_every_re_pairing(videos):
  """`all_pairs_scores`: each picture against every other clip's sound, counts averaged, equals
  the mean over all the offsets by which the next-clip re-pairing could be taken; pairs from one
  source (two samples of one real clip) are left out, and would otherwise score as true pairs."""
  scored = [sync.score_clip(v["frames"][SHIFT:SHIFT + CLIP_FRAMES], sound(v, SHIFT), FPS, 16000)
            for v in videos[:8]]
  count = len(scored)
  by_offset = [sync.aggregate(sync.repaired(scored[i][1], scored[(i + k) % count][1])
                              for i in range(count)) for k in range(1, count)]
  mean_counts = np.mean([dataclasses.astuple(total) for total in by_offset], axis=0)
  all_pairs = sync.aggregate(sync.all_pairs_scores(scored))
  np.testing.assert_allclose(dataclasses.astuple(all_pairs), mean_counts, rtol=1e-12)
  true = sync.aggregate(score for score, _ in scored)
  assert all_pairs.f1 < 0.5 * true.f1, (all_pairs.as_dict(), true.as_dict())
  # Each clip twice, as 16 v2a samples of 8 real clips: the copies are not chance pairs.
  doubled, sources = scored + scored, list(range(count)) * 2
  with_sources = sync.aggregate(sync.all_pairs_scores(doubled, sources))
  np.testing.assert_allclose(with_sources.f1, all_pairs.f1, rtol=1e-12)
  assert sync.aggregate(sync.all_pairs_scores(doubled)).f1 > with_sources.f1 + 0.05
  lonely = sync.all_pairs_scores(scored[:2], sources=["a", "a"])
  assert all(dataclasses.astuple(score) == (0, 0, 0, 0) for score in lonely)
  with pytest.raises(ValueError, match="sources"):
    sync.all_pairs_scores(scored, sources=["a"])
