"""The `data` stage: make sure the dataset the later stages read exists.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=data

config.data.source == 'synthetic': writes the synthetic sounding-video set (`data.synthetic`) into
config.data.data_dir, or <workdir>/data when that is empty (skipped when already complete), then a
preview of one video into the workdir:
  preview.mp4  the whole video with its sound (H.264 + AAC): a tone at every wall contact
  preview.png  the first clip's frames (up to 8, evenly spaced) in a row, a 4-pixel gap, then the
               clip's audio image (what the models see); white ticks above the audio image mark the
               ground-truth events. Size: (max(S, A), n * S + 4 + A) for frames S and audio image A.
config.data.source == 'records': the records come from `python -m mmldm_jax.data.ingest`; the stage
checks that config.data.data_dir holds an index.json whose geometry (fps, image size, sample rate)
fits the config (records.check_geometry) and logs the videos per split.
"""
from __future__ import annotations

import collections
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from mmldm_jax import config_lib
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import records
from mmldm_jax.data import synthetic

PREVIEW_FRAMES = 8
_GAP = 4


def ensure_dataset(config: Any, workdir: str) -> str:
  """The dataset's folder (`workdir.data_folder`) for a training Task that reads it. With the
  synthetic source and no dataset yet, runs this stage first (single process), so the training
  stages also work without 'data' in config.stages; otherwise a missing index is an error naming
  it (`workdir.require_dataset`)."""
  try:
    return workdir_lib.require_dataset(config, workdir, can_make=jax.process_count() == 1)
  except workdir_lib.MissingInput as missing:
    logging.info("%s; running the data stage first", missing)
    run(config, workdir)
    return workdir_lib.data_folder(config, workdir)


def preview_image(record: dict[str, Any], config: Any) -> np.ndarray:
  """uint8 [H, W, 3]: the first clip's frames in a row, a gap, the clip's audio image with event
  ticks along its top edge (layout in the module docstring)."""
  import jax
  from mmldm_jax.data import audio
  num_frames = min(int(config.data.num_frames), record["frames"].shape[0])
  picks = np.linspace(0, num_frames - 1, min(PREVIEW_FRAMES, num_frames)).round()
  picks = np.unique(picks).astype(int)
  strip = np.concatenate(list(record["frames"][picks]), axis=1)
  waveform = np.asarray(record["audio"][:config_lib.clip_samples(config)], np.float32)
  image = np.asarray(jax.jit(lambda w: audio.waveform_to_image(w, config.audio))(waveform))
  image = np.clip(np.round((image + 1.0) * 127.5), 0, 255).astype(np.uint8)
  size = image.shape[1]
  events = record.get("events") or {}
  for frame in np.asarray(events.get("frame", [])):
    if 0.0 <= frame < num_frames:
      column = min(int(frame / num_frames * size), size - 1)   # the image spans the clip
      image[:max(2, size // 32), column] = 255
  height = max(strip.shape[0], image.shape[0])
  canvas = np.zeros((height, strip.shape[1] + _GAP + image.shape[1], 3), np.uint8)
  canvas[:strip.shape[0], :strip.shape[1]] = strip
  canvas[:image.shape[0], strip.shape[1] + _GAP:] = image
  return canvas


def write_preview(config: Any, workdir: str) -> str:
  """preview.mp4 and preview.png of the dataset's first video (skipped when both exist). Returns
  what it did, for the stage's end line."""
  from PIL import Image
  from mmldm_jax.data import video
  mp4_path, png_path = workdir_lib.preview_files(workdir)
  if os.path.exists(mp4_path) and os.path.exists(png_path):
    return f"{mp4_path} and {png_path} exist, skipped"
  record = synthetic.generate_video(synthetic.video_seed(config, 0), 0, config)
  video.write_mp4(mp4_path, record["frames"], record["fps"], record["audio"], record["sample_rate"])
  tmp = png_path + ".tmp.png"
  Image.fromarray(preview_image(record, config)).save(tmp)
  os.replace(tmp, png_path)
  event_frames = [round(float(f), 2) for f in record["events"]["frame"]]
  return f"{mp4_path} ({len(event_frames)} events at frames {event_frames}) and {png_path}"


def report_records(folder: str, config: Any, preview: str | None = None) -> dict[str, int]:
  """Checks a records folder against `config` (geometry); logs the stage's end line (the videos
  and frames per split, and `preview`, what `write_preview` did) and returns the videos per split."""
  entries, meta = records.read_index(folder)
  records.check_geometry(meta, config, os.path.join(folder, records.INDEX_FILE))
  counts = collections.Counter(entry.split for entry in entries)
  frames = collections.Counter()
  for entry in entries:
    frames[entry.split] += entry.num_frames
  splits = ", ".join(f"{split} {counts[split]} ({frames[split]} frames)" for split in sorted(counts))
  logging.info("data: %s holds %d videos: %s; source %s%s", folder, len(entries), splits,
               meta.get("source", "unknown"), f"; preview: {preview}" if preview else "")
  return dict(counts)


def run(config: Any, workdir: str) -> None:
  folder = workdir_lib.data_folder(config, workdir)
  preview = None
  if config.data.source == "synthetic":
    if synthetic.is_complete(config, folder):
      logging.info("data: %s is complete, skipped", folder)
    else:
      logging.info("data: writing the synthetic dataset into %s", folder)
      synthetic.write_dataset(config, folder)
    preview = write_preview(config, workdir)
  else:
    logging.info("data: checking the records in %s against the config", folder)
  report_records(folder, config, preview)
