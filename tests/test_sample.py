"""The generation chain end to end on tiny randomly initialised models: playable mp4 files with sound of
the clip's duration, wav and png beside them, index.json; resume skips complete samples and
regenerates missing ones bit-identically; a changed setting is refused; A2V keeps the real sound."""
import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import audio
from mmldm_jax.data import pipeline
from mmldm_jax.data import synthetic
from mmldm_jax.data import video
from mmldm_jax.models import autoencoder as autoencoder_lib
from mmldm_jax.models import dit as dit_lib
from mmldm_jax.stages import sample


def tiny_config(**sample_fields):
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  config.vae.measure_scale_factor = False   # random models here, no vae stage to measure one
  config.sample.update(dict(num_samples=2, batch_size=2, steps=2, guidance_audio=2.0,
                            guidance_video=2.0), **sample_fields)
  config.autoencoder.decode_steps = 2
  config.audio.griffin_lim_iters = 4
  return config


def filled(init, key):
  """Parameters of the structure `init(key)` makes, filled without running it (tracing only, so no
  big init compile): norm scales 1, biases 0, other weights normal / sqrt(fan-in)."""
  abstract = nn.unbox(jax.eval_shape(init, key))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  values = []
  for index, (path, leaf) in enumerate(leaves):
    name = str(getattr(path[-1], "key", path[-1]))
    if leaf.ndim <= 1 and "scale" in name:
      values.append(np.ones(leaf.shape, np.float32))
    elif leaf.ndim <= 1:
      values.append(np.zeros(leaf.shape, np.float32))
    else:
      noise = np.random.default_rng([int(jax.random.key_data(key).sum()), index])
      fan_in = int(np.prod(leaf.shape[:-1]))
      values.append((noise.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, values)


def random_models(config, seed=0):
  """Randomly initialised DiT, autoencoder and VAE, replicated over the config's mesh as the
  sample stage's restore places them (so both run the same programs, bit for bit)."""
  dit_key, ae_key, vae_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  dit = dit_lib.build_dit(config)
  system = autoencoder_lib.AutoencoderSystem(config)
  image = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
  replicated = jax.sharding.NamedSharding(parallel.create_mesh(config),
                                          jax.sharding.PartitionSpec())
  place = lambda tree: jax.device_put(tree, replicated)
  return sample.Models(
      dit=dit, dit_params=place(filled(lambda key: dit_lib.init_params(dit, key), dit_key)),
      system=system,
      autoencoder_params=place(filled(lambda key: system.init(key)["autoencoder"], ae_key)),
      vae_params=place(filled(lambda key: system.vae.init(key, image)["params"], vae_key)),
      vocoder=None, description={"init": f"random:{seed}"})


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def models(config):
  return random_models(config)


@pytest.fixture(scope="module")
def joint_folder(config, models, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("samples") / "joint")
  sample.write_samples(config, models, folder, progress=False)
  return folder


def test_joint_samples_are_playable_sounding_videos(config, joint_folder):
  index = sample.read_index(joint_folder)
  assert [entry["number"] for entry in index["samples"]] == [0, 1]
  assert index["settings"]["mode"] == "joint" and index["fps"] == config.data.fps
  clip_samples = config_lib.clip_samples(config)
  size = config.data.image_size
  for number in range(2):
    name = sample.sample_name(number)
    media = video.read_av(os.path.join(joint_folder, name + ".mp4"))
    assert media.frames.shape == (config.data.num_frames, size, size, 3)
    assert media.video_codec == "h264" and media.audio_codec == "aac"
    assert media.sample_rate == config.audio.sample_rate
    seconds = config.data.num_frames / config.data.fps
    assert media.duration == pytest.approx(seconds, abs=1e-6)
    # AAC ends on a 1024-sample frame: at most one frame of padding beyond the clip.
    assert clip_samples <= media.audio.shape[1] <= clip_samples + 1024
    assert media.audio_start == pytest.approx(0.0, abs=1e-3)
    with Image.open(os.path.join(joint_folder, name + ".png")) as png:
      assert png.size == (8 * size + sample.GRID_GAP + config.audio.image_size, size)
    import wave
    with wave.open(os.path.join(joint_folder, name + ".wav")) as wav:
      assert wav.getframerate() == config.audio.sample_rate
      assert wav.getnframes() == clip_samples


def test_contact_sheet_stacks_the_first_samples(joint_folder):
  rows = [np.asarray(Image.open(os.path.join(joint_folder, f"{sample.sample_name(n)}.png"))
                     .convert("RGB")) for n in range(2)]
  sheet = np.asarray(Image.open(os.path.join(joint_folder, sample.CONTACT_SHEET)))
  height = rows[0].shape[0]
  assert sheet.shape == (2 * height + 2,) + rows[0].shape[1:]
  np.testing.assert_array_equal(sheet[:height], rows[0])
  np.testing.assert_array_equal(sheet[height:height + 2], 255)
  np.testing.assert_array_equal(sheet[height + 2:], rows[1])


def test_resume_skips_complete_and_regenerates_identically(config, models, joint_folder):
  paths = {n: os.path.join(joint_folder, sample.sample_name(n)) for n in range(2)}
  kept_mtime = os.path.getmtime(paths[0] + ".mp4")
  with open(paths[1] + ".wav", "rb") as f:
    original = f.read()
  os.remove(paths[1] + ".mp4")        # an interrupted sample: not complete any more
  index = sample.write_samples(config, models, joint_folder, progress=False)
  assert len(index["samples"]) == 2
  assert os.path.getmtime(paths[0] + ".mp4") == kept_mtime
  assert os.path.exists(paths[1] + ".mp4")
  with open(paths[1] + ".wav", "rb") as f:
    assert f.read() == original      # deterministic from (seed, batch)
  # Everything complete: nothing is generated (models=None would fail if the chain ran).
  unused = sample.Models(None, None, None, None, None, None, models.description)
  sample.write_samples(config, unused, joint_folder, progress=False)
  assert os.path.getmtime(paths[0] + ".mp4") == kept_mtime


def test_changed_settings_are_refused(models, joint_folder):
  with pytest.raises(ValueError, match=r"steps: 2 -> 3.*delete"):
    sample.write_samples(tiny_config(steps=3), models, joint_folder, progress=False)


def test_mode_checks():
  with pytest.raises(ValueError, match="needs a continuation DiT"):
    sample.check_mode(tiny_config(mode="continuation"))
  with pytest.raises(ValueError, match="num_clips=2"):
    sample.check_mode(tiny_config(num_clips=2))
  with pytest.raises(ValueError, match="expected one of"):
    sample.check_mode(tiny_config(mode="t2v"))


def test_a2v_generates_video_for_real_sound(models, tmp_path):
  config = tiny_config(mode="a2v", num_samples=1)
  data = str(tmp_path / "data")
  synthetic.write_dataset(config, data, progress=False)
  clips = pipeline.SplitClips(config, data, "validation")
  assert len(clips) == 2 * (synthetic.num_video_frames(config) // config.data.num_frames)
  folder = str(tmp_path / "a2v")
  index = sample.write_samples(config, models, folder, clips=clips, progress=False)
  entry = index["samples"][0]
  assert entry["conditioning"] == {"split": "validation", "video_index": 0, "clip_start": 0,
                                   "label": int(clips[0]["label"])}
  import wave
  with wave.open(os.path.join(folder, entry["wav"])) as wav:
    written = np.frombuffer(wav.readframes(wav.getnframes()), "<i2") / 32767.0
  np.testing.assert_allclose(written, clips[0]["audio"], atol=1.0 / 32767)
  media = video.read_av(os.path.join(folder, entry["mp4"]))
  assert media.frames.shape[0] == config.data.num_frames


def test_class_conditional_a2v_reads_the_clips_labels(tmp_path):
  """A class-conditional DiT generates a2v video for the real clip's class: another label gives
  another video for the same sound, and a condition without labels is refused before anything
  runs; its joint samples' drawn classes are written to index.json."""
  config = tiny_config(mode="a2v", num_samples=1)
  config.dit.class_conditional = True
  models = random_models(config)
  chain = sample.Chain(config, models)
  data = str(tmp_path / "data")
  synthetic.write_dataset(config, data, progress=False)
  clip = pipeline.SplitClips(config, data, "validation")[0]
  condition = {"frames": clip["frames"][None], "audio": clip["audio"][None]}
  with pytest.raises(ValueError, match="needs the conditioning clips' 'label'"):
    chain.generate(jax.random.key(0), 1, condition)
  with pytest.raises(ValueError, match=r"labels \[4\] outside the DiT's classes 0..3"):
    chain.generate(jax.random.key(0), 1, dict(condition, label=np.asarray([4])))
  frames = [chain.generate(jax.random.key(0), 1, dict(condition, label=np.asarray([label])))[
      "frames"] for label in (int(clip["label"]), (int(clip["label"]) + 1) % 4)]
  assert np.any(frames[0] != frames[1])
  # Joint samples draw their classes, and index.json says which.
  joint = tiny_config(mode="joint", num_samples=2)
  joint.dit.class_conditional = True
  index = sample.write_samples(joint, models, str(tmp_path / "joint"), progress=False)
  labels = [entry["label"] for entry in sorted(index["samples"], key=lambda e: e["number"])]
  assert len(labels) == 2 and all(label in range(4) for label in labels), labels
  drawn = sample.Chain(joint, models).generate(
      jax.random.fold_in(jax.random.key(int(joint.sample.seed)), 0), 2)
  assert list(drawn["label"]) == labels


def save_checkpoint(config, workdir, task, params, step):
  """A checkpoint in the training loop's format (opt state zeros) holding the given parameters."""
  from mmldm_jax import checkpoint as checkpoint_lib
  from mmldm_jax import parallel
  from mmldm_jax.train import loop
  init_state, _ = loop.make_state_init(task)
  abstract = parallel.unbox(jax.eval_shape(init_state, jax.random.key(0)))
  state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
  for group, values in params.items():
    state["params"][group] = jax.tree.map(np.asarray, values)
  checkpointer = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, task.name),
                                             save_every=0, keep=1, async_save=False)
  checkpointer.save(step, state, force=True)
  checkpointer.close()


def test_reconstruction_decodes_the_real_clips_own_latents(models, tmp_path):
  """mode='reconstruction' runs no DiT: each sample is the autoencoder's decode of its real clip's
  latents, with the chain's decode key; the folder is scored like any other."""
  config = tiny_config(mode="reconstruction", num_samples=2)
  data = str(tmp_path / "data")
  synthetic.write_dataset(config, data, progress=False)
  clips = pipeline.SplitClips(config, data, "validation")
  without_dit = dataclasses.replace(models, dit_params=None)
  chain = sample.Chain(config, without_dit)
  condition = {"frames": np.stack([clips[i]["frames"] for i in (0, 1)]),
               "audio": np.stack([clips[i]["audio"] for i in (0, 1)])}
  key = jax.random.key(3)
  result = chain.generate(key, 2, condition)
  audio_latent, video_latent = chain.encode_condition(condition)
  frames, audio_image = models.system.decode(
      models.autoencoder_params, models.vae_params, audio_latent, video_latent,
      jax.random.fold_in(jax.random.split(key)[1], 0))
  np.testing.assert_array_equal(result["frames"], video.to_uint8(np.asarray(frames)))
  np.testing.assert_array_equal(result["audio_image"], np.asarray(audio_image))
  folder = str(tmp_path / "reconstruction")
  index = sample.write_samples(config, without_dit, folder, clips=clips, progress=False)
  assert [entry["conditioning"]["clip_start"] for entry in index["samples"]] == [0, 16]
  assert index["settings"]["mode"] == "reconstruction"


def test_stage_restores_checkpoints_and_matches_the_chain(config, models, joint_folder, tmp_path):
  """`run` restores the generator / autoencoder / vae checkpoints of a workdir and writes the same
  samples the chain writes from those parameters directly."""
  from mmldm_jax.train import tasks
  workdir = str(tmp_path)
  synthetic.write_dataset(config, os.path.join(workdir, "data"), progress=False)
  save_checkpoint(config, workdir, tasks.generator_task(config, workdir),
                  {"dit": models.dit_params}, 4)
  save_checkpoint(config, workdir,
                  tasks.autoencoder_task(config, workdir, config.vae.scale_factor),
                  {"autoencoder": models.autoencoder_params}, 4)
  save_checkpoint(config, workdir, tasks.vae_task(config, workdir), {"vae": models.vae_params}, 4)
  sample.run(config, workdir)
  folder = workdir_lib.samples_dir(workdir, "joint")
  index = sample.read_index(folder)
  assert index["settings"]["models"] == {"generator_step": 4, "autoencoder_step": 4,
                                         "vae_step": 4}
  for number in range(2):
    name = sample.sample_name(number) + ".wav"
    with open(os.path.join(folder, name), "rb") as ours, \
         open(os.path.join(joint_folder, name), "rb") as direct:
      written, expected = (np.frombuffer(f.read()[44:], "<i2").astype(int) for f in (ours, direct))
    # The same parameters on the same devices run the same programs: equal bit for bit.
    np.testing.assert_array_equal(written, expected)
  mtime = os.path.getmtime(os.path.join(folder, "sample_0000.mp4"))
  sample.run(config, workdir)                        # complete: skipped
  assert os.path.getmtime(os.path.join(folder, "sample_0000.mp4")) == mtime


def test_generator_quality_signals_are_the_sample_stage_samples_scored(config, models,
                                                                       joint_folder, tmp_path):
  """The generator stage's quality signals sample through the same chain as the `sample` stage
  (same settings and seed: the same first samples), and score them like the evaluate stage."""
  from mmldm_jax.train import tasks
  workdir = str(tmp_path)
  synthetic.write_dataset(config, os.path.join(workdir, "data"), progress=False)
  save_checkpoint(config, workdir,
                  tasks.autoencoder_task(config, workdir, config.vae.scale_factor),
                  {"autoencoder": models.autoencoder_params}, 4)
  save_checkpoint(config, workdir, tasks.vae_task(config, workdir), {"vae": models.vae_params}, 4)
  task = tasks.generator_task(config, workdir)
  scalars, images, sounds = task.evaluate({"dit": models.dit_params}, None,
                                          parallel.create_mesh(config))
  assert sorted(scalars) == sorted([
      "sync_f1", "sync_f1_shuffled", "sync_f1_shuffled_all_pairs", "video_events_per_second",
      "audio_events_per_second", "real_video_events_per_second", "real_audio_events_per_second"])
  for name in ("sync_f1", "sync_f1_shuffled", "sync_f1_shuffled_all_pairs"):
    assert 0.0 <= scalars[name] <= 1.0, (name, scalars[name])
  # The synthetic clips bounce about config.synthetic.events_per_second times a second.
  assert 0.5 * config.synthetic.events_per_second < scalars["real_video_events_per_second"]
  assert 0.5 * config.synthetic.events_per_second < scalars["real_audio_events_per_second"]
  sheet = images["generator_samples"]
  first_row = np.asarray(Image.open(os.path.join(joint_folder, "sample_0000.png")))
  assert sheet.shape == (tasks.QUALITY_CLIPS * first_row.shape[0],) + first_row.shape[1:]
  np.testing.assert_array_equal(sheet[:first_row.shape[0]], first_row)
  with open(os.path.join(joint_folder, "sample_0000.wav"), "rb") as written:
    pcm = np.frombuffer(written.read()[44:], "<i2")
  np.testing.assert_array_equal(
      np.round(np.clip(sounds["generator_sound_0"], -1, 1) * 32767).astype("<i2"), pcm)

  # The chain compiled ahead on a second thread (as the training loop does): the same samples.
  evaluate, compile_ahead = tasks.generator_quality_signals(config, workdir, models.dit)
  mesh = parallel.create_mesh(config)
  compile_ahead({"dit": parallel.abstract_like(models.dit_params)}, None, mesh)
  ahead_scalars, ahead_images, ahead_sounds = evaluate({"dit": models.dit_params}, None, mesh)
  assert ahead_scalars == scalars
  np.testing.assert_array_equal(ahead_images["generator_samples"], sheet)
  np.testing.assert_array_equal(ahead_sounds["generator_sound_0"], sounds["generator_sound_0"])


def test_latents_stage_writes_every_clip_window_with_its_place(config, models, tmp_path):
  """The `latents` stage encodes every training clip window in source order, with the video and
  first frame that continuation training pairs clips by."""
  from mmldm_jax.stages import latents as latents_stage
  from mmldm_jax.data import latents as latents_lib
  from mmldm_jax.train import tasks
  workdir = str(tmp_path)
  synthetic.write_dataset(config, os.path.join(workdir, "data"), progress=False)
  save_checkpoint(config, workdir,
                  tasks.autoencoder_task(config, workdir, config.vae.scale_factor),
                  {"autoencoder": models.autoencoder_params}, 4)
  save_checkpoint(config, workdir, tasks.vae_task(config, workdir), {"vae": models.vae_params}, 4)
  latents_stage.run(config, workdir)
  clips = pipeline.clip_source(config, "train", pipeline.RecordVideos(
      os.path.join(workdir, "data"), "train"))
  source = latents_lib.LatentSource(workdir_lib.latents_dir(workdir))
  assert len(source) == len(clips)
  for row in (0, 1, len(clips) // 2, len(clips) - 1):
    item = source[row]
    assert (int(item["video_index"]), int(item["clip_start"])) == clips.locate(row)
    assert np.all(np.isfinite(item["video_latent"])) and np.abs(item["video_latent"]).max() > 0
  pairs = latents_lib.ContinuationPairs(source, config.data.num_frames)
  per_video = [length - config.data.num_frames + 1 for length in clips.videos.lengths]
  assert len(pairs) == sum(max(0, count - config.data.num_frames) for count in per_video) > 0


def test_continuation_joins_clips_in_time(models, tmp_path, monkeypatch):
  """Two clips joined into one sample; with a class-conditional DiT the second clip is drawn for
  the class the first one drew (not a class of its own), and index.json records it."""
  config = tiny_config(mode="continuation", num_clips=2)
  config.dit.update(continuation=True, class_conditional=True)
  given_labels = []
  original = dit_lib.sample_latents

  def recording(*args, labels=None, **kwargs):
    given_labels.append(labels is not None)
    return original(*args, labels=labels, **kwargs)
  monkeypatch.setattr(dit_lib, "sample_latents", recording)
  dit = dit_lib.build_dit(config)
  continuing = sample.Models(
      dit=dit, dit_params=filled(lambda key: dit_lib.init_params(dit, key), jax.random.PRNGKey(3)),
      system=models.system, autoencoder_params=models.autoencoder_params,
      vae_params=models.vae_params, vocoder=None, description={"init": "random:3"})
  folder = str(tmp_path / "continuation")
  index = sample.write_samples(config, continuing, folder, progress=False)
  entry = index["samples"][0]
  assert given_labels == [False, True]   # traced once per clip: drawn, then the first clip's
  assert entry["label"] in range(config.data.num_classes)
  clip_samples = config_lib.clip_samples(config)
  assert entry["num_frames"] == 2 * config.data.num_frames
  assert entry["num_audio_samples"] == 2 * clip_samples
  media = video.read_av(os.path.join(folder, entry["mp4"]))
  assert media.duration == pytest.approx(2 * config.data.num_frames / config.data.fps, abs=1e-6)
  assert 2 * clip_samples <= media.audio.shape[1] <= 2 * clip_samples + 1024
  with Image.open(os.path.join(folder, entry["png"])) as png:
    size = config.data.image_size
    assert png.size == (8 * size + sample.GRID_GAP + 2 * config.audio.image_size, size)


def test_vocoder_turns_the_audio_image_into_the_clip_waveform(models):
  """With config.vocoder set, the chain's audio goes through HiFi-GAN (a random one here, shaped
  for the demo's 64-mel, hop-128 audio)."""
  from mmldm_jax.models import vocoder as vocoder_lib
  config = tiny_config()
  config.vocoder.update(upsample_rates=(8, 4, 2, 2), upsample_kernel_sizes=(16, 8, 4, 4),
                        num_mels=64, sample_rate=16000)
  vocoder_lib.check_mel_matches(config)
  generator = vocoder_lib.generator_from_config(config)
  params = nn.unbox(vocoder_lib.init_params(config, jax.random.PRNGKey(4)))
  apply_fn = jax.jit(lambda p, mel: generator.apply({"params": p}, mel))
  chain = sample.Chain(config, dataclasses.replace(models, vocoder=(apply_fn, params)))
  waveform = np.asarray(audio.waveform_to_image(
      np.sin(np.arange(config_lib.clip_samples(config)) * 0.3)[None], config.audio))
  result = np.asarray(chain._waveform(params, waveform))
  mel = audio.image_to_mel(waveform, 64, chain.mel_frames)
  expected = np.asarray(apply_fn(params, np.swapaxes(np.asarray(mel), -1, -2)))
  assert result.shape == (1, config_lib.clip_samples(config))
  assert expected.shape[-1] >= result.shape[-1]
  np.testing.assert_allclose(result, expected[:, :result.shape[1]], atol=1e-5)
  assert np.std(result) > 0


def test_a_folder_of_samples_refuses_other_sampling_settings(tmp_path):
  """Every setting that changes sample i is in the folder's settings, so a resumed or re-evaluated
  folder never mixes samples of two settings (the starting noise's shared part was missing:
  samples from shared and independent noise were taken for one set)."""
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  base = sample.sample_settings(config, {"generator_step": 4})
  changes = {"shared_key_frame_noise": 0.5 if config.sample.shared_key_frame_noise != 0.5 else 0.0,
             "joint_order": "video_first", "guidance_drops": "given",
             "steps": config.sample.steps + 1, "seed": config.sample.seed + 1}
  for name, value in changes.items():
    changed = config.copy_and_resolve_references()
    changed.sample[name] = value
    settings = sample.sample_settings(changed, {"generator_step": 4})
    assert settings != base, name
    with pytest.raises(ValueError, match=name):
      sample._check_settings(str(tmp_path), {"settings": base}, settings)
