"""The generation chain end to end on tiny randomly initialised models: playable mp4 files with sound of
the clip's duration, wav and png beside them, index.json; resume skips complete samples and
regenerates missing ones bit-identically; a changed setting is refused; A2V keeps the real sound."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from mmldm_jax import config_lib
from mmldm_jax import sample
from mmldm_jax.data import synthetic
from mmldm_jax.data import video
from mmldm_jax.models import autoencoder as autoencoder_lib
from mmldm_jax.models import dit as dit_lib


def tiny_config(**sample_fields):
  config = config_lib.load("configs/demo.py:tiny")
  config.sample.update(dict(num_samples=2, batch_size=2, steps=2, guidance_audio=2.0,
                            guidance_video=2.0), **sample_fields)
  config.autoencoder.decode_steps = 2
  config.audio.griffin_lim_iters = 4
  return config


def random_models(config, seed=0):
  """Randomly initialised DiT, autoencoder and VAE (plain parameter trees)."""
  dit_key, ae_key, vae_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  dit = dit_lib.build_dit(config)
  system = autoencoder_lib.AutoencoderSystem(config)
  size = config.data.image_size
  # Jitted inits: one compile each (and cached on disk) instead of op-by-op dispatch.
  vae_params = jax.jit(lambda key: system.vae.init(key, np.zeros((1, size, size, 3), np.float32))[
      "params"])(vae_key)
  dit_params = jax.jit(lambda key: dit_lib.init_params(dit, key))(dit_key)
  ae_params = jax.jit(lambda key: system.init(key)["autoencoder"])(ae_key)
  return sample.Models(
      dit=dit, dit_params=nn.unbox(dit_params), system=system,
      autoencoder_params=nn.unbox(ae_params), vae_params=nn.unbox(vae_params), vocoder=None,
      description={"init": f"random:{seed}"})


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
  clips = sample.SplitClips(config, data, "validation")
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
