"""Feature networks of the evaluate stage run data-parallel over this process's devices.

What it is for: I3D, PANNs Cnn14 and AudioCLIP embed thousands of clips; `DataParallel` splits each
batch of clips over every local device along a one-axis 'data' mesh, with the weights replicated
(the networks are small next to the clips, so there is nothing to gain from sharding them, and the
training mesh of `config.mesh` is not needed). Across hosts the stage gives every process its own
share of the clips (`stages/evaluate.py`), so no computation spans processes.

Limits: a batch of at least as many clips as devices is padded with copies of its last clip to a
multiple of the device count (the padding's outputs are dropped), so batch sizes that are multiples
of it waste nothing; a smaller batch runs on as many devices as it has clips (the weights are then
also placed on that subset, once). Each new batch shape compiles once.
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
    self._host_variables = variables
    self._placements: dict[int, tuple[NamedSharding, Any]] = {}
    self._function = jax.jit(function)

  def placement(self, count: int) -> tuple[NamedSharding, Any]:
    """(the batch sharding, the replicated variables) on the first `count` devices."""
    if count not in self._placements:
      mesh = Mesh(np.asarray(self.devices[:count]), ("data",))
      self._placements[count] = (NamedSharding(mesh, PartitionSpec("data")),
                                 jax.device_put(self._host_variables,
                                                NamedSharding(mesh, PartitionSpec())))
    return self._placements[count]

  def __call__(self, batch: np.ndarray) -> Any:
    batch = np.asarray(batch)
    count = len(batch)
    if count == 0:
      raise ValueError("DataParallel: empty batch")
    used = min(count, len(self.devices))
    padded = -(-count // used) * used
    if padded > count:
      batch = np.concatenate([batch, np.repeat(batch[-1:], padded - count, axis=0)])
    sharding, variables = self.placement(used)
    outputs = self._function(variables, jax.device_put(batch, sharding))
    return jax.tree.map(lambda value: np.asarray(value)[:count], outputs)
