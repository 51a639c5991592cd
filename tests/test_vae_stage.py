"""The `vae` stage trained from scratch: it refuses to freeze a random encoder, measures the finished
VAE's scale factor (LDM's scale_by_std) into vae/scale_factor.json, and later stages read it."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax.models import vae as vae_lib
from mmldm_jax.train import loop
from mmldm_jax.train import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  config.train_vae.update(num_steps=2, checkpoint_every=2, log_every=1)
  return config


def test_a_frozen_random_encoder_is_refused(tmp_path):
  config = demo_config()
  config.vae.freeze_encoder = True
  with pytest.raises(ValueError, match="freeze_encoder=True with config.vae.pretrained_path=''"):
    stages.run_vae(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "vae")


def test_from_scratch_vae_measures_the_scale_factor_later_stages_use(tmp_path):
  config, workdir = demo_config(), str(tmp_path)
  assert config.vae.measure_scale_factor and not config.vae.freeze_encoder
  with pytest.raises(FileNotFoundError, match="vae/scale_factor.json does not exist"):
    config_lib.use_measured_scale_factor(config.copy_and_resolve_references(), workdir)

  stages.run_vae(config, workdir)
  path = tmp_path / "vae" / "scale_factor.json"
  factor = json.loads(path.read_text())["scale_factor"]
  assert factor > 1.0   # a young VAE's latents are far smaller than SD's (factor 0.18215)

  # The factor makes the latents of the first training batch unit-variance.
  task = stages.vae_task(config, workdir)
  params = loop.restore_params(config, workdir, task, parallel.create_mesh(config))["vae"]
  batch = next(iter(stages.clip_dataset_factory(config, workdir)(
      0, 1, config.train_vae.batch_size, config.seed)))
  images = stages._vae_images(config, {k: np.asarray(batch[k]) for k in ("target_frames", "audio")})
  scaled = vae_lib.build_vae(config).clone(scale_factor=factor).apply(
      {"params": params}, images[:16], method="encode_scaled")
  np.testing.assert_allclose(float(jnp.std(scaled)), 1.0, rtol=1e-3)

  later = config.copy_and_resolve_references()
  config_lib.use_measured_scale_factor(later, workdir)
  assert later.vae.scale_factor == factor
  unmeasured = config.copy_and_resolve_references()
  unmeasured.vae.measure_scale_factor = False
  config_lib.use_measured_scale_factor(unmeasured, workdir)
  assert unmeasured.vae.scale_factor == 0.18215

  # A rerun skips the finished stage and keeps the file; a broken file is named in the error.
  before = path.read_text()
  stages.run_vae(config, workdir)
  assert path.read_text() == before
  path.write_text(json.dumps({"scale_factor": -1.0}))
  with pytest.raises(ValueError, match="field 'scale_factor' is -1.0"):
    config_lib.use_measured_scale_factor(config.copy_and_resolve_references(), workdir)
  path.write_text('{"scale_factor": 5.2')           # cut short
  with pytest.raises(ValueError, match="scale_factor.json: not valid JSON"):
    config_lib.use_measured_scale_factor(config.copy_and_resolve_references(), workdir)
