"""Media files -> a records folder (ArrayRecord shards + index.json) the Grain pipeline reads.

  python -m mmldm_jax.data.ingest --config=configs/landscape.py --src=/data/landscape \\
      --dst=/data/landscape_rec --labels=folders --split=folders --workers=8

Which files: every regular file under --src (a folder, searched recursively, or a text file listing
paths) is accounted for. Hidden files and folders (name starting with '.') and the job's own
output folder (when --dst lies inside --src) are ignored and counted. The rest is sorted by content,
not by extension (`video.sniff_media` on the first bytes): empty files, text, images, documents and
archives are rejected with that reason; everything else goes to the decoder, which has the last word
(an audio-only .m4a becomes 'no video stream (audio only: aac)', a file FFmpeg cannot open gets a
reason from its content, e.g. 'truncated: nothing decodable (the mp4 index 'moov' is missing ...)').

What happens to each file (`convert`):
  1. `video.read_av` decodes it (any container/codec PyAV's FFmpeg reads: mp4, webm, mkv, avi, mov;
     H.264, VP9, MPEG-4, MJPEG; AAC, Opus, FLAC, PCM, ...) in its streaming mode, which does step 2
     while decoding (memory: the output frames, not the decoded ones).
  2. Video: resampled to config.data.fps by presentation time - output frame k is the decoded frame
     whose time is nearest to k / fps after the first frame (variable frame rate works) -, turned
     upright by the rotation metadata, letterboxed to config.data.image_size.
  3. Audio: mixed to mono by libswresample as it is decoded (the standard matrix: ITU-R BS.775
     coefficients for 5.1, LFE dropped; (L + R) / sqrt(2) for stereo), resampled to
     config.audio.sample_rate (scipy.signal.resample_poly), aligned to the video by the streams'
     start times (audio starting after the video is zero-padded in front, audio before the video's
     first frame is dropped), trimmed or zero-padded to exactly the video span
     N = round(T / fps * rate) (records.py), clipped to [-1, 1]. Encoder priming (AAC) is already
     removed by the decoder and reflected in the audio's start time. Both tracks are timed from the
     first decoded frame.
  4. The record (records.py) with the label and the video id (path relative to --src, without
     extension).

Truncated files, one rule for every container: a file that stops decoding before its declared end
(cut short, or a demuxer/decoder error part way) gives its decodable prefix. When that holds at
least one clip (--min_frames, default config.data.num_frames) it is ingested and listed under
'truncated' in the report with its decodable duration ('truncated: only 1.76 s of 4.00 s
decodable'), cut to the span both tracks still cover; otherwise it fails with that reason and the
frame count. With --strict every truncated file fails.

The job: files are listed and sorted, each gets a split (`--split`) and a label (`--labels`), each
split's files are cut into shards of `--videos_per_shard` in that order, and a pool of `--workers`
processes converts them. A shard is written atomically and then marked finished by a small
`<shard>.done.json` (its settings, index entries, failures and truncations); a rerun skips finished
shards, so a killed job resumes and gives the same result as a clean run. A rerun with other
settings into the same --dst is refused before any work. The index is written last and records the
geometry the records were written with (`records.geometry`; every reader checks it against its
config). `<dst>/ingest_report.json` accounts for every file: ingested (truncated ones named),
failed, skipped (--missing_audio=skip), rejected by content, ignored.

Exit status: 0 when at least one video was ingested (and, with --strict, nothing failed or was
skipped), 1 when none was, 2 with --strict failures and for command-line errors (missing --src,
unwritable --dst, changed settings, bad flags), which print one line naming the problem and the
remedy.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import fractions
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mmldm_jax.data import records
from mmldm_jax.data import video

REPORT_FILE = "ingest_report.json"
DONE_SUFFIX = ".done.json"
# Bumped when the same settings would write different records (2: standard surround downmix,
# truncated prefixes kept): markers of an older version are refused rather than mixed in.
FORMAT_VERSION = 2
TRUNCATION_POLICIES = ("keep", "fail")
# Folder names accepted by --split=folders, per split.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "validation",
                 "valid": "validation", "validation": "validation", "test": "heldout",
                 "heldout": "heldout"}
IGNORED_HIDDEN = "hidden"
IGNORED_OUTPUT = "ingest output"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `convert` needs from the config and the flags (small and picklable for the workers)."""
  fps: float
  image_size: int
  sample_rate: int
  min_frames: int
  missing_audio: str = "error"  # 'error', 'skip' or 'silence'
  max_seconds: float | None = None  # longest frame-time span accepted (config.data.max_video_seconds)
  truncation: str = "keep"  # a truncated file: 'keep' its decodable prefix, or 'fail' (--strict)
  format_version: int = FORMAT_VERSION


@dataclasses.dataclass(frozen=True)
class Item:
  """One media file of the job."""
  path: str
  video_id: str
  label: int
  split: str


@dataclasses.dataclass
class Listing:
  """What --src holds, every file accounted for.

  files     (path, path relative to --src) of the files that may be media, sorted by the latter
  rejected  {"path", "reason"} of the files that are not media by content (empty, text, images ...)
  ignored   count per reason of the files left out unread ('hidden', 'ingest output')
  """
  files: list[tuple[str, str]]
  rejected: list[dict[str, str]] = dataclasses.field(default_factory=list)
  ignored: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def total(self) -> int:
    return len(self.files) + len(self.rejected) + sum(self.ignored.values())


class UsageError(ValueError):
  """A problem with the job as asked for (flags, --src, --dst): one line with the remedy."""


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
  """Mono waveform at `rate` covering exactly the video span, clipped to [-1, 1].

  Args:
    audio: mono float32 [samples] or [1, samples] at `native_rate` (downmix surround with
      `video.read_av(audio_layout='mono')` first); None gives silence.
    offset_seconds: audio start minus video start (positive: the audio starts later).
  """
  length = int(round(num_frames / fps * rate))
  if audio is None:
    return np.zeros(length, np.float32)
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 2 and audio.shape[0] == 1:
    audio = audio[0]
  if audio.ndim != 1:
    raise ValueError(f"align_audio: expected mono audio [N] or [1, N], got {audio.shape}; downmix "
                     "with video.read_av(..., audio_layout='mono')")
  mono = audio
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


def decode(item: Item, settings: Settings) -> tuple[dict[str, Any], str]:
  """(record, truncation note) of one media file; IngestError when it cannot be used.

  The note is '' for a complete file, else 'truncated: only X s of Y s decodable ...' (the record
  then holds the decodable prefix; settings.truncation == 'fail' makes it an IngestError instead).
  """
  try:
    # Frames come back resampled (presentation-time order), upright and letterboxed; audio mono.
    media = video.read_av(item.path, fps=settings.fps, image_size=settings.image_size,
                          max_seconds=settings.max_seconds, audio_layout="mono")
  except video.MediaError as e:
    raise IngestError(item.path, e.reason) from e
  note = f"truncated: {media.truncation}" if media.truncation else ""
  if note and settings.truncation == "fail":
    raise IngestError(item.path, f"{note} (--strict: truncated files fail)")
  if media.audio is None:
    if settings.missing_audio == "error":
      raise IngestError(item.path, "no audio stream")
    if settings.missing_audio == "skip":
      raise IngestError(item.path, "no audio stream (skipped)", skipped=True)
  frames = media.frames
  if note and media.audio is not None:
    # A cut file loses its tracks at slightly different points: keep only the frames the audio
    # still covers, so the prefix is not padded with silence that the source did not have.
    audio_end = (media.audio_start + media.audio.shape[1] / media.sample_rate
                 - float(media.frame_times[0]))
    frames = frames[:max(0, int(np.floor(audio_end * settings.fps + 1e-6)))]
  if frames.shape[0] < settings.min_frames:
    shortfall = (f"{frames.shape[0]} frames < {settings.min_frames} (one clip at "
                 f"{settings.fps:g} fps)")
    raise IngestError(item.path, f"{note}; {shortfall}" if note else f"too short: {shortfall}")
  # Both tracks are placed on the clock of the first shown frame (output frame 0 is that frame,
  # the earliest of the file).
  offset = 0.0 if media.audio is None else media.audio_start - float(media.frame_times[0])
  audio = align_audio(media.audio, media.sample_rate, offset, frames.shape[0], settings.fps,
                      settings.sample_rate)
  record = {
      "video_id": item.video_id,
      "frames": frames.astype(np.uint8),
      "audio": audio,
      "label": item.label,
      "source": item.path,
      "fps": settings.fps,
      "sample_rate": settings.sample_rate,
  }
  return record, note


def convert(item: Item, settings: Settings) -> dict[str, Any]:
  """The record of one media file (records.py); IngestError when it cannot be used."""
  return decode(item, settings)[0]


def _convert_or_reason(
    args: tuple[Item, Settings]) -> tuple[Item, dict[str, Any] | None, str, bool]:
  """Pool task: (item, record or None, failure reason or truncation note, skipped)."""
  item, settings = args
  try:
    record, note = decode(item, settings)
    return item, record, note, False
  except IngestError as e:
    return item, None, e.reason, e.skipped
  except (OSError, ValueError, records.RecordError) as e:
    # Decoder errors PyAV raises past read_av (it wraps what it can in MediaError) land here too:
    # av.error.FFmpegError subclasses OSError and ValueError.
    return item, None, f"{type(e).__name__}: {e}", False


# -------------------------------------------------------------------------------------------------
# The job: files -> items -> shards.


def _ignored_as(relative_path: str, output_folder: str | None) -> str:
  """Why a file (path relative to --src) is left out unread, or '' when it is not."""
  parts = relative_path.replace(os.sep, "/").split("/")
  if output_folder is not None and (
      output_folder == "." or parts[:len(output_folder.split("/"))] == output_folder.split("/")):
    return IGNORED_OUTPUT
  if any(part.startswith(".") for part in parts):
    return IGNORED_HIDDEN
  return ""


def sort_files(found: Sequence[tuple[str, str, int]], read_head: Callable[[str], bytes], *,
               output_folder: str | None = None, threads: int = 1,
               probe: Callable[[str], str] | None = None) -> Listing:
  """The Listing of `found` ((path, path relative to --src, size in bytes) of every regular file).

  `read_head(path)` returns a file's first video.HEAD_BYTES bytes (local or remote, hence the
  parameter); `output_folder` is --dst relative to --src when it lies inside it ('/'-separated).
  Heads are read by `threads` threads (remote stores answer slowly but in parallel).

  Files that would share a video id (same path but the extension: clip.mp4 beside its audio
  clip.m4a) are opened with `probe` (video.probe_streams; None for remote files) and those that
  are no video are rejected with its reason; if several videos still share the id, each is
  rejected with the names of the others, so the job goes on without them.
  """
  ignored: dict[str, int] = collections.Counter()
  kept = []
  for path, relative, size in found:
    why = _ignored_as(relative, output_folder)
    if why:
      ignored[why] += 1
    else:
      kept.append((path, relative, size))

  def verdict(entry: tuple[str, str, int]) -> str:
    path, _, size = entry
    try:
      return video.sniff_media(read_head(path), size)
    except OSError as error:
      return f"cannot read: {error.strerror or error}"

  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    verdicts = list(pool.map(verdict, kept))
  listing = Listing(files=[], ignored=dict(sorted(ignored.items())))
  for (path, relative, _), reason in zip(kept, verdicts):
    if reason:
      listing.rejected.append({"path": path, "reason": reason})
    else:
      listing.files.append((path, relative))
  listing.files.sort(key=lambda pair: pair[1])
  _reject_shared_ids(listing, probe)
  return listing


def _reject_shared_ids(listing: Listing, probe: Callable[[str], str] | None) -> None:
  """Moves the files whose video id another file also gives to `listing.rejected` (sort_files)."""
  groups = collections.defaultdict(list)
  for path, relative in listing.files:
    groups[video_id(relative)].append((path, relative))
  dropped = set()
  for vid, group in groups.items():
    if len(group) < 2:
      continue
    videos = []
    for path, relative in group:
      reason = probe(path) if probe is not None else ""
      if reason:
        listing.rejected.append({"path": path, "reason": reason})
        dropped.add(path)
      else:
        videos.append((path, relative))
    if len(videos) > 1:
      for path, relative in videos:
        others = ", ".join(r for _, r in videos if r != relative)
        listing.rejected.append({"path": path, "reason": f"video id '{vid}' is also that of "
                                 f"{others}: rename all but one"})
        dropped.add(path)
  listing.files = [pair for pair in listing.files if pair[0] not in dropped]
  listing.rejected.sort(key=lambda entry: entry["path"])


def _read_local_head(path: str) -> bytes:
  with open(path, "rb") as handle:
    return handle.read(video.HEAD_BYTES)


def _inside(folder: str, root: str) -> str | None:
  """`folder` relative to `root` ('/'-separated) when it lies inside it (or is it), else None."""
  relative = os.path.relpath(os.path.abspath(folder), os.path.abspath(root))
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    return None
  return relative.replace(os.sep, "/")


def list_sources(src: str | Sequence[str], dst: str | None = None) -> Listing:
  """Every file of --src, sorted into media candidates, rejected and ignored files.

  `src` is a folder (searched recursively; hidden files and `dst`, when inside it, are ignored), a
  text file listing one media path per line ('#' starts a comment), or a list of paths. A listed
  path that does not exist or is not a regular file is rejected with that reason.
  """
  if isinstance(src, str) and os.path.isdir(src):
    found, broken = [], []
    for folder, _, names in os.walk(src):
      for name in names:
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, src)
        if os.path.isfile(path):
          found.append((path, relative, os.path.getsize(path)))
        else:
          broken.append((path, relative))
    output = _inside(dst, src) if dst else None
    listing = sort_files(found, _read_local_head, output_folder=output, probe=video.probe_streams)
    for path, relative in broken:
      if not _ignored_as(relative, output):
        listing.rejected.append({"path": path, "reason": "not a regular file (a broken link, a "
                                                         "pipe or a device)"})
    listing.rejected.sort(key=lambda entry: entry["path"])
    return listing
  if isinstance(src, str):
    if not os.path.exists(src):
      raise UsageError(f"--src={src} does not exist: give a folder of media files or a text file "
                       "listing media paths")
    with open(src) as f:
      paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  else:
    paths = list(src)
  found, missing = [], []
  for path in paths:
    if os.path.isfile(path):
      found.append((path, os.path.basename(path), os.path.getsize(path)))
    else:
      missing.append({"path": path, "reason": "listed in --src but not a file that exists"})
  listing = sort_files(found, _read_local_head, probe=video.probe_streams)
  listing.rejected = sorted(listing.rejected + missing, key=lambda entry: entry["path"])
  return listing


def list_media(src: str | Sequence[str], dst: str | None = None) -> list[tuple[str, str]]:
  """(path, path relative to its root) of every media candidate of `src` (`list_sources`)."""
  return list_sources(src, dst).files


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
    raise UsageError(f"--split=folders: {relative_path} is not under one of the folders "
                     f"{sorted(SPLIT_FOLDERS)}")
  return SPLIT_FOLDERS[first]


def read_label_file(path: str) -> dict[str, Any]:
  """video id -> class (name or int) from a JSON object or a two-column CSV (header optional)."""
  if path.lower().endswith(".json"):
    with open(path) as f:
      try:
        mapping = json.load(f)
      except json.JSONDecodeError as e:
        raise UsageError(f"--labels={path}: not valid JSON ({e})") from e
    if not isinstance(mapping, dict):
      raise UsageError(f"--labels={path}: expected a JSON object video id -> class")
    return mapping
  mapping = {}
  with open(path, newline="") as f:
    for line_number, row in enumerate(csv.reader(f), start=1):
      if not row or row[0].startswith("#"):
        continue
      if len(row) < 2:
        raise UsageError(
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
    raise UsageError(f"several media files give the same video id: {duplicates[:5]}")
  if labels == "folders":
    raw = [os.path.basename(os.path.dirname(rel)) for _, rel in files]
    missing = [rel for (_, rel), r in zip(files, raw) if not r]
    if missing:
      raise UsageError(f"--labels=folders: {missing[0]} is not inside a class folder")
  elif labels.startswith("pattern:"):
    pattern = re.compile(labels[len("pattern:"):])
    if pattern.groups < 1:
      raise UsageError(f"--labels={labels}: the pattern needs a group, e.g. '_(m[A-Z]{{2}}[0-9])_'")
    raw = []
    for vid in ids:
      match = pattern.search(vid.split("/")[-1])
      if match is None:
        raise UsageError(f"--labels={labels}: no match in the name of video '{vid}'")
      raw.append(match.group(1))
  elif labels:
    mapping = read_label_file(labels)
    raw = []
    for vid in ids:
      stem = vid.split("/")[-1]
      if vid not in mapping and stem not in mapping:
        raise UsageError(f"--labels={labels}: no class for video '{vid}'")
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
      raise UsageError(f"--split={split}: expected 'hash', 'folders' or one of {records.SPLITS}")
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
    try:
      done = json.load(f)
    except json.JSONDecodeError as e:
      raise UsageError(f"{path}: damaged ({e}); delete it (its shard is then written again)") from e
  return check_done(done, path, shard, chunk, settings)


def check_done(done: dict[str, Any], path: str, shard: str, chunk: Sequence[Item],
               settings: Settings) -> dict[str, Any]:
  """`done` (read from the marker `path`) when it belongs to this run, else UsageError."""
  wanted = dataclasses.asdict(settings)
  written = done.get("settings") or {}
  if written != wanted:
    changes = ", ".join(f"{key} {written.get(key, '(absent)')!r} -> {wanted.get(key, '(absent)')!r}"
                        for key in sorted(set(written) | set(wanted))
                        if written.get(key) != wanted.get(key))
    raise UsageError(f"{os.path.dirname(path) or '.'} holds records written with other settings "
                     f"({changes}, in {os.path.basename(path)}): rerun with the earlier flags and "
                     "config to resume, or ingest into a fresh --dst")
  if done.get("video_ids") != [it.video_id for it in chunk]:
    raise UsageError(f"{path}: lists other files than this run puts into {shard} (the source "
                     "folder changed): ingest into a fresh --dst")
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
    if reason:
      done["truncated"].append({"path": item.path, "reason": reason})
    done["entries"].append(dataclasses.asdict(records.VideoEntry(
        video_id=item.video_id, shard=shard, position=len(done["entries"]),
        num_frames=int(record["frames"].shape[0]), label=item.label, split=item.split,
        source=item.path)))
    yield record


def prepare_dst(dst: str) -> None:
  """Creates --dst or UsageError naming why it cannot be written (before any decoding)."""
  try:
    os.makedirs(dst, exist_ok=True)
  except OSError as error:
    raise UsageError(f"--dst={dst}: cannot create the folder ({error.strerror or error}); choose a "
                     "folder you can write to") from error
  if not os.access(dst, os.W_OK | os.X_OK):
    raise UsageError(f"--dst={dst}: the folder is not writable; choose a folder you can write to "
                     "or change its permissions")


def check_no_foreign_shards(dst: str, plan: Sequence[tuple[str, list[Item]]]) -> None:
  """UsageError when local `dst` holds finished shards this plan does not write (an earlier job
  with another --videos_per_shard, --split or file set): they would be left beside the new ones."""
  planned = {shard + DONE_SUFFIX for shard, _ in plan}
  foreign = sorted(name for name in os.listdir(dst)
                   if name.endswith(DONE_SUFFIX) and name not in planned)
  if foreign:
    raise UsageError(f"--dst={dst} holds {len(foreign)} shards of another job ({foreign[0]}, ...: "
                     "other --videos_per_shard, --split or source files): rerun with the earlier "
                     "flags to resume, or ingest into a fresh --dst")


def ingest(items: Sequence[Item], dst: str, settings: Settings, *, workers: int = 1,
           videos_per_shard: int = 32, meta: dict[str, Any] | None = None,
           listing: Listing | None = None, show_progress: bool = True) -> dict[str, Any]:
  """Converts `items` into shards + index.json in `dst`, resuming finished shards.

  `listing` (what --src held) completes the report with the rejected and ignored files. Returns
  the report (also written to `<dst>/ingest_report.json`).
  """
  import tqdm
  prepare_dst(dst)
  plan = plan_shards(items, videos_per_shard)
  check_no_foreign_shards(dst, plan)
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
  return _finish(dst, plan, settings, meta or {}, listing or Listing(files=[]))


def write_shard(dst: str, shard: str, chunk: Sequence[Item], settings: Settings,
                results: Iterator | None = None, progress=None) -> dict[str, Any]:
  """Writes `dst/shard` from `chunk` and then its finished-marker; returns the marker's content.

  `results` yields `_convert_or_reason` results for the chunk's items in order (a worker pool's);
  None converts them here, one after the other (what a Beam worker does).
  """
  if results is None:
    results = map(_convert_or_reason, [(item, settings) for item in chunk])
  done = {"settings": dataclasses.asdict(settings), "video_ids": [it.video_id for it in chunk],
          "entries": [], "failures": [], "skipped": [], "truncated": []}
  records.write_shard(os.path.join(dst, shard),
                      _shard_records(chunk, results, shard, done, progress))
  _write_json(_done_path(dst, shard), done)  # after the shard: marks it finished
  return done


def _finish(dst: str, plan, settings: Settings, meta: dict[str, Any],
            listing: Listing) -> dict[str, Any]:
  """Index and report from every shard's marker (a resumed run reports earlier shards too)."""
  dones = [_read_done(dst, shard, chunk, settings) for shard, chunk in plan]
  entries, index_meta, report = assemble(dones, settings, meta, listing)
  records.write_index(dst, entries, index_meta)
  _write_json(os.path.join(dst, REPORT_FILE), report)
  return report


def assemble(dones: Sequence[dict[str, Any]], settings: Settings, meta: dict[str, Any],
             listing: Listing) -> tuple[list[records.VideoEntry], dict[str, Any], dict[str, Any]]:
  """(index entries, index meta, report) from the shards' markers in shard-plan order.

  Every file of the listing lands in exactly one of ingested / failed / skipped / rejected /
  ignored: `files` is their sum. Truncated files are ingested ones, also named under `truncated`.
  """
  entries, failures, skipped, truncated = [], [], [], []
  for done in dones:
    entries += [records.VideoEntry(**e) for e in done["entries"]]
    failures += done["failures"]
    skipped += done["skipped"]
    truncated += done["truncated"]
  counts = {s: sum(e.split == s for e in entries) for s in records.SPLITS}
  index_meta = dict(meta, min_frames=settings.min_frames, missing_audio=settings.missing_audio,
                    truncation=settings.truncation, counts=counts)
  ignored = sum(listing.ignored.values())
  report = {
      "files": len(entries) + len(failures) + len(skipped) + len(listing.rejected) + ignored,
      "ingested": len(entries), "truncated": len(truncated), "failed": len(failures),
      "skipped": len(skipped), "rejected": len(listing.rejected), "ignored": ignored,
      "counts": counts, "failures": failures, "truncated_files": truncated,
      "skipped_files": skipped, "rejected_files": listing.rejected,
      "ignored_files": listing.ignored}
  return entries, index_meta, report


# -------------------------------------------------------------------------------------------------
# Command line.


def run_from_flags(config, *, src: str, dst: str, labels: str = "", split: str = "hash",
                   validation_fraction: float = 0.05, heldout_fraction: float = 0.05,
                   workers: int = 1, videos_per_shard: int = 32, missing_audio: str = "error",
                   min_frames: int = 0, strict: bool = False, config_file: str = "",
                   show_progress: bool = True) -> dict[str, Any]:
  """The CLI's job as a function (also what tests and Beam's comparison call)."""
  listing = list_sources(src, dst)
  items, settings, meta = plan_job(
      config, src=src, dst=dst, labels=labels, split=split,
      validation_fraction=validation_fraction, heldout_fraction=heldout_fraction,
      videos_per_shard=videos_per_shard, missing_audio=missing_audio, min_frames=min_frames,
      strict=strict, config_file=config_file, listing=listing)
  return ingest(items, dst, settings, workers=workers, videos_per_shard=videos_per_shard, meta=meta,
                listing=listing, show_progress=show_progress)


def plan_job(config, *, src: str, dst: str, labels: str, split: str, validation_fraction: float,
             heldout_fraction: float, videos_per_shard: int, missing_audio: str,
             min_frames: int, listing: Listing, strict: bool = False, config_file: str = ""
             ) -> tuple[list[Item], Settings, dict[str, Any]]:
  """Checks the flags and plans the job: (items in shard order, settings, index meta).

  `listing` is what --src holds (`list_sources`; Beam lists remote folders itself). The index
  meta carries `records.geometry` of the config (`config_file`: the --config path, for messages).
  """
  if missing_audio not in ("error", "skip", "silence"):
    raise UsageError(f"--missing_audio={missing_audio}: expected error, skip or silence")
  if not 0 <= validation_fraction + heldout_fraction <= 1:
    raise UsageError("--validation_fraction + --heldout_fraction must lie in [0, 1]")
  if videos_per_shard <= 0:
    raise UsageError(f"--videos_per_shard={videos_per_shard}: expected a positive count")
  if "://" not in src and "://" not in dst and _inside(dst, src) == ".":
    raise UsageError(f"--dst={dst} is --src itself: give an output folder of its own")
  settings = Settings(fps=float(config.data.fps), image_size=int(config.data.image_size),
                      sample_rate=int(config.audio.sample_rate),
                      min_frames=int(min_frames or config.data.num_frames),
                      missing_audio=missing_audio,
                      max_seconds=float(config.data.max_video_seconds),
                      truncation="fail" if strict else "keep")
  files = listing.files
  if not files:
    examples = "; ".join(f"{os.path.basename(r['path'])}: {r['reason']}"
                         for r in listing.rejected[:3])
    raise UsageError(f"--src={src}: no media files among its {listing.total} files "
                     f"({len(listing.rejected)} rejected by content"
                     f"{': ' + examples if examples else ''}; {sum(listing.ignored.values())} "
                     "hidden or ingest output): point --src at the media")
  items, class_names = make_items(files, labels=labels, split=split,
                                  validation_fraction=validation_fraction,
                                  heldout_fraction=heldout_fraction)
  meta = {"source": src if "://" in src else os.path.abspath(src), "class_names": class_names,
          "num_classes": len(class_names) or len({it.label for it in items if it.label >= 0}),
          "labels": labels, "split": split, "validation_fraction": validation_fraction,
          "heldout_fraction": heldout_fraction,
          records.GEOMETRY_KEY: records.geometry(config, config_file)}
  return items, settings, meta


def summary(report: dict[str, Any]) -> str:
  counts = ", ".join(f"{split} {count}" for split, count in report["counts"].items())
  ignored = ", ".join(f"{count} {why}" for why, count in report["ignored_files"].items())
  lines = [f"{report['files']} files: ingested {report['ingested']} videos ({counts}; "
           f"{report['truncated']} truncated), failed {report['failed']}, skipped "
           f"{report['skipped']}, not media {report['rejected']}, ignored {report['ignored']}"
           f"{' (' + ignored + ')' if ignored else ''}"]
  lines += [f"  FAILED {f['path']}: {f['reason']}" for f in report["failures"]]
  lines += [f"  truncated {f['path']}: {f['reason']}" for f in report["truncated_files"]]
  lines += [f"  skipped {f['path']}: {f['reason']}" for f in report["skipped_files"]]
  lines += [f"  not media {f['path']}: {f['reason']}" for f in report["rejected_files"]]
  return "\n".join(lines)


def exit_status(report: dict[str, Any], strict: bool) -> int:
  """0 on success, 1 when nothing was ingested, 2 with --strict when any file failed or skipped."""
  if report["ingested"] == 0:
    return 1
  if strict and (report["failed"] or report["skipped"]):
    return 2
  return 0


def config_file_flag() -> str:
  """The path given to --config (without its ':preset'), for index.json's geometry."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  return config_flags.get_config_filename(absl_flags.FLAGS["config"]) or ""


def report_usage_error(program: str, error: UsageError) -> int:
  """Prints a usage error as one line on stderr; returns the CLI's exit status for it (2)."""
  print(f"{program}: error: {error}", file=sys.stderr)
  return 2


def main(argv) -> int:
  from absl import flags as absl_flags
  program = "mmldm_jax.data.ingest"
  flag = absl_flags.FLAGS
  try:
    if len(argv) > 1:
      raise UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag")
    if flag.config is None:
      raise UsageError("--config is required, e.g. --config=configs/landscape.py")
    report = run_from_flags(
        flag.config, src=flag.src, dst=flag.dst, labels=flag.labels, split=flag.split,
        validation_fraction=flag.validation_fraction, heldout_fraction=flag.heldout_fraction,
        workers=flag.workers, videos_per_shard=flag.videos_per_shard,
        missing_audio=flag.missing_audio, min_frames=flag.min_frames, strict=flag.strict,
        config_file=config_file_flag())
  except UsageError as error:
    return report_usage_error(program, error)
  print(summary(report))
  print(f"report: {os.path.join(flag.dst, REPORT_FILE)}")
  return exit_status(report, flag.strict)


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
  absl_flags.DEFINE_bool("strict", False, "Truncated files fail instead of giving their decodable "
                         "prefix, and the exit status is 2 if any file failed or was skipped.")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
