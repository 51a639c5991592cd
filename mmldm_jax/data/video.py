"""Video frames on the host: letterboxing, frame selection, and media I/O with PyAV.

Everything here is NumPy + PIL + PyAV and runs in the data pipeline or in tools, never under jit.

- `letterbox`: the reference's resize (longer side to `size`, bicubic, zero bars; not a crop).
- `to_float` / `to_uint8`: uint8 [0, 255] <-> float32 [-1, 1] (x / 127.5 - 1).
- `key_frame_indices`, `sample_target_indices`: which frames of a clip feed the video encoder and which
  are the diffusion decoder's targets (reference: videoaudiodataset_wclass.py).
- `resample_frame_indices`, `rotate_upright`: which decoded frames are shown at a fixed output rate
  (nearest by presentation time) and how they are turned upright.
- `sniff_media`, `identify_container`: what a file is by its first bytes (media container, text,
  image, ...), so a folder can be sorted before anything is decoded.
- `read_av`: decode a media file (audio at native rate) with the presentation times that ingestion
  needs to align the audio; a file that stops decoding early (truncated, damaged) gives its
  decodable prefix and says so. Frames either all at native size, or - the streaming mode ingestion uses,
  memory O(output frames x output size) - only the frames shown at a given rate, upright and
  letterboxed as they are decoded.
- `write_mp4` (H.264 + AAC) and `write_wav` (16-bit PCM), both atomic.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import wave
from fractions import Fraction

import av
import numpy as np
from PIL import Image


class MediaError(Exception):
  """A file that cannot be read as a video: `path` and a short `reason`."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------

def letterbox(frame: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: `frame` [H, W, 3] scaled (bicubic, PIL) so its longer side is `size`,
  centred on black. A wide frame gets bars at the top and bottom, a tall one at the sides."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f"letterbox: expected a uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}")
  height, width = frame.shape[:2]
  scale = size / max(height, width)
  new_height = min(size, max(1, int(round(height * scale))))
  new_width = min(size, max(1, int(round(width * scale))))
  if (new_height, new_width) == (height, width):
    resized = frame
  else:
    resized = np.asarray(Image.fromarray(frame).resize((new_width, new_height), Image.BICUBIC))
  canvas = np.zeros((size, size, 3), np.uint8)
  top, left = (size - new_height) // 2, (size - new_width) // 2
  canvas[top:top + new_height, left:left + new_width] = resized
  return canvas


def resample_frame_indices(frame_times: np.ndarray, fps: float) -> np.ndarray:
  """Indices of the decoded frames shown at the output times k / fps (from the first frame).

  `frame_times` are presentation times in seconds (increasing). The video lasts from its first
  frame to the end of its last one (last time + the median frame interval); output frame k exists
  while k / fps lies inside that span, and takes the decoded frame nearest in time (the earlier one
  on a tie).
  """
  times = np.asarray(frame_times, np.float64) - float(frame_times[0])
  count = _output_frame_count(times, fps)
  targets = np.arange(count) / fps
  after = np.clip(np.searchsorted(times, targets, side="left"), 0, times.shape[0] - 1)
  before = np.clip(after - 1, 0, None)
  take_before = np.abs(targets - times[before]) <= np.abs(times[after] - targets)
  return np.where(take_before, before, after)


def _output_frame_count(relative_times: np.ndarray, fps: float) -> int:
  """Output frames at `fps` of a video whose sorted frame times (from its first frame) are given."""
  if relative_times.shape[0] > 1:
    interval = float(np.median(np.diff(relative_times)))
  else:
    interval = 1.0 / fps
  duration = relative_times[-1] + interval
  return int(np.ceil(duration * fps - 1e-6))


def rotate_upright(frames: np.ndarray, rotation: float) -> np.ndarray:
  """Turns [T, H, W, C] frames upright.

  `rotation` is `read_av`'s display-matrix angle in degrees (counter-clockwise, FFmpeg's
  convention, a multiple of 90).
  """
  quarter_turns = int(round(float(rotation) / 90.0))
  if abs(float(rotation) - 90.0 * quarter_turns) > 1.0:
    raise ValueError(f"rotation {rotation} degrees: only multiples of 90 are supported")
  quarter_turns %= 4
  return np.rot90(frames, k=quarter_turns, axes=(1, 2)) if quarter_turns else frames


def to_float(frames: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] as x / 127.5 - 1 (the reference's normalisation)."""
  return np.asarray(frames, np.float32) / 127.5 - 1.0


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8, rounding to the nearest level and clipping out-of-range values."""
  levels = (np.asarray(frames, np.float32) + 1.0) * 127.5
  return np.clip(np.round(levels), 0, 255).astype(np.uint8)


def key_frame_indices(num_frames_available: int, key_frames) -> np.ndarray:
  """int32 indices of the encoder's key frames in a clip of `num_frames_available` frames.

  The configured `key_frames` (data.key_frames, reference [0, 5, 10, 15]) when the clip reaches the
  last of them; otherwise the reference's short-clip rule [0, n // 3, 2n // 3, n - 1].
  """
  if num_frames_available <= 0:
    raise ValueError(f"key_frame_indices: expected a positive frame count, got {num_frames_available}")
  key_frames = np.asarray(key_frames, np.int32)
  if key_frames.size and num_frames_available > int(key_frames.max()):
    return key_frames
  n = num_frames_available
  return np.asarray([0, n // 3, 2 * n // 3, n - 1], np.int32)


def sample_target_indices(rng: np.random.Generator, num_frames: int,
                          count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` target frames drawn uniformly WITH replacement and sorted (reference rule).

  Returns (int32 indices, float32 indices / num_frames in [0, 1)); the normalised index is what the
  decoder's frame-index embedding sees.
  """
  if num_frames <= 0 or count <= 0:
    raise ValueError(f"sample_target_indices: expected positive num_frames and count, got "
                     f"{num_frames} and {count}")
  indices = np.sort(rng.integers(0, num_frames, size=count)).astype(np.int32)
  return indices, (indices / num_frames).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# What a file is, by content
# ----------------------------------------------------------------------------------------------

HEAD_BYTES = 512  # enough for every signature below (an MPEG-TS sync byte repeats at 188)

# (name, test on the first HEAD_BYTES bytes) of the containers FFmpeg reads that a media collection
# holds in practice. Order matters only where tests could overlap (none do).
_MEDIA_SIGNATURES = (
  ("mp4/mov", lambda h: h[4:8] == b"ftyp"),
  ("mov", lambda h: h[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")),
  ("matroska/webm", lambda h: h[:4] == b"\x1aE\xdf\xa3"),
  ("avi", lambda h: h[:4] == b"RIFF" and h[8:12] == b"AVI "),
  ("wav", lambda h: h[:4] in (b"RIFF", b"RF64") and h[8:12] == b"WAVE"),
  ("ogg", lambda h: h[:4] == b"OggS"),
  ("flv", lambda h: h[:3] == b"FLV"),
  ("mpeg-ps", lambda h: h[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")),
  ("mpeg-ts", lambda h: len(h) > 376 and h[0] == h[188] == h[376] == 0x47),
  ("asf/wmv", lambda h: h[:8] == b"0&\xb2u\x8ef\xcf\x11"),
  ("flac", lambda h: h[:4] == b"fLaC"),
  ("aiff", lambda h: h[:4] == b"FORM" and h[8:12] in (b"AIFF", b"AIFC")),
  ("caf", lambda h: h[:4] == b"caff"),
  ("realmedia", lambda h: h[:4] == b".RMF"),
  ("y4m", lambda h: h[:10] == b"YUV4MPEG2 "),
  ("nut", lambda h: h[:24] == b"nut/multimedia container"),
  ("mp3/adts", lambda h: h[:3] == b"ID3" or (len(h) > 1 and h[0] == 0xFF and h[1] & 0xE0 == 0xE0)),
)
# Common files that are certainly not sounding videos.
_OTHER_SIGNATURES = (
  ("PNG image", lambda h: h[:8] == b"\x89PNG\r\n\x1a\n"),
  ("JPEG image", lambda h: h[:3] == b"\xff\xd8\xff"),
  ("WebP image", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
  ("TIFF image", lambda h: h[:4] in (b"II*\x00", b"MM\x00*")),
  ("PDF document", lambda h: h[:5] == b"%PDF-"),
  ("zip archive", lambda h: h[:4] == b"PK\x03\x04"),
  ("gzip archive", lambda h: h[:2] == b"\x1f\x8b"),
)
# FFmpeg demuxers that open still images and text (its 'tty' demuxer renders text as a video).
_STILL_IMAGE_FORMATS = ("image2",)
_TEXT_FORMATS = ("tty",)


def identify_container(head: bytes) -> str | None:
  """The media container `head` (a file's first bytes) starts like, or None."""
  for name, matches in _MEDIA_SIGNATURES:
    if matches(head):
      return name
  return None


def _looks_like_text(head: bytes) -> bool:
  if b"\x00" in head:
    return False
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as error:
    # A multi-byte character cut by the head's end is still text.
    if error.start < len(head) - 3:
      return False
  controls = sum(byte < 32 and byte not in (9, 10, 12, 13) for byte in head)
  return controls <= len(head) // 100


def sniff_media(head: bytes, size: int) -> str:
  """'' when a file of `size` bytes starting with `head` may be audio/video, else why it is not.

  Media container signatures win; then empty files, text and common non-media formats (images,
  documents, archives) are named. Anything else is left to the decoder (FFmpeg reads far more
  formats than are listed here), which names it when it cannot open it.
  """
  if identify_container(head) is not None:
    return ""
  if size == 0:
    return "empty file (0 bytes)"
  for name, matches in _OTHER_SIGNATURES:
    if matches(head):
      return f"not a media file: a {name}"
  if _looks_like_text(head):
    return "not a media file: text"
  return ""


def _mp4_missing_index(path: str, size: int) -> str:
  """Why an mp4/mov that FFmpeg cannot open is unusable, from its top-level boxes ('' unknown).

  The index ('moov' box) of a file written by a plain muxer comes after the media data, so a
  file cut short loses it and nothing in it can be decoded.
  """
  offset, boxes = 0, []
  with open(path, "rb") as handle:
    while offset + 8 <= size:
      handle.seek(offset)
      header = handle.read(16)
      length, kind = int.from_bytes(header[:4], "big"), header[4:8]
      if length == 1 and len(header) == 16:
        length = int.from_bytes(header[8:16], "big")
      elif length == 0:
        length = size - offset
      if length < 8:
        return ""
      boxes.append(kind)
      if offset + length > size:
        if b"moov" not in boxes:
          name = kind.decode("latin-1")
          return (f"truncated: nothing decodable (the mp4 index 'moov' is missing; the file "
                  f"stops {offset + length - size} bytes short of the end of its '{name}' box)")
        return ""
      offset += length
  if b"moov" not in boxes:
    return "unreadable container (mp4/mov): no index ('moov' box)"
  return ""


def _describe_unopenable(path: str, error: Exception) -> str:
  """The reason a file FFmpeg could not open is unusable: by its content, else FFmpeg's words."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
      head = handle.read(HEAD_BYTES)
  except OSError as read_error:
    return f"cannot open: {read_error.strerror or read_error}"
  message = getattr(error, "strerror", None) or str(error)
  container = identify_container(head)
  if container is None:
    return sniff_media(head, size) or (
        f"not a media file: FFmpeg recognises no audio or video format in it ({message})")
  if container in ("mp4/mov", "mov"):
    reason = _mp4_missing_index(path, size)
    if reason:
      return reason
  return f"unreadable container ({container}): {message}"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MediaData:
  """A decoded media file. Times are seconds relative to the container's start time (the
  earliest stream start), so `frame_times[0]` and `audio_start` can be compared directly.

  frames         uint8 [T, H, W, 3]. read_av(path): every decoded frame in decode order, stored
                 orientation and native size (see `rotation`). read_av(path, fps=, image_size=):
                 the output frames at `output_fps`, upright and letterboxed to image_size.
  frame_times    float64 [T], presentation time of each frame in `frames` (pts * time_base -
                 container start); in the streaming mode the times of the decoded frames shown,
                 so frame_times[0] is the earliest frame of the file
  output_fps     None for all decoded frames, else the rate `frames` were resampled to
  decoded_frames how many video frames the file decoded to (= T when output_fps is None)
  video_start    seconds, the video stream's declared start (falls back to the first frame's time)
  fps            the stream's average frame rate (frames / duration), None when it declares none
  audio          float32 [channels, N] in [-1, 1] as the decoder returns it, or None (no audio)
  sample_rate    native audio rate (0 when there is no audio)
  audio_start    seconds, presentation time of audio sample 0: sample k plays at
                 audio_start + k / sample_rate (gaps between decoded frames are filled with silence
                 and overlaps dropped, so this holds for the whole track). AAC: when the mp4 edit
                 list says so, FFmpeg drops the encoder's priming samples and sample 0 is the first
                 real one; otherwise the priming (silence) is returned with earlier timestamps,
                 e.g. 16 kHz audio written to start at 0.3 s decodes from 0.236 s (1024 priming
                 samples first). The end can carry up to one 1024-sample frame of padding: trim
                 to the wanted duration.
  audio_repaired_samples  samples of silence inserted into gaps plus samples dropped from overlaps
                 (0 for a clean file; ingestion may want to count or skip files where it is not)
  declared_seconds  the length the container declares, from its start (None when it declares none)
  truncation     '' when every stream decoded to its declared end; otherwise what was decodable,
                 e.g. 'only 1.8 s of 4.0 s decodable (decoding stopped: ...)'. The frames and
                 audio are then the decodable prefix.
  rotation       degrees from the display matrix. With output_fps None the frames need
                 rotate_upright(frames, rotation) (np.rot90 counter-clockwise, FFmpeg's
                 convention); streaming-mode frames are already upright.
  video_codec, audio_codec   decoder names ('h264', 'aac', ...; audio_codec '' without audio)
  """
  path: str
  frames: np.ndarray
  frame_times: np.ndarray
  video_start: float
  fps: float | None
  audio: np.ndarray | None
  sample_rate: int
  audio_start: float
  audio_repaired_samples: int
  rotation: int
  video_codec: str
  audio_codec: str
  output_fps: float | None = None
  decoded_frames: int = 0
  declared_seconds: float | None = None
  truncation: str = ""

  @property
  def duration(self) -> float:
    """Seconds from the first frame to the end of the last (using the median frame interval)."""
    if self.output_fps:
      return len(self.frames) / self.output_fps
    if len(self.frame_times) < 2:
      return 1.0 / self.fps if self.fps else 0.0
    interval = float(np.median(np.diff(self.frame_times)))
    return float(self.frame_times[-1] - self.frame_times[0]) + interval


def _seconds(value, time_base) -> float | None:
  if value is None or time_base is None:
    return None
  return float(value * time_base)


def read_av(path: str, *, fps: float | None = None, image_size: int | None = None,
            max_seconds: float | None = None, audio_layout: str | None = None) -> MediaData:
  """Decodes the video frames and the first audio stream of `path`.

  Without `fps` / `image_size`: every frame, RGB at native size (memory T x H x W x 3 bytes: a
  20 s 1080p60 file is 7.5 GB). With both (the streaming mode ingestion uses): only the frames
  shown at `fps` - `resample_frame_indices` on the presentation-time-sorted frames, the earliest
  frame is output frame 0 - turned upright and letterboxed to `image_size` as they are decoded.
  The result is identical to decoding everything and then resampling, rotating and letterboxing,
  and memory is about (output frames + 2 native frames) x frame size. A file whose frame times
  are not non-decreasing in decode order (a broken muxer) is decoded twice: first for the times,
  then for the frames they select.

  `audio_layout` (e.g. 'mono') converts the audio with libswresample's standard matrix as it is
  decoded: for 5.1 to mono that is ITU-R BS.775's 1/sqrt(2) (front L, R), 1 (centre), 1/2
  (surrounds), LFE dropped, not normalised (a loud mix can exceed 1: clip it when storing). None
  keeps the stream's channels.

  A file that stops decoding before its declared end - cut short, or a demuxer/decoder error part
  way - gives the frames and audio decoded until then and says so in `truncation` (the same rule
  for every container: mp4 whose index survived, mkv, webm, ...).

  Raises MediaError(path, reason) for a missing or unreadable file (reasons from the content:
  'empty file (0 bytes)', 'not a media file: text', 'truncated: nothing decodable (...)' for an mp4
  that lost its index, 'unreadable container (matroska/webm): ...', 'cannot open: ...'), a still
  image, a file with no video stream ('no video stream (audio only: aac)'), a stream that decodes to
  nothing ('no frames decoded', 'decode error before the first video frame: ...'), and, with
  `max_seconds`, for frame times spanning longer than that (a timestamp jump would make the
  resampled video that long).
  """
  path = str(path)
  if (fps is None) != (image_size is None):
    raise ValueError(f"read_av {path}: give both fps and image_size (streaming) or neither, got "
                     f"fps={fps}, image_size={image_size}")
  if fps is not None and not (fps > 0 and image_size > 0):
    raise ValueError(f"read_av {path}: expected positive fps and image_size, got {fps}, "
                     f"{image_size}")
  with _open(path) as container:
    _check_streams(path, container)
    video_stream = container.streams.video[0]
    audio_stream = container.streams.audio[0] if container.streams.audio else None
    container_start = (container.start_time or 0) / av.time_base
    audio_track = (_AudioTrack(audio_stream, container_start, audio_layout)
                   if audio_stream is not None else None)
    picker = _StreamingPicker(fps, image_size) if fps is not None else None
    frames, frame_times, rotation, stops = [], [], 0, []
    for frame, time in _decode_video(path, container, video_stream, audio_track, container_start,
                                     stops):
      if not frame_times:
        rotation = int(frame.rotation)
      frame_times.append(time)
      if picker is None:
        frames.append(frame.to_ndarray(format="rgb24"))
      else:
        picker.add(frame, time, rotation)
    try:
      audio = audio_track.finish() if audio_track is not None else None
    except av.FFmpegError as error:
      raise MediaError(path, f"audio conversion error: {_ffmpeg_message(error)}") from error
    if not frame_times:
      if stops:
        raise MediaError(path, f"decode error before the first video frame: {stops[0]}")
      raise MediaError(path, "no frames decoded")
    span = max(frame_times) - min(frame_times)
    if max_seconds is not None and span > max_seconds:
      raise MediaError(path, f"frame times span {span:.1f} s, more than the {max_seconds:g} s "
                       f"allowed (data.max_video_seconds): a timestamp jump, or a longer video "
                       f"than expected")
    declared_start = _seconds(video_stream.start_time, video_stream.time_base)
    video_start = (declared_start - container_start if declared_start is not None
                   else frame_times[0])
    decoded_frames = len(frame_times)
    declared_seconds = container.duration / av.time_base if container.duration else None
    truncation = _truncation(
        container, video_stream, audio_stream, container_start, frame_times,
        audio_track.start + audio.shape[1] / audio_track.rate if audio is not None else None,
        declared_seconds, stops)
    if picker is None:
      frames, frame_times = np.stack(frames), np.asarray(frame_times, np.float64)
    else:
      picks = picker.picks(rotation)
      missing = picker.missing(picks)
      if missing:
        _decode_again(path, missing, picker, rotation, frame_times, container_start, len(stops))
      frames = np.stack([picker.images[index] for index in picks])
      frame_times = np.asarray(frame_times, np.float64)[picks]
    return MediaData(
        path=path, frames=frames, frame_times=frame_times, video_start=float(video_start),
        fps=float(video_stream.average_rate) if video_stream.average_rate else None,
        audio=audio, sample_rate=int(audio_stream.rate) if audio is not None else 0,
        audio_start=audio_track.start if audio is not None else 0.0,
        audio_repaired_samples=audio_track.repaired if audio is not None else 0,
        rotation=rotation, video_codec=video_stream.codec_context.name,
        audio_codec=audio_stream.codec_context.name if audio is not None else "",
        output_fps=float(fps) if fps is not None else None, decoded_frames=decoded_frames,
        declared_seconds=declared_seconds, truncation=truncation)


def _ffmpeg_message(error: Exception) -> str:
  """FFmpeg's words for an error, without PyAV's errno and path decoration."""
  message = getattr(error, "strerror", None) or str(error)
  origin = getattr(error, "log", None)
  if origin and len(origin) > 2 and origin[2]:  # the library's own log line, when PyAV kept it
    message = f"{message} ({str(origin[2]).strip()})"
  return message


def _open(path: str):
  try:
    return av.open(path)
  except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
    raise MediaError(path, _describe_unopenable(path, error)) from error


def _check_streams(path: str, container) -> None:
  """MediaError unless `container` holds a video stream that is more than a still image or text."""
  format_names = set(container.format.name.split(","))
  if format_names & set(_TEXT_FORMATS):
    raise MediaError(path, "not a media file: text")
  if format_names & set(_STILL_IMAGE_FORMATS) or container.format.name.endswith("_pipe"):
    raise MediaError(path, f"a still image ({container.format.name}), not a video")
  if not container.streams.video:
    audio = [stream.codec_context.name for stream in container.streams.audio]
    detail = f" (audio only: {', '.join(audio)})" if audio else ""
    raise MediaError(path, f"no video stream{detail}")


def probe_streams(path: str) -> str:
  """'' when `path` opens as a video (a video stream that is not a still image), else why not
  (read_av's reasons, e.g. 'no video stream (audio only: aac)'). Reads only the headers."""
  try:
    with _open(path) as container:
      _check_streams(path, container)
  except MediaError as error:
    return error.reason
  return ""


def _decode_video(path: str, container, video_stream, audio_track, container_start: float,
                  stops: list[str]):
  """Yields (video frame, presentation time in s) in decode order; audio goes to `audio_track`.

  A demuxer or decoder error ends the file there (what follows a damaged packet of a cut file is
  not worth guessing at): its message is appended to `stops`, and the frames the video decoder
  still holds are yielded, so the result is the file's decodable prefix.
  """
  video_stream.thread_type = "AUTO"
  streams = [video_stream] + ([audio_track.stream] if audio_track is not None else [])
  count = 0
  try:
    for packet in container.demux(streams):
      for frame in packet.decode():
        if packet.stream is not video_stream:
          audio_track.add(frame)
          continue
        count += 1
        yield frame, _frame_time(path, frame, count, video_stream) - container_start
  except av.FFmpegError as error:
    stops.append(_ffmpeg_message(error))
    try:
      held = video_stream.decode(None)  # drain the frames already inside the decoder
    except av.FFmpegError as flush_error:
      stops.append(_ffmpeg_message(flush_error))
      held = []
    for frame in held:
      count += 1
      yield frame, _frame_time(path, frame, count, video_stream) - container_start


_DURATION_TAG = re.compile(r"^(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


def _declared_end(stream, container_start: float, container_end: float | None) -> float | None:
  """Seconds from the container start to where `stream` says it ends (None: not declared).

  mp4/mov/avi declare a duration per stream; Matroska/WebM muxers write each track's end time as a
  'DURATION' tag; otherwise the container's length stands for every stream.
  """
  if stream.duration and stream.time_base is not None:
    start = stream.start_time if stream.start_time is not None else 0
    return float((start + stream.duration) * stream.time_base) - container_start
  match = _DURATION_TAG.match(str(stream.metadata.get("DURATION", "")).strip())
  if match:
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds) - container_start
  return container_end


def _truncation(container, video_stream, audio_stream, container_start: float,
                frame_times: list[float], audio_end: float | None,
                declared_seconds: float | None, stops: list[str]) -> str:
  """'' when every stream decoded to its declared end, else 'only X s of Y s decodable (...)'.

  X and Y count from the first frame. A stream counts as complete when it ends within
  max(0.25 s, 2 frame intervals) of its declared end: declared lengths are rounded by muxers, and
  the last frame's display time is estimated.
  """
  times = np.sort(np.asarray(frame_times, np.float64))
  interval = float(np.median(np.diff(times))) if times.shape[0] > 1 else (
      1.0 / float(video_stream.average_rate) if video_stream.average_rate else 0.0)
  first = float(times[0])
  tolerance = max(0.25, 2 * interval)
  decoded = [(video_stream, float(times[-1]) + interval)]
  if audio_stream is not None:
    decoded.append((audio_stream, audio_end if audio_end is not None else first))
  short, declared_ends = False, []
  for stream, end in decoded:
    declared = _declared_end(stream, container_start, declared_seconds)
    if declared is not None:
      declared_ends.append(declared)
      short = short or end < declared - tolerance
  decodable = max(0.0, min(end for _, end in decoded) - first)
  stopped = f" (decoding stopped: {stops[0]})" if stops else ""
  if declared_ends and (short or stops):
    return (f"only {decodable:.2f} s of {max(declared_ends) - first:.2f} s decodable"
            f"{stopped}")
  if stops:
    return f"decoding stopped after {decodable:.2f} s (length not declared){stopped}"
  return ""


def _decode_again(path: str, wanted: set[int], picker: "_StreamingPicker", rotation: int,
                  frame_times: list[float], container_start: float, first_stops: int) -> None:
  """Second pass over the video stream only: converts the frames `wanted` (decode indices).

  It must meet the first pass's frames in the same order and stop where that one stopped.
  """
  with _open(path) as container:
    video_stream = container.streams.video[0]
    index, stops = -1, []
    for index, (frame, time) in enumerate(
        _decode_video(path, container, video_stream, None, container_start, stops)):
      if index >= len(frame_times) or time != frame_times[index]:
        raise MediaError(path, f"decode error: frame {index} differs between two decodes")
      if index in wanted:
        picker.keep(index, frame, rotation)
  if bool(stops) != bool(first_stops) or index + 1 != len(frame_times):
    raise MediaError(path, f"decode error: {index + 1} frames on the second decode, "
                     f"{len(frame_times)} on the first")


class _StreamingPicker:
  """Keeps, while decoding, the frames `resample_frame_indices` will pick, converted to output form.

  For frames arriving in non-decreasing presentation time (every sane file), frame j is the
  nearest decoded frame for exactly the output times k / fps in (t[j-1], t[j]] (against j - 1) and,
  for the last frame, the times after it; so the choice for each output time is made when the
  frame after it arrives, and only the two latest decoded frames are held at native size. `picks`
  recomputes the selection from all times with `resample_frame_indices` itself, so the kept frames
  can only fall short (out-of-order times), never be wrong; `missing` says what a second decode must
  add.
  """

  def __init__(self, fps: float, image_size: int):
    self.fps = float(fps)
    self.image_size = int(image_size)
    self.times: list[float] = []
    self.images: dict[int, np.ndarray] = {}
    self.in_order = True
    self.next_target = 0    # first output frame k whose time k / fps lies after the latest frame
    self.previous = None    # (index, av.VideoFrame) of the frame before the latest one
    self.latest = None      # (index, av.VideoFrame) of the latest frame

  def add(self, frame, time: float, rotation: int) -> None:
    index = len(self.times)
    self.times.append(time)
    if not self.in_order or (index and time < self.times[index - 1]):
      self.in_order = False
      self.previous = self.latest = None
      return
    self.previous, self.latest = self.latest, (index, frame)
    relative = time - self.times[0]
    previous_relative = self.times[index - 1] - self.times[0] if index else relative
    while self.next_target / self.fps <= relative:
      target = self.next_target / self.fps
      self.next_target += 1
      if index and abs(target - previous_relative) <= abs(relative - target):
        self.keep(*self.previous, rotation)
      else:
        self.keep(index, frame, rotation)

  def keep(self, index: int, frame, rotation: int) -> None:
    """Stores frame `index` as an output frame: RGB, upright, letterboxed."""
    if index not in self.images:
      upright = rotate_upright(frame.to_ndarray(format="rgb24")[None], rotation)[0]
      self.images[index] = letterbox(np.ascontiguousarray(upright), self.image_size)

  def picks(self, rotation: int) -> np.ndarray:
    """Decode indices of the output frames (ingestion's rule: presentation-time order, stable).

    Also keeps the two held frames when picked (output times after the last frame take them).
    """
    times = np.asarray(self.times, np.float64)
    order = np.argsort(times, kind="stable")
    picks = order[resample_frame_indices(times[order], self.fps)]
    picked = set(picks.tolist())
    for held in (self.previous, self.latest):
      if held is not None and held[0] in picked:
        self.keep(*held, rotation)
    self.previous = self.latest = None
    return picks

  def missing(self, picks: np.ndarray) -> set[int]:
    """Picked frames not yet kept; drops kept frames that were not picked."""
    wanted = set(picks.tolist())
    for index in set(self.images) - wanted:
      del self.images[index]
    return wanted - set(self.images)


def _frame_time(path: str, frame, count: int, stream) -> float:
  """A frame's presentation time in seconds; frames without pts are placed at the stream rate."""
  if frame.pts is not None and frame.time_base is not None:
    return float(frame.pts * frame.time_base)
  if stream.average_rate:
    return (count - 1) / float(stream.average_rate)
  raise MediaError(path, "a video frame without a timestamp in a stream without a frame rate")


class _AudioTrack:
  """Collects decoded audio as float32 planar [C, N], placed by the frames' timestamps.

  Sample k of the result plays at `start + k / rate`. A decoded frame that starts later than the
  samples so far end leaves a gap, filled with silence; one that starts earlier overlaps, and its
  first samples are dropped. `repaired` counts the samples inserted or dropped (0 for clean files).
  """

  def __init__(self, stream, container_start: float, layout: str | None = None):
    self.stream = stream
    self.rate = int(stream.rate)
    self.container_start = container_start
    # libswresample converts the layout (its standard downmix matrix) and nothing else here.
    self.resampler = av.AudioResampler(format="fltp", layout=layout or stream.layout,
                                       rate=stream.rate)
    self.chunks: list[np.ndarray] = []
    self.length = 0
    self.start: float | None = None
    self.repaired = 0

  def add(self, frame) -> None:
    shift = 0
    if frame.pts is not None and frame.time_base is not None:
      time = float(frame.pts * frame.time_base) - self.container_start
      if self.start is None:
        self.start = time
      # More than a sample of disagreement is a gap (> 0) or an overlap (< 0).
      shift = int(round((time - self.start) * self.rate)) - self.length
      shift = shift if abs(shift) > 1 else 0
    for chunk in self.resampler.resample(frame):
      self._append(chunk.to_ndarray(), shift)
      shift = 0

  def _append(self, samples: np.ndarray, shift: int) -> None:
    if shift > 0:
      self.chunks.append(np.zeros((samples.shape[0], shift), np.float32))
      self.length += shift
    elif shift < 0:
      samples = samples[:, -shift:]
    self.repaired += abs(shift)
    self.chunks.append(samples.astype(np.float32))
    self.length += samples.shape[1]

  def finish(self) -> np.ndarray | None:
    for chunk in self.resampler.resample(None):
      self._append(chunk.to_ndarray(), 0)
    if not self.length:
      return None
    if self.start is None:
      self.start = 0.0
    return np.concatenate(self.chunks, axis=-1)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _atomic_target(path: str) -> str:
  """A temporary file next to `path` (same filesystem, so os.replace is atomic)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
  os.close(handle)
  # mkstemp creates the file 0600; give the result the permissions a normally created file would get.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(temporary, 0o666 & ~umask)
  return temporary


def _audio_channels_first(audio: np.ndarray) -> np.ndarray:
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  if audio.ndim != 2 or audio.shape[0] not in (1, 2):
    raise ValueError(f"expected audio float [N] or [C, N] with 1 or 2 channels, got {audio.shape}")
  return np.ascontiguousarray(np.clip(audio, -1.0, 1.0))


def write_mp4(path: str, frames: np.ndarray, fps, audio: np.ndarray | None = None,
              sample_rate: int | None = None, crf: int = 18) -> None:
  """Writes frames uint8 [T, H, W, 3] as H.264 (libx264, yuv420p) plus optional AAC audio.

  fps may be fractional (a float like 29.97 or a Fraction). yuv420p needs even sizes, so an odd
  height or width gets one more row / column at the bottom / right, a copy of the last one. audio: float [N] or [C, N] in
  [-1, 1] (mono or stereo) at `sample_rate`. The file is written next to `path` and renamed, so a
  crash never leaves a truncated `path`.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"write_mp4 {path}: expected uint8 frames [T, H, W, 3] with T > 0, got "
                     f"{frames.dtype} {frames.shape}")
  if audio is not None and not sample_rate:
    raise ValueError(f"write_mp4 {path}: audio given without sample_rate")
  rate = fps if isinstance(fps, Fraction) else Fraction(float(fps)).limit_denominator(10_000)
  if rate <= 0:
    raise ValueError(f"write_mp4 {path}: expected a positive fps, got {fps}")
  height, width = frames.shape[1:3]
  pad_bottom, pad_right = height % 2, width % 2
  if pad_bottom or pad_right:
    # Repeat the edge (not black): 4:2:0 chroma is shared by 2x2 blocks, so a black pad would bleed
    # into the last real row / column.
    frames = np.pad(frames, ((0, 0), (0, pad_bottom), (0, pad_right), (0, 0)), mode="edge")
  temporary = _atomic_target(path)
  try:
    with av.open(temporary, mode="w", format="mp4") as container:
      video_stream = container.add_stream("libx264", rate=rate)
      video_stream.width, video_stream.height = frames.shape[2], frames.shape[1]
      video_stream.pix_fmt = "yuv420p"
      video_stream.options = {"crf": str(crf)}
      audio_stream = None
      if audio is not None:
        audio = _audio_channels_first(audio)
        layout = "mono" if audio.shape[0] == 1 else "stereo"
        audio_stream = container.add_stream("aac", rate=int(sample_rate), layout=layout)
      audio_writer = (_AudioWriter(container, audio_stream, audio, int(sample_rate))
                      if audio_stream is not None else None)
      for index, frame in enumerate(frames):
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts = index
        video_frame.time_base = 1 / rate
        container.mux(video_stream.encode(video_frame))
        if audio_writer is not None:  # interleave, so the muxer need not buffer a whole stream
          audio_writer.write_until((index + 1) / rate)
      container.mux(video_stream.encode(None))
      if audio_writer is not None:
        audio_writer.finish()
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


class _AudioWriter:
  """Feeds planar float audio [C, N] to an AAC stream in 1024-sample frames, in time order.

  `start_pts` (in samples) places the first sample later than the container start.
  """

  def __init__(self, container, stream, audio: np.ndarray, sample_rate: int, start_pts: int = 0):
    self.container, self.stream, self.audio = container, stream, audio
    self.sample_rate, self.start_pts, self.offset = sample_rate, start_pts, 0
    self.layout = "mono" if audio.shape[0] == 1 else "stereo"

  def write_until(self, seconds) -> None:
    chunk = 1024
    end = self.audio.shape[1]
    if seconds is not None:
      end = min(end, int(seconds * self.sample_rate) - self.start_pts)
    while self.offset < end:
      piece = np.ascontiguousarray(self.audio[:, self.offset:self.offset + chunk])
      frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=self.layout)
      frame.sample_rate = self.sample_rate
      frame.pts = self.start_pts + self.offset
      frame.time_base = Fraction(1, self.sample_rate)
      self.container.mux(self.stream.encode(frame))
      self.offset += piece.shape[1]

  def finish(self) -> None:
    self.write_until(None)
    self.container.mux(self.stream.encode(None))


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
  """Writes float audio [N] or [C, N] in [-1, 1] as 16-bit PCM WAV (values beyond +-1 are clipped).

  Atomic like `write_mp4`; uses only the standard library.
  """
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    audio = audio[None]
  if audio.ndim != 2:
    raise ValueError(f"write_wav {path}: expected audio [N] or [C, N], got {audio.shape}")
  pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
  temporary = _atomic_target(path)
  try:
    with wave.open(temporary, "wb") as handle:
      handle.setnchannels(pcm.shape[0])
      handle.setsampwidth(2)
      handle.setframerate(int(sample_rate))
      handle.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
