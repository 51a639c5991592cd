"""Compile and step time of the train step's NaN guard: one `lax.cond` around the whole update (ours,
`train/loop.py`) against a `jnp.where` per parameter leaf (the peer, this repository before it).

  python benchmarks/nan_guard.py [--stages=generator,vae,autoencoder] [--steps=8]

Both steps are built from the same task and optimiser in one process, compiled one after the other
(no persistent cache) and then run alternately on the same random batch, so the machine's load
falls on both alike. Prints one table row per stage and figure. Cost on 2 CPU cores: about 6
minutes for the demo autoencoder (two ~2.5-minute compiles), under a minute for the others.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mmldm_jax import config_lib, parallel  # noqa: E402
from mmldm_jax.models import dit as dit_lib  # noqa: E402
from mmldm_jax.train import loop, optim, tasks  # noqa: E402

MACHINE = "2-core x86_64 CPU, 24 GiB"


def select_per_leaf_step(task, optimizers, seed: int):
  """The peer: the train step with its NaN guard as a select on every leaf of the parameters and
  optimiser state (what `loop.make_train_step` did before)."""
  schedule = optim.learning_rate_schedule(task.train_config)

  def train_step(state, frozen, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(seed), step)
    params, opt_state = dict(state["params"]), dict(state["opt_state"])
    metrics = {"learning_rate": schedule(step)}
    for index, group in enumerate(task.groups):
      group_rng = jax.random.fold_in(rng, index)

      def group_loss(group_params, group=group, group_rng=group_rng):
        return task.loss(group, {**params, group: group_params}, frozen, batch, group_rng, step)

      (loss, _), grads = jax.value_and_grad(group_loss, has_aux=True)(params[group])
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      updates, new_opt = optimizers[group].update(grads, opt_state[group], params[group])
      new_params = optax.apply_updates(params[group], updates)
      keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
      params[group] = jax.tree.map(keep, new_params, params[group])
      opt_state[group] = jax.tree.map(keep, new_opt, opt_state[group])
      metrics.update({f"{group}/loss": loss, f"{group}/grad_norm": grad_norm})
    return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics
  return train_step


def measure(stage: str, steps: int) -> dict:
  config = config_lib.load(os.path.join(REPO, "configs/demo.py"))
  # Pixel batches (the step VAE-encodes them), as when these rows were measured.
  config.autoencoder.cache_vae_latents = False
  if stage == "autoencoder":
    task = tasks.autoencoder_task(config, "unused", config.vae.scale_factor)
  else:
    task = getattr(tasks, f"{stage}_task")(config, "unused")
  init_state, optimizers = loop.make_state_init(task)
  init = jax.jit(lambda rng: parallel.unbox(init_state(rng)))
  rng = np.random.default_rng(0)
  batch_size = config[f"train_{stage}"].batch_size
  if stage == "generator":
    shapes = dit_lib.latent_shapes(config)
    batch = {"audio_latent": rng.normal(size=(batch_size,) + shapes["audio"]).astype(np.float32),
             "video_latent": rng.normal(size=(batch_size,) + shapes["video"]).astype(np.float32)}
  else:
    size, targets = config.data.image_size, config.data.num_target_frames
    frames = lambda n: rng.uniform(-1, 1, (batch_size, n, size, size, 3)).astype(np.float32)  # noqa: E731
    batch = task.to_model_batch({
        "key_frames": frames(len(config.data.key_frames)), "target_frames": frames(targets),
        "target_indices": np.sort(rng.uniform(0, 1, (batch_size, targets)), axis=1
                                  ).astype(np.float32),
        "audio": rng.uniform(-0.5, 0.5, (batch_size, config_lib.clip_samples(config))
                             ).astype(np.float32),
        "label": rng.integers(0, max(config.data.num_classes, 1), batch_size).astype(np.int32)})
  frozen = None
  if stage == "autoencoder":
    vae_init, _ = loop.make_state_init(tasks.vae_task(config, "unused"))
    frozen = jax.jit(lambda r: parallel.unbox(vae_init(r)))(jax.random.key(1))["params"]["vae"]

  variants = {"ours": loop.make_train_step(task, optimizers, 0),
              "peer": select_per_leaf_step(task, optimizers, 0)}
  result = {}
  for name, fn in variants.items():
    step = jax.jit(fn, donate_argnums=(0,))
    state = init(loop.init_key(0))
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    result[name] = {"compile_s": time.perf_counter() - start, "compiled": compiled,
                    "state": state, "times": []}
  for _ in range(steps + 1):   # alternate, so that load changes fall on both; drop the first
    for name in variants:
      entry = result[name]
      start = time.perf_counter()
      entry["state"], metrics = entry["compiled"](entry["state"], frozen, batch)
      jax.block_until_ready(metrics)
      entry["times"].append(time.perf_counter() - start)
  return {name: {"compile_s": entry["compile_s"], "step_s": float(np.median(entry["times"][1:]))}
          for name, entry in result.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages", default="generator,vae,autoencoder")
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation
  command = "`python benchmarks/nan_guard.py`"
  date = datetime.date.today().isoformat()
  for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
    figures = measure(stage, args.steps)
    ours, peer = figures["ours"], figures["peer"]
    for key, label in (("compile_s", "train step compile"),
                       ("step_s", f"steady step (median of {args.steps}, alternating)")):
      print(f"| {stage} stage (demo.py), NaN guard as one conditional vs a select per leaf: "
            f"{label} | {command} | {MACHINE} | {date} | {ours[key]:.3g} s | {peer[key]:.3g} s "
            f"(select per leaf) | {ours[key] / peer[key]:.2f} |", flush=True)


if __name__ == "__main__":
  main()
