"""The training stages' `Task`s for `train/loop.py` and their quality signals (what the `vae`,
`autoencoder` and `generator` stage modules in `mmldm_jax/stages/` train):

  vae          stage-0 image VAE (decoder fine-tuned on frames and audio images) + PatchGAN
  autoencoder  the multi-modal autoencoder + its 3-frame discriminator, VAE frozen
  generator    the joint audio-video DiT on precomputed latents (the `latents` stage,
               stages/latents.py; their files: data/latents.py)
Frozen networks are read parameters-only through `train/weights.py`. Paths come from
`mmldm_jax.workdir`.

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
from mmldm_jax import parallel
from mmldm_jax import sampling as sample_lib
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import pipeline
from mmldm_jax.stages import data as data_stage
from mmldm_jax.data import latents as latents_lib
from mmldm_jax.train import loop
from mmldm_jax.train import weights

# Clip fields each stage's loss reads (the rest of the pipeline's dict stays on the host).
_AUTOENCODER_FIELDS = ("key_frames", "target_frames", "target_indices", "audio", "label")


def clip_dataset_factory(config, workdir: str, *, hflip_prob: float | None = None):
  """(process_index, process_count, per_host_batch, seed) -> the shuffled, repeating clip dataset."""
  def make(process_index, process_count, batch_size, seed):
    folder = data_stage.ensure_dataset(config, workdir)  # here, not earlier: a Task reads no data
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
  # disc_weight == 0: no discriminator at all. Its update (a fresh VAE forward, then the PatchGAN
  # forward and backward) runs every step even before disc_start, where its loss is multiplied by 0.
  adversarial = config.vae.disc_weight > 0

  def init(rng):
    vae_rng, disc_rng = jax.random.split(rng)
    image = jnp.zeros((1, size, size, 3))
    params = {"vae": vae.init(vae_rng, image)["params"]}
    if adversarial:
      params["discriminator"] = disc.init(disc_rng, image)["params"]
    return params

  images_of = lambda batch: _vae_images(config, batch)
  perceptual = None
  if config.vae.lpips_path:
    from mmldm_jax.convert import lpips as lpips_convert
    perceptual = lpips_convert.load_lpips_distance(config)

  def loss(group, params, frozen, batch, rng, step):
    del frozen
    images = images_of(batch)
    if group == "vae":
      value, aux = vae_lib.generator_loss(params["vae"], params.get("discriminator"), images, rng,
                                          step, config=config, vae=vae, disc=disc,
                                          perceptual=perceptual)
      aux.pop("reconstructions")
      return value, aux
    # As the reference's second optimiser: a fresh reconstruction by the just-updated VAE.
    reconstructions, _ = vae.apply({"params": params["vae"]}, images, rng)
    return vae_lib.discriminator_loss(params["discriminator"], images, reconstructions, step,
                                      config=config, disc=disc)

  return loop.Task(
      name="vae", train_config=config.train_vae, rules_family="conv",
      groups=("vae", "discriminator") if adversarial else ("vae",), init=init, loss=loss,
      make_dataset=clip_dataset_factory(config, workdir),
      to_model_batch=_select(("target_frames", "audio")),
      pretrained=((lambda: {"vae": weights.pretrained_vae_params(config)})
                  if config.vae.pretrained_path else None),
      trainable={"vae": lambda params: vae_lib.trainable_mask(params, config)},
      evaluate=vae_quality_signals(config, workdir, vae))


# Validation clips the quality signals are computed on (evenly spaced over the split).
QUALITY_CLIPS = 8


def validation_clips(config, workdir: str, count: int = QUALITY_CLIPS) -> list[dict[str, Any]]:
  """`count` clips evenly spaced over the validation split (fewer when the split has fewer)."""
  folder = data_stage.ensure_dataset(config, workdir)
  clips = pipeline.clip_source(config, "validation", pipeline.RecordVideos(folder, "validation"))
  if not len(clips):
    raise ValueError(f"the validation split of {folder} has no clip: the quality signals need one "
                     f"(or set train_*.eval_every=0)")
  picks = np.unique(np.linspace(0, len(clips) - 1, min(count, len(clips))).round().astype(int))
  return [clips[int(index)] for index in picks]


# Validation clips whose (decoded) sound goes to TensorBoard at each quality-signal step.
SOUNDS = 2


def audio_image_to_sound(config, audio_image):
  """Waveforms [N, clip samples] of audio images [N, S, S, 3] by Griffin-Lim: what a decoded audio
  image sounds like without a vocoder (the quality signals' listening copy and sync input)."""
  clip_samples = config_lib.clip_samples(config)
  mel = audio_lib.image_to_mel(audio_image, int(config.audio.num_mels),
                               audio_lib.num_mel_frames(clip_samples, config.audio))
  return audio_lib.griffin_lim(mel, config.audio, num_samples=clip_samples)


def decoded_sync_signals(config, real_frames, real_audio, frames, waveforms) -> dict[str, float]:
  """Sync scores (`evaluation/sync.py`) of decoded clips, taken apart by modality, for the quality
  signals of the stages that reconstruct (vae, autoencoder) on the synthetic dataset:
    sync_f1: the decoded picture with the decoded sound;
    sync_f1_decoded_video: the decoded picture with the clip's real sound (do the bounces stay
      where they were?);
    sync_f1_decoded_audio: the real picture with the decoded sound (do the tones stay?);
    sync_f1_real: the originals (near 1);
    video_events_per_second / audio_events_per_second: bounces and onsets found in the decoded
      clips, beside real_video_events_per_second / real_audio_events_per_second.
  Scored against the shuffled-pairs level of real clips (~0.17 on the demo's data), a stage that
  keeps a modality's timing scores near sync_f1_real on that modality's row, one that loses it
  near the shuffled level. Frames are uint8 [N, F, H, W, 3], waveforms [N, samples]."""
  from mmldm_jax.evaluation import sync
  fps, rate = float(config.data.fps), int(config.audio.sample_rate)
  score = lambda pictures, sounds: [sync.score_clip(picture, sound, fps, rate)  # noqa: E731
                                    for picture, sound in zip(pictures, sounds)]
  decoded, real = score(frames, waveforms), score(real_frames, real_audio)
  f1 = lambda scored: sync.aggregate(result for result, _ in scored).f1  # noqa: E731
  crossed = lambda pictures, sounds: sync.aggregate(  # noqa: E731
      sync.repaired(picture, sound) for (_, picture), (_, sound) in zip(pictures, sounds)).f1
  scalars = {"sync_f1": f1(decoded), "sync_f1_decoded_video": crossed(decoded, real),
             "sync_f1_decoded_audio": crossed(real, decoded), "sync_f1_real": f1(real)}
  for prefix, scored in (("", decoded), ("real_", real)):
    rates = sync.event_rates(scored, fps)
    scalars[f"{prefix}video_events_per_second"] = rates["video_per_second"]
    scalars[f"{prefix}audio_events_per_second"] = rates["audio_per_second"]
  return scalars


def _image_rows(*rows) -> np.ndarray:
  """uint8 [rows * H, N * W, 3]: each row a batch [N, H, W, 3] in [-1, 1] side by side."""
  from mmldm_jax.data import video as video_lib
  return np.concatenate([np.concatenate(list(video_lib.to_uint8(np.asarray(row))), axis=1)
                         for row in rows], axis=0)


def vae_quality_signals(config, workdir: str, vae):
  """The vae stage's quality signals (`loop.Task.evaluate`): reconstruction PSNR (dB, images in
  [-1, 1], capped as `metrics.psnr` says) and L1 of the first and middle frame and of the audio
  image of `QUALITY_CLIPS` validation clips, through the posterior mode; images: the originals
  above their reconstructions. On the synthetic dataset every frame of those clips is
  reconstructed as well and scored by `decoded_sync_signals` (sound by Griffin-Lim): the VAE is
  the first stage that can blur a bounce or a tone onset away, and no later stage gets it back."""
  from mmldm_jax import metrics as metrics_lib
  from mmldm_jax.data import video as video_lib
  with_sync = config.data.source == "synthetic"
  held = {}
  image_sound = jax.jit(lambda audio_image: audio_image_to_sound(config, audio_image))

  @jax.jit
  def reconstruct(vae_params, frames, audio):
    audio_image = audio_lib.waveform_to_image(audio, config.audio).astype(frames.dtype)
    originals = jnp.concatenate([frames, audio_image], axis=0)
    reconstructions, _ = vae.apply({"params": vae_params}, originals, None)
    return originals, jnp.clip(reconstructions, -1.0, 1.0)

  def evaluate(params, frozen, mesh):
    del frozen
    if not held:
      clips = validation_clips(config, workdir)
      frames = np.stack([clip["frames"][[0, int(clip["valid_frames"]) // 2]] for clip in clips])
      held["frames"] = video_lib.to_float(frames.reshape((-1,) + frames.shape[2:]))
      held["audio"] = np.stack([clip["audio"] for clip in clips]).astype(np.float32)
      if with_sync:
        held["clips"] = np.stack([clip["frames"] for clip in clips])
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
    if with_sync:
      clips = held["clips"]                                   # uint8 [N, F, H, W, 3]
      clip_frames = video_lib.to_float(clips.reshape((-1,) + clips.shape[2:]))
      _, decoded = reconstruct(params["vae"], jax.device_put(clip_frames, replicated),
                               jax.device_put(held["audio"], replicated))
      decoded = np.asarray(decoded)
      scalars.update(decoded_sync_signals(
          config, clips, held["audio"],
          video_lib.to_uint8(decoded[:len(clip_frames)]).reshape(clips.shape),
          np.asarray(jax.device_get(image_sound(decoded[len(clip_frames):])))))
    images = {"vae_frames": _image_rows(originals[:count][:8], reconstructions[:count][:8]),
              "vae_audio_image": _image_rows(originals[count:][:8],
                                             reconstructions[count:][:8])}
    sounds = jax.device_get(image_sound(reconstructions[count:count + SOUNDS]))
    return scalars, images, {f"vae_sound_{index}": sound for index, sound in enumerate(sounds)}
  return evaluate


def _vae_images(config, batch):
  """What the VAE stage trains on: a batch's target frames (the first `vae.frames_per_clip` of each
  clip's, all when 0) and audio images, [N, H, W, 3]."""
  frames = batch["target_frames"]
  if config.vae.frames_per_clip:
    frames = frames[:, :config.vae.frames_per_clip]
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
  from mmldm_jax.models import vae as vae_lib
  path = workdir_lib.scale_factor_file(workdir)
  if os.path.exists(path):
    return config_lib.read_scale_factor(path)
  mesh = parallel.create_mesh(config)
  params = weights.restore_vae_params(config, workdir, mesh)
  parallel.wait_for_all_processes("vae parameters to host")
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
  variances = parallel.gather_across_processes(np.float64(1.0 / factor ** 2),
                                              name="vae scale factor")
  factor = float(1.0 / np.sqrt(np.mean(variances)))
  if jax.process_index() == 0:
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
      json.dump({"scale_factor": factor, "images_per_process": int(len(images)),
                 "processes": processes}, f, indent=2)
    os.replace(temporary, path)
  parallel.wait_for_all_processes("vae scale factor written")
  logging.info("vae: measured scale factor %.6g (latent std %.4g) -> %s", factor, 1.0 / factor,
               path)
  return factor


def _pretrained_unet(config):
  """SD-1.5 U-Net params for the autoencoder's diffusion decoder (the reference initialises it so)."""
  from mmldm_jax.convert import unet as convert_unet
  logging.info("autoencoder: U-Net weights from %s", config.unet.pretrained_path)
  return {"unet": convert_unet.load_unet_params(config.unet.pretrained_path, config)}


# ------------------------------------------------------------------------------------------------
# autoencoder
# ------------------------------------------------------------------------------------------------
def autoencoder_task(config, workdir: str, scale_factor: float) -> loop.Task:
  """The multi-modal autoencoder and its discriminator, updated in turn on each batch (the reference's
  two AdamW optimisers, alternating every step), with the VAE frozen. With
  `autoencoder.gan_weight == 0` there is no discriminator at all (no parameters, no update): its
  update re-runs the whole forward and VAE-decodes six images per clip, half of a step's cost on a
  CPU. `scale_factor`: the VAE's (`config_lib.resolve_scale_factor`).

  With `autoencoder.cache_vae_latents`, `frozen` (which the trainer calls once, before the first
  batch) also encodes the training split with the frozen VAE (`train/posterior_cache.py`), and
  `to_model_batch` hands the step those posteriors instead of pixels."""
  system = weights.autoencoder_system(config, scale_factor)
  adversarial = config.autoencoder.gan_weight > 0
  posteriors = {}    # {'cache': PosteriorCache}, filled by `frozen` when the cache is on

  def loss(group, params, frozen_vae, batch, rng, step):
    del step
    if group == "autoencoder":
      return system.generator_loss(params["autoencoder"], params.get("discriminator"),
                                   frozen_vae, batch, rng)
    return system.discriminator_loss(params["discriminator"], params["autoencoder"], frozen_vae,
                                     batch, rng)

  def init(rng):
    params = system.init(rng)
    return params if adversarial else {"autoencoder": params["autoencoder"]}

  def frozen(mesh):
    vae_params = weights.frozen_vae_params(config, workdir, mesh)
    if config.autoencoder.cache_vae_latents:
      from mmldm_jax.train import posterior_cache
      folder = data_stage.ensure_dataset(config, workdir)
      source = pipeline.clip_source(config, "train", pipeline.RecordVideos(folder, "train"))
      posteriors["cache"] = posterior_cache.build(config, system.vae, vae_params, source, mesh)
    return vae_params

  def to_model_batch(host_batch):
    if not config.autoencoder.cache_vae_latents:
      return _select(_AUTOENCODER_FIELDS)(host_batch)
    if "cache" not in posteriors:
      raise RuntimeError("autoencoder.cache_vae_latents: the posterior cache is built by the "
                         "task's `frozen` (train/loop.py calls it before the first batch)")
    return posteriors["cache"].model_batch(host_batch)

  evaluate, compile_evaluate = autoencoder_quality_signals(config, workdir, system)
  return loop.Task(
      name="autoencoder", train_config=config.train_autoencoder, rules_family="conv",
      groups=("autoencoder", "discriminator") if adversarial else ("autoencoder",), init=init,
      loss=loss,
      make_dataset=clip_dataset_factory(config, workdir),
      to_model_batch=to_model_batch,
      pretrained=(lambda: {"autoencoder": _pretrained_unet(config)})
      if config.unet.pretrained_path else None,
      frozen=frozen,
      evaluate=evaluate, compile_evaluate=compile_evaluate)


def _validation_batch(clips: list[dict[str, Any]], config) -> dict[str, np.ndarray]:
  """The autoencoder's inputs for whole validation clips: key frames, every frame, the waveform
  and the label (no augmentation)."""
  from mmldm_jax.data import video as video_lib
  keys = video_lib.key_frame_indices(config.data.num_frames, tuple(config.data.key_frames))
  frames = np.stack([clip["frames"] for clip in clips])
  return {"key_frames": video_lib.to_float(frames[:, keys]), "frames": frames,
          "audio": np.stack([clip["audio"] for clip in clips]).astype(np.float32),
          "label": np.asarray([clip["label"] for clip in clips], np.int32)}


def autoencoder_quality_signals(config, workdir: str, system):
  """(evaluate, compile_ahead): the autoencoder stage's quality signals (`loop.Task.evaluate`,
  `loop.Task.compile_evaluate`) on `QUALITY_CLIPS` validation clips, each encoded to its latents
  (posterior modes) and decoded back (guided DDIM, `autoencoder.decode_steps`):
    psnr_frames / psnr_audio_image: every decoded frame and the audio image against the clip's own;
    psnr_*_other_latents: the same clip's originals against what ANOTHER clip's latents decode to
      (the next clip in the set). The gap between the two says whether the decoder uses the latent;
    frame_order_accuracy: the share of decoded frames whose nearest real frame (of the same clip)
      is within one frame of their own index, beside `frame_order_chance`: near chance, the decoder
      draws one picture for the whole clip; near 1, it places what moves frame by frame;
    retrieval_v2a / retrieval_a2v: top-1 retrieval of the paired clip by the contrastive
      embeddings within the set, beside `retrieval_chance` (1 / clips);
    class_accuracy: of the classification head (when the config has one);
    sync_f1, sync_f1_decoded_video, sync_f1_decoded_audio, sync_f1_real and the event rates: for
      the synthetic dataset, `decoded_sync_signals` of the decoded clips (sound by Griffin-Lim).
  Images: for two frames of each clip and the audio image, originals / own latents / other
  latents. Audio: the first decoded clips' sound.
  `compile_ahead(abstract params, frozen VAE params, mesh)` compiles the encode-and-decode program
  on a second thread, for `evaluate` to run (without it, `evaluate` compiles at its first call)."""
  from mmldm_jax import metrics as metrics_lib
  from mmldm_jax.data import video as video_lib
  num_frames = int(config.data.num_frames)
  with_sync = config.data.source == "synthetic"
  held = {}
  compiled = {}  # set by compile_ahead

  @jax.jit
  def encode_decode(params, vae_params, batch, rng):
    audio_latent, video_latent = system.encode(params, vae_params, batch)
    maps = system.model.apply({"params": params}, audio_latent, video_latent, method="semantics")
    class_logits, (video_embedding, audio_embedding, _, _) = system.model.apply(
        {"params": params}, *maps, method="heads")
    similarity = video_embedding @ audio_embedding.T
    # Own latents first, then each clip's latents decoded in the place of the previous clip's.
    frames, audio_image = system.decode(
        params, vae_params, jnp.concatenate([audio_latent, jnp.roll(audio_latent, 1, 0)]),
        jnp.concatenate([video_latent, jnp.roll(video_latent, 1, 0)]), rng,
        num_frames=num_frames)
    waveform = audio_image_to_sound(config, audio_image)
    return dict(frames=jnp.clip(frames, -1.0, 1.0), audio_image=jnp.clip(audio_image, -1.0, 1.0),
                waveform=waveform, similarity=similarity, class_logits=class_logits,
                real_audio_image=audio_lib.waveform_to_image(batch["audio"], config.audio))

  def inputs_on(mesh):
    if not held:
      held.update(_validation_batch(validation_clips(config, workdir), config))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {k: jax.device_put(held[k], replicated) for k in ("key_frames", "audio")}

  def compile_ahead(abstract_params, frozen_vae, mesh) -> parallel.BackgroundCompile:
    compiled["encode_decode"] = parallel.compile_in_background(
        encode_decode, abstract_params["autoencoder"], frozen_vae, inputs_on(mesh),
        jax.random.key(config.seed), name="autoencoder_quality_signals")
    return compiled["encode_decode"]

  def evaluate(params, frozen_vae, mesh):
    inputs = inputs_on(mesh)
    run = compiled["encode_decode"].result() if compiled else encode_decode
    out = jax.device_get(run(params["autoencoder"], frozen_vae, inputs,
                             jax.random.key(config.seed)))
    count = len(held["audio"])
    real_frames = video_lib.to_float(held["frames"])
    real_image = np.asarray(out["real_audio_image"])
    scalars = {}
    for suffix, part in (("", slice(0, count)), ("_other_latents", slice(count, None))):
      scalars[f"psnr_frames{suffix}"] = float(np.mean(metrics_lib.psnr(out["frames"][part],
                                                                       real_frames)))
      scalars[f"psnr_audio_image{suffix}"] = float(np.mean(metrics_lib.psnr(
          out["audio_image"][part], real_image)))
    scalars["frame_order_accuracy"], scalars["frame_order_chance"] = (
        metrics_lib.frame_order_accuracy(out["frames"][:count], real_frames))
    similarity = np.asarray(out["similarity"])
    matches = np.arange(count)
    scalars["retrieval_v2a"] = float(np.mean(np.argmax(similarity, axis=1) == matches))
    scalars["retrieval_a2v"] = float(np.mean(np.argmax(similarity, axis=0) == matches))
    scalars["retrieval_chance"] = 1.0 / count
    if out["class_logits"] is not None:
      scalars["class_accuracy"] = float(np.mean(np.argmax(out["class_logits"], -1) ==
                                                held["label"]))
    if with_sync:
      scalars.update(decoded_sync_signals(config, held["frames"], held["audio"],
                                          video_lib.to_uint8(out["frames"][:count]),
                                          np.asarray(out["waveform"][:count])))
    shown = [0, num_frames // 2]
    pick = lambda frames: frames[:, shown].reshape((-1,) + frames.shape[2:])  # noqa: E731
    images = {"autoencoder_frames": _image_rows(pick(real_frames), pick(out["frames"][:count]),
                                                pick(out["frames"][count:])),
              "autoencoder_audio_image": _image_rows(real_image, out["audio_image"][:count],
                                                     out["audio_image"][count:])}
    sounds = {f"autoencoder_sound_{index}": out["waveform"][index]
              for index in range(min(SOUNDS, count))}
    return scalars, images, sounds
  return evaluate, compile_ahead


# ------------------------------------------------------------------------------------------------
# generator
# ------------------------------------------------------------------------------------------------
def generator_task(config, workdir: str) -> loop.Task:
  """The joint audio-video DiT on the `latents` stage's latents (autoencoder and VAE not loaded)."""
  from mmldm_jax.models import dit as dit_lib
  from mmldm_jax.models import flops as flops_lib
  continuation = bool(config.dit.continuation)
  if continuation and config.data.generator_hflip_prob > 0:
    raise ValueError(f"config.dit.continuation=True with config.data.generator_hflip_prob="
                     f"{config.data.generator_hflip_prob}: clips are flipped independently, so a "
                     f"clip and its previous clip would disagree; set generator_hflip_prob=0")
  model = dit_lib.build_dit(config, dtype=loop.compute_dtype(config))
  folder = workdir_lib.latents_dir(workdir)

  def loss(group, params, frozen, batch, rng, step):
    del group, frozen, step
    return dit_lib.generator_loss(params["dit"], batch, rng, config, model=model)

  def make_dataset(process_index, process_count, batch_size, seed):
    if config.dit.class_conditional:
      latents_lib.LatentSource(folder).check_labels(int(config.data.num_classes))
    return latents_lib.make_latent_dataset(
        folder, process_index=process_index, process_count=process_count, batch_size=batch_size,
        seed=seed, continuation_frames=int(config.data.num_frames) if continuation else None)

  evaluate, compile_evaluate = generator_quality_signals(config, workdir, model)
  return loop.Task(
      name="generator", train_config=config.train_generator, rules_family="dit", groups=("dit",),
      init=lambda rng: {"dit": dit_lib.init_params(model, rng)}, loss=loss,
      make_dataset=make_dataset, to_model_batch=_select(
          ("audio_latent", "video_latent") +
          (("label",) if config.dit.class_conditional else ()) +
          (("prev_audio_latent", "prev_video_latent") if continuation else ())),
      flops_per_example=float(flops_lib.dit_flops_per_sample(config)),
      evaluate=evaluate, compile_evaluate=compile_evaluate)


def generator_quality_signals(config, workdir: str, model):
  """(evaluate, compile_ahead): the generator stage's quality signals (`loop.Task.evaluate`,
  `loop.Task.compile_evaluate`): `QUALITY_CLIPS` joint samples through the whole chain (DiT ->
  autoencoder decoder -> VAE -> vocoder or Griffin-Lim, as the `sample` stage makes them, same
  `config.sample` settings, a fixed seed), scored like the `evaluate` stage does for the
  synthetic dataset:
    sync_f1 / sync_f1_shuffled: the samples' sync score, and with each picture paired with the next
      sample's sound (what samples whose halves ignore each other score);
    sync_f1_shuffled_all_pairs: the same chance level over every pairing of a picture with another
      sample's sound (`sync.all_pairs_scores`; steadier than one re-pairing of a few samples);
    video_events_per_second / audio_events_per_second: bounces and onsets found in the samples,
      beside real_video_events_per_second / real_audio_events_per_second of validation clips.
  Images: the samples' contact sheet (frames and audio image per row). Sounds: the first samples.
  The autoencoder and VAE are restored from the workdir once, at the first call (of
  `compile_ahead`, which starts compiling the chain on a second thread, or of `evaluate`)."""
  from mmldm_jax.evaluation import sync
  held = {}
  fps, rate = float(config.data.fps), int(config.audio.sample_rate)
  with_sync = config.data.source == "synthetic"

  def setup(dit_params, mesh):
    joint = config.copy_and_resolve_references()
    joint.sample.update(mode="joint", num_clips=1)
    scale_factor = config_lib.resolve_scale_factor(joint, workdir)
    system = weights.autoencoder_system(joint, scale_factor)
    autoencoder_params = weights.restore_autoencoder_params(joint, workdir, mesh, system)
    models = sample_lib.Models(
        dit=model, dit_params=dit_params, system=system, autoencoder_params=autoencoder_params,
        vae_params=weights.frozen_vae_params(joint, workdir, mesh),
        vocoder=sample_lib.load_vocoder_if_set(joint), description={})
    held["chain"] = sample_lib.Chain(joint, models)   # built once: its jitted functions compile once
    if with_sync:
      clips = validation_clips(config, workdir)
      held["real"] = sync.event_rates(
          [sync.score_clip(clip["frames"], clip["audio"], fps, rate) for clip in clips], fps)

  def compile_ahead(abstract_params, frozen, mesh) -> parallel.BackgroundCompile:
    del frozen
    setup(abstract_params["dit"], mesh)
    return held["chain"].compile_ahead(min(int(config.sample.batch_size), QUALITY_CLIPS),
                                       name="generator_quality_signals")

  def evaluate(params, frozen, mesh):
    del frozen
    if not held:
      setup(params["dit"], mesh)
    chain = held["chain"]
    chain.models.dit_params = params["dit"]
    batch = min(int(config.sample.batch_size), QUALITY_CLIPS)
    generated = [chain.generate(jax.random.fold_in(jax.random.key(config.sample.seed), number),
                                batch) for number in range(-(-QUALITY_CLIPS // batch))]
    frames = np.concatenate([g["frames"] for g in generated])[:QUALITY_CLIPS]
    waveforms = np.concatenate([g["waveform"] for g in generated])[:QUALITY_CLIPS]
    audio_images = np.concatenate([g["audio_image"] for g in generated])[:QUALITY_CLIPS]
    scalars = {}
    if with_sync:
      scored = [sync.score_clip(clip, wave, fps, rate) for clip, wave in zip(frames, waveforms)]
      scalars["sync_f1"] = sync.aggregate(score for score, _ in scored).f1
      scalars["sync_f1_shuffled"] = sync.mismatched_sync(scored).f1
      scalars["sync_f1_shuffled_all_pairs"] = sync.aggregate(sync.all_pairs_scores(scored)).f1
      rates = sync.event_rates(scored, fps)
      scalars.update({f"{name.replace('_per_second', '')}_events_per_second": value
                      for name, value in rates.items()})
      scalars.update({f"real_{name.replace('_per_second', '')}_events_per_second": value
                      for name, value in held["real"].items()})
    sheet = np.concatenate([sample_lib.grid_image(clip, image)
                            for clip, image in zip(frames, audio_images)], axis=0)
    sounds = {f"generator_sound_{index}": waveforms[index]
              for index in range(min(SOUNDS, len(waveforms)))}
    return scalars, {"generator_samples": sheet}, sounds
  return evaluate, compile_ahead
