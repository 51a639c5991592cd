"""The `latents` stage: every training clip encoded once by the frozen autoencoder (and VAE), so the
generator never re-encodes.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo --config.stages=latents

The autoencoder and VAE are read parameters-only (`train/weights.py`); the files are written by
`data/latents.py` into `<workdir>/latents`. Without a dataset it raises `workdir.MissingInput`
('data'), and the `generator` stage raises it ('latents') without latents: `main.py` then runs the
missing stage first.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import tqdm
from absl import logging

from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.data import pipeline
from mmldm_jax.models import dit as dit_lib
from mmldm_jax.data import latents as latents_lib
from mmldm_jax.train import weights


def _local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (replicas dropped)."""
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([shards[start] for start in sorted(shards)], axis=0)


def run(config, workdir: str) -> None:
  """Encodes the training clips with the frozen autoencoder (and VAE) into `<workdir>/latents`
  (skipped when complete)."""
  folder = workdir_lib.latents_dir(workdir)
  if latents_lib.is_complete(workdir):
    logging.info("latents: %s is complete, skipped", folder)
    return
  data_folder = workdir_lib.require_dataset(config, workdir, can_make=jax.process_count() == 1)
  mesh = parallel.create_mesh(config)
  system = weights.autoencoder_system(config, config_lib.resolve_scale_factor(config, workdir))
  params = weights.restore_autoencoder_params(config, workdir, mesh, system)
  vae_params = weights.frozen_vae_params(config, workdir, mesh)
  per_host = parallel.per_process_batch_size(config.train_autoencoder.batch_size, mesh,
                                             "train_autoencoder.batch_size")
  process, processes = jax.process_index(), jax.process_count()
  videos = pipeline.RecordVideos(data_folder, "train")
  total = len(pipeline.clip_source(config, "train", videos))
  mine = len(range(process, total, processes))
  steps = math.ceil(math.ceil(total / processes) / per_host)  # the same on every process
  dataset = pipeline.make_dataset(
      config, "train", process_index=process, process_count=processes, batch_size=per_host,
      seed=config.seed, shuffle=False, num_epochs=1, hflip_prob=config.data.generator_hflip_prob,
      drop_remainder=False, videos=videos)
  encode = jax.jit(lambda p, v, b: system.encode(p, v, b),
                   out_shardings=parallel.batch_sharding(mesh))
  shapes = {"audio_latent": dit_lib.latent_shapes(config)["audio"],
            "video_latent": dit_lib.latent_shapes(config)["video"]}
  writer = latents_lib.ShardWriter(folder, "train", process, processes, mine, shapes)
  iterator = iter(dataset)
  template = None
  logging.info("latents: encoding %d training clips (%d on this process) in %d batches of %d",
               total, mine, steps, per_host)
  for _ in tqdm.trange(steps, desc="latents", unit="batch", disable=process != 0):
    host = next(iterator, None)
    if host is not None:
      host = {k: np.asarray(host[k]) for k in ("key_frames", "audio", "label", "video_index",
                                                 "clip_start")}
      template = template or {k: (v.shape[1:], v.dtype) for k, v in host.items()}
    rows = 0 if host is None else len(host["label"])
    if template is None:
      raise ValueError(f"process {process} got no clips to learn the batch shapes from "
                       f"({total} clips for {processes} processes)")
    padded = {k: np.zeros((per_host,) + shape, dtype) for k, (shape, dtype) in template.items()}
    if rows:
      for k in padded:
        padded[k][:rows] = host[k]
    audio, video = encode(params, vae_params, parallel.global_batch(
        {"key_frames": padded["key_frames"], "audio": padded["audio"]}, mesh))
    if rows:
      writer.write({"audio_latent": _local_rows(audio)[:rows],
                    "video_latent": _local_rows(video)[:rows],
                    **{field: padded[field][:rows] for field in latents_lib.INT_FIELDS}})
  writer.close()
  parallel.wait_for_all_processes("latents written")
  if process == 0:
    counts = [(f"train-process_{p}-of-{processes}", len(range(p, total, processes)))
              for p in range(processes)]
    latents_lib.write_index(folder, "train", counts, shapes)
  logging.info("latents: wrote %d clips to %s", total, folder)
