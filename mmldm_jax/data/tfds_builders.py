"""TFDS builders (no TensorFlow needed) for users who prefer `tfds.data_source`.

Two builders write the same videos as the project's record folders, one TFDS example per video, in
ArrayRecord files, with `tfds.features.Tensor` features only (TFDS's Image/Video/Audio features need
TensorFlow):
  video_id str, frames uint8 [T, H, W, 3], audio float32 [N], label int32, source str, fps float32,
  sample_rate int32
and the frame count of every video, in example order, in `info.metadata['num_frames'][split]` (so
clip windows can be enumerated without decoding the videos), and the records folder's index meta in
`info.metadata['records_meta']`: its geometry (fps, image size, sample rate) is what `videos()`
hands the pipeline to check against the reading config.

  MmldmRecords    re-packs an ingested (or synthetic) records folder: `MmldmRecords(records_dir=)`
  MmldmSynthetic  writes the project's synthetic set for a config: `MmldmSynthetic(config=...)`

Build, then read into the Grain pipeline:
  builder = tfds_builders.MmldmRecords(records_dir="/data/aist_rec", data_dir="/data/tfds")
  builder.download_and_prepare(file_format="array_record")
  source = tfds.data_source("mmldm_records", split="train", data_dir="/data/tfds")
  dataset = pipeline.make_dataset(config, "train", batch_size=8, seed=0,
                                  videos=tfds_builders.videos(source, builder.info, "train"))
The builders must stay in this importable module (TFDS cannot load builders defined in `__main__`).
Examples keep generation order (`disable_shuffling`), which the metadata lengths rely on.
"""
from __future__ import annotations

import importlib.resources.abc
import os
import sys
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

# TFDS 4.9.10 checks a builder's code path against `importlib_resources.abc.Traversable`, importing
# the `importlib_resources` backport that it does not install; the standard library module has the
# same class. Without this, building from a package module fails with ModuleNotFoundError.
sys.modules.setdefault("importlib_resources", importlib.resources)

from mmldm_jax.data import pipeline
from mmldm_jax.data import records


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "video_id": tfds.features.Tensor(shape=(), dtype=np.object_),
      "frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
      "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
      "source": tfds.features.Tensor(shape=(), dtype=np.object_),
      "fps": tfds.features.Tensor(shape=(), dtype=np.float32),
      "sample_rate": tfds.features.Tensor(shape=(), dtype=np.int32),
  })


def _info(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.DatasetInfo:
  return builder.dataset_info_from_configs(
      features=_features(), metadata=tfds.core.MetadataDict(), disable_shuffling=True)


def _split_generators(builder: tfds.core.GeneratorBasedBuilder, folder: str) -> dict[str, Any]:
  """One TFDS split per split present in the records folder; frame counts into the metadata."""
  entries, meta = records.read_index(folder)
  # Records of the format without a geometry cannot be checked by readers later: refuse them now.
  records.written_geometry(meta, os.path.join(folder, records.INDEX_FILE))
  splits = [s for s in records.SPLITS if any(e.split == s for e in entries)]
  builder.info.metadata["num_frames"] = {
      s: [e.num_frames for e in entries if e.split == s] for s in splits}
  builder.info.metadata["records_meta"] = meta
  generate = builder._generate_examples  # pylint: disable=protected-access
  return {s: generate(folder, s) for s in splits}


def _generate_examples(folder: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
  videos = pipeline.RecordVideos(folder, split)
  for index in range(len(videos)):
    record = videos.read(index)
    # Zero-padded keys: with shuffling disabled the examples keep this order.
    yield f"{index:09d}", {
        "video_id": record["video_id"],
        "frames": record["frames"],
        "audio": record["audio"],
        "label": np.int32(record["label"]),
        "source": record["source"],
        "fps": np.float32(record["fps"]),
        "sample_rate": np.int32(record["sample_rate"]),
    }


class MmldmRecords(tfds.core.GeneratorBasedBuilder):
  """A records folder (from `python -m mmldm_jax.data.ingest` or the synthetic writer) as TFDS.

  `records_dir` is needed only to build; reading a built dataset needs just `data_dir`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Whole videos from a records folder."}

  def __init__(self, *, records_dir: str | None = None, **kwargs):
    self._records_source = records_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self)

  def _split_generators(self, dl_manager):
    if not self._records_source:
      raise ValueError("MmldmRecords needs records_dir=<folder with index.json> to build")
    return _split_generators(self, self._records_source)

  def _generate_examples(self, folder: str, split: str):
    return _generate_examples(folder, split)


class MmldmSynthetic(tfds.core.GeneratorBasedBuilder):
  """The synthetic sounding-video set of an experiment config (`synthetic.write_dataset`).

  The videos are first written as a records folder under the download directory, then re-packed,
  so the TFDS examples equal the records byte for byte. `config` is needed only to build.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Synthetic sounding videos."}

  def __init__(self, *, config=None, **kwargs):
    self._experiment_config = config
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self)

  def _split_generators(self, dl_manager):
    if self._experiment_config is None:
      raise ValueError("MmldmSynthetic needs config=<experiment config> to build")
    from mmldm_jax.data import synthetic
    folder = os.path.join(os.fspath(dl_manager.download_dir), "mmldm_synthetic_records")
    os.makedirs(folder, exist_ok=True)
    synthetic.write_dataset(self._experiment_config, folder)
    return _split_generators(self, folder)

  def _generate_examples(self, folder: str, split: str):
    return _generate_examples(folder, split)


def videos(data_source, info: tfds.core.DatasetInfo, split: str) -> pipeline.TfdsVideos:
  """The `pipeline.TfdsVideos` of a split, from a TFDS data source and its dataset info."""
  lengths = info.metadata.get("num_frames", {}).get(split)
  if lengths is None:
    raise ValueError(f"dataset {info.name}: metadata 'num_frames' has no split {split!r}; "
                     "was it built by mmldm_jax.data.tfds_builders?")
  meta = info.metadata.get("records_meta")
  if meta is None:
    raise ValueError(f"dataset {info.name}: metadata 'records_meta' is missing; was it built by "
                     "mmldm_jax.data.tfds_builders?")
  # The pipeline checks the geometry in it against the config (records.check_geometry).
  return pipeline.TfdsVideos(data_source, lengths, meta, origin=f"TFDS dataset {info.name} "
                             f"(metadata 'records_meta', from {meta.get('source', 'unknown')})")
