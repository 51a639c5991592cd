"""Test setup: 8 CPU devices (so sharding is really exercised), absl flags parsed (Grain workers need
them), and a persistent compilation cache so repeated compiles across test files are cheap."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")

# The tests name configs and scripts by their paths in the repository (`configs/demo.py:tiny`), as
# the README's commands do; working from the repository root lets the suite run from any folder.
os.chdir(REPO_ROOT)

# The fast subset (`pytest -m "not slow" tests`) leaves out the files that train or sample a whole
# model (each a minute or more on 2 cores, most of it compiling); the full suite is what CI runs.
SLOW_FILES = frozenset({
    "test_autoencoder.py", "test_autoencoder_stage.py", "test_sample.py", "test_evaluate.py",
    "test_multihost.py", "test_train.py", "test_panns.py", "test_vae_stage.py", "test_remat.py",
})


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: trains or samples a whole model (left out by -m 'not slow')")


def pytest_collection_modifyitems(config, items):
  import pytest
  for item in items:
    if os.path.basename(str(item.fspath)) in SLOW_FILES:
      item.add_marker(pytest.mark.slow)
