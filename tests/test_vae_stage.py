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
from mmldm_jax.stages import vae as vae_stage
from mmldm_jax.train import loop
from mmldm_jax.train import tasks
from mmldm_jax.train import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py") + ":tiny")
  config.train_vae.update(num_steps=2, checkpoint_every=2, log_every=1)
  return config


def test_a_frozen_random_encoder_is_refused(tmp_path):
  config = demo_config()
  config.vae.freeze_encoder = True
  with pytest.raises(ValueError, match="freeze_encoder=True with config.vae.pretrained_path=''"):
    vae_stage.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "vae")


def test_from_scratch_vae_measures_the_scale_factor_later_stages_use(tmp_path):
  config, workdir = demo_config(), str(tmp_path)
  assert config.vae.measure_scale_factor and not config.vae.freeze_encoder
  with pytest.raises(FileNotFoundError, match="vae/scale_factor.json does not exist"):
    config_lib.resolve_scale_factor(config, workdir)

  vae_stage.run(config, workdir)
  # Quality signals at the last step (eval_every is larger than the run): reconstruction PSNR and
  # L1 of validation frames and audio images in metrics.jsonl, pictures in TensorBoard.
  logs = tmp_path / "vae" / "logs"
  records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
  quality = [r for r in records if "eval/psnr_frames" in r]
  assert [r["step"] for r in quality] == [2]
  for name in ("psnr_frames", "psnr_audio_image"):
    assert 0.0 < quality[0][f"eval/{name}"] < 60.0, quality[0]   # a 2-step VAE: far from exact
  for name in ("l1_frames", "l1_audio_image"):
    assert 0.0 < quality[0][f"eval/{name}"] < 2.0, quality[0]
  # Synthetic data: whole clips reconstructed and scored for sync, modality by modality.
  assert quality[0]["eval/sync_f1_real"] == 1.0, quality[0]
  for name in ("sync_f1", "sync_f1_decoded_video", "sync_f1_decoded_audio"):
    assert 0.0 <= quality[0][f"eval/{name}"] <= 1.0, quality[0]
  assert quality[0]["eval/real_video_events_per_second"] > 0.5, quality[0]
  events = [f for f in os.listdir(logs) if f.startswith("events.out.tfevents")]
  assert events and b"eval/vae_frames" in b"".join((logs / f).read_bytes() for f in events)
  path = tmp_path / "vae" / "scale_factor.json"
  factor = json.loads(path.read_text())["scale_factor"]
  assert factor > 1.0   # a young VAE's latents are far smaller than SD's (factor 0.18215)

  # The factor makes the latents of the first training batch unit-variance.
  task = tasks.vae_task(config, workdir)
  params = loop.restore_params(config, workdir, task, parallel.create_mesh(config))["vae"]
  batch = next(iter(tasks.clip_dataset_factory(config, workdir)(
      0, 1, config.train_vae.batch_size, config.seed)))
  images = tasks._vae_images(config, {k: np.asarray(batch[k]) for k in ("target_frames", "audio")})
  scaled = vae_lib.build_vae(config).clone(scale_factor=factor).apply(
      {"params": params}, images[:16], method="encode_scaled")
  np.testing.assert_allclose(float(jnp.std(scaled)), 1.0, rtol=1e-3)

  # Later stages resolve the factor from the file; the config itself is never rewritten.
  assert config_lib.resolve_scale_factor(config, workdir) == factor
  assert config.vae.scale_factor == 0.18215
  system = weights.autoencoder_system(config, factor)
  assert system.vae.scale_factor == factor and config.vae.scale_factor == 0.18215
  unmeasured = config.copy_and_resolve_references()
  unmeasured.vae.measure_scale_factor = False
  assert config_lib.resolve_scale_factor(unmeasured, workdir) == 0.18215

  # A rerun skips the finished stage and keeps the file; a broken file is named in the error.
  before = path.read_text()
  vae_stage.run(config, workdir)
  assert path.read_text() == before
  path.write_text(json.dumps({"scale_factor": -1.0}))
  with pytest.raises(ValueError, match="field 'scale_factor' is -1.0"):
    config_lib.resolve_scale_factor(config, workdir)
  path.write_text('{"scale_factor": 5.2')           # cut short
  with pytest.raises(ValueError, match="scale_factor.json: not valid JSON"):
    config_lib.resolve_scale_factor(config, workdir)


def test_psnr_is_capped_for_identical_images_and_falls_with_noise():
  from mmldm_jax import metrics
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  same = np.asarray(metrics.psnr(images, images))
  np.testing.assert_allclose(same, 10 * np.log10(4.0 / metrics.PSNR_MIN_MSE), rtol=1e-6)
  scores = [float(np.mean(metrics.psnr(images + sigma * rng.normal(size=images.shape), images)))
            for sigma in (0.01, 0.1, 0.5)]
  assert scores[0] > scores[1] > scores[2]
  # Gaussian noise of std s on a range of 2: PSNR = 10 log10(4 / s^2).
  np.testing.assert_allclose(scores[1], 10 * np.log10(4 / 0.01), atol=0.5)


def test_non_finite_quality_signal_stops_naming_stage_step_and_signal(tmp_path):
  from mmldm_jax import metrics
  task = tasks.vae_task(demo_config(), str(tmp_path))
  task.evaluate = lambda params, frozen, mesh: (
      {"psnr_frames": float("nan"), "l1_frames": 0.1}, {}, {})
  writer = metrics.MetricsWriter(str(tmp_path / "logs"), total_steps=4, global_batch_size=1,
                                 log_every=1)
  with pytest.raises(FloatingPointError, match="stage vae: quality signal.*eval/psnr_frames.*step 3"):
    loop._write_quality_signals(task, {}, None, None, 3, writer, 16000)   # noqa: SLF001
  task.train_config.nan_policy = "skip"
  loop._write_quality_signals(task, {}, None, None, 4, writer, 16000)  # noqa: SLF001
  writer.close()
  logged = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert logged == [{"step": 4, "eval/l1_frames": 0.1}]
