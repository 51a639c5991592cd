"""Training-step time of the generator (tiny DiT) on 1, 2, 4 and 8 simulated CPU devices with fsdp = the
device count: the sharded step compiles and runs with its collectives, and per-device parameter memory
falls as fsdp grows. The 1-device run is the baseline ("peer") of the ratios.

  python benchmarks/train_step.py [--steps=5] [--append-readme]
  python benchmarks/train_step.py --paper [--config=configs/aist.py] [--stages=generator,vae,autoencoder]
      every stage at paper size on the available accelerators: step time, examples/s, MFU
      (benchmarks/gpu.sh runs this)

Uses the same pieces as the trainer (`train/loop.py`: state init, shardings, jitted donated step) on
random latents, without the input pipeline or checkpoints. The vae and autoencoder stages are not
timed here: at tiny width their step compiles for minutes on 2 CPU cores (see benchmarks/gpu.sh).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

if "--paper" not in sys.argv:  # the scaling table simulates 8 CPU devices
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mmldm_jax import config_lib, parallel  # noqa: E402
from mmldm_jax.models import dit as dit_lib  # noqa: E402
from mmldm_jax.train import loop, tasks  # noqa: E402

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"


def _median_step_seconds(compiled, state, frozen, batch, steps: int):
  """One warm-up step, then the median wall time of `steps` steps; returns (state, seconds)."""
  state, out = compiled(state, frozen, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = compiled(state, frozen, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return state, float(np.median(times))


def measure(num_devices: int, steps: int) -> dict:
  config = config_lib.load(os.path.join(REPO, "configs", "demo.py:tiny"))
  config.unlock()
  config.mesh.shape = (("data", 1), ("fsdp", num_devices), ("tensor", 1))
  batch_size = config.train_generator.batch_size
  devices = jax.devices()[:num_devices]
  mesh = parallel.create_mesh(config, devices)
  task = tasks.generator_task(config, "unused")
  init_state, optimizers = loop.make_state_init(task)
  _, shardings, _ = loop.abstract_state(init_state, task, mesh, config)
  state = jax.jit(lambda rng: parallel.unbox(init_state(rng)),
                  out_shardings=shardings)(loop.init_key(0))
  shapes = dit_lib.latent_shapes(config)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({
      "audio_latent": rng.normal(size=(batch_size,) + shapes["audio"]).astype(np.float32),
      "video_latent": rng.normal(size=(batch_size,) + shapes["video"]).astype(np.float32)}, mesh)
  step_fn = jax.jit(loop.make_train_step(task, optimizers, 0),
                    in_shardings=(shardings, None, parallel.batch_sharding(mesh)),
                    out_shardings=(shardings, jax.sharding.NamedSharding(
                        mesh, jax.sharding.PartitionSpec())),
                    donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step_fn.lower(state, None, batch).compile()
  compile_s = time.perf_counter() - start
  state, step_s = _median_step_seconds(compiled, state, None, batch, steps)
  total, per_device = parallel.bytes_per_device(state["params"])
  return dict(devices=num_devices, compile_s=compile_s, step_s=step_s,
              examples_per_s=batch_size / step_s, param_bytes=total,
              param_bytes_per_device=per_device)


def _random_clip_batch(config, batch_size: int, rng) -> dict:
  """Random arrays shaped like the clip pipeline's batch (what the vae / autoencoder steps read)."""
  size = config.data.image_size
  frames = lambda n: rng.uniform(-1, 1, (batch_size, n, size, size, 3)).astype(np.float32)
  return {"key_frames": frames(len(config.data.key_frames)),
          "target_frames": frames(config.data.num_target_frames),
          "target_indices": np.sort(rng.uniform(0, 1, (batch_size, config.data.num_target_frames)),
                                    axis=1).astype(np.float32),
          "audio": rng.uniform(-0.5, 0.5, (batch_size, config_lib.clip_samples(config))
                               ).astype(np.float32),
          "label": rng.integers(0, max(config.data.num_classes, 1), batch_size).astype(np.int32)}


def measure_stage(config, stage: str, steps: int) -> dict:
  """Step time, examples/s and MFU (FLOPs from XLA's cost analysis) of one stage on all devices,
  data-parallel or as config.mesh says, on random inputs."""
  from mmldm_jax import metrics
  mesh = parallel.create_mesh(config)
  task = getattr(tasks, f"{stage}_task")(config, "unused")
  train_config = config[f"train_{stage}"]
  batch_size = train_config.batch_size
  init_state, optimizers = loop.make_state_init(task)
  _, shardings, _ = loop.abstract_state(init_state, task, mesh, config)
  state = jax.jit(lambda rng: parallel.unbox(init_state(rng)),
                  out_shardings=shardings)(loop.init_key(0))
  rng = np.random.default_rng(0)
  if stage == "generator":
    shapes = dit_lib.latent_shapes(config)
    host = {"audio_latent": rng.normal(size=(batch_size,) + shapes["audio"]).astype(np.float32),
            "video_latent": rng.normal(size=(batch_size,) + shapes["video"]).astype(np.float32)}
  else:
    host = task.to_model_batch(_random_clip_batch(config, batch_size, rng))
  batch = parallel.global_batch(host, mesh)
  frozen = None
  if stage == "autoencoder":  # a randomly initialised VAE stands in for the trained one
    vae_task = tasks.vae_task(config, "unused")
    vae_init, _ = loop.make_state_init(vae_task)
    _, vae_shardings, _ = loop.abstract_state(vae_init, vae_task, mesh, config)
    frozen = jax.jit(lambda r: parallel.unbox(vae_task.init(r))["vae"],
                     out_shardings=vae_shardings["params"]["vae"])(jax.random.key(1))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step_fn = jax.jit(loop.make_train_step(task, optimizers, 0),
                    in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, frozen),
                                  parallel.batch_sharding(mesh)),
                    out_shardings=(shardings, replicated), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  state, step_s = _median_step_seconds(compiled, state, frozen, batch, steps)
  peak = metrics.peak_flops(jax.devices()[0].device_kind)
  # cost_analysis counts one device's share of the partitioned program.
  mfu = flops / step_s / peak if (peak and flops) else None
  return dict(stage=stage, compile_s=compile_s, step_s=step_s, examples_per_s=batch_size / step_s,
              flops_per_device_step=flops, mfu=mfu, batch_size=batch_size)


def paper_size(args) -> None:
  """All stages at the size of `--config` (default configs/aist.py, the paper), one table."""
  config = config_lib.load(args.config)
  config.unlock()
  config.precision = args.precision
  for stage in args.stages.split(","):
    if args.batch_per_device:
      config[f"train_{stage}"].batch_size = args.batch_per_device * jax.device_count()
    r = measure_stage(config, stage, args.steps)
    mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a (device kind not in PEAK_FLOPS)"
    print(f"{stage}: batch {r['batch_size']} on {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}: compile {r['compile_s']:.1f} s, step "
          f"{r['step_s'] * 1e3:.1f} ms, {r['examples_per_s']:.1f} examples/s, "
          f"{r['flops_per_device_step'] / 1e12:.2f} TFLOP per device-step, MFU {mfu}", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--append-readme", action="store_true",
                      help="append the rows to benchmarks/README.md")
  parser.add_argument("--paper", action="store_true",
                      help="time every stage at --config's size on the available devices instead")
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "aist.py"))
  parser.add_argument("--stages", default="generator,vae,autoencoder")
  parser.add_argument("--precision", default="auto")
  parser.add_argument("--batch-per-device", type=int, default=0,
                      help="override the stages' global batch as this times the device count")
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation
  if args.paper:
    paper_size(args)
    return
  results = [measure(n, args.steps) for n in (1, 2, 4, 8)]
  base = results[0]
  print(f"{'devices':>7} {'compile s':>9} {'step ms':>8} {'ex/s':>7} {'param KiB/dev':>13} "
        f"{'step vs 1':>9} {'mem vs 1':>8}")
  for r in results:
    print(f"{r['devices']:>7} {r['compile_s']:>9.1f} {r['step_s'] * 1e3:>8.1f} "
          f"{r['examples_per_s']:>7.1f} {r['param_bytes_per_device'] / 1024:>13.1f} "
          f"{r['step_s'] / base['step_s']:>9.2f} "
          f"{r['param_bytes_per_device'] / base['param_bytes_per_device']:>8.3f}")
  if args.append_readme:
    date = datetime.date.today().isoformat()
    command = "python benchmarks/train_step.py --append-readme"
    rows = []
    for r in results[1:]:
      rows.append(
          f"| generator step (tiny DiT, batch 8), fsdp={r['devices']} vs 1 device: step time | "
          f"`{command}` | {MACHINE} | {date} | {r['step_s'] * 1e3:.1f} ms | "
          f"{base['step_s'] * 1e3:.1f} ms | {r['step_s'] / base['step_s']:.2f} |")
      rows.append(
          f"| generator params per device (tiny DiT), fsdp={r['devices']} vs 1 device | "
          f"`{command}` | {MACHINE} | {date} | {r['param_bytes_per_device'] / 1024:.1f} KiB | "
          f"{base['param_bytes_per_device'] / 1024:.1f} KiB | "
          f"{r['param_bytes_per_device'] / base['param_bytes_per_device']:.3f} |")
    with open(os.path.join(REPO, "benchmarks", "README.md"), "a") as f:
      f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
