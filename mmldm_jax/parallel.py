"""Device mesh, logical-axis sharding policy, global batches and multi-host start-up.

The sharding policy is data: `config.mesh.rules.<family>` maps logical axis names (which every parameter
carries through `nn.with_logical_partitioning`) onto mesh axes. The small functions here apply it:

  mesh = create_mesh(config)                                  # ('data', 'fsdp', 'tensor')
  rules = logical_rules(config, "dit")
  shardings = tree_shardings(jax.eval_shape(init), mesh, rules, min_sharded_bytes)
  with activation_rules(mesh, rules): jitted_step(...)         # nn.with_logical_constraint works inside
  batch = global_batch(host_batch, mesh)                       # per-process data -> one global jax.Array

A dimension that its mesh axes do not divide evenly drops the trailing axes until they do (in the end it
stays replicated), and arrays smaller than `min_sharded_bytes` stay replicated; `check_sharded` fails
when the arrays on the devices are less sharded than the mesh allows for the bytes the policy meant
to shard.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import flags, logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch dimension of activations and data.
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------------------------------------
# Mesh
# ------------------------------------------------------------------------------------------------
def _axis_sizes(pairs, field: str) -> dict[str, int]:
  sizes = dict((str(name), int(size)) for name, size in pairs)
  if tuple(sizes) != MESH_AXES:
    raise ValueError(f"config.mesh.{field}={tuple(pairs)!r}: expected the axes {MESH_AXES} in order")
  return sizes


def resolve_mesh_shape(shape: dict[str, int], num_devices: int, field: str = "shape") -> tuple:
  """Replaces the one -1 entry by whatever makes the product equal `num_devices`."""
  fill = [name for name, size in shape.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh.{field}: at most one axis may be -1, got {fill}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if fixed <= 0 or num_devices % fixed:
    raise ValueError(f"config.mesh.{field}={shape}: the fixed axis sizes (product {fixed}) must divide "
                     f"the {num_devices} available devices")
  if fill:
    shape = dict(shape, **{fill[0]: num_devices // fixed})
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"config.mesh.{field}={shape}: product {math.prod(shape.values())} != "
                     f"{num_devices} devices (use -1 for one axis to fill the rest)")
  return tuple(shape.values())


def create_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of `config.mesh` over `devices` (default: all devices).

  With more than one slice (`config.mesh.dcn_shape` has an entry > 1) the mesh is built with
  `create_hybrid_device_mesh`, so the DCN axes connect slices and the ICI axes stay inside one. On
  TPU a slice is what the devices report; on GPU and CPU it is one process (a node).
  """
  devices = list(jax.devices() if devices is None else devices)
  ici = _axis_sizes(config.mesh.shape, "shape")
  dcn = _axis_sizes(config.mesh.dcn_shape, "dcn_shape")
  num_slices = math.prod(dcn.values())
  if any(size == -1 for size in dcn.values()):
    raise ValueError(f"config.mesh.dcn_shape={config.mesh.dcn_shape}: -1 is not allowed across slices")
  if len(devices) % num_slices:
    raise ValueError(f"config.mesh.dcn_shape={config.mesh.dcn_shape}: {num_slices} slices do not divide "
                     f"{len(devices)} devices")
  ici_shape = resolve_mesh_shape(ici, len(devices) // num_slices)
  if num_slices > 1:
    # TPU devices know their slice; elsewhere (GPU nodes, CPU processes) each process is one granule.
    process_is_granule = not hasattr(devices[0], "slice_index")
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, tuple(dcn.values()), devices, process_is_granule=process_is_granule,
        allow_split_physical_axes=True)
  elif devices[0].platform == "cpu" or len(devices) != jax.device_count():
    # No physical topology to respect (CPU, or a subset of the devices): keep the given order.
    device_array = np.asarray(devices).reshape(ici_shape)
  else:
    device_array = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


# ------------------------------------------------------------------------------------------------
# Logical axis rules -> shardings
# ------------------------------------------------------------------------------------------------
def logical_rules(config, family: str) -> tuple[tuple[str, Any], ...]:
  """The rule table of one model family (`config.mesh.rules.<family>`), as Flax expects it."""
  if family not in config.mesh.rules:
    raise ValueError(f"config.mesh.rules.{family} does not exist; families: "
                     f"{', '.join(config.mesh.rules.keys())}")
  return tuple((str(name), axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in config.mesh.rules[family])


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules) -> PartitionSpec:
  """Maps one array's logical axis names to a PartitionSpec.

  Like Flax's rule application (the first rule for a name whose mesh axes are still unused wins),
  plus: mesh axes that do not divide the dimension are dropped from the end.
  """
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    chosen: tuple[str, ...] = ()
    for rule_name, rule_axes in rules:
      axes = _as_tuple(rule_axes)
      if rule_name == name and not used.intersection(axes):
        chosen = axes
        break
    while chosen and size % math.prod(mesh.shape[a] for a in chosen):
      chosen = chosen[:-1]
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def _is_boxed(x) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def tree_specs(abstract_tree, mesh: Mesh, rules, min_sharded_bytes: int = 0):
  """PartitionSpecs for a tree of (possibly boxed) abstract arrays, e.g. `jax.eval_shape(init)`.

  Boxed leaves (`nn.LogicallyPartitioned`) use their logical names; plain leaves and leaves smaller
  than `min_sharded_bytes` are replicated. The result has the unboxed tree structure.
  """
  def spec(leaf):
    if not _is_boxed(leaf):
      return PartitionSpec()
    value = leaf.value
    if _nbytes(value.shape, value.dtype) < min_sharded_bytes:
      return PartitionSpec()
    return logical_to_spec(leaf.names, value.shape, mesh, rules)
  return jax.tree.map(spec, abstract_tree, is_leaf=_is_boxed)


def tree_shardings(abstract_tree, mesh: Mesh, rules, min_sharded_bytes: int = 0):
  """NamedShardings for a tree of (possibly boxed) abstract arrays; see `tree_specs`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      tree_specs(abstract_tree, mesh, rules, min_sharded_bytes),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def unbox(tree):
  """Drops the logical-partitioning boxes (values stay)."""
  return nn.meta.unbox(tree)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules) -> Iterator[None]:
  """Mesh + rule context under which `nn.with_logical_constraint` inside the models takes effect.

  Enter it around the jitted call (tracing happens inside) so constraints see the mesh and rules.
  Only the activation_* rules are active: parameters are placed by the jit's in/out shardings.
  Limit: Flax re-runs parameter initialisers during `apply` (its shape check) and, under a mesh,
  constrains their boxed outputs; an initialiser whose box names do not match its value's rank
  (e.g. `nn.DenseGeneral` with a kernel_init boxed for the unflattened kernel) then fails to trace.
  """
  activation_only = tuple((name, axes) for name, axes in rules if name.startswith("activation_"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(activation_only):
    yield


# ------------------------------------------------------------------------------------------------
# Sizes and checks
# ------------------------------------------------------------------------------------------------
def bytes_per_device(tree) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) of a tree of jax.Arrays (or abstract arrays
  with a `.sharding`), from each leaf's sharding."""
  total = 0
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    total += _nbytes(leaf.shape, leaf.dtype)
    shard_bytes = _nbytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype)
    for device in leaf.sharding.device_set:
      per_device[device] = per_device.get(device, 0) + shard_bytes
  return total, max(per_device.values(), default=0)


def replicated_by_policy_bytes(abstract_tree, shardings) -> int:
  """Bytes the policy deliberately leaves unsharded (small, unannotated or indivisible arrays)."""
  leaves = jax.tree.leaves(unbox(abstract_tree))
  return sum(_nbytes(leaf.shape, leaf.dtype)
             for leaf, sharding in zip(leaves, jax.tree.leaves(shardings))
             if sharding.is_fully_replicated)


def check_sharded(tree, mesh: Mesh, axes: Sequence[str] = ("fsdp", "tensor"),
                  tolerance: float = 0.05, exempt_bytes: int = 0, what: str = "parameters") -> None:
  """Fails loudly when the arrays hold more bytes per device than sharding over `axes` allows.

  Allowed: (total - exempt) / prod(mesh sizes of axes) * (1 + tolerance) + exempt, where `exempt_bytes`
  are bytes the policy replicates on purpose (see `replicated_by_policy_bytes`).
  """
  total, on_device = bytes_per_device(tree)
  factor = math.prod(mesh.shape[a] for a in axes)
  allowed = (total - exempt_bytes) / factor * (1 + tolerance) + exempt_bytes
  if on_device > allowed:
    biggest = sorted(
        ((_nbytes(leaf.shape, leaf.dtype), jax.tree_util.keystr(path), leaf.sharding.spec)
         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
         if leaf.sharding.is_fully_replicated), reverse=True)[:5]
    raise ValueError(
        f"{what} are less sharded than configured: {on_device} bytes on one device, allowed "
        f"{allowed:.0f} (= total {total} over {'x'.join(axes)}={factor}, +{tolerance:.0%}, plus "
        f"{exempt_bytes} replicated by policy). Largest replicated: {biggest}")


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(host_batch, mesh: Mesh):
  """Assembles per-process numpy batches (each process holds batch/process_count rows) into global
  jax.Arrays sharded along the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      host_batch)


def per_process_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
  """The rows each process loads; fails when the batch does not split over processes and devices."""
  data_parallel = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % data_parallel or global_batch_size % jax.process_count():
    raise ValueError(f"config.{field}={global_batch_size}: must be a multiple of the data-parallel "
                     f"mesh size {data_parallel} and of the process count {jax.process_count()}")
  return global_batch_size // jax.process_count()


# ------------------------------------------------------------------------------------------------
# Multi-host start-up
# ------------------------------------------------------------------------------------------------
_barrier_count = 0


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Blocks until every process has reached this point: a barrier of the coordination service
  that `jax.distributed` started, not a device collective. Does nothing in a single process.

  Why not `multihost_utils.sync_global_devices`: that is a collective, and on CPU the first
  collective over a set of devices sets up its gloo communicator with a fixed 30 s deadline, so
  a process arriving more than 30 s after another (still compiling, or slowed by a busy machine)
  fails there. Every process must call the same barriers in the same order (the name gets a
  running count so the same name can be used again)."""
  global _barrier_count
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the coordination-service client (no public barrier API)
  _barrier_count += 1
  distributed.global_state.client.wait_at_barrier(f"mmldm_{name}_{_barrier_count}",
                                                  int(timeout_s * 1000))


def gather_across_processes(tree, *, name: str, tiled: bool = False):
  """`multihost_utils.process_allgather(tree, tiled=tiled)` after `wait_for_all_processes(name)`,
  so that the processes start the gather together (see there for the 30 s deadline on CPU)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415
  wait_for_all_processes(name)
  return multihost_utils.process_allgather(tree, tiled=tiled)


class BackgroundCompile:
  """Runs `compile_fn()`, which compiles one or more programs ahead of time and returns them, on a
  second thread; given a `mesh`, under `activation_rules(mesh, rules)` (the train step is traced
  there; quality-signal programs are not). `compile_in_background` is the one-program form.

  Why: XLA:CPU compiles one program on one thread, so on a CPU the train step's compile (the
  demo autoencoder's: about 100 s) can run beside the state's init compile or checkpoint restore
  instead of after it. Measured on a 2-core machine, the demo autoencoder's init, step and
  quality-signal compiles: 171 s one after the other, 127 s side by side
  (benchmarks/background_compile.py). `result()` waits for what
  `compile_fn` returns, raises what it raised, and, with several processes, waits until every
  process has compiled (`wait_for_all_processes`), so that no process reaches an executable's
  first collective long before another. The barrier runs on the calling thread, in the order of
  the caller's other barriers."""

  def __init__(self, compile_fn: Callable[[], Any], *, name: str, mesh: Mesh | None = None,
               rules=()):
    self._name = name
    self._outcome: dict[str, Any] = {}
    context = (lambda: activation_rules(mesh, rules)) if mesh is not None else contextlib.nullcontext

    def run():
      try:
        with context():  # contexts are per thread: entered here
          self._outcome["compiled"] = compile_fn()
      except Exception as error:  # noqa: BLE001  re-raised by result() on the caller's thread
        self._outcome["error"] = error

    # A daemon thread: an error on the main thread ends the process without waiting for it.
    self._thread = threading.Thread(target=run, name=f"compile_{name}", daemon=True)
    self._thread.start()

  def result(self):
    """What `compile_fn` returned, once it is compiled here and (at the first call) on every
    process."""
    self._thread.join()
    if "error" in self._outcome:
      raise self._outcome["error"]
    if not self._outcome.get("all_processes"):
      wait_for_all_processes(f"compiled_{self._name}")
      self._outcome["all_processes"] = True
    return self._outcome["compiled"]


def compile_in_background(jitted, *args, name: str, mesh: Mesh | None = None,
                          rules=()) -> BackgroundCompile:
  """`jitted` compiled ahead of time for `args` (abstract `jax.ShapeDtypeStruct`s with shardings,
  or arrays) on a second thread: a `BackgroundCompile` whose `result()` is the executable."""
  return BackgroundCompile(lambda: jitted.lower(*args).compile(), name=name, mesh=mesh,
                           rules=rules)


def abstract_like(tree):
  """`jax.ShapeDtypeStruct`s (shape, dtype, sharding) of the arrays in `tree`: what
  `BackgroundCompile` compiles for."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ------------------------------------------------------------------------------------------------
# XLA:CPU kernels
# ------------------------------------------------------------------------------------------------
# XLA flags this project sets for the CPU backend, unless the user's XLA_FLAGS already names them.
# jaxlib 0.10.2's XLA:CPU hands reductions (every GroupNorm's statistics) and matrix products to
# YNNPACK fusions; at this project's sizes they run slower than XLA's own kernels, so an empty
# fusion-type list keeps every op in XLA. Measured on the demo config (benchmarks/README.md,
# the "YNNPACK fusions off" rows), as a share of this CPU's matmul rate: the VAE step 0.28 against
# 0.15, the autoencoder step 0.18 against 0.13, the DiT step 0.13 against 0.08; compile times
# within noise, and the first step loses YNNPACK's 1-2 s of set-up. Only the CPU backend reads it.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# Set only when no accelerator can start (`cpu_only_run`): LLVM's -O1 instead of XLA's default
# level 3 for the kernels XLA generates. On XLA:CPU most compile time is LLVM optimising and
# emitting those kernels, and at this project's CPU sizes -O1's kernels run as fast: the demo
# config's train steps, one core each, -O1 against level 3 (benchmarks/README.md, 2026-12-05):
# compile VAE 13.7 s / 22.6 s, autoencoder 155 s / 187 s, DiT 10.0 s / 16.1 s; step VAE 0.79 s /
# 0.90 s, autoencoder 0.40 s / 0.38-0.46 s, DiT 7.1 ms / 9.4 ms. The GPU compiler reads the same
# flag for its own kernels, which is why it is not set where an accelerator may run.
# XLA:CPU's FAST_COMPILE preset (`xla_cpu_opt_preset`) skips optimisation passes that spend
# compile time to buy run time; measured on this project's programs (benchmarks/README.md, the
# "FAST_COMPILE" rows) it compiles faster and the steps run as fast.
CPU_ONLY_XLA_FLAGS = {"xla_backend_optimization_level": "1",
                      "xla_cpu_opt_preset": "FAST_COMPILE"}

# Packages whose presence means JAX may start an accelerator backend instead of the CPU.
_ACCELERATOR_PACKAGES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                         "jax_rocm7_plugin", "libtpu")


def cpu_only_run() -> bool:
  """Whether JAX can only start its CPU backend here: JAX_PLATFORMS names nothing but 'cpu', or
  it is unset and no accelerator plugin (CUDA, ROCm, TPU) is installed. Looks at the environment
  only, so it can run before XLA reads its flags."""
  import importlib.util  # noqa: PLC0415
  platforms = [name.strip() for name in os.environ.get("JAX_PLATFORMS", "").split(",") if name.strip()]
  if platforms:
    return set(platforms) == {"cpu"}
  return not any(importlib.util.find_spec(package) for package in _ACCELERATOR_PACKAGES)


def _require_xla_not_started(caller: str, setting: str) -> None:
  """Raises RuntimeError when the JAX backends have started: XLA reads its flags and XLA:CPU its
  thread-pool size once, when the first backend starts, so `setting` would not take effect."""
  from jax._src import xla_bridge  # noqa: PLC0415  (the only way to ask whether XLA has started)
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(f"{caller}: the JAX backends have already started, so XLA would not read "
                       f"{setting}; call it before the first JAX computation")


def set_cpu_xla_flags() -> list[str]:
  """Appends `CPU_XLA_FLAGS` (and, when `cpu_only_run()`, `CPU_ONLY_XLA_FLAGS`) to the XLA_FLAGS
  environment variable, leaving out any flag that XLA_FLAGS already names (the user's choice
  wins). XLA reads XLA_FLAGS once, when the first backend starts, so this must run before the
  first JAX computation; it raises RuntimeError after it. Returns the flags it added."""
  current = os.environ.get("XLA_FLAGS", "")
  named = {word.lstrip("-").split("=", 1)[0] for word in current.split()}
  wanted = dict(CPU_XLA_FLAGS, **(CPU_ONLY_XLA_FLAGS if cpu_only_run() else {}))
  added = [f"--{name}={value}" for name, value in wanted.items() if name not in named]
  if not added:
    return []
  _require_xla_not_started("set_cpu_xla_flags", " ".join(added))
  os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def cpu_thread_pool_size(xla_flags: str, cores: int) -> int | None:
  """The XLA:CPU thread pool size (the NPROC environment variable) that a run forcing several CPU
  devices (`--xla_force_host_platform_device_count=N` in `xla_flags`, N > 1) needs: twice the
  devices, at least `cores`. None when no flag forces more than one device (the default pool
  serves).

  XLA:CPU runs every device's program on one pool of max(cores, devices) threads, and a
  collective holds its thread until all devices join it. A device may start two collectives that
  do not depend on each other in either order; with one thread per device, a device that starts
  the later one first can leave no thread for the earlier one, which the others wait at: the
  fsdp=8 generator step on 8 devices of a 2-core machine ended in XLA's 40 s rendezvous timeout in
  2 of 8 test runs (2026-12-07), and in none of 8 with twice the threads. A second thread per
  device makes that much less likely; it does not prove it impossible."""
  counts = [word.split("=", 1)[1] for word in xla_flags.split()
            if word.lstrip("-").startswith("xla_force_host_platform_device_count=")]
  if not counts:
    return None
  if not counts[-1].isdigit():      # XLA reads the last one
    raise ValueError(f"XLA_FLAGS: --xla_force_host_platform_device_count={counts[-1]}: expected a "
                     f"positive whole number of CPU devices")
  devices = int(counts[-1])
  return max(int(cores), 2 * devices) if devices > 1 else None


def set_cpu_thread_pool_size() -> int | None:
  """Sets NPROC to `cpu_thread_pool_size(XLA_FLAGS, this machine's cores)` unless NPROC is already
  set (the user's choice wins) or no size is needed. XLA:CPU reads it when its client starts, so
  this must run before the first JAX computation; it raises RuntimeError after it. Returns the
  size it set, or None."""
  if "NPROC" in os.environ:
    return None
  size = cpu_thread_pool_size(os.environ.get("XLA_FLAGS", ""), os.cpu_count() or 1)
  if size is None:
    return None
  _require_xla_not_started("set_cpu_thread_pool_size", f"NPROC={size}")
  os.environ["NPROC"] = str(size)
  return size


def detect_cluster() -> str | None:
  """Names the multi-process environment this process runs in, or None for a single process.

  Explicit JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), a SLURM job step with more than
  one task, or a Cloud TPU VM with more than one worker.
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1:
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "cloud_tpu"
  return None


def maybe_initialize_distributed(config) -> bool:
  """Calls `jax.distributed.initialize()` when `config.distributed` is 'on', or 'auto' and a cluster is
  detected. Must run before anything touches the devices. Returns whether it initialised."""
  mode = config.distributed
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"config.distributed={mode!r}: expected 'auto', 'on' or 'off'")
  cluster = detect_cluster() if mode == "auto" else mode
  if mode == "off" or cluster is None:
    return False
  kwargs = {}
  if cluster == "explicit":
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} not; set all three")
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # CPU processes talk through gloo; the default (none) cannot run cross-process collectives.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize (%s) %s", cluster, kwargs)
  jax.distributed.initialize(**kwargs)
  # Orbax's own barriers (creating a checkpoint folder, finishing a save) are device collectives
  # by default; this absl flag of orbax's makes them coordination-service barriers, for the
  # reason given in `wait_for_all_processes`.
  import orbax.checkpoint  # noqa: F401, PLC0415  (defines the flag)
  flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
