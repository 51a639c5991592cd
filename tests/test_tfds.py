"""TF-free TFDS builders: build, read back with tfds.data_source, feed the Grain pipeline."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax.data import pipeline
from mmldm_jax.data import records
from mmldm_jax.data import tfds_builders

LENGTHS = {"train": (24, 16, 19), "validation": (17,)}


def _record(number: int, num_frames: int, rate: int) -> dict:
  rng = np.random.default_rng(number)
  return dict(video_id=f"video{number}",
              frames=rng.integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8),
              audio=rng.uniform(-1, 1, int(round(num_frames / 10 * rate))).astype(np.float32),
              label=number % 2, source=f"/media/video{number}.mp4", fps=10.0, sample_rate=rate)


@pytest.fixture(scope="module")
def config_and_folder(tmp_path_factory):
  config = config_lib.load(os.path.join(CONFIGS, "landscape.py:tiny"))
  folder = str(tmp_path_factory.mktemp("records"))
  entries, written, number = [], {}, 0
  for split, lengths in LENGTHS.items():
    name = records.shard_name(split, 0, 1)
    shard = []
    for position, length in enumerate(lengths):
      shard.append(_record(number, length, config.audio.sample_rate))
      entries.append(
          records.VideoEntry(f"video{number}", name, position, length, number % 2, split))
      number += 1
    records.write_shard(os.path.join(folder, name), shard)
    written[split] = shard
  records.write_index(folder, entries, {"made_by": "test",
                                        records.GEOMETRY_KEY: records.geometry(config)})
  with config.unlocked():
    config.data.data_dir = folder
  return config, folder, written


def test_records_builder_round_trip_into_the_pipeline(config_and_folder, tmp_path):
  config, folder, written = config_and_folder
  data_dir = str(tmp_path / "tfds")
  builder = tfds_builders.MmldmRecords(records_dir=folder, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  # A fresh builder reads the metadata back from disk (no records_dir needed to read).
  info = tfds.builder("mmldm_records", data_dir=data_dir).info
  assert info.metadata["num_frames"] == {s: list(v) for s, v in LENGTHS.items()}
  assert info.metadata["records_meta"] == {"made_by": "test",
                                           "geometry": records.geometry(config)}
  for split, expected in written.items():
    source = tfds.data_source("mmldm_records", split=split, data_dir=data_dir)
    assert len(source) == len(expected)
    for example, record in zip(source, expected):
      np.testing.assert_array_equal(example["frames"], record["frames"])
      np.testing.assert_array_equal(example["audio"], record["audio"])
      assert int(example["label"]) == record["label"]
      assert example["video_id"].decode() == record["video_id"]

  # The same clips and the same random choices as reading the records folder directly.
  source = tfds.data_source("mmldm_records", split="train", data_dir=data_dir)
  videos = tfds_builders.videos(source, info, "train")
  from_tfds = list(pipeline.make_dataset(config, "train", batch_size=3, seed=4, num_epochs=1,
                                         videos=videos))
  from_records = list(pipeline.make_dataset(config, "train", batch_size=3, seed=4, num_epochs=1))
  assert len(from_tfds) == len(from_records) == (9 + 1 + 4) // 3
  for a, b in zip(from_tfds, from_records):
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  with pytest.raises(ValueError, match="no split 'heldout'"):
    tfds_builders.videos(source, info, "heldout")
  # The TFDS copy keeps the records' geometry, and the pipeline checks it against the config.
  other = config_lib.load(os.path.join(CONFIGS, "landscape.py:tiny"))
  with other.unlocked():
    other.audio.sample_rate = 22050
  with pytest.raises(records.RecordError, match=(
      f"TFDS dataset mmldm_records .*sample_rate: records {config.audio.sample_rate}, config "
      "audio.sample_rate=22050")):
    pipeline.make_dataset(other, "train", batch_size=3, seed=4, videos=videos)


def test_records_of_the_earlier_format_are_not_packed(config_and_folder, tmp_path):
  _, folder, _ = config_and_folder
  old = str(tmp_path / "old")
  os.makedirs(old)
  entries, _ = records.read_index(folder)
  for name in {e.shard for e in entries}:
    os.symlink(os.path.join(folder, name), os.path.join(old, name))
  records.write_index(old, entries, {"made_by": "an earlier version"})
  builder = tfds_builders.MmldmRecords(records_dir=old, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(records.RecordError, match="records of an earlier format"):
    builder.download_and_prepare(file_format="array_record")


def test_synthetic_builder_feeds_the_pipeline(tmp_path):
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  with config.unlocked():
    config.synthetic.update(num_train_videos=3, num_validation_videos=1, num_heldout_videos=1,
                            videos_per_shard=2)
  data_dir = str(tmp_path / "tfds")
  builder = tfds_builders.MmldmSynthetic(config=config, data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  source = tfds.data_source("mmldm_synthetic", split="train", data_dir=data_dir)
  assert len(source) == 3
  example = source[0]
  assert example["frames"].dtype == np.uint8
  assert example["frames"].shape[1:] == (config.data.image_size, config.data.image_size, 3)
  assert example["source"] == b"synthetic"
  # The examples are the synthetic writer's records.
  folder = os.path.join(data_dir, "downloads", "mmldm_synthetic_records")
  entries = [e for e in records.read_index(folder)[0] if e.split == "train"]
  for example, entry in zip(source, entries):
    record = records.read_shard_record(os.path.join(folder, entry.shard), entry.position)
    np.testing.assert_array_equal(example["frames"], record["frames"])
    np.testing.assert_array_equal(example["audio"], record["audio"])
    assert int(example["label"]) == record["label"]
  videos = tfds_builders.videos(source, builder.info, "train")
  batch = next(iter(pipeline.make_dataset(config, "train", batch_size=2, seed=0, videos=videos)))
  size = config.data.image_size
  assert batch["key_frames"].shape == (2, len(config.data.key_frames), size, size, 3)
  assert batch["audio"].shape == (2, config_lib.clip_samples(config))
  assert sorted(tfds.data_source("mmldm_synthetic", split="heldout", data_dir=data_dir)[0]) == [
      "audio", "fps", "frames", "label", "sample_rate", "source", "video_id"]
