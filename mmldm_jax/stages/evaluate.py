"""The `evaluate` stage: scores of the sample stage's sounding videos, in `<workdir>/metrics.json`
(`metrics_a2v.json`, `metrics_v2a.json`, ... for the samples of another config.sample.mode).

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=evaluate

Reads the generated samples of `<workdir>/samples/<config.sample.mode>/` (frames from the mp4, the
sound from the lossless wav), or every mp4 of `evaluation.samples_folder` (sound from a .wav of the
same name or from the mp4), one sample at a time, and real clips of the dataset, and writes:

  fvd, kvd        FVD and KVD on I3D features (`evaluation/fvd.py`, `evaluation/i3d.py`): generated
                  clips vs a seeded draw of real TRAINING clips (the list saved in
                  `<workdir>/evaluate/real_clips.json`), each with its protocol (preprocessing
                  preset, BatchNorm epsilon, feature, frames, fps, counts), the real-vs-real floor,
                  the mean and spread over `evaluation.num_reference_draws` draws, and the scores
                  against held-out clips. "not computed" with the reason when the metrics extra
                  is not installed (evaluation.fvd='auto') or evaluation.fvd='off'.
  memorisation_i3d  the nearest-neighbour check on I3D features: the fraction of samples closer to
                  a training clip than every real held-out clip is.
  fad_audioclip_x1e4  FAD on AudioCLIP's audio head (`evaluation/audioclip.py`; MM-LDM's FAD: 44.1
                  kHz, 1.6 s, raw 1024-d embedding, Frechet x 1e4) when evaluation.audioclip_path
                  names AudioCLIP-Full-Training.pt,
  fad_panns_cnn14 FAD on PANNs Cnn14 embeddings (`evaluation/panns.py`) when
                  evaluation.panns_cnn14_path names Cnn14_mAP=0.431.pth; each with the same draws,
                  floor and held-out score as FVD, or "not computed" naming the weight file and
                  where it is published.

  sync            the synthetic-sync metric (`evaluation/sync.py`: bounces in the picture vs onsets in
                  the sound, within one frame; precision / recall / F1 and pitch-colour agreement)
                  on the generated samples, on real validation + held-out clips (its ceiling)
                  and on those real clips with each picture paired with the next clip's sound
                  (`real_mismatched`: its chance level, what ignoring the other modality gets);
                  the generated set re-paired the same way (`generated_shuffled`: a model whose
                  sound follows its picture scores well above it); both chance levels also with
                  every picture against every other clip's sound, counts averaged
                  (`generated_shuffled_all_pairs`, `real_mismatched_all_pairs`; pairs from one
                  real clip or video left out), which does not depend on which clip comes next
                  (`sync.all_pairs_scores`; the real clips are windows half a clip apart, so the
                  next one is often the same video later, and `real_mismatched` reads lower:
                  0.21 against 0.32 on the quality preset's clips); NOISE_CLIPS clips of uniform
                  random frames and white noise (`noise`, ~0: the metric finds no objects and no
                  tones in them); and the events per second found in the picture and the sound of
                  each set (`event_rates`), so that a score cannot come from a flood of events.
                  Only for the synthetic dataset (config.data.source == 'synthetic'), where it means
                  something.
  av_align        AV-Align (`evaluation/av_align.py`: audio onsets vs optical-flow peaks, IoU within
                  one frame) on the generated samples, on real validation + held-out clips and on
                  both re-paired with the next clip's sound (chance level), for any dataset; "not
                  computed" naming the package when opencv-python-headless or librosa is missing.
  features        Frechet distance and kernel distance (unbiased polynomial MMD, raw) between the
                  generated clips and real validation + held-out clips, over two simple,
                  weight-free feature sets (not FVD / FAD):
                    video_colour_motion  per clip: 4x4x4 RGB colour histogram averaged over frames,
                                         per-channel mean and std, a histogram of the absolute
                                         frame-to-frame differences, their mean and their std in time
                    audio_logmel_stats   per clip: mean and std in time of every log-mel bin
                                         (config.audio; floored at the audio image's -80 dB),
                                         mean and std of the spectral flux
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
sync metric reads it whole.

Samples: another frame rate, frame size or sample rate is resampled or rejected
(evaluation.mismatch), fewer frames than one clip are rejected, an unreadable file is counted; each
with a message naming the file, in `samples.problems`, and the job goes on. I3D features are cached
per clip in `<workdir>/evaluate/`, so an interrupted run resumes; the stage is skipped when
metrics.json exists for the same sample index and evaluation settings.
"""
from __future__ import annotations

import dataclasses
import json
import os
import wave
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging

from mmldm_jax import parallel
from mmldm_jax import sampling
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import pipeline
from mmldm_jax.data import video as video_lib
from mmldm_jax.evaluation import audioclip
from mmldm_jax.evaluation import av_align
from mmldm_jax.evaluation import frechet
from mmldm_jax.evaluation import fvd
from mmldm_jax.evaluation import panns
from mmldm_jax.evaluation import sync

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
  """float64 [2 * num_mels + 2] log-mel statistics of a mono waveform [N].

  The log-mel is floored at the audio image's -80 dB (as VGGish adds a constant before its log):
  the chain decodes everything quieter to that level, and without the floor the bands where the
  synthetic clips are silent (-100 dB) dominated the distance. Measured on the 48 real validation
  and held-out clips of the demo's quality preset, their own sound through the audio image and
  Griffin-Lim: audio Frechet 53 against a real-vs-real floor of 5.6 without the floor (differences
  80 dB under the sound), 12.6 against 9.7 with it."""
  mel = np.asarray(audio_lib.log_mel(np.asarray(waveform, np.float32), audio_cfg), np.float64)
  mel = np.maximum(mel, audio_lib.IMAGE_FLOOR_LOG)
  flux = np.maximum(np.diff(mel, axis=-1), 0.0).sum(axis=0) if mel.shape[-1] > 1 else np.zeros(1)
  return np.concatenate([mel.mean(axis=-1), mel.std(axis=-1), [flux.mean(), flux.std()]])


def clip_features(frames: np.ndarray, waveform: np.ndarray, config) -> dict[str, np.ndarray]:
  return {"video_colour_motion": video_features(frames),
          "audio_logmel_stats": audio_features(waveform, config.audio)}


FEATURE_SETS = ("video_colour_motion", "audio_logmel_stats")
# Raised whenever a feature's definition changes or a score is added, so that `run` scores old
# samples again. 2: audio_logmel_stats floored at -80 dB. 3: the sync all-pairs chance levels.
FEATURES_VERSION = 3


# ------------------------------------------------------------------------------------------------
# Reading clips
# ------------------------------------------------------------------------------------------------
def read_wav(path: str) -> tuple[np.ndarray, int]:
  """A 16-bit PCM wav as (float32 [N] with the channels averaged, its sample rate)."""
  with wave.open(path) as handle:
    if handle.getsampwidth() != 2:
      raise ValueError(f"{path}: expected 16-bit PCM, got {8 * handle.getsampwidth()}-bit samples")
    data = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").astype(np.float32)
    return (data.reshape(-1, handle.getnchannels()).mean(axis=1) / 32767.0,
            int(handle.getframerate()))


class SampleRejected(ValueError):
  """A generated sample that does not fit the config (too short, or of another frame rate, size
  or sample rate with evaluation.mismatch='reject'); the message names the file."""


@dataclasses.dataclass(frozen=True)
class SampleFile:
  """One generated sample on disk: its name, the mp4, the wav (None: the mp4's own sound) and
  the real clip it was generated from (a2v / v2a / reconstruction; None for joint samples)."""
  name: str
  mp4: str
  wav: str | None
  source: str | None = None


def sample_files(config, folder: str) -> tuple[dict[str, Any], list[SampleFile]]:
  """(description, files) of the generated samples in `folder`: the sample stage's index.json, or
  without one, when `evaluation.samples_folder` names the folder, every *.mp4 in it (sorted; a
  .wav of the same name, when there is one, is the sound)."""
  index = sampling.read_index(folder)
  if index is not None:
    files = [SampleFile(sampling.sample_name(entry["number"]), os.path.join(folder, entry["mp4"]),
                        os.path.join(folder, entry["wav"]), conditioning_source(entry))
             for entry in index["samples"]]
    description = {"folder": folder, "mode": index["settings"]["mode"],
                   "settings": index["settings"]}
  elif config.evaluation.samples_folder and os.path.isdir(folder):
    files = []
    for name in sorted(os.listdir(folder)):
      stem, extension = os.path.splitext(name)
      if extension.lower() == ".mp4":
        wav = os.path.join(folder, stem + ".wav")
        files.append(SampleFile(stem, os.path.join(folder, name),
                                wav if os.path.exists(wav) else None))
    description = {"folder": folder, "mode": "folder",
                   "settings": {"files": [os.path.basename(f.mp4) for f in files]}}
  else:
    raise FileNotFoundError(f"{os.path.join(folder, sampling.INDEX_FILE)} does not exist: run the "
                            f"`sample` stage first, or set evaluation.samples_folder to a folder of "
                            f"mp4 files")
  if not files:
    raise ValueError(f"{folder}: no samples to evaluate (no entries in "
                     f"{sampling.INDEX_FILE} and no mp4 files)")
  return description, files


def conditioning_source(entry: dict[str, Any]) -> str | None:
  """The real clip a sample index entry was generated from, as one string (None: none)."""
  source = entry.get("conditioning")
  if source is None:
    return None
  return f"{source['split']}/{source['video_index']}/{source['clip_start']}"


def _resample_audio(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
  """Sound [..., N] from `rate` to `target` Hz along the last axis (polyphase filter)."""
  from math import gcd
  from scipy import signal
  if rate == target:
    return np.asarray(waveform, np.float32)
  common = gcd(int(rate), int(target))
  return signal.resample_poly(waveform, target // common, rate // common,
                              axis=-1).astype(np.float32)


def read_sample(item: SampleFile, config) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 frames [T, S, S, 3] at data.fps, float32 sound [N] at audio.sample_rate, what was
  resampled) of one generated sample. Another frame rate, frame size or sample rate is resampled
  (evaluation.mismatch='resample': frames picked at data.fps and letterboxed as ingestion does,
  sound by a polyphase filter) or rejected ('reject'); fewer frames than one clip are always
  rejected. Raises SampleRejected, video.MediaError or wave.Error, each naming the file."""
  policy = config.evaluation.mismatch
  if policy not in ("resample", "reject"):
    raise ValueError(f"evaluation.mismatch={policy!r}: expected 'resample' or 'reject'")
  fps, size = float(config.data.fps), int(config.data.image_size)
  rate, num_frames = int(config.audio.sample_rate), int(config.data.num_frames)
  media = video_lib.read_av(item.mp4)
  frames = video_lib.rotate_upright(media.frames, media.rotation)
  problems = []
  if media.fps is None or abs(media.fps - fps) > 1e-3 * fps:
    problems.append(f"frame rate {media.fps} fps, expected {fps:g} (data.fps)")
  if frames.shape[1:3] != (size, size):
    problems.append(f"frames {frames.shape[2]}x{frames.shape[1]}, expected {size}x{size} "
                    f"(data.image_size)")
  video_mismatch = bool(problems)
  if item.wav is not None:
    waveform, wav_rate = read_wav(item.wav)
    sound_file = item.wav
  elif media.audio is not None:
    waveform, wav_rate, sound_file = media.audio.mean(axis=0), media.sample_rate, item.mp4
  else:
    raise SampleRejected(f"{item.mp4}: no audio stream and no {item.name}.wav beside it")
  if wav_rate != rate:
    problems.append(f"{sound_file}: sample rate {wav_rate} Hz, expected {rate} (audio.sample_rate)")
  if problems and policy == "reject":
    raise SampleRejected(f"{item.mp4}: {'; '.join(problems)}; rejected (evaluation.mismatch="
                         f"'reject')")
  if video_mismatch:
    frames = video_lib.read_av(item.mp4, fps=fps, image_size=size).frames
  if wav_rate != rate:
    waveform = _resample_audio(waveform, wav_rate, rate)
  if len(frames) < num_frames:
    raise SampleRejected(f"{item.mp4}: {len(frames)} frames at {fps:g} fps, fewer than one clip "
                         f"({num_frames} frames, data.num_frames)")
  return frames, np.asarray(waveform, np.float32), problems


def cut_into_clips(frames: np.ndarray, waveform: np.ndarray, config) -> Iterable[tuple]:
  """Consecutive whole clips (num_frames frames, clip_samples samples) of a longer sample."""
  from mmldm_jax import config_lib
  num_frames, clip_samples = int(config.data.num_frames), config_lib.clip_samples(config)
  for clip in range(max(1, len(frames) // num_frames)):
    piece = waveform[clip * clip_samples:(clip + 1) * clip_samples]
    if len(piece) < clip_samples:
      piece = np.pad(piece, (0, clip_samples - len(piece)))
    yield frames[clip * num_frames:(clip + 1) * num_frames], piece


def real_split(config, folder: str, split: str, stride: int, limit: int, *, with_sync: bool,
               with_av_align: bool = False):
  """Features, the sync scores (with_sync), the AV-Align peaks (with_av_align) and the source
  video ('split/video index', one per clip) of a split's real clips."""
  from tqdm import tqdm
  clips = pipeline.SplitClips(config, folder, split, stride=stride, limit=limit)
  features = {name: [] for name in FEATURE_SETS}
  scores, peaks, sources = [], [], []
  for i in tqdm(range(len(clips)), desc=f"evaluate: real {split} clips", unit="clip"):
    clip = clips[i]
    sources.append(f"{split}/{int(clip['video_index'])}")
    frames = clip["frames"][:int(clip["valid_frames"])]
    for name, value in clip_features(frames, clip["audio"], config).items():
      features[name].append(value)
    if with_sync:
      scores.append(sync.score_clip(frames, clip["audio"], config.data.fps,
                                    config.audio.sample_rate))
    if with_av_align:
      peaks.append(av_align.clip_peaks(frames, clip["audio"], config.data.fps,
                                       config.audio.sample_rate))
  return {name: np.stack(values) for name, values in features.items()}, scores, peaks, sources


def noise_clips(config, count: int, seed: int = 0) -> Iterable[tuple[np.ndarray, np.ndarray]]:
  """`count` clips of uniform random uint8 frames and white noise (std 0.1), the config's shape."""
  from mmldm_jax import config_lib
  rng = np.random.default_rng(seed)
  size, frames = int(config.data.image_size), int(config.data.num_frames)
  for _ in range(count):
    yield (rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
           rng.normal(0.0, 0.1, config_lib.clip_samples(config)).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
distances = frechet.set_distances
nearest_distances = frechet.nearest_distances


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


# FAD embeddings: metrics.json key -> (config field, weight file, where users get it).
FAD_EMBEDDINGS = {
    "fad_audioclip_x1e4": ("audioclip_path", audioclip.WEIGHTS_FILE, audioclip.WEIGHTS_SOURCE),
    "fad_panns_cnn14": ("panns_cnn14_path", panns.WEIGHTS_FILE, panns.WEIGHTS_SOURCE),
}
AUDIOCLIP_FAD_MULTIPLIER = 1e4   # MM-Diffusion / MM-LDM report the AudioCLIP FAD x 1e4


def fad_entries(config) -> dict[str, Any]:
  """The FAD keys of metrics.json that are not computed: no weight file configured (naming the file
  and where it is published)."""
  entries = {}
  for key, (field, file_name, source) in FAD_EMBEDDINGS.items():
    path = config.evaluation[field]
    if not path:
      entries[key] = fvd.not_computed(f"no weight file configured: set evaluation.{field} to "
                                      f"{file_name} (from {source})")
  return entries


def panns_protocol(config) -> dict[str, Any]:
  return {"embedding": "PANNs Cnn14 fc1 + ReLU (2048)", "weights": config.evaluation.panns_cnn14_path,
          "sample_rate": panns.SAMPLE_RATE, "resampled_from": int(config.audio.sample_rate),
          "clip_seconds": float(config.data.num_frames) / float(config.data.fps),
          "distance": "Frechet, unscaled"}


def audioclip_protocol(config) -> dict[str, Any]:
  return {"embedding": "AudioCLIP ESResNeXt-fbsp audio head, raw fc output (1024, not "
                       "L2-normalised)",
          "weights": config.evaluation.audioclip_path,
          "sample_rate": audioclip.SAMPLE_RATE, "resampled_from": int(config.audio.sample_rate),
          "samples": audioclip.CLIP_SAMPLES,
          "length": "the first 1.6 s of each clip, zero-padded at the end",
          "input": "samples in [-1, 1] (not x32768), then the model's own int16 scaling",
          "channel": "the stage's mono sound (MM-Diffusion's evaluator takes the first channel)",
          "distance": f"Frechet x {AUDIOCLIP_FAD_MULTIPLIER:g}"}


def _file_key(*paths: str | None) -> str:
  """A cache key that changes when any of the files does (path, size, modification time)."""
  parts = []
  for path in paths:
    if path is not None:
      status = os.stat(path)
      parts.append(f"{os.path.abspath(path)}:{status.st_size}:{status.st_mtime_ns}")
  return "|".join(parts)


@dataclasses.dataclass
class Embedding:
  """One feature network of the stage: its features, which part of a clip it reads ('frames' or
  'audio'), its protocol and the metrics.json keys it fills (key -> 'frechet' / 'kernel')."""
  features: fvd.ClipFeatures
  reads: str
  protocol: dict[str, Any]
  names: dict[str, str]
  multiplier: float = 1.0


def embeddings(config, work_folder: str | None) -> tuple[dict[str, Embedding], str]:
  """The I3D, PANNs and AudioCLIP feature networks the config asks for (with their caches), and why
  FVD is not computed ('' when it is)."""
  from tqdm import tqdm
  result = {}
  # A multiple of the local device count, so full batches split evenly (evaluation/devices.py).
  devices = jax.local_device_count()
  batch_size = -(-int(config.evaluation.batch_size) // devices) * devices
  extractor, not_computed_reason = fvd.load_extractor(config)
  if extractor is not None:
    protocol, feature = fvd.protocol_of(config), config.evaluation.i3d_feature
    result["i3d"] = Embedding(
        fvd.ClipFeatures(lambda clips: extractor(clips)[feature], batch_size,
                         fvd.FeatureCache(work_folder, protocol),
                         tqdm(desc="evaluate: I3D features", unit="clip")),
        "frames", protocol, {"fvd": "frechet", "kvd": "kernel"})
  if config.evaluation.panns_cnn14_path:
    embedder = panns.Cnn14Embeddings(config.evaluation.panns_cnn14_path)
    rate = int(config.audio.sample_rate)
    protocol = panns_protocol(config)
    result["panns"] = Embedding(
        fvd.ClipFeatures(lambda sounds: embedder(_resample_audio(sounds, rate, panns.SAMPLE_RATE)),
                         batch_size, fvd.FeatureCache(work_folder, protocol),
                         tqdm(desc="evaluate: PANNs embeddings", unit="clip")),
        "audio", protocol, {"fad_panns_cnn14": "frechet"})
  if config.evaluation.audioclip_path:
    audio_head = audioclip.AudioCLIPEmbeddings(config.evaluation.audioclip_path)
    rate = int(config.audio.sample_rate)
    protocol = audioclip_protocol(config)
    result["audioclip"] = Embedding(
        fvd.ClipFeatures(lambda sounds: audio_head(_resample_audio(sounds, rate,
                                                                   audioclip.SAMPLE_RATE)),
                         batch_size, fvd.FeatureCache(work_folder, protocol),
                         tqdm(desc="evaluate: AudioCLIP embeddings", unit="clip")),
        "audio", protocol, {"fad_audioclip_x1e4": "frechet"}, AUDIOCLIP_FAD_MULTIPLIER)
  return result, not_computed_reason


def _real_clips(config, data_folder: str, split: str, limit: int,
                networks: dict[str, Embedding], share: tuple[int, int] = (0, 1)
                ) -> tuple[list[str], list[int]]:
  """Adds the non-overlapping clips of a split (at most `limit`, evenly spaced) to every network's
  features (each clip decoded at most once); their names and window indices. `share` (index,
  count): only every count-th clip from index is added (a process's share); all are named."""
  clips = pipeline.SplitClips(config, data_folder, split, limit=limit)
  index_file = os.path.join(data_folder, "index.json")
  data_key = _file_key(index_file) if os.path.exists(index_file) else os.path.abspath(data_folder)
  names = []
  for i, window in enumerate(clips.indices):
    name = f"real_{split}_{window}"
    key = (f"{data_key}|{split}|{window}|{config.data.num_frames}|{config.data.fps}|"
           f"{config.data.image_size}|{config.audio.sample_rate}")
    names.append(name)
    if i % share[1] != share[0]:
      continue
    decoded = {}

    def part(field, i=i, decoded=decoded):
      if not decoded:
        decoded.update(clips[i])
      return decoded[field]
    for network in networks.values():
      network.features.add(name, key, lambda field=network.reads: part(field))
  return names, list(clips.indices)


def generated_clips(item: SampleFile, frames: np.ndarray, waveform: np.ndarray, config,
                    networks: dict[str, Embedding]) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
  """(name, frames, sound) of each clip of a generated sample, each added to every network's
  features (cached under the sample files' identity)."""
  key = _file_key(item.mp4, item.wav)
  for number, (clip, sound) in enumerate(cut_into_clips(frames, waveform, config)):
    name = f"generated_{item.name}_clip{number}"
    for network in networks.values():
      network.features.add(name, key, lambda part=(clip if network.reads == "frames" else sound):
                           part)
    yield name, clip, sound


def _sum_over_processes(value: int) -> int:
  return int(np.sum(parallel.gather_across_processes(np.asarray(value, np.int64),
                                                     name="evaluate clip count")))


def compute_share(config, samples_folder: str, data_folder: str, work_folder: str,
                  process_index: int, process_count: int) -> int:
  """Multi-host: this process's share of the network features (every process_count-th generated
  sample and real clip, from process_index) into the feature cache of `work_folder`, which every
  process must see (a shared or mounted workdir); then `evaluate` on process 0 finds them there.
  A sample that cannot be read is skipped here (process 0 counts and reports it). Every process
  must call it (one all-gather of the generated clip count). Returns the features computed."""
  _, files = sample_files(config, samples_folder)
  networks, _ = embeddings(config, work_folder)
  local_clips = 0
  for item in files[process_index::process_count]:
    try:
      frames, waveform, _ = read_sample(item, config)
    except (SampleRejected, video_lib.MediaError, wave.Error, EOFError, OSError,
            ValueError) as error:
      logging.warning("evaluate (process %d): skipped %s: %s", process_index, item.name, error)
      continue
    local_clips += sum(1 for _ in generated_clips(item, frames, waveform, config, networks))
  generated = _sum_over_processes(local_clips)
  if networks and generated:
    evaluation = config.evaluation
    share = (process_index, process_count)
    pool_limit = (int(evaluation.train_pool_limit) or
                  int(evaluation.num_reference_draws) * generated)
    _real_clips(config, data_folder, "train", pool_limit, networks, share)
    _real_clips(config, data_folder, "heldout", generated, networks, share)
  for network in networks.values():
    network.features.flush()
  return sum(network.features.computed for network in networks.values())


def reference_scores(config, data_folder: str, networks: dict[str, Embedding],
                     generated: list[str], work_folder: str | None) -> dict[str, Any]:
  """Every network's scores against the seeded draws of training clips, the floor and the held-out
  clips (`fvd.scores`), memorisation on I3D features; the real clips' list saved in `work_folder`."""
  evaluation = config.evaluation
  draws = int(evaluation.num_reference_draws)
  pool_limit = int(evaluation.train_pool_limit) or draws * len(generated)
  pool_names, pool_windows = _real_clips(config, data_folder, "train", pool_limit, networks)
  heldout_names, heldout_windows = _real_clips(config, data_folder, "heldout", len(generated),
                                               networks)
  picks, disjoint = fvd.draw_reference(len(pool_names), len(generated), draws,
                                       int(evaluation.real_seed))
  list_file = None
  if work_folder is not None:
    list_file = os.path.join(work_folder, fvd.REAL_CLIPS_FILE)
    with open(list_file + ".tmp", "w") as f:
      json.dump({"data_folder": os.path.abspath(data_folder), "seed": int(evaluation.real_seed),
                 "clip_frames": int(config.data.num_frames),
                 "train_pool_windows": pool_windows, "heldout_windows": heldout_windows,
                 "draws": [[int(i) for i in pick] for pick in picks]}, f)
    os.replace(list_file + ".tmp", list_file)
  result = {"features_computed_this_run": {}}
  for kind, network in networks.items():
    generated_set, pool, heldout = (network.features.stack(names)
                                    for names in (generated, pool_names, heldout_names))
    result.update(fvd.scores(generated_set, pool, heldout, network.protocol, picks, disjoint,
                             int(evaluation.real_seed), list_file, network.names,
                             network.multiplier))
    result["features_computed_this_run"][kind] = network.features.computed
    if kind == "i3d":
      result["memorisation_i3d"] = dict(fvd.memorisation(generated_set, pool, heldout),
                                        feature=network.protocol["feature"])
  return result


def evaluate(config, samples_folder: str, data_folder: str,
             work_folder: str | None = None) -> dict[str, Any]:
  """All scores of the module docstring, as the metrics.json dict. `work_folder`: where the
  per-clip feature cache and the list of real clips go (None: no cache)."""
  from tqdm import tqdm
  fvd.check_config(config)
  fad = fad_entries(config)
  description, files = sample_files(config, samples_folder)
  if work_folder is not None:
    os.makedirs(work_folder, exist_ok=True)
  networks, not_computed_reason = embeddings(config, work_folder)
  if "i3d" not in networks:
    logging.warning("evaluate: FVD / KVD not computed: %s", not_computed_reason)
  with_sync = config.data.source == "synthetic"
  av_align_missing = av_align.available()
  generated_peaks = []
  num_frames = int(config.data.num_frames)
  generated = {name: [] for name in FEATURE_SETS}
  generated_scores, generated_sources, generated_names, evaluated = [], [], [], 0
  problems = {"unreadable": [], "rejected": [], "resampled": []}
  for item in tqdm(files, desc="evaluate: generated samples", unit="sample"):
    try:
      frames, waveform, resampled = read_sample(item, config)
    except SampleRejected as error:
      problems["rejected"].append(str(error))
      logging.warning("evaluate: %s", error)
      continue
    except (video_lib.MediaError, wave.Error, EOFError, OSError, ValueError) as error:
      problems["unreadable"].append(f"{item.name}: {error}")
      logging.warning("evaluate: unreadable sample %s: %s", item.name, error)
      continue
    if resampled:
      problems["resampled"].append(f"{item.mp4}: {'; '.join(resampled)}")
    evaluated += 1
    for clip_name, clip, sound in generated_clips(item, frames, waveform, config, networks):
      for name, value in clip_features(clip, sound, config).items():
        generated[name].append(value)
      generated_names.append(clip_name)
    if not av_align_missing:
      generated_peaks.append(av_align.clip_peaks(frames, waveform, config.data.fps,
                                                 config.audio.sample_rate))
    if with_sync:
      generated_scores.append(sync.score_clip(frames, waveform, config.data.fps,
                                              config.audio.sample_rate))
      generated_sources.append(item.source or item.name)
  if not evaluated:
    raise ValueError(f"{samples_folder}: none of the {len(files)} samples could be evaluated: "
                     f"{problems['unreadable'] + problems['rejected']}")
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
  validation, validation_scores, validation_peaks, validation_sources = real_split(
      config, data_folder, "validation", real_stride, REAL_LIMIT, with_sync=with_sync,
      with_av_align=not av_align_missing)
  heldout, heldout_scores, heldout_peaks, heldout_sources = real_split(
      config, data_folder, "heldout", real_stride, REAL_LIMIT, with_sync=with_sync,
      with_av_align=not av_align_missing)
  train, _, _, _ = real_split(config, data_folder, "train", max(1, num_frames // 4), TRAIN_LIMIT,
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
      "samples": dict(description, count=evaluated, listed=len(files),
                      unreadable=len(problems["unreadable"]), rejected=len(problems["rejected"]),
                      problems=problems),
      "evaluation_config": config.evaluation.to_dict(),
      "real_clips": {"validation": len(validation[FEATURE_SETS[0]]),
                     "heldout": len(heldout[FEATURE_SETS[0]]),
                     "train": len(scaled["train"])},
      "features": features,
      "features_version": FEATURES_VERSION,
      "memorisation": dict(copied,
                           features="video_colour_motion + audio_logmel_stats, standardised per set",
                           validation_reference={k: v for k, v in reference.items()
                                                 if not k.startswith("per_sample")}),
      "notes": "`features` holds distances over simple weight-free features, not FVD / FAD; FVD "
               "and KVD (I3D) are under `fvd` and `kvd` with their protocol.",
  }
  if networks:
    metrics.update(reference_scores(config, data_folder, networks, generated_names, work_folder))
  if "i3d" not in networks:
    metrics["fvd"] = fvd.not_computed(not_computed_reason)
    metrics["kvd"] = fvd.not_computed(not_computed_reason)
  metrics.update(fad)
  if av_align_missing:
    metrics["av_align"] = fvd.not_computed(av_align_missing)
  else:
    real_peaks = validation_peaks + heldout_peaks
    metrics["av_align"] = {
        "generated": av_align.matched(generated_peaks),
        "generated_shuffled": av_align.mismatched(generated_peaks),
        "real": av_align.matched(real_peaks),
        "real_mismatched": av_align.mismatched(real_peaks),
        "definition": "AV-Align (Yariv et al. 2024): IoU of librosa onsets (22.05 kHz) and "
                      "strict local maxima > 0.1 px of the mean Farneback flow magnitude, within "
                      "one frame; real = validation + held-out clips, *_mismatched / *_shuffled = "
                      "each picture with the next clip's sound (chance level)"}
  if with_sync:
    real_scored = validation_scores + heldout_scores
    fps = float(config.data.fps)
    sample_sync_scores = [score for score, _ in generated_scores]
    shuffled_sync_scores = sync.mismatched_scores(generated_scores)
    all_pairs_scores = sync.all_pairs_scores(generated_scores, generated_sources)
    interval = lambda scores: list(sync.f1_interval(scores))  # noqa: E731
    metrics["sync"] = {
        "generated": dict(sync.aggregate(sample_sync_scores).as_dict(),
                          f1_interval_95=interval(sample_sync_scores)),
        "generated_shuffled": dict(sync.aggregate(shuffled_sync_scores).as_dict(),
                                   f1_interval_95=interval(shuffled_sync_scores)),
        "generated_shuffled_all_pairs": dict(sync.aggregate(all_pairs_scores).as_dict(),
                                             f1_interval_95=interval(all_pairs_scores)),
        "real": sync.aggregate(score for score, _ in real_scored).as_dict(),
        "real_mismatched": sync.mismatched_sync(real_scored).as_dict(),
        "real_mismatched_all_pairs": sync.aggregate(sync.all_pairs_scores(
            real_scored, validation_sources + heldout_sources)).as_dict(),
        "noise": sync.aggregate(score for score, _ in noise_scores).as_dict(),
        "event_rates": {"generated": sync.event_rates(generated_scores, fps),
                        "real": sync.event_rates(real_scored, fps),
                        "noise": sync.event_rates(noise_scores, fps)},
        "tolerance_frames": 1.0}
  return metrics


REFERENCE_KEYS = ("fvd", "kvd", "fad_audioclip_x1e4", "fad_panns_cnn14")
SYNC_SETS = ("generated", "generated_shuffled", "generated_shuffled_all_pairs", "real",
             "real_mismatched", "real_mismatched_all_pairs", "noise")


def summary_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The headline numbers of metrics.json as flat TensorBoard scalars ('evaluate/...'): each score
  with its floor, held-out score and draw spread, the memorisation fractions, the weight-free
  distances, the sync F1s and the sample counts. Scores that were not computed are left out."""
  scalars = {}

  def put(name, value):
    if value is not None:
      scalars[f"evaluate/{name}"] = float(value)
  for key in REFERENCE_KEYS:
    entry = metrics.get(key, {})
    if entry.get("value") is None:
      continue
    put(key, entry["value"])
    put(f"{key}_real_floor", entry["real_floor"]["value"])
    put(f"{key}_heldout", entry["heldout"]["value"])
    put(f"{key}_draws_mean", entry["reference_draws"]["mean"])
    put(f"{key}_draws_std", entry["reference_draws"]["std"])
  if "memorisation_i3d" in metrics:
    put("memorisation_i3d/memorised_fraction", metrics["memorisation_i3d"]["memorised_fraction"])
  put("memorisation/ratio_relative_to_reference",
      metrics["memorisation"]["ratio_relative_to_reference"])
  for name, values in metrics["features"].items():
    for kind in ("frechet", "kernel"):
      put(f"features/{name}_{kind}", values[kind])
      put(f"features/{name}_real_floor_{kind}", values[f"real_floor_{kind}"])
  for name in SYNC_SETS:
    if "sync" in metrics:
      put(f"sync/{name}_f1", metrics["sync"][name]["f1"])
  for name in SYNC_SETS:
    if "generated" in metrics.get("av_align", {}):
      put(f"av_align/{name}", metrics["av_align"].get(name, {}).get("mean"))
  for count in ("count", "unreadable", "rejected"):
    put(f"samples/{count}", metrics["samples"][count])
  return scalars


def _interval(entry: dict[str, Any]) -> str:
  low, high = entry["f1_interval_95"]
  return f"{low:.2f}-{high:.2f}"


def generator_step(metrics: dict[str, Any]) -> int:
  """The generator checkpoint step the samples came from (0 when unknown, e.g. a folder of mp4s):
  the TensorBoard step of the evaluation's scalars, so evaluations of successive checkpoints line
  up."""
  step = metrics["samples"].get("settings", {}).get("models", {}).get("generator_step")
  return int(step) if isinstance(step, int) else 0


def write_tensorboard(metrics: dict[str, Any], log_dir: str) -> dict[str, float]:
  """`summary_scalars` to TensorBoard (and metrics.jsonl) under `log_dir`, at `generator_step`."""
  from mmldm_jax import metrics as metrics_lib
  step = generator_step(metrics)
  scalars = summary_scalars(metrics)
  writer = metrics_lib.MetricsWriter(log_dir, total_steps=step, global_batch_size=1, log_every=1)
  writer.scalars(step, scalars)
  writer.close()
  return scalars


def run(config, workdir: str) -> None:
  """The stage: writes `<workdir>/metrics.json` and its headline numbers to TensorBoard in
  `<workdir>/evaluate/logs/` (`metrics_<mode>.json` and `evaluate/logs_<mode>/` for a
  config.sample.mode other than joint; skipped when metrics.json exists for the same samples and
  evaluation settings); features are cached in `<workdir>/evaluate/` so a rerun resumes. With
  several processes each computes its share of the features first (`compute_share`; the workdir
  must be shared), then process 0 scores."""
  samples_folder = (config.evaluation.samples_folder or
                    workdir_lib.samples_dir(workdir, config.sample.mode))
  work_folder = workdir_lib.stage_dir(workdir, "evaluate")
  path = workdir_lib.metrics_file(workdir, config.sample.mode)
  index = sampling.read_index(samples_folder)
  if index is not None and os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if (previous.get("samples", {}).get("settings") == index["settings"]
        and previous["samples"].get("listed") == len(index["samples"])
        and previous.get("evaluation_config") == config.evaluation.to_dict()
        and previous.get("features_version") == FEATURES_VERSION):
      logging.info("evaluate: %s is up to date, skipped", path)
      return
  logging.info("evaluate: scoring the samples in %s against the clips of %s", samples_folder,
               workdir_lib.data_folder(config, workdir))
  if jax.process_count() > 1:
    os.makedirs(work_folder, exist_ok=True)
    computed = compute_share(config, samples_folder, workdir_lib.data_folder(config, workdir),
                             work_folder, jax.process_index(), jax.process_count())
    logging.info("evaluate: process %d computed %d features of its share", jax.process_index(),
                 computed)
    parallel.wait_for_all_processes("evaluate features written")
  if jax.process_index() != 0:
    return
  metrics = evaluate(config, samples_folder, workdir_lib.data_folder(config, workdir), work_folder)
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, indent=1)
  os.replace(path + ".tmp", path)
  # One TensorBoard folder per sample mode, as one metrics file: a2v scores do not overwrite joint.
  logs = "logs" if config.sample.mode == "joint" else f"logs_{config.sample.mode}"
  write_tensorboard(metrics, os.path.join(work_folder, logs))
  summary = {name: round(values["frechet"], 4) for name, values in metrics["features"].items()
             if values["frechet"] is not None}
  logging.info("evaluate: wrote %s (FVD %s, KVD %s; weight-free Frechet distances %s%s)", path,
               metrics["fvd"]["value"], metrics["kvd"]["value"], summary,
               f", sync F1 {metrics['sync']['generated']['f1']:.3f} (95% interval "
               f"{_interval(metrics['sync']['generated'])}; shuffled pairs "
               f"{metrics['sync']['generated_shuffled']['f1']:.3f}, "
               f"{_interval(metrics['sync']['generated_shuffled'])}, all pairs "
               f"{metrics['sync']['generated_shuffled_all_pairs']['f1']:.3f}; real "
               f"{metrics['sync']['real']['f1']:.3f}, noise {metrics['sync']['noise']['f1']:.3f})"
               if "sync" in metrics else "")
