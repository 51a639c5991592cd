"""Checkpointer: sharded save on 8 devices, restore on a 2x2 mesh of 4, iterator state, keep-last-N,
unreadable checkpoints, SIGTERM."""
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmldm_jax import checkpoint as checkpoint_lib


def _state(mesh):
  weights = jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16)
  return {"step": jnp.array(7, jnp.int32),
          "params": {"w": jax.device_put(weights, NamedSharding(mesh, P("fsdp")))}}


def _iterator():
  return iter(grain.MapDataset.source(list(range(100))).shuffle(seed=3).to_iter_dataset())


def test_save_on_8_restore_on_2x2_with_iterator(tmp_path):
  mesh8 = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  state = _state(mesh8)
  iterator = _iterator()
  consumed = [next(iterator) for _ in range(5)]
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=7, keep=2)
  assert not checkpointer.save(6, state, data_iterator=iterator)   # not due
  assert checkpointer.save(7, state, data_iterator=iterator)
  checkpointer.close()
  expected_next = [next(iterator) for _ in range(3)]

  mesh4 = Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
  shardings = {"step": NamedSharding(mesh4, P()), "params": {"w": NamedSharding(mesh4, P("fsdp"))}}
  target = checkpoint_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  fresh_iterator = _iterator()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=7, keep=2)
  assert checkpointer.latest_step() == 7
  restored = checkpointer.restore(7, target, data_iterator=fresh_iterator)
  checkpointer.close()
  assert restored["params"]["w"].sharding == shardings["params"]["w"]
  assert len(restored["params"]["w"].sharding.device_set) == 4
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]),
                                np.asarray(state["params"]["w"]))
  assert int(restored["step"]) == 7
  assert [next(fresh_iterator) for _ in range(3)] == expected_next
  assert consumed  # the saved position was after these


def test_keep_last_n_and_unreadable_checkpoint(tmp_path):
  mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  state = _state(mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=2, async_save=False)
  for step in (1, 2, 3):
    checkpointer.save(step, state)
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 3]
  checkpointer.close()
  # Damage step 3: the state item's files are gone.
  for root, _, files in os.walk(tmp_path / "3" / "state"):
    for name in files:
      os.remove(os.path.join(root, name))
  target = jax.eval_shape(lambda: state)
  target = checkpoint_lib.abstract_with_shardings(target, jax.tree.map(lambda x: x.sharding, state))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  with pytest.raises(RuntimeError, match=r"step 3 in .*3"):
    checkpointer.restore(3, target)
  checkpointer.close()


def test_preemption_watcher_catches_sigterm():
  watcher = checkpoint_lib.PreemptionWatcher()
  try:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.reached(2)
  finally:
    watcher.close()


def test_relative_directory_saves_where_the_user_ran(tmp_path, monkeypatch):
  # `--workdir=runs/demo` in the README: Orbax itself refuses relative paths.
  mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  monkeypatch.chdir(tmp_path)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join("runs", "ckpt"), save_every=1, keep=1,
                                             async_save=False)
  assert checkpointer.save(1, _state(mesh))
  checkpointer.close()
  assert checkpointer.directory == str(tmp_path / "runs" / "ckpt")
  assert checkpoint_lib.Checkpointer(str(tmp_path / "runs" / "ckpt"), save_every=1,
                                     keep=1).latest_step() == 1


def _train_state(mesh, with_ema):
  """A train state as the loop saves it: two parameter groups, optimiser state, optional EMA."""
  sharded = NamedSharding(mesh, P("fsdp"))
  params = {"model": {"w": jax.device_put(jnp.arange(64 * 4, dtype=jnp.float32).reshape(64, 4),
                                          sharded), "b": jnp.ones(3)},
            "discriminator": {"w": jnp.full((8, 2), 5.0)}}
  state = {"step": jnp.array(4, jnp.int32), "params": params,
           "opt_state": jax.tree.map(lambda x: (x * 0, x * 0 + 1), params)}
  if with_ema:
    state["ema"] = jax.tree.map(lambda x: x * 0.5, params)
  return state


@pytest.mark.parametrize("with_ema", [False, True])
def test_params_only_restore_equals_the_params_of_a_full_restore(tmp_path, with_ema):
  mesh8 = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  state = _train_state(mesh8, with_ema)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=2, async_save=False)
  checkpointer.save(4, state, force=True)
  checkpointer.close()
  assert checkpoint_lib.saved_steps(str(tmp_path)) == [4]

  mesh4 = Mesh(np.array(jax.devices()[:4]).reshape(2, 2, 1), ("data", "fsdp", "tensor"))
  shardings = jax.tree.map(lambda x: NamedSharding(mesh4, P("fsdp") if x.shape[:1] == (64,) else P()),
                           state)
  full_target = checkpoint_lib.abstract_with_shardings(jax.eval_shape(lambda: state), shardings)
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  full = checkpointer.restore(4, full_target)
  checkpointer.close()
  kept = "ema" if with_ema else "params"
  # Only one group of the two, no optimiser state: the others are never read.
  only = {"model": full_target[kept]["model"]}
  restored = checkpoint_lib.restore_params(str(tmp_path), only)
  assert set(restored) == {"model"}
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves({"model": full[kept]["model"]})):
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  raw = checkpoint_lib.restore_params(str(tmp_path), only, use_ema=False)
  np.testing.assert_array_equal(np.asarray(raw["model"]["w"]),
                                np.asarray(full["params"]["model"]["w"]))

  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpoint_lib.restore_params(str(tmp_path / "missing"), only)
  assert not os.path.exists(tmp_path / "missing")     # a read never creates the folder


def test_saving_replicated_arrays_on_cpu_compiles_nothing(tmp_path):
  """On the CPU backend each replicated array is written whole by one replica. Orbax's default,
  replica-parallel saving, slices every replicated array per device with an eager `slice` that
  XLA compiles once per shape and device (120 programs for one save of the demo:tiny VAE stage on
  8 devices)."""
  import logging
  mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  replicated = NamedSharding(mesh, P())
  state = {f"w{size}": jax.device_put(jnp.arange(size * 8, dtype=jnp.float32), replicated)
           for size in (3, 5, 7)}
  compiled = []

  class Recorder(logging.Handler):
    def emit(self, record):
      if record.getMessage().startswith("Compiling "):
        compiled.append(record.getMessage().split(" with ")[0])

  logger = logging.getLogger("jax._src.interpreters.pxla")
  recorder = Recorder()
  logger.addHandler(recorder)
  try:
    with jax.log_compiles(True):
      checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=1)
      assert checkpointer.save(1, state)
      checkpointer.close()
  finally:
    logger.removeHandler(recorder)
  assert compiled == [], compiled
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), save_every=1, keep=1)
  restored = checkpointer.restore(
      1, checkpoint_lib.abstract_with_shardings(jax.eval_shape(lambda: state),
                                                jax.tree.map(lambda _: replicated, state)))
  checkpointer.close()
  for name, array in state.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(array))
