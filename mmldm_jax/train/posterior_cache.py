"""The frozen VAE's posteriors of a training split, computed once (config.autoencoder.cache_vae_latents).

The `autoencoder` stage trains on VAE latents of each batch's key frames, target frames and audio
image, sampled from the frozen VAE's posterior. Without this cache every step VAE-encodes those
images again (and turns the waveform into its audio image): on the demo, about a third of a
step's time on a CPU. With it, the stage encodes every frame of every training video, as stored
and mirrored (the pipeline's horizontal flip; only as stored when config.data.hflip_prob is 0),
and the audio image of every clip window once, keeps the posterior moments (mean and
log-variance, `vae.DiagonalGaussian`) in host memory, and hands the step those moments instead
of pixels; the step still draws a fresh posterior sample, so the latents' distribution is the
same as without the cache.

  build(config, vae, vae_params, source, mesh) -> PosteriorCache
  cache.model_batch(host_batch) -> {'audio_moments', 'key_moments', 'target_moments',
                                    'target_indices', 'label'} for the step

Limits: memory is (2 x frames, or 1 x without flips, + clip windows) x the moments of one latent
(for 64x64 frames at f8 and 4 latent channels: 2 KiB each), on every host: meant for small
datasets (the synthetic demo, a few thousand clips), not AudioSet. The cache holds the VAE of
the run that built it; it is rebuilt whenever the stage starts or resumes, never written to disk.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import pipeline
from mmldm_jax.data import video as video_lib

# Images per VAE call while building (fixed, so that it compiles once; the last call is padded).
ENCODE_BATCH = 64


@dataclasses.dataclass(frozen=True)
class PosteriorCache:
  """Posterior moments [..., h, w, 2 * z] (mean, then log-variance) of one split.

  frame_moments: [2 or 1, total frames, h, w, 2z]; [0] the frames as stored, [1] mirrored
                 (absent when the training data is never flipped).
  audio_moments: [clip windows, h, w, 2z], in the order of `pipeline.ClipSource`.
  first_frame:   [videos] the row of each video's first frame in frame_moments.
  first_clip:    [videos] the row of each video's first clip window in audio_moments.
  """
  frame_moments: np.ndarray
  audio_moments: np.ndarray
  first_frame: np.ndarray
  first_clip: np.ndarray

  @property
  def nbytes(self) -> int:
    return self.frame_moments.nbytes + self.audio_moments.nbytes

  def model_batch(self, host_batch) -> dict[str, np.ndarray]:
    """The step's inputs for a batch of `pipeline.make_dataset`: each clip's key and target
    frames and its audio image as posterior moments, with its target indices and label."""
    video = np.asarray(host_batch["video_index"], np.int64)
    if video.size and (video.min() < 0 or video.max() >= len(self.first_frame)):
      raise ValueError(f"batch field 'video_index' holds {video.min()}..{video.max()}; the cache "
                       f"has {len(self.first_frame)} videos (was it built from another split?)")
    start = np.asarray(host_batch["clip_start"], np.int64)
    mirrored = np.asarray(host_batch["flipped"], np.int64)[:, None]
    if mirrored.any() and len(self.frame_moments) < 2:
      raise ValueError("batch field 'flipped' marks mirrored clips, but the posterior cache was "
                       "built without mirrored frames (config.data.hflip_prob was 0 when it was "
                       "built)")
    clip_first_frame = (self.first_frame[video] + start)[:, None]
    return {
        "key_moments": self.frame_moments[mirrored, clip_first_frame + host_batch["key_positions"]],
        "target_moments": self.frame_moments[mirrored,
                                             clip_first_frame + host_batch["target_positions"]],
        "audio_moments": self.audio_moments[self.first_clip[video] + start],
        "target_indices": np.asarray(host_batch["target_indices"]),
        "label": np.asarray(host_batch["label"]),
    }


def _moments(posterior) -> jax.Array:
  return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


def build(config, vae, vae_params, source: pipeline.ClipSource, mesh) -> PosteriorCache:
  """Encodes every frame (as stored, and mirrored when config.data.hflip_prob > 0) of `source`'s
  videos and every clip window's audio image with `vae` (parameters `vae_params`, placed on
  `mesh`), with a progress bar; logs its time and size.

  Every host builds the whole cache (the same calls in the same order)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  encode_images = jax.jit(
      lambda params, images: _moments(vae.apply({"params": params}, images, method="encode")),
      out_shardings=replicated)
  encode_sounds = jax.jit(
      lambda params, waveforms: _moments(vae.apply(
          {"params": params}, audio_lib.waveform_to_image(waveforms, config.audio),
          method="encode")),
      out_shardings=replicated)

  def in_batches(encode, items: np.ndarray, progress, prepare=lambda chunk: chunk) -> np.ndarray:
    out = []
    for first in range(0, len(items), ENCODE_BATCH):
      progress.update(1)
      chunk = prepare(items[first:first + ENCODE_BATCH])
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], ENCODE_BATCH - len(chunk), axis=0)])
      # Placed like the quality signals' inputs: the same value on every host.
      out.append(np.asarray(encode(vae_params, jax.device_put(padded, replicated)))[:len(chunk)])
    return np.concatenate(out)

  videos = source.videos
  started = time.perf_counter()
  frames, sounds = [], []
  first_frame, first_clip = [0], [0]
  for index, length in enumerate(videos.lengths):
    record = videos.read(index)
    video = np.asarray(record["frames"])
    if source.image_size is not None and video.shape[1:3] != (source.image_size,) * 2:
      raise ValueError(f"video {record.get('video_id', index)!r}: field 'frames' is "
                       f"{video.shape[1]}x{video.shape[2]}, the config wants {source.image_size}x"
                       f"{source.image_size} (config.data.image_size)")
    frames.append(video)
    audio = np.asarray(record["audio"], np.float32)
    windows = max(1, length - source.num_frames + 1)   # as ClipSource counts them
    sounds.extend(source.audio_slice(audio, start) for start in range(windows))
    first_frame.append(first_frame[-1] + len(video))
    first_clip.append(first_clip[-1] + windows)
  frames = np.concatenate(frames)    # uint8; converted a chunk at a time
  mirror = lambda chunk: chunk[:, :, ::-1]  # noqa: E731  (the pipeline's hflip)
  orientations = [video_lib.to_float]
  if config.data.hflip_prob > 0:
    orientations.append(lambda chunk: video_lib.to_float(mirror(chunk)))
  calls = lambda count: -(-count // ENCODE_BATCH)  # noqa: E731
  with tqdm.tqdm(total=len(orientations) * calls(len(frames)) + calls(len(sounds)), unit="batch",
                 desc="autoencoder: VAE posterior cache",
                 disable=jax.process_index() != 0) as progress:
    frame_moments = np.stack([in_batches(encode_images, frames, progress, prepare)
                              for prepare in orientations])
    audio_moments = in_batches(encode_sounds, np.stack(sounds), progress)
  cache = PosteriorCache(frame_moments=frame_moments, audio_moments=audio_moments,
                         first_frame=np.asarray(first_frame[:-1], np.int64),
                         first_clip=np.asarray(first_clip[:-1], np.int64))
  logging.info("posterior cache: %d frames (x%d orientations) and %d clip windows of %d videos "
               "encoded in %.1f s, %.1f MB", len(frames), len(orientations), len(sounds),
               len(videos.lengths), time.perf_counter() - started, cache.nbytes / 1e6)
  return cache
