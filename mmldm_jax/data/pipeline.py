"""Grain input pipeline: whole-video records -> shuffled, augmented, batched clips.

A split of a dataset is a list of whole videos (`records.py`). The pipeline cuts every clip window
out of every video, as the reference does: a window of `config.data.num_frames` frames at every
start offset (stride 1). A video with `num_frames` frames or fewer is ONE clip, padded up to
`num_frames` by repeating its last frame (its audio is zero-padded); its key and target frames are
chosen among its real frames.

Per clip (`make_example`), n = real frames in the clip:
  key_frames      float32 [K, H, W, 3] in [-1, 1]  `video.key_frame_indices(n, data.key_frames)`
  target_frames   float32 [num_target, H, W, 3]     `data.num_target_frames` frames drawn with
                                                    replacement, sorted (`sample_target_indices`)
  target_indices  float32 [num_target]              target index / data.num_frames, in [0, 1)
  key_positions   int32 [K]                         the key frames' indices in the clip
  target_positions int32 [num_target]               the target frames' indices in the clip
  frames          float32 [num_frames, H, W, 3]     the whole clip, only with `frames=True`
  audio           float32 [clip_samples]            the waveform of the same span, zero-padded
  label           int32                             class id, -1 without classes
  video_index     int32                             the video's position among the split's videos
  clip_start      int32                             the clip's first frame in its video
  flipped         bool                              whether the clip was mirrored
A horizontal flip (probability `data.hflip_prob` unless given) applies to every frame of a clip
alike. The random choices come from a generator seeded with (seed, position of the clip in the
global stream), so they are the same on every run and after a resume, and differ between epochs.

`make_dataset` chains (all in Grain's random-access `MapDataset`; the iterator state is a number):
  clips -> shuffle(seed, reshuffled every epoch) -> repeat(num_epochs) -> per-clip RNG + transform
  -> [process_index::process_count] -> batch(per-host batch, drop remainder) -> iterator
  -> mp_prefetch(data.worker_count workers)
For the trainer: `iter(dataset)` gives a `grain.DatasetIterator`; `get_state()` / `set_state()`
resume it exactly, and `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`
with `grain.checkpoint.CheckpointHandler()` store it in an Orbax `CheckpointManager`. Restoring
needs an iterator of a dataset built with the same arguments (config, split, seed, process, batch).

Sources: an ingested folder (`RecordVideos`, reading `index.json` and ArrayRecord shards, readers
opened lazily in each worker) or a TFDS data source (`TfdsVideos`, see `tfds_builders.py`). Either
carries the index meta it was written with; `clip_source` refuses videos whose geometry (fps, image
size, sample rate) differs from the config's (`records.check_geometry`), naming the field to change.

Limits: each clip decodes its whole video record, so throughput falls with video length (a minute
of 256x256 video at 10 fps is ~120 MB); split long videos before ingesting if that matters.
"""
from __future__ import annotations

import bisect
import os
import threading
from typing import Any, Protocol, Sequence

import grain
import numpy as np

from mmldm_jax import config_lib
from mmldm_jax.data import records
from mmldm_jax.data import video

# Threads that read and transform clips in each process (the main one, or each Grain worker).
DEFAULT_READ_THREADS = 2


class Videos(Protocol):
  """Random access to the whole videos of one split (what `ClipSource` cuts clips from)."""

  lengths: Sequence[int]  # frames per video
  meta: dict[str, Any]    # index.json's meta (its 'geometry' is checked against the config)
  origin: str             # where the videos come from, for messages (e.g. the index.json path)

  def __len__(self) -> int:
    ...

  def read(self, index: int) -> dict[str, Any]:
    """The video as a dict with at least frames uint8 [T,H,W,3], audio float32 [N], label."""
    ...


class RecordVideos:
  """The videos of one split of an ingested (or synthetic) dataset folder.

  Reads `index.json` once; ArrayRecord readers open on first use in each process (a pickled copy, as
  sent to a Grain worker, opens its own).
  """

  def __init__(self, folder: str, split: str):
    entries, self.meta = records.read_index(folder)
    self.origin = os.path.join(folder, records.INDEX_FILE)
    self.folder = folder
    self.split = split
    self.entries = [e for e in entries if e.split == split]
    if not self.entries:
      found = sorted({e.split for e in entries})
      raise ValueError(f"{os.path.join(folder, records.INDEX_FILE)}: no video with split={split!r} "
                       f"(splits present: {found})")
    self.lengths = [e.num_frames for e in self.entries]
    self._readers: dict[str, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.entries)

  def _reader(self, shard: str):
    reader = self._readers.get(shard)
    if reader is None:
      with self._lock:
        reader = self._readers.get(shard)
        if reader is None:
          from array_record.python import array_record_module
          path = os.path.join(self.folder, shard)
          if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: shard listed in {records.INDEX_FILE} does not exist")
          # No read-ahead: every read is a random access to one record.
          reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
          self._readers[shard] = reader
    return reader

  def read(self, index: int) -> dict[str, Any]:
    entry = self.entries[index]
    data = self._reader(entry.shard).read([entry.position])[0]
    record = records.decode_record(data)
    if record["frames"].shape[0] != entry.num_frames:
      raise records.RecordError(
          f"{os.path.join(self.folder, entry.shard)} record {entry.position}: field 'frames' "
          f"expected {entry.num_frames} frames (index.json), got {record['frames'].shape[0]}")
    return record

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class TfdsVideos:
  """The videos of a TFDS data source written by `tfds_builders` (frames, audio, label, ...).

  `lengths` are the frame counts in the source's order and `meta` the records folder's index meta
  (the builders store both in their metadata); `origin` names the dataset in messages.
  """

  def __init__(self, data_source, lengths: Sequence[int], meta: dict[str, Any],
               origin: str = "TFDS data source"):
    if len(data_source) != len(lengths):
      raise ValueError(f"TFDS source has {len(data_source)} examples but {len(lengths)} lengths")
    self.data_source = data_source
    self.lengths = list(lengths)
    self.meta = dict(meta)
    self.origin = origin

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, index: int) -> dict[str, Any]:
    record = dict(self.data_source[index])
    if record["frames"].shape[0] != self.lengths[index]:
      raise ValueError(f"TFDS example {index}: field 'frames' expected {self.lengths[index]} "
                       f"frames (metadata num_frames), got {record['frames'].shape[0]}")
    return record


class ClipSource:
  """Grain random-access source over every clip window of every video (stride 1).

  Element `i` is the raw clip: frames uint8 [num_frames, H, W, 3] (short videos padded with their
  last frame), `valid_frames` (real frames in it), audio float32 [clip_samples] (zero-padded),
  label, video_index, clip_start.
  """

  def __init__(self, videos: Videos, num_frames: int, fps: float, sample_rate: int,
               image_size: int | None = None):
    self.videos = videos
    self.image_size = image_size
    self.num_frames = num_frames
    self.fps = float(fps)
    self.sample_rate = int(sample_rate)
    self.clip_samples = int(round(num_frames / self.fps * self.sample_rate))
    clips_per_video = [max(1, length - num_frames + 1) for length in videos.lengths]
    self._ends = np.cumsum(clips_per_video).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def locate(self, index: int) -> tuple[int, int]:
    """(video index, first frame) of clip `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"clip {index} out of range [0, {len(self)})")
    video_index = bisect.bisect_right(self._ends, index)
    start = index - (self._ends[video_index - 1] if video_index else 0)
    return video_index, start

  def __getitem__(self, index: int) -> dict[str, Any]:
    video_index, start = self.locate(int(index))
    record = self.videos.read(video_index)
    frames = np.asarray(record["frames"])
    if self.image_size is not None and frames.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
          f"video {record.get('video_id', video_index)!r}: field 'frames' is "
          f"{frames.shape[1]}x{frames.shape[2]}, the config wants {self.image_size}x"
          f"{self.image_size} (config.data.image_size); ingest the data at that size")
    clip = frames[start:start + self.num_frames]
    valid = clip.shape[0]
    if valid < self.num_frames:
      clip = np.concatenate([clip, np.repeat(clip[-1:], self.num_frames - valid, axis=0)])
    return {
        "frames": clip,
        "valid_frames": np.int32(valid),
        "audio": self.audio_slice(np.asarray(record["audio"], np.float32), start),
        "label": np.int32(record["label"]),
        "video_index": np.int32(video_index),
        "clip_start": np.int32(start),
    }

  def audio_slice(self, audio: np.ndarray, start_frame: int) -> np.ndarray:
    """The samples of frames [start, start + num_frames): same time span as the clip's frames."""
    first = int(round(start_frame / self.fps * self.sample_rate))
    piece = audio[first:first + self.clip_samples]
    if piece.shape[0] < self.clip_samples:
      piece = np.pad(piece, (0, self.clip_samples - piece.shape[0]))
    return piece


def _to_float(frames: np.ndarray) -> np.ndarray:
  return video.to_float(frames)


def make_example(clip: dict[str, Any], rng: np.random.Generator, *, key_frames: Sequence[int],
                 num_target_frames: int, hflip_prob: float, frames: bool) -> dict[str, np.ndarray]:
  """Turns a raw clip of `ClipSource` into one training example (see the module docstring)."""
  clip_frames = clip["frames"]
  num_frames = clip_frames.shape[0]
  valid = int(clip["valid_frames"])
  key_index = np.asarray(video.key_frame_indices(valid, tuple(key_frames)), np.int64)
  target_index, _ = video.sample_target_indices(rng, valid, num_target_frames)
  target_index = np.asarray(target_index, np.int64)
  flip = bool(rng.random() < hflip_prob)
  if flip:
    clip_frames = clip_frames[:, :, ::-1]
  example = {
      "key_frames": _to_float(clip_frames[key_index]),
      "target_frames": _to_float(clip_frames[target_index]),
      # Time in clip lengths, the scale the decoder is asked for at generation (t / num_frames).
      "target_indices": (target_index / num_frames).astype(np.float32),
      "key_positions": key_index.astype(np.int32),
      "target_positions": target_index.astype(np.int32),
      "audio": np.asarray(clip["audio"], np.float32),
      "label": np.int32(clip["label"]),
      "video_index": np.int32(clip["video_index"]),
      "clip_start": np.int32(clip["clip_start"]),
      "flipped": np.bool_(flip),
  }
  if frames:
    example["frames"] = _to_float(clip_frames)
  return example


def clip_source(config, split: str, videos: Videos | None = None) -> ClipSource:
  """The clips of `split`: from `videos` if given, else from the records in config.data.data_dir.

  Every reader of records comes through here, so this is where their geometry is checked against
  the config (records.RecordError naming the field when it differs).
  """
  if videos is None:
    if not config.data.data_dir:
      raise ValueError("config.data.data_dir is empty: set it to the folder holding index.json")
    videos = RecordVideos(config.data.data_dir, split)
  records.check_geometry(videos.meta, config, videos.origin)
  return ClipSource(videos, config.data.num_frames, config.data.fps, config.audio.sample_rate,
                    config.data.image_size)


def _check_rate(config, source: ClipSource) -> None:
  expected = config_lib.clip_samples(config)
  if source.clip_samples != expected:
    raise ValueError(f"clip source gives {source.clip_samples} audio samples per clip, the config "
                     f"{expected} (config_lib.clip_samples)")


class _Example:
  """Per-clip transform with its RNG from (seed, position in the global stream); picklable."""

  def __init__(self, seed: int, **options):
    self.seed = seed
    self.options = options

  def __call__(self, position: int, clip: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, position])
    return make_example(clip, rng, **self.options)


def make_map_dataset(config, split: str, *, process_index: int = 0, process_count: int = 1,
                     batch_size: int, seed: int, frames: bool = False, shuffle: bool = True,
                     num_epochs: int | None = None, hflip_prob: float | None = None,
                     drop_remainder: bool = True, videos: Videos | None = None) -> grain.MapDataset:
  """The random-access part of `make_dataset` (everything before the iterator)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}: expected a positive per-host batch size")
  source = clip_source(config, split, videos)
  _check_rate(config, source)
  dataset = grain.MapDataset.source(source)
  if shuffle:
    # Grain reshuffles each epoch (seed + epoch) when the index runs past one epoch, so shuffle
    # comes before repeat.
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  transform = _Example(
      seed, key_frames=tuple(config.data.key_frames),
      num_target_frames=config.data.num_target_frames,
      hflip_prob=config.data.hflip_prob if hflip_prob is None else hflip_prob, frames=frames)
  dataset = dataset.map_with_index(transform)
  # Every process takes every process_count-th clip of the same global stream: disjoint, and
  # together they cover each epoch.
  dataset = dataset[process_index::process_count]
  return dataset.batch(batch_size, drop_remainder=drop_remainder)


def make_dataset(config, split: str, *, process_index: int = 0, process_count: int = 1,
                 batch_size: int, seed: int, frames: bool = False, shuffle: bool = True,
                 num_epochs: int | None = None, hflip_prob: float | None = None,
                 drop_remainder: bool = True, videos: Videos | None = None,
                 read_threads: int = DEFAULT_READ_THREADS) -> grain.IterDataset:
  """The per-host batched clip dataset of `split`.

  Args:
    config: the experiment config (data, audio sections).
    split: 'train', 'validation' or 'heldout'.
    process_index, process_count: this host's slice of the global stream (jax.process_index/count).
    batch_size: examples per batch on THIS host (global batch / process_count).
    seed: shuffle and augmentation seed (the same on every host).
    frames: also return the whole clip as `frames`.
    shuffle: False keeps the source order (evaluation).
    num_epochs: None repeats forever.
    hflip_prob: overrides config.data.hflip_prob (e.g. config.data.generator_hflip_prob).
    drop_remainder: drop a last partial batch (only matters when num_epochs is finite).
    videos: read clips from these videos (e.g. `TfdsVideos`) instead of config.data.data_dir.
    read_threads: threads reading and transforming clips in each process.
  Returns:
    A `grain.IterDataset` of dicts of batched NumPy arrays (module docstring); with
    config.data.worker_count > 0 the work runs in that many worker processes.
  """
  dataset = make_map_dataset(config, split, process_index=process_index,
                             process_count=process_count, batch_size=batch_size, seed=seed,
                             frames=frames, shuffle=shuffle, num_epochs=num_epochs,
                             hflip_prob=hflip_prob, drop_remainder=drop_remainder, videos=videos)
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=config.data.prefetch_buffer_size))
  if config.data.worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.worker_count))
  return iter_dataset


# Real clips in order (the `sample` stage's conditioning, the `evaluate` stage's reference sets)
class _LastVideo:
  """`Videos` that keeps the last decoded video, so clips read in order decode each video
  once."""

  def __init__(self, videos):
    self.videos = videos
    self.lengths = videos.lengths
    self.meta, self.origin = videos.meta, videos.origin  # pipeline checks the records' geometry
    self._last = (None, None)

  def __len__(self) -> int:
    return len(self.videos)

  def read(self, index: int):
    if self._last[0] != index:
      self._last = (index, self.videos.read(index))
    return self._last[1]


class SplitClips:
  """Clips of one split of a records folder, cut every `stride` frames (default data.num_frames:
  non-overlapping), optionally thinned to `limit` evenly spaced clips.

  Item i: the raw clip of `ClipSource` (frames uint8 [F, H, W, 3], audio float32
  [clip_samples], label, video_index, clip_start, valid_frames)."""

  def __init__(self, config, folder: str, split: str, *, stride: int | None = None,
               limit: int | None = None):
    videos = _LastVideo(RecordVideos(folder, split))
    self.split = split
    self.source = clip_source(config, split, videos)
    num_frames = int(config.data.num_frames)
    stride = num_frames if stride is None else int(stride)
    if stride < 1:
      raise ValueError(f"SplitClips: stride={stride}, expected >= 1")
    indices, first = [], 0
    for length in videos.lengths:
      windows = max(1, length - num_frames + 1)
      indices.extend(first + start for start in range(0, windows, stride))
      first += windows
    if limit is not None and len(indices) > limit:
      picks = np.unique(np.linspace(0, len(indices) - 1, int(limit)).round().astype(int))
      indices = [indices[i] for i in picks]
    self.indices = indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[self.indices[i]]
