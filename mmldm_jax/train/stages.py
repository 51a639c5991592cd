"""The training stages as `Task`s for `train/loop.py`, and their `run(config, workdir)` entry points.

  vae          stage-0 image VAE (decoder fine-tuned on frames and audio images) + PatchGAN
  autoencoder  the multi-modal autoencoder + its 3-frame discriminator, VAE frozen
  generator    the joint audio-video DiT on precomputed latents (`latents` stage, train/latents.py)

Stage order and inputs: `data` writes `<workdir>/data` (or `config.data.data_dir` holds ingested
records); `vae` starts from `config.vae.pretrained_path` (SD VAE weights) or random; `autoencoder`
freezes the `vae` stage's final parameters (or, without that stage in the workdir, the pretrained SD
VAE); `latents` encodes the training clips with the frozen autoencoder; `generator` trains on those.
A stage whose input is missing runs the stage that makes it: the training stages run `data` for the
synthetic source, `generator` runs `latents`.
Each stage is skipped when its final checkpoint exists and resumes from its latest one otherwise.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from mmldm_jax import config_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import pipeline
from mmldm_jax.train import loop

# Clip fields each stage's loss reads (the rest of the pipeline's dict stays on the host).
_AUTOENCODER_FIELDS = ("key_frames", "target_frames", "target_indices", "audio", "label")


def data_folder(config, workdir: str) -> str:
  """The training records' folder (config.data.data_dir, else `<workdir>/data`). With the synthetic
  source and no dataset yet, runs the `data` stage first (single process), so the training stages
  also work without 'data' in config.stages."""
  from mmldm_jax.data import stage as data_stage
  folder = data_stage.data_folder(config, workdir)
  if not os.path.exists(os.path.join(folder, "index.json")):
    if config.data.source == "synthetic" and jax.process_count() == 1:
      logging.info("no dataset in %s yet: running the data stage first", folder)
      data_stage.run(config, workdir)
    else:
      raise FileNotFoundError(
          f"no dataset index at {os.path.join(folder, 'index.json')}: run the `data` stage first "
          f"(config.stages starting with 'data') or set config.data.data_dir to ingested records")
  return folder


def clip_dataset_factory(config, workdir: str, *, hflip_prob: float | None = None):
  """(process_index, process_count, per_host_batch, seed) -> the shuffled, repeating clip dataset."""
  def make(process_index, process_count, batch_size, seed):
    folder = data_folder(config, workdir)  # here, not earlier: restoring a task reads no data
    return pipeline.make_dataset(
        config, "train", process_index=process_index, process_count=process_count,
        batch_size=batch_size, seed=seed, hflip_prob=hflip_prob,
        videos=pipeline.RecordVideos(folder, "train"))
  return make


def _select(fields):
  def to_model_batch(host_batch):
    return {name: np.asarray(host_batch[name]) for name in fields}
  return to_model_batch


# ------------------------------------------------------------------------------------------------
# vae
# ------------------------------------------------------------------------------------------------
def vae_task(config, workdir: str) -> loop.Task:
  """Stage 0: the SD KL-f8 VAE fine-tuned on the clips' target frames and audio images (the
  reference's `tar_frames` + `audio_img`), encoder frozen by `config.vae.freeze_encoder`; starts from
  config.vae.pretrained_path when set."""
  from mmldm_jax.models import vae as vae_lib  # model modules load only for the stage that runs
  dtype = loop.compute_dtype(config)
  vae = vae_lib.build_vae(config, dtype=dtype)
  disc = vae_lib.build_discriminator(config, dtype=dtype)
  size = config.data.image_size

  def init(rng):
    vae_rng, disc_rng = jax.random.split(rng)
    image = jnp.zeros((1, size, size, 3))
    return {"vae": vae.init(vae_rng, image)["params"],
            "discriminator": disc.init(disc_rng, image)["params"]}

  images_of = lambda batch: _vae_images(config, batch)
  perceptual = None
  if config.vae.lpips_path:
    from mmldm_jax.models import lpips as lpips_lib
    perceptual = lpips_lib.load_lpips_distance(config)

  def loss(group, params, frozen, batch, rng, step):
    del frozen
    images = images_of(batch)
    if group == "vae":
      value, aux = vae_lib.generator_loss(params["vae"], params["discriminator"], images, rng, step,
                                          config=config, vae=vae, disc=disc, perceptual=perceptual)
      aux.pop("reconstructions")
      return value, aux
    # As the reference's second optimiser: a fresh reconstruction by the just-updated VAE.
    reconstructions, _ = vae.apply({"params": params["vae"]}, images, rng)
    return vae_lib.discriminator_loss(params["discriminator"], images, reconstructions, step,
                                      config=config, disc=disc)

  return loop.Task(
      name="vae", train_config=config.train_vae, rules_family="conv",
      groups=("vae", "discriminator"), init=init, loss=loss,
      make_dataset=clip_dataset_factory(config, workdir),
      to_model_batch=_select(("target_frames", "audio")),
      pretrained=(lambda: {"vae": _pretrained_vae(config)}) if config.vae.pretrained_path else None,
      trainable={"vae": lambda params: vae_lib.trainable_mask(params, config)},
      evaluate=vae_quality_signals(config, workdir, vae))


# Validation clips the quality signals are computed on (evenly spaced over the split).
QUALITY_CLIPS = 8


def validation_clips(config, workdir: str, count: int = QUALITY_CLIPS) -> list[dict[str, Any]]:
  """`count` clips evenly spaced over the validation split (fewer when the split has fewer)."""
  clips = pipeline.clip_source(config, "validation", pipeline.RecordVideos(
      data_folder(config, workdir), "validation"))
  if not len(clips):
    raise ValueError(f"the validation split of {data_folder(config, workdir)} has no clip: the "
                     f"quality signals need one (or set train_*.eval_every=0)")
  picks = np.unique(np.linspace(0, len(clips) - 1, min(count, len(clips))).round().astype(int))
  return [clips[int(index)] for index in picks]


def _image_rows(*rows) -> np.ndarray:
  """uint8 [rows * H, N * W, 3]: each row a batch [N, H, W, 3] in [-1, 1] side by side."""
  from mmldm_jax.data import video as video_lib
  return np.concatenate([np.concatenate(list(video_lib.to_uint8(np.asarray(row))), axis=1)
                         for row in rows], axis=0)


def vae_quality_signals(config, workdir: str, vae):
  """The vae stage's quality signals (`loop.Task.evaluate`): reconstruction PSNR (dB, images in
  [-1, 1], capped as `metrics.psnr` says) and L1 of the first and middle frame and of the audio
  image of `QUALITY_CLIPS` validation clips, through the posterior mode; images: the originals
  above their reconstructions."""
  from mmldm_jax import metrics as metrics_lib
  from mmldm_jax.data import video as video_lib
  held = {}

  @jax.jit
  def reconstruct(vae_params, frames, audio):
    audio_image = audio_lib.waveform_to_image(audio, config.audio).astype(frames.dtype)
    originals = jnp.concatenate([frames, audio_image], axis=0)
    reconstructions, _ = vae.apply({"params": vae_params}, originals, None)
    return originals, jnp.clip(reconstructions, -1.0, 1.0)

  def evaluate(params, mesh):
    if not held:
      clips = validation_clips(config, workdir)
      frames = np.stack([clip["frames"][[0, int(clip["valid_frames"]) // 2]] for clip in clips])
      held["frames"] = video_lib.to_float(frames.reshape((-1,) + frames.shape[2:]))
      held["audio"] = np.stack([clip["audio"] for clip in clips]).astype(np.float32)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    originals, reconstructions = reconstruct(
        params["vae"], *(jax.device_put(held[k], replicated) for k in ("frames", "audio")))
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    count = len(held["frames"])
    scalars = {}
    for name, part in (("frames", slice(0, count)), ("audio_image", slice(count, None))):
      scalars[f"psnr_{name}"] = float(np.mean(metrics_lib.psnr(reconstructions[part],
                                                               originals[part])))
      scalars[f"l1_{name}"] = float(np.mean(np.abs(reconstructions[part] - originals[part])))
    images = {"vae_frames": _image_rows(originals[:count][:8], reconstructions[:count][:8]),
              "vae_audio_image": _image_rows(originals[count:][:8],
                                             reconstructions[count:][:8])}
    return scalars, images
  return evaluate


def _vae_images(config, batch):
  """What the VAE stage trains on: a batch's target frames and audio images, [N, H, W, 3]."""
  frames = batch["target_frames"]
  frames = frames.reshape((-1,) + frames.shape[2:])
  audio_image = audio_lib.waveform_to_image(batch["audio"], config.audio)
  return jnp.concatenate([frames, audio_image.astype(frames.dtype)], axis=0)


def _host_copy(array):
  """The whole value of a (possibly multi-host sharded) array, as numpy on this host."""
  if getattr(array, "is_fully_addressable", True):
    return np.asarray(array)
  return multihost_utils.process_allgather(array)


def write_measured_scale_factor(config, workdir: str, max_images: int = 16) -> float:
  """Measures the finished VAE's scale factor (1 / std of the latents, LDM's scale_by_std) on the
  first training batch of every process, at most `max_images` images each, and writes it to
  `<workdir>/vae/scale_factor.json` (process 0). Returns the factor; reads it back when the file
  exists."""
  from mmldm_jax import parallel
  from mmldm_jax.models import vae as vae_lib
  path = os.path.join(workdir, config_lib.SCALE_FACTOR_FILE)
  if os.path.exists(path):
    return config_lib.read_scale_factor(path)
  task = vae_task(config, workdir)
  mesh = parallel.create_mesh(config)
  params = loop.restore_params(config, workdir, task, mesh)["vae"]
  params = jax.tree_util.tree_map(_host_copy, params)
  processes = jax.process_count()
  per_host = max(1, int(config.train_vae.batch_size) // processes)
  dataset = clip_dataset_factory(config, workdir)(jax.process_index(), processes, per_host,
                                                  int(config.seed))
  batch = next(iter(dataset))
  images = np.asarray(_vae_images(config, {k: np.asarray(batch[k]) for k in
                                           ("target_frames", "audio")}))[:max_images]
  factor = vae_lib.measured_scale_factor(vae_lib.build_vae(config), params, images)
  # Every process measured its own images: pool the variances so all agree on one factor.
  variances = multihost_utils.process_allgather(np.float64(1.0 / factor ** 2))
  factor = float(1.0 / np.sqrt(np.mean(variances)))
  if jax.process_index() == 0:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
      json.dump({"scale_factor": factor, "images_per_process": int(len(images)),
                 "processes": processes}, f, indent=2)
    os.replace(temporary, path)
  multihost_utils.sync_global_devices("vae scale factor written")
  logging.info("vae: measured scale factor %.6g (latent std %.4g) -> %s", factor, 1.0 / factor,
               path)
  return factor


def _pretrained_vae(config):
  """SD VAE params from config.vae.pretrained_path (converted msgpack or a torch/safetensors file)."""
  from mmldm_jax.convert import vae as convert_vae
  logging.info("vae: weights from %s", config.vae.pretrained_path)
  return convert_vae.load_vae_params(config.vae.pretrained_path, config)


def _pretrained_unet(config):
  """SD-1.5 U-Net params for the autoencoder's diffusion decoder (the reference initialises it so)."""
  from mmldm_jax.convert import unet as convert_unet
  logging.info("autoencoder: U-Net weights from %s", config.unet.pretrained_path)
  return {"unet": convert_unet.load_unet_params(config.unet.pretrained_path, config)}


def frozen_vae_params(config, workdir: str, mesh):
  """The `vae` stage's final parameters on `mesh`, or (no vae checkpoint in the workdir) the pretrained
  SD VAE of config.vae.pretrained_path, replicated. Fails naming both when neither exists."""
  if loop.has_checkpoint(workdir, "vae"):
    return loop.restore_params(config, workdir, vae_task(config, workdir), mesh)["vae"]
  if config.vae.pretrained_path:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(_pretrained_vae(config), replicated)
  raise FileNotFoundError(
      f"no VAE: {loop.checkpoint_dir(workdir, 'vae')} has no checkpoint and "
      f"config.vae.pretrained_path is empty; run the `vae` stage first or give SD VAE weights")


# ------------------------------------------------------------------------------------------------
# autoencoder
# ------------------------------------------------------------------------------------------------
def autoencoder_system(config):
  from mmldm_jax.models import autoencoder as autoencoder_lib
  return autoencoder_lib.AutoencoderSystem(config, dtype=loop.compute_dtype(config))


def autoencoder_task(config, workdir: str) -> loop.Task:
  """The multi-modal autoencoder and its discriminator, updated in turn on each batch (the reference's
  two AdamW optimisers, alternating every step), with the VAE frozen."""
  system = autoencoder_system(config)

  def loss(group, params, frozen_vae, batch, rng, step):
    del step
    if group == "autoencoder":
      return system.generator_loss(params["autoencoder"], params["discriminator"], frozen_vae,
                                   batch, rng)
    return system.discriminator_loss(params["discriminator"], params["autoencoder"], frozen_vae,
                                     batch, rng)

  fields = _AUTOENCODER_FIELDS
  return loop.Task(
      name="autoencoder", train_config=config.train_autoencoder, rules_family="conv",
      groups=("autoencoder", "discriminator"), init=system.init, loss=loss,
      make_dataset=clip_dataset_factory(config, workdir),
      to_model_batch=_select(fields),
      pretrained=(lambda: {"autoencoder": _pretrained_unet(config)})
      if config.unet.pretrained_path else None,
      frozen=lambda mesh: frozen_vae_params(config, workdir, mesh))


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------
def generator_task(config, workdir: str) -> loop.Task:
  """The joint audio-video DiT on the `latents` stage's latents (autoencoder and VAE not loaded)."""
  from mmldm_jax.models import dit as dit_lib
  from mmldm_jax.models import flops as flops_lib
  from mmldm_jax.train import latents as latents_lib
  continuation = bool(config.dit.continuation)
  if continuation and config.data.generator_hflip_prob > 0:
    raise ValueError(f"config.dit.continuation=True with config.data.generator_hflip_prob="
                     f"{config.data.generator_hflip_prob}: clips are flipped independently, so a "
                     f"clip and its previous clip would disagree; set generator_hflip_prob=0")
  model = dit_lib.build_dit(config, dtype=loop.compute_dtype(config))
  folder = latents_lib.latents_dir(workdir)

  def loss(group, params, frozen, batch, rng, step):
    del group, frozen, step
    return dit_lib.generator_loss(params["dit"], batch, rng, config, model=model)

  def make_dataset(process_index, process_count, batch_size, seed):
    return latents_lib.make_latent_dataset(
        folder, process_index=process_index, process_count=process_count, batch_size=batch_size,
        seed=seed, continuation_frames=int(config.data.num_frames) if continuation else None)

  return loop.Task(
      name="generator", train_config=config.train_generator, rules_family="dit", groups=("dit",),
      init=lambda rng: {"dit": dit_lib.init_params(model, rng)}, loss=loss,
      make_dataset=make_dataset, to_model_batch=_select(
          ("audio_latent", "video_latent") +
          (("prev_audio_latent", "prev_video_latent") if continuation else ())),
      flops_per_example=float(flops_lib.dit_flops_per_sample(config)))


# ------------------------------------------------------------------------------------------------
# Entry points (main.STAGES)
# ------------------------------------------------------------------------------------------------
def run_vae(config, workdir: str) -> None:
  if config.vae.freeze_encoder and not config.vae.pretrained_path:
    raise ValueError(
        "config.vae.freeze_encoder=True with config.vae.pretrained_path='' would freeze a randomly "
        "initialised encoder: give SD VAE weights (--config.vae.pretrained_path=...) or train the "
        "VAE from scratch with --config.vae.freeze_encoder=False "
        "--config.vae.measure_scale_factor=True")
  loop.train(config, workdir, vae_task(config, workdir))
  if config.vae.measure_scale_factor:
    write_measured_scale_factor(config, workdir)


def run_autoencoder(config, workdir: str) -> None:
  config_lib.use_measured_scale_factor(config, workdir)
  loop.train(config, workdir, autoencoder_task(config, workdir))


def run_generator(config, workdir: str) -> None:
  """Trains the DiT; writes the latents first (the `latents` stage) when they are missing."""
  from mmldm_jax.train import latents as latents_lib
  finished = loop.is_complete(workdir, "generator", config.train_generator.num_steps)
  if not finished and not latents_lib.is_complete(workdir):
    logging.info("generator: no latents in %s yet, running the latents stage first",
                 latents_lib.latents_dir(workdir))
    latents_lib.run(config, workdir)
  loop.train(config, workdir, generator_task(config, workdir))
