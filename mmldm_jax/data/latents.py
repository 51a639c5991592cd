"""The latent dataset: the frozen autoencoder's perceptual latents of every training clip, written
once by the `latents` stage (`stages/latents.py`), so the generator never re-encodes
(reference: the DiT reads the posterior MODES, unscaled). This module writes and reads the files.

Layout under `<workdir>/latents/`:
  train-process_<p>-of-<n>.audio_latent.npy   float32 [N_p, ha, wa, C]   (one shard per writing process)
  train-process_<p>-of-<n>.video_latent.npy   float32 [N_p, hv, wv, C]
  train-process_<p>-of-<n>.label.npy          int32 [N_p] (-1 without classes)
  train-process_<p>-of-<n>.video_index.npy    int32 [N_p] the clip's video in the split
  train-process_<p>-of-<n>.clip_start.npy     int32 [N_p] the clip's first frame in that video
  train.json                                  written last: shard names, counts, shapes (= complete)
The .npy files are memory-mapped when read, so the set can exceed the host's RAM.

Clips: every clip window of the training split in source order (no shuffle), each process encoding every
process_count-th clip; `config.data.generator_hflip_prob` flips clips as in the reference's generator
data (default 0). Continuation models (config.dit.continuation) train on pairs of consecutive clips:
`ContinuationPairs` pairs every clip with the clip that ends where it starts (same video, first frame
clip_start - num_frames), which the stride-1 windows always contain.
"""
from __future__ import annotations

import json
import os

import grain
import numpy as np

from mmldm_jax import workdir as workdir_lib

FIELDS = ("audio_latent", "video_latent", "label", "video_index", "clip_start")
INT_FIELDS = ("label", "video_index", "clip_start")


def _index_path(folder: str, split: str) -> str:
  return os.path.join(folder, f"{split}.json")


def is_complete(workdir: str, split: str = "train") -> bool:
  return os.path.exists(_index_path(workdir_lib.latents_dir(workdir), split))


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------
class ShardWriter:
  """Writes one process's shard: preallocated memory-mapped .npy files, renamed into place on close."""

  def __init__(self, folder: str, split: str, process_index: int, process_count: int, count: int,
               shapes: dict[str, tuple[int, ...]]):
    os.makedirs(folder, exist_ok=True)
    self.name = f"{split}-process_{process_index}-of-{process_count}"
    self.count = count
    self._paths = {}
    self._arrays = {}
    for field in FIELDS:
      dtype = np.int32 if field in INT_FIELDS else np.float32
      final = os.path.join(folder, f"{self.name}.{field}.npy")
      tmp = final + ".tmp.npy"
      self._paths[field] = (tmp, final)
      self._arrays[field] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                      shape=(count,) + tuple(shapes.get(field, ())))
    self.written = 0

  def write(self, arrays: dict[str, np.ndarray]) -> None:
    missing = [field for field in FIELDS if field not in arrays]
    if missing:
      raise ValueError(f"shard {self.name}: rows without the fields {missing}; expected {FIELDS}")
    rows = len(arrays["label"])
    end = self.written + rows
    if end > self.count:
      raise ValueError(f"shard {self.name}: {end} rows written, {self.count} allocated")
    for field in FIELDS:
      self._arrays[field][self.written:end] = arrays[field]
    self.written = end

  def close(self) -> None:
    if self.written != self.count:
      raise ValueError(f"shard {self.name}: {self.written} of {self.count} rows written")
    for field, array in self._arrays.items():
      array.flush()
      del array
      tmp, final = self._paths[field]
      os.replace(tmp, final)
    self._arrays = {}


def write_index(folder: str, split: str, shards: list[tuple[str, int]],
                shapes: dict[str, tuple[int, ...]]) -> None:
  """Marks the split complete: shard names with row counts, and the latent shapes."""
  body = {"shards": [{"name": name, "count": count} for name, count in shards],
          "count": sum(count for _, count in shards),
          "shapes": {k: list(v) for k, v in shapes.items()}}
  path = _index_path(folder, split)
  with open(path + ".tmp", "w") as f:
    json.dump(body, f, indent=1)
  os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
class LatentSource:
  """Random access to a latent split: item i -> {'audio_latent', 'video_latent', 'label'}."""

  def __init__(self, folder: str, split: str = "train"):
    path = _index_path(folder, split)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: run the `latents` stage first (after "
                              f"`autoencoder`)")
    with open(path) as f:
      index = json.load(f)
    self.folder = folder
    self.names = [shard["name"] for shard in index["shards"]]
    self.starts = np.cumsum([0] + [shard["count"] for shard in index["shards"]])
    self.shapes = {k: tuple(v) for k, v in index["shapes"].items()}
    self._arrays = None
    for name in self.names:
      for field in FIELDS:
        if not os.path.exists(os.path.join(folder, f"{name}.{field}.npy")):
          raise FileNotFoundError(
              f"{os.path.join(folder, f'{name}.{field}.npy')} is missing (latents written by an "
              f"older version lack the {', '.join(INT_FIELDS[1:])} fields): delete {folder} and "
              f"rerun the `latents` stage")

  def __len__(self) -> int:
    return int(self.starts[-1])

  def check_labels(self, num_classes: int) -> None:
    """Fails, naming the shard file, when a clip's label is outside 0..num_classes - 1. A
    class-conditional DiT looks its class vector up by the label, and inside a jitted step an index
    out of range is clamped to the last class, not reported."""
    for name in self.names:
      path = os.path.join(self.folder, f"{name}.label.npy")
      labels = np.load(path, mmap_mode="r")
      outside = np.flatnonzero((labels < 0) | (labels >= num_classes))
      if outside.size:
        raise ValueError(
            f"{path}: field 'label' is {int(labels[outside[0]])} at row {int(outside[0])} "
            f"({outside.size} of {len(labels)} rows outside the classes); expected 0.."
            f"{num_classes - 1} (data.num_classes={num_classes}) for dit.class_conditional. "
            f"Latents written without classes hold -1: rerun the `latents` stage with "
            f"data.num_classes set")

  def _open(self):
    self._arrays = [{field: np.load(os.path.join(self.folder, f"{name}.{field}.npy"), mmap_mode="r")
                     for field in FIELDS} for name in self.names]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._open()
    shard = int(np.searchsorted(self.starts, index, side="right")) - 1
    row = index - int(self.starts[shard])
    return {field: np.array(self._arrays[shard][field][row]) for field in FIELDS}

  def __getstate__(self):  # worker processes reopen the memory maps
    return dict(self.__dict__, _arrays=None)


class ContinuationPairs:
  """Random access to (previous clip, clip) pairs of a latent split, for continuation training.

  Item i -> the fields of a clip plus 'prev_audio_latent' / 'prev_video_latent' of the clip of the
  same video that ends where it starts (first frame clip_start - num_frames). Clips without one
  (the first num_frames windows of every video) are left out."""

  def __init__(self, source: LatentSource, num_frames: int):
    self.source = source
    video_index, clip_start = (np.concatenate(
        [np.load(os.path.join(source.folder, f"{name}.{field}.npy")) for name in source.names])
        for field in ("video_index", "clip_start"))
    # One sortable key per clip, (video, first frame); a clip's previous clip has key - num_frames.
    keys = video_index.astype(np.int64) * (int(clip_start.max()) + 1) + clip_start
    order = np.argsort(keys, kind="stable")
    position = np.minimum(np.searchsorted(keys[order], keys - num_frames), len(keys) - 1)
    found = (clip_start >= num_frames) & (keys[order][position] == keys - num_frames)
    self.pairs = np.stack([np.flatnonzero(found), order[position[found]]], axis=1)
    if not len(self.pairs):
      raise ValueError(f"{source.folder}: no clip has a previous clip {num_frames} frames earlier; "
                       f"continuation training needs videos of at least {2 * num_frames} frames")

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    row, prev_row = (int(value) for value in self.pairs[index])
    item, prev = self.source[row], self.source[prev_row]
    return dict(item, prev_audio_latent=prev["audio_latent"], prev_video_latent=prev["video_latent"])


def make_latent_dataset(folder: str, *, process_index: int, process_count: int, batch_size: int,
                        seed: int, split: str = "train",
                        continuation_frames: int | None = None) -> grain.IterDataset:
  """Shuffled (reshuffled each epoch), repeating, per-process batches of latents; checkpointable.
  With `continuation_frames` (the clip length), batches of `ContinuationPairs`."""
  source = LatentSource(folder, split)
  if continuation_frames is not None:
    source = ContinuationPairs(source, continuation_frames)
  dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  dataset = dataset[process_index::process_count].batch(batch_size, drop_remainder=True)
  return dataset.to_iter_dataset()


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------
