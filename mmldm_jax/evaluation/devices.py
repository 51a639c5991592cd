"""Feature networks of the evaluate stage run data-parallel over this process's devices.

What it is for: I3D, PANNs Cnn14 and AudioCLIP embed thousands of clips; `DataParallel` splits each
batch of clips over every local device along a one-axis 'data' mesh, with the weights replicated
(the networks are small next to the clips, so there is nothing to gain from sharding them, and the
training mesh of `config.mesh` is not needed). Across hosts the stage gives every process its own
share of the clips (`stages/evaluate.py`), so no computation spans processes.

Limits: every batch runs on all the devices, padded with copies of its last clip (their outputs
dropped) to the device count times a power of two, so that the batches of a run (full ones, and
the shorter last one of each pass) compile at most log2(batch / devices) + 1 programs, not one per
length: at this project's sizes a feature network's compile costs more than running it on a few
padding clips. Padding wastes less than half of a batch, and nothing for full batches whose size
is the device count times a power of two.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class DataParallel:
  """`function(variables, batch)` jitted, its batch split over `devices` (default: every local
  device), `variables` replicated on them; called with a NumPy batch, returns NumPy outputs (a
  tree of arrays whose leading axis is the batch's)."""

  def __init__(self, function: Callable[[Any, jax.Array], Any], variables: Any,
               devices: Sequence[jax.Device] | None = None):
    self.devices = list(jax.local_devices() if devices is None else devices)
    if not self.devices:
      raise ValueError("DataParallel: no devices given")
    mesh = Mesh(np.asarray(self.devices), ("data",))
    self.batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    self._variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    self._function = jax.jit(function)

  def padded_size(self, count: int) -> int:
    """The batch length that `count` clips are padded to: the device count times the smallest
    power of two that holds them."""
    per_device = -(-count // len(self.devices))
    return len(self.devices) * (1 << (per_device - 1).bit_length())

  def __call__(self, batch: np.ndarray) -> Any:
    batch = np.asarray(batch)
    count = len(batch)
    if count == 0:
      raise ValueError("DataParallel: empty batch")
    padded = self.padded_size(count)
    if padded > count:
      batch = np.concatenate([batch, np.repeat(batch[-1:], padded - count, axis=0)])
    outputs = self._function(self._variables, jax.device_put(batch, self.batch_sharding))
    return jax.tree.map(lambda value: np.asarray(value)[:count], outputs)
