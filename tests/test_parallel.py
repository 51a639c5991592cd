"""Mesh construction, the logical-axis rule tables (golden PartitionSpecs), sharded parameter sizes,
global batch assembly, cluster detection and the XLA:CPU flags."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax import parallel


def _config(shape=(("data", -1), ("fsdp", 1), ("tensor", 1)), **mesh):
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  config.unlock()
  config.mesh.shape = shape
  config.mesh.update(mesh)
  return config


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = parallel.create_mesh(_config((("data", 2), ("fsdp", -1), ("tensor", 1))))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  mesh = parallel.create_mesh(_config(), devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="config.mesh.shape"):
    parallel.create_mesh(_config((("data", 3), ("fsdp", -1), ("tensor", 1))))
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.create_mesh(_config((("data", -1), ("fsdp", -1), ("tensor", 1))))
  with pytest.raises(ValueError, match="in order"):
    parallel.create_mesh(_config((("fsdp", -1), ("data", 1), ("tensor", 1))))


def test_multislice_mesh_uses_dcn_axes():
  config = _config((("data", 1), ("fsdp", -1), ("tensor", 1)))
  config.mesh.dcn_shape = (("data", 2), ("fsdp", 1), ("tensor", 1))
  # Off TPU a slice is one process: one process cannot hold two slices.
  with pytest.raises(ValueError, match="Number of slices 1"):
    parallel.create_mesh(config)


# Golden: the shipped rule tables on a (data=2, fsdp=2, tensor=2) mesh.
GOLDEN = [
    ("dit", ("embed", "mlp"), (64, 256), P("fsdp", "tensor")),
    ("dit", ("embed", "heads"), (64, 192), P("fsdp", "tensor")),
    ("dit", ("layers", "embed", "mlp"), (2, 64, 256), P(None, "fsdp", "tensor")),
    ("dit", ("norm",), (64,), P()),
    ("dit", ("embed",), (63,), P()),                    # 63 is not divisible by fsdp=2: replicated
    ("dit", ("activation_batch", None), (8, 5), P(("data", "fsdp"))),
    ("dit", ("activation_batch", None), (2, 5), P("data")),   # 2 rows: drops fsdp, keeps data
    ("conv", (None, None, "conv_in", "conv_out"), (3, 3, 3, 16), P(None, None, None, "fsdp")),
    ("conv", (None, None, "conv_in", "conv_out"), (3, 3, 16, 3), P()),
    ("conv", ("embed", "mlp"), (32, 128), P("fsdp", "tensor")),
    ("conv", ("classes", "embed"), (4, 32), P(None, "fsdp")),
]


@pytest.mark.parametrize("family,names,shape,expected", GOLDEN)
def test_rule_table_golden_specs(family, names, shape, expected):
  config = _config((("data", 2), ("fsdp", 2), ("tensor", 2)))
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config, family)
  assert parallel.logical_to_spec(names, shape, mesh, rules) == expected


def test_tree_shardings_small_params_stay_replicated():
  config = _config((("data", 1), ("fsdp", 8), ("tensor", 1)))
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config, "dit")
  tree = {"big": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 64), jnp.float32), ("embed", None)),
          "small": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8,), jnp.float32), ("embed",)),
          "plain": jax.ShapeDtypeStruct((64,), jnp.float32)}
  specs = parallel.tree_specs(tree, mesh, rules, min_sharded_bytes=1024)
  assert specs == {"big": P("fsdp"), "small": P(), "plain": P()}


def test_check_sharded_fails_on_replicated_params():
  config = _config((("data", 1), ("fsdp", 8), ("tensor", 1)))
  mesh = parallel.create_mesh(config)
  weights = jnp.ones((64, 64))
  sharded = jax.device_put(weights, NamedSharding(mesh, P("fsdp")))
  parallel.check_sharded({"w": sharded}, mesh)
  replicated = jax.device_put(weights, NamedSharding(mesh, P()))
  with pytest.raises(ValueError, match="less sharded than configured"):
    parallel.check_sharded({"w": replicated}, mesh)
  # Replicated on purpose (policy): allowed.
  parallel.check_sharded({"w": replicated}, mesh, exempt_bytes=64 * 64 * 4)


def test_global_batch_from_host_data():
  mesh = parallel.create_mesh(_config((("data", 2), ("fsdp", 4), ("tensor", 1))))
  host = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  batch = parallel.global_batch(host, mesh)
  assert batch["x"].shape == (16, 3)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["x"]), host["x"])
  assert parallel.per_process_batch_size(16, mesh, "train_x.batch_size") == 16
  with pytest.raises(ValueError, match="train_x.batch_size=12"):
    parallel.per_process_batch_size(12, mesh, "train_x.batch_size")


def test_activation_constraint_inside_jit():
  config = _config((("data", 2), ("fsdp", 4), ("tensor", 1)))
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config, "dit")

  def constrained(x):
    return nn.with_logical_constraint(x * 2, ("activation_batch", None))

  with parallel.activation_rules(mesh, rules):
    out = jax.jit(constrained)(jnp.ones((8, 4)))
  assert out.sharding.spec == P(("data", "fsdp"))


def test_background_compile_runs_the_program_under_the_rules_and_hands_back_its_errors():
  """The executable compiled on the second thread (abstract arguments, the mesh's activation rules
  entered on that thread) computes what the jitted function computes, with the constraint's
  sharding; a compile error reaches the caller from `result()`."""
  config = _config((("data", 2), ("fsdp", 4), ("tensor", 1)))
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config, "dit")

  def constrained(x):
    return nn.with_logical_constraint(x * 2 + 1, ("activation_batch", None))

  # Replicated in, split over the batch axes out: only the constraint (rules on) splits it.
  x = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), NamedSharding(mesh, P()))
  compiled = parallel.compile_in_background(jax.jit(constrained), parallel.abstract_like(x),
                                             name="test", mesh=mesh, rules=rules).result()
  out = compiled(x)
  assert out.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2 + 1)

  def mismatched(x):
    return x @ jnp.ones((5, 3))   # [8, 4] @ [5, 3]: fails while tracing, on the other thread

  failing = parallel.compile_in_background(jax.jit(mismatched), parallel.abstract_like(x),
                                            name="failing")
  with pytest.raises(TypeError, match="dot_general"):
    failing.result()


def test_detect_cluster(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.detect_cluster() is None
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.detect_cluster() is None
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert parallel.detect_cluster() == "slurm"
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert parallel.detect_cluster() == "cloud_tpu"
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  assert parallel.detect_cluster() == "explicit"
  config = _config()
  config.distributed = "off"
  assert parallel.maybe_initialize_distributed(config) is False
  config.distributed = "maybe"
  with pytest.raises(ValueError, match="config.distributed"):
    parallel.maybe_initialize_distributed(config)


_REDUCTION_HLO = textwrap.dedent("""
    import jax, jax.numpy as jnp
    x = jnp.ones((8, 64, 64, 32))
    print(jax.jit(lambda x: jnp.var(x.reshape(8, -1, 32), axis=1)).lower(x).compile().as_text())
    """)


def test_cpu_xla_flags_keep_reductions_out_of_ynnpack(monkeypatch):
  # This process runs with the flags (conftest sets them as the entry point does): XLA's own
  # kernels. A fresh process without them hands the same reduction to a YNNPACK fusion, so the
  # check below can fail.
  ours = jax.jit(lambda x: jnp.var(x.reshape(8, -1, 32), axis=1)).lower(
      jnp.ones((8, 64, 64, 32))).compile().as_text()
  assert "%ynn_fusion" not in ours
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  plain = subprocess.run([sys.executable, "-c", _REDUCTION_HLO], env=env, capture_output=True,
                         text=True, check=True).stdout
  assert "%ynn_fusion" in plain
  # Already named in XLA_FLAGS (by conftest, or by a user): nothing is added.
  assert parallel.set_cpu_xla_flags() == []
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT "
                     "--xla_backend_optimization_level=2 --xla_cpu_opt_preset=DEFAULT")
  assert parallel.set_cpu_xla_flags() == []
  # Not named, but XLA has started: the flags could no longer take effect, so it is an error.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.raises(RuntimeError, match="xla_cpu_experimental_ynn_fusion_type=.*"
                                         "xla_backend_optimization_level=1.*"
                                         "xla_cpu_opt_preset=FAST_COMPILE"):
    parallel.set_cpu_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  # Where an accelerator may start, the LLVM level and the compile preset are left to XLA (its
  # GPU compiler reads the level too).
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  with pytest.raises(RuntimeError) as raised:
    parallel.set_cpu_xla_flags()
  assert "xla_backend_optimization_level" not in str(raised.value)
  assert "xla_cpu_opt_preset" not in str(raised.value)


def test_forced_cpu_devices_get_twice_their_threads(monkeypatch):
  size = parallel.cpu_thread_pool_size
  assert size("", 2) is None and size("--xla_force_host_platform_device_count=1", 2) is None
  assert size("--xla_force_host_platform_device_count=8", 2) == 16
  assert size("--xla_force_host_platform_device_count=2", 64) == 64
  assert size("--xla_force_host_platform_device_count=2 "
              "--xla_force_host_platform_device_count=8", 2) == 16     # XLA reads the last one
  with pytest.raises(ValueError, match="device_count=eight: expected a positive whole number"):
    size("--xla_force_host_platform_device_count=eight", 2)
  # This process (conftest forces 8 devices): XLA:CPU started its pool with NPROC threads, at
  # least 16 (more on machines of more cores; an NPROC below 16 would bring the deadlock back).
  # They are named tf_XLAEigen in jaxlib 0.10.2, counted where /proc lists a process's threads.
  threads = int(os.environ["NPROC"])
  assert threads >= 16
  jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
  if os.path.isdir("/proc/self/task"):
    names = []
    for task in os.listdir("/proc/self/task"):
      with open(f"/proc/self/task/{task}/comm") as f:
        names.append(f.read().strip())
    assert names.count("tf_XLAEigen") == threads, names
  # Set by the user: left alone. Unset after XLA started: an error, since it would not be read.
  assert parallel.set_cpu_thread_pool_size() is None
  monkeypatch.delenv("NPROC")
  with pytest.raises(RuntimeError, match="NPROC=.*before the first JAX computation"):
    parallel.set_cpu_thread_pool_size()


def test_cpu_only_run_reads_jax_platforms_and_the_installed_plugins(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert parallel.cpu_only_run()
  for platforms in ("cuda", "cpu,tpu", "rocm"):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert not parallel.cpu_only_run(), platforms
  # Unset: the installed packages decide (numpy standing in for an installed plugin).
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(parallel, "_ACCELERATOR_PACKAGES", ("mmldm_jax_no_such_plugin",))
  assert parallel.cpu_only_run()
  monkeypatch.setattr(parallel, "_ACCELERATOR_PACKAGES", ("mmldm_jax_no_such_plugin", "numpy"))
  assert not parallel.cpu_only_run()
