"""The Apache Beam ingestion pipeline (DirectRunner) gives the local CLI's output, byte for byte."""
import json
import os
import subprocess
import sys

import apache_beam  # noqa: F401  (the `beam` extra is part of the test requirements)
import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystem import MatchResult
from apache_beam.io.localfilesystem import LocalFileSystem

from conftest import CONFIGS, REPO_ROOT
from mmldm_jax import config_lib
from mmldm_jax.data import beam_ingest
from mmldm_jax.data import ingest
from mmldm_jax.data import records
from test_ingest import write_media

CONFIG_PATH = os.path.join(CONFIGS, "aist.py:tiny")
JOB = dict(labels="folders", split="hash", validation_fraction=0.3, heldout_fraction=0.2,
           videos_per_shard=2)
# What the command line adds to JOB's flags with --strict: same settings, same bytes.
AS_THE_CLI = dict(strict=True, config_file=CONFIG_PATH)


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
  """Two classes, seven usable files, one without sound, one that is not media."""
  folder = tmp_path_factory.mktemp("beam_media")
  for label, names in (("rain", ("a", "b", "c", "d")), ("fire", ("e", "f", "g"))):
    os.makedirs(folder / label, exist_ok=True)
    for number, name in enumerate(names):
      write_media(folder / label / f"{name}.mp4", fps=10 + 5 * number, seconds=2.0)
  (folder / "fire" / "broken.mp4").write_bytes(b"not a video")
  write_media(folder / "rain" / "silent.mp4", with_audio=False)
  return str(folder)


@pytest.fixture(scope="module")
def config():
  return config_lib.load(CONFIG_PATH)


@pytest.fixture(scope="module")
def local_job(media_folder, config, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("local"))
  report = ingest.run_from_flags(config, src=media_folder, dst=dst, show_progress=False, **JOB,
                                 **AS_THE_CLI)
  return dst, report


def _folder_bytes(folder):
  contents = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      contents[name] = f.read()
  return contents


def test_beam_output_equals_the_local_cli(media_folder, config, local_job, tmp_path):
  local_dst, local_report = local_job
  assert local_report["ingested"] == 7 and local_report["failed"] == 1  # silent.mp4
  assert local_report["rejected_files"] == [  # by content, before decoding
      {"path": os.path.join(media_folder, "fire", "broken.mp4"),
       "reason": "not a media file: text"}]
  assert all(local_report["counts"][split] for split in records.SPLITS)
  dst = str(tmp_path / "beam")
  report = beam_ingest.run(config, src=media_folder, dst=dst,
                           beam_args=["--runner=DirectRunner"], **JOB, **AS_THE_CLI)
  assert report == local_report
  local_files, beam_files = _folder_bytes(local_dst), _folder_bytes(dst)
  assert sorted(beam_files) == sorted(local_files)  # shards, markers, index, report; no plan left
  assert sum(name.endswith(".array_record") for name in beam_files) >= 5
  for name, content in local_files.items():
    assert beam_files[name] == content, name

  # A rerun skips every finished shard (nothing rewritten) and gives the same result.
  mtimes = {name: os.path.getmtime(os.path.join(dst, name)) for name in beam_files
            if name.endswith(".array_record")}
  os.remove(os.path.join(dst, records.INDEX_FILE))
  assert beam_ingest.run(config, src=media_folder, dst=dst, **JOB, **AS_THE_CLI) == local_report
  assert {name: os.path.getmtime(os.path.join(dst, name)) for name in mtimes} == mtimes
  assert _folder_bytes(dst) == local_files

  # Another job's markers in dst: refused before any work.
  with pytest.raises(ValueError, match="fresh --dst"):
    beam_ingest.run(config, src=media_folder, dst=dst, **dict(JOB, missing_audio="silence"))


@pytest.mark.subprocess
def test_command_line_passes_beam_options_after_the_separator(media_folder, local_job, tmp_path):
  dst = str(tmp_path / "cli")
  flags = [f"--{key}={value}" for key, value in JOB.items()]
  result = subprocess.run(
      [sys.executable, "-m", "mmldm_jax.data.beam_ingest", f"--config={CONFIG_PATH}",
       f"--src={media_folder}", f"--dst={dst}", *flags, "--strict", "--",
       "--runner=DirectRunner", "--direct_num_workers=1"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stdout + result.stderr  # --strict and a failed file
  assert "ingested 7 videos" in result.stdout and "FAILED" in result.stdout
  assert _folder_bytes(dst) == _folder_bytes(local_job[0])


class PrefixedLocalFileSystem(LocalFileSystem):
  """Local files under the scheme 'testfs://', so the pipeline treats them as remote (its listing,
  staging and copying paths run as they would for gs://)."""
  PREFIX = "testfs://"

  @classmethod
  def scheme(cls):
    return "testfs"

  def _local(self, path):
    return path[len(self.PREFIX):] if path.startswith(self.PREFIX) else path

  def match(self, patterns, limits=None):
    return [MatchResult(self.PREFIX + result.pattern, [
        FileMetadata(self.PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)
        for m in result.metadata_list])
            for result in super().match([self._local(p) for p in patterns], limits)]

  def create(self, path, *args, **kwargs):
    return super().create(self._local(path), *args, **kwargs)

  def open(self, path, *args, **kwargs):
    return super().open(self._local(path), *args, **kwargs)

  def exists(self, path):
    return super().exists(self._local(path))

  def delete(self, paths):  # the base class re-matches paths (prefixed by `match` above)
    for path in paths:
      os.remove(self._local(path))


def test_remote_source_and_destination(media_folder, config, local_job, tmp_path):
  """--src and --dst on a non-local filesystem: listed with Beam, files staged on the worker,
  shards and markers copied out; the records are the local job's, under the remote paths."""
  prefix = PrefixedLocalFileSystem.PREFIX
  dst = str(tmp_path / "remote")
  os.makedirs(dst)
  report = beam_ingest.run(config, src=prefix + media_folder, dst=prefix + dst, **JOB,
                           **AS_THE_CLI)
  local_dst, local_report = local_job
  assert json.loads(json.dumps(report).replace(prefix, "")) == local_report
  assert sorted(os.listdir(dst)) == sorted(os.listdir(local_dst))
  entries, meta = records.read_index(dst)
  local_entries, local_meta = records.read_index(local_dst)
  assert meta["source"] == prefix + media_folder
  assert dict(meta, source=local_meta["source"]) == local_meta
  assert [dict(vars(e), source=e.source[len(prefix):]) for e in entries] == [
      vars(e) for e in local_entries]
  for entry, local_entry in zip(entries, local_entries):
    record = records.read_shard_record(os.path.join(dst, entry.shard), entry.position)
    expected = records.read_shard_record(os.path.join(local_dst, entry.shard), entry.position)
    assert record.pop("source") == prefix + expected.pop("source")
    assert record.keys() == expected.keys()
    for key, value in expected.items():
      assert np.array_equal(record[key], value), (entry.video_id, key)


def test_missing_beam_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # makes `import apache_beam` fail
  with pytest.raises(ImportError, match=r"pip install 'mmldm_jax\[beam\]'"):
    beam_ingest._beam()


def test_plan_lines_round_trip():
  plan = [("train-00000-of-00001.array_record",
           [ingest.Item("/m/a.mp4", "a", 0, "train"), ingest.Item("/m/b é.mp4", "b é", -1,
                                                                     "train")])]
  lines = beam_ingest._plan_lines(plan).splitlines()
  assert [beam_ingest._parse_plan_line(line) for line in lines] == plan
  assert json.loads(lines[0])["shard"] == plan[0][0]
