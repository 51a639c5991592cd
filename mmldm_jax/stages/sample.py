"""The `sample` stage: sounding videos from the trained models, as files a person can open.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=sample

The chain (`sampling.Chain`, shared with the generator's quality signals), per batch of
config.sample.batch_size: DiT -> autoencoder diffusion decoder + VAE decoder -> log-mel -> HiFi-GAN
(config.vocoder.pretrained_path) or Griffin-Lim; per sample, under `<workdir>/samples/<mode>/`:
  sample_0000.mp4   H.264 + AAC, the frames at data.fps with the sound
  sample_0000.wav   the sound (16-bit PCM at audio.sample_rate)
  sample_0000.png   the frames (up to 8, evenly spaced) in a row, a gap, the audio image
and index.json (the settings, the models' checkpoint steps and one entry per sample, with the
real clip it was conditioned on, or the class a class-conditional DiT drew for it), and
contact_sheet.png (the png rows of the first 8 samples, one under the other).

Modes:
  joint         audio and video together, unconditionally (the learnable context).
  a2v / v2a     the DiT's trained-in conditioning on the clean latent of the other modality, taken
                from clip i (mod the count) of the validation split's non-overlapping clips, encoded
                by the autoencoder. The written sample keeps the REAL conditioning modality (a2v: the
                real waveform with the generated frames; v2a: the real frames with the generated
                sound), so the file shows whether the generated half follows the given half.
  continuation  num_clips clips, each conditioned on the previous one (config.dit.continuation
                models only); the clips are joined in time.
  reconstruction  no DiT: the same validation clips as a2v / v2a, encoded by the autoencoder and
                decoded again. Scored by `evaluate` (metrics_reconstruction.json), this is the
                ceiling of the chain: what the generated samples would score if the DiT drew the
                real clips' latents exactly.

Determinism and resume: batch b (samples b*batch_size ... ) draws everything from
fold_in(key(sample.seed), b), so a sample depends on (seed, batch_size, its number, the models),
not on which batches ran before. A sample is complete when its three files exist and index.json
lists it; a rerun skips complete batches and regenerates (identically) the rest. Changing a setting
that changes the samples (sampler, steps, guidance, seed, batch size, models, ...) for an existing
folder is an error; raising num_samples adds samples.

Multi-host: every process runs the (jitted) computation, process 0 writes the files.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from mmldm_jax import config_lib
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import pipeline
from mmldm_jax.data import video as video_lib
# The chain and the samples folder's format (sampling.py). Besides this module's own use, the names
# stay importable from here for its callers (train/tasks.py, the tests).
from mmldm_jax.sampling import (GRID_GAP, INDEX_FILE, Chain, Models,  # noqa: F401
                                check_mode, grid_image, load_vocoder_if_set, read_index,
                                sample_name, write_index)

CONDITIONING_SPLIT = "validation"
# The modes that read real clips of CONDITIONING_SPLIT.
CONDITIONED_MODES = ("a2v", "v2a", "reconstruction")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def load_models(config, workdir: str) -> Models:
  """The latest `generator`, `autoencoder` and `vae` parameters of the workdir (EMA when kept).

  Only the parameters are read (no training Task, optimiser or dataset is built), so no training
  setting can break sampling. Raises FileNotFoundError naming the folder when a stage has no
  checkpoint. Mode 'reconstruction' runs no DiT, so it needs no generator checkpoint."""
  from mmldm_jax import parallel
  from mmldm_jax.models import dit as dit_lib
  from mmldm_jax.train import loop
  from mmldm_jax.train import weights
  mesh = parallel.create_mesh(config)
  dit = dit_lib.build_dit(config, dtype=loop.compute_dtype(config))
  system = weights.autoencoder_system(config, config_lib.resolve_scale_factor(config, workdir))
  uses_dit = config.sample.mode != "reconstruction"
  dit_params = weights.restore_dit_params(config, workdir, mesh, dit) if uses_dit else None
  return Models(dit=dit, dit_params=dit_params,
                system=system,
                autoencoder_params=weights.restore_autoencoder_params(config, workdir, mesh,
                                                                      system),
                vae_params=weights.frozen_vae_params(config, workdir, mesh),
                vocoder=load_vocoder_if_set(config),
                description=models_description(config, workdir))


def models_description(config, workdir: str) -> dict[str, Any]:
  """The newest checkpoint step of each stage the chain restores (the VAE may be pretrained)."""
  from mmldm_jax.train import loop
  description = {}
  stages = ("generator", "autoencoder", "vae")
  if config.sample.mode == "reconstruction":   # no DiT: a later generator leaves it as it is
    stages = stages[1:]
  for name in stages:
    found = loop.saved_steps(workdir, name)
    description[f"{name}_step"] = max(found) if found else None
  if description["vae_step"] is None:
    description["vae_step"] = f"pretrained:{config.vae.pretrained_path}"
  return description


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def write_sample(folder: str, number: int, frames: np.ndarray, waveform: np.ndarray,
                 audio_image: np.ndarray, fps: float, sample_rate: int) -> dict[str, Any]:
  """Writes sample `number` (mp4 with sound, wav, png; each atomically) and returns its index
  entry. frames uint8 [T, H, W, 3]; waveform float [N] in [-1, 1]; audio image [S, W, 3]."""
  from PIL import Image
  name = sample_name(number)
  files = {kind: f"{name}.{kind}" for kind in ("wav", "png", "mp4")}
  video_lib.write_wav(os.path.join(folder, files["wav"]), waveform, sample_rate)
  png_path = os.path.join(folder, files["png"])
  Image.fromarray(grid_image(frames, audio_image)).save(png_path + ".tmp.png")
  os.replace(png_path + ".tmp.png", png_path)
  video_lib.write_mp4(os.path.join(folder, files["mp4"]), frames, fps, waveform, sample_rate)
  return {"number": number, **files, "num_frames": int(len(frames)),
          "num_audio_samples": int(len(waveform))}


def is_complete_entry(folder: str, entry: dict[str, Any]) -> bool:
  return all(os.path.exists(os.path.join(folder, entry[kind])) for kind in ("wav", "png", "mp4"))


def sample_settings(config, models_description: dict[str, Any]) -> dict[str, Any]:
  """Everything that changes what sample i is; compared when a folder is resumed."""
  s, ae = config.sample, config.autoencoder
  vocoder = (f"hifigan:{config.vocoder.pretrained_path}" if config.vocoder.pretrained_path
             else f"griffin_lim:{config.audio.griffin_lim_iters}")
  settings = {"sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
              "guidance_audio": float(s.guidance_audio), "guidance_video": float(s.guidance_video),
              "mode": s.mode, "num_clips": int(s.num_clips), "seed": int(s.seed),
              "batch_size": int(s.batch_size), "decode_steps": int(ae.decode_steps),
              "decode_guidance_audio": float(ae.decode_guidance_audio),
              "decode_guidance_video": float(ae.decode_guidance_video), "vocoder": vocoder,
              "models": dict(models_description)}
  if s.joint_order != "together":   # absent otherwise, so folders written before it still resume
    settings["joint_order"] = s.joint_order
  if s.guidance_drops != "context":
    settings["guidance_drops"] = s.guidance_drops
  if s.shared_key_frame_noise:
    settings["shared_key_frame_noise"] = float(s.shared_key_frame_noise)
  return settings


def _check_settings(folder: str, index: dict[str, Any], settings: dict[str, Any]) -> None:
  saved = json.loads(json.dumps(index["settings"]))
  wanted = json.loads(json.dumps(settings))
  if saved != wanted:
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
    raise ValueError(f"{os.path.join(folder, INDEX_FILE)}: the samples there were made with other "
                     f"settings ({details}); delete {folder} or use another workdir")


# ------------------------------------------------------------------------------------------------
# The loop and the stage
# ------------------------------------------------------------------------------------------------
def _condition_batch(clips: pipeline.SplitClips, numbers: range
                     ) -> tuple[dict[str, np.ndarray], list]:
  """Real clips numbers[i] mod len(clips), stacked, and their index entries."""
  picked = [clips[number % len(clips)] for number in numbers]
  entries = [{"split": clips.split, "video_index": int(clip["video_index"]),
              "clip_start": int(clip["clip_start"]), "label": int(clip["label"])}
             for clip in picked]
  return ({"frames": np.stack([clip["frames"] for clip in picked]),
           "audio": np.stack([clip["audio"] for clip in picked]),
           "label": np.asarray([clip["label"] for clip in picked], np.int32)}, entries)


def write_samples(config, models: Models, folder: str, *,
                  clips: pipeline.SplitClips | None = None,
                  progress: bool = True) -> dict[str, Any]:
  """Generates and writes samples 0 .. config.sample.num_samples - 1 into `folder`, skipping the
  complete ones (module doc). `clips`: the real clips of a2v / v2a / reconstruction. Returns the
  index."""
  from tqdm import tqdm
  mode = check_mode(config)
  settings = sample_settings(config, models.description)
  os.makedirs(folder, exist_ok=True)
  index = read_index(folder)
  if index is None:
    index = {"settings": settings, "fps": float(config.data.fps),
             "sample_rate": int(config.audio.sample_rate),
             "clip_frames": int(config.data.num_frames), "samples": []}
  _check_settings(folder, index, settings)
  index["samples"] = [entry for entry in index["samples"] if is_complete_entry(folder, entry)]
  done = {entry["number"] for entry in index["samples"]}
  if mode in CONDITIONED_MODES and not clips:
    raise ValueError(f"config.sample.mode={mode!r} needs real clips to condition on "
                     f"(the {CONDITIONING_SPLIT} split of the dataset); none given")
  total, batch_size = int(config.sample.num_samples), int(config.sample.batch_size)
  if total < 1 or batch_size < 1:
    raise ValueError(f"config.sample.num_samples={total}, batch_size={batch_size}: expected >= 1")
  batches = [b for b in range(-(-total // batch_size))
             if any(n not in done for n in range(b * batch_size, min((b + 1) * batch_size, total)))]
  writer = jax.process_index() == 0
  logging.info("sample: %d of %d samples in %s are complete; %d batches of %d to run", len(done),
               total, folder, len(batches), batch_size)
  chain = Chain(config, models) if batches else None
  # A typed key, as the generator's quality signals use: the chain's jitted functions then see the
  # same argument types there and here, and the persistent compilation cache serves this stage the
  # programs the generator stage compiled (with a raw uint32[2] key the decoder compiled again).
  base_key = jax.random.key(int(config.sample.seed))
  for b in tqdm(batches, desc=f"sample {mode}", unit="batch", disable=not (progress and writer)):
    numbers = range(b * batch_size, (b + 1) * batch_size)   # the last batch is padded
    condition, sources = (None, None)
    if mode in CONDITIONED_MODES:
      condition, sources = _condition_batch(clips, numbers)
    result = chain.generate(jax.random.fold_in(base_key, b), batch_size, condition)
    for slot, number in enumerate(numbers):
      if number >= total or number in done or not writer:
        continue
      entry = write_sample(folder, number, result["frames"][slot], result["waveform"][slot],
                           result["audio_image"][slot], config.data.fps, config.audio.sample_rate)
      entry["batch"] = b
      if sources is not None:
        entry["conditioning"] = sources[slot]
      elif "label" in result:   # the class a class-conditional DiT drew for this sample
        entry["label"] = int(result["label"][slot])
      index["samples"].append(entry)
      done.add(number)
    if writer:
      write_index(folder, index)
  if writer:
    write_index(folder, index)
    write_contact_sheet(folder, index)
  return index


CONTACT_SHEET = "contact_sheet.png"
CONTACT_SHEET_ROWS = 8


def write_contact_sheet(folder: str, index: dict[str, Any]) -> str:
  """`folder`/contact_sheet.png: the png rows of the first `CONTACT_SHEET_ROWS` samples, one under
  the other with a white line between, to see a run's samples at a glance. Returns its path."""
  from PIL import Image
  entries = sorted(index["samples"], key=lambda entry: entry["number"])[:CONTACT_SHEET_ROWS]
  rows = [np.asarray(Image.open(os.path.join(folder, entry["png"])).convert("RGB"))
          for entry in entries]
  gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
  sheet = np.concatenate([part for row in rows for part in (row, gap)][:-1], axis=0)
  path = os.path.join(folder, CONTACT_SHEET)
  Image.fromarray(sheet).save(path + ".tmp.png", optimize=True)
  os.replace(path + ".tmp.png", path)
  return path


def run(config, workdir: str) -> None:
  """The stage: restores the trained models and writes `<workdir>/samples/<mode>/` (module doc);
  skipped when every sample exists with the same settings."""
  mode = check_mode(config)
  folder = workdir_lib.samples_dir(workdir, mode)
  index = read_index(folder)
  if index is not None:
    _check_settings(folder, index, sample_settings(config, models_description(config, workdir)))
    complete = {e["number"] for e in index["samples"] if is_complete_entry(folder, e)}
    if complete >= set(range(int(config.sample.num_samples))):
      logging.info("sample: the %d samples in %s are complete, skipped",
                   config.sample.num_samples, folder)
      return
  models = load_models(config, workdir)
  clips = None
  if mode in CONDITIONED_MODES:
    clips = pipeline.SplitClips(config, workdir_lib.data_folder(config, workdir),
                                CONDITIONING_SPLIT)
  write_samples(config, models, folder, clips=clips)
  logging.info("sample: wrote %s (open the .mp4 files; index.json lists them)", folder)
