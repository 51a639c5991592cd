"""The `evaluate` stage: scores of the sample stage's sounding videos, in `<workdir>/metrics.json`.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=evaluate

Reads the generated samples of `<workdir>/samples/<config.sample.mode>/` (frames from the mp4, the
sound from the lossless wav) and real clips of the dataset, and writes:

  sync            the synthetic-sync metric (`evaluation/sync.py`: bounces in the picture vs onsets in
                  the sound, within one frame; precision / recall / F1 and pitch-colour agreement)
                  on the generated samples, on real validation + held-out clips (its ceiling)
                  and on those real clips with each picture paired with the next clip's sound
                  (`real_mismatched`: its chance level, what ignoring the other modality gets);
                  the generated set re-paired the same way (`generated_shuffled`: a model whose
                  sound follows its picture scores well above it); NOISE_CLIPS clips of uniform
                  random frames and white noise (`noise`, ~0: the metric finds no objects and no
                  tones in them); and the events per second found in the picture and the sound of
                  each set (`event_rates`), so that a score cannot come from a flood of events.
                  Only for the synthetic dataset (config.data.source == 'synthetic'), where it means
                  something.
  features        Frechet distance and kernel distance (unbiased polynomial MMD, raw) between the
                  generated clips and real validation + held-out clips, over two simple,
                  weight-free feature sets (NOT FVD / FAD, which need pretrained I3D / audio networks
                  and are not computed here):
                    video_colour_motion  per clip: 4x4x4 RGB colour histogram averaged over frames,
                                         per-channel mean and std, a histogram of the absolute
                                         frame-to-frame differences, their mean and their std in time
                    audio_logmel_stats   per clip: mean and std in time of every log-mel bin
                                         (config.audio), mean and std of the spectral flux
                  both standardised with the training clips' statistics (`standardiser`), and
                  with `real_floor_frechet` / `real_floor_kernel`: the same distances between the
                  validation and the held-out clips (what two real sets give), and
                  `noise_ceiling_frechet` / `noise_ceiling_kernel`: the distances of NOISE_CLIPS
                  noise clips from the real clips (what noise gets), so each number sits on a scale.
  memorisation    nearest-neighbour check (MM-Diffusion issue #24): per generated clip, the smallest
                  distance of its joint feature vector (both standardised sets) to the TRAINING
                  clips and to the HELD-OUT clips. A model that copies its training set has
                  distances to train far below those to held-out. The training set is larger than the held-out one, so even an honest sample sits
                  somewhat closer to it: read `ratio_train_to_heldout` (median over samples)
                  against `validation_reference`, the same numbers for real validation clips, which
                  the model never saw. `ratio_relative_to_reference` = the two ratios' quotient:
                  about 1 for an honest generator, well below 1 for one that copies.

Real clips: validation and held-out clips every num_frames / 2 frames (at most REAL_LIMIT per split),
training clips every num_frames / 4 frames (at most TRAIN_LIMIT, evenly spaced). A generated sample
longer than one clip (continuation) is cut into clips for the feature and memorisation scores; the
sync metric reads it whole. Skipped when metrics.json exists for the same sample index.
"""
from __future__ import annotations

import json
import os
import wave
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging

from mmldm_jax import sample as sample_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import video as video_lib
from mmldm_jax.evaluation import frechet
from mmldm_jax.evaluation import sync

METRICS_FILE = "metrics.json"
REAL_LIMIT = 2048
NOISE_CLIPS = 32
TRAIN_LIMIT = 4096
_MOTION_EDGES = np.array([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.6, 1.0001])
_COLOUR_LEVELS = 4


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------
def video_features(frames: np.ndarray) -> np.ndarray:
  """float64 [64 + 6 + len(_MOTION_EDGES) - 1 + 2] colour-and-motion features of uint8 [T, H, W, 3]."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"video_features: expected uint8 frames [T, H, W, 3], got {frames.dtype} "
                     f"{frames.shape}")
  levels = (frames.astype(np.int64) * _COLOUR_LEVELS) // 256            # 0 .. 3 per channel
  bins = (levels[..., 0] * _COLOUR_LEVELS + levels[..., 1]) * _COLOUR_LEVELS + levels[..., 2]
  histogram = np.bincount(bins.reshape(-1), minlength=_COLOUR_LEVELS ** 3) / bins.size
  pixels = frames.reshape(-1, 3) / 255.0
  parts = [histogram, pixels.mean(axis=0), pixels.std(axis=0)]
  if len(frames) > 1:
    difference = np.abs(np.diff(frames.astype(np.float64) / 255.0, axis=0)).mean(axis=-1)
    motion_histogram = np.histogram(difference, bins=_MOTION_EDGES)[0] / difference.size
    per_step = difference.mean(axis=(1, 2))
    parts += [motion_histogram, [per_step.mean(), per_step.std()]]
  else:
    parts += [np.zeros(len(_MOTION_EDGES) - 1), [0.0, 0.0]]
  return np.concatenate([np.asarray(p, np.float64) for p in parts])


def audio_features(waveform: np.ndarray, audio_cfg) -> np.ndarray:
  """float64 [2 * num_mels + 2] log-mel statistics of a mono waveform [N]."""
  mel = np.asarray(audio_lib.log_mel(np.asarray(waveform, np.float32), audio_cfg), np.float64)
  flux = np.maximum(np.diff(mel, axis=-1), 0.0).sum(axis=0) if mel.shape[-1] > 1 else np.zeros(1)
  return np.concatenate([mel.mean(axis=-1), mel.std(axis=-1), [flux.mean(), flux.std()]])


def clip_features(frames: np.ndarray, waveform: np.ndarray, config) -> dict[str, np.ndarray]:
  return {"video_colour_motion": video_features(frames),
          "audio_logmel_stats": audio_features(waveform, config.audio)}


FEATURE_SETS = ("video_colour_motion", "audio_logmel_stats")


# ------------------------------------------------------------------------------------------------
# Reading clips
# ------------------------------------------------------------------------------------------------
def read_wav(path: str) -> np.ndarray:
  """A 16-bit PCM wav as float32 [N] (channels averaged)."""
  with wave.open(path) as handle:
    if handle.getsampwidth() != 2:
      raise ValueError(f"{path}: expected 16-bit PCM, got {8 * handle.getsampwidth()}-bit samples")
    data = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").astype(np.float32)
    return data.reshape(-1, handle.getnchannels()).mean(axis=1) / 32767.0


def generated_samples(folder: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(index, samples) of a sample-stage folder; each sample: number, frames uint8, waveform."""
  index = sample_lib.read_index(folder)
  if index is None:
    raise FileNotFoundError(f"{os.path.join(folder, sample_lib.INDEX_FILE)} does not exist: run the "
                            f"`sample` stage first")
  samples = []
  for entry in index["samples"]:
    if not sample_lib.is_complete_entry(folder, entry):
      raise FileNotFoundError(f"{folder}: sample {entry['number']} is listed in "
                              f"{sample_lib.INDEX_FILE} but its files are missing; rerun `sample`")
    frames = video_lib.read_av(os.path.join(folder, entry["mp4"])).frames
    samples.append({"number": entry["number"], "frames": frames,
                    "waveform": read_wav(os.path.join(folder, entry["wav"]))})
  if not samples:
    raise ValueError(f"{folder}: {sample_lib.INDEX_FILE} lists no samples")
  return index, samples


def cut_into_clips(frames: np.ndarray, waveform: np.ndarray, config) -> Iterable[tuple]:
  """Consecutive whole clips (num_frames frames, clip_samples samples) of a longer sample."""
  from mmldm_jax import config_lib
  num_frames, clip_samples = int(config.data.num_frames), config_lib.clip_samples(config)
  for clip in range(max(1, len(frames) // num_frames)):
    piece = waveform[clip * clip_samples:(clip + 1) * clip_samples]
    if len(piece) < clip_samples:
      piece = np.pad(piece, (0, clip_samples - len(piece)))
    yield frames[clip * num_frames:(clip + 1) * num_frames], piece


def real_split(config, folder: str, split: str, stride: int, limit: int, *, with_sync: bool):
  """Features (and, with_sync, the sync score) of a split's real clips."""
  from tqdm import tqdm
  clips = sample_lib.SplitClips(config, folder, split, stride=stride, limit=limit)
  features = {name: [] for name in FEATURE_SETS}
  scores = []
  for i in tqdm(range(len(clips)), desc=f"evaluate: real {split} clips", unit="clip"):
    clip = clips[i]
    frames = clip["frames"][:int(clip["valid_frames"])]
    for name, value in clip_features(frames, clip["audio"], config).items():
      features[name].append(value)
    if with_sync:
      scores.append(sync.score_clip(frames, clip["audio"], config.data.fps,
                                    config.audio.sample_rate))
  return {name: np.stack(values) for name, values in features.items()}, scores


def noise_clips(config, count: int, seed: int = 0) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """`count` clips of uniform random uint8 frames and white noise (std 0.1), the config's shape."""
  from mmldm_jax import config_lib
  rng = np.random.default_rng(seed)
  size, frames = int(config.data.image_size), int(config.data.num_frames)
  for _ in range(count):
    yield (rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
           rng.normal(0.0, 0.1, config_lib.clip_samples(config)).astype(np.float32))


def event_rates(scored: list, fps: float) -> dict[str, float]:
  """Bounces found in the pictures and onsets found in the sounds, per second of clip."""
  seconds = sum(detections.num_frames for _, detections in scored) / fps
  if not seconds:
    return {"video_per_second": 0.0, "audio_per_second": 0.0}
  return {"video_per_second": sum(len(d.video_times) for _, d in scored) / seconds,
          "audio_per_second": sum(len(d.audio_times) for _, d in scored) / seconds}


def mismatched_sync(scored: list) -> sync.SyncScore:
  """The sync metric's chance level: each real clip's picture against the NEXT clip's sound (the
  detections of `score_clip`, re-paired). What a model that ignores the other modality scores."""
  total = sync.SyncScore()
  for index, (_, video_side) in enumerate(scored):
    sound_side = scored[(index + 1) % len(scored)][1]
    score, _ = sync.score_detections(video_side.video_times, video_side.video_colours,
                                     sound_side.audio_times, sound_side.audio_pitches,
                                     video_side.num_frames)
    total = total + score
  return total


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
def distances(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
  """Frechet and kernel distance between two feature sets [n, d]."""
  stats = []
  for values in (generated, real):
    accumulated = frechet.FeatureStats(values.shape[1])
    accumulated.update(values)
    stats.append(accumulated)
  result = {"frechet": None, "kernel": None}
  if min(len(generated), len(real)) >= 2:
    result = {"frechet": frechet.frechet_distance_of(*stats),
              "kernel": frechet.kernel_distance(generated, real)}
  return result


def nearest_distances(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
  """Euclidean distance from each query [n, d] to its nearest reference [m, d]."""
  squared = ((queries ** 2).sum(1)[:, None] + (references ** 2).sum(1)[None]
             - 2.0 * queries @ references.T)
  return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def memorisation(queries: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> dict[str, Any]:
  """Nearest-neighbour distances of `queries` to the training and the held-out clips."""
  to_train = nearest_distances(queries, train)
  to_heldout = nearest_distances(queries, heldout)
  return {"mean_distance_to_train": float(to_train.mean()),
          "mean_distance_to_heldout": float(to_heldout.mean()),
          "ratio_train_to_heldout": float(np.median(to_train / np.maximum(to_heldout, 1e-12))),
          "fraction_closer_to_train": float(np.mean(to_train < to_heldout)),
          "per_sample_distance_to_train": [float(d) for d in to_train],
          "per_sample_distance_to_heldout": [float(d) for d in to_heldout]}


def standardiser(train: dict[str, np.ndarray]):
  """A function: features dict -> the same dict with each set minus the training clips' mean and
  divided by the root-mean-square of its per-dimension standard deviations. One scale per set, so
  the cubic kernel sees O(1) values, both modalities weigh alike in the joint vector, and
  dimensions that barely vary in training (e.g. empty histogram bins) are not blown up."""
  centres = {name: train[name].mean(axis=0) for name in FEATURE_SETS}
  scales = {name: max(float(np.sqrt(np.mean(train[name].var(axis=0)))), 1e-12)
            for name in FEATURE_SETS}

  def standardise(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (features[name] - centres[name]) / scales[name] for name in FEATURE_SETS}
  return standardise


def _joint(features: dict[str, np.ndarray]) -> np.ndarray:
  return np.concatenate([features[name] for name in FEATURE_SETS], axis=1)


def evaluate(config, samples_folder: str, data_folder: str) -> dict[str, Any]:
  """All scores of the module docstring, as the metrics.json dict."""
  index, samples = generated_samples(samples_folder)
  with_sync = config.data.source == "synthetic"
  num_frames = int(config.data.num_frames)
  generated = {name: [] for name in FEATURE_SETS}
  generated_scores = []
  for item in samples:
    for frames, waveform in cut_into_clips(item["frames"], item["waveform"], config):
      for name, value in clip_features(frames, waveform, config).items():
        generated[name].append(value)
    if with_sync:
      generated_scores.append(sync.score_clip(item["frames"], item["waveform"], config.data.fps,
                                              config.audio.sample_rate))
  generated = {name: np.stack(values) for name, values in generated.items()}
  noise = {name: [] for name in FEATURE_SETS}
  noise_scores = []
  for frames, waveform in noise_clips(config, NOISE_CLIPS):
    for name, value in clip_features(frames, waveform, config).items():
      noise[name].append(value)
    if with_sync:
      noise_scores.append(sync.score_clip(frames, waveform, config.data.fps,
                                          config.audio.sample_rate))
  noise = {name: np.stack(values) for name, values in noise.items()}

  real_stride = max(1, num_frames // 2)
  validation, validation_scores = real_split(config, data_folder, "validation", real_stride,
                                             REAL_LIMIT, with_sync=with_sync)
  heldout, heldout_scores = real_split(config, data_folder, "heldout", real_stride, REAL_LIMIT,
                                       with_sync=with_sync)
  train, _ = real_split(config, data_folder, "train", max(1, num_frames // 4), TRAIN_LIMIT,
                        with_sync=False)

  standardise = standardiser(train)
  train, validation, heldout, generated, noise = (standardise(values) for values in
                                                  (train, validation, heldout, generated, noise))
  features = {}
  for name in FEATURE_SETS:
    real = np.concatenate([validation[name], heldout[name]])
    floor = distances(validation[name], heldout[name])
    ceiling = distances(noise[name], real)
    features[name] = dict(distances(generated[name], real), num_generated=len(generated[name]),
                          num_real=len(real), real_floor_frechet=floor["frechet"],
                          real_floor_kernel=floor["kernel"],
                          noise_ceiling_frechet=ceiling["frechet"],
                          noise_ceiling_kernel=ceiling["kernel"], num_noise=len(noise[name]))

  scaled = {name: _joint(values) for name, values in (("train", train), ("heldout", heldout),
                                                      ("validation", validation),
                                                      ("generated", generated))}
  reference = memorisation(scaled["validation"], scaled["train"], scaled["heldout"])
  copied = memorisation(scaled["generated"], scaled["train"], scaled["heldout"])
  copied["ratio_relative_to_reference"] = (copied["ratio_train_to_heldout"] /
                                           max(reference["ratio_train_to_heldout"], 1e-12))
  metrics = {
      "samples": {"folder": samples_folder, "mode": index["settings"]["mode"],
                  "count": len(samples), "settings": index["settings"]},
      "real_clips": {"validation": len(validation[FEATURE_SETS[0]]),
                     "heldout": len(heldout[FEATURE_SETS[0]]),
                     "train": len(scaled["train"])},
      "features": features,
      "memorisation": dict(copied,
                           features="video_colour_motion + audio_logmel_stats, standardised per set",
                           validation_reference={k: v for k, v in reference.items()
                                                 if not k.startswith("per_sample")}),
      "notes": "Feature distances use the simple weight-free features named above; they are not "
               "FVD, KVD or FAD (those need pretrained I3D / audio networks, not run here).",
  }
  if with_sync:
    real_scored = validation_scores + heldout_scores
    fps = float(config.data.fps)
    metrics["sync"] = {
        "generated": sync.aggregate(score for score, _ in generated_scores).as_dict(),
        "generated_shuffled": mismatched_sync(generated_scores).as_dict(),
        "real": sync.aggregate(score for score, _ in real_scored).as_dict(),
        "real_mismatched": mismatched_sync(real_scored).as_dict(),
        "noise": sync.aggregate(score for score, _ in noise_scores).as_dict(),
        "event_rates": {"generated": event_rates(generated_scores, fps),
                        "real": event_rates(real_scored, fps),
                        "noise": event_rates(noise_scores, fps)},
        "tolerance_frames": 1.0}
  return metrics


def run(config, workdir: str) -> None:
  """The stage: writes `<workdir>/metrics.json` (skipped when it exists for the same samples)."""
  if jax.process_index() != 0:
    return
  samples_folder = sample_lib.samples_dir(workdir, config.sample.mode)
  path = os.path.join(workdir, METRICS_FILE)
  index = sample_lib.read_index(samples_folder)
  if index is not None and os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if (previous.get("samples", {}).get("settings") == index["settings"]
        and previous["samples"].get("count") == len(index["samples"])):
      logging.info("evaluate: %s is up to date, skipped", path)
      return
  metrics = evaluate(config, samples_folder, sample_lib.data_folder(config, workdir))
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=1)
  os.replace(path + ".tmp", path)
  summary = {name: round(values["frechet"], 4) for name, values in metrics["features"].items()
             if values["frechet"] is not None}
  logging.info("evaluate: wrote %s (Frechet distances %s%s)", path, summary,
               f", sync F1 {metrics['sync']['generated']['f1']:.3f} (shuffled pairs "
               f"{metrics['sync']['generated_shuffled']['f1']:.3f}, real "
               f"{metrics['sync']['real']['f1']:.3f}, noise {metrics['sync']['noise']['f1']:.3f})"
               if "sync" in metrics else "")
