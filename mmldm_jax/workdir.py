"""The workdir layout: where every stage's inputs and outputs live. The one module that joins names
onto a workdir; the stages ask it instead of building paths themselves.

  <workdir>/data/                       the synthetic dataset (`data` stage), unless
                                        config.data.data_dir names ingested records
  <workdir>/preview.mp4, preview.png    a look at the first clip (`data` stage)
  <workdir>/<stage>/checkpoints/<step>/ Orbax checkpoints of a training stage (vae, autoencoder,
                                        generator): train state, data iterator, config
  <workdir>/<stage>/logs/               metrics.jsonl, TensorBoard event files, media/
  <workdir>/<stage>/parameters.txt      every parameter of a training stage: shape, size, sharding
  <workdir>/vae/scale_factor.json       the VAE scale factor the `vae` stage measured
  <workdir>/latents/                    the `latents` stage's encoded training clips
  <workdir>/samples/<mode>/             the `sample` stage's mp4, wav and png files, index.json
  <workdir>/evaluate/                   the `evaluate` stage's cached features
  <workdir>/metrics.json                the `evaluate` stage's scores
"""
from __future__ import annotations

import os
from typing import Any

METRICS_FILE = "metrics.json"
SCALE_FACTOR_FILE = os.path.join("vae", "scale_factor.json")


def data_folder(config: Any, workdir: str) -> str:
  """Where the dataset lives: config.data.data_dir, or <workdir>/data for the synthetic set."""
  if config.data.data_dir:
    return config.data.data_dir
  if config.data.source == "synthetic":
    return os.path.join(workdir, "data")
  raise ValueError("config.data.data_dir is empty: expected the folder written by "
                   "`python -m mmldm_jax.data.ingest` (with source='records')")


def preview_files(workdir: str) -> tuple[str, str]:
  """(mp4, png) of the `data` stage's preview."""
  return os.path.join(workdir, "preview.mp4"), os.path.join(workdir, "preview.png")


def stage_dir(workdir: str, name: str) -> str:
  """A stage's own folder (the training stages' and the evaluate stage's)."""
  return os.path.join(workdir, name)


def checkpoint_dir(workdir: str, name: str) -> str:
  return os.path.join(stage_dir(workdir, name), "checkpoints")


def logs_dir(workdir: str, name: str) -> str:
  return os.path.join(stage_dir(workdir, name), "logs")


def scale_factor_file(workdir: str) -> str:
  return os.path.join(workdir, SCALE_FACTOR_FILE)


def latents_dir(workdir: str) -> str:
  return os.path.join(workdir, "latents")


def samples_dir(workdir: str, mode: str) -> str:
  return os.path.join(workdir, "samples", mode)


def metrics_file(workdir: str, mode: str = "joint") -> str:
  """The evaluate stage's scores of the samples of `mode` (config.sample.mode): metrics.json for
  joint samples, metrics_<mode>.json for the others (a2v, v2a, continuation, reconstruction), so
  that scoring one mode keeps the others' scores."""
  if mode == "joint":
    return os.path.join(workdir, METRICS_FILE)
  stem, extension = os.path.splitext(METRICS_FILE)
  return os.path.join(workdir, f"{stem}_{mode}{extension}")


def parameters_file(workdir: str, name: str) -> str:
  """A training stage's table of every parameter (shape, size, sharding)."""
  return os.path.join(stage_dir(workdir, name), "parameters.txt")


class MissingInput(FileNotFoundError):
  """A stage's input, which another stage makes, is not there yet. `stage` names that stage:
  `main.py` runs it and then the stage that raised again (stages never run each other)."""

  def __init__(self, stage: str, message: str):
    super().__init__(message)
    self.stage = stage


def require_dataset(config: Any, workdir: str, *, can_make: bool) -> str:
  """The dataset folder (`data_folder`) for a stage that reads it. Without its index.json: raises
  MissingInput('data') for the synthetic source when the data stage can make it here (`can_make`,
  e.g. a single process), FileNotFoundError naming what to run or set otherwise."""
  folder = data_folder(config, workdir)
  index = os.path.join(folder, "index.json")
  if os.path.exists(index):
    return folder
  if can_make and config.data.source == "synthetic":
    raise MissingInput("data", f"no dataset in {folder} yet (the data stage writes it)")
  raise FileNotFoundError(f"no dataset index at {index}: run the `data` stage first "
                          f"(config.stages starting with 'data') or set config.data.data_dir to "
                          f"ingested records")
