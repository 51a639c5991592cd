"""Wall time from a stage's start to all its programs compiled: the train step compiled on a second
thread beside the state's init, and the quality-signal program beside it once the state is there
(ours, `train/loop.py`), against the three one after another (the peer, this repository before).

  python benchmarks/background_compile.py

The demo config's autoencoder stage (the demo's slowest compiles): the train-state init (jitted and
run), the train step (compiled for abstract shapes of the posterior-cache batch) and the
quality-signal encode-and-decode program (`tasks.autoencoder_quality_signals`, on the synthetic
validation clips written to a temporary folder). Both orders run in one process, ours first, with
the in-memory compile caches cleared between them and no persistent cache. Prints one table row.
Cost on 2 CPU cores: about 5 minutes.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mmldm_jax import config_lib, parallel  # noqa: E402
from mmldm_jax.data import synthetic  # noqa: E402
from mmldm_jax.train import loop, tasks, weights  # noqa: E402

MACHINE = "2-core x86_64 CPU, 24 GiB"


def posterior_batch(config, mesh):
  """Abstract autoencoder batch of VAE posterior moments, as the posterior cache feeds it."""
  batch_size = config.train_autoencoder.batch_size
  latent = config.data.image_size // config_lib.vae_factor(config)
  moments = (latent, latent, 2 * config.vae.embed_dim)
  shapes = {"key_moments": ((batch_size, len(config.data.key_frames)) + moments, jnp.float32),
            "target_moments": ((batch_size, config.data.num_target_frames) + moments,
                               jnp.float32),
            "audio_moments": ((batch_size,) + moments, jnp.float32),
            "target_indices": ((batch_size, config.data.num_target_frames), jnp.float32),
            "label": ((batch_size,), jnp.int32)}
  sharding = parallel.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for name, (shape, dtype) in shapes.items()}


def measure(side_by_side: bool, workdir: str) -> float:
  """Seconds from the start to the init done and both programs compiled."""
  config = config_lib.load(os.path.join(REPO, "configs/demo.py"))
  mesh = parallel.create_mesh(config)
  rules = parallel.logical_rules(config, "conv")
  task = tasks.autoencoder_task(config, workdir, config.vae.scale_factor)
  init_state, optimizers = loop.make_state_init(task)
  target, shardings, _ = loop.abstract_state(init_state, task, mesh, config)
  vae_init, _ = loop.make_state_init(tasks.vae_task(config, workdir))
  frozen = jax.jit(lambda r: parallel.unbox(vae_init(r)))(jax.random.key(1))["params"]["vae"]
  step = jax.jit(loop.make_train_step(task, optimizers, 0), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  init = jax.jit(lambda rng: parallel.unbox(init_state(rng)), out_shardings=shardings)
  _, compile_evaluate = tasks.autoencoder_quality_signals(
      config, workdir, weights.autoencoder_system(config, config.vae.scale_factor))
  batch = posterior_batch(config, mesh)

  start = time.perf_counter()
  if side_by_side:
    step_compile = parallel.compile_in_background(step, target, frozen, batch, name="step",
                                                  mesh=mesh, rules=rules)
    jax.block_until_ready(init(loop.init_key(0)))
    evaluate_compile = compile_evaluate(target["params"], frozen, mesh)
    step_compile.result()
    evaluate_compile.result()
  else:
    jax.block_until_ready(init(loop.init_key(0)))
    with parallel.activation_rules(mesh, rules):
      step.lower(target, frozen, batch).compile()
    compile_evaluate(target["params"], frozen, mesh).result()
  return time.perf_counter() - start


def main() -> None:
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation
  config = config_lib.load(os.path.join(REPO, "configs/demo.py"))
  with tempfile.TemporaryDirectory() as workdir:
    synthetic.write_dataset(config, os.path.join(workdir, "data"), progress=False)
    ours = measure(True, workdir)
    jax.clear_caches()
    peer = measure(False, workdir)
  print(f"| autoencoder stage (demo.py), train-state init + train step compile + quality-signal "
        f"compile, side by side on two threads (ours) vs one after another (before): wall time "
        f"to all compiled | `python benchmarks/background_compile.py` | {MACHINE} | "
        f"{datetime.date.today().isoformat()} | {ours:.0f} s | {peer:.0f} s | "
        f"{ours / peer:.2f} |", flush=True)


if __name__ == "__main__":
  main()
