"""Entry point: runs the stages listed in `config.stages`, in order.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m mmldm_jax.main --config=configs/aist.py:tiny --workdir=/tmp/x --config.stages=data

Each stage is a function `run(config, workdir)` in its own module, `mmldm_jax/stages/<name>.py`,
imported only when it runs. Stages are
resumable and skip themselves when their output is complete. A stage named in `config.stages` that this
version does not implement is refused before anything runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax import workdir as workdir_lib

# Implemented stages, in order: name -> the module `mmldm_jax.stages.<name>`, whose
# `run(config, workdir)` runs it. A stage appears here once it works end to end.
STAGES = {name: f"mmldm_jax.stages.{name}"
          for name in ("data", "vae", "autoencoder", "latents", "generator", "sample", "evaluate")}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py[:tiny].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for datasets, checkpoints, samples, logs.")
_LIBRARY_LOGS = flags.DEFINE_bool(
    "library_logs", False, "Show the INFO logs of the libraries (Orbax, Grain, etils, JAX): every "
    "checkpoint save alone logs about 20 lines. Warnings and errors are always shown.")

# Packages whose INFO lines are left out of the console unless --library_logs. They log through
# absl (as we do, into the same 'absl' logger) or through their own Python loggers.
QUIET_PACKAGES = ("orbax", "grain", "etils", "jax")


class LibraryInfoFilter(std_logging.Filter):
  """Drops records below WARNING that were logged from inside one of `folders`."""

  def __init__(self, folders):
    super().__init__()
    self.folders = tuple(os.path.join(f, "") for f in folders)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not record.pathname.startswith(self.folders)


def quiet_library_logs(packages=QUIET_PACKAGES) -> LibraryInfoFilter:
  """Leaves the libraries' INFO logs out of the console (our own INFO lines stay): a filter on the
  'absl' logger for records logged from the packages' folders, and WARNING for their own Python
  loggers. Returns the filter (remove it from logging.getLogger('absl') to undo)."""
  folders = []
  for package in packages:
    spec = importlib.util.find_spec(package)
    if spec is not None:
      folders.extend(spec.submodule_search_locations or [])
    std_logging.getLogger(package).setLevel(std_logging.WARNING)
  library_filter = LibraryInfoFilter(folders)
  std_logging.getLogger("absl").addFilter(library_filter)
  return library_filter


def resolve_stages(config) -> list[str]:
  """The stages to run; a stage that does not exist (yet) is an error naming it."""
  config_lib.validate(config)
  stages = config_lib.stage_list(config)
  missing = [s for s in stages if s not in STAGES]
  if missing:
    raise ValueError(
        f"config.stages={config.stages!r}: stage(s) {', '.join(missing)} are not implemented in this "
        f"version; implemented: {', '.join(STAGES)}")
  return stages


def run_stage(name: str, config, workdir: str) -> None:
  run = importlib.import_module(STAGES[name]).run
  logging.info("=== stage %s ===", name)
  run(config, workdir)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError("--workdir is required (or set config.workdir)")
  if "://" in workdir:
    raise app.UsageError(f"--workdir={workdir}: expected a local or mounted folder (stages write "
                         "files with the local filesystem; mount a bucket, e.g. with gcsfuse)")
  workdir = os.path.abspath(workdir)
  stages = resolve_stages(config)
  if not _LIBRARY_LOGS.value:
    quiet_library_logs()
  parallel.maybe_initialize_distributed(config)  # before anything touches the devices
  cache = config_lib.enable_compilation_cache(config)
  logging.info("XLA compilation cache: %s", cache or "off (config.compilation_cache_dir='')")
  os.makedirs(workdir, exist_ok=True)
  for name in stages:
    run_stage(name, config, workdir)
  logging.info("done: %s in %s", ", ".join(stages), workdir)
  if "sample" in stages:
    logging.info("samples to watch and listen to: %s/*.mp4 (a .png of each beside it)",
                 workdir_lib.samples_dir(workdir, config.sample.mode))
  if "evaluate" in stages:
    logging.info("scores: %s; training curves and quality signals: tensorboard --logdir %s "
                 "(pictures and sounds also in <stage>/logs/media)",
                 workdir_lib.metrics_file(workdir), workdir)


if __name__ == "__main__":
  app.run(main)
