"""Tests of mmldm_jax.data.video: letterbox geometry, frame selection rules and the PyAV round trips."""
import os
import wave
from fractions import Fraction

import av
import numpy as np
import pytest

from mmldm_jax.data import video


# ------------------------------------------------------------------------------------------------
# Frames
# ------------------------------------------------------------------------------------------------

def test_letterbox_wide_frame_gets_bars_top_and_bottom():
  frame = np.full((100, 200, 3), (200, 100, 50), np.uint8)
  boxed = video.letterbox(frame, 64)
  assert boxed.shape == (64, 64, 3) and boxed.dtype == np.uint8
  # 200 -> 64 wide, 100 -> 32 high, centred: rows 16..47 hold the picture.
  assert np.all(boxed[:16] == 0) and np.all(boxed[48:] == 0)
  np.testing.assert_allclose(boxed[16:48].reshape(-1, 3).mean(0), (200, 100, 50), atol=1)


def test_letterbox_tall_frame_gets_bars_left_and_right_and_keeps_layout():
  frame = np.zeros((120, 40, 3), np.uint8)
  frame[:60] = 255                       # top half white, bottom half black
  boxed = video.letterbox(frame, 60)
  # 120 -> 60 high, 40 -> 20 wide, centred: columns 20..39 hold the picture.
  assert np.all(boxed[:, :20] == 0) and np.all(boxed[:, 40:] == 0)
  assert boxed[5:25, 22:38].min() >= 250
  assert boxed[35:55, 22:38].max() <= 5


def test_letterbox_keeps_a_frame_of_the_right_size_and_rejects_bad_input():
  frame = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(video.letterbox(frame, 32), frame)
  with pytest.raises(ValueError, match="uint8"):
    video.letterbox(frame.astype(np.float32), 32)


def test_float_conversion_round_trips_every_level():
  levels = np.arange(256, dtype=np.uint8)
  as_float = video.to_float(levels)
  assert as_float.dtype == np.float32
  assert as_float[0] == -1.0 and as_float[-1] == 1.0
  np.testing.assert_array_equal(video.to_uint8(as_float), levels)
  np.testing.assert_array_equal(video.to_uint8(np.array([-3.0, 3.0])), [0, 255])


def test_key_frames_follow_the_config_or_the_short_clip_rule():
  np.testing.assert_array_equal(video.key_frame_indices(16, (0, 5, 10, 15)), [0, 5, 10, 15])
  np.testing.assert_array_equal(video.key_frame_indices(40, (0, 5, 10, 15)), [0, 5, 10, 15])
  np.testing.assert_array_equal(video.key_frame_indices(10, (0, 5, 10, 15)), [0, 3, 6, 9])
  np.testing.assert_array_equal(video.key_frame_indices(1, (0, 5, 10, 15)), [0, 0, 0, 0])
  with pytest.raises(ValueError):
    video.key_frame_indices(0, (0, 5))


def test_target_frames_are_sorted_draws_with_replacement():
  rng = np.random.default_rng(0)
  indices, normalised = video.sample_target_indices(rng, 16, 2)
  assert indices.shape == (2,) and indices.dtype == np.int32 and normalised.dtype == np.float32
  draws = np.stack([video.sample_target_indices(rng, 4, 8)[0] for _ in range(50)])
  assert np.all(np.diff(draws, axis=1) >= 0)
  assert draws.min() == 0 and draws.max() == 3
  assert any(len(set(row)) < len(row) for row in draws)      # replacement: repeats occur
  indices, normalised = video.sample_target_indices(np.random.default_rng(5), 16, 6)
  np.testing.assert_allclose(normalised, indices / 16)
  again, _ = video.sample_target_indices(np.random.default_rng(5), 16, 6)
  np.testing.assert_array_equal(indices, again)


# ------------------------------------------------------------------------------------------------
# Media round trips
# ------------------------------------------------------------------------------------------------

def _moving_frames(num_frames, height, width):
  """A smooth gradient that brightens over time (easy for H.264, so the error bound is tight)."""
  ramp = np.linspace(0, 160, width)[None, None, :, None]
  frames = ramp + 4.0 * np.arange(num_frames)[:, None, None, None] + np.zeros((1, height, 1, 3))
  frames[..., 1] = 255 - frames[..., 1]
  return frames.clip(0, 255).astype(np.uint8)


def _peak_hz(signal, sample_rate):
  spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
  return np.argmax(spectrum) * sample_rate / len(signal)


@pytest.fixture(scope="module")
def written_clip(tmp_path_factory):
  """12.5 fps, odd width, with 1000 Hz mono audio at 16 kHz."""
  path = str(tmp_path_factory.mktemp("media") / "clip.mp4")
  frames = _moving_frames(20, 48, 63)
  sample_rate = 16000
  seconds = 20 / 12.5
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
  video.write_mp4(path, frames, 12.5, audio=audio, sample_rate=sample_rate)
  return path, frames, audio, sample_rate


def test_write_then_read_round_trip(written_clip):
  path, frames, audio, sample_rate = written_clip
  media = video.read_av(path)
  assert media.frames.shape == (20, 48, 64, 3)       # odd width padded to even
  pad_column = media.frames[:, :, 63].astype(np.float32)     # a copy of the last real column
  assert np.abs(pad_column - frames[:, :, 62]).mean() < 4.0
  assert media.fps == pytest.approx(12.5)
  np.testing.assert_allclose(media.frame_times, np.arange(20) / 12.5, atol=1e-6)
  assert media.duration == pytest.approx(1.6)
  assert media.video_start == pytest.approx(0.0)
  error = np.abs(media.frames[:, :, :63].astype(np.float32) - frames).mean()
  assert error < 2.0, error
  assert media.video_codec == "h264" and media.audio_codec == "aac"
  assert media.rotation == 0
  assert media.sample_rate == sample_rate
  assert media.audio.dtype == np.float32 and media.audio.shape[0] == 1
  # FFmpeg trims the AAC priming samples; whole 1024-sample frames may pad the end.
  assert len(audio) <= media.audio.shape[1] < len(audio) + 1024
  assert media.audio_start == pytest.approx(0.0, abs=1e-6)
  assert media.audio_repaired_samples == 0
  decoded = media.audio[0, :len(audio)]
  assert _peak_hz(decoded, sample_rate) == pytest.approx(1000, abs=2)
  # Sample k plays at audio_start + k / rate: the decoded sine is in phase with the one written.
  middle = slice(4000, 20000)
  assert np.corrcoef(decoded[middle], audio[middle])[0, 1] > 0.99


def test_fractional_fps_and_stereo_audio(tmp_path):
  path = str(tmp_path / "ntsc.mp4")
  frames = _moving_frames(6, 32, 32)
  t = np.arange(8000) / 44100
  stereo = np.stack([np.sin(2 * np.pi * 500 * t), np.sin(2 * np.pi * 1500 * t)]).astype(np.float32)
  video.write_mp4(path, frames, np.float32(30000 / 1001), audio=0.4 * stereo, sample_rate=44100)
  media = video.read_av(path)
  assert media.fps == pytest.approx(30000 / 1001, rel=1e-6)
  np.testing.assert_allclose(media.frame_times, np.arange(6) * 1001 / 30000, atol=1e-6)
  assert media.audio.shape[0] == 2 and media.sample_rate == 44100
  assert _peak_hz(media.audio[0, :8000], 44100) == pytest.approx(500, abs=6)
  assert _peak_hz(media.audio[1, :8000], 44100) == pytest.approx(1500, abs=6)


def test_video_without_audio(tmp_path):
  path = str(tmp_path / "silent.mp4")
  video.write_mp4(path, _moving_frames(3, 16, 16), 10)
  media = video.read_av(path)
  assert media.audio is None and media.sample_rate == 0 and media.audio_codec == ""
  assert media.frames.shape == (3, 16, 16, 3)


def _write_with_pyav(path, *, audio_start_seconds=None, rotation=None, with_video=True):
  """An mp4 written directly with PyAV: 20 frames at 10 fps, optional 700 Hz audio that starts at
  `audio_start_seconds`, optional display rotation."""
  sample_rate = 16000
  with av.open(path, "w", format="mp4") as container:
    if with_video:
      stream = container.add_stream("libx264", rate=10)
      stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv420p"
      if rotation is not None:
        stream.set_display_rotation(rotation)
    audio_stream = None
    if audio_start_seconds is not None:
      audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
    if with_video:
      for index in range(20):
        frame = av.VideoFrame.from_ndarray(np.full((16, 32, 3), index * 10, np.uint8),
                                           format="rgb24")
        frame.pts, frame.time_base = index, Fraction(1, 10)
        container.mux(stream.encode(frame))
      container.mux(stream.encode(None))
    if audio_stream is not None:
      start = int(round(audio_start_seconds * sample_rate))
      t = np.arange(sample_rate) / sample_rate
      tone = (0.5 * np.sin(2 * np.pi * 700 * t)).astype(np.float32)[None]
      for offset in range(0, sample_rate, 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, offset:offset + 1024]),
                                           format="fltp", layout="mono")
        frame.sample_rate, frame.time_base = sample_rate, Fraction(1, sample_rate)
        frame.pts = start + offset
        container.mux(audio_stream.encode(frame))
      container.mux(audio_stream.encode(None))


def test_audio_that_starts_late_is_placed_by_its_timestamps(tmp_path):
  path = str(tmp_path / "late_audio.mp4")
  _write_with_pyav(path, audio_start_seconds=0.3)
  media = video.read_av(path)
  assert media.video_start == pytest.approx(0.0)
  # The first decoded sample may be encoder priming (silence) placed before 0.3 s; what must hold is
  # that the tone's first sample plays at 0.3 s after the video start.
  onset = int(np.argmax(np.abs(media.audio[0]) > 0.05))
  onset_time = media.audio_start + onset / media.sample_rate - media.video_start
  assert onset_time == pytest.approx(0.3, abs=2 / media.sample_rate)
  assert media.audio_start - media.video_start == pytest.approx(0.3, abs=1024 / 16000 + 1e-6)
  assert media.audio_repaired_samples == 0


def test_gaps_in_the_audio_timestamps_are_filled_with_silence(tmp_path):
  """Matroska + 16-bit PCM keeps exact timestamps: blocks at samples 0, 1024, 4096 and 5120 leave a
  2048-sample hole that must stay a hole, so later samples keep their times."""
  path = str(tmp_path / "gap.mkv")
  rate = 8000
  with av.open(path, "w", format="matroska") as container:
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
    audio_stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
    for index in range(10):
      frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
      frame.pts, frame.time_base = index, Fraction(1, 10)
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    for start in (0, 1024, 4096, 5120):
      block = np.full((1, 1024), 16384, np.int16)
      frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
      frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), start
      container.mux(audio_stream.encode(frame))
    container.mux(audio_stream.encode(None))
  media = video.read_av(path)
  assert media.audio_codec == "pcm_s16le" and media.audio.shape == (1, 6144)
  assert media.audio_repaired_samples == 2048
  expected = np.full(6144, 0.5, np.float32)
  expected[2048:4096] = 0.0
  np.testing.assert_allclose(media.audio[0], expected, atol=1e-4)


def test_rotation_comes_from_the_display_matrix(tmp_path):
  path = str(tmp_path / "rotated.mp4")
  _write_with_pyav(path, rotation=90)
  media = video.read_av(path)
  assert media.rotation == 90
  assert media.frames.shape[1:3] == (16, 32)            # stored orientation, not rotated


def test_unreadable_files_raise_media_error_with_a_reason_from_their_content(tmp_path):
  text = tmp_path / "notes.mp4"
  text.write_text("this is not a video\n")
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  noise = tmp_path / "noise.mp4"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  audio_only = str(tmp_path / "audio_only.mp4")
  _write_with_pyav(audio_only, audio_start_seconds=0.0, with_video=False)
  cut = tmp_path / "cut.mp4"          # a plain mp4 keeps its index ('moov') at the end
  _write_with_pyav(str(cut), audio_start_seconds=0.0)
  cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])
  picture = tmp_path / "still.mp4"   # a PNG, whatever its name says
  from PIL import Image
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(picture, format="PNG")
  damaged_mkv = tmp_path / "damaged.mkv"
  damaged_mkv.write_bytes(b"\x1aE\xdf\xa3" + bytes(60))
  cases = [(str(text), "not a media file: text"), (str(empty), "empty file (0 bytes)"),
           (str(noise), "not a media file: FFmpeg recognises no audio or video format in it"),
           (audio_only, "no video stream (audio only: aac)"),
           (str(cut), "truncated: nothing decodable (the mp4 index 'moov' is missing; the file "
                      "stops "),
           (str(picture), "a still image (png_pipe), not a video"),
           (str(damaged_mkv), "unreadable container (matroska/webm): "),
           (str(tmp_path / "missing.mp4"), "cannot open: No such file or directory")]
  for path, reason in cases:
    with pytest.raises(video.MediaError) as caught:
      video.read_av(path)
    assert caught.value.path == path and caught.value.reason.startswith(reason), (
        path, caught.value.reason)
    assert path in str(caught.value)
    assert video.probe_streams(path) == caught.value.reason


@pytest.mark.parametrize("head, size, verdict", [
    (b"\x00\x00\x00\x20ftypisom" + bytes(20), 1000, ""),            # mp4 / m4a / mov
    (b"\x1aE\xdf\xa3" + bytes(20), 1000, ""),                        # Matroska / WebM
    (b"RIFF\x00\x00\x00\x00AVI LIST", 1000, ""),
    (b"OggS\x00\x02" + bytes(20), 1000, ""),
    (b"", 0, "empty file (0 bytes)"),
    (b"shot list: beach\nrain \xc3\xa9t\xc3", 30, "not a media file: text"),  # UTF-8, cut
    (b"\x89PNG\r\n\x1a\n" + bytes(20), 1000, "not a media file: a PNG image"),
    (b"%PDF-1.7\n" + bytes(20), 1000, "not a media file: a PDF document"),
    (b"\x00\x01\x02\x03\xfe\xff" * 10, 1000, ""),                    # unknown: the decoder decides
])
def test_sniffing_by_content(head, size, verdict):
  assert video.sniff_media(head, size) == verdict


def test_a_file_cut_short_gives_its_decodable_prefix(tmp_path):
  """The same rule in every container: frames and audio up to where decoding stops, and how much
  of the declared length that is."""
  frames = _moving_frames(30, 32, 32)
  t = np.arange(int(3.0 * 16000)) / 16000
  tone = (0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)
  path = tmp_path / "whole.mkv"
  with av.open(str(path), "w") as container:   # 3 s, 10 fps, MJPEG + PCM: every packet stands alone
    stream = container.add_stream("mjpeg", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
    audio_stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
    for index in range(30):
      frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
      frame.pts, frame.time_base = index, Fraction(1, 10)
      container.mux(stream.encode(frame))
      piece = tone[None, index * 1600:(index + 1) * 1600]
      audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(piece), format="flt",
                                               layout="mono")
      audio_frame.sample_rate, audio_frame.pts = 16000, index * 1600
      audio_frame.time_base = Fraction(1, 16000)
      container.mux(audio_stream.encode(audio_frame))
    container.mux(stream.encode(None))
    container.mux(audio_stream.encode(None))
  whole = video.read_av(str(path))
  assert whole.truncation == "" and whole.declared_seconds == pytest.approx(3.0, abs=0.01)
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  media = video.read_av(str(cut))
  decodable = float(media.truncation.split()[1])
  assert media.truncation == f"only {decodable:.2f} s of 3.00 s decodable"
  assert 1.0 < decodable < 2.0 and len(media.frames) in range(10, 20)
  np.testing.assert_array_equal(media.frames, whole.frames[:len(media.frames)])
  np.testing.assert_array_equal(media.audio, whole.audio[:, :media.audio.shape[1]])
  assert media.audio.shape[1] / 16000 == pytest.approx(decodable, abs=0.11)


def test_write_mp4_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "out.mp4"

  def failing_from_ndarray(*args, **kwargs):
    raise RuntimeError("encoder exploded")

  monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_from_ndarray)
  with pytest.raises(RuntimeError, match="exploded"):
    video.write_mp4(str(path), _moving_frames(2, 16, 16), 10)
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="uint8"):
    video.write_mp4(str(path), np.zeros((2, 16, 16, 3), np.float32), 10)


def test_write_wav_round_trip(tmp_path):
  path = str(tmp_path / "tone.wav")
  t = np.arange(4000) / 8000
  stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), -np.ones_like(t) * 2.0]).astype(np.float32)
  video.write_wav(path, stereo, 8000)
  with wave.open(path, "rb") as handle:
    assert handle.getnchannels() == 2 and handle.getsampwidth() == 2
    assert handle.getframerate() == 8000 and handle.getnframes() == 4000
    pcm = np.frombuffer(handle.readframes(4000), "<i2").reshape(-1, 2).T / 32767.0
  np.testing.assert_allclose(pcm[0], stereo[0], atol=1 / 32767)
  np.testing.assert_array_equal(pcm[1], -1.0)                 # clipped
  assert [name for name in os.listdir(tmp_path)] == ["tone.wav"]
