"""The evaluate stage on the synthetic dataset, with real clips standing in for generated samples
(written through the sample stage's own writer: mp4 + wav + png + index.json):
  - copies of TRAINING clips are flagged by the memorisation check, copies of HELD-OUT clips are not;
  - the sync metric of real clips (its ceiling) is high, and survives the mp4 round trip;
  - metrics.json has the expected keys, finite distances, no FVD/FAD claims, and a rerun skips."""
import json
import os

import jax
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax import sample
from mmldm_jax.data import audio
from mmldm_jax.data import synthetic
from mmldm_jax.evaluation import stage


@pytest.fixture(scope="module")
def config():
  return config_lib.load("configs/demo.py:tiny")


@pytest.fixture(scope="module")
def workdir(config, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evaluate"))
  synthetic.write_dataset(config, os.path.join(path, "data"), progress=False)
  return path


def write_copies(config, data_folder, split, folder, count):
  """The first `count` non-overlapping clips of `split`, written as if they were generated."""
  clips = sample.SplitClips(config, data_folder, split)
  to_image = jax.jit(lambda waveform: audio.waveform_to_image(waveform, config.audio))
  entries = []
  os.makedirs(folder, exist_ok=True)
  for number in range(count):
    clip = clips[number]
    entries.append(sample.write_sample(folder, number, clip["frames"], clip["audio"],
                                       np.asarray(to_image(clip["audio"])), config.data.fps,
                                       config.audio.sample_rate))
  settings = sample.sample_settings(config, {"copies_of": split})
  sample.write_index(folder, {"settings": settings, "fps": config.data.fps,
                              "sample_rate": config.audio.sample_rate,
                              "clip_frames": config.data.num_frames, "samples": entries})


@pytest.fixture(scope="module")
def train_copy_metrics(config, workdir):
  write_copies(config, os.path.join(workdir, "data"), "train",
               sample.samples_dir(workdir, config.sample.mode), 4)
  stage.run(config, workdir)
  with open(os.path.join(workdir, stage.METRICS_FILE)) as f:
    return json.load(f)


def all_keys(tree):
  if isinstance(tree, dict):
    return set(tree) | set().union(*(all_keys(v) for v in tree.values()))
  return set()


def test_metrics_json_has_the_scores(train_copy_metrics):
  metrics = train_copy_metrics
  assert {"samples", "real_clips", "features", "memorisation", "sync", "notes"} <= set(metrics)
  assert metrics["samples"]["count"] == 4 and metrics["samples"]["mode"] == "joint"
  assert metrics["real_clips"] == {"validation": 6, "heldout": 6, "train": 40}
  for name in stage.FEATURE_SETS:
    scores = metrics["features"][name]
    for key in ("frechet", "kernel", "real_floor_frechet", "real_floor_kernel"):
      assert np.isfinite(scores[key]), (name, key)
    assert scores["frechet"] >= -1e-6 and scores["real_floor_frechet"] > 0
    assert scores["num_generated"] == 4 and scores["num_real"] == 12
    # The scale: noise clips lie far beyond both the real-vs-real floor and these real copies.
    assert scores["noise_ceiling_frechet"] > 3 * max(scores["real_floor_frechet"],
                                                     scores["frechet"]), (name, scores)
    assert scores["noise_ceiling_kernel"] > 3 * max(scores["real_floor_kernel"],
                                                    scores["kernel"]), (name, scores)
    assert scores["num_noise"] == stage.NOISE_CLIPS
  assert not {"fvd", "kvd", "fad", "FVD", "FAD"} & all_keys(metrics)


def test_sync_of_real_clips_is_high(train_copy_metrics):
  real, generated = train_copy_metrics["sync"]["real"], train_copy_metrics["sync"]["generated"]
  assert real["f1"] >= 0.9 and real["true_positives"] >= 6
  assert real["pitch_agreement"] >= 0.9
  # Real clips through H.264 + the wav writer keep their sync.
  assert generated["f1"] >= 0.8
  # Pictures with another clip's sound: the chance level, far below.
  mismatched = train_copy_metrics["sync"]["real_mismatched"]
  assert mismatched["true_positives"] + mismatched["false_negatives"] >= 6
  assert mismatched["f1"] < 0.6 * real["f1"], (mismatched, real)
  # The "generated" copies re-paired (picture i with sound i + 1) drop to that chance level.
  shuffled = train_copy_metrics["sync"]["generated_shuffled"]
  assert shuffled["f1"] < 0.6 * generated["f1"], (shuffled, generated)
  # Uniform random frames with white noise: no objects, no tones, nothing to match.
  noise = train_copy_metrics["sync"]["noise"]
  assert noise["f1"] <= 0.1, noise
  rates = train_copy_metrics["sync"]["event_rates"]
  assert rates["noise"]["video_per_second"] < 0.2 and rates["noise"]["audio_per_second"] < 0.2
  for side in ("video_per_second", "audio_per_second"):   # copies: the real rates
    assert rates["generated"][side] == pytest.approx(rates["real"][side], rel=0.5), rates


def test_memorisation_flags_training_copies(config, workdir, train_copy_metrics):
  copies = train_copy_metrics["memorisation"]
  assert copies["fraction_closer_to_train"] == 1.0
  assert copies["mean_distance_to_train"] < 0.3 * copies["mean_distance_to_heldout"]
  assert copies["ratio_relative_to_reference"] < 0.5
  heldout_folder = os.path.join(workdir, "heldout_copies")
  write_copies(config, os.path.join(workdir, "data"), "heldout", heldout_folder, 3)
  metrics = stage.evaluate(config, heldout_folder, os.path.join(workdir, "data"))
  assert metrics["memorisation"]["fraction_closer_to_train"] == 0.0
  assert metrics["memorisation"]["ratio_train_to_heldout"] > 1.2
  assert metrics["memorisation"]["ratio_relative_to_reference"] > 3.0


def test_rerun_skips_and_feature_checks(config, workdir, train_copy_metrics):
  path = os.path.join(workdir, stage.METRICS_FILE)
  mtime = os.path.getmtime(path)
  stage.run(config, workdir)
  assert os.path.getmtime(path) == mtime
  with pytest.raises(ValueError, match="expected uint8 frames"):
    stage.video_features(np.zeros((2, 4, 4, 3), np.float32))
  frames = np.zeros((3, 8, 8, 3), np.uint8)
  frames[1:] = 255
  features = stage.video_features(frames)
  assert features[0] == pytest.approx(1 / 3) and features[63] == pytest.approx(2 / 3)
