"""The synthetic sounding-video dataset: determinism, geometry, ground truth that agrees with the
pictures and the sound, the dataset writer (resumable, refuses mixed settings) and mp4 export."""
import os

import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.data import records
from mmldm_jax.data import synthetic
from mmldm_jax.data import video
from mmldm_jax.evaluation import sync

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def demo_config(**data):
  config = config_lib.load(os.path.join(CONFIGS, "demo.py") + ":tiny")
  config.data.update(data)
  return config


@pytest.fixture(scope="module")
def config():
  return demo_config()


def test_same_seed_same_bytes_other_seed_other_video(config):
  first = records.encode_record(synthetic.generate_video(3, 1, config))
  again = records.encode_record(synthetic.generate_video(3, 1, config))
  other = records.encode_record(synthetic.generate_video(4, 1, config))
  assert first == again
  assert first != other


@pytest.mark.parametrize("size,fps,rate,seconds", [
    (48, 8.0, 8000, 2.0), (96, 24.0, 22050, 1.0), (64, 10.0, 44100, 3.2), (32, 12.5, 16000, 1.6)])
def test_geometry(size, fps, rate, seconds):
  config = demo_config(image_size=size, fps=fps)
  config.audio.sample_rate = rate
  record = synthetic.generate_video(11, 2, config, seconds=seconds)
  records.validate_record(record)
  num_frames = int(round(seconds * fps))
  assert record["frames"].shape == (num_frames, size, size, 3)
  assert record["frames"].dtype == np.uint8
  assert record["audio"].shape == (int(round(num_frames / fps * rate)),)
  assert np.abs(record["audio"]).max() <= 1.0
  assert record["fps"] == fps and record["sample_rate"] == rate and record["label"] == 2
  events = record["events"]
  assert {k: v.dtype for k, v in events.items()} == {
      "frame": np.float32, "object": np.int32, "pitch_hz": np.float32, "colour": np.int32}
  assert np.all((events["frame"] >= 0) & (events["frame"] < num_frames))
  assert np.allclose(events["pitch_hz"], synthetic.PALETTE_PITCH_HZ[events["colour"]])


def test_palette_is_separable(config):
  pitches = synthetic.PALETTE_PITCH_HZ
  assert pitches.min() >= 200 and pitches.max() <= 2000
  assert np.all(np.diff(np.log2(np.sort(pitches))) >= 0.5)         # >= a tritone apart
  assert 2 * pitches.max() < min(config.audio.fmax, config.audio.sample_rate / 2)
  colours = synthetic.PALETTE_RGB.astype(float)
  pairwise = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
  assert pairwise[~np.eye(len(colours), dtype=bool)].min() > 100
  for label in range(config.synthetic.num_classes):
    background = synthetic._background(np.random.default_rng(label), label,
                                       config.synthetic.num_classes, 64).reshape(-1, 1, 3)
    assert np.linalg.norm(background - colours[None], axis=-1).min() > 110, label


def test_event_statistics(config):
  counts, any_gaps, same_gaps = [], [], []
  for seed in range(120):
    events = synthetic.generate_video(seed, seed % 4, config, seconds=1.6)["events"]
    counts.append(len(events["frame"]))
    any_gaps += list(np.diff(events["frame"]))
    for obj in np.unique(events["object"]):
      same_gaps += list(np.diff(events["frame"][events["object"] == obj]))
  assert 2 <= np.median(counts) <= 6 and np.mean([2 <= c <= 6 for c in counts]) >= 0.9
  fps = config.data.fps
  assert min(any_gaps) >= max(2.5, config.synthetic.min_event_gap_seconds * fps) - 1e-3
  assert min(same_gaps) >= 3.5 - 1e-3


def _wall_gaps(frames, colour):
  """Pixels between the colour's mask and the nearest frame border, per frame (inf if absent)."""
  distance = np.linalg.norm(frames.astype(float) - synthetic.PALETTE_RGB[colour], axis=-1)
  mask = distance < 90
  height, width = frames.shape[1:3]
  gaps = np.full(len(frames), np.inf)
  for k, m in enumerate(mask):
    if m.any():
      ys, xs = np.nonzero(m)
      gaps[k] = min(xs.min(), width - 1 - xs.max(), ys.min(), height - 1 - ys.max())
  return gaps


def test_events_are_wall_contacts_in_the_frames(config):
  for seed in range(12):
    record = synthetic.generate_video(seed, seed % 4, config)
    frames, events = record["frames"], record["events"]
    for colour in np.unique(events["colour"]):
      times = events["frame"][events["colour"] == colour]
      gaps = _wall_gaps(frames, colour)
      steps = np.abs(np.diff(sync.track_colours(frames)[colour], axis=0))
      max_step = np.nanmax(steps)
      # At every event the object is at most half a frame's motion (+1 px) from a border ...
      for t in times:
        nearest = min(int(round(t)), len(frames) - 1)
        assert gaps[nearest] <= max_step * abs(nearest - t) + 1.0, (seed, colour, t, gaps)
      # ... and whenever it touches a border, an event of that colour is within a frame.
      touching = np.flatnonzero(gaps == 0)
      for k in touching:
        assert np.abs(times - k).min() <= 1.0 + 1e-6 or k == 0 or k == len(frames) - 1, (
            seed, colour, k, times)


def test_tones_sound_at_events(config):
  record = synthetic.generate_video(5, 0, config)
  onsets, pitches = sync.detect_onsets(record["audio"], record["sample_rate"])
  events = record["events"]
  assert len(onsets) == len(events["frame"])
  assert np.abs(onsets * config.data.fps - events["frame"]).max() < 0.2
  assert np.allclose(pitches, events["pitch_hz"], rtol=0.05)


def test_bad_arguments_name_the_field(config):
  with pytest.raises(ValueError, match="num_classes"):
    synthetic.generate_video(0, config.synthetic.num_classes, config)
  low = demo_config()
  low.audio.sample_rate = 3000
  with pytest.raises(ValueError, match="sample_rate=3000"):
    synthetic.generate_video(0, 0, low)
  crowded = demo_config()
  crowded.synthetic.max_objects = len(synthetic.PALETTE) + 1
  with pytest.raises(ValueError, match="max_objects"):
    synthetic.generate_video(0, 0, crowded)


def test_write_dataset_deterministic_resumable(tmp_path, config):
  first = synthetic.write_dataset(config, str(tmp_path / "a"), progress=False)
  synthetic.write_dataset(config, str(tmp_path / "b"), progress=False)
  syn = config.synthetic
  assert len(first) == syn.num_train_videos + syn.num_validation_videos + syn.num_heldout_videos
  shards = sorted(name for name in os.listdir(tmp_path / "a") if name.endswith(".array_record"))
  assert shards and shards == sorted(n for n in os.listdir(tmp_path / "b") if n.endswith("record"))
  for name in shards:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert synthetic.is_complete(config, str(tmp_path / "a"))
  entries, meta = records.read_index(str(tmp_path / "a"))
  assert [e.split for e in entries].count("validation") == syn.num_validation_videos
  assert meta["fps"] == config.data.fps
  assert meta["geometry"] == records.geometry(config)   # what the pipeline checks configs against
  records.check_geometry(meta, config, "synthetic index")
  entry = entries[-1]
  record = records.read_shard_record(str(tmp_path / "a" / entry.shard), entry.position)
  assert record["video_id"] == entry.video_id and record["label"] == entry.label
  assert record["frames"].shape[0] == entry.num_frames

  # Resume: a missing shard is rewritten, byte-identical.
  victim = tmp_path / "a" / shards[0]
  original = victim.read_bytes()
  victim.unlink()
  os.remove(tmp_path / "a" / records.INDEX_FILE)
  assert not synthetic.is_complete(config, str(tmp_path / "a"))
  synthetic.write_dataset(config, str(tmp_path / "a"), progress=False)
  assert victim.read_bytes() == original

  # An index of the format without a geometry: incomplete; the rerun rewrites only the index.
  records.write_index(str(tmp_path / "a"), entries, {k: v for k, v in meta.items()
                                                    if k != records.GEOMETRY_KEY})
  shard_times = {n: os.path.getmtime(tmp_path / "a" / n) for n in shards}
  assert not synthetic.is_complete(config, str(tmp_path / "a"))
  synthetic.write_dataset(config, str(tmp_path / "a"), progress=False)
  assert synthetic.is_complete(config, str(tmp_path / "a"))
  assert {n: os.path.getmtime(tmp_path / "a" / n) for n in shards} == shard_times

  # Other settings in the same folder: refused, naming the file and the field.
  other = demo_config()
  other.synthetic.seed = 1
  with pytest.raises(ValueError, match=r"synthetic\.json.*synthetic"):
    synthetic.write_dataset(other, str(tmp_path / "a"), progress=False)


def test_write_mp4_files_decode_and_keep_sync(tmp_path, config):
  paths = synthetic.write_mp4_files(config, str(tmp_path), count=4)
  assert [os.path.basename(os.path.dirname(p)) for p in paths] == [
      f"class_{n % config.synthetic.num_classes}" for n in range(4)]
  scores = []
  for path in paths:
    media = video.read_av(path)
    assert media.frames.shape == (32, 64, 64, 3) and media.sample_rate == 16000
    waveform = media.audio[0, :51200]
    scores.append(sync.score_clip(media.frames, waveform, media.fps, media.sample_rate)[0])
  total = sync.aggregate(scores)
  assert total.true_positives >= 8 and total.f1 >= 0.9, total.as_dict()
