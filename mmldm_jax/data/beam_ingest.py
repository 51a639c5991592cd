"""Media files -> a records folder, as an Apache Beam pipeline (AudioSet-sized collections).

The same job as `ingest.py` (same files, splits, labels, shards, records, index.json,
ingest_report.json and finished-shard markers, byte for byte), with the shards spread over a Beam
runner's workers instead of a local process pool:

  python -m mmldm_jax.data.beam_ingest --config=configs/audioset.py --src=gs://bucket/audioset \\
      --dst=gs://bucket/audioset_rec --labels=labels.csv --split=hash -- \\
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://bucket/tmp \\
      --setup_file=./setup.py

Flags before `--` are ingest.py's (without --workers); everything after it goes to Beam's
PipelineOptions. Needs the `beam` extra (`pip install 'mmldm_jax[beam]'`).

How it runs:
  1. The launcher lists --src (a local or shared folder, a text file of paths, or a folder on any
     filesystem Beam knows: gs://, s3://, hdfs://) and sorts its files by content as ingest.py
     does (for a remote folder it reads each file's first bytes, 32 at a time: one request per
     file), assigns splits and labels and plans the shards exactly as ingest.py does, and writes the plan, one JSON line per shard, to
     `<dst>/ingest_plan.jsonl` (read back in parallel, so the job graph stays small).
  2. Each shard is one element: a worker skips it when its finished marker from an earlier run is
     present and valid, else converts its files one after the other with `ingest.convert`
     (streaming decode, bounded memory), writes the shard and then its marker. Files that are not
     on the worker's disk are copied to a local temporary file first.
  3. One step collects the markers, writes index.json and ingest_report.json and removes the plan.
Shards and markers are written locally and copied to --dst through Beam's FileSystems, so --dst
may be remote. A retried or rerun shard is rewritten whole; finished shards are skipped, so a
failed job rerun with the same flags resumes. Counters `ingested`, `failed` and `skipped` appear in
the runner's metrics.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

from mmldm_jax.data import ingest
from mmldm_jax.data import records
from mmldm_jax.data import video

PLAN_FILE = "ingest_plan.jsonl"
COUNTER_NAMESPACE = "mmldm_jax.ingest"


def _beam():
  """apache_beam, imported on first use (an optional dependency)."""
  try:
    import apache_beam
  except ImportError as error:
    raise ImportError("mmldm_jax.data.beam_ingest needs Apache Beam, which is not installed: "
                      "pip install 'mmldm_jax[beam]'") from error
  return apache_beam


def _filesystems():
  _beam()
  from apache_beam.io.filesystems import FileSystems
  return FileSystems


def _join(folder: str, name: str) -> str:
  return _filesystems().join(folder, name)


def _is_remote(path: str) -> bool:
  return "://" in path


REMOTE_HEAD_THREADS = 32


def _read_remote_head(path: str) -> bytes:
  with _filesystems().open(path) as handle:
    return handle.read(video.HEAD_BYTES)


def list_sources(src: str, dst: str) -> ingest.Listing:
  """What --src holds (`ingest.Listing`): ingest.list_sources for local folders and list files;
  for a remote folder its files are matched with Beam and sorted by their first bytes the same
  way (hidden files and --dst, when inside --src, ignored)."""
  if not _is_remote(src):
    return ingest.list_sources(src, None if _is_remote(dst) else dst)
  root = src.rstrip("/")
  matches = _filesystems().match([root + "/**"])[0].metadata_list
  found = [(m.path, m.path[len(root) + 1:], m.size_in_bytes) for m in matches]
  output = dst.rstrip("/")[len(root) + 1:] if dst.rstrip("/").startswith(root + "/") else None
  return ingest.sort_files(found, _read_remote_head, output_folder=output,
                           threads=REMOTE_HEAD_THREADS)


def stage_locally(path: str, folder: str) -> str:
  """A local copy of `path` (any Beam filesystem) in `folder`, for the decoder to seek in."""
  local = os.path.join(folder, "input" + os.path.splitext(path)[1])
  with _filesystems().open(path) as source, open(local, "wb") as target:
    shutil.copyfileobj(source, target, length=16 << 20)
  return local


def _copy_out(local_path: str, dst: str) -> None:
  """Copies a finished local file to `dst` (same name) through Beam's FileSystems."""
  with open(local_path, "rb") as source, _filesystems().create(
      _join(dst, os.path.basename(local_path))) as target:
    shutil.copyfileobj(source, target, length=16 << 20)


def _read_json(path: str) -> Any:
  with _filesystems().open(path) as f:
    return json.loads(f.read().decode("utf-8"))


def _plan_lines(plan: Sequence[tuple[str, list[ingest.Item]]]) -> str:
  return "".join(json.dumps({"shard": shard, "items": [dataclasses.asdict(it) for it in chunk]})
                 + "\n" for shard, chunk in plan)


def _parse_plan_line(line: str) -> tuple[str, list[ingest.Item]]:
  body = json.loads(line)
  return body["shard"], [ingest.Item(**item) for item in body["items"]]


def _convert_staged(args: tuple[ingest.Item, ingest.Settings]):
  """ingest's per-file task, for files that may live on a remote filesystem."""
  item, settings = args
  if not _is_remote(item.path):
    return ingest._convert_or_reason(args)
  with tempfile.TemporaryDirectory(prefix="mmldm-ingest-") as folder:
    try:
      local = stage_locally(item.path, folder)
    except OSError as error:
      return item, None, f"cannot copy to the worker: {error}", False
    _, record, reason, skipped = ingest._convert_or_reason(
        (dataclasses.replace(item, path=local), settings))
  if record is not None:
    record["source"] = item.path
  return item, record, reason.replace(local, item.path), skipped  # decoder errors name the file


def process_shard(element: tuple[str, list[ingest.Item]], dst: str,
                  settings: ingest.Settings) -> tuple[str, dict[str, Any]]:
  """Beam step: one planned shard -> (shard name, its finished marker), writing it if needed."""
  shard, chunk = element
  marker = _join(dst, shard + ingest.DONE_SUFFIX)
  filesystems = _filesystems()
  if filesystems.exists(marker):  # finished by an earlier run of the same job
    return shard, ingest.check_done(_read_json(marker), marker, shard, chunk, settings)
  with tempfile.TemporaryDirectory(prefix="mmldm-shard-") as local:
    results = map(_convert_staged, [(item, settings) for item in chunk])
    done = ingest.write_shard(local, shard, chunk, settings, results)
    _copy_out(os.path.join(local, shard), dst)
    _copy_out(os.path.join(local, shard + ingest.DONE_SUFFIX), dst)  # after the shard
  metrics = _beam().metrics.Metrics
  metrics.counter(COUNTER_NAMESPACE, "ingested").inc(len(done["entries"]))
  metrics.counter(COUNTER_NAMESPACE, "failed").inc(len(done["failures"]))
  metrics.counter(COUNTER_NAMESPACE, "skipped").inc(len(done["skipped"]))
  return shard, done


def _plan_order(shard: str) -> tuple[int, str]:
  """Shard names sort into plan order within a split (zero-padded); splits go in SPLITS order."""
  return records.SPLITS.index(shard.split("-")[0]), shard


def finish(dones: list[tuple[str, dict[str, Any]]], dst: str, settings: ingest.Settings,
           meta: dict[str, Any], listing: ingest.Listing, expected_shards: int) -> dict[str, Any]:
  """Beam step: all markers -> index.json + ingest_report.json in dst; removes the plan."""
  if len(dones) != expected_shards:
    raise RuntimeError(f"{dst}: {len(dones)} shard results for {expected_shards} planned shards")
  ordered = [done for _, done in sorted(dones, key=lambda pair: _plan_order(pair[0]))]
  entries, index_meta, report = ingest.assemble(ordered, settings, meta, listing)
  with tempfile.TemporaryDirectory(prefix="mmldm-index-") as local:
    records.write_index(local, entries, index_meta)
    ingest._write_json(os.path.join(local, ingest.REPORT_FILE), report)
    _copy_out(os.path.join(local, records.INDEX_FILE), dst)
    _copy_out(os.path.join(local, ingest.REPORT_FILE), dst)
  _filesystems().delete([_join(dst, PLAN_FILE)])
  return report


def run(config, *, src: str, dst: str, labels: str = "", split: str = "hash",
        validation_fraction: float = 0.05, heldout_fraction: float = 0.05,
        videos_per_shard: int = 32, missing_audio: str = "error", min_frames: int = 0,
        strict: bool = False, config_file: str = "",
        beam_args: Sequence[str] = ()) -> dict[str, Any]:
  """Plans the job, runs the pipeline (runner from `beam_args`, DirectRunner by default) to the
  end and returns the report (read back from dst)."""
  beam = _beam()
  from apache_beam.options.pipeline_options import PipelineOptions
  listing = list_sources(src, dst)
  items, settings, meta = ingest.plan_job(
      config, src=src, dst=dst, labels=labels, split=split,
      validation_fraction=validation_fraction, heldout_fraction=heldout_fraction,
      videos_per_shard=videos_per_shard, missing_audio=missing_audio, min_frames=min_frames,
      strict=strict, config_file=config_file, listing=listing)
  plan = ingest.plan_shards(items, videos_per_shard)
  filesystems = _filesystems()
  if not _is_remote(dst):
    ingest.prepare_dst(dst)
    ingest.check_no_foreign_shards(dst, plan)
  for shard, chunk in plan:  # fail before any work when dst holds another job's shards
    marker = _join(dst, shard + ingest.DONE_SUFFIX)
    if filesystems.exists(marker):
      ingest.check_done(_read_json(marker), marker, shard, chunk, settings)
  plan_path = _join(dst, PLAN_FILE)
  with filesystems.create(plan_path) as f:
    f.write(_plan_lines(plan).encode("utf-8"))
  with beam.Pipeline(options=PipelineOptions(list(beam_args))) as pipeline:
    _ = (pipeline
         | "ReadPlan" >> beam.io.ReadFromText(plan_path)
         | "ParseShard" >> beam.Map(_parse_plan_line)
         | "SpreadShards" >> beam.Reshuffle()
         | "WriteShard" >> beam.Map(process_shard, dst, settings)
         | "Collect" >> beam.combiners.ToList()
         | "WriteIndex" >> beam.Map(finish, dst, settings, meta, listing, len(plan)))
  return _read_json(_join(dst, ingest.REPORT_FILE))


def main(argv) -> int:
  from absl import flags as absl_flags
  flag = absl_flags.FLAGS
  try:
    if flag.config is None:
      raise ingest.UsageError("--config is required, e.g. --config=configs/audioset.py")
    report = run(flag.config, src=flag.src, dst=flag.dst, labels=flag.labels, split=flag.split,
                 validation_fraction=flag.validation_fraction,
                 heldout_fraction=flag.heldout_fraction, videos_per_shard=flag.videos_per_shard,
                 missing_audio=flag.missing_audio, min_frames=flag.min_frames, strict=flag.strict,
                 config_file=ingest.config_file_flag(), beam_args=argv[1:])
  except ingest.UsageError as error:
    return ingest.report_usage_error("mmldm_jax.data.beam_ingest", error)
  print(ingest.summary(report))
  print(f"report: {_join(flag.dst, ingest.REPORT_FILE)}")
  return ingest.exit_status(report, flag.strict)


if __name__ == "__main__":
  from absl import app
  ingest._define_flags(with_workers=False)
  app.run(main)
