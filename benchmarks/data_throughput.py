"""Data throughput: ingestion (media -> records) and the Grain clip pipeline, each against a peer.

  python benchmarks/data_throughput.py [--append]

1. Ingestion, one worker process (so the rates are per core), at the paper's data config
   (configs/aist.py: 256x256 letterboxed, 10 fps, 44.1 kHz): `ingest.run_from_flags` on a folder
   of generated H.264 + AAC mp4 files, against the peer "bare PyAV decode" of the same files (every
   video frame to RGB and every audio frame to NumPy, nothing else). Reports videos/s and decoded
   source frames/s; ratio = our time / bare decode time.
2. Pipeline, in the main process (worker_count 0, the default read threads), paper clip geometry
   (16 x 256 x 256 frames + 1.6 s of 44.1 kHz audio): clips/s of `pipeline.make_dataset`, against
   the peer "bare ArrayRecord loop" (read a random record, msgpack-decode it, slice a clip).
   Ratio = our time per clip / the loop's.
With --append the rows go to benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import av
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mmldm_jax import config_lib  # noqa: E402
from mmldm_jax.data import ingest  # noqa: E402
from mmldm_jax.data import pipeline  # noqa: E402
from mmldm_jax.data import records  # noqa: E402
from mmldm_jax.data import video  # noqa: E402

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"
NUM_FILES = 6
SOURCE_SECONDS = 4.0
SOURCE_FPS = 30
SOURCE_SIZE = (360, 480)  # H, W


def _write_sources(folder: str) -> None:
  rng = np.random.default_rng(0)
  count = int(SOURCE_SECONDS * SOURCE_FPS)
  height, width = SOURCE_SIZE
  for number in range(NUM_FILES):
    base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    still = np.repeat(np.repeat(base, 8, 0), 8, 1)
    frames = np.stack([np.roll(still, 4 * index, axis=1) for index in range(count)])  # a pan
    rate = 44100
    times = np.arange(int(SOURCE_SECONDS * rate)) / rate
    audio = (0.3 * np.sin(2 * np.pi * (220 + 40 * number) * times)).astype(np.float32)
    video.write_mp4(os.path.join(folder, f"clip{number}.mp4"), frames, SOURCE_FPS, audio, rate)


def _bare_decode(paths) -> int:
  frames = 0
  for path in paths:
    with av.open(path) as container:
      streams = [container.streams.video[0], container.streams.audio[0]]
      for packet in container.demux(streams):
        for frame in packet.decode():
          if packet.stream.type == "video":
            frame.to_ndarray(format="rgb24")
            frames += 1
          else:
            frame.to_ndarray()
  return frames


def bench_ingest(config, work: str) -> dict:
  src = os.path.join(work, "media")
  os.makedirs(src)
  _write_sources(src)
  paths = sorted(os.path.join(src, n) for n in os.listdir(src))
  _bare_decode(paths[:1])  # warm the codecs
  start = time.perf_counter()
  decoded = _bare_decode(paths)
  bare = time.perf_counter() - start
  start = time.perf_counter()
  report = ingest.run_from_flags(config, src=src, dst=os.path.join(work, "records"), split="train",
                                 workers=1, videos_per_shard=NUM_FILES, show_progress=False)
  ours = time.perf_counter() - start
  assert report["ingested"] == NUM_FILES, report
  return dict(ours=ours, bare=bare, videos=NUM_FILES, frames=decoded)


def _write_clip_records(config, folder: str, num_videos: int = 4, seconds: float = 4.0) -> None:
  rng = np.random.default_rng(1)
  size, fps, rate = config.data.image_size, config.data.fps, config.audio.sample_rate
  count = int(seconds * fps)
  shard = records.shard_name("train", 0, 1)
  videos, entries = [], []
  for number in range(num_videos):
    videos.append(dict(video_id=f"v{number}",
                       frames=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                       audio=rng.uniform(-1, 1, int(round(count / fps * rate))).astype(np.float32),
                       label=0, source="benchmark", fps=fps, sample_rate=rate))
    entries.append(records.VideoEntry(f"v{number}", shard, number, count, 0, "train"))
  records.write_shard(os.path.join(folder, shard), videos)
  records.write_index(folder, entries, {records.GEOMETRY_KEY: records.geometry(config)})


def bench_pipeline(config, work: str, num_clips: int = 96, batch_size: int = 8) -> dict:
  folder = os.path.join(work, "clips")
  os.makedirs(folder)
  _write_clip_records(config, folder)
  with config.unlocked():
    config.data.data_dir = folder
    config.data.worker_count = 0
  dataset = pipeline.make_dataset(config, "train", batch_size=batch_size, seed=0)
  iterator = iter(dataset)
  next(iterator)  # start-up (threads, first reads) is not throughput
  start = time.perf_counter()
  for _ in range(num_clips // batch_size):
    next(iterator)
  ours = (time.perf_counter() - start) / num_clips

  from array_record.python import array_record_module
  entries, _ = records.read_index(folder)
  reader = array_record_module.ArrayRecordReader(os.path.join(folder, entries[0].shard),
                                                 "readahead_buffer_size:0")
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for _ in range(num_clips):
    entry = entries[rng.integers(len(entries))]
    record = records.decode_record(reader.read([entry.position])[0])
    first = int(rng.integers(entry.num_frames - config.data.num_frames + 1))
    np.ascontiguousarray(record["frames"][first:first + config.data.num_frames])
  bare = (time.perf_counter() - start) / num_clips
  reader.close()
  return dict(ours=ours, bare=bare)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--append", action="store_true",
                      help="append the rows to benchmarks/README.md")
  args = parser.parse_args()
  config = config_lib.load(os.path.join(REPO, "configs", "aist.py"))
  with tempfile.TemporaryDirectory() as work:
    ing = bench_ingest(config, work)
    pipe = bench_pipeline(config, work)
  today = datetime.date.today().isoformat()
  command = "python benchmarks/data_throughput.py"
  rows = [
      f"| ingest {NUM_FILES} mp4 (H.264+AAC {SOURCE_SIZE[1]}x{SOURCE_SIZE[0]} {SOURCE_FPS} fps, "
      f"{SOURCE_SECONDS:g} s) -> 256x256 @10 fps records, 1 worker: time "
      f"(ours {ing['videos'] / ing['ours']:.2f} videos/s, {ing['frames'] / ing['ours']:.0f} "
      f"decoded frames/s per core) | {command} | {MACHINE} | {today} | {ing['ours']:.2f} s | "
      f"{ing['bare']:.2f} s (bare PyAV decode) | {ing['ours'] / ing['bare']:.2f} |",
      f"| pipeline clip (16x256x256 frames + 1.6 s 44.1 kHz audio), main process: time per clip "
      f"(ours {1 / pipe['ours']:.1f} clips/s per host) | {command} | {MACHINE} | {today} | "
      f"{pipe['ours'] * 1e3:.1f} ms | {pipe['bare'] * 1e3:.1f} ms (bare ArrayRecord read + "
      f"decode + slice) | {pipe['ours'] / pipe['bare']:.2f} |",
  ]
  print("\n".join(rows))
  if args.append:
    with open(os.path.join(REPO, "benchmarks", "README.md"), "a") as f:
      f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
