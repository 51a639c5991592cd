"""Compile time and step time of every training stage's jitted functions, against an earlier version
of this repository measured in the same run (the "peer" is our own code before a change).

  python benchmarks/compile.py [--config=configs/demo.py] [--stages=vae,autoencoder,generator]
      [--baseline=<git revision>] [--steps=3] [--append-readme]

For each stage, in a fresh subprocess (no in-process or persistent compilation cache, so every
figure is a cold compile; peak RSS is that process's): the train-state init's compile time, the
train step's trace, lower and compile times, the first step and the median of `--steps` further
steps, XLA's FLOP count of the step (for the DiT, whose layers run in a scan that XLA counts
once, the analytic count of models/flops.py) and its rate against this CPU's own float32 matmul
rate (a 2048^3 `jnp.dot`, measured in the same subprocess). The stages run on random inputs shaped
like the real batches, as `train/loop.py` builds them (state init, donated jitted step), without
the input pipeline or checkpoints; the autoencoder's frozen VAE is a randomly initialised one.

With `--baseline=REV` the same measurements run on `git worktree` checkouts of REV, one after the
other with ours, and the ratio column is ours / baseline (lower is better). Without it the table
has our figures only. `--append-readme` adds the rows to benchmarks/README.md.

Cost: about 3 minutes per stage and version at the demo config on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = "2-core x86_64 CPU, 24 GiB"


# ------------------------------------------------------------------------------------------------
# One stage in one process
# ------------------------------------------------------------------------------------------------
def _worker(repo: str, config_path: str, stage: str, steps: int) -> dict:
  """Measures one stage of the code under `repo` (run in its own process)."""
  import inspect
  import resource
  import time

  sys.path.insert(0, repo)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmldm_jax import config_lib, parallel
  from mmldm_jax.models import dit as dit_lib
  from mmldm_jax.train import loop, tasks
  imported = os.path.dirname(os.path.dirname(os.path.abspath(loop.__file__)))
  if os.path.realpath(imported) != os.path.realpath(os.path.join(repo, "mmldm_jax")):
    raise RuntimeError(f"measuring {repo} but mmldm_jax was imported from {imported}")
  # The XLA:CPU flags that the entry point sets, in revisions that have them; before the first
  # computation, as there.
  if hasattr(parallel, "set_cpu_xla_flags"):
    parallel.set_cpu_xla_flags()

  def seconds(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start

  # This CPU's float32 matmul rate, the limit the step's FLOP rate is read against.
  size = 2048
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  _, matmul_s = seconds(lambda: jax.block_until_ready(matmul(a)))
  matmul_flops_per_s = 2 * size ** 3 / matmul_s

  config = config_lib.load(os.path.join(repo, config_path))
  mesh = parallel.create_mesh(config)
  make_task = getattr(tasks, f"{stage}_task")
  # The autoencoder's task takes the VAE's measured scale factor (since issue 14); older revisions
  # read it from the config.
  needs_scale = "scale_factor" in inspect.signature(make_task).parameters
  task = (make_task(config, "unused", config.vae.scale_factor) if needs_scale
          else make_task(config, "unused"))
  train_config = config[f"train_{stage}"]
  init_state, optimizers = loop.make_state_init(task)
  _, shardings, _ = loop.abstract_state(init_state, task, mesh, config)
  # The key the trainer draws its parameters from (threefry before `loop.init_key` existed).
  key = loop.init_key(0) if hasattr(loop, "init_key") else jax.random.key(0)
  init = jax.jit(lambda rng: parallel.unbox(init_state(rng)), out_shardings=shardings)
  lowered_init, init_lower_s = seconds(lambda: init.lower(key))
  compiled_init, init_compile_s = seconds(lowered_init.compile)
  state = compiled_init(key)

  rng = np.random.default_rng(0)
  batch_size = train_config.batch_size
  if stage == "generator":
    shapes = dit_lib.latent_shapes(config)
    host = {"audio_latent": rng.normal(size=(batch_size,) + shapes["audio"]).astype(np.float32),
            "video_latent": rng.normal(size=(batch_size,) + shapes["video"]).astype(np.float32)}
  elif stage == "autoencoder" and config.autoencoder.get("cache_vae_latents"):
    # The step then reads the frozen VAE's posterior moments (train/posterior_cache.py).
    latent = config.data.image_size // config_lib.vae_factor(config)
    moments = lambda *lead: np.concatenate([  # noqa: E731  (mean, log-variance)
        rng.normal(size=lead + (latent, latent, config.vae.embed_dim)),
        np.full(lead + (latent, latent, config.vae.embed_dim), -6.0)], -1).astype(np.float32)
    host = {"key_moments": moments(batch_size, len(config.data.key_frames)),
            "target_moments": moments(batch_size, config.data.num_target_frames),
            "audio_moments": moments(batch_size),
            "target_indices": np.sort(rng.uniform(0, 1, (batch_size,
                                                         config.data.num_target_frames)),
                                      axis=1).astype(np.float32),
            "label": rng.integers(0, max(config.data.num_classes, 1), batch_size
                                  ).astype(np.int32)}
  else:
    size = config.data.image_size
    frames = lambda n: rng.uniform(-1, 1, (batch_size, n, size, size, 3)).astype(np.float32)
    host = task.to_model_batch({
        "key_frames": frames(len(config.data.key_frames)),
        "target_frames": frames(config.data.num_target_frames),
        "target_indices": np.sort(rng.uniform(0, 1, (batch_size, config.data.num_target_frames)),
                                  axis=1).astype(np.float32),
        "audio": rng.uniform(-0.5, 0.5, (batch_size, config_lib.clip_samples(config))
                             ).astype(np.float32),
        "label": rng.integers(0, max(config.data.num_classes, 1), batch_size).astype(np.int32)})
  batch = parallel.global_batch(host, mesh)
  frozen = None
  if stage == "autoencoder":
    vae_task = tasks.vae_task(config, "unused")
    vae_init, _ = loop.make_state_init(vae_task)
    frozen = jax.jit(lambda r: parallel.unbox(vae_init(r)))(jax.random.key(1))["params"]["vae"]
  step = jax.jit(loop.make_train_step(task, optimizers, 0), donate_argnums=(0,))
  traced, trace_s = seconds(lambda: step.trace(state, frozen, batch))
  lowered, lower_s = seconds(traced.lower)
  compiled, compile_s = seconds(lowered.compile)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  if stage == "generator" and config.dit.get("scan_layers"):
    # XLA's cost analysis counts a scanned (while-loop) body once, not once per layer: the DiT's
    # analytic count instead (models/flops.py, 3x the forward; tests/test_dit.py checks it
    # against XLA's on unrolled layers).
    from mmldm_jax.models import flops as flops_lib
    flops = float(flops_lib.dit_flops_per_sample(config)) * batch_size

  def run():
    nonlocal state
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
  _, first_step_s = seconds(run)
  times = [seconds(run)[1] for _ in range(steps)]
  step_s = float(np.median(times))
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(stage=stage, init_compile_s=init_lower_s + init_compile_s, trace_s=trace_s,
              lower_s=lower_s, compile_s=compile_s, first_step_s=first_step_s, step_s=step_s,
              flops=flops, utilisation=flops / step_s / matmul_flops_per_s,
              matmul_gflops=matmul_flops_per_s / 1e9, peak_rss_gb=peak_rss / 1e9)


def measure(repo: str, config_path: str, stage: str, steps: int) -> dict:
  """Runs `_worker` for one stage in a fresh process and returns its figures."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  command = [sys.executable, os.path.abspath(__file__), "--worker", f"--repo={repo}",
             f"--config={config_path}", f"--stages={stage}", f"--steps={steps}"]
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{stage} in {repo} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
FIGURES = (("init_compile_s", "train-state init compile", "s"),
           ("compile_s", "train step compile (after trace + lower)", "s"),
           ("trace_s", "train step trace", "s"),
           ("first_step_s", "first step", "s"),
           ("step_s", "steady step (median)", "s"),
           ("peak_rss_gb", "peak RSS of the process", "GB"))


def rows(config_path: str, ours: dict, baseline: dict | None, revision: str | None) -> list[str]:
  command = f"`python benchmarks/compile.py --config={config_path}" + (
      f" --baseline={revision}`" if revision else "`")
  date = datetime.date.today().isoformat()
  lines = []
  for stage, figures in ours.items():
    for key, label, unit in FIGURES:
      value = figures[key]
      peer = "-" if baseline is None else f"{baseline[stage][key]:.3g} {unit} (before, {revision})"
      ratio = "-" if baseline is None else f"{value / baseline[stage][key]:.2f}"
      lines.append(f"| {stage} stage ({os.path.basename(config_path)}): {label} | {command} | "
                   f"{MACHINE} | {date} | {value:.3g} {unit} | {peer} | {ratio} |")
    lines.append(
        f"| {stage} stage ({os.path.basename(config_path)}): step FLOP rate / this CPU's fp32 "
        f"matmul rate ({figures['flops'] / 1e9:.2f} GFLOP per step, matmul "
        f"{figures['matmul_gflops']:.0f} GFLOP/s; higher is better) | {command} | {MACHINE} | "
        f"{date} | {figures['utilisation']:.3f} | 1.000 (the matmul) | "
        f"{figures['utilisation']:.3f} |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--stages", default="vae,autoencoder,generator")
  parser.add_argument("--baseline", default=None, help="git revision to compare against")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--append-readme", action="store_true")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--repo", default=REPO, help=argparse.SUPPRESS)
  args = parser.parse_args()
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  if args.worker:
    print(json.dumps(_worker(args.repo, args.config, stages[0], args.steps)))
    return

  ours = {}
  for stage in stages:
    ours[stage] = measure(REPO, args.config, stage, args.steps)
    print(stage, "ours", json.dumps(ours[stage]), flush=True)
  baseline = None
  if args.baseline:
    baseline = {}
    with tempfile.TemporaryDirectory() as folder:
      checkout = os.path.join(folder, "baseline")
      subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", checkout, args.baseline],
                     check=True, capture_output=True)
      try:
        for stage in stages:
          baseline[stage] = measure(checkout, args.config, stage, args.steps)
          print(stage, "baseline", json.dumps(baseline[stage]), flush=True)
      finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", checkout],
                       check=False, capture_output=True)
  table = rows(args.config, ours, baseline, args.baseline)
  print("\n".join(table))
  if args.append_readme:
    with open(os.path.join(REPO, "benchmarks", "README.md"), "a") as f:
      f.write("\n".join(table) + "\n")


if __name__ == "__main__":
  main()
