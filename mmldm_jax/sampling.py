"""The generation chain and the sample folders' format, shared by the `sample` stage
(`stages/sample.py`), the generator's quality signals (`train/tasks.py`) and the `evaluate` stage.

The chain, per batch (config.sample: sampler, steps, eta, guidance_audio / guidance_video, mode,
num_clips):

  DiT sampling of the perceptual latents (z_a, z_v)               models/dit.py `sample_latents`
     (mode 'reconstruction': the real clips' own latents instead)
  -> autoencoder diffusion decoder + VAE decoder                  models/autoencoder.py `decode`
     = frames [B, F, H, W, 3] and the audio image [B, S, S, 3]
  -> log-mel at the clip's raw size (audio.image_to_mel)
  -> waveform: HiFi-GAN when config.vocoder.pretrained_path is set, else Griffin-Lim

A samples folder (`workdir.samples_dir`) holds sample_0000.mp4 / .wav / .png per sample (the png:
`grid_image`) and index.json (`read_index`, `write_index`): the settings, the models' checkpoint
steps and one entry per sample.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.data import video as video_lib

MODES = config_lib.SAMPLE_MODES
INDEX_FILE = "index.json"
GRID_FRAMES = 8
GRID_GAP = 4


@dataclasses.dataclass
class Models:
  """Everything the chain runs, with plain (unboxed) parameter pytrees.

  dit: a `models.dit.MMDiT`; system: a `models.autoencoder.AutoencoderSystem` (autoencoder, VAE and
  the decoder's schedule); vocoder: (apply_fn, params) of `convert.hifigan.load_vocoder`, or None for
  Griffin-Lim. description: where the parameters came from (written to index.json and compared on
  resume)."""
  dit: Any
  dit_params: Any
  system: Any
  autoencoder_params: Any
  vae_params: Any
  vocoder: tuple[Any, Any] | None
  description: dict[str, Any]


def load_vocoder_if_set(config):
  """`convert.hifigan.load_vocoder(config)` when config.vocoder.pretrained_path is set, else None."""
  if not config.vocoder.pretrained_path:
    return None
  from mmldm_jax.convert import hifigan
  return hifigan.load_vocoder(config)


def check_mode(config) -> str:
  """config.sample.mode, checked against num_clips and the DiT's continuation flag."""
  mode, num_clips = config.sample.mode, int(config.sample.num_clips)
  if mode not in MODES:
    raise ValueError(f"config.sample.mode={mode!r}: expected one of {', '.join(MODES)}")
  if num_clips < 1:
    raise ValueError(f"config.sample.num_clips={num_clips}: expected >= 1")
  if mode == "continuation" and not config.dit.continuation:
    raise ValueError("config.sample.mode='continuation' needs a continuation DiT "
                     "(config.dit.continuation=True)")
  if mode != "continuation" and num_clips != 1:
    raise ValueError(f"config.sample.num_clips={num_clips}: more than one clip needs "
                     f"config.sample.mode='continuation' (got {mode!r})")
  if config.dit.continuation and mode != "continuation":
    raise ValueError(f"config.dit.continuation=True: the DiT samples clip by clip; set "
                     f"config.sample.mode='continuation' (got {mode!r})")
  return mode


class Chain:
  """The jitted generation chain for one config and one set of models (see the module doc).

  `generate(rng, batch_size, condition=None)` returns host arrays:
    frames       uint8 [B, num_clips * F, H, W, 3]
    waveform     float32 [B, num_clips * clip_samples] in [-1, 1]
    audio_image  float32 [B, S, num_clips * S, 3] in [-1, 1] (the decoded audio images, in time order)
  `condition` (a2v / v2a / reconstruction): {'audio': waveform [B, N], 'frames': uint8
  [B, F, H, W, 3], 'label': int [B] (read by a class-conditional DiT)} of real clips. Joint
  samples of a class-conditional DiT draw their classes (`models.dit.sample_latents`).
  """

  def __init__(self, config, models: Models):
    from mmldm_jax.models import dit as dit_lib
    self.config = config
    self.models = models
    self.mode = check_mode(config)
    self.num_clips = int(config.sample.num_clips)
    self.clip_samples = config_lib.clip_samples(config)
    self.mel_frames = audio_lib.num_mel_frames(self.clip_samples, config.audio)
    model = models.dit
    dit_mode = "joint" if self.mode == "continuation" else self.mode  # continuation: via `prev`

    def latents(params, key, batch_size, audio_latent, video_latent, prev, labels=None):
      return dit_lib.sample_latents(params, config, key, batch_size, model=model, mode=dit_mode,
                                    audio_latent=audio_latent, video_latent=video_latent,
                                    prev=prev, labels=labels)
    self._latents = jax.jit(latents, static_argnums=2)
    self._encode = jax.jit(models.system.encode)
    self._waveform = jax.jit(self._image_to_waveform)
    self._ahead: dict[int, parallel.BackgroundCompile] = {}   # batch size -> compile_ahead's

  def compile_ahead(self, batch_size: int, name: str) -> parallel.BackgroundCompile:
    """Starts compiling the chain's three programs (DiT sampling, decoding, waveform) for joint
    sampling of `batch_size` clips on a second thread, one after another (each one's output
    shardings are the next one's inputs). `generate` at that batch size then runs them instead of
    compiling them at its first call. `models.dit_params` may be abstract (shapes and shardings)
    until `generate` runs. Returns the compile's handle."""
    if self.mode != "joint":
      raise ValueError(f"Chain.compile_ahead: joint sampling only (config.sample.mode is "
                       f"{self.mode!r})")
    models = self.models
    dit_params, key = models.dit_params, jax.random.key(0)
    vocoder_params = None if models.vocoder is None else models.vocoder[1]

    def compile_chain():
      latents = self._latents.lower(dit_params, key, batch_size, None, None, None).compile()
      decode = models.system.lower_decode(
          models.autoencoder_params, models.vae_params, latents.out_info["audio"],
          latents.out_info["video"], key).compile()
      waveform = self._waveform.lower(vocoder_params, decode.out_info[1]).compile()
      return {"latents": latents, "decode": decode, "waveform": waveform}
    self._ahead[batch_size] = parallel.BackgroundCompile(compile_chain, name=name)
    return self._ahead[batch_size]

  def _image_to_waveform(self, vocoder_params, audio_image):
    """Audio images [B, S, S, 3] -> waveforms [B, clip_samples] (vocoder or Griffin-Lim)."""
    config = self.config
    mel = audio_lib.image_to_mel(audio_image, int(config.audio.num_mels), self.mel_frames)
    if self.models.vocoder is None:
      return audio_lib.griffin_lim(mel, config.audio, num_samples=self.clip_samples)
    apply_fn, _ = self.models.vocoder
    waveform = apply_fn(vocoder_params, jnp.swapaxes(mel, -1, -2))
    missing = self.clip_samples - waveform.shape[-1]
    if missing > 0:
      waveform = jnp.pad(waveform, ((0, 0), (0, missing)))
    return waveform[:, :self.clip_samples]

  def encode_condition(self, condition: dict[str, np.ndarray]):
    """The autoencoder's (audio, video) latents of real clips (key frames + waveform)."""
    frames = condition["frames"]
    keys = video_lib.key_frame_indices(frames.shape[1], tuple(self.config.data.key_frames))
    batch = {"key_frames": jnp.asarray(video_lib.to_float(frames[:, keys])),
             "audio": jnp.asarray(condition["audio"], jnp.float32)}
    return self._encode(self.models.autoencoder_params, self.models.vae_params, batch)

  def generate(self, rng, batch_size: int, condition: dict[str, np.ndarray] | None = None):
    models = self.models
    latent_rng, decode_rng = jax.random.split(rng)
    audio_latent = video_latent = labels = None
    if self.mode in ("a2v", "v2a", "reconstruction"):
      if condition is None:
        raise ValueError(f"mode {self.mode!r} needs the conditioning clips")
      if self.mode != "reconstruction" and models.dit.num_classes:
        if "label" not in condition:
          raise ValueError(f"mode {self.mode!r} with a class-conditional DiT needs the "
                           f"conditioning clips' 'label'; the condition has {sorted(condition)}")
        labels = np.asarray(condition["label"], np.int32)
        if labels.min() < 0 or labels.max() >= models.dit.num_classes:
          raise ValueError(f"mode {self.mode!r}: conditioning labels "
                           f"{sorted(set(labels.tolist()))} outside the DiT's classes "
                           f"0..{models.dit.num_classes - 1} (config.data.num_classes)")
        labels = jnp.asarray(labels)
      audio_latent, video_latent = self.encode_condition(condition)
    prev = None
    if self.mode == "continuation":
      shapes = {"audio": models.dit.audio_shape, "video": models.dit.video_shape}
      prev = {name: jnp.zeros((batch_size,) + tuple(shape)) for name, shape in shapes.items()}
    vocoder_params = None if models.vocoder is None else models.vocoder[1]
    programs = self._ahead[batch_size].result() if batch_size in self._ahead else None
    frames, waveforms, images = [], [], []
    for clip in range(self.num_clips):
      latent_key, decode_key = (jax.random.fold_in(latent_rng, clip),
                                jax.random.fold_in(decode_rng, clip))
      if self.mode == "reconstruction":   # the real clips' own latents, no DiT
        latents = {"audio": audio_latent, "video": video_latent}
      elif programs is not None:          # compiled ahead: joint mode
        latents = programs["latents"](models.dit_params, latent_key, None, None, None)
      else:
        latents = self._latents(models.dit_params, latent_key, batch_size, audio_latent,
                                video_latent, prev, labels)
      if self.mode == "continuation":
        prev = {name: latents[name] for name in ("audio", "video")}
      if "label" in latents:   # a class-conditional DiT: later clips keep the first one's class
        labels = latents["label"]
      if programs is not None:
        clip_frames, audio_image = programs["decode"](
            models.autoencoder_params, models.vae_params, latents["audio"], latents["video"],
            decode_key, None)
        waveform = programs["waveform"](vocoder_params, audio_image)
      else:
        clip_frames, audio_image = models.system.decode(
            models.autoencoder_params, models.vae_params, latents["audio"], latents["video"],
            decode_key)
        waveform = self._waveform(vocoder_params, audio_image)
      frames.append(to_host(clip_frames))
      images.append(to_host(audio_image))
      waveforms.append(to_host(waveform))
    result = {"frames": video_lib.to_uint8(np.concatenate(frames, axis=1)),
              "waveform": np.clip(np.concatenate(waveforms, axis=1), -1.0, 1.0),
              "audio_image": np.concatenate(images, axis=2)}
    if labels is not None:
      result["label"] = to_host(labels)
    if self.mode == "a2v":   # keep the real sound the video was generated from
      result["waveform"] = np.asarray(condition["audio"], np.float32)
      result["audio_image"] = to_host(audio_lib.waveform_to_image(
          jnp.asarray(condition["audio"]), self.config.audio))
    elif self.mode == "v2a":  # keep the real frames the sound was generated from
      result["frames"] = np.asarray(condition["frames"], np.uint8)
    return result


def to_host(array) -> np.ndarray:
  """A (possibly multi-host, replicated) jax array as a NumPy array on this host."""
  if jax.process_count() > 1:
    return np.asarray(parallel.gather_across_processes(array, name="to host", tiled=True))
  return np.asarray(array)


def sample_name(number: int) -> str:
  return f"sample_{number:04d}"


def grid_image(frames: np.ndarray, audio_image: np.ndarray) -> np.ndarray:
  """uint8 [H', W', 3]: up to GRID_FRAMES evenly spaced frames in a row, a gap, the audio image."""
  picks = np.unique(np.linspace(0, len(frames) - 1, min(GRID_FRAMES, len(frames))).round())
  strip = np.concatenate(list(frames[picks.astype(int)]), axis=1)
  image = video_lib.to_uint8(audio_image)
  height = max(strip.shape[0], image.shape[0])
  canvas = np.zeros((height, strip.shape[1] + GRID_GAP + image.shape[1], 3), np.uint8)
  canvas[:strip.shape[0], :strip.shape[1]] = strip
  canvas[:image.shape[0], strip.shape[1] + GRID_GAP:] = image
  return canvas


def read_index(folder: str) -> dict[str, Any] | None:
  """The folder's index.json, or None when there is none."""
  path = os.path.join(folder, INDEX_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    index = json.load(f)
  for field in ("settings", "samples", "fps", "sample_rate"):
    if field not in index:
      raise ValueError(f"{path}: field {field!r} is missing; expected an index written by the "
                       f"sample stage")
  return index


def write_index(folder: str, index: dict[str, Any]) -> None:
  path = os.path.join(folder, INDEX_FILE)
  index = dict(index, samples=sorted(index["samples"], key=lambda entry: entry["number"]))
  with open(path + ".tmp", "w") as f:
    json.dump(index, f, indent=1)
  os.replace(path + ".tmp", path)
