"""The record format: one schema for synthetic and ingested sounding videos.

A dataset folder holds ArrayRecord shards (`<split>-00000-of-00004.array_record`) and an `index.json`.
Each record is one whole video (clip windows are cut at read time), serialised with msgpack (no pickle,
so reading a shard never runs code):

  video_id     str      unique id (file stem or `synthetic-<seed>-<n>`)
  frames       uint8    [T, H, W, 3], letterboxed to the config's image size, at `fps`
  audio        float32  [N], mono waveform in [-1, 1] at `sample_rate`, N = round(T / fps * rate)
  label        int32    class id, -1 when the dataset has no classes
  source       str      where it came from (the media path, or 'synthetic')
  fps          float32
  sample_rate  int32
  events       optional dict of equal-length arrays (ground truth of synthetic clips):
               frame (float32, event time in frames), object (int32), pitch_hz (float32),
               colour (int32)

`index.json` lists every video with its shard, its position inside the shard, its frame count, label and
split, so a reader can enumerate clip windows without opening the shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from flax import serialization

INDEX_FILE = "index.json"
SPLITS = ("train", "validation", "heldout")


class RecordError(ValueError):
  """A record or index that does not follow the schema."""


def _check(condition: bool, where: str, field: str, expected: str, got: Any) -> None:
  if not condition:
    raise RecordError(f"{where}: field '{field}' expected {expected}, got {got}")


def validate_record(record: dict[str, Any], where: str = "record") -> None:
  """Raises RecordError naming the field when `record` does not follow the schema."""
  for field in ("video_id", "frames", "audio", "label", "source", "fps", "sample_rate"):
    _check(field in record, where, field, "to be present", "nothing")
  frames = np.asarray(record["frames"])
  _check(frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3, where, "frames",
         "uint8 [T, H, W, 3]", f"{frames.dtype} {frames.shape}")
  audio = np.asarray(record["audio"])
  _check(audio.dtype == np.float32 and audio.ndim == 1, where, "audio", "float32 [N]",
         f"{audio.dtype} {audio.shape}")
  fps, rate = float(record["fps"]), int(record["sample_rate"])
  _check(fps > 0, where, "fps", "a positive frame rate", fps)
  _check(rate > 0, where, "sample_rate", "a positive sample rate", rate)
  expected = int(round(frames.shape[0] / fps * rate))
  _check(abs(audio.shape[0] - expected) <= 1, where, "audio",
         f"{expected} samples ({frames.shape[0]} frames at {fps} fps, {rate} Hz)", audio.shape[0])


def encode_record(record: dict[str, Any]) -> bytes:
  """Validates and serialises one video record."""
  validate_record(record, where=f"record {record.get('video_id', '?')!r}")
  payload = {
      "video_id": str(record["video_id"]),
      "frames": np.ascontiguousarray(record["frames"], np.uint8),
      "audio": np.ascontiguousarray(record["audio"], np.float32),
      "label": np.int32(record["label"]),
      "source": str(record["source"]),
      "fps": np.float32(record["fps"]),
      "sample_rate": np.int32(record["sample_rate"]),
  }
  if record.get("events") is not None:
    payload["events"] = {k: np.asarray(v) for k, v in record["events"].items()}
  return serialization.msgpack_serialize(payload)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`."""
  record = serialization.msgpack_restore(data)
  record["label"] = int(record["label"])
  record["fps"] = float(record["fps"])
  record["sample_rate"] = int(record["sample_rate"])
  return record


@dataclasses.dataclass
class VideoEntry:
  """One video in `index.json`."""
  video_id: str
  shard: str          # shard file name, relative to the dataset folder
  position: int       # record number inside the shard
  num_frames: int
  label: int
  split: str
  source: str = ""


def write_index(folder: str, entries: list[VideoEntry], meta: dict[str, Any]) -> str:
  """Writes `index.json` atomically (temp file + rename) and returns its path."""
  path = os.path.join(folder, INDEX_FILE)
  body = {"meta": meta, "videos": [dataclasses.asdict(e) for e in entries]}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1)
  os.replace(tmp, path)
  return path


def read_index(folder: str) -> tuple[list[VideoEntry], dict[str, Any]]:
  """Reads `index.json`; a missing or malformed index is an error naming the file."""
  path = os.path.join(folder, INDEX_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: write the dataset first (`python -m mmldm_jax.data.ingest` for "
        "media folders, the `data` stage for the synthetic set)")
  with open(path) as f:
    try:
      body = json.load(f)
    except json.JSONDecodeError as e:
      raise RecordError(f"{path}: not valid JSON ({e})") from e
  try:
    entries = [VideoEntry(**v) for v in body["videos"]]
  except (KeyError, TypeError) as e:
    raise RecordError(f"{path}: field 'videos' expected a list of "
                      f"{[f.name for f in dataclasses.fields(VideoEntry)]} entries ({e})") from e
  return entries, body.get("meta", {})


def write_shard(path: str, records: list[dict[str, Any]]) -> None:
  """Writes one ArrayRecord shard atomically: a reader never sees a half-written shard."""
  from array_record.python import array_record_module
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for record in records:
    writer.write(encode_record(record))
  writer.close()
  os.replace(tmp, path)


def read_shard_record(path: str, position: int) -> dict[str, Any]:
  """Reads one record (random access)."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return decode_record(reader.read([position])[0])
  finally:
    reader.close()


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"
