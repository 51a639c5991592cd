"""Ingestion of real media files: containers/codecs, broken and truncated files, files that are not
media, surround downmix, resume after a kill, command-line errors, alignment.

Fixtures are written with PyAV: 96x64 frames (a moving grey bar; white frames at "flash" instants)
and a quiet tone track with 1 kHz beeps at the same instants.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from conftest import CONFIGS, REPO_ROOT
from mmldm_jax import config_lib
from mmldm_jax.data import ingest
from mmldm_jax.data import pipeline
from mmldm_jax.data import records
from mmldm_jax.data import video

CONFIG_PATH = os.path.join(CONFIGS, "aist.py:tiny")
FLASHES = (0.55, 1.45)  # seconds after the video's first frame


def _frames(seconds: float, fps: float, flashes=FLASHES) -> np.ndarray:
  count = int(round(seconds * fps))
  frames = np.full((count, 64, 96, 3), 40, np.uint8)
  for index in range(count):
    frames[index, :, (index * 3) % 96] = 160  # a moving bar, so codecs have something to code
    if any(flash <= index / fps < flash + 0.12 for flash in flashes):
      frames[index] = 255
  return frames


def _audio(seconds: float, rate: int, start: float, flashes=FLASHES) -> np.ndarray:
  """Mono track over [start, seconds) of the video clock: a faint hum plus beeps at `flashes`."""
  times = start + np.arange(int(round((seconds - start) * rate))) / rate
  audio = 0.01 * np.sin(2 * np.pi * 110 * times)
  for flash in flashes:
    inside = (times >= flash) & (times < flash + 0.1)
    audio[inside] += 0.6 * np.sin(2 * np.pi * 1000 * (times[inside] - flash))
  return audio.astype(np.float32)


def write_media(path, *, video_codec="libx264", pix_fmt="yuv420p", audio_codec="aac", rate=44100,
                seconds=2.0, fps=25, audio_start=0.0, with_video=True, with_audio=True,
                stereo=False, container_options=None):
  """Writes a test file; the audio's first sample is presented `audio_start` s after frame 0.

  container_options: muxer options, e.g. {"movflags": "faststart"} (mp4 index first).
  """
  frame_rate = Fraction(fps).limit_denominator(1000)
  with av.open(str(path), "w", options=container_options or {}) as container:
    video_stream = audio_stream = None
    if with_video:
      video_stream = container.add_stream(video_codec, rate=frame_rate)
      video_stream.width, video_stream.height, video_stream.pix_fmt = 96, 64, pix_fmt
    if with_audio:
      audio_stream = container.add_stream(audio_codec, rate=rate,
                                          layout="stereo" if stereo else "mono")
    packets = []
    if with_video:
      for index, frame in enumerate(_frames(seconds, fps)):
        video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        video_frame.pts, video_frame.time_base = index, 1 / frame_rate
        packets += video_stream.encode(video_frame)
      packets += video_stream.encode(None)
    if with_audio:
      audio = _audio(seconds, rate, audio_start)
      audio = np.stack([audio, audio]) if stereo else audio[None]
      first = int(round(audio_start * rate))
      for offset in range(0, audio.shape[1], 1024):
        piece = np.ascontiguousarray(audio[:, offset:offset + 1024])
        audio_frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=audio_stream.layout)
        audio_frame.sample_rate = rate
        audio_frame.pts, audio_frame.time_base = first + offset, Fraction(1, rate)
        packets += audio_stream.encode(audio_frame)
      packets += audio_stream.encode(None)
    # Interleave by decode time (a stable sort keeps each stream's own order).
    def decode_time(packet):
      stamp = packet.dts if packet.dts is not None else packet.pts
      return float(stamp * packet.time_base) if stamp is not None else 0.0
    for packet in sorted(packets, key=decode_time):
      container.mux(packet)


VALID = {
    "mp4_h264_aac.mp4": dict(),
    "webm_vp9_opus.webm": dict(video_codec="libvpx-vp9", audio_codec="libopus", rate=48000),
    "mkv_mpeg4_flac.mkv": dict(video_codec="mpeg4", audio_codec="flac", rate=22050, stereo=True),
    "avi_mjpeg_pcm.avi": dict(video_codec="mjpeg", pix_fmt="yuvj420p", audio_codec="pcm_s16le",
                              rate=16000, fps=12),
    "mov_h264_pcm.mov": dict(audio_codec="pcm_s16le", fps=30),
    "late_audio.mp4": dict(audio_start=0.3),
    "vfr_like_24.mkv": dict(video_codec="mpeg4", audio_codec="aac", fps=24, seconds=2.5),
}
BROKEN = {  # file -> expected start of its reason (the decoder's verdict)
    "truncated.mp4": "truncated: nothing decodable (the mp4 index 'moov' is missing",
    "audio_only.mp4": "no video stream (audio only: aac)",
    "video_only.mp4": "no audio stream",
    "short.mp4": "too short: 10 frames < 16 (one clip at 10 fps)",
}
REJECTED = {  # file -> reason, decided from its first bytes before decoding
    "empty.mp4": "empty file (0 bytes)",
    "text.mp4": "not a media file: text",
}


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("media")
  for name, options in VALID.items():
    write_media(folder / name, **options)
  write_media(folder / "full.mp4")
  data = (folder / "full.mp4").read_bytes()
  (folder / "truncated.mp4").write_bytes(data[:len(data) // 3])
  (folder / "full.mp4").unlink()
  (folder / "empty.mp4").write_bytes(b"")
  (folder / "text.mp4").write_text("this is not a video\n")
  write_media(folder / "audio_only.mp4", with_video=False)
  write_media(folder / "video_only.mp4", with_audio=False)
  write_media(folder / "short.mp4", seconds=1.0)
  return str(folder)


@pytest.fixture(scope="module")
def config():
  return config_lib.load(CONFIG_PATH)


@pytest.fixture(scope="module")
def ingested(media_folder, config, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("ingested"))
  report = ingest.run_from_flags(config, src=media_folder, dst=dst, split="train",
                                 videos_per_shard=3, show_progress=False)
  return dst, report


def test_valid_files_ingested_broken_ones_reported(ingested, config):
  dst, report = ingested
  entries, meta = records.read_index(dst)
  assert sorted(e.video_id for e in entries) == sorted(os.path.splitext(n)[0] for n in VALID)
  reasons = {os.path.basename(f["path"]): f["reason"] for f in report["failures"]}
  assert sorted(reasons) == sorted(BROKEN)
  for name, words in BROKEN.items():
    assert reasons[name].startswith(words), (name, reasons[name])
  rejected = {os.path.basename(f["path"]): f["reason"] for f in report["rejected_files"]}
  assert rejected == REJECTED
  on_disk = json.load(open(os.path.join(dst, ingest.REPORT_FILE)))
  assert on_disk["failed"] == len(BROKEN) and on_disk["ingested"] == len(VALID)
  assert on_disk["rejected"] == len(REJECTED) and on_disk["truncated"] == 0
  assert on_disk["files"] == len(VALID) + len(BROKEN) + len(REJECTED) == len(os.listdir(
      os.path.dirname(report["failures"][0]["path"])))
  assert meta["geometry"] == {"fps": config.data.fps, "image_size": config.data.image_size,
                              "sample_rate": config.audio.sample_rate, "audio_channels": 1,
                              "config_name": "aist", "config_file": ""}
  assert meta["counts"]["train"] == len(VALID)
  for entry in entries:
    record = records.read_shard_record(os.path.join(dst, entry.shard), entry.position)
    records.validate_record(record)
    seconds = 2.5 if entry.video_id == "vfr_like_24" else 2.0
    assert entry.num_frames == record["frames"].shape[0] == int(seconds * config.data.fps)
    assert record["frames"].shape[1:] == (64, 64, 3)
    # Letterboxed 96x64 -> 64x43: black bars above and below.
    assert record["frames"][:, 0].max() == 0 and record["frames"][:, 32].mean() > 30
    assert record["audio"].shape[0] == int(seconds * config.audio.sample_rate)


def _onsets(batch_frames: np.ndarray, audio: np.ndarray, fps: float, rate: int):
  """(first white frame, frame of the first beep sample) of one clip."""
  brightness = batch_frames[:, 28:36].mean(axis=(1, 2, 3))
  flash = int(np.argmax(brightness > 0.9))
  beep = int(np.argmax(np.abs(audio) > 0.3))
  assert brightness.max() > 0.9 and np.abs(audio).max() > 0.3
  return flash, beep / rate * fps


def test_flash_and_beep_stay_together_through_the_pipeline(ingested, config):
  dst, _ = ingested
  with config.unlocked():
    config.data.data_dir = dst
  source = pipeline.clip_source(config, "train")
  dataset = pipeline.make_dataset(config, "train", batch_size=1, seed=0, frames=True,
                                  shuffle=False, num_epochs=1, hflip_prob=0.0)
  checked = set()
  for batch in dataset:
    start = int(batch["clip_start"][0])
    if start not in (0, 3):  # clip 0 holds the first flash at 5.5 frames, clip 3 at 2.5
      continue
    entry = source.videos.entries[int(batch["video_index"][0])]
    flash, beep = _onsets(batch["frames"][0], batch["audio"][0], config.data.fps,
                          config.audio.sample_rate)
    assert abs(flash - beep) <= 1.0, (entry.video_id, start, flash, beep)
    checked.add(entry.video_id)
  assert checked == {os.path.splitext(n)[0] for n in VALID}


def test_rotation_turns_frames_upright():
  frame = np.zeros((1, 2, 3, 3), np.uint8)
  frame[0, 0, 0] = 255  # top-left of a landscape frame
  upright = ingest.rotate_upright(frame, 90)  # stored turned clockwise: turn back counter-clockwise
  assert upright.shape == (1, 3, 2, 3)
  np.testing.assert_array_equal(upright, np.rot90(frame, 1, axes=(1, 2)))
  assert upright[0, 2, 0, 0] == 255
  np.testing.assert_array_equal(ingest.rotate_upright(frame, -270), upright)
  np.testing.assert_array_equal(ingest.rotate_upright(frame, 0), frame)
  with pytest.raises(ValueError, match="multiples of 90"):
    ingest.rotate_upright(frame, 45)


def test_rotated_file_comes_out_upright(tmp_path):
  upright = np.full((96, 64, 3), 40, np.uint8)  # portrait, as the camera saw it
  upright[:24, :16] = 255                       # marker at the top left
  stored = np.rot90(upright, k=-1)              # stored landscape; players turn it back 90 degrees
  path = str(tmp_path / "rotated.mp4")
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    stream.set_display_rotation(90)  # counter-clockwise, FFmpeg's display-matrix convention
    for index in range(20):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(stored), format="rgb24")
      frame.pts = index
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
  settings = ingest.Settings(fps=10.0, image_size=64, sample_rate=16000, min_frames=16,
                             missing_audio="silence")
  record = ingest.convert(ingest.Item(path, "rotated", -1, "train"), settings)
  frame = record["frames"][0].astype(int)
  # Upright 96x64 letterboxed to 64x43: bars left and right, the marker at the picture's top left.
  assert frame[:, :8].max() < 10 and frame[:, -8:].max() < 10
  assert frame[:12, 12:18].mean() > 200 and frame[-12:, 12:18].mean() < 80
  assert frame[:12, 40:50].mean() < 80


def test_frame_resampling_by_timestamps():
  # 30 fps with a 0.2 s hole (variable frame rate) -> 10 fps picks the nearest frames.
  times = np.concatenate([np.arange(0, 1.0, 1 / 30), np.arange(1.2, 2.0, 1 / 30)]) + 5.0
  picks = ingest.resample_frame_indices(times, 10.0)
  assert picks.shape == (20,)
  chosen = times[picks] - 5.0
  assert np.abs(chosen - np.arange(20) / 10).max() <= 0.1 + 1e-9
  assert np.abs(chosen[:10] - np.arange(10) / 10).max() < 1e-9


def test_audio_alignment_and_length():
  rate = 100
  audio = np.arange(1, 301, dtype=np.float32)[None] / 1000  # 3 s at 100 Hz
  late = ingest.align_audio(audio, rate, 0.5, 20, 10.0, rate)  # starts 0.5 s after the video
  assert late.shape == (200,) and not late[:50].any()
  np.testing.assert_allclose(late[50:], audio[0, :150])
  early = ingest.align_audio(audio, rate, -0.25, 20, 10.0, rate)  # 0.25 s before: dropped
  np.testing.assert_allclose(early, audio[0, 25:225])
  resampled = ingest.align_audio(np.ones((1, 300), np.float32) * 0.5, rate, 0.0, 20, 10.0, 50)
  assert resampled.shape == (100,) and abs(resampled[10:90].mean() - 0.5) < 1e-3
  with pytest.raises(ValueError, match="expected mono audio"):  # surround is downmixed by PyAV
    ingest.align_audio(np.ones((2, 300), np.float32), rate, 0.0, 20, 10.0, rate)


def test_labels_and_splits(tmp_path):
  files = [(f"/m/{c}/{i}.mp4", f"{c}/{i}.mp4") for c in ("rain", "fire") for i in range(40)]
  items, names = ingest.make_items(files, labels="folders", split="hash",
                                   validation_fraction=0.2, heldout_fraction=0.1)
  assert names == ["fire", "rain"]
  assert {it.label for it in items if it.video_id.startswith("rain/")} == {1}
  again, _ = ingest.make_items(files[::-1], labels="folders", split="hash",
                               validation_fraction=0.2, heldout_fraction=0.1)
  assert {it.video_id: it.split for it in items} == {it.video_id: it.split for it in again}
  assert {it.split for it in items} == set(records.SPLITS)
  mapping = tmp_path / "labels.csv"
  mapping.write_text("video_id,class\n" + "".join(f"{i},{i % 3}\n" for i in range(40)))
  flat = [(f"/m/{i}.mp4", f"{i}.mp4") for i in range(40)]
  items, names = ingest.make_items(flat, labels=str(mapping), split="train",
                                   validation_fraction=0, heldout_fraction=0)
  assert names == [] and [it.label for it in items][:4] == [0, 1, 2, 0]
  aist = [(f"/a/{n}.mp4", f"{n}.mp4") for n in (
      "gBR_sBM_c01_d04_mBR0_ch01", "gJS_sFM_c02_d02_mJS3_ch03", "gBR_sFM_c03_d05_mBR0_ch07")]
  items, names = ingest.make_items(aist, labels=r"pattern:_(m[A-Z]{2}\d)_", split="train",
                                   validation_fraction=0, heldout_fraction=0)
  assert names == ["mBR0", "mJS3"] and [it.label for it in items] == [0, 1, 0]
  with pytest.raises(ValueError, match="no match"):
    ingest.make_items(flat, labels=r"pattern:_(m[A-Z]{2}\d)_", split="train",
                      validation_fraction=0, heldout_fraction=0)
  with pytest.raises(ValueError, match="no class for video '0'"):
    (tmp_path / "labels.json").write_text(json.dumps({"1": "a"}))
    ingest.make_items(flat, labels=str(tmp_path / "labels.json"), split="train",
                      validation_fraction=0, heldout_fraction=0)


def _cli(src, dst, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "mmldm_jax.data.ingest", f"--src={src}", f"--dst={dst}",
       f"--config={CONFIG_PATH}", "--split=train", "--videos_per_shard=1", *extra],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.subprocess
def test_killed_job_resumes_to_the_clean_result(media_folder, ingested, tmp_path):
  dst = str(tmp_path / "resumed")
  job = _cli(media_folder, dst, "--strict")
  def finished_shards():
    if not os.path.isdir(dst):
      return []
    return [n for n in os.listdir(dst) if n.endswith(ingest.DONE_SUFFIX)]
  deadline = time.time() + 120
  while time.time() < deadline and not finished_shards() and job.poll() is None:
    time.sleep(0.01)
  job.send_signal(signal.SIGKILL)
  job.wait()
  assert not os.path.exists(os.path.join(dst, records.INDEX_FILE)), "the job ended before the kill"
  done_before = {n: os.path.getmtime(os.path.join(dst, n)) for n in os.listdir(dst)
                 if n.endswith(".array_record")}
  assert done_before

  rerun = _cli(media_folder, dst, "--workers=2", "--strict")
  output, _ = rerun.communicate(timeout=300)
  assert rerun.returncode == 2, output  # --strict: the broken files make the job fail
  assert "FAILED" in output and "ingested 7 videos" in output
  # Finished shards were not rewritten.
  for name, mtime in done_before.items():
    if os.path.exists(os.path.join(dst, name + ingest.DONE_SUFFIX)):
      assert os.path.getmtime(os.path.join(dst, name)) == mtime

  # Another job's settings in the same folder: refused before any work.
  with pytest.raises(ingest.UsageError, match=r"min_frames 16 -> 12.*fresh --dst"):
    ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=media_folder, dst=dst, split="train",
                          videos_per_shard=1, min_frames=12, strict=True, show_progress=False)
  with pytest.raises(ingest.UsageError, match="holds 11 shards of another job"):
    ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=media_folder, dst=dst, split="train",
                          videos_per_shard=2, strict=True, show_progress=False)

  clean = str(tmp_path / "clean")
  ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=media_folder, dst=clean, split="train",
                        videos_per_shard=1, strict=True, config_file=CONFIG_PATH,
                        show_progress=False)
  assert json.load(open(os.path.join(dst, records.INDEX_FILE))) == json.load(
      open(os.path.join(clean, records.INDEX_FILE)))
  assert json.load(open(os.path.join(dst, ingest.REPORT_FILE))) == json.load(
      open(os.path.join(clean, ingest.REPORT_FILE)))
  shards = sorted(n for n in os.listdir(clean) if n.endswith(".array_record"))
  assert shards == sorted(n for n in os.listdir(dst) if n.endswith(".array_record"))
  for name in shards:
    with open(os.path.join(dst, name), "rb") as a, open(os.path.join(clean, name), "rb") as b:
      assert a.read() == b.read(), name


def test_missing_audio_policies(media_folder, config):
  item = ingest.Item(path=os.path.join(media_folder, "video_only.mp4"), video_id="video_only",
                     label=-1, split="train")
  settings = dict(fps=10.0, image_size=64, sample_rate=16000, min_frames=16)
  with pytest.raises(ingest.IngestError, match="no audio stream") as error:
    ingest.convert(item, ingest.Settings(**settings, missing_audio="error"))
  assert not error.value.skipped
  with pytest.raises(ingest.IngestError) as error:
    ingest.convert(item, ingest.Settings(**settings, missing_audio="skip"))
  assert error.value.skipped
  record = ingest.convert(item, ingest.Settings(**settings, missing_audio="silence"))
  assert record["frames"].shape == (20, 64, 64, 3)
  assert record["audio"].shape == (32000,) and not record["audio"].any()


def test_synthetic_mp4_round_trip_keeps_sound_on_the_sample(tmp_path):
  """Synthetic videos written as H.264 + AAC mp4 and ingested: labels from the class folders, frames
  close to the generator's, and the audio lag against the generator's waveform under 1 ms (the AAC
  encoder's priming is removed, not shifted into the track)."""
  from mmldm_jax.data import synthetic
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  paths = synthetic.write_mp4_files(config, str(tmp_path / "media"), 2, seconds=2.0)
  report = ingest.run_from_flags(config, src=str(tmp_path / "media"), dst=str(tmp_path / "rec"),
                                 labels="folders", split="train", show_progress=False)
  assert report["ingested"] == 2 and report["failed"] == 0
  entries, meta = records.read_index(str(tmp_path / "rec"))
  assert meta["class_names"] == sorted({os.path.basename(os.path.dirname(p)) for p in paths})
  rate = config.audio.sample_rate
  for number, entry in enumerate(entries):
    original = synthetic.generate_video(synthetic.video_seed(config, number), number % max(
        config.synthetic.num_classes, 1), config, seconds=2.0)
    assert meta["class_names"][entry.label] == f"class_{original['label']}"
    got = records.read_shard_record(str(tmp_path / "rec" / entry.shard), entry.position)
    assert got["frames"].shape == original["frames"].shape
    assert np.abs(got["frames"].astype(int) - original["frames"]).mean() < 6
    a, b = got["audio"], original["audio"]
    lags = np.arange(-rate // 100, rate // 100 + 1)
    scores = [np.dot(a[max(0, l):len(a) + min(0, l)], b[max(0, -l):len(b) - max(0, l)])
              for l in lags]
    assert abs(lags[int(np.argmax(scores))]) <= rate // 1000, lags[int(np.argmax(scores))]
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_sources_from_a_folder_or_a_list(media_folder, tmp_path):
  found = ingest.list_media(media_folder)
  assert [rel for _, rel in found] == sorted(list(VALID) + list(BROKEN))
  listing = tmp_path / "files.txt"
  listing.write_text("# three files\n" + "".join(
      os.path.join(media_folder, n) + "\n" for n in ("webm_vp9_opus.webm", "avi_mjpeg_pcm.avi",
                                                     "text.mp4")) + "/no/such/file.mp4\n")
  sources = ingest.list_sources(str(listing))
  assert [rel for _, rel in sources.files] == ["avi_mjpeg_pcm.avi", "webm_vp9_opus.webm"]
  assert sources.rejected == [
      {"path": "/no/such/file.mp4", "reason": "listed in --src but not a file that exists"},
      {"path": os.path.join(media_folder, "text.mp4"), "reason": "not a media file: text"}]
  assert sources.total == 4
  with pytest.raises(ingest.UsageError, match="does not exist"):
    ingest.list_media(str(tmp_path / "missing"))


def _write_video_only(path, pts, *, codec="libx264", rotation=None, packet_pts=None):
  """Frames 96x64 (a moving bar, frame number in the corner) at `pts` (ms). `packet_pts(i, dts)`
  rewrites the stored times of intra-only codecs, e.g. to put them out of order."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream(codec, rate=30)
    stream.width, stream.height = 96, 64
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if rotation is not None:
      stream.set_display_rotation(rotation)
    packets = []
    for index, stamp in enumerate(pts):
      frame = np.full((64, 96, 3), 30, np.uint8)
      frame[:, (index * 5) % 96] = 200
      frame[:8, :8] = 4 * index % 256
      video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
      video_frame.pts, video_frame.time_base = int(stamp), Fraction(1, 1000)
      packets += stream.encode(video_frame)
    packets += stream.encode(None)
    for index, packet in enumerate(packets):
      if packet_pts is not None:
        packet.dts = index
        packet.pts = packet_pts(index, packet.dts)
      container.mux(packet)


def _decode_all_then_select(path, fps, image_size):
  """The non-streaming path: every frame at native size -> resample -> upright -> letterbox."""
  media = video.read_av(path)
  order = np.argsort(media.frame_times, kind="stable")
  picks = order[ingest.resample_frame_indices(media.frame_times[order], fps)]
  frames = ingest.rotate_upright(media.frames[picks], media.rotation)
  return media, np.stack([video.letterbox(frame, image_size) for frame in frames]), picks


@pytest.fixture(scope="module")
def unusual_timing_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("timing")
  rng = np.random.default_rng(3)
  jittered = np.cumsum(rng.integers(15, 70, 60))
  jittered[30:] += 300  # variable frame rate: jitter plus a 0.3 s hole
  _write_video_only(folder / "vfr_h264.mkv", jittered)
  _write_video_only(folder / "rotated_90.mp4", np.arange(40) * 40, rotation=90)
  # Stored times out of decode order (a broken muxer): some frames shown 0.24 s late, frame 0 too.
  _write_video_only(folder / "out_of_order.mkv", np.arange(50) * 40, codec="mjpeg",
                    packet_pts=lambda index, dts: dts + (6 if index % 7 in (0, 3) else 0))
  return folder


@pytest.mark.parametrize("fps", [10.0, 23.0])
def test_streaming_decode_equals_decode_all_then_select(media_folder, unusual_timing_folder, fps,
                                                        monkeypatch):
  second_decodes = []
  decode_again = video._decode_again
  monkeypatch.setattr(video, "_decode_again",
                      lambda path, *args: (second_decodes.append(os.path.basename(path)),
                                           decode_again(path, *args))[1])
  paths = [os.path.join(media_folder, name) for name in VALID]
  paths += [str(unusual_timing_folder / name) for name in sorted(os.listdir(unusual_timing_folder))]
  for path in paths:
    media, frames, picks = _decode_all_then_select(path, fps, 48)
    streamed = video.read_av(path, fps=fps, image_size=48)
    assert streamed.frames.shape == frames.shape, path
    np.testing.assert_array_equal(streamed.frames, frames, err_msg=path)
    np.testing.assert_array_equal(streamed.frame_times, media.frame_times[picks], err_msg=path)
    assert streamed.decoded_frames == len(media.frames) and streamed.output_fps == fps
    assert streamed.rotation == media.rotation and streamed.video_start == media.video_start
    assert streamed.truncation == media.truncation == "", path  # complete files are not cut
    if media.audio is None:
      assert streamed.audio is None
    else:
      np.testing.assert_array_equal(streamed.audio, media.audio, err_msg=path)
      assert streamed.audio_start == media.audio_start
  # The timing fixtures are what they claim: variable rate with duplicates, rotated, disordered.
  vfr = video.read_av(str(unusual_timing_folder / "vfr_h264.mkv")).frame_times
  assert np.diff(vfr).min() == 0 and np.diff(vfr).max() > 0.3
  assert video.read_av(str(unusual_timing_folder / "rotated_90.mp4")).rotation == 90
  assert np.diff(video.read_av(str(unusual_timing_folder / "out_of_order.mkv")).frame_times).min() < 0
  # Only the out-of-order file needs its second decode; everything else streamed in one pass.
  assert second_decodes == ["out_of_order.mkv"]


def test_streaming_mode_arguments(media_folder):
  path = os.path.join(media_folder, "mp4_h264_aac.mp4")
  with pytest.raises(ValueError, match="both fps and image_size"):
    video.read_av(path, fps=10.0)
  with pytest.raises(ValueError, match="positive fps and image_size"):
    video.read_av(path, fps=0.0, image_size=64)
  with pytest.raises(video.MediaError, match=r"empty file \(0 bytes\)"):
    video.read_av(os.path.join(media_folder, "empty.mp4"), fps=10.0, image_size=64)


def test_a_timestamp_jump_is_a_bad_file_not_hours_of_held_frames(tmp_path):
  # 40 frames stored 1/30 s apart, but frame 20 is stamped ~9 hours late (a broken muxer):
  # resampled, the file would become hundreds of thousands of copies of frame 19.
  path = tmp_path / "jump.mkv"
  _write_video_only(path, np.arange(40) * 40, codec="mjpeg",
                    packet_pts=lambda index, dts: dts + (10 ** 6 if index == 20 else 0))
  assert np.ptp(video.read_av(str(path)).frame_times) > 3600
  with pytest.raises(video.MediaError, match=r"frame times span \d+\.\d s, more than the 600 s"):
    video.read_av(str(path), fps=10.0, image_size=48, max_seconds=600.0)
  settings = ingest.Settings(fps=10.0, image_size=48, sample_rate=16000, min_frames=8,
                             missing_audio="silence", max_seconds=600.0)
  with pytest.raises(ingest.IngestError, match="data.max_video_seconds"):
    ingest.convert(ingest.Item(str(path), "jump", -1, "train"), settings)
  # The same frames without the jump are fine.
  _write_video_only(tmp_path / "steady.mkv", np.arange(40) * 40, codec="mjpeg",
                    packet_pts=lambda index, dts: dts)
  record = ingest.convert(ingest.Item(str(tmp_path / "steady.mkv"), "steady", -1, "train"),
                          settings)
  assert record["frames"].shape[0] == 14   # 40 frames at 30 fps: 1.33 s


# -------------------------------------------------------------------------------------------------
# A folder as users have them: audio-only files, notes, files cut short in every container.


def _cut(path, fraction):
  """Keeps the first `fraction` of the file's bytes (a download or copy that stopped)."""
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("mixed")
  write_media(folder / "song.m4a", with_video=False)
  (folder / "notes.txt").write_text("shot list: beach, rain, fire\n")
  write_media(folder / "complete.mp4", fps=10, seconds=2.0)
  write_media(folder / "complete.m4a", with_video=False)  # its audio alone, beside it
  # 4 s each, cut to 60% of their bytes: about 2 s (20 frames at 10 fps) still decode.
  write_media(folder / "cut_mkv.mkv", video_codec="mpeg4", audio_codec="flac", rate=22050, fps=10,
              seconds=4.0)
  write_media(folder / "cut_webm.webm", video_codec="libvpx-vp9", audio_codec="libopus",
              rate=48000, fps=10, seconds=4.0)
  write_media(folder / "cut_mp4.mp4", fps=10, seconds=4.0,
              container_options={"movflags": "faststart"})
  write_media(folder / "cut_short.mkv", video_codec="mpeg4", audio_codec="flac", rate=22050,
              fps=10, seconds=4.0)
  write_media(folder / "cut_index.mp4", fps=10, seconds=4.0)  # index ('moov') at the end
  for name in ("cut_mkv.mkv", "cut_webm.webm", "cut_mp4.mp4", "cut_index.mp4"):
    _cut(folder / name, 0.6)
  _cut(folder / "cut_short.mkv", 0.25)
  os.makedirs(folder / ".cache")
  (folder / ".cache" / "thumbs.bin").write_bytes(b"\x00" * 64)
  (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
  return folder


def test_every_file_of_a_mixed_folder_is_accounted_for(mixed_folder, config):
  dst = mixed_folder / "records"  # inside --src: the rerun must not read its own output
  written = sum(len(names) for _, _, names in os.walk(mixed_folder))  # hidden ones included
  assert written == 11
  report = ingest.run_from_flags(config, src=str(mixed_folder), dst=str(dst), split="train",
                                 show_progress=False)
  by_name = lambda key: {os.path.basename(f["path"]): f["reason"] for f in report[key]}
  failures, truncated, rejected = by_name("failures"), by_name("truncated_files"), by_name(
      "rejected_files")
  assert set(failures) == {"song.m4a", "cut_short.mkv", "cut_index.mp4"}
  assert failures["song.m4a"] == "no video stream (audio only: aac)"
  assert re.fullmatch(r"truncated: only [01]\.\d\d s of 4\.00 s decodable; \d+ frames < 16 \(one "
                      r"clip at 10 fps\)", failures["cut_short.mkv"]), failures["cut_short.mkv"]
  assert failures["cut_index.mp4"].startswith(
      "truncated: nothing decodable (the mp4 index 'moov' is missing; the file stops ")
  assert rejected == {"notes.txt": "not a media file: text",
                      "complete.m4a": "no video stream (audio only: aac)"}
  assert report["ignored_files"] == {"hidden": 2}
  # One rule for every container: the decodable prefix is ingested and named with its length.
  assert set(truncated) == {"cut_mkv.mkv", "cut_webm.webm", "cut_mp4.mp4"}
  entries, _ = records.read_index(str(dst))
  lengths = {e.video_id: e.num_frames for e in entries}
  for name, reason in truncated.items():
    found = re.fullmatch(r"truncated: only (\d\.\d\d) s of (4\.0\d) s decodable( \(decoding "
                         r"stopped: .+\))?", reason)
    assert found, reason
    decodable = float(found.group(1))
    assert 1.6 <= decodable < 3.0, reason
    # The record holds the decodable prefix: every frame has the source's sound under it.
    frames = lengths[os.path.splitext(name)[0]]
    assert decodable - 0.2 <= frames / config.data.fps <= decodable + 0.1, (name, frames)
    entry = next(e for e in entries if e.video_id == os.path.splitext(name)[0])
    record = records.read_shard_record(str(dst / entry.shard), entry.position)
    tail = record["audio"][-config.audio.sample_rate // 10:]
    assert np.abs(tail).max() > 0.005, name  # the 110 Hz hum runs to the end: no zero padding
  assert report["ingested"] == 4 and lengths["complete"] == 20
  assert report["truncated"] == 3 and report["failed"] == 3 and report["rejected"] == 2
  assert report["files"] == written == (report["ingested"] + report["failed"] + report["skipped"]
                                        + report["rejected"] + report["ignored"])
  # Rerun (resume) with --dst inside --src: the job's own files are counted, never read.
  again = ingest.run_from_flags(config, src=str(mixed_folder), dst=str(dst), split="train",
                                show_progress=False)
  assert again["ignored_files"] == {"hidden": 2, "ingest output": len(os.listdir(dst))}
  assert {k: v for k, v in again.items() if not k.startswith(("ignored", "files"))} == {
      k: v for k, v in report.items() if not k.startswith(("ignored", "files"))}


def test_strict_makes_truncation_a_failure(mixed_folder, config, tmp_path):
  listing = tmp_path / "two.txt"
  listing.write_text(f"{mixed_folder / 'cut_webm.webm'}\n{mixed_folder / 'complete.mp4'}\n")
  report = ingest.run_from_flags(config, src=str(listing), dst=str(tmp_path / "strict"),
                                 split="train", strict=True, show_progress=False)
  assert report["ingested"] == 1 and report["truncated"] == 0
  [failure] = report["failures"]
  assert failure["path"].endswith("cut_webm.webm")
  assert re.fullmatch(r"truncated: only \d\.\d\d s of 4\.01 s decodable \(--strict: truncated "
                      r"files fail\)", failure["reason"]), failure["reason"]
  assert ingest.exit_status(report, strict=True) == 2
  assert ingest.exit_status(report, strict=False) == 0


# -------------------------------------------------------------------------------------------------
# Surround sound.

# ITU-R BS.775 mono downmix of 5.1 without LFE (libswresample's default matrix):
# front L / R 1/sqrt(2), centre 1, LFE 0, surround L / R 1/2.
BS775_MONO = {"FL": 0.5 ** 0.5, "FR": 0.5 ** 0.5, "FC": 1.0, "LFE": 0.0, "BL": 0.5, "BR": 0.5,
              "SL": 0.5, "SR": 0.5}


def _write_surround(path, channels: np.ndarray, layout: str, codec: str, rate: int, fps=10):
  """A video (black 32x32 frames) with a 6-channel track `channels` [6, N] in `layout`."""
  seconds = channels.shape[1] / rate
  with av.open(str(path), "w") as container:
    video_stream = container.add_stream("mpeg4", rate=fps)
    video_stream.width, video_stream.height, video_stream.pix_fmt = 32, 32, "yuv420p"
    audio_stream = container.add_stream(codec, rate=rate, layout=layout)
    for index in range(int(round(seconds * fps))):
      frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
      frame.pts, frame.time_base = index, Fraction(1, fps)
      container.mux(video_stream.encode(frame))
    container.mux(video_stream.encode(None))
    for offset in range(0, channels.shape[1], 1024):
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels[:, offset:offset + 1024]),
                                         format="fltp", layout=layout)
      frame.sample_rate, frame.pts, frame.time_base = rate, offset, Fraction(1, rate)
      container.mux(audio_stream.encode(frame))
    container.mux(audio_stream.encode(None))


def _surround_settings(rate):
  return ingest.Settings(fps=10.0, image_size=32, sample_rate=rate, min_frames=1)


@pytest.mark.parametrize("layout", ["5.1", "5.1(side)"])
def test_surround_is_downmixed_with_the_standard_coefficients(tmp_path, layout):
  """A 440 Hz tone in one channel at a time (lossless FLAC): each channel's gain in the record
  is the BS.775 / libswresample coefficient, not the 1/6 of a plain mean."""
  rate, segment = 48000, 4800  # 0.1 s per channel
  names = [channel.name for channel in av.AudioLayout(layout).channels]
  tone = 0.4 * np.sin(2 * np.pi * 440 * np.arange(segment) / rate)
  channels = np.zeros((6, 6 * segment), np.float32)
  for index in range(6):
    channels[index, index * segment:(index + 1) * segment] = tone
  path = tmp_path / "surround.mkv"
  _write_surround(path, channels, layout, "flac", rate)
  record = ingest.convert(ingest.Item(str(path), "surround", -1, "train"), _surround_settings(rate))
  assert record["audio"].shape == (6 * segment,)
  rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
  gains = {name: rms(record["audio"][index * segment + 400:(index + 1) * segment - 400])
           / rms(tone[400:-400]) for index, name in enumerate(names)}
  assert gains == pytest.approx({name: BS775_MONO[name] for name in names}, abs=2e-3)


def test_surround_loudness_matches_ffmpeg_downmix(tmp_path):
  """A film-like 5.1 mix (speech-like centre, music left / right, ambience in the surrounds, a
  strong LFE rumble), AAC at 48 kHz: the record is as loud as FFmpeg's standard mono downmix
  (the BS.775 matrix applied to the decoded channels) within 3 dB; the plain mean of six
  channels, the old rule, is more than 3 dB quieter."""
  rate, seconds = 48000, 2.0
  t = np.arange(int(rate * seconds)) / rate
  rng = np.random.default_rng(0)
  syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
  speech = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 8)) * syllables
  music_left = np.sin(2 * np.pi * 220 * t) + 0.7 * np.sin(2 * np.pi * 277 * t)
  music_right = np.sin(2 * np.pi * 220 * t + 0.8) + 0.7 * np.sin(2 * np.pi * 330 * t)
  ambience = rng.standard_normal((2, t.shape[0]))
  channels = np.stack([0.12 * music_left, 0.12 * music_right, 0.15 * speech,
                       0.4 * np.sin(2 * np.pi * 40 * t), 0.03 * ambience[0],
                       0.03 * ambience[1]]).astype(np.float32)  # FL FR FC LFE BL BR
  path = tmp_path / "trailer.mp4"
  _write_surround(path, channels, "5.1", "aac", rate)
  record = ingest.convert(ingest.Item(str(path), "trailer", -1, "train"), _surround_settings(rate))
  decoded = video.read_av(str(path)).audio[:, :record["audio"].shape[0]]  # all six channels
  matrix = np.array([BS775_MONO[c.name] for c in av.AudioLayout("5.1").channels], np.float32)
  level = lambda x: 20 * np.log10(np.sqrt(np.mean(np.square(x))))
  reference = level(matrix @ decoded)
  assert abs(level(record["audio"]) - reference) < 3.0
  assert abs(level(record["audio"]) - reference) < 0.1  # in fact: the same matrix
  assert reference - level(decoded.mean(axis=0)) > 3.0   # the old mean would fail the first check


# -------------------------------------------------------------------------------------------------
# Records read under another config; command-line errors.


@pytest.mark.parametrize("field, value, names", [
    ("audio.sample_rate", 16000, "sample_rate: records 44100, config audio.sample_rate=16000"),
    ("data.fps", 8.0, "fps: records 10.0, config data.fps=8.0"),
    ("data.image_size", 32, "image_size: records 64, config data.image_size=32")])
def test_records_of_another_geometry_are_refused(ingested, field, value, names):
  dst, _ = ingested
  config = config_lib.load(CONFIG_PATH)
  section, name = field.split(".")
  with config.unlocked():
    config.data.data_dir = dst
    config[section][name] = value
  with pytest.raises(records.RecordError) as error:
    pipeline.make_dataset(config, "train", batch_size=1, seed=0)
  message = str(error.value)
  assert os.path.join(dst, "index.json") in message and names in message
  assert f"--config.{field}=" in message and "config 'aist'" in message


def _cli_error(*flags):
  """(exit status, stdout, stderr) of the ingest command with `flags`."""
  job = subprocess.run([sys.executable, "-m", "mmldm_jax.data.ingest", f"--config={CONFIG_PATH}",
                        "--split=train", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300)
  return job.returncode, job.stdout, job.stderr


@pytest.mark.subprocess
def test_command_line_errors_are_one_line_with_the_remedy(media_folder, tmp_path):
  listing = tmp_path / "one.txt"
  listing.write_text(os.path.join(media_folder, "mp4_h264_aac.mp4") + "\n")
  dst = tmp_path / "out"
  ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=str(listing), dst=str(dst),
                        split="train", show_progress=False)
  index_before = (dst / "index.json").read_bytes()
  cases = [
      ((f"--src={listing}", f"--dst={dst}", "--min_frames=12"),
       f"mmldm_jax.data.ingest: error: {dst} holds records written with other settings "
       "(min_frames 16 -> 12, in train-00000-of-00001.array_record.done.json): rerun with the "
       "earlier flags and config to resume, or ingest into a fresh --dst"),
      ((f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'out2'}"),
       f"mmldm_jax.data.ingest: error: --src={tmp_path / 'nowhere'} does not exist: give a folder "
       "of media files or a text file listing media paths"),
      ((f"--src={listing}", f"--dst={listing}/records"),
       f"mmldm_jax.data.ingest: error: --dst={listing}/records: cannot create the folder (Not a "
       "directory); choose a folder you can write to"),
  ]
  for flags, line in cases:
    status, out, err = _cli_error(*flags)
    assert status == 2 and out == "", (flags, out, err)
    assert [l for l in err.splitlines() if "Warning" not in l] == [line], err
  assert (dst / "index.json").read_bytes() == index_before  # the refused rerun changed nothing
