"""Media files -> a records folder (ArrayRecord shards + index.json) the Grain pipeline reads.

  python -m mmldm_jax.data.ingest --config=configs/landscape.py --src=/data/landscape \\
      --dst=/data/landscape_rec --labels=folders --split=folders --workers=8

What happens to each file (`convert`):
  1. `video.read_av` decodes it (any container/codec PyAV's FFmpeg reads: mp4, webm, mkv, avi, mov;
     H.264, VP9, MPEG-4, MJPEG; AAC, Opus, FLAC, PCM, ...) in its streaming mode, which does step 2
     while decoding (memory: the output frames, not the decoded ones).
  2. Video: resampled to config.data.fps by presentation time - output frame k is the decoded frame
     whose time is nearest to k / fps after the first frame (variable frame rate works) -, turned
     upright by the rotation metadata, letterboxed to config.data.image_size.
  3. Audio: mixed to mono, resampled to config.audio.sample_rate (scipy.signal.resample_poly),
     aligned to the video by the streams' start times (audio starting after the video is
     zero-padded in front, audio before the video's first frame is dropped), trimmed or zero-padded
     to exactly the video span N = round(T / fps * rate) (records.py). Encoder priming (AAC) is
     already removed by the decoder and reflected in the audio's start time. Both tracks are timed
     from the first decoded frame.
  4. The record (records.py) with the label and the video id (path relative to --src, without
     extension).

The job: files are listed and sorted, each gets a split (`--split`) and a label (`--labels`), each
split's files are cut into shards of `--videos_per_shard` in that order, and a pool of `--workers`
processes converts them. A shard is written atomically and then marked finished by a small
`<shard>.done.json` (its index entries and failures); a rerun skips finished shards, so a killed job
resumes and gives the same result as a clean run. The index is written last. A file that cannot be
used (unreadable, truncated, not a video, no video stream, no audio stream, shorter than one clip)
is recorded with its reason in `<dst>/ingest_report.json`; the job goes on. Exit status 0 when at
least one video was ingested (and, with --strict, nothing failed or was skipped).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import fractions
import hashlib
import json
import multiprocessing
import os
import re
from typing import Any, Iterator, Sequence

import numpy as np

from mmldm_jax.data import records
from mmldm_jax.data import video

MEDIA_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".ogv",
                    ".flv")
REPORT_FILE = "ingest_report.json"
DONE_SUFFIX = ".done.json"
# Folder names accepted by --split=folders, per split.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "validation",
                 "valid": "validation", "validation": "validation", "test": "heldout",
                 "heldout": "heldout"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `convert` needs from the config and the flags (small and picklable for the workers)."""
  fps: float
  image_size: int
  sample_rate: int
  min_frames: int
  missing_audio: str = "error"  # 'error', 'skip' or 'silence'
  max_seconds: float | None = None  # longest frame-time span accepted (config.data.max_video_seconds)


@dataclasses.dataclass(frozen=True)
class Item:
  """One media file of the job."""
  path: str
  video_id: str
  label: int
  split: str


class IngestError(ValueError):
  """A file that cannot become a record; `reason` says why (it goes into the report)."""

  def __init__(self, path: str, reason: str, skipped: bool = False):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason
    self.skipped = skipped


# -------------------------------------------------------------------------------------------------
# One file.


# Frame selection and orientation live with the decoder (video.read_av's streaming mode uses them).
resample_frame_indices = video.resample_frame_indices
rotate_upright = video.rotate_upright


def align_audio(audio: np.ndarray | None, native_rate: int, offset_seconds: float, num_frames: int,
                fps: float, rate: int) -> np.ndarray:
  """Mono waveform at `rate` covering exactly the video span.

  Args:
    audio: float32 [channels, samples] (or [samples]) at `native_rate`; None gives silence.
    offset_seconds: audio start minus video start (positive: the audio starts later).
  """
  length = int(round(num_frames / fps * rate))
  if audio is None:
    return np.zeros(length, np.float32)
  audio = np.asarray(audio, np.float32)
  mono = audio.mean(axis=0) if audio.ndim == 2 else audio
  if native_rate != rate:
    ratio = fractions.Fraction(int(rate), int(native_rate))
    from scipy import signal
    mono = signal.resample_poly(mono, ratio.numerator, ratio.denominator).astype(np.float32)
  shift = int(round(offset_seconds * rate))
  if shift > 0:
    mono = np.concatenate([np.zeros(shift, np.float32), mono])
  elif shift < 0:
    mono = mono[-shift:]
  mono = mono[:length]
  if mono.shape[0] < length:
    mono = np.pad(mono, (0, length - mono.shape[0]))
  return np.clip(mono, -1.0, 1.0).astype(np.float32)


def convert(item: Item, settings: Settings) -> dict[str, Any]:
  """Decodes one media file into a record (records.py); IngestError when it cannot be used."""
  try:
    # Frames come back resampled (presentation-time order), upright and letterboxed.
    media = video.read_av(item.path, fps=settings.fps, image_size=settings.image_size,
                          max_seconds=settings.max_seconds)
  except video.MediaError as e:
    raise IngestError(item.path, e.reason) from e
  if media.audio is None:
    if settings.missing_audio == "error":
      raise IngestError(item.path, "no audio stream")
    if settings.missing_audio == "skip":
      raise IngestError(item.path, "no audio stream (skipped)", skipped=True)
  frames = media.frames
  if frames.shape[0] < settings.min_frames:
    raise IngestError(item.path, f"shorter than one clip: {frames.shape[0]} frames at "
                      f"{settings.fps:g} fps < {settings.min_frames}")
  # Both tracks are placed on the clock of the first shown frame (output frame 0 is that frame,
  # the earliest of the file).
  offset = 0.0 if media.audio is None else media.audio_start - float(media.frame_times[0])
  audio = align_audio(media.audio, media.sample_rate, offset, frames.shape[0], settings.fps,
                      settings.sample_rate)
  return {
      "video_id": item.video_id,
      "frames": frames.astype(np.uint8),
      "audio": audio,
      "label": item.label,
      "source": item.path,
      "fps": settings.fps,
      "sample_rate": settings.sample_rate,
  }


def _convert_or_reason(
    args: tuple[Item, Settings]) -> tuple[Item, dict[str, Any] | None, str, bool]:
  """Pool task: (item, record or None, failure reason, skipped)."""
  item, settings = args
  try:
    return item, convert(item, settings), "", False
  except IngestError as e:
    return item, None, e.reason, e.skipped
  except (OSError, ValueError, records.RecordError) as e:
    # Decoder errors PyAV raises past read_av (it wraps what it can in MediaError) land here too:
    # av.error.FFmpegError subclasses OSError and ValueError.
    return item, None, f"{type(e).__name__}: {e}", False


# -------------------------------------------------------------------------------------------------
# The job: files -> items -> shards.


def list_media(src: str | Sequence[str]) -> list[tuple[str, str]]:
  """(path, path relative to its root) of every media file, sorted.

  `src` is a folder (searched recursively), a text file listing one media path per line, or a list.
  """
  if isinstance(src, str) and os.path.isdir(src):
    found = []
    for folder, _, names in os.walk(src):
      for name in names:
        if name.lower().endswith(MEDIA_EXTENSIONS):
          path = os.path.join(folder, name)
          found.append((path, os.path.relpath(path, src)))
    return sorted(found, key=lambda pair: pair[1])
  if isinstance(src, str):
    if not os.path.isfile(src):
      raise FileNotFoundError(f"--src={src}: neither a folder nor a file listing media paths")
    with open(src) as f:
      paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  else:
    paths = list(src)
  return sorted(((p, os.path.basename(p)) for p in paths), key=lambda pair: pair[1])


def video_id(relative_path: str) -> str:
  """The id of a file: its path relative to --src, without extension, '/'-separated."""
  return os.path.splitext(relative_path)[0].replace(os.sep, "/")


def assign_split(video_id_: str, validation_fraction: float, heldout_fraction: float) -> str:
  """Deterministic split from a hash of the id (stable across runs, machines and file orders)."""
  digest = hashlib.sha256(video_id_.encode("utf-8")).digest()
  position = int.from_bytes(digest[:8], "big") / 2 ** 64
  if position < heldout_fraction:
    return "heldout"
  if position < heldout_fraction + validation_fraction:
    return "validation"
  return "train"


def folder_split(relative_path: str) -> str:
  """The split named by the first folder of the relative path (train / val / test ...)."""
  first = relative_path.replace(os.sep, "/").split("/")[0].lower()
  if first not in SPLIT_FOLDERS or "/" not in relative_path.replace(os.sep, "/"):
    raise ValueError(f"--split=folders: {relative_path} is not under one of the folders "
                     f"{sorted(SPLIT_FOLDERS)}")
  return SPLIT_FOLDERS[first]


def read_label_file(path: str) -> dict[str, Any]:
  """video id -> class (name or int) from a JSON object or a two-column CSV (header optional)."""
  if path.lower().endswith(".json"):
    with open(path) as f:
      try:
        mapping = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"--labels={path}: not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
      raise ValueError(f"--labels={path}: expected a JSON object video id -> class")
    return mapping
  mapping = {}
  with open(path, newline="") as f:
    for line_number, row in enumerate(csv.reader(f), start=1):
      if not row or row[0].startswith("#"):
        continue
      if len(row) < 2:
        raise ValueError(
            f"--labels={path} line {line_number}: expected 'video_id,class', got {row}")
      if line_number == 1 and row[0].strip().lower() in ("video_id", "id", "video"):
        continue  # header
      mapping[row[0].strip()] = row[1].strip()
  return mapping


def class_ids(classes: Sequence[Any]) -> tuple[dict[Any, int], list[str]]:
  """Class -> id: integers (or integer strings) stay; names are numbered in sorted order."""
  def as_int(value):
    if isinstance(value, (int, np.integer)):
      return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
      return int(value)
    return None
  if all(as_int(c) is not None for c in classes):
    return {c: as_int(c) for c in classes}, []
  names = sorted({str(c) for c in classes})
  return {c: names.index(str(c)) for c in classes}, names


def make_items(files: Sequence[tuple[str, str]], *, labels: str, split: str,
               validation_fraction: float, heldout_fraction: float) -> tuple[list[Item], list[str]]:
  """Items (in shard order) and the class names (empty when labels are ids or absent).

  labels: '' (no classes: -1), 'folders' (the file's parent folder name), 'pattern:REGEX' (the
    first group of REGEX searched in the file stem, e.g. 'pattern:_(m[A-Z]{2}[0-9])_' for AIST++'s
    music id) or a JSON/CSV mapping file keyed by video id (path relative to --src without
    extension) or by stem.
  split: 'hash' (by validation/heldout fractions), 'folders' (first folder: train/val/test), or one
    of records.SPLITS for every file.
  """
  ids = [video_id(rel) for _, rel in files]
  if len(set(ids)) != len(ids):
    duplicates = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    raise ValueError(f"several media files give the same video id: {duplicates[:5]}")
  if labels == "folders":
    raw = [os.path.basename(os.path.dirname(rel)) for _, rel in files]
    missing = [rel for (_, rel), r in zip(files, raw) if not r]
    if missing:
      raise ValueError(f"--labels=folders: {missing[0]} is not inside a class folder")
  elif labels.startswith("pattern:"):
    pattern = re.compile(labels[len("pattern:"):])
    if pattern.groups < 1:
      raise ValueError(f"--labels={labels}: the pattern needs a group, e.g. '_(m[A-Z]{{2}}[0-9])_'")
    raw = []
    for vid in ids:
      match = pattern.search(vid.split("/")[-1])
      if match is None:
        raise ValueError(f"--labels={labels}: no match in the name of video '{vid}'")
      raw.append(match.group(1))
  elif labels:
    mapping = read_label_file(labels)
    raw = []
    for vid in ids:
      stem = vid.split("/")[-1]
      if vid not in mapping and stem not in mapping:
        raise ValueError(f"--labels={labels}: no class for video '{vid}'")
      raw.append(mapping.get(vid, mapping.get(stem)))
  else:
    raw = [-1] * len(files)
  to_id, names = class_ids(raw)
  items = []
  for (path, rel), vid, cls in zip(files, ids, raw):
    if split == "hash":
      item_split = assign_split(vid, validation_fraction, heldout_fraction)
    elif split == "folders":
      item_split = folder_split(rel)
    elif split in records.SPLITS:
      item_split = split
    else:
      raise ValueError(f"--split={split}: expected 'hash', 'folders' or one of {records.SPLITS}")
    items.append(Item(path=path, video_id=vid, label=to_id[cls], split=item_split))
  order = {s: i for i, s in enumerate(records.SPLITS)}
  return sorted(items, key=lambda it: order[it.split]), names  # stable: keeps the file order


def plan_shards(items: Sequence[Item], videos_per_shard: int) -> list[tuple[str, list[Item]]]:
  """(shard name, its items) per split, `videos_per_shard` files each, in item order."""
  plan = []
  for split in records.SPLITS:
    group = [it for it in items if it.split == split]
    count = -(-len(group) // videos_per_shard)
    for index in range(count):
      chunk = group[index * videos_per_shard:(index + 1) * videos_per_shard]
      plan.append((records.shard_name(split, index, count), chunk))
  return plan


def _done_path(dst: str, shard: str) -> str:
  return os.path.join(dst, shard + DONE_SUFFIX)


def _write_json(path: str, body: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1)
  os.replace(tmp, path)


def _read_done(dst: str, shard: str, chunk: Sequence[Item], settings: Settings) -> dict[str, Any]:
  """The finished-shard marker, checked against this run (same files, same settings)."""
  path = _done_path(dst, shard)
  with open(path) as f:
    done = json.load(f)
  return check_done(done, path, shard, chunk, settings)


def check_done(done: dict[str, Any], path: str, shard: str, chunk: Sequence[Item],
               settings: Settings) -> dict[str, Any]:
  """`done` (read from the marker `path`) when it belongs to this run, else ValueError."""
  if done.get("settings") != dataclasses.asdict(settings):
    raise ValueError(f"{path}: written with settings {done.get('settings')}, this run uses "
                     f"{dataclasses.asdict(settings)}; ingest into a fresh --dst")
  if done.get("video_ids") != [it.video_id for it in chunk]:
    raise ValueError(f"{path}: lists other files than this run puts into {shard} (the source "
                     "folder changed); ingest into a fresh --dst")
  return done


def _shard_records(chunk: Sequence[Item], results: Iterator, shard: str, done: dict[str, Any],
                   progress) -> Iterator[dict[str, Any]]:
  """Consumes the chunk's results in order, yields the good records, notes entries and failures."""
  for expected in chunk:
    item, record, reason, skipped = next(results)
    if item != expected:
      raise RuntimeError(f"{shard}: got the result of {item.path}, expected {expected.path}")
    if progress is not None:
      progress.update(1)
    if record is None:
      done["skipped" if skipped else "failures"].append({"path": item.path, "reason": reason})
      continue
    done["entries"].append(dataclasses.asdict(records.VideoEntry(
        video_id=item.video_id, shard=shard, position=len(done["entries"]),
        num_frames=int(record["frames"].shape[0]), label=item.label, split=item.split,
        source=item.path)))
    yield record


def ingest(items: Sequence[Item], dst: str, settings: Settings, *, workers: int = 1,
           videos_per_shard: int = 32, meta: dict[str, Any] | None = None,
           show_progress: bool = True) -> dict[str, Any]:
  """Converts `items` into shards + index.json in `dst`, resuming finished shards.

  Returns the report (also written to `<dst>/ingest_report.json`).
  """
  import tqdm
  os.makedirs(dst, exist_ok=True)
  plan = plan_shards(items, videos_per_shard)
  finished = {shard for shard, _ in plan if os.path.exists(_done_path(dst, shard))}
  for shard, chunk in plan:  # fail before any work when dst holds another job's shards
    if shard in finished:
      _read_done(dst, shard, chunk, settings)
  pending = [(shard, chunk) for shard, chunk in plan if shard not in finished]
  tasks = [(item, settings) for _, chunk in pending for item in chunk]
  progress = tqdm.tqdm(total=len(items), initial=len(items) - len(tasks), unit="video",
                       desc="ingest", disable=not show_progress)
  pool = None
  if workers > 1 and tasks:
    # spawn: the parent has JAX (via flax) loaded, which does not survive fork well.
    pool = multiprocessing.get_context("spawn").Pool(workers)
    results = pool.imap(_convert_or_reason, tasks)
  else:
    results = map(_convert_or_reason, tasks)
  try:
    for shard, chunk in pending:
      write_shard(dst, shard, chunk, settings, results, progress)
  finally:
    progress.close()
    if pool is not None:
      pool.terminate()
      pool.join()
  return _finish(dst, plan, settings, meta or {})


def write_shard(dst: str, shard: str, chunk: Sequence[Item], settings: Settings,
                results: Iterator | None = None, progress=None) -> dict[str, Any]:
  """Writes `dst/shard` from `chunk` and then its finished-marker; returns the marker's content.

  `results` yields `_convert_or_reason` results for the chunk's items in order (a worker pool's);
  None converts them here, one after the other (what a Beam worker does).
  """
  if results is None:
    results = map(_convert_or_reason, [(item, settings) for item in chunk])
  done = {"settings": dataclasses.asdict(settings), "video_ids": [it.video_id for it in chunk],
          "entries": [], "failures": [], "skipped": []}
  records.write_shard(os.path.join(dst, shard),
                      _shard_records(chunk, results, shard, done, progress))
  _write_json(_done_path(dst, shard), done)  # after the shard: marks it finished
  return done


def _finish(dst: str, plan, settings: Settings, meta: dict[str, Any]) -> dict[str, Any]:
  """Index and report from every shard's marker (a resumed run reports earlier shards too)."""
  dones = [_read_done(dst, shard, chunk, settings) for shard, chunk in plan]
  entries, index_meta, report = assemble(dones, settings, meta)
  records.write_index(dst, entries, index_meta)
  _write_json(os.path.join(dst, REPORT_FILE), report)
  return report


def assemble(dones: Sequence[dict[str, Any]], settings: Settings, meta: dict[str, Any]
             ) -> tuple[list[records.VideoEntry], dict[str, Any], dict[str, Any]]:
  """(index entries, index meta, report) from the shards' markers in shard-plan order."""
  entries, failures, skipped = [], [], []
  for done in dones:
    entries += [records.VideoEntry(**e) for e in done["entries"]]
    failures += done["failures"]
    skipped += done["skipped"]
  counts = {s: sum(e.split == s for e in entries) for s in records.SPLITS}
  index_meta = dict(meta, fps=settings.fps, sample_rate=settings.sample_rate,
                    image_size=settings.image_size, min_frames=settings.min_frames,
                    missing_audio=settings.missing_audio, counts=counts)
  report = {"ingested": len(entries), "failed": len(failures), "skipped": len(skipped),
            "counts": counts, "failures": failures, "skipped_files": skipped}
  return entries, index_meta, report


# -------------------------------------------------------------------------------------------------
# Command line.


def run_from_flags(config, *, src: str, dst: str, labels: str = "", split: str = "hash",
                   validation_fraction: float = 0.05, heldout_fraction: float = 0.05,
                   workers: int = 1, videos_per_shard: int = 32, missing_audio: str = "error",
                   min_frames: int = 0, show_progress: bool = True) -> dict[str, Any]:
  """The CLI's job as a function (also what tests and Beam's comparison call)."""
  items, settings, meta = plan_job(
      config, src=src, labels=labels, split=split, validation_fraction=validation_fraction,
      heldout_fraction=heldout_fraction, videos_per_shard=videos_per_shard,
      missing_audio=missing_audio, min_frames=min_frames)
  return ingest(items, dst, settings, workers=workers, videos_per_shard=videos_per_shard, meta=meta,
                show_progress=show_progress)


def plan_job(config, *, src: str, labels: str, split: str, validation_fraction: float,
             heldout_fraction: float, videos_per_shard: int, missing_audio: str,
             min_frames: int, files: Sequence[tuple[str, str]] | None = None
             ) -> tuple[list[Item], Settings, dict[str, Any]]:
  """Checks the flags and lists the job: (items in shard order, settings, index meta).

  `files` ((path, relative path) pairs) replaces listing `src` (Beam lists remote folders itself).
  """
  if missing_audio not in ("error", "skip", "silence"):
    raise ValueError(f"--missing_audio={missing_audio}: expected error, skip or silence")
  if not 0 <= validation_fraction + heldout_fraction <= 1:
    raise ValueError("--validation_fraction + --heldout_fraction must lie in [0, 1]")
  if videos_per_shard <= 0:
    raise ValueError(f"--videos_per_shard={videos_per_shard}: expected a positive count")
  settings = Settings(fps=float(config.data.fps), image_size=int(config.data.image_size),
                      sample_rate=int(config.audio.sample_rate),
                      min_frames=int(min_frames or config.data.num_frames),
                      missing_audio=missing_audio,
                      max_seconds=float(config.data.max_video_seconds))
  files = list_media(src) if files is None else files
  if not files:
    raise ValueError(f"--src={src}: no media files ({', '.join(MEDIA_EXTENSIONS)})")
  items, class_names = make_items(files, labels=labels, split=split,
                                  validation_fraction=validation_fraction,
                                  heldout_fraction=heldout_fraction)
  meta = {"source": src if "://" in src else os.path.abspath(src), "class_names": class_names,
          "num_classes": len(class_names) or len({it.label for it in items if it.label >= 0}),
          "labels": labels, "split": split, "validation_fraction": validation_fraction,
          "heldout_fraction": heldout_fraction}
  return items, settings, meta


def summary(report: dict[str, Any]) -> str:
  counts = ", ".join(f"{split} {count}" for split, count in report["counts"].items())
  lines = [f"ingested {report['ingested']} videos ({counts}), failed {report['failed']}, "
           f"skipped {report['skipped']}"]
  lines += [f"  FAILED {f['path']}: {f['reason']}" for f in report["failures"]]
  lines += [f"  skipped {f['path']}: {f['reason']}" for f in report["skipped_files"]]
  return "\n".join(lines)


def main(argv) -> int:
  from absl import flags as absl_flags
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  flag = absl_flags.FLAGS
  if flag.config is None:
    raise ValueError("--config is required, e.g. --config=configs/landscape.py")
  report = run_from_flags(
      flag.config, src=flag.src, dst=flag.dst, labels=flag.labels, split=flag.split,
      validation_fraction=flag.validation_fraction, heldout_fraction=flag.heldout_fraction,
      workers=flag.workers, videos_per_shard=flag.videos_per_shard,
      missing_audio=flag.missing_audio, min_frames=flag.min_frames)
  print(summary(report))
  print(f"report: {os.path.join(flag.dst, REPORT_FILE)}")
  if report["ingested"] == 0:
    return 1
  if flag.strict and (report["failed"] or report["skipped"]):
    return 2
  return 0


def _define_flags(with_workers: bool = True) -> None:
  """The CLI's flags (Beam's CLI shares them; it has no --workers: the runner decides)."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/aist.py.")
  absl_flags.DEFINE_string("src", None,
                           "Folder of media files (recursive) or a file listing media paths.",
                           required=True)
  absl_flags.DEFINE_string("dst", None, "Output folder (shards, index.json, ingest_report.json).",
                           required=True)
  absl_flags.DEFINE_string("labels", "", "'' (no classes), 'folders' (parent folder name = class), "
                           "'pattern:REGEX' (first group of REGEX in the file name) or a JSON/CSV "
                           "file video_id -> class name or id.")
  absl_flags.DEFINE_string("split", "hash", "'hash' (by the fractions), 'folders' (first folder: "
                           "train/val/test) or train|validation|heldout for every file.")
  absl_flags.DEFINE_float("validation_fraction", 0.05, "Share of videos in 'validation' (hash).")
  absl_flags.DEFINE_float("heldout_fraction", 0.05, "Share of videos in 'heldout' (hash).")
  if with_workers:
    absl_flags.DEFINE_integer("workers", 1, "Decoding processes.")
  absl_flags.DEFINE_integer("videos_per_shard", 32, "Videos per ArrayRecord shard.")
  absl_flags.DEFINE_enum("missing_audio", "error", ["error", "skip", "silence"],
                         "A file without sound: report it as failed, skip it (counted), or ingest "
                         "it with silence.")
  absl_flags.DEFINE_integer("min_frames", 0, "Shortest usable video in output frames "
                            "(0 = config.data.num_frames, one clip).")
  absl_flags.DEFINE_bool("strict", False, "Exit non-zero if any file failed or was skipped.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
