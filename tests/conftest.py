"""Test setup: 8 CPU devices (so sharding is really exercised), the XLA:CPU flags the entry point
sets, absl flags parsed (Grain workers need them), and a persistent compilation cache so repeated
compiles across test files are cheap.

The README's command runs the suite in two processes (pytest-xdist, `-n 2 --dist loadfile`): XLA
compiles a program on one core, and compiling is about a third of a first run on 2 cores (the rest
is the tests' own steps), so a second process keeps the other core busy. `loadfile` keeps each
file in one process, so module-scoped fixtures (a model initialised once per file) are still built
once."""
import gc
import os

# The suite runs on the CPU backend, with the XLA:CPU flags of `python -m mmldm_jax.main`
# (`parallel.set_cpu_xla_flags`, below): YNNPACK fusions off and, since only the CPU can start,
# LLVM's -O1 for XLA's kernels, which is most of what the suite spends its time on (compiling).
# Subprocesses inherit XLA_FLAGS, so every process a test compares bitwise carries the same flags
# (float32 results may differ in the last bits under another LLVM level, as on another CPU).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from mmldm_jax import parallel  # noqa: E402

# The CPU kernel choice of `python -m mmldm_jax.main`, so that the tests run what users run.
parallel.set_cpu_xla_flags()
# XLA:CPU's thread pool at twice the 8 devices (NPROC=16), as the entry point sets it: with one
# thread per device the fsdp=8 generator step deadlocked in its collectives (test_train.py aborted
# in 2 of 8 runs from an empty compile cache, 2026-12-07). Subprocesses inherit it.
parallel.set_cpu_thread_pool_size()

# The suite's compile cache. Tests that start `python -m mmldm_jax.main` pass it on with
# SUITE_CACHE_FLAG, so that their programs land here rather than in the user's cache folder (the
# entry point's default, `config.compilation_cache_dir='auto'`).
SUITE_CACHE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
SUITE_CACHE_FLAG = f"--config.compilation_cache_dir={SUITE_CACHE}"
jax.config.update("jax_compilation_cache_dir", SUITE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The suite's two processes (pytest -n 2) share this folder without a lock (JAX locks it only with
# a size limit, whose eviction then fails on entries that the launched subprocesses write). An entry
# read while the other process is still writing it is a truncated compressed file: JAX's read fails,
# and JAX warns and compiles the program instead (jax._src.compiler._cache_read).
flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests name configs by absolute path (os.path.join(CONFIGS, "demo.py:tiny")), so the suite runs
# from any folder.
CONFIGS = os.path.join(REPO_ROOT, "configs")

# Markers given to whole files (registered in pytest.ini; single tests elsewhere carry
# @pytest.mark.slow / .parity / .subprocess). The fast subset,
# `pytest -m "not slow and not subprocess and not parity" tests`, leaves out the tests that take 10 s
# or more on 2 cores (these files train or sample a whole model, a minute or more each, most of it
# compiling), those that start processes and those that need the PyTorch reference stack; the full
# suite is what CI runs.
SLOW_FILES = frozenset({
    "test_autoencoder.py", "test_autoencoder_stage.py", "test_sample.py", "test_evaluate.py",
    "test_multihost.py", "test_train.py", "test_panns.py", "test_vae_stage.py", "test_remat.py",
})
# Every test of these files compares against a reference implementation (they skip without torch).
PARITY_FILES = frozenset({
    "test_audioclip.py", "test_convert.py", "test_lpips.py", "test_panns.py", "test_unet.py",
    "test_vae.py", "test_vocoder.py",
})
# Every test of these files starts processes (test_data_stage: its fixture runs `mmldm_jax.main`).
SUBPROCESS_FILES = frozenset({"test_data_stage.py", "test_multihost.py"})
FILE_MARKERS = {"slow": SLOW_FILES, "parity": PARITY_FILES, "subprocess": SUBPROCESS_FILES}


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_file():
  """Drops JAX's in-memory caches of compiled programs after each test file. Without it each test
  process keeps every program it compiled, and the two processes held 16-21 GiB together by the end
  of the suite (2026-12-05). A later file that needs the same program reads it back from the
  persistent cache."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="module")
def highest_matmul_precision():
  """Full float32 products for a parity module (`pytestmark = pytest.mark.usefixtures(...)`): on
  GPUs and TPUs the default precision rounds float32 operands of products to bfloat16 or TF32,
  far above the 1e-5 tolerances against the references; XLA:CPU multiplies in full float32
  either way. Set for the module and restored after it: set at import, as it was, it held for
  every test of the process (pytest imports every module before the first test) and entered every
  program's compile-cache key, so the suite's programs missed the entries of the same programs
  compiled by `python -m mmldm_jax.main` (which the tests start as subprocesses) or by one file
  run alone."""
  with jax.default_matmul_precision("highest"):
    yield


# The files that take longest, longest first (a clean run of the suite's two processes, 2026-12-06:
# test_autoencoder.py about 7 minutes, the next seven 1.5 to 4 minutes each). They run first, so
# that a long file does not start when the other process has little left to do.
LONGEST_FIRST = ("test_autoencoder.py", "test_autoencoder_stage.py", "test_evaluate.py",
                 "test_sample.py", "test_remat.py", "test_train.py", "test_multihost.py",
                 "test_dit.py")


def pytest_configure(config):
  # pytest-xdist's own order (on by default) hands out the files with the most tests first, which
  # put test_autoencoder.py (4 tests, the longest file) last: the other process sat idle for most
  # of its 10 minutes. The suite keeps its collection order instead (see LONGEST_FIRST).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  for item in items:
    name = os.path.basename(str(item.fspath))
    for marker, files in FILE_MARKERS.items():
      if name in files:
        item.add_marker(getattr(pytest.mark, marker))
  rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
