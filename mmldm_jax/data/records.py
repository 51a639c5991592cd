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
split, so a reader can enumerate clip windows without opening the shards. Its `meta` holds, under
'geometry' (`geometry`), what the records were written for: data.fps, data.image_size,
audio.sample_rate, the audio channels (1) and the config's name and file. Every reader calls
`check_geometry` with its config before reading (the Grain pipeline's `clip_source` does, for the
stages and the TFDS source alike), so records of another geometry, or of the format before the
geometry was recorded, are refused with the field to change instead of being read wrongly.
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
GEOMETRY_KEY = "geometry"
AUDIO_CHANNELS = 1  # records hold mono waveforms
# index.json geometry key -> the config field it must equal.
GEOMETRY_FIELDS = (("fps", "data.fps"), ("image_size", "data.image_size"),
                   ("sample_rate", "audio.sample_rate"))


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


def _config_value(config: Any, field: str) -> Any:
  section, name = field.split(".")
  return config[section][name]


def geometry(config: Any, config_file: str = "") -> dict[str, Any]:
  """What index.json records about the records' shape: the config's fps, image size, sample
  rate, the audio channels, and where the config came from (config.name, the --config file when
  known) so a mismatch message can say which config wrote them."""
  return {"fps": float(config.data.fps), "image_size": int(config.data.image_size),
          "sample_rate": int(config.audio.sample_rate), "audio_channels": AUDIO_CHANNELS,
          "config_name": str(config.get("name", "")), "config_file": str(config_file)}


def _origin(written: dict[str, Any]) -> str:
  parts = [f"config '{written['config_name']}'" if written.get("config_name") else "",
           written.get("config_file") or ""]
  return ", ".join(p for p in parts if p) or "an unnamed config"


def written_geometry(meta: dict[str, Any], where: str) -> dict[str, Any]:
  """The 'geometry' of index.json's `meta` (read from `where`); RecordError for records of the
  earlier format, which did not record it, or an incomplete one."""
  written = meta.get(GEOMETRY_KEY)
  if not isinstance(written, dict):
    raise RecordError(
        f"{where}: records of an earlier format (index.json has no '{GEOMETRY_KEY}': the fps, "
        "image size and sample rate they were written with are unknown). Re-ingest them: "
        "`python -m mmldm_jax.data.ingest --config=<this config> --src=<media> --dst=<new "
        "folder>`; a synthetic set is brought up to date by rerunning the data stage "
        "(--config.stages=data)")
  missing = [key for key, _ in GEOMETRY_FIELDS if key not in written]
  if missing or "audio_channels" not in written:
    raise RecordError(f"{where}: field '{GEOMETRY_KEY}' expected the keys "
                      f"{[key for key, _ in GEOMETRY_FIELDS] + ['audio_channels']}, got "
                      f"{sorted(written)}; re-ingest the media into a new folder")
  return written


def check_geometry(meta: dict[str, Any], config: Any, where: str) -> None:
  """Raises RecordError unless the records described by `meta` (index.json's meta, read from
  `where`) fit `config`: same data.fps, data.image_size and audio.sample_rate, mono audio.

  The message names each differing field with both values and the two ways out: change the
  config to the records' values, or re-ingest the media with this config into a fresh folder.
  Records of the format before the geometry was recorded are refused the same way.
  """
  written = written_geometry(meta, where)
  differences = []
  for key, field in GEOMETRY_FIELDS:
    wanted = _config_value(config, field)
    if not np.isclose(float(written[key]), float(wanted), rtol=1e-6, atol=0.0):
      differences.append((key, field, written[key], wanted))
  if differences:
    listed = "; ".join(f"{key}: records {got}, config {field}={wanted}"
                       for key, field, got, wanted in differences)
    overrides = " ".join(f"--config.{field}={got}" for _, field, got, _ in differences)
    raise RecordError(
        f"{where}: the records were written with another geometry than this config's ({listed}; "
        f"written with {_origin(written)}). Use {overrides}, or re-ingest the media with this "
        "config into a new folder")
  if int(written["audio_channels"]) != AUDIO_CHANNELS:
    raise RecordError(f"{where}: field '{GEOMETRY_KEY}.audio_channels' expected "
                      f"{AUDIO_CHANNELS} (mono records), got {written['audio_channels']}; "
                      "re-ingest the media into a new folder")
