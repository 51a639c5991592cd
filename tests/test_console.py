"""The quiet console (issue 14, item 7): the INFO lines left out without --verbose, log lines kept
off the progress bars' line, and the compact parameter summary with its full table in a file."""
import io
import logging
import os

import jax
import numpy as np
import tqdm

from conftest import REPO_ROOT
from mmldm_jax import main
from mmldm_jax.train import loop


def test_library_and_checkpoint_info_lines_are_left_out_and_our_own_stay():
  import orbax.checkpoint
  orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpoint_manager.py")
  checkpoint_file = os.path.join(REPO_ROOT, "mmldm_jax", "checkpoint.py")
  ours = os.path.join(REPO_ROOT, "mmldm_jax", "train", "loop.py")
  info_filter = main.quiet_logs()
  try:
    def kept(path, level):
      record = logging.LogRecord("absl", level, path, 1, "message", None, None)
      return logging.getLogger("absl").filter(record)
    assert not kept(orbax_file, logging.INFO)
    assert kept(orbax_file, logging.WARNING)
    assert not kept(checkpoint_file, logging.INFO)    # a line per checkpoint save and restore
    assert kept(checkpoint_file, logging.WARNING)     # the preemption notice
    assert kept(ours, logging.INFO)
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
  finally:
    logging.getLogger("absl").removeFilter(info_filter)
    for package in main.QUIET_PACKAGES:
      logging.getLogger(package).setLevel(logging.NOTSET)


def test_log_lines_go_above_the_progress_bar_not_onto_its_line():
  console = io.StringIO()
  bar = tqdm.tqdm(total=4, desc="vae", file=console, mininterval=0)
  bar.update()
  main.AboveProgressBars(console).write("step 1/4 loss=1\n")
  bar.update()
  bar.close()
  text = console.getvalue()
  line = next(part for part in text.split("\n") if "loss=1" in part)
  # The bar was cleared (a carriage return) right before the log line, and redrawn after it.
  assert line.rsplit("\r", 1)[-1] == "step 1/4 loss=1"
  assert "1/4" in line.rsplit("\r", 1)[0]
  assert "2/4" in text.split("loss=1\n", 1)[1]


def test_the_log_handler_closing_at_exit_leaves_the_console_open():
  from absl import logging as absl_logging
  console = io.StringIO()
  handler = absl_logging.PythonHandler(main.AboveProgressBars(console))
  handler.emit(logging.LogRecord("absl", logging.INFO, __file__, 1, "done: x", None, None))
  handler.close()       # what logging.shutdown does at exit
  assert not console.closed and "done: x" in console.getvalue()


def _abstract(shape, sharding=None):
  return jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding)


def test_parameter_summary_counts_every_group_on_one_line():
  params = {"autoencoder": {"dense": {"kernel": _abstract((3, 4)), "bias": _abstract((4,))},
                            "scale": _abstract(())},
            "discriminator": {"conv": {"kernel": _abstract((2, 2, 3, 5))}}}
  assert loop.parameter_summary(params) == "77 parameters (autoencoder 17, discriminator 60)"
  assert loop.parameter_summary({"dit": params["autoencoder"]}) == "17 parameters"


def test_parameter_table_lists_every_parameter_with_its_sharding(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {"vae": {"decoder": {"kernel": _abstract((3, 8), sharded),
                                "bias": _abstract((8,), replicated)}}}
  path = tmp_path / "parameters.txt"
  loop.write_parameter_table(str(path), params, mesh)
  text = path.read_text()
  assert text.startswith("mesh {'data': 2, 'fsdp': 4} over 8 device(s), 1 process(es)")
  kernel = next(line for line in text.splitlines() if "decoder/kernel" in line)
  assert "(3, 8)" in kernel and "24" in kernel and "(None, 'fsdp')" in kernel
  assert "decoder/bias" in text and "Total: 32" in text
