"""The autoencoder stage's quality signals on the demo's tiny preset: every signal is computed, in
range and logged (metrics.jsonl, TensorBoard, PNG and WAV files), and the real clips the decoded
ones are scored beside get a perfect sync score."""
import json
import os

import jax
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax import metrics
from mmldm_jax import parallel
from mmldm_jax.train import loop
from mmldm_jax.train import tasks
from mmldm_jax.train import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIGNALS = ("psnr_frames", "psnr_audio_image", "psnr_frames_other_latents",
           "psnr_audio_image_other_latents", "retrieval_v2a", "retrieval_a2v", "retrieval_chance",
           "class_accuracy", "sync_f1", "sync_f1_real", "frame_order_accuracy",
           "frame_order_chance", "sync_f1_decoded_video", "sync_f1_decoded_audio",
           "video_events_per_second", "audio_events_per_second", "real_video_events_per_second",
           "real_audio_events_per_second")


def test_autoencoder_quality_signals_are_computed_and_logged(tmp_path):
  from test_sample import filled, save_checkpoint
  from mmldm_jax.stages import data as data_stage
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  workdir = str(tmp_path)
  # What the vae stage leaves: a checkpoint (here of an untrained VAE, written without compiling a
  # training step) and the scale factor it measures on a training batch of the data.
  data_stage.ensure_dataset(config, workdir)
  vae_task = tasks.vae_task(config, workdir)
  size = config.data.image_size
  vae = weights.autoencoder_system(config, 1.0).vae
  save_checkpoint(config, workdir, vae_task, {"vae": filled(
      lambda key: vae.init(key, np.zeros((1, size, size, 3), np.float32))["params"],
      jax.random.key(2))}, 1)
  tasks.write_measured_scale_factor(config, workdir)
  factor = config_lib.resolve_scale_factor(config, workdir)
  task = tasks.autoencoder_task(config, workdir, factor)
  # One device: on the suite's 8 CPU devices a replicated program computes everything 8 times.
  # The parameters are placed on the mesh as training places them, so the program compiled ahead
  # below for their shardings is the same one, and comes from the compile cache.
  mesh = parallel.create_mesh(config, jax.devices()[:1])
  params = jax.device_put(jax.jit(lambda key: parallel.unbox(task.init(key)))(loop.init_key(0)),
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  frozen = task.frozen(mesh)

  scalars, images, sounds = task.evaluate(params, frozen, mesh)
  assert sorted(scalars) == sorted(SIGNALS)
  clips = len(tasks.validation_clips(config, workdir))
  assert clips == tasks.QUALITY_CLIPS and scalars["retrieval_chance"] == 1.0 / clips
  for name in ("retrieval_v2a", "retrieval_a2v", "class_accuracy"):
    assert scalars[name] * clips in range(clips + 1), (name, scalars[name])
  for name in SIGNALS[:4]:
    assert 0.0 < scalars[name] < 60.0, (name, scalars[name])   # an untrained decoder
  assert scalars["sync_f1_real"] == 1.0          # the originals: every bounce has its tone
  for name in ("sync_f1", "sync_f1_decoded_video", "sync_f1_decoded_audio"):
    assert 0.0 <= scalars[name] <= 1.0
  assert scalars["real_video_events_per_second"] > 0.5 and scalars["real_audio_events_per_second"] > 0.5
  frames = config.data.num_frames
  assert scalars["frame_order_chance"] == metrics.frame_order_chance(frames)
  assert scalars["frame_order_accuracy"] * clips * frames == pytest.approx(
      round(scalars["frame_order_accuracy"] * clips * frames))    # a share of decoded frames
  size = config.data.image_size
  # Two frames per clip in three rows (originals, own latents, other latents); audio images alike.
  assert images["autoencoder_frames"].shape == (3 * size, 2 * clips * size, 3)
  assert images["autoencoder_audio_image"].shape == (3 * size, clips * size, 3)
  assert images["autoencoder_frames"].dtype == np.uint8
  samples = config_lib.clip_samples(config)
  assert [sound.shape for sound in sounds.values()] == [(samples,)] * 2
  assert all(np.isfinite(sound).all() and np.abs(sound).max() > 0 for sound in sounds.values())

  # Compiled ahead on a second thread (as the training loop does), the same program: same values.
  evaluate, compile_ahead = tasks.autoencoder_quality_signals(
      config, workdir, weights.autoencoder_system(config, factor))
  compile_ahead(parallel.abstract_like(params), frozen, mesh)
  assert evaluate(params, frozen, mesh)[0] == scalars

  writer = metrics.MetricsWriter(str(tmp_path / "logs"), total_steps=7, global_batch_size=1,
                                 log_every=1)
  task.evaluate = lambda *args: (scalars, images, sounds)
  loop._write_quality_signals(task, params, frozen, mesh, 7, writer,   # noqa: SLF001
                              int(config.audio.sample_rate))
  writer.close()
  logged = json.loads((tmp_path / "logs" / "metrics.jsonl").read_text())
  assert logged == {"step": 7, **{f"eval/{name}": value for name, value in scalars.items()}}
  media = sorted(os.listdir(tmp_path / "logs" / "media"))
  assert media == ["eval_autoencoder_audio_image_7.png", "eval_autoencoder_frames_7.png",
                   "eval_autoencoder_sound_0_7.wav", "eval_autoencoder_sound_1_7.wav"]


def test_no_discriminator_without_the_adversarial_term(tmp_path):
  """gan_weight == 0 trains no discriminator: no parameters, no update group, and the one update
  runs on a batch without one."""
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  assert config.autoencoder.gan_weight == 0.0   # the demo trains without one
  config.autoencoder.gan_weight = 0.1
  with_gan = tasks.autoencoder_task(config, str(tmp_path), config.vae.scale_factor)
  assert with_gan.groups == ("autoencoder", "discriminator")
  config.autoencoder.gan_weight = 0.0
  task = tasks.autoencoder_task(config, str(tmp_path), config.vae.scale_factor)
  assert task.groups == ("autoencoder",)
  shapes = jax.eval_shape(task.init, loop.init_key(0))
  assert sorted(shapes) == ["autoencoder"]
  loss, aux = jax.eval_shape(
      lambda params, vae, batch: task.loss("autoencoder", params, vae, batch, jax.random.key(0), 0),
      parallel.unbox(shapes), _vae_shapes(config), _batch_shapes(config))
  assert loss.shape == () and "generator_gan_loss" not in aux


def _vae_shapes(config):
  from mmldm_jax.models import vae as vae_lib
  size = config.data.image_size
  return jax.eval_shape(lambda key: vae_lib.build_vae(config).init(
      key, jax.numpy.zeros((1, size, size, 3)))["params"], jax.random.key(0))


def _batch_shapes(config):
  size, batch = config.data.image_size, 2
  frames = lambda count: jax.ShapeDtypeStruct((batch, count, size, size, 3), np.float32)  # noqa: E731
  return {"key_frames": frames(len(config.data.key_frames)),
          "target_frames": frames(config.data.num_target_frames),
          "target_indices": jax.ShapeDtypeStruct((batch, config.data.num_target_frames), np.float32),
          "audio": jax.ShapeDtypeStruct((batch, config_lib.clip_samples(config)), np.float32),
          "label": jax.ShapeDtypeStruct((batch,), np.int32)}


def test_decoded_sync_signals_name_the_modality_that_lost_its_timing():
  """`tasks.decoded_sync_signals` on real clips standing in for decoded ones: perfect "decoding"
  scores like the originals on every row; a decoder whose sound belongs to another clip (the
  sounds shifted by one clip) keeps sync_f1_decoded_video at the real level and drops
  sync_f1_decoded_audio and sync_f1 to the shuffled-pairs level; silence finds no onset."""
  from mmldm_jax.data import synthetic
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  clips = [synthetic.generate_video(300 + n, n % config.synthetic.num_classes, config,
                                    seconds=config.data.num_frames / config.data.fps)
           for n in range(16)]
  frames = np.stack([clip["frames"][:config.data.num_frames] for clip in clips])
  samples = config_lib.clip_samples(config)
  audio = np.stack([clip["audio"][:samples] for clip in clips]).astype(np.float32)

  exact = tasks.decoded_sync_signals(config, frames, audio, frames, audio)
  assert exact["sync_f1_real"] > 0.95
  for name in ("sync_f1", "sync_f1_decoded_video", "sync_f1_decoded_audio"):
    assert exact[name] == exact["sync_f1_real"], (name, exact)
  assert exact["video_events_per_second"] == exact["real_video_events_per_second"] > 0.5

  wrong_sound = tasks.decoded_sync_signals(config, frames, audio, frames, np.roll(audio, 1, 0))
  assert wrong_sound["sync_f1_decoded_video"] == exact["sync_f1_real"]
  for name in ("sync_f1", "sync_f1_decoded_audio"):
    assert wrong_sound[name] < 0.5 * exact["sync_f1_real"], (name, wrong_sound)

  silent = tasks.decoded_sync_signals(config, frames, audio, frames, np.zeros_like(audio))
  assert silent["audio_events_per_second"] == 0.0 and silent["sync_f1_decoded_audio"] == 0.0


def test_posterior_cache_draws_the_latents_of_the_pixels(tmp_path):
  """With autoencoder.cache_vae_latents the step reads the frozen VAE's posterior moments, looked
  up by video, clip start, flip and frame positions; with the same rng they give the latents the
  step computes from the batch's pixels (float32 rounding apart: the VAE runs on other batches)."""
  from mmldm_jax.data import pipeline
  from mmldm_jax.stages import data as data_stage
  from mmldm_jax.train import posterior_cache
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  assert config.autoencoder.cache_vae_latents    # the demo trains from the cache
  workdir = str(tmp_path)
  folder = data_stage.ensure_dataset(config, workdir)
  mesh = parallel.create_mesh(config)
  task = tasks.autoencoder_task(config, workdir, 0.7)
  system = tasks.weights.autoencoder_system(config, 0.7)
  size = config.data.image_size
  vae_params = jax.jit(lambda key: system.vae.init(key, jax.numpy.zeros((1, size, size, 3))))(
      jax.random.key(3))["params"]
  source = pipeline.clip_source(config, "train", pipeline.RecordVideos(folder, "train"))
  cache = posterior_cache.build(config, system.vae, vae_params, source, mesh)
  frames = sum(source.videos.lengths)
  assert cache.frame_moments.shape[:2] == (2, frames)
  assert cache.audio_moments.shape[0] == len(source)
  assert cache.frame_moments.shape[-1] == 2 * config.vae.embed_dim

  batch = next(iter(pipeline.make_dataset(config, "train", batch_size=8, seed=1,
                                          hflip_prob=0.5, videos=source.videos)))
  assert 0 < batch["flipped"].sum() < 8      # both orientations are looked up
  with pytest.raises(RuntimeError, match="frozen"):
    task.to_model_batch(batch)                 # the cache comes with `frozen`
  cached = cache.model_batch(batch)
  pixels = {name: batch[name] for name in ("key_frames", "target_frames", "target_indices",
                                           "audio", "label")}
  latents = jax.jit(system.batch_latents)
  from_cache = latents(vae_params, cached, jax.random.key(5))
  from_pixels = latents(vae_params, pixels, jax.random.key(5))
  for name in ("audio", "keys", "targets"):
    scale = float(np.abs(from_pixels[name]).max())
    np.testing.assert_allclose(from_cache[name], from_pixels[name], rtol=0, atol=1e-4 * scale,
                               err_msg=name)
  other_draw = latents(vae_params, cached, jax.random.key(6))
  assert not np.allclose(other_draw["keys"], from_cache["keys"])   # sampled, not the mode

  # Never-flipped training data: the frames are encoded only as stored, and a mirrored clip is
  # refused by name instead of being looked up in frames that were never encoded.
  with config.unlocked():
    config.data.hflip_prob = 0.0
  unmirrored = posterior_cache.build(config, system.vae, vae_params, source, mesh)
  assert unmirrored.frame_moments.shape[:2] == (1, frames)
  np.testing.assert_array_equal(unmirrored.frame_moments[0], cache.frame_moments[0])
  with pytest.raises(ValueError, match="'flipped'"):
    unmirrored.model_batch(batch)
  as_stored = dict(batch, flipped=np.zeros_like(batch["flipped"]))
  np.testing.assert_array_equal(unmirrored.model_batch(as_stored)["key_moments"],
                                cache.model_batch(as_stored)["key_moments"])
