"""Ingestion of real media files: containers/codecs, broken files, resume after a kill, alignment.

Fixtures are written with PyAV: 96x64 frames (a moving grey bar; white frames at "flash" instants)
and a quiet tone track with 1 kHz beeps at the same instants.
"""
import json
import os
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
                stereo=False):
  """Writes a test file; the audio's first sample is presented `audio_start` s after frame 0."""
  frame_rate = Fraction(fps).limit_denominator(1000)
  with av.open(str(path), "w") as container:
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
BROKEN = {  # file -> expected words in the reason
    "truncated.mp4": "",
    "empty.mp4": "cannot open",
    "text.mp4": "cannot open",
    "audio_only.mp4": "no video stream",
    "video_only.mp4": "no audio stream",
    "short.mp4": "shorter than one clip",
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
    assert words in reasons[name], (name, reasons[name])
  on_disk = json.load(open(os.path.join(dst, ingest.REPORT_FILE)))
  assert on_disk["failed"] == len(BROKEN) and on_disk["ingested"] == len(VALID)
  assert meta["fps"] == config.data.fps and meta["counts"]["train"] == len(VALID)
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
  resampled = ingest.align_audio(np.ones((2, 300), np.float32) * 0.5, rate, 0.0, 20, 10.0, 50)
  assert resampled.shape == (100,) and abs(resampled[10:90].mean() - 0.5) < 1e-3


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


def test_killed_job_resumes_to_the_clean_result(media_folder, ingested, tmp_path):
  dst = str(tmp_path / "resumed")
  job = _cli(media_folder, dst)
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
  with pytest.raises(ValueError, match="fresh --dst"):
    ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=media_folder, dst=dst, split="train",
                          videos_per_shard=1, min_frames=12, show_progress=False)

  clean = str(tmp_path / "clean")
  ingest.run_from_flags(config_lib.load(CONFIG_PATH), src=media_folder, dst=clean, split="train",
                        videos_per_shard=1, show_progress=False)
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
  listing.write_text("# two files\n" + "".join(
      os.path.join(media_folder, n) + "\n" for n in ("webm_vp9_opus.webm", "avi_mjpeg_pcm.avi")))
  assert [rel for _, rel in ingest.list_media(str(listing))] == [
      "avi_mjpeg_pcm.avi", "webm_vp9_opus.webm"]
  with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
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
  with pytest.raises(video.MediaError, match="cannot open"):
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
