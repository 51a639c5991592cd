"""Checkpoints of a training stage: train state, data-iterator state and config, with Orbax.

One folder per stage (`<workdir>/<stage>/checkpoints/<step>/`) holding three items:
  state   the train state pytree (Orbax StandardSave / StandardRestore; sharded arrays, OCDBT)
  data    the Grain iterator state, one JSON file per process (`process_<i>-of-<n>.json`)
  config  the run's config as JSON (for people and tools; never read back into a run)

Saves are asynchronous (the step loop continues while arrays are written) and keep the last N.
Restores always go through an abstract target whose ShapeDtypeStructs carry the CURRENT mesh's
shardings, so a run saved on 8 devices resumes on 4 or 2. A checkpoint that cannot be read is an error
naming the step and folder, never a silent fresh start. Preemption: `PreemptionWatcher` notices SIGTERM
(one process) or the JAX preemption sync point (several processes) so the loop saves and exits.

Everything Orbax-specific lives in this module, so a move to the Orbax v1 API stays local.
"""
from __future__ import annotations

import json
import os
import signal

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

# Whether `_write_each_array_from_one_replica_on_cpu` has set Orbax's array handler in this process.
_ARRAY_HANDLER_SET = False


def _write_each_array_from_one_replica_on_cpu() -> None:
  """On a CPU-only backend, registers Orbax's array handler with replica-parallel saving off.

  Replica-parallel saving (Orbax's default off GPU) splits a replicated array into one slice per
  device and writes the slices in parallel, which pays where devices have their own memory and
  links (TPU hosts). On a CPU every "device" is the same host memory, so nothing is gained, and
  each slice is an eager `slice` that XLA compiles once per array shape and device: one save of
  the demo:tiny VAE stage on the test suite's 8 CPU devices compiled 120 such programs (13 s,
  measured with another run on the second core). With it off, replica 0 writes each array
  whole; the files are the same format and restore unchanged. Orbax's handler registry is global,
  so this applies to every save in the process; it is set once, without the warning Orbax's
  public `register_type_handler` logs for each override."""
  global _ARRAY_HANDLER_SET
  if _ARRAY_HANDLER_SET or jax.default_backend() != "cpu":
    return
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(), use_replica_parallel=False),
      override=True, ignore_warnings=True)
  _ARRAY_HANDLER_SET = True


def saved_steps(directory: str) -> list[int]:
  """The steps of the checkpoints in `directory` (folders named by their step; Orbax's unfinished
  saves carry a suffix and are not counted), [] when the folder does not exist."""
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def restore_params(directory: str, abstract_params, *, use_ema: bool = True,
                   step: int | None = None):
  """Only the parameters of a checkpoint in `directory`, without its optimiser state or iterator:
  the EMA parameters when the checkpoint has them and `use_ema`, else the parameters, read by
  Orbax's partial restore into the shardings `abstract_params` carries (ShapeDtypeStructs, see
  `abstract_with_shardings`). `abstract_params` may hold only some groups of the saved ones
  ({'autoencoder': ...} of {'autoencoder', 'discriminator'}). `step`: default the newest.
  Raises FileNotFoundError naming the folder when it has no checkpoint, RuntimeError naming the
  step when it cannot be read."""
  directory = os.path.abspath(os.fspath(directory))
  steps = saved_steps(directory)
  if step is None and not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  step = max(steps) if step is None else int(step)
  path = os.path.join(directory, str(step))
  # (read_only=True would log three warnings per restore; create=False never writes either.)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                  item_names=("state", "data", "config"))
  try:
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path) / "state").tree
    key = "ema" if use_ema and "ema" in saved else "params"
    target = {key: abstract_params}
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"][key]
  except Exception as error:  # noqa: BLE001 - re-raised with the step and path, never swallowed
    raise RuntimeError(
        f"cannot restore the parameters of step {step} in {path}: {type(error).__name__}: "
        f"{error}") from error
  finally:
    manager.close()
  logging.info("checkpoint: restored the %s of step %d from %s", key, step, path)
  return restored


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or abstract arrays) carrying the given target shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """Saves and restores one stage's checkpoints in `directory`.

  Args:
    directory: the checkpoint folder, a local path (made absolute; only local folders are
      tested), created when missing.
    save_every: save when `step % save_every == 0` (0 = only forced saves).
    keep: how many of the newest checkpoints to keep.
    async_save: write arrays in the background (the next save or `close` waits for it).
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    # Orbax refuses relative paths; a user's `--workdir=runs/demo` is relative to where they ran.
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = int(save_every)
    _write_each_array_from_one_replica_on_cpu()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)), create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # a run killed mid-save leaves a partial step folder
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "config"))

  # --- queries -------------------------------------------------------------------------------------
  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  # --- save ----------------------------------------------------------------------------------------
  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state, *, data_iterator=None, config=None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator and config) at `step` when due or forced.

    Returns whether a save started. The iterator's state is read now, so it must be the iterator
    positioned right after the batches that produced `state`.
    """
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # --- restore -------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, *, data_iterator=None):
    """Reads the state saved at `step` into the shardings that `abstract_state` carries.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `.sharding` set (see
    `abstract_with_shardings`). `data_iterator`, when given, is moved to the saved position.
    Raises RuntimeError naming the step and folder when anything cannot be read.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - re-raised with the step and path, never swallowed
      raise RuntimeError(
          f"cannot restore the checkpoint of step {step} in {path}: {type(error).__name__}: {error}. "
          f"Delete that step folder to resume from an earlier checkpoint, or use a fresh workdir."
      ) from error
    logging.info("checkpoint: restored step %d from %s", step, path)
    return restored["state"]


class PreemptionWatcher:
  """Tells the train loop when to save and stop because the job is being preempted.

  One process: a SIGTERM handler sets a flag (the signal Cloud TPU, SLURM and Kubernetes send before
  eviction). Several processes: JAX's preemption sync point, which agrees on one step on all hosts
  (it catches SIGTERM itself). Call `reached(step)` once per step on every process.
  """

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: will save a checkpoint and stop after this step", signum)
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
