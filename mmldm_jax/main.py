"""Entry point: runs the stages listed in `config.stages`, in order.

  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m mmldm_jax.main --config=configs/aist.py:tiny --workdir=/tmp/x --config.stages=data

Each stage is a function `run(config, workdir)` in its own module, `mmldm_jax/stages/<name>.py`,
imported only when it runs. Stages are resumable and skip themselves when their output is complete.
A stage named in `config.stages` that this version does not implement is refused before anything
runs.

The console: a header line, then per stage a start line, a progress bar (rate and ETA), the metrics
every `log_every` steps and an end line naming what was written where; the last lines say where the
samples and the scores are. `--verbose` adds the libraries' INFO lines and one line per checkpoint
save and restore.
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
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show every INFO line: the libraries' (Orbax, Grain, etils, JAX; every "
    "checkpoint save alone logs about 20 lines) and our own line per checkpoint save and restore. "
    "Warnings and errors are always shown.")

# Left out of the console unless --verbose: the INFO lines of these packages (they log through absl,
# as we do, into the same 'absl' logger, or through their own Python loggers) and of our modules
# whose lines repeat for every checkpoint save or restore (a training stage's end line names its
# checkpoint folder instead).
QUIET_PACKAGES = ("orbax", "grain", "etils", "jax")
QUIET_MODULES = ("mmldm_jax.checkpoint",)


class InfoFilter(std_logging.Filter):
  """Drops records below WARNING that were logged from inside one of `folders` or from one of
  `files`."""

  def __init__(self, folders=(), files=()):
    super().__init__()
    self.folders = tuple(os.path.join(f, "") for f in folders)
    self.files = frozenset(files)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or not (record.pathname.startswith(self.folders) or record.pathname in self.files))


def quiet_logs(packages=QUIET_PACKAGES, modules=QUIET_MODULES) -> InfoFilter:
  """Leaves the INFO logs of `packages` and `modules` out of the console (the other INFO lines
  stay): a filter on the 'absl' logger for records logged from their files, and WARNING for the
  packages' own Python loggers. Returns the filter (remove it from logging.getLogger('absl') to
  undo)."""
  folders, files = [], []
  for package in packages:
    spec = importlib.util.find_spec(package)
    if spec is not None:
      folders.extend(spec.submodule_search_locations or [])
    std_logging.getLogger(package).setLevel(std_logging.WARNING)
  for module in modules:
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin:
      files.append(spec.origin)
  info_filter = InfoFilter(folders, files)
  std_logging.getLogger("absl").addFilter(info_filter)
  return info_filter


class AboveProgressBars:
  """A stream for the log handler that writes each line above the progress bars on the console
  (tqdm.write clears the bars, writes, redraws them), so log lines and bars never share a line."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    from tqdm import tqdm
    tqdm.write(text, file=self.stream, end="")

  def flush(self) -> None:
    self.stream.flush()

  def isatty(self) -> bool:
    return self.stream.isatty()

  def close(self) -> None:
    """The handler closes its stream at exit; the console stream stays open (not ours)."""
    self.stream.flush()


def log_above_progress_bars() -> None:
  """Routes absl's console handler through `AboveProgressBars` (when it writes to stderr)."""
  import sys
  handler = logging.get_absl_handler().python_handler
  if handler.stream is sys.stderr:
    handler.stream = AboveProgressBars(sys.stderr)


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
  """Runs one stage; the stage logs its own start and end lines (what it does, what it wrote). A
  stage whose input is missing (`workdir.MissingInput`, raised before it does any work) gets the
  stage that makes the input run first, then runs again: stages never run each other."""
  run = importlib.import_module(STAGES[name]).run
  try:
    run(config, workdir)
    return
  except workdir_lib.MissingInput as missing:
    if missing.stage not in STAGES or missing.stage == name:
      raise
    logging.info("%s: %s; running the %s stage first", name, missing, missing.stage)
    needed = missing.stage
  # Outside the except block, so that an error of the needed stage is not reported as raised
  # while handling the missing input.
  run_stage(needed, config, workdir)
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
  if not _VERBOSE.value:
    quiet_logs()
  log_above_progress_bars()
  # Both before anything touches the devices.
  xla_flags = parallel.set_cpu_xla_flags()
  thread_pool = parallel.set_cpu_thread_pool_size()   # only where XLA_FLAGS forces CPU devices
  if thread_pool is not None:
    logging.info("mmldm_jax: NPROC=%d (XLA:CPU's thread pool, twice the forced CPU devices)",
                 thread_pool)
  parallel.maybe_initialize_distributed(config)
  cache = config_lib.enable_compilation_cache(config)
  logging.info("mmldm_jax: stages %s in %s (XLA compilation cache: %s; XLA flags added: %s)",
               ", ".join(stages), workdir, cache or "off", " ".join(xla_flags) or "none")
  os.makedirs(workdir, exist_ok=True)
  for name in stages:
    run_stage(name, config, workdir)
  where = [f"stages {', '.join(stages)} in {workdir}"]
  if "sample" in stages:
    where.append(f"samples to watch and listen to: "
                 f"{workdir_lib.samples_dir(workdir, config.sample.mode)}/*.mp4 (a .png beside "
                 f"each)")
  if "evaluate" in stages:
    where.append(f"scores: {workdir_lib.metrics_file(workdir, config.sample.mode)}")
  where.append(f"curves, pictures and sounds: tensorboard --logdir {workdir} (also in "
               f"<stage>/logs/media)")
  logging.info("done: %s", "; ".join(where))


if __name__ == "__main__":
  app.run(main)
