"""The Grain clip pipeline over hand-made records whose pixels and samples say where they are from.

Frame t of video v holds t in channel 0, v in channel 1 and the column index in channel 2 (so a flip
shows); audio sample n holds n / AUDIO_SCALE (a ramp, so a slice tells its start time).
"""
import os

import grain
import numpy as np
import pytest

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax.data import pipeline
from mmldm_jax.data import records
from mmldm_jax.data import video

LENGTHS = (30, 16, 10, 20)  # clip windows: 15 + 1 + 1 + 5
NUM_CLIPS = 22
AUDIO_SCALE = 1e6
SIZE = 64


def _record(video_index: int, num_frames: int, fps: float, rate: int) -> dict:
  frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
  frames[..., 0] = np.arange(num_frames)[:, None, None]
  frames[..., 1] = video_index
  frames[..., 2] = np.arange(SIZE)[None, None, :]
  samples = int(round(num_frames / fps * rate))
  audio = (np.arange(samples) / AUDIO_SCALE).astype(np.float32)
  return dict(video_id=f"v{video_index}", frames=frames, audio=audio, label=video_index % 3,
              source="test", fps=fps, sample_rate=rate)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  rate = config.audio.sample_rate
  entries = []
  # Two shards, to exercise several lazily opened readers.
  groups = [(0, 1), (2, 3)]
  for shard_number, group in enumerate(groups):
    name = records.shard_name("train", shard_number, len(groups))
    records.write_shard(os.path.join(folder, name),
                        [_record(v, LENGTHS[v], config.data.fps, rate) for v in group])
    for position, v in enumerate(group):
      entries.append(records.VideoEntry(f"v{v}", name, position, LENGTHS[v], v % 3, "train"))
  records.write_index(folder, entries, {records.GEOMETRY_KEY: records.geometry(config)})
  with config.unlocked():
    config.data.data_dir = folder
  return config


def _frame_numbers(frames: np.ndarray) -> np.ndarray:
  """Frame number (channel 0) of float frames in [-1, 1]."""
  return np.rint((frames[..., 0, 0, 0] + 1) * 127.5).astype(int)


def _is_flipped(frames: np.ndarray) -> np.ndarray:
  columns = np.rint((frames[..., 0, :, 2] + 1) * 127.5)
  return columns[..., 0] > columns[..., -1]


def test_clip_windows_cover_every_offset(config):
  source = pipeline.clip_source(config, "train")
  assert len(source) == NUM_CLIPS
  windows = [source.locate(i) for i in range(len(source))]
  expected = [(v, s) for v, length in enumerate(LENGTHS) for s in range(max(1, length - 15))]
  assert windows == expected
  short = source[len(source) - 6]  # the 10-frame video: one clip, last frame repeated
  assert source.locate(len(source) - 6) == (2, 0)
  assert int(short["valid_frames"]) == 10
  np.testing.assert_array_equal(short["frames"][:, 0, 0, 0], list(range(10)) + [9] * 6)
  with pytest.raises(IndexError):
    source[NUM_CLIPS]


def test_examples_follow_the_selection_rules(config):
  dataset = pipeline.make_map_dataset(config, "train", batch_size=1, seed=3, frames=True,
                                      num_epochs=1, hflip_prob=0.5)
  rate, fps = config.audio.sample_rate, config.data.fps
  samples = config_lib.clip_samples(config)
  flips = []
  for batch in dataset:
    example = {k: v[0] for k, v in batch.items()}
    v, start = int(example["video_index"]), int(example["clip_start"])
    valid = min(LENGTHS[v] - start, 16)
    flipped = bool(example["flipped"])
    flips.append(flipped)
    # One flip for every frame of the clip.
    for name in ("key_frames", "target_frames", "frames"):
      assert (_is_flipped(example[name]) == flipped).all(), name
    np.testing.assert_array_equal(
        _frame_numbers(example["key_frames"]),
        start + np.asarray(video.key_frame_indices(valid, tuple(config.data.key_frames))))
    targets = _frame_numbers(example["target_frames"]) - start
    assert example["target_frames"].shape[0] == config.data.num_target_frames
    assert (np.diff(targets) >= 0).all() and targets.min() >= 0 and targets.max() < valid
    np.testing.assert_allclose(example["target_indices"], targets / 16)
    # The frames' positions in the clip (what train/posterior_cache.py looks frames up by).
    np.testing.assert_array_equal(_frame_numbers(example["key_frames"]),
                                  start + example["key_positions"])
    np.testing.assert_array_equal(targets, example["target_positions"])
    assert example["frames"].shape == (16, SIZE, SIZE, 3)
    assert example["key_frames"].dtype == np.float32
    assert example["key_frames"].min() >= -1 and example["key_frames"].max() <= 1
    assert int(example["label"]) == v % 3
    # The audio is the ramp from the clip's first frame time, zero past the video's end.
    audio = example["audio"]
    assert audio.shape == (samples,) and audio.dtype == np.float32
    first = int(round(start / fps * rate))
    total = int(round(LENGTHS[v] / fps * rate))
    real = min(samples, total - first)
    np.testing.assert_allclose(audio[:real] * AUDIO_SCALE, np.arange(first, first + real),
                               atol=0.05)
    assert not audio[real:].any()
  assert any(flips) and not all(flips)


def _clip_ids(batches) -> list[tuple[int, int]]:
  return [(int(v), int(s)) for b in batches for v, s in zip(b["video_index"], b["clip_start"])]


def test_processes_are_disjoint_and_cover_the_epoch(config):
  per_process = []
  for index in range(2):
    dataset = pipeline.make_dataset(config, "train", process_index=index, process_count=2,
                                    batch_size=1, seed=5, num_epochs=1)
    per_process.append(_clip_ids(dataset))
  first, second = (set(ids) for ids in per_process)
  assert not first & second
  assert len(first) + len(second) == NUM_CLIPS == len(first | second)
  # Each epoch is a fresh permutation of all clips.
  two_epochs = _clip_ids(pipeline.make_dataset(config, "train", batch_size=1, seed=5, num_epochs=2))
  assert sorted(two_epochs[:NUM_CLIPS]) == sorted(two_epochs[NUM_CLIPS:])
  assert two_epochs[:NUM_CLIPS] != two_epochs[NUM_CLIPS:]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _resume_check(config, skip: int, more: int):
  dataset = pipeline.make_dataset(config, "train", batch_size=4, seed=7)
  iterator = iter(dataset)
  for _ in range(skip):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(more)]
  fresh = iter(pipeline.make_dataset(config, "train", batch_size=4, seed=7))
  fresh.set_state(state)
  _assert_same(expected, [next(fresh) for _ in range(more)])


def test_exact_resume_in_process(config):
  # 5 batches of 4 cross the first epoch boundary (22 clips).
  _resume_check(config, skip=5, more=3)


@pytest.mark.subprocess
def test_exact_resume_with_two_workers(config):
  with config.unlocked():
    config.data.worker_count = 2
  try:
    _resume_check(config, skip=3, more=4)
  finally:
    with config.unlocked():
      config.data.worker_count = 0


def test_iterator_state_in_an_orbax_checkpoint(config, tmp_path):
  import orbax.checkpoint as ocp
  iterator = iter(pipeline.make_dataset(config, "train", batch_size=2, seed=11))
  for _ in range(4):
    next(iterator)
  manager = ocp.CheckpointManager(
      str(tmp_path / "ckpt"), item_names=("data",),
      item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(3)]

  restored = iter(pipeline.make_dataset(config, "train", batch_size=2, seed=11))
  manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(expected, [next(restored) for _ in range(3)])
  manager.close()


def test_bad_inputs_are_named(config, tmp_path):
  with pytest.raises(ValueError, match="split='heldout'"):
    pipeline.make_dataset(config, "heldout", batch_size=1, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_dataset(config, "train", process_index=2, process_count=2, batch_size=1, seed=0)
  with config.unlocked():
    config.data.image_size = 32
  try:
    # Refused from index.json's geometry before any record is read.
    with pytest.raises(records.RecordError, match="image_size: records 64, config "
                       "data.image_size=32"):
      pipeline.clip_source(config, "train")
  finally:
    with config.unlocked():
      config.data.image_size = SIZE
  with pytest.raises(FileNotFoundError, match="index.json"):
    pipeline.RecordVideos(str(tmp_path), "train")


def test_records_of_the_earlier_format_or_another_geometry_are_refused(config, tmp_path):
  folder = config.data.data_dir
  entries, _ = records.read_index(folder)
  old = str(tmp_path / "old")
  os.makedirs(old)
  records.write_index(old, entries, {"fps": config.data.fps})  # no geometry: the earlier format
  with config.unlocked():
    config.data.data_dir = old
  try:
    with pytest.raises(records.RecordError, match=r"records of an earlier format .*Re-ingest them: "
                       r"`python -m mmldm_jax.data.ingest"):
      pipeline.clip_source(config, "train")
  finally:
    with config.unlocked():
      config.data.data_dir = folder
  other = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  with other.unlocked():
    other.data.data_dir = folder
    other.audio.sample_rate = 16000
    other.data.fps = 12.5
  with pytest.raises(records.RecordError) as error:
    pipeline.make_dataset(other, "train", batch_size=1, seed=0)
  # Both differences, each with both values and the field, and the override that fits them.
  assert (f"fps: records {config.data.fps}, config data.fps=12.5; sample_rate: records "
          f"{config.audio.sample_rate}, config audio.sample_rate=16000" in str(error.value))
  assert (f"--config.data.fps={config.data.fps} --config.audio.sample_rate="
          f"{config.audio.sample_rate}" in str(error.value))
