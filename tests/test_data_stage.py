"""The `data` stage end to end through the command line: shards, index, a playable preview with sound,
the preview picture, and a rerun that skips the work."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmldm_jax import config_lib
from mmldm_jax.data import records
from mmldm_jax.data import video
from mmldm_jax.stages import data as stage

from conftest import SUITE_CACHE_FLAG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *extra):
  command = [sys.executable, "-m", "mmldm_jax.main", "--config=configs/demo.py:tiny",
             f"--workdir={workdir}", "--config.stages=data", SUITE_CACHE_FLAG, *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("demo")
  log = run_main(path)
  assert "writing the synthetic dataset" in log
  return path


def test_shards_and_index(workdir):
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  folder = workdir / "data"
  entries, meta = records.read_index(str(folder))
  syn = config.synthetic
  counts = {split: sum(e.split == split for e in entries) for split in records.SPLITS}
  assert counts == {"train": syn.num_train_videos, "validation": syn.num_validation_videos,
                    "heldout": syn.num_heldout_videos}
  assert meta["source"] == "synthetic"
  assert meta["geometry"] == records.geometry(config)
  for shard in {e.shard for e in entries}:
    assert (folder / shard).exists()
  record = records.read_shard_record(str(folder / entries[0].shard), entries[0].position)
  records.validate_record(record)
  assert record["frames"].shape[1:] == (config.data.image_size, config.data.image_size, 3)
  # The records source path checks the same folder against the config it is given.
  assert stage.report_records(str(folder), config) == counts
  with config.unlocked():
    config.data.image_size = 2 * config.data.image_size
  with pytest.raises(records.RecordError, match=r"image_size: records \d+, config "
                     r"data.image_size=\d+"):
    stage.report_records(str(folder), config)


def test_preview_mp4_has_video_and_audio(workdir):
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  media = video.read_av(str(workdir / "preview.mp4"))
  seconds = config.synthetic.video_seconds
  assert media.frames.shape == (int(round(seconds * config.data.fps)), 64, 64, 3)
  assert media.fps == pytest.approx(config.data.fps)
  assert media.video_codec == "h264" and media.audio_codec == "aac"
  assert media.sample_rate == config.audio.sample_rate
  # AAC decodes whole 1024-sample frames: at least the full duration, less than one frame more.
  assert 0 <= media.audio.shape[-1] - seconds * media.sample_rate < 2048
  assert np.abs(media.audio).max() > 0.1   # the tones are there


def test_preview_png_layout(workdir):
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  image = Image.open(workdir / "preview.png")
  frames = min(stage.PREVIEW_FRAMES, config.data.num_frames)
  size, audio_size = config.data.image_size, config.audio.image_size
  assert image.size == (frames * size + 4 + audio_size, max(size, audio_size))
  assert image.mode == "RGB"


def test_rerun_skips(workdir):
  before = {name: os.path.getmtime(workdir / "data" / name)
            for name in os.listdir(workdir / "data")}
  log = run_main(workdir)
  assert "is complete, skipped" in log and "skipped" in log.split("preview:")[-1]
  after = {name: os.path.getmtime(workdir / "data" / name) for name in os.listdir(workdir / "data")}
  assert before == after


def test_records_source_needs_an_index(tmp_path):
  command = [sys.executable, "-m", "mmldm_jax.main", "--config=configs/demo.py:tiny",
             f"--workdir={tmp_path}", "--config.data.source=records",
             f"--config.data.data_dir={tmp_path / 'missing'}", SUITE_CACHE_FLAG]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert "index.json does not exist" in result.stderr
