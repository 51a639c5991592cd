"""Configs: every real config loads, validates, and its tiny preset keeps the geometry consistent;
bad values fail with a message naming the field."""
import os
import subprocess
import sys

import pytest

from mmldm_jax import config_lib

from conftest import SUITE_CACHE_FLAG

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", ["aist", "landscape", "audioset", "demo"])
@pytest.mark.parametrize("preset", ["", ":tiny"])
def test_configs_load_and_validate(name, preset):
  config = config_lib.load(os.path.join(CONFIGS, f"{name}.py{preset}"))
  config_lib.validate(config)
  assert config.data.image_size % config_lib.vae_factor(config) == 0


def test_demo_quality_preset_shapes_the_latents_for_timing():
  from mmldm_jax.models import dit
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:quality"))
  config_lib.validate(config)
  assert len(config.data.key_frames) == 8 and config.dit.time_tokens
  assert dit.latent_shapes(config) == {"audio": (4, 4, 8), "video": (4, 4, 32)}
  # docs/results was made with one VAE target frame per clip; the demo itself uses both.
  assert config.vae.frames_per_clip == 1
  assert config_lib.load(os.path.join(CONFIGS, "demo.py")).vae.frames_per_clip == 0
  # ... and the tiny preset's VAE widths, where the demo keeps 16 channels at 32x32.
  assert config.vae.channel_mult == (1, 2, 2, 2)
  assert config_lib.load(os.path.join(CONFIGS, "demo.py")).vae.channel_mult == (1, 1, 2, 2)
  assert config.train_autoencoder.num_steps > config_lib.load(
      os.path.join(CONFIGS, "demo.py")).train_autoencoder.num_steps


def test_paper_numbers():
  aist = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  assert (aist.data.num_frames, aist.data.fps, aist.data.image_size) == (16, 10.0, 256)
  assert tuple(aist.data.key_frames) == (0, 5, 10, 15)
  assert (aist.audio.sample_rate, aist.audio.filterbank_sample_rate) == (44100, 22050)
  assert (aist.audio.n_fft, aist.audio.hop_length, aist.audio.win_length, aist.audio.num_mels,
          aist.audio.fmin, aist.audio.fmax) == (1024, 256, 1024, 80, 0.0, 8000.0)
  assert (aist.dit.depth, aist.dit.hidden_size, aist.dit.num_heads) == (28, 1152, 16)
  assert config_lib.clip_samples(aist) == 70560
  audioset = config_lib.load(os.path.join(CONFIGS, "audioset.py"))
  assert audioset.data.fps == 4.0 and config_lib.clip_samples(audioset) == 176400
  assert audioset.autoencoder.cls_weight == 0.0 and not audioset.autoencoder.classifier_head


def test_locked_config_rejects_unknown_field():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  with pytest.raises(AttributeError):
    config.data.imagesize = 3


@pytest.mark.parametrize("field,value,message", [
    ("data.image_size", 60, "config.data.image_size=60"),
    ("data.key_frames", (0, 5, 10, 20), "config.data.key_frames"),
    ("vae.frames_per_clip", 3, "config.vae.frames_per_clip=3: expected 0 .all. to "
     "data.num_target_frames=2"),
    ("stages", "data,bogus", "unknown: bogus"),
    ("synthetic.video_seconds", 1.0, "config.synthetic.video_seconds=1.0: expected videos of at "
     "least one clip"),
    ("sample.mode", "jiont", "config.sample.mode='jiont': expected one of 'joint', 'a2v'"),
    ("sample.steps", 0, "config.sample.steps=0: expected >= 1"),
    ("sample.shared_key_frame_noise", 1.5, "config.sample.shared_key_frame_noise=1.5: expected a "
     "share from 0 to 1"),
    ("autoencoder.video_latent_per_key_frame", False, "config.sample.shared_key_frame_noise=1.0: "
     "expected 0 unless autoencoder.video_latent_per_key_frame=True"),
    ("dit.shared_key_frame_noise", -0.5, "config.dit.shared_key_frame_noise=-0.5: expected a "
     "share from 0 to 1"),
    ("precision", "bf16", "config.precision='bf16': expected one of 'auto', 'float32'"),
    ("train_generator.nan_policy", "skp", "config.train_generator.nan_policy='skp'"),
    ("train_vae.decay", "linear", "config.train_vae.decay='linear'"),
    ("dit.remat_policy", "everything", "config.dit.remat_policy='everything'"),
    ("unet.remat_policy", "everything", "config.unet.remat_policy='everything'"),
    ("autoencoder.remat_policy", "nothing", "config.autoencoder.remat_policy='nothing'"),
    ("audio.image_size", 32, "config.audio.image_size=32: expected data.image_size=64"),
    ("unet.context_dim", 16, "config.unet.context_dim=16: expected autoencoder.semantic_dim=32"),
    ("autoencoder.classifier_head", False, "config.autoencoder.cls_weight=0.1: expected 0 with "
     "autoencoder.classifier_head=False"),
])
def test_validate_names_field(field, value, message):
  config = config_lib.load(os.path.join(CONFIGS, "demo.py"))
  section, _, key = field.rpartition(".")
  with config.unlocked():
    (config[section] if section else config)[key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    config_lib.validate(config)


def test_training_noise_shared_by_key_frames_needs_deterministic_ddim():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py"))
  with config.unlocked():
    config.dit.shared_key_frame_noise = 0.9
  config_lib.validate(config)
  with config.unlocked():
    config.sample.eta = 0.5
  with pytest.raises(ValueError, match="config.sample.eta=0.5: expected 0 with "
                     "dit.shared_key_frame_noise=0.9"):
    config_lib.validate(config)


def test_unrolling_the_stacked_layers_needs_stacked_layers():
  config = config_lib.load(os.path.join(CONFIGS, "demo.py"))
  config.dit.unroll_scanned_layers = True
  config_lib.validate(config)
  config.dit.scan_layers = False
  with pytest.raises(ValueError, match="config.dit.unroll_scanned_layers=True: expected False "
                     "unless dit.scan_layers=True"):
    config_lib.validate(config)


def test_class_conditional_dit_needs_classes():
  config = config_lib.load(os.path.join(CONFIGS, "audioset.py"))
  with config.unlocked():
    config.dit.class_conditional = True
  with pytest.raises(ValueError, match="config.dit.class_conditional=True: expected False with "
                     "data.num_classes=0"):
    config_lib.validate(config)


def run_main(workdir, *flags):
  """`python -m mmldm_jax.main` on the demo config with extra flags; the finished process."""
  return subprocess.run(
      [sys.executable, "-m", "mmldm_jax.main", f"--config={CONFIGS}/demo.py",
       f"--workdir={workdir}", SUITE_CACHE_FLAG, *flags], capture_output=True, text=True,
      timeout=300)


@pytest.mark.subprocess
def test_main_rejects_unknown_field_on_command_line(tmp_path):
  result = run_main(tmp_path, "--config.data.imagesize=64")
  assert result.returncode != 0
  assert "imagesize" in result.stderr


@pytest.mark.parametrize("name", ["aist", "landscape", "audioset", "demo"])
def test_unknown_preset_is_refused_naming_the_known_ones(name):
  with pytest.raises(ValueError, match="'tny' is not known.*tiny"):
    config_lib.load(os.path.join(CONFIGS, f"{name}.py:tny"))


@pytest.mark.subprocess
def test_main_refuses_a_bad_value_before_any_stage_runs(tmp_path):
  """A typo in a late stage's setting fails at once, before the data stage writes anything."""
  workdir = tmp_path / "run"
  result = run_main(workdir, "--config.sample.mode=jiont")
  assert result.returncode != 0
  assert "config.sample.mode='jiont'" in result.stderr
  assert not workdir.exists()


def test_classifier_head_is_an_explicit_switch_not_a_loss_weight():
  from mmldm_jax.models import autoencoder as autoencoder_lib
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  assert autoencoder_lib.use_classifier(config)
  with config.unlocked():
    config.autoencoder.cls_weight = 0.0          # the head stays: its parameters are still there
  config_lib.validate(config)
  assert autoencoder_lib.use_classifier(config)
  with config.unlocked():
    config.autoencoder.classifier_head = False
  config_lib.validate(config)
  assert not autoencoder_lib.use_classifier(config)
  audioset = config_lib.load(os.path.join(CONFIGS, "audioset.py:tiny"))
  assert not autoencoder_lib.use_classifier(audioset)


def test_main_runs_the_stage_that_makes_a_missing_input_first(monkeypatch):
  """A stage whose input is missing raises workdir.MissingInput naming the stage that makes it;
  main runs that one (and what it needs in turn) first, then the stage again."""
  import sys
  import types
  from mmldm_jax import main
  from mmldm_jax import workdir as workdir_lib
  calls, made = [], set()

  def fake_stage(name, needs=None):
    module = types.ModuleType(f"fake_stage_{name}")

    def run(config, workdir):
      if needs and needs not in made:
        raise workdir_lib.MissingInput(needs, f"no {needs} output yet")
      calls.append(name)
      made.add(name)
    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__

  monkeypatch.setattr(main, "STAGES", {"data": fake_stage("data"),
                                       "latents": fake_stage("latents", needs="data"),
                                       "generator": fake_stage("generator", needs="latents"),
                                       "loops": fake_stage("loops", needs="loops")})
  main.run_stage("generator", None, "/nonexistent")
  assert calls == ["data", "latents", "generator"]
  with pytest.raises(workdir_lib.MissingInput, match="no loops output yet"):
    main.run_stage("loops", None, "/nonexistent")   # a stage never runs itself first


def test_latent_shapes_follow_the_encoders_downsampling():
  """The generator's latent grids are the VAE latent over each encoder's downsampling: the paper's
  z_a at a quarter and z_v at half; an audio encoder one level shallower gives z_a at half."""
  from mmldm_jax.models import dit
  aist = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  assert dit.latent_shapes(aist) == {"audio": (8, 8, 16), "video": (16, 16, 16)}
  demo = config_lib.load(os.path.join(CONFIGS, "demo.py"))
  demo.autoencoder.audio_encoder.channel_mult = (1, 2)
  assert config_lib.encoder_factor(demo, "audio") == 2
  assert dit.latent_shapes(demo)["audio"] == (4, 4, demo.autoencoder.audio_z_channels)
