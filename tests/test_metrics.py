"""`metrics.frame_order_accuracy`: the autoencoder's signal for whether decoded clips place what moves
frame by frame."""
import numpy as np
import pytest

from mmldm_jax import metrics


def _moving_square_clips(clips=3, frames=12, size=16, seed=0):
  """A bright 3x3 square crossing a noisy static background, one position per frame."""
  rng = np.random.default_rng(seed)
  background = rng.uniform(-1.0, -0.5, size=(clips, 1, size, size, 3))
  video = np.repeat(background, frames, axis=1)
  for k in range(frames):
    video[:, k, 6:9, k:k + 3] = 1.0
  return video


def test_placed_frames_score_one_and_a_frozen_clip_scores_chance():
  real = _moving_square_clips()
  rng = np.random.default_rng(1)
  placed = real + 0.05 * rng.normal(size=real.shape)
  accuracy, chance = metrics.frame_order_accuracy(placed, real)
  assert accuracy == 1.0
  frames = real.shape[1]
  assert chance == pytest.approx((3 * frames - 2) / frames ** 2)
  # One picture for the whole clip (the decoder ignores the frame index): only the frames next
  # to that picture's own index count.
  frozen = np.repeat(placed[:, 5:6], frames, axis=1)
  frozen_accuracy, _ = metrics.frame_order_accuracy(frozen, real)
  assert frozen_accuracy == pytest.approx(3 / frames)
  # Reversed time places every object, in the wrong frame.
  reversed_accuracy, _ = metrics.frame_order_accuracy(placed[:, ::-1], real)
  assert reversed_accuracy <= 2 / frames


def test_chance_matches_random_guesses_and_shapes_are_checked():
  frames = 10
  rng = np.random.default_rng(2)
  guesses = rng.integers(0, frames, size=(20000, frames))
  hits = np.abs(guesses - np.arange(frames)) <= 1
  assert metrics.frame_order_chance(frames) == pytest.approx(hits.mean(), abs=0.01)
  assert metrics.frame_order_chance(1) == 1.0
  with pytest.raises(ValueError, match=r"\[N, F, H, W, C\]"):
    metrics.frame_order_accuracy(np.zeros((2, 4, 8, 8, 3)), np.zeros((2, 5, 8, 8, 3)))
